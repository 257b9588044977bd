"""Confirm gates: the controller, driven in-process on a fake clock, asks a real HTTP receiver on loopback before
a rollout leaves a stage, and goes on only on a 2xx.

The receiver is a real server in a thread (``tests/confirm_receiver.py``); the traffic is played on the real data
plane as in ``test_controller.py`` (whose rig these tests reuse).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway import canary, confirm
from gateway.app import Gateway
from gateway.canary import Policy, Stage
from tests.confirm_receiver import ConfirmReceiver, confirm_receiver
from tests.gateway.support import ALICE as ALICE_TOKEN
from tests.gateway.support import FakeClock, client
from tests.gateway.test_controller import ALICE, MODEL, POLICY, Rig
from tests.procs import free_port

STAGE_1 = "stage-1"


def gated(url: str, **changes: Any) -> Policy:
    """The controller tests' policy (20% then 50%, 10 s each, an analysis every 5 s) with stage 1 gated."""
    return dataclasses.replace(POLICY, stages=(Stage(20, 10.0, confirm_url=url), POLICY.stages[1]), **changes)


async def to_stage_end(rig: Rig, policy: Policy) -> None:
    """Start the rollout and run stage 1's two analyses with healthy traffic (the second would pass it)."""
    await rig.controller.tick()
    rig.clock.advance(0.25)
    await rig.start(policy)
    await intervals(rig, 2)


async def intervals(rig: Rig, n: int, errors: int = 0) -> None:
    for _ in range(n):
        rig.serve("green", 100, errors=errors)
        rig.serve("blue", 100)
        rig.clock.advance(POLICY.interval_s)
        await rig.controller.tick()


def reason(rig: Rig) -> str:
    decision = rig.status().last_decision
    assert decision is not None
    return f"{decision.result}: {decision.reason}"


