"""Notifications end to end: two real gateways sharing a real Redis send each decision of a real rollout once,
signed, in order, to a real receiver on loopback — even one that is down for the first 5 s — and a sink that never
answers slows neither predictions nor the rollout."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.cli import main
from loadtests.bench.variants import HungReceiver
from tests.confirm_receiver import ConfirmReceiver
from tests.integration.expect import expect
from tests.integration.test_canary import FAST, INFER, NO_CACHE, Load, audit, body, canary
from tests.procs import (
    ADMIN_TOKEN,
    admin_headers,
    free_port,
    routing,
    start_gateway,
    start_model_server,
    start_redis,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("model_repo")
SECRET = "hook-secret-for-the-test"


def verified(headers: dict[str, str], raw: bytes) -> bool:
    ts = headers["x-bluegreen-timestamp"]
    want = "sha256=" + hmac.new(SECRET.encode(), f"{ts}.".encode() + raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, headers.get("x-bluegreen-signature", ""))


def notifications(admin: str) -> dict[str, Any]:
    return expect(httpx.get(f"{admin}/admin/v1/notifications", headers=admin_headers())).json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def blue(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[str]:
    proc, url = start_model_server(tmp_path_factory.mktemp("blue"), ["digits:1"])
    yield url
    proc.stop()


def test_a_faulty_rollout_is_told_once_in_order_signed_through_a_receiver_outage(blue: str, tmp_path: Path) -> None:
    rproc, rport = start_redis(tmp_path)
    green, green_url = start_model_server(tmp_path, ["digits:2"], extra=["--fault-error-rate", "0.05"])
    hook_port = free_port()  # nobody listens there yet: the receiver is down
    doc = {**routing([blue], [green_url]),
           "notifications": [{"url": f"http://127.0.0.1:{hook_port}/hook", "secret_env": "HOOK_SECRET",
                              "events": ["bluegreen.rollout.*", "bluegreen.validation.refused"], "timeout_s": 1}]}
    env = {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{rport}/0", "HOOK_SECRET": SECRET}
    a, data_a, admin_a = start_gateway(tmp_path, doc, env, name="a")
    b, data_b, admin_b = start_gateway(tmp_path, doc, env, name="b")
    loads = [Load(data_a, 2), Load(data_b, 2)]
    receiver = None
    try:
        down_since = time.monotonic()
        canary(admin_b, "start", {"force": True, "policy": FAST})
        wait_until(lambda: canary(admin_a)["phase"] == "rolled_back", 30, interval=0.1, what="the rollback")
        time.sleep(max(0.0, 5.0 - (time.monotonic() - down_since)))  # the receiver stays down 5 s in all
        receiver = ConfirmReceiver(200, port=hook_port).start()
        wait_until(lambda: any(e["type"] == "bluegreen.rollout.rolled_back" for e in receiver.received()), 30,
                   interval=0.1, what="the rolled-back event after the receiver came up")
        time.sleep(1.0)  # time for a duplicate, if a second replica were sending
        events, got = receiver.received(), list(receiver.got)
        told = [e for e in audit(admin_a) if e["action"].startswith("canary_")][::-1]
        status_a, status_b = notifications(admin_a), notifications(admin_b)
    finally:
        for load in loads:
            load.stop()
        if receiver is not None:
            receiver.stop()
        a.stop()
        b.stop()
        green.stop()
        rproc.stop()

    kinds = [e["type"] for e in events]
    assert kinds[0] == "bluegreen.rollout.started" and kinds[-1] == "bluegreen.rollout.rolled_back", kinds
    assert set(kinds[1:-1]) <= {"bluegreen.rollout.advanced"}, kinds
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), f"an event was delivered twice: {ids}"
    assert ids == [e["id"] for e in told], "every audited decision, in the audit's order, each once"
    assert all(verified(h, raw) for h, raw in got), "every body verifies against the secret"
    assert all(e["specversion"] == "1.0" and e["subject"] == "digits" and e["source"] for e in events)
    rolled = events[-1]["data"]
    assert rolled["rollout"]["phase"] == "rolled_back" and "error rate" in rolled["reason"]
    assert rolled["evidence"]["candidate"]["errors"] > 0
    assert rolled["evidence"]["thresholds"]["max_error_rate"] == 0.001
    # One replica sent (the lease holder); both list its deliveries from Redis; the first needed retries.
    assert [s["sending"] for s in (status_a, status_b)].count(True) == 1
    delivered = {d["event_id"]: d for d in status_a["deliveries"] if d["outcome"] == "delivered"}
    assert set(delivered) == set(ids) and delivered[ids[0]]["attempts"] > 1
    assert status_a["deliveries"] == status_b["deliveries"]


def test_a_sink_that_never_answers_slows_neither_predictions_nor_the_rollout(blue: str, tmp_path: Path) -> None:
    """A healthy rollout with a sink that accepts connections and never answers (each attempt waits out its 2 s):
    the rollout promotes, and a probe of the gateway every 50 ms never waits anywhere near an attempt's 2 s — the
    event loop that serves predictions and runs the controller is never held by the sink."""
    hole = HungReceiver()  # the bench's sink that never answers
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    sinks = [{"url": hole.url, "timeout_s": 2, "retry_for_s": 3}]
    gw, data, admin = start_gateway(tmp_path, {**routing([blue], [green_url]), "notifications": sinks})
    load = Load(data, 2)
    probes: list[float] = []
    try:
        canary(admin, "start", {"force": True, "policy": FAST})
        with httpx.Client(base_url=data, timeout=10) as c:
            deadline = time.monotonic() + 40
            while canary(admin)["phase"] not in ("promoted", "rolled_back") and time.monotonic() < deadline:
                s = time.perf_counter()
                expect(c.post(INFER, content=body(len(probes)), headers=NO_CACHE))
                probes.append(time.perf_counter() - s)
                time.sleep(0.05)
        status, told = canary(admin), notifications(admin)
    finally:
        load.stop()
        gw.stop()
        green.stop()
        hole.close()
    load.assert_no_failures("while the sink hung")
    assert status["phase"] == "promoted", status["last_decision"]
    assert hole.accepted >= 1, "the gateway did try the hung sink"
    assert told["sinks"][0]["last_error"] is not None and "no answer within 2s" in told["sinks"][0]["last_error"]
    assert len(probes) >= 20 and max(probes) < 1.0, f"slowest probe {max(probes) * 1000:.0f} ms of {len(probes)}"


def test_every_kind_of_decision_and_event_reaches_the_receiver_in_order(blue: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """One gateway, a CloudEvents sink and a Slack sink on one receiver: a manual split, a start the validation
    gate refuses, a forced start, a complaint, an incident (rollback and freeze), the freeze lifted, a re-pointed
    color and a breaker opening on a dead green — each arrives as its event, in the order it happened."""
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    port = free_port()
    receiver = ConfirmReceiver(200, port=port).start()
    sinks = [{"url": f"http://127.0.0.1:{port}/ce", "secret_env": "HOOK_SECRET", "name": "ce"},
             {"url": f"http://127.0.0.1:{port}/slack", "format": "slack", "name": "chat",
              "events": ["bluegreen.rollout.*", "bluegreen.freeze.*"]}]
    (tmp_path / "validation").mkdir()
    gw, data, admin = start_gateway(tmp_path, {**routing([blue], [green_url]), "notifications": sinks},
                                    {"HOOK_SECRET": SECRET, "BLUEGREEN_VALIDATION_REPO": str(tmp_path / "validation")})
    api = f"{admin}/admin/v1"
    hold = {"stages": [{"weight": 20, "hold_s": 600}], "interval_s": 1, "min_requests": 0}
    try:
        expect(httpx.put(f"{api}/models/digits/split", json={"blue": 90, "green": 10}, headers=admin_headers()))
        expect(httpx.put(f"{api}/models/digits/split", json={"blue": 100, "green": 0}, headers=admin_headers()))
        expect(httpx.post(f"{api}/models/digits/canary/start", json={"policy": hold}, headers=admin_headers()), 409)
        canary(admin, "start", {"force": True, "policy": hold})
        signals = f"{api}/models/digits/signals"
        expect(httpx.post(signals, json={"kind": "complaint", "color": "green", "count": 2}, headers=admin_headers()))
        expect(httpx.post(signals, json={"kind": "incident", "reason": "checkout is down"}, headers=admin_headers()))
        expect(httpx.delete(f"{api}/freeze", headers=admin_headers()))
        expect(httpx.put(f"{api}/models/digits/colors/green", json={"version": "2", "backends": [green_url]},
                         headers=admin_headers()))
        green.stop()  # green dies; half the traffic goes its way until its breaker opens
        expect(httpx.put(f"{api}/models/digits/split", json={"blue": 50, "green": 50}, headers=admin_headers()))
        with httpx.Client(base_url=data, timeout=10) as c:
            for i in range(60):
                c.post(INFER, content=body(i), headers=NO_CACHE)
        wait_until(lambda: any(e.get("type") == "bluegreen.breaker.opened" for e in receiver.received()), 15,
                   interval=0.1, what="the breaker's event")
        wait_until(lambda: len([h for h, _ in receiver.got if h.get("content-type") == "application/json"]) >= 4,
                   10, interval=0.1, what="the chat sink's messages")
        got = list(receiver.got)
        monkeypatch.setenv("BLUEGREEN_ADMIN_URL", admin)
        monkeypatch.setenv("BLUEGREEN_ADMIN_TOKEN", ADMIN_TOKEN)
        capsys.readouterr()
        assert main(["notifications", "--limit", "3"]) == 0
        shown = capsys.readouterr().out
    finally:
        gw.stop()
        green.stop()
        receiver.stop()
    # A webhook's path may be its secret (Slack's is): no request line of the HTTP client logs it.
    log = (tmp_path / "gateway.log").read_text()
    assert f"127.0.0.1:{port}/ce" not in log and f"127.0.0.1:{port}/slack" not in log
    # What `bluegreen notifications` prints: both sinks (URLs without their path), the newest deliveries.
    assert f"ce  http://127.0.0.1:{port}/…  cloudevents  signed  queued 0" in shown
    assert f"chat  http://127.0.0.1:{port}/…  slack  unsigned" in shown
    assert "deliveries, newest first:" in shown
    assert "bluegreen.breaker.opened  digits  delivered  1 attempt, 200" in shown

    signed = [(h, raw) for h, raw in got if h["content-type"].startswith("application/cloudevents")]
    assert all(verified(h, raw) for h, raw in signed)
    cloud = [(h, orjson.loads(raw)) for h, raw in signed]
    chat = [orjson.loads(raw)["text"] for h, raw in got if h["content-type"] == "application/json"]
    kinds = [e["type"].removeprefix("bluegreen.") for _, e in cloud]
    assert kinds == ["weights.changed", "weights.changed", "validation.refused", "rollout.started",
                     "signal.received", "signal.received", "freeze.set", "rollout.rolled_back", "freeze.lifted",
                     "color.repointed", "weights.changed", "breaker.opened"], kinds
    assert not any("x-bluegreen-signature" in h for h, raw in got if (h, raw) not in signed), "no secret: unsigned"
    events = {e["type"].removeprefix("bluegreen."): e["data"] for _, e in cloud}
    assert "no report at" in events["validation.refused"]["reason"]
    assert events["rollout.rolled_back"]["reason"] == "incident: checkout is down"
    assert events["freeze.set"]["by"] == events["freeze.lifted"]["by"]
    assert events["breaker.opened"]["changed"]["to"]["color"] == "green"
    assert [c.split(": ", 1)[1].split(" (by ")[0] for c in chat] == [
        "rollout of green started at 20%", "releases frozen", "green rolled back to 0%", "release freeze lifted"], chat
