"""gateway/signals.py and the freeze rules of gateway/release.py, in process against a real in-memory store, then
the HTTP endpoints (``/admin/v1/models/{m}/signals``, ``/admin/v1/freeze``) through the admin app.

Every refusal is checked to change nothing: same revisions, no new audit entry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.admin import create_admin_app
from gateway.app import Gateway
from gateway.auth import Authenticator, Principal
from gateway.canary import Phase, Policy, Stage
from gateway.errors import Conflict, Forbidden, ServingError
from gateway.release import Release, SplitBody, StartBody
from gateway.settings import RoutingFile
from gateway.signals import ComplaintBody, IncidentBody, LiftBody, SignalBody, Signals
from gateway.state import MemoryStateStore
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