@pytest.fixture
async def rig(clock: FakeClock) -> AsyncIterator[Rig]:
    rig = Rig(clock)
    yield rig
    await rig.controller.stop()  # closes the gates' client


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s}s: {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[ConfirmReceiver]:
    with confirm_receiver(503) as r:
        yield r


async def test_a_gate_answering_503_holds_the_stage_and_a_200_lets_it_advance(rig: Rig,
                                                                              receiver: ConfirmReceiver) -> None:
    await to_stage_end(rig, gated(receiver.url()))
    status = rig.status()
    assert (status.phase, status.stage) == ("progressing", 1)
    assert reason(rig) == f"hold: waiting for the confirm gate of stage 1: {receiver.url()} answered 503 " \
                          "(stage 1 passed)"
    assert rig.store.get(MODEL).weights == {"blue": 80, "green": 20}
    assert status.inconclusive_since is None and rig.evidence()["confirm_gate"] == STAGE_1
    [sent] = receiver.received()
    assert {k: sent[k] for k in ("gate", "model", "candidate", "phase", "stage", "stages", "weight", "next_weight",
                                 "result", "reason")} == \
        {"gate": STAGE_1, "model": MODEL, "candidate": "green", "phase": "progressing", "stage": 1, "stages": 2,
         "weight": 20, "next_weight": 50, "result": "advance", "reason": "stage 1 passed"}
    assert sent["evidence"]["candidate"]["requests"] == 200 and receiver.paths == ["/confirm"]

    await intervals(rig, 1)  # still refused: asked again, held again
    assert rig.status().stage == 1 and len(receiver.received()) == 2 and reason(rig).startswith("hold: waiting")

    receiver.status = 200
    await intervals(rig, 1)
    status = rig.status()
    assert (status.phase, status.stage) == ("progressing", 2), reason(rig)
    assert reason(rig) == "advance: stage 1 passed" and len(receiver.received()) == 3
    assert rig.store.get(MODEL).weights == {"blue": 50, "green": 50}
    await intervals(rig, 2)  # stage 2 has no gate: nothing more is sent to it
    assert rig.status().phase == "promoting" and len(receiver.received()) == 3


async def test_the_controller_asks_every_gate_with_one_client_and_closes_it_when_it_stops(
        rig: Rig, receiver: ConfirmReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Building an httpx client loads the TLS context (tens of ms of blocking work on the serving loop): once."""
    built: list[httpx.AsyncClient] = []

    def client() -> httpx.AsyncClient:
        built.append(http := real())
        return http

    real = confirm.client
    monkeypatch.setattr(confirm, "client", client)
    await to_stage_end(rig, gated(receiver.url()))
    await intervals(rig, 2)
    assert len(receiver.received()) == 3 and reason(rig).startswith("hold: waiting for the confirm gate")
    [http] = built
    assert not http.is_closed
    await rig.controller.stop()
    assert http.is_closed and len(built) == 1


async def test_a_gate_that_hangs_delays_neither_another_models_rollback_nor_the_next_rounds(
        clock: FakeClock, receiver: ConfirmReceiver) -> None:
    """Model A's gate takes 10 s to answer (30 s allowed); model B's candidate fails meanwhile: B is rolled back at
    its next analysis, by the controller's own periodic loop, while A's decision still waits for its gate."""
    a, b = MODEL, "iris"
    rig = Rig(clock, models=(a, b))
    receiver.status, receiver.delay_s = 200, 10.0
    await rig.controller.tick()
    rig.clock.advance(0.25)
    await rig.start(gated(receiver.url(), confirm_timeout_s=30.0), model=a)
    await rig.start(POLICY, model=b)
    rig.controller.start()  # the real loop, a round every 0.25 s; the fake clock moves only when the test says
    try:
        async def interval(b_errors: int = 0) -> None:
            for model, errors in ((a, 0), (b, b_errors)):
                rig.serve("green", 100, errors=errors, model=model)
                rig.serve("blue", 100, model=model)
            rig.clock.advance(POLICY.interval_s)

        await interval()
        await eventually(lambda: all(rig.status(m).last_analysis == rig.clock() for m in (a, b)), "1st analyses")
        await interval()  # A's stage 1 passes: its gate is asked, and hangs
        await eventually(lambda: len(receiver.received()) == 1, "A's gate asked")
        asked = time.monotonic()
        await eventually(lambda: rig.status(b).last_analysis == rig.clock(), "B's 2nd analysis")
        assert rig.status(b).phase == "progressing"
        await interval(b_errors=20)  # 20% errors on B's candidate
        await eventually(lambda: rig.status(b).phase == "rolled_back", "B rolled back", timeout_s=5.0)
        assert time.monotonic() - asked < 8.0  # well before A's gate answers (10 s)
        assert rig.store.get(b).weights == {"blue": 100, "green": 0}
        status = rig.status(a)  # A still waits: neither advanced nor held, and its gate was asked only once
        assert (status.phase, status.stage) == ("progressing", 1) and len(receiver.received()) == 1
        assert status.last_decision is not None and status.last_decision.reason.startswith("holding stage 1")
        assert rig.store.get(a).weights == {"blue": 80, "green": 20}
    finally:
        await rig.controller.stop()


async def test_a_failing_candidate_held_at_a_gate_is_rolled_back_at_once_without_asking(
        rig: Rig, receiver: ConfirmReceiver) -> None:
    await to_stage_end(rig, gated(receiver.url()))
    assert reason(rig).startswith("hold: waiting for the confirm gate of stage 1")
    await intervals(rig, 1, errors=20)  # 20% errors while held
    status = rig.status()
    assert status.phase == "rolled_back", reason(rig)
    assert "error rate" in reason(rig)
    assert rig.store.get(MODEL).weights == {"blue": 100, "green": 0}
    assert len(receiver.received()) == 1  # the rollback was not sent to the gate


async def test_the_promotion_gate_holds_the_move_to_100_percent_after_the_stage_gate(rig: Rig) -> None:
    with confirm_receiver(200) as stage_gate, confirm_receiver(503) as promotion:
        policy = Policy(stages=(Stage(20, 10.0, confirm_url=stage_gate.url()),), interval_s=5.0,
                        min_requests=100, detect_error_rate=None, detect_slow_share=None,
                        promote_confirm_url=promotion.url("/promotion"))
        await to_stage_end(rig, policy)
        status = rig.status()
        assert (status.phase, status.stage) == ("progressing", 1)
        assert reason(rig) == f"hold: waiting for the confirm gate of the promotion: {promotion.url('/promotion')} " \
                              "answered 503 (stage 1 passed)"
        assert [b["gate"] for b in stage_gate.received()] == [STAGE_1]  # asked first, said yes
        [sent] = promotion.received()
        assert (sent["gate"], sent["result"], sent["weight"], sent["next_weight"]) == ("promotion", "promote", 20, 100)
        assert rig.store.get(MODEL).weights == {"blue": 80, "green": 20}

        promotion.status = 204
        await intervals(rig, 1)
        assert rig.status().phase == "promoting", reason(rig)
        assert rig.store.get(MODEL).weights == {"blue": 0, "green": 100}
        assert len(stage_gate.received()) == 2 and len(promotion.received()) == 2


async def test_a_hold_at_a_gate_is_not_inconclusive_however_long_it_lasts(rig: Rig,
                                                                          receiver: ConfirmReceiver) -> None:
    await to_stage_end(rig, gated(receiver.url(), max_inconclusive_s=6.0))
    await intervals(rig, 4)  # 20 s held, past max_inconclusive_s: still a hold, never a pause for an operator
    status = rig.status()
    assert (status.phase, status.paused_by, status.inconclusive_since) == ("progressing", None, None), reason(rig)
    assert reason(rig).startswith("hold: waiting for the confirm gate") and len(receiver.received()) == 5


async def test_a_gate_that_answers_too_late_or_not_at_all_holds_within_the_timeout(rig: Rig,
                                                                                   receiver: ConfirmReceiver) -> None:
    receiver.status, receiver.delay_s = 200, 2.0
    await to_stage_end(rig, gated(receiver.url(), confirm_timeout_s=0.3))
    assert reason(rig).startswith(f"hold: waiting for the confirm gate of stage 1: {receiver.url()} timed out "
                                  "after 0.3s")
    closed = f"http://127.0.0.1:{free_port()}/confirm"  # nothing listens there
    # The policy lives in the rollout: abort it and start another whose gate is a closed port.
    status, actions = canary.operator("abort", rig.status(), rig.clock(), "alice")
    await rig.release.apply(rig.store.get(MODEL), status, actions, actor=ALICE, audit=True)
    rig.clock.advance(1.0)
    t0 = time.monotonic()
    await to_stage_end(rig, gated(closed))
    assert time.monotonic() - t0 < 5.0  # no waiting on a closed port
    assert reason(rig).startswith(f"hold: waiting for the confirm gate of stage 1: {closed} refused the connection")
    assert rig.status().phase == "progressing"


async def test_a_gate_dripping_its_answer_is_cut_off_at_the_timeout(receiver: ConfirmReceiver) -> None:
    """httpx's timeout is per read: a byte every 0.1 s never trips a 0.4 s one, but the whole exchange is bounded."""
    receiver.status, receiver.drip_s = 200, 0.1
    async with confirm.client() as http:
        t0 = time.monotonic()
        answer = await confirm.ask(http, receiver.url(), {"gate": STAGE_1}, 0.4)
        assert answer == f"{receiver.url()} timed out after 0.4s"
        assert 0.3 < time.monotonic() - t0 < 3.0  # the whole answer would take 6 s
        receiver.drip_s = 0.0
        assert await confirm.ask(http, receiver.url(), {"gate": STAGE_1}, 0.4) is None  # the client is still good


async def test_an_operators_promote_is_not_sent_to_the_gates_and_says_so(rig: Rig,
                                                                         receiver: ConfirmReceiver) -> None:
    await to_stage_end(rig, gated(receiver.url(), promote_confirm_url=receiver.url("/promotion")))
    status, actions = canary.operator("promote", rig.status(), rig.clock(), "alice")
    await rig.release.apply(rig.store.get(MODEL), status, actions, actor=ALICE, audit=True)
    assert rig.status().phase == "promoting"
    assert reason(rig) == "promote: by alice; confirm gates not asked (an operator's command): stage-1, promotion"
    assert rig.evidence()["confirm_gates_not_asked"] == [STAGE_1, "promotion"]
    assert len(receiver.received()) == 1  # only the controller's own attempt, before


def test_a_confirm_url_must_be_http_or_https_with_a_host_and_round_trips() -> None:
    policy = Policy.from_json({"stages": [{"weight": 10, "confirm_url": "http://127.0.0.1:9000/confirm"}],
                               "promote_confirm_url": "https://gate.example.com/promote?team=ml",
                               "confirm_timeout_s": 2})
    assert Policy.from_json(policy.as_json()) == policy
    assert policy.as_json()["stages"][0]["confirm_url"] == "http://127.0.0.1:9000/confirm"
    for bad, why in [("ftp://gate.example.com/", "http or https URL"), ("http:///confirm", "with a host"),
                     ("gate.example.com/confirm", "http or https URL"), ("http://h:port/", "http or https URL"),
                     ("http://gate example/", "spaces"), ("http://h/" + "a" * 2048, "2,048"), (5, "a string"),
                     ("http://user:pass@gate.example.com/", "user name or password"),
                     ("https://token@gate.example.com/", "user name or password"),
                     ("http://@gate.example.com/", "user name or password")]:
        with pytest.raises(ValueError, match=f"promote_confirm_url: .*{why}"):
            Policy.from_json({"promote_confirm_url": bad})
    with pytest.raises(ValueError, match=r"stages\.0\.confirm_url: .*http or https"):
        Policy.from_json({"stages": [{"weight": 10, "confirm_url": "javascript:alert(1)"}]})
    with pytest.raises(ValueError, match=r"either for people .* or for a confirm gate"):
        Policy.from_json({"stages": [{"weight": 10, "approvals": ["security"], "confirm_url": "http://h/"}]})
    for timeout in (0, 31, "5"):
        with pytest.raises(ValueError, match="confirm_timeout_s"):
            Policy.from_json({"confirm_timeout_s": timeout})


async def test_a_start_with_a_bad_confirm_url_is_a_400_naming_it_and_changes_nothing(gateway: Gateway) -> None:
    headers = {"authorization": f"Bearer {ALICE_TOKEN}", "if-match": "*"}
    start = "/admin/v1/models/digits/canary/start"
    before = gateway.store.get("digits")
    async with client(gateway.admin_app()) as admin:
        r = await admin.post(start, headers=headers, json={"policy": {"promote_confirm_url": "file:///etc/passwd"}})
        assert r.status_code == 400 and "promote_confirm_url: must be an http or https URL" in r.json()["error"]
        assert gateway.store.get("digits").revision == before.revision
        secret = "http://ci:s3cr3t-t0ken@gate.example.com/confirm"
        for policy in ({"promote_confirm_url": secret}, {"stages": [{"weight": 10, "confirm_url": secret}]}):
            r = await admin.post(start, headers=headers, json={"policy": policy})
            assert r.status_code == 400 and "confirm_url: must not carry a user name or password" in r.json()["error"]
            assert "s3cr3t" not in r.text and "gate.example.com" not in r.text  # the URL is not echoed
        assert "stages.0.confirm_url" in r.json()["error"]
        assert gateway.store.get("digits").revision == before.revision
        good = {"stages": [{"weight": 10, "confirm_url": "http://127.0.0.1:9/confirm"}], "confirm_timeout_s": 1}
        r = await admin.post(start, headers=headers, json={"force": True, "policy": good})
        assert r.status_code == 200, r.text
        policy = (await admin.get("/admin/v1/models/digits/canary", headers=headers)).json()["policy"]
        assert policy["stages"][0]["confirm_url"] == "http://127.0.0.1:9/confirm"
        assert (policy["promote_confirm_url"], policy["confirm_timeout_s"]) == (None, 1)


def test_an_approval_of_the_last_stage_moves_past_the_promotion_gate_and_says_so() -> None:
    """Pure: people's approval is their decision; the promotion's gate is not asked, and the evidence says so."""
    policy = Policy(stages=(Stage(20, 0.0, approvals=("security",)),), promote_confirm_url="http://127.0.0.1:9/p")
    status, _ = canary.start(policy, "green", 1000.0)
    status = dataclasses.replace(status, phase=canary.Phase.PAUSED, paused_by="approval", paused_at=1001.0)
    done, actions = canary.approve(status, "security", "sec-team", 1002.0)
    assert done.phase == "promoting" and actions == [canary.SetWeight("green", 100)]
    assert done.last_decision is not None and done.last_decision.reason == \
        "stage 1 approved: security by sec-team; confirm gates not asked (an operator's command): promotion"
    assert done.last_decision.evidence["confirm_gates_not_asked"] == ["promotion"]
