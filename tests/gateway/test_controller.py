"""gateway/controller.py: the driver's evidence starts at the stage's start (and the rollout's), on a fake clock.

The data plane is the real one; the tests play the traffic by counting attempts the way the data plane does
after each upstream call (cumulative totals and the recent window), so the controller reads them through
``LocalMetrics`` exactly as in the embedded gateway.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from gateway import canary
from gateway.auth import Principal
from gateway.canary import Policy, Stage, Status
from gateway.controller import Controller
from gateway.dataplane import DataPlane
from gateway.release import Release
from gateway.settings import Color, GatewaySettings, RoutingFile
from gateway.sources import LocalMetrics, MergedMetrics, MetricsPublisher
from gateway.state import MemoryStateStore
from gateway.state_redis import RedisStateStore
from tests.gateway.support import DIGITS, FakeClock, routing_doc
from tests.procs import start_redis

ALICE = Principal("alice", frozenset({"admin"}))
MODEL = "digits"
POLICY = Policy(stages=(Stage(20, 10.0), Stage(50, 10.0)), interval_s=5.0, min_requests=100,
                max_no_data_intervals=3, detect_error_rate=None, detect_slow_share=None)
"""Small samples on purpose (these tests are about what is counted): min_requests is the whole evidence minimum."""


class Rig:
    def __init__(self, clock: FakeClock, models: tuple[str, ...] = (MODEL,)) -> None:
        """``models``: each a copy of ``digits`` (blue 1 at 100%, green 2 at 0%)."""
        self.clock = clock
        doc = routing_doc()
        doc["models"] = {name: doc["models"][MODEL] for name in models}
        self.store = MemoryStateStore.from_routing(RoutingFile.model_validate(doc))
        self.plane = DataPlane(GatewaySettings(), self.store)
        for name in models:
            for version in ("1", "2"):  # known up front, so a state change schedules no call to a backend
                self.plane.signatures[(name, version)] = DIGITS
        self.release = Release(self.store)
        self.controller = Controller(self.release, LocalMetrics(self.plane), clock=clock)

    def serve(self, color: Color, requests: int, errors: int = 0, model: str = MODEL) -> None:
        """What the data plane records for each attempt: the cumulative totals and the recent window."""
        rt = self.plane.runtime(model, color)
        for i in range(requests):
            rt.record(0.01, i >= errors)

    async def start(self, policy: Policy = POLICY, model: str = MODEL) -> None:
        """An operator's start, as the admin API applies it (at the clock's time, between two ticks)."""
        status, actions = canary.start(policy, "green", self.clock())
        await self.release.apply(self.store.get(model), status, actions, actor=ALICE, audit=True)

    def status(self, model: str = MODEL) -> Status:
        return self.store.get(model).canary

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


async def test_a_candidate_failing_only_at_the_100_percent_stage_is_rolled_back(rig: Rig) -> None:
    """Regression: the 100% stage's baseline was taken at its first analysis, so that single analysis
    saw no errors and promoted a candidate failing only at full load."""
    await rig.controller.tick()
    rig.clock.advance(0.25)
    await rig.start()
    while rig.status().phase == "progressing":
        rig.serve("green", 60)
        rig.serve("blue", 60)
        rig.clock.advance(POLICY.interval_s)
        await rig.controller.tick()
    assert rig.status().phase == "promoting"
    rig.serve("green", 200, errors=10)  # 5% once it carries everything
    rig.clock.advance(POLICY.interval_s)
    await rig.controller.tick()
    status = rig.status()
    assert status.phase == "rolled_back", status.last_decision
    assert (rig.evidence()["candidate"]["requests"], rig.evidence()["candidate"]["errors"]) == (200, 10)
    assert rig.store.get(MODEL).weights == {"blue": 100, "green": 0}


class Replica:
    """One gateway replica: its own data plane and state store on the shared Redis, publishing its counts."""

    def __init__(self, url: str, name: str) -> None:
        self.name = name
        self.store = RedisStateStore(url, RoutingFile.model_validate(routing_doc()), refresh_s=3600, replica=name)
        self.plane = DataPlane(GatewaySettings(), self.store)
        for version in ("1", "2"):
            self.plane.signatures[(MODEL, version)] = DIGITS
        self.publisher = MetricsPublisher(self.store, self.plane)

    async def __aenter__(self) -> Replica:
        await self.store.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.store.aclose()

    def serve(self, color: Color, requests: int, errors: int = 0) -> None:
        rt = self.plane.runtime(MODEL, color)
        for i in range(requests):
            rt.record(0.01, i >= errors)


async def test_replicas_that_restart_go_stale_or_appear_mid_stage_leave_the_stage_counts_exact(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Real Redis, real publishers and merged metrics, the real controller: a stage's candidate counts equal the
    candidate traffic served since the stage started, whatever the replicas do meanwhile."""
    proc, port = start_redis(tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    policy = Policy(stages=(Stage(20, 3600.0),), interval_s=3600.0)  # no analysis: the counts are the subject
    try:
        async with Replica(url, "a") as a, Replica(url, "b") as b, Replica(url, "c") as c:
            controller = Controller(Release(a.store), MergedMetrics(a.store, a.plane))
            for r, before in ((a, 1000), (b, 500), (c, 300)):  # traffic before the rollout: not its evidence
                r.serve("green", before, errors=before // 10)
                await r.publisher.publish()
            await controller.tick()
            await asyncio.sleep(0.01)
            status, actions = canary.start(policy, "green", time.time())
            await Release(a.store).apply(a.store.get(MODEL), status, actions, actor=ALICE, audit=True)
            await b.store.reload()
            await c.store.reload()
            true = 0
            for r, n in ((a, 200), (b, 300), (c, 100)):
                r.serve("green", n, errors=1)
                true += n
                await r.publisher.publish()
            await controller.tick()
            # b restarts under the same id (a pod's pid 1): a new incarnation counting from zero, its old row
            # overwritten in Redis; c goes stale and its row expires.
            async with Replica(url, "b") as b2, Replica(url, "d") as d:
                b2.serve("green", 150)
                d.serve("green", 80)  # a replica that appeared mid-stage
                true += 230
                for r in (b2, d):
                    await r.publisher.publish()
                await a.store.redis.hdel(f"bluegreen:metrics:{MODEL}:green", "c")
                a.serve("green", 70)
                true += 70
                await a.publisher.publish()
                # A malformed row (a replica from another release, a bad write) is no evidence, never a crash.
                await a.store.redis.hset(f"bluegreen:metrics:{MODEL}:green", "zz",
                                         f'{{"t": {time.time()}, "requests": -5}}'.encode())
                await controller.tick()
                tally = controller._tallies[MODEL]
                counted = tally.total("green")
                assert abs(counted.requests - true) <= 0.01 * true, (counted.requests, true)
                assert counted.errors == 3 and counted.timed == counted.requests
                assert "metrics row zz@0.0 of digits/green is impossible" in caplog.text
                # The naive sum of the merged counters (what the stage used to be measured with) is far off.
                naive = MergedMetrics(a.store, a.plane)
                await naive.refresh()
                assert abs(naive.counts(MODEL, "green", "2").requests - 1800 - true) > 0.1 * true
    finally:
        proc.stop()
