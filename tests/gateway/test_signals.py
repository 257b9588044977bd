"""gateway/signals.py and the freeze rules of gateway/release.py, in process against a real in-memory store, then
the HTTP endpoints (``/admin/v1/models/{m}/signals``, ``/admin/v1/freeze``) through the admin app.

Every refusal is checked to change nothing: same revisions, no new audit entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admin import create_admin_app
from gateway.app import Gateway
from gateway.auth import Authenticator, Principal
from gateway.canary import Phase, Policy, Stage
from gateway.errors import Conflict, Forbidden, PreconditionFailed, ServingError
from gateway.release import Release, SplitBody, StartBody
from gateway.settings import RoutingFile
from gateway.signals import ComplaintBody, IncidentBody, LiftBody, SignalBody, Signals
from gateway.state import MemoryStateStore, ModelState
from tests.gateway.support import ALICE, FakeClock, client, routing_doc

ADMIN = Principal("alice", frozenset({"admin"}))
OPERATOR = Principal("ci", frozenset({"operator"}))
DESK = Principal("support-desk", frozenset({"signals"}))
VIEWER = Principal("grafana", frozenset({"viewer"}))
QUICK = Policy(stages=(Stage(10, 0), Stage(50, 0)), interval_s=1, min_requests=0, detect_error_rate=None,
               detect_slow_share=None)


def two_models() -> Signals:
    doc = routing_doc()
    doc["models"]["iris"] = {**doc["models"]["digits"], "weights": {"blue": 100, "green": 0}}
    store = MemoryStateStore.from_routing(RoutingFile.model_validate(doc))
    return Signals(Release(store, None, {"digits": QUICK, "iris": QUICK}, clock=FakeClock()))


def signal(doc: dict[str, Any]) -> SignalBody:
    return SignalBody.model_validate(doc)


async def actions(s: Signals) -> list[str]:
    return [e.action for e in reversed(await s.release.store.read_audit(10_000))]


async def unchanged(s: Signals, error: type[ServingError], match: str, call: Any) -> None:
    before = {n: m.revision for n, m in s.release.store.models.items()}
    audited = len(await s.release.store.read_audit(10_000))
    with pytest.raises(error, match=match):
        await call
    assert {n: m.revision for n, m in s.release.store.models.items()} == before
    assert len(await s.release.store.read_audit(10_000)) == audited


async def test_a_complaint_without_a_rollout_is_recorded_and_changes_nothing_else() -> None:
    s = two_models()
    before = s.release.get("digits")
    doc = await s.receive("digits", signal({"kind": "complaint", "color": "green", "count": 3}), actor=DESK)
    assert doc["counted"] is False and s.release.get("digits") is before
    entry = (await s.release.store.read_audit(1))[0]
    assert (entry.action, entry.who, entry.model) == ("signal_received", "support-desk", "digits")
    assert entry.new == {"kind": "complaint", "color": "green", "count": 3}  # the body, as the notifier reads it


async def test_complaints_accumulate_per_color_of_the_active_rollout() -> None:
    s = two_models()
    await s.release.start("digits", StartBody(), actor=ADMIN)
    for color, n in (("green", 2), ("green", 5), ("blue", 1), (None, 4)):
        doc = await s.receive("digits", signal({"kind": "complaint", "color": color, "count": n}), actor=OPERATOR)
        assert doc["counted"] is True
    t = s.release.get("digits").canary.complaints
    assert (t.candidate, t.stable, t.unattributed) == (7, 1, 4)
    assert (await actions(s))[1:] == ["signal_received", "signal_complaint"] * 4
    assert s.release.get("iris").canary.complaints.candidate == 0  # complaints are per model


async def test_an_incident_freezes_every_model_and_rolls_back_every_rollout_at_once() -> None:
    s = two_models()
    for m in ("digits", "iris"):
        await s.release.start(m, StartBody(), actor=ADMIN)
    doc = await s.receive("iris", signal({"kind": "incident", "reason": "checkout errors"}), actor=DESK)
    assert doc["rolled_back"] == ["digits", "iris"] and doc["frozen"] == ["digits", "iris"] and not doc["failed"]
    for m in ("digits", "iris"):
        state = s.release.get(m)
        assert state.canary.phase == Phase.ROLLED_BACK and state.weights == {"blue": 100, "green": 0}
        assert state.canary.last_decision is not None
        assert state.canary.last_decision.reason == "incident: checkout errors"
        assert state.frozen is not None and (state.frozen.by, state.frozen.reason) == ("support-desk",
                                                                                       "checkout errors")
    entries = list(reversed(await s.release.store.read_audit(100)))
    tail = [(e.action, e.model, e.who) for e in entries[2:]]
    assert tail == [("signal_received", "iris", "support-desk"),
                    ("freeze_set", "digits", "support-desk"), ("canary_rollback", "digits", "support-desk"),
                    ("freeze_set", "iris", "support-desk"), ("canary_rollback", "iris", "support-desk")]
    assert entries[-1].reason == "incident: checkout errors"


async def test_while_frozen_starts_and_splits_toward_the_candidate_are_refused_until_lifted() -> None:
    s = two_models()
    await s.receive("digits", signal({"kind": "incident", "reason": "pager"}), actor=OPERATOR)
    r = s.release
    await unchanged(s, Conflict, r"^releases are frozen since \d{4}-\d\d-\d\dT.*Z by ci: pager; an admin lifts "
                    "the freeze with DELETE /admin/v1/freeze$", r.start("digits", StartBody(), actor=ADMIN))
    await unchanged(s, Conflict, "may only move traffic back to the stable color blue: green would go from 0% to 10%",
                    r.set_split("digits", SplitBody(blue=90, green=10), actor=ADMIN, if_revision=None))
    await r.set_split("digits", SplitBody(blue=100, green=0), actor=ADMIN, if_revision=None)  # no change: allowed
    await unchanged(s, Forbidden, "'admin' role", s.lift(LiftBody(), actor=OPERATOR))
    doc = await s.lift(LiftBody(reason="resolved"), actor=ADMIN)
    assert doc["lifted"] == ["digits", "iris"] and doc["frozen"] is False
    assert (await actions(s))[-2:] == ["freeze_lifted", "freeze_lifted"]
    await unchanged(s, Conflict, "not frozen", s.lift(LiftBody(), actor=ADMIN))
    assert (await r.start("digits", StartBody(), actor=ADMIN)).canary.phase == Phase.PROGRESSING


async def test_while_frozen_a_split_back_to_stable_is_allowed() -> None:
    s = two_models()
    await s.release.set_split("digits", SplitBody(blue=40, green=60), actor=ADMIN, if_revision=None)
    await s.receive("digits", signal({"kind": "incident", "reason": "pager"}), actor=ADMIN)
    assert s.release.get("digits").candidate == "green"  # the last named, as both carry traffic
    await s.release.set_split("digits", SplitBody(blue=100, green=0), actor=OPERATOR, if_revision=None)
    assert s.release.get("digits").weights == {"blue": 100, "green": 0}


class Racing(MemoryStateStore):
    """A real in-memory store where, once ``wins`` more writes to ``digits`` went through, every further write to
    it loses its compare-and-set race (what a store that keeps changing, or Redis failing, looks like)."""

    wins: int | None = None

    async def update(self, name: str, if_revision: int | None, change: Callable[[ModelState], ModelState],
                     **kwargs: Any) -> ModelState:
        if name == "digits" and self.wins is not None:
            if self.wins == 0:
                raise PreconditionFailed(f"model {name!r} kept changing; try again")
            self.wins -= 1
        return await super().update(name, if_revision, change, **kwargs)


@pytest.mark.parametrize("wins", [0, 1])
async def test_an_incident_never_leaves_a_model_frozen_with_its_rollout_active(wins: int) -> None:
    """One write per model freezes it and rolls its rollout back: the write is refused (nothing changes, the model
    is named as failed) or it is applied (frozen and rolled back) — with one write allowed, there is no second
    write (a rollback after the freeze) that could be lost."""
    doc = routing_doc()
    doc["models"]["iris"] = {**doc["models"]["digits"], "weights": {"blue": 100, "green": 0}}
    store = Racing.from_routing(RoutingFile.model_validate(doc))
    assert isinstance(store, Racing)
    s = Signals(Release(store, None, {"digits": QUICK, "iris": QUICK}, clock=FakeClock()))
    for m in ("digits", "iris"):
        await s.release.start(m, StartBody(), actor=ADMIN)
    before = {m: s.release.get(m) for m in ("digits", "iris")}
    store.wins = wins
    doc = await s.receive("digits", signal({"kind": "incident", "reason": "pager"}), actor=DESK)
    digits, iris = s.release.get("digits"), s.release.get("iris")
    assert iris.frozen is not None and iris.canary.phase == Phase.ROLLED_BACK
    assert iris.revision == before["iris"].revision + 1  # one write
    if wins == 0:
        assert digits is before["digits"] and digits.frozen is None and digits.canary.phase == Phase.PROGRESSING
        assert list(doc["failed"]) == ["digits"] and "kept changing" in doc["failed"]["digits"]
        assert doc["frozen"] == doc["rolled_back"] == ["iris"]
    else:
        assert digits.frozen is not None and digits.canary.phase == Phase.ROLLED_BACK
        assert digits.weights == {"blue": 100, "green": 0} and digits.revision == before["digits"].revision + 1
        assert doc["frozen"] == doc["rolled_back"] == ["digits", "iris"] and not doc["failed"]


async def test_an_incidents_one_write_is_audited_as_the_freeze_then_told_as_a_rollback() -> None:
    """The write is ``freeze_set`` (with everything it changed); the ``canary_rollback`` entry after it carries the
    rollout, so the notifier sends both events, freeze first. A model without a rollout gets the freeze alone."""
    from gateway.notify import event_type

    s = two_models()
    await s.release.start("digits", StartBody(), actor=ADMIN)
    await s.receive("digits", signal({"kind": "incident", "reason": "pager"}), actor=DESK)
    entries = list(reversed(await s.release.store.read_audit(100)))[1:]  # after the start
    assert [(e.action, e.model) for e in entries] == [("signal_received", "digits"), ("freeze_set", "digits"),
                                                      ("canary_rollback", "digits"), ("freeze_set", "iris")]
    assert [event_type(e) for e in entries] == ["bluegreen.signal.received", "bluegreen.freeze.set",
                                                "bluegreen.rollout.rolled_back", "bluegreen.freeze.set"]
    frozen, rolled = entries[1], entries[2]
    assert frozen.old == {"weights": {"blue": 90, "green": 10}, "frozen": None}
    assert frozen.new is not None and frozen.new["weights"] == {"blue": 100, "green": 0}
    assert frozen.new["frozen"]["reason"] == "pager"
    assert (rolled.old, rolled.new) == ({"weights": {"blue": 90, "green": 10}}, {"weights": {"blue": 100,
                                                                                             "green": 0}})
    assert rolled.rollout is not None and (rolled.rollout["result"], rolled.rollout["phase"]) == ("rollback",
                                                                                                  "rolled_back")
    assert (rolled.reason, rolled.evidence, rolled.who) == ("incident: pager", {"incident": "pager"}, "support-desk")
    assert entries[3].old == {"frozen": None} and entries[3].rollout is None


async def test_the_controller_holds_a_frozen_rollout_yet_still_rolls_it_back(caplog: pytest.LogCaptureFixture) -> None:
    """A rollout active on a frozen model (a state an incident's write rules out; an older gateway's, say): the
    controller's advance is refused, logged and dropped (the round goes on, the status stays as it was), and
    its rollback still goes through."""
    from gateway import canary
    from gateway.controller import Controller
    from gateway.dataplane import DataPlane
    from gateway.settings import GatewaySettings
    from gateway.sources import LocalMetrics
    from gateway.state import Freeze
    from tests.gateway.support import DIGITS

    clock = FakeClock()
    store = MemoryStateStore.from_routing(RoutingFile.model_validate(routing_doc()))
    plane = DataPlane(GatewaySettings(), store)
    for version in ("1", "2"):
        plane.signatures[("digits", version)] = DIGITS
    release = Release(store, clock=clock)
    controller = Controller(release, LocalMetrics(plane), clock=clock)
    policy = Policy(stages=(Stage(20, 10.0), Stage(50, 10.0)), interval_s=5.0, min_requests=100,
                    detect_error_rate=None, detect_slow_share=None)

    def serve(color: str, requests: int, errors: int = 0) -> None:
        rt = plane.runtime("digits", color)  # type: ignore[arg-type]
        for i in range(requests):
            rt.record(0.01, i >= errors)

    await controller.tick()
    clock.advance(0.25)
    status, actions = canary.start(policy, "green", clock())
    await release.apply(store.get("digits"), status, actions, actor=ADMIN, audit=True)
    await store.update("digits", None, lambda s: dataclasses.replace(s, frozen=Freeze("old", 1.0, "pager")),
                       who="old", action="freeze_set")
    serve("green", 100)
    clock.advance(5.0)
    await controller.tick()  # stage 1 holds 10 s: a hold
    held = store.get("digits")
    assert held.canary.last_decision is not None and held.canary.last_decision.result == "hold"
    serve("green", 100)
    clock.advance(5.0)
    with caplog.at_level("WARNING", logger="gateway.controller"):
        await controller.tick()  # stage 1 passed: the advance is refused
    assert store.get("digits") is held and held.weights == {"blue": 80, "green": 20}
    assert "canary decision for digits refused: releases are frozen since" in caplog.text
    assert "green would go from 20% to 50%" in caplog.text and "Traceback" not in caplog.text
    serve("green", 100, errors=100)
    clock.advance(5.0)
    await controller.tick()
    state = store.get("digits")
    assert state.canary.phase == Phase.ROLLED_BACK and state.weights == {"blue": 100, "green": 0}
    assert state.frozen is not None


async def test_roles_a_viewer_cannot_signal_and_the_signals_role_grants_nothing_else() -> None:
    s = two_models()
    await unchanged(s, Forbidden, "one of the roles 'operator', 'signals'",
                    s.receive("digits", signal({"kind": "incident", "reason": "x"}), actor=VIEWER))
    assert not DESK.may("viewer") and not DESK.may("operator")
    await unchanged(s, Forbidden, "'operator' role", s.release.set_split(
        "digits", SplitBody(blue=100, green=0), actor=DESK, if_revision=None))


@pytest.mark.parametrize(("doc", "field"), [
    ({"kind": "complaint", "count": 0}, "count"), ({"kind": "complaint", "count": 100_001}, "count"),
    ({"kind": "complaint", "count": "3"}, "count"), ({"kind": "complaint", "color": "red", "count": 1}, "color"),
    ({"kind": "complaint", "count": 1, "severity": 2}, "severity"), ({"kind": "incident"}, "reason"),
    ({"kind": "incident", "reason": "  "}, "reason"), ({"kind": "incident", "reason": "x" * 501}, "reason"),
    ({"kind": "rumour"}, "kind"), ({"count": 1}, "kind")])
def test_bodies_are_refused_naming_the_field(doc: dict[str, Any], field: str) -> None:
    from pydantic import ValidationError

    from gateway.policy import describe

    with pytest.raises(ValidationError) as info:
        SignalBody.model_validate(doc)
    assert field in describe(info.value)


def test_the_bodies_parse() -> None:
    assert isinstance(signal({"kind": "complaint", "count": 2}).root, ComplaintBody)
    assert isinstance(signal({"kind": "incident", "reason": "r"}).root, IncidentBody)


# ----------------------------------------------------------------------------------------------- over HTTP

API = "/admin/v1"
DESK_T, VIEWER_T, OPERATOR_T = "desk-token-0123456789ab", "grafana-token-0123456789", "ci-token-0123456789ab"


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    tokens = {ALICE: Principal("alice", frozenset({"admin"})), DESK_T: DESK, VIEWER_T: VIEWER,
              OPERATOR_T: OPERATOR}
    async with client(create_admin_app(gateway.release, gateway.plane, Authenticator(tokens, 10, 60))) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def state_of(gateway: Gateway) -> tuple[int, int]:
    return gateway.store.get("digits").revision, len(gateway.store.audit_log)


async def test_http_signals_need_no_if_match_and_bad_bodies_are_400(http: httpx.AsyncClient,
                                                                    gateway: Gateway) -> None:
    url = f"{API}/models/digits/signals"
    before = state_of(gateway)
    for body in ({"kind": "complaint", "count": -1}, {"kind": "incident"}, [1], {"kind": "complaint"}):
        r = await http.post(url, json=body, headers=auth(DESK_T))
        assert r.status_code == 400 and set(r.json()) == {"error"}, r.text
    r = await http.post(f"{API}/models/nope/signals", json={"kind": "incident", "reason": "x"}, headers=auth(DESK_T))
    assert r.status_code == 404
    r = await http.post(url, json={"kind": "incident", "reason": "x"}, headers=auth(VIEWER_T))
    assert r.status_code == 403 and "'signals'" in r.json()["error"]
    assert state_of(gateway) == before
    r = await http.post(url, json={"kind": "complaint", "color": "green", "count": 2}, headers=auth(DESK_T))
    assert r.status_code == 200 and r.json()["counted"] is False
    assert (await http.get(f"{API}/models", headers=auth(DESK_T))).status_code == 403  # signals only


async def test_http_incident_freeze_and_lift(http: httpx.AsyncClient, gateway: Gateway) -> None:
    assert (await http.get(f"{API}/freeze", headers=auth(VIEWER_T))).json() == {
        "frozen": False, "models": {"digits": "not frozen"}}
    r = await http.post(f"{API}/models/digits/canary/start", headers={**auth(ALICE), "if-match": "*"})
    assert r.status_code == 200
    r = await http.post(f"{API}/models/digits/signals", json={"kind": "incident", "reason": "5xx spike"},
                        headers=auth(OPERATOR_T))
    assert r.status_code == 200 and r.json()["rolled_back"] == ["digits"]
    frozen = (await http.get(f"{API}/freeze", headers=auth(VIEWER_T))).json()["models"]["digits"]
    assert (frozen["by"], frozen["reason"]) == ("ci", "5xx spike") and frozen["time_iso"].endswith("Z")
    model = (await http.get(f"{API}/models", headers=auth(VIEWER_T))).json()["models"][0]
    assert model["frozen"]["reason"] == "5xx spike"
    r = await http.get(f"{API}/models/digits", headers=auth(VIEWER_T))
    assert r.json()["frozen"] == model["frozen"] and r.headers["etag"] == model["etag"]
    assert (await http.get(f"{API}/models/nope", headers=auth(VIEWER_T))).status_code == 404
    r = await http.post(f"{API}/models/digits/canary/start", headers={**auth(ALICE), "if-match": "*"})
    assert r.status_code == 409 and r.json()["error"].startswith("releases are frozen since ")
    before = state_of(gateway)
    assert (await http.delete(f"{API}/freeze", headers=auth(ALICE))).status_code == 428
    assert (await http.delete(f"{API}/freeze", headers={**auth(ALICE), "if-match": '"3"'})).status_code == 412
    r = await http.delete(f"{API}/freeze", headers={**auth(OPERATOR_T), "if-match": "*"})
    assert r.status_code == 403
    r = await http.request("DELETE", f"{API}/freeze", json={"why": 1}, headers={**auth(ALICE), "if-match": "*"})
    assert r.status_code == 400 and "why" in r.json()["error"]
    assert state_of(gateway) == before
    r = await http.request("DELETE", f"{API}/freeze", json={"reason": "fixed"},
                           headers={**auth(ALICE), "if-match": "*"})
    assert r.status_code == 200 and r.json()["lifted"] == ["digits"]
    assert (await http.delete(f"{API}/freeze", headers={**auth(ALICE), "if-match": "*"})).status_code == 409
    r = await http.post(f"{API}/models/digits/canary/start", headers={**auth(ALICE), "if-match": "*"})
    assert r.status_code == 200
    audit = [e["action"] for e in (await http.get(f"{API}/audit", headers=auth(VIEWER_T))).json()["entries"]]
    assert audit[:2] == ["canary_start", "freeze_lifted"]
    assert {"signal_received", "freeze_set", "canary_rollback"} <= set(audit)


# ----------------------------------------------------------------------------------------------- with Redis


async def test_with_redis_every_replica_sees_the_complaints_and_the_freeze(tmp_path: Path) -> None:
    """Two replicas' stores on one real redis-server: what one records through a signal, the other reads (the
    controller may run on either), and racing complaints from both are all counted."""
    import asyncio

    from gateway.state_redis import RedisStateStore
    from tests.procs import start_redis

    proc, port = start_redis(tmp_path)
    routing = RoutingFile.model_validate(routing_doc())
    stores = [RedisStateStore(f"redis://127.0.0.1:{port}/0", routing, refresh_s=3600, replica=r) for r in "ab"]
    try:
        for st in stores:
            await st.start()
        a, b = (Signals(Release(st, None, {"digits": QUICK}, clock=FakeClock())) for st in stores)
        await a.release.start("digits", StartBody(), actor=ADMIN)
        complaint = signal({"kind": "complaint", "color": "green", "count": 1})
        await asyncio.gather(*(s.receive("digits", complaint, actor=DESK) for s in (a, b) for _ in range(10)))
        for s in (a, b):
            await s.release.store.reload()  # type: ignore[attr-defined]
            assert s.release.get("digits").canary.complaints.candidate == 20
        await b.receive("digits", signal({"kind": "incident", "reason": "pager"}), actor=DESK)
        await a.release.store.reload()  # type: ignore[attr-defined]
        assert a.describe()["models"]["digits"]["reason"] == "pager"
        assert a.release.get("digits").canary.phase == Phase.ROLLED_BACK
        await unchanged(a, Conflict, "releases are frozen", a.release.start("digits", StartBody(), actor=ADMIN))
        actions = [e.action for e in await a.release.store.read_audit(100)]
        assert actions.count("signal_complaint") == 20 and actions.count("signal_received") == 21
    finally:
        for st in stores:
            await st.aclose()
        proc.stop()


# ----------------------------------------------------------------------------------------------- the CLI's checks


@pytest.mark.parametrize(("kind", "options", "flag"), [
    ("complaint", {}, "--count N"), ("complaint", {"count": 0}, "--count must be 1-100000"),
    ("complaint", {"count": 2, "reason": "x"}, "--reason goes with `signal MODEL incident`"),
    ("incident", {}, "--reason TEXT"), ("incident", {"reason": " "}, "--reason TEXT"),
    ("incident", {"reason": "x", "color": "green", "count": 1}, "--color, --count go with"),
    ("rumour", {}, "complaint or incident")])
def test_the_cli_refuses_options_that_do_not_fit_before_sending(kind: str, options: dict[str, Any],
                                                                flag: str) -> None:
    from gateway.admin_client import UsageError
    from gateway.signals_client import signal_body

    with pytest.raises(UsageError, match=flag.replace("(", r"\(")):
        signal_body(kind, **options)


def test_the_servers_field_names_become_the_cli_flags() -> None:
    from gateway.admin_client import AdminError
    from gateway.signals_client import _flags

    exc = _flags(AdminError(400, "invalid body: complaint.count: Input should be less than or equal to 100000"))
    assert str(exc) == "invalid body: --count: Input should be less than or equal to 100000" and exc.status == 400
