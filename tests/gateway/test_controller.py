"""gateway/controller.py: the driver's evidence starts at the stage's start (and the rollout's), on a fake clock.

The data plane is the real one; the tests play the traffic by counting attempts the way the data plane does
after each upstream call (cumulative totals and the recent window), so the controller reads them through
``LocalMetrics`` exactly as in the embedded gateway.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway import canary
from gateway.auth import Principal
from gateway.canary import Policy, Stage, Status
from gateway.controller import Controller
from gateway.dataplane import DataPlane
from gateway.release import Release
from gateway.settings import Color, GatewaySettings, RoutingFile
from gateway.sources import LocalMetrics
from gateway.state import MemoryStateStore
from tests.gateway.support import DIGITS, FakeClock, routing_doc

ALICE = Principal("alice", frozenset({"admin"}))
MODEL = "digits"
POLICY = Policy(stages=(Stage(20, 10.0), Stage(50, 10.0)), interval_s=5.0, min_requests=100,
                max_no_data_intervals=3, detect_error_rate=None, detect_slow_share=None)
"""Small samples on purpose (these tests are about what is counted): min_requests is the whole evidence minimum."""


class Rig:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.store = MemoryStateStore.from_routing(RoutingFile.model_validate(routing_doc()))
        self.plane = DataPlane(GatewaySettings(), self.store)
        for version in ("1", "2"):  # known up front, so a state change schedules no call to a backend
            self.plane.signatures[(MODEL, version)] = DIGITS
        self.release = Release(self.store)
        self.controller = Controller(self.release, LocalMetrics(self.plane), clock=clock)

    def serve(self, color: Color, requests: int, errors: int = 0) -> None:
        """What the data plane records for each attempt: the cumulative totals and the recent window."""
        rt = self.plane.runtime(MODEL, color)
        for i in range(requests):
            rt.record(0.01, i >= errors)

    async def start(self, policy: Policy = POLICY) -> None:
        """An operator's start, as the admin API applies it (at the clock's time, between two ticks)."""
        status, actions = canary.start(policy, "green", self.clock())
        await self.release.apply(self.store.get(MODEL), status, actions, actor=ALICE, audit=True)

    def status(self) -> Status:
        return self.store.get(MODEL).canary

    def evidence(self) -> dict[str, Any]:
        decision = self.status().last_decision
        assert decision is not None
        return decision.evidence


@pytest.fixture
def rig(clock: FakeClock) -> Rig:
    return Rig(clock)


async def test_a_candidate_with_5_percent_errors_is_rolled_back_at_the_first_analysis(rig: Rig) -> None:
    await rig.controller.tick()  # a reading before the start
    rig.clock.advance(0.25)
    await rig.start()
    started = rig.clock()
    for _ in range(int(POLICY.interval_s / 0.25) - 1):  # the controller's ticks during the first interval
        rig.serve("green", 6, errors=0)
        rig.serve("blue", 24)
        rig.clock.advance(0.25)
        await rig.controller.tick()
    status = rig.status()
    assert status.phase == "progressing" and status.last_analysis == started  # not yet due: no analysis
    rig.serve("green", 6, errors=6)  # 120 since the start, 6 of them errors: 5%
    rig.clock.advance(0.25)
    await rig.controller.tick()
    status = rig.status()
    assert status.phase == "rolled_back", status.last_decision
    assert status.last_analysis == rig.clock()  # the first analysis
    evidence = rig.evidence()["candidate"]
    assert (evidence["requests"], evidence["errors"]) == (120, 6)
    assert status.last_decision is not None and "error rate 6/120" in status.last_decision.reason
    assert rig.store.get(MODEL).weights == {"blue": 100, "green": 0}


async def test_the_first_analysis_counts_every_candidate_request_since_the_start_and_none_before(rig: Rig) -> None:
    rig.serve("green", 50, errors=50)  # before the rollout (a manual 10% earlier): not this release's evidence
    await rig.controller.tick()
    rig.clock.advance(0.5)
    await rig.start()
    rig.serve("green", 150)
    rig.clock.advance(POLICY.interval_s)
    await rig.controller.tick()
    status = rig.status()
    assert status.phase == "progressing"
    assert status.last_decision is not None and status.last_decision.result == "hold"
    assert "holding stage 1" in status.last_decision.reason  # not "no candidate requests"
    assert status.no_data_intervals == 0
    assert rig.evidence()["candidate"]["requests"] == 150 and rig.evidence()["candidate"]["errors"] == 0


async def test_the_next_stage_counts_from_the_advance_and_its_first_analysis_sees_its_traffic(rig: Rig) -> None:
    await rig.controller.tick()
    rig.clock.advance(0.25)
    await rig.start()
    for _ in range(2):  # stage 1 holds 10 s: two analyses, the second passes it
        rig.serve("green", 100)
        rig.clock.advance(POLICY.interval_s)
        await rig.controller.tick()
    status = rig.status()
    assert status.stage == 2 and status.last_decision is not None and status.last_decision.result == "advance"
    assert rig.evidence()["candidate"]["requests"] == 200
    rig.serve("green", 130, errors=0)
    rig.clock.advance(POLICY.interval_s)
    await rig.controller.tick()
    status = rig.status()
    assert status.last_decision is not None and status.last_decision.result == "hold"
    assert status.no_data_intervals == 0
    assert rig.evidence()["candidate"]["requests"] == 130  # stage 2's alone, from its first analysis on


async def test_an_operator_promote_counts_from_its_own_time(rig: Rig) -> None:
    await rig.controller.tick()
    rig.clock.advance(0.25)
    await rig.start()
    rig.serve("green", 40, errors=10)
    rig.clock.advance(1.0)
    await rig.controller.tick()
    rig.clock.advance(0.1)
    status, actions = canary.operator("promote", rig.status(), rig.clock(), "alice")
    await rig.release.apply(rig.store.get(MODEL), status, actions, actor=ALICE, audit=True)
    rig.serve("green", 100)
    rig.clock.advance(POLICY.interval_s)
    await rig.controller.tick()
    status = rig.status()
    assert status.phase == "promoted", status.last_decision
    assert rig.evidence()["candidate"] == {**rig.evidence()["candidate"], "requests": 100, "errors": 0}


async def test_a_controller_without_a_reading_from_before_watches_one_interval_before_judging(rig: Rig) -> None:
    await rig.controller.tick()
    rig.clock.advance(0.25)
    await rig.start()
    rig.serve("green", 100)
    rig.clock.advance(3 * POLICY.interval_s)  # long overdue when a new leader takes over
    fresh = Controller(rig.release, LocalMetrics(rig.plane), clock=rig.clock)
    await fresh.tick()
    assert rig.status().last_analysis == rig.status().started_at  # no verdict on an interval it did not see
    rig.serve("green", 80)
    rig.clock.advance(POLICY.interval_s)
    await fresh.tick()
    status = rig.status()
    assert status.last_decision is not None and status.last_decision.result == "hold"
    assert status.no_data_intervals == 0
    assert rig.evidence()["candidate"]["requests"] == 80  # from its first reading: late, never early


async def test_readings_are_kept_for_the_history_horizon_only(rig: Rig) -> None:
    for _ in range(1000):
        rig.clock.advance(0.25)
        await rig.controller.tick()
    history = rig.controller._history[MODEL]
    assert len(history) <= rig.controller.history_s / 0.25 + 2
    assert history[0].time < rig.clock() - rig.controller.history_s <= history[1].time
