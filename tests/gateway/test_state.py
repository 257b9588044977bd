"""gateway/state.py: compare-and-set, the audit log, the state file across restarts, listeners."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.errors import NotFound, PreconditionFailed
from gateway.settings import Color, RoutingFile
from gateway.state import ColorState, MemoryStateStore, ModelState


def routing(blue: int = 100, green: int = 0) -> RoutingFile:
    return RoutingFile.model_validate({"models": {
        "digits": {"colors": {"blue": {"version": "1", "backends": ["http://127.0.0.1:8001"]},
                              "green": {"version": 2, "backends": ["http://127.0.0.1:8002/"]}},
                   "weights": {"blue": blue, "green": green}},
        "wide": {"colors": {"blue": {"version": "1", "backends": ["http://127.0.0.1:8003"]},
                            "green": {"version": "1", "backends": ["http://127.0.0.1:8004"]}}},
    }})


def weights(blue: int, green: int) -> dict[Color, int]:
    return {"blue": blue, "green": green}


def set_weights(w: dict[Color, int]) -> Callable[[ModelState], ModelState]:
    return lambda s: dataclasses.replace(s, weights=w)


def test_from_routing() -> None:
    store = MemoryStateStore.from_routing(routing())
    s = store.get("digits")
    assert s.colors["green"] == ColorState("2", ("http://127.0.0.1:8002",))  # version as text, URL without "/"
    assert s.weights == weights(100, 0) and s.revision == 1 and s.etag == '"1"'
    assert (s.candidate, s.stable) == ("green", "blue")
    assert store.get("wide").weights == weights(100, 0)  # the default split
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        store.get("nope")


def test_candidate_rules() -> None:
    store = MemoryStateStore.from_routing(routing(0, 100))
    assert store.get("digits").candidate == "blue"  # the color at 0%
    both = dataclasses.replace(store.get("digits"), weights=weights(50, 50))
    assert both.candidate == "green"
    assert dataclasses.replace(both, candidate_override="blue").candidate == "blue"
    assert both.color_of_version("2") == "green" and both.color_of_version("9") is None


async def test_compare_and_set_applies_and_bumps_the_revision() -> None:
    store = MemoryStateStore.from_routing(routing())
    updated = await store.update("digits", 1, set_weights(weights(80, 20)), who="alice", action="set_weights")
    assert updated.weights == weights(80, 20) and updated.revision == 2
    assert store.get("digits") is updated
    assert store.get("wide").revision == 1  # revisions are per model


async def test_stale_revision_is_refused_and_changes_nothing() -> None:
    store = MemoryStateStore.from_routing(routing())
    await store.update("digits", 1, set_weights(weights(80, 20)), who="alice", action="set_weights")
    before, audit_before = store.get("digits"), store.audit()
    called = []

    def change(s: ModelState) -> ModelState:
        called.append(s)
        return dataclasses.replace(s, weights=weights(0, 100))

    with pytest.raises(PreconditionFailed, match="revision 2"):
        await store.update("digits", 1, change, who="bob", action="set_weights")
    assert called == []  # the change was never even computed
    assert store.get("digits") is before and store.audit() == audit_before


async def test_unconditional_write() -> None:
    store = MemoryStateStore.from_routing(routing())
    await store.update("digits", None, set_weights(weights(50, 50)), who="controller", action="canary_step")
    assert store.get("digits").revision == 2


async def test_exactly_one_of_many_writers_with_the_same_revision_wins() -> None:
    store = MemoryStateStore.from_routing(routing())
    wins = 0
    for i in range(50):
        try:
            await store.update("digits", 1, set_weights(weights(100 - i, i)), who=f"w{i}", action="set_weights")
            wins += 1
        except PreconditionFailed:
            pass
    assert wins == 1 and store.get("digits").weights == weights(100, 0) and len(store.audit()) == 1


async def test_audit_entries_hold_who_action_and_only_the_changed_fields() -> None:
    store = MemoryStateStore.from_routing(routing())
    await store.update("digits", 1, set_weights(weights(95, 5)), who="alice", action="set_weights", reason="canary")
    green = ColorState("3", ("http://127.0.0.1:9003",))
    await store.update("digits", 2, lambda s: dataclasses.replace(s, colors={**s.colors, "green": green}),
                 who="bob", action="set_color", evidence={"validation": "passed"})
    newest, oldest = store.audit()
    assert (oldest.who, oldest.action, oldest.model, oldest.reason) == ("alice", "set_weights", "digits", "canary")
    assert oldest.old == {"weights": {"blue": 100, "green": 0}}
    assert oldest.new == {"weights": {"blue": 95, "green": 5}}
    assert (newest.who, newest.action) == ("bob", "set_color")
    assert newest.old == {"colors": {"blue": {"version": "1", "backends": ["http://127.0.0.1:8001"]},
                                     "green": {"version": "2", "backends": ["http://127.0.0.1:8002"]}}}
    assert newest.new["colors"]["green"] == {"version": "3", "backends": ["http://127.0.0.1:9003"]}
    assert newest.evidence == {"validation": "passed"}
    assert store.audit(limit=1) == [newest]
    doc = newest.as_json()
    assert doc["who"] == "bob" and doc["time_iso"].endswith("Z")


async def test_candidate_change_is_audited_even_when_only_derived() -> None:
    store = MemoryStateStore.from_routing(routing())
    await store.update("digits", 1, set_weights(weights(0, 100)), who="alice", action="set_weights")
    entry = store.audit()[0]
    assert set(entry.old) == {"weights", "candidate", "stable"}  # the derived roles swapped too
    assert entry.new["candidate"] == "blue" and entry.new["stable"] == "green"


async def test_state_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    store = MemoryStateStore.from_routing(routing(), path)
    assert not path.exists()  # nothing written until something changes
    await store.update("digits", 1, set_weights(weights(75, 25)), who="alice", action="set_weights", reason="r")
    green = ColorState("3", ("http://127.0.0.1:9003", "http://127.0.0.1:9004"))
    await store.update("digits", 2, lambda s: dataclasses.replace(s, colors={**s.colors, "green": green},
                                                            candidate_override="green"),
                 who="bob", action="set_color_forced")
    assert json.loads(path.read_text())["models"]["digits"]["revision"] == 3

    again = MemoryStateStore.from_routing(routing(), path)  # a restart: same routing file, same state file
    assert again.get("digits") == store.get("digits")
    assert again.get("digits").weights == weights(75, 25) and again.get("digits").colors["green"] == green
    assert again.get("wide") == store.get("wide")
    assert again.audit() == store.audit()
    # It carries on from there: the old ETag is stale, the current one works.
    with pytest.raises(PreconditionFailed):
        await again.update("digits", 2, set_weights(weights(50, 50)), who="alice", action="set_weights")
    await again.update("digits", 3, set_weights(weights(50, 50)), who="alice", action="set_weights")
    assert len(MemoryStateStore.from_routing(routing(), path).audit()) == 3


async def test_state_file_ignores_models_gone_from_the_routing_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = MemoryStateStore.from_routing(routing(), path)
    await store.update("wide", 1, set_weights(weights(50, 50)), who="alice", action="set_weights")
    only_digits = RoutingFile.model_validate({"models": {"digits": routing().models["digits"].model_dump()}})
    again = MemoryStateStore.from_routing(only_digits, path)
    assert set(again.models) == {"digits"}


def test_unreadable_state_file_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    store = MemoryStateStore.from_routing(routing(), path)
    assert store.get("digits").weights == weights(100, 0)
    assert "ignoring unreadable state file" in caplog.text


async def test_listener_notified_with_the_new_state_after_each_change() -> None:
    store = MemoryStateStore.from_routing(routing())
    seen: list[ModelState] = []
    store.subscribe(seen.append)
    updated = await store.update("digits", 1, set_weights(weights(90, 10)), who="alice", action="set_weights")
    assert seen == [updated]
    with pytest.raises(PreconditionFailed):
        await store.update("digits", 1, set_weights(weights(0, 100)), who="alice", action="set_weights")
    assert seen == [updated]  # a refused write notifies nobody
