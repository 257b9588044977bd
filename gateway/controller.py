"""The canary controller: a thin driver around the pure ``canary.step``.

Every ``tick_s`` the leader reads every model's cumulative counters (one :class:`Reading` per model) and, for a
model with an active rollout whose policy interval has passed, builds a :class:`~gateway.canary.Snapshot`, calls
``step`` and applies the result with one compare-and-set write of the model's state (weights, canary status,
candidate). The write names the revision the decision was based on, so a decision made on stale state — a
second controller, an operator's write in between — is dropped, never applied twice. Decisions other than
"hold" are audited with their evidence.

A stage's counts are the counters now minus the last reading taken *before the stage started*; the requests
"since the previous analysis" likewise start at the reading before ``last_analysis``. The controller keeps a
minute of readings, so a stage or rollout started by anyone (an operator on another replica included) is
measured from its start, and the first analysis sees all the candidate traffic since then. A controller that
holds no reading from before (a restarted one, a new leader) starts the sample at its first reading — which
can delay a decision but never hastens one — and watches one interval of its own before judging. Where the
counters come from is a :class:`MetricsSource` — this process's data plane, or (with Redis) every replica's,
merged.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway import canary
from gateway.canary import ACTIVE, ColorSample, Snapshot, Status
from gateway.errors import PreconditionFailed
from gateway.release import Release
from gateway.settings import COLORS, Color, other
from gateway.sources import Counts, MetricsSource
from gateway.state import ModelState
from gateway.windows import Snapshot as WindowSnapshot
from serving.lifecycle import Periodic

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reading:
    """One model's cumulative counts of both colors, as the controller read them at ``time``."""

    time: float
    counts: dict[Color, Counts]


class Controller:
    """The periodic driver: reads the numbers, calls ``canary.step`` and hands what it decides to the release
    core (``Release.apply``), which writes it; every rule about a decision lives in ``canary`` and ``release``."""

    def __init__(self, release: Release, source: MetricsSource, *, tick_s: float = 0.25,
                 clock: Callable[[], float] = time.time, is_leader: Callable[[], bool] = lambda: True,
                 window_s: float = 60.0, history_s: float = 60.0) -> None:
        self.release = release
        self.store = release.store
        self.source = source
        self.tick_s = tick_s
        self.clock = clock
        self.is_leader = is_leader
        self.window_s = window_s
        self.history_s = history_s
        """How long readings are kept: a stage start reaches this replica's copy of the state within a second
        (pub/sub, else the state refresh), so a minute leaves a wide margin to find the reading before it."""
        self._history: dict[str, deque[Reading]] = {}
        self._pinned: dict[str, dict[float, Reading]] = {}
        """Per model, the readings that the current stage start and the last analysis resolved to: kept
        for as long as they are the current ones (a stage may last hours, the history a minute)."""
        self._loop = Periodic("canary-controller", tick_s, self._round, first_after_s=0.0)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _round(self) -> None:
        if self.is_leader():
            await self.tick()

    async def tick(self) -> None:
        """Read every model's counters (idle ones too: a rollout an operator starts next is measured from the
        reading before its start) and analyse the rollouts that are due."""
        await self.source.refresh()
        now = self.clock()
        for name in list(self.store.models):
            state = self.store.get(name)
            status = state.canary
            reading = self._record(state, now)
            if status.phase not in ACTIVE or status.candidate is None:
                self._pinned.pop(name, None)
                continue
            stage_base = self._before(name, status.stage_started)
            last = self._before(name, status.last_analysis)
            self._pinned[name] = {status.stage_started: stage_base, status.last_analysis: last}
            # Without a reading from before the last analysis (a new leader), watch one interval first: judged
            # at once, the interval would look empty ("no candidate requests") though it was not.
            if now - max(status.last_analysis, last.time) >= status.policy.interval_s:
                await self.analyse(state, status, reading, stage_base, last)

    def _record(self, state: ModelState, now: float) -> Reading:
        reading = Reading(now, {c: self.source.counts(state.name, c, state.colors[c].version) for c in COLORS})
        history = self._history.setdefault(state.name, deque())
        history.append(reading)
        # Keep the newest reading older than the horizon too: it is the one "before" a start at the horizon.
        while len(history) > 2 and history[1].time < now - self.history_s:
            history.popleft()
        return reading

    def _before(self, name: str, t: float) -> Reading:
        """The last reading taken before ``t`` (strictly: one taken at the same instant may already hold
        requests of the new stage); else the oldest one held, which starts the sample late, never early."""
        pinned = self._pinned.get(name, {}).get(t)
        if pinned is not None:
            return pinned
        history = self._history[name]
        found = history[0]
        for reading in history:
            if reading.time >= t:
                break
            found = reading
        return found

    def snapshot(self, state: ModelState, status: Status, now: Reading, stage_base: Reading,
                 last: Reading) -> Snapshot:
        """The step's input: counts since ``stage_base`` (the reading before the stage started), new candidate
        requests since ``last`` (the reading before the previous analysis), p95 over the recent window."""
        assert status.candidate is not None
        cand, stab = status.candidate, other(status.candidate)
        # p95 over the recent window (BLUEGREEN_WINDOW_S), never shorter than an interval: at 5% of modest
        # traffic one interval alone may never hold min_requests, and the latency trigger would never fire.
        span = max(status.policy.interval_s, self.window_s)
        win_c = self.source.window(state.name, cand, span)
        win_s = self.source.window(state.name, stab, span)
        agreement, samples = self.source.shadow(state.name)

        def sample(color: Color, win: WindowSnapshot, breaker: bool) -> ColorSample:
            p95 = win.quantile(0.95)
            cur, base = now.counts[color], stage_base.counts[color]
            # max(0, ...): a replica that restarted took its counts with it; never a negative sample.
            return ColorSample(max(0, cur.requests - base.requests), max(0, cur.errors - base.errors), win.count,
                               None if p95 is None else p95 * 1000, breaker, cur.feedback, cur.correct)

        new = max(0, now.counts[cand].requests - last.counts[cand].requests)
        return Snapshot(sample(cand, win_c, self.source.breaker_open(state.name, cand)),
                        sample(stab, win_s, False), new, agreement, samples)

    async def analyse(self, state: ModelState, status: Status, now: Reading, stage_base: Reading,
                      last: Reading) -> None:
        snap = self.snapshot(state, status, now, stage_base, last)
        # The step's time is the reading's: a stage this decision starts begins exactly at this reading, and
        # the next analysis counts new requests from it.
        new, actions = canary.step(status.policy, status, snap, now.time)
        self._pinned.setdefault(state.name, {})[now.time] = now
        if new == status:
            return
        try:
            await self.release.apply(state, new, actions, fenced=True)
        except PreconditionFailed:
            log.info("canary decision for %s dropped: the state changed meanwhile", state.name)

