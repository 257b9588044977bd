"""The canary controller: a thin driver around the pure ``canary.step``.

Every ``tick_s`` the leader reads every model's cumulative counters (one :class:`Reading` per model) and, for a
model with an active rollout whose policy interval has passed, builds a :class:`~gateway.canary.Snapshot`, calls
``step`` and applies the result with one compare-and-set write of the model's state (weights, canary status,
candidate). The write names the revision the decision was based on, so a decision made on stale state — a
second controller, an operator's write in between — is dropped, never applied twice; one the release core
refuses (an advance while releases are frozen) is logged and dropped too: the rollout holds, its status (the
last decision included) unchanged, and the next interval decides again. Decisions other than "hold" are
audited with their evidence. A decision to leave a stage that has a confirm gate (or to move to 100%
past the promotion's) is applied only once the gate answers 2xx (``gateway/confirm.py``); otherwise it becomes
a hold, and the gate is asked again at the next interval.

Each round reads every model's counters at once, then analyses each due model in a task of its own, and does not
wait for them: a gate that takes its whole ``confirm_timeout_s`` to answer delays only its own model's decision,
never another model's (a rollback above all) nor the next rounds. A model whose analysis is still under way is
not analysed again until it ends (its readings are still recorded), so one decision is never made twice at once.

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

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from gateway import canary, confirm
from gateway.canary import ACTIVE, ColorSample, Snapshot, Status
from gateway.errors import Conflict, PreconditionFailed
from gateway.release import Release
from gateway.settings import COLORS, Color, other
from gateway.sources import Counts, MetricsSource
from gateway.state import ModelState
from gateway.windows import Snapshot as WindowSnapshot
from serving.lifecycle import Periodic

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reading:
    """One model's cumulative counts of both colors, per replica incarnation, as the controller read them."""

    time: float
    counts: dict[Color, dict[str, Counts]]


@dataclass(slots=True)
class Tally:
    """One stage's counts, kept per replica incarnation: where each started the stage and the last it reported."""

    key: tuple[float, int, float]
    """(rollout start, stage, stage start): a new key starts a new tally."""
    base_time: float
    base: dict[tuple[Color, str], Counts] = field(default_factory=dict)
    last: dict[tuple[Color, str], Counts] = field(default_factory=dict)
    analysed: int = 0
    """Candidate requests in the stage at the previous analysis (for "new requests since")."""

    @classmethod
    def starting_at(cls, key: tuple[float, int, float], base: Reading) -> Tally:
        """A tally whose baseline is ``base``: every incarnation in it starts the stage where it stood."""
        rows = {(color, inc): counts for color, by_inc in base.counts.items() for inc, counts in by_inc.items()}
        return cls(key, base.time, dict(rows), dict(rows))

    def observe(self, reading: Reading) -> None:
        for color, rows in reading.counts.items():
            for inc, counts in rows.items():
                k = (color, inc)
                if k not in self.base:
                    # New since the baseline: all of it is the stage's if it started after the baseline was
                    # read; else (a row that was missing, an older replica) from now on: late, never early.
                    started_after = counts.since > 0 and counts.since >= self.base_time
                    self.base[k] = Counts(since=counts.since) if started_after else counts
                self.last[k] = counts

    def total(self, color: Color) -> Counts:
        """The stage's counts of ``color``; feedback is the color's version's labels and outcomes (all of them, not
        since the stage: they judge the version, and they arrive late)."""
        total = Counts()
        labels = Counts()
        for (c, inc), counts in self.last.items():
            if c == color:
                total = total + (counts - self.base[(c, inc)])
                labels = labels + Counts(feedback=counts.feedback, correct=counts.correct, outcomes=counts.outcomes,
                                         outcome_sum=counts.outcome_sum, outcome_sq=counts.outcome_sq)
        return Counts(total.requests, total.errors, labels.feedback, labels.correct, total.timed, total.slow,
                      outcomes=labels.outcomes, outcome_sum=labels.outcome_sum, outcome_sq=labels.outcome_sq)


def _since(now: Reading, then: Reading, color: Color) -> Counts:
    """``color``'s counts between two readings, per incarnation (one absent from ``then`` counts only if it started
    after it)."""
    total = Counts()
    for inc, counts in now.counts.get(color, {}).items():
        before = then.counts.get(color, {}).get(inc)
        if before is not None:
            total = total + (counts - before)
        elif counts.since > 0 and counts.since >= then.time:
            total = total + counts
    return total


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
        self._tallies: dict[str, Tally] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        """Each model's analysis under way (it may be waiting for a confirm gate)."""
        self._http: httpx.AsyncClient | None = None
        """The confirm gates' client, built at the first ask and kept until :meth:`stop`."""
        self._loop = Periodic("canary-controller", tick_s, self._round, first_after_s=0.0)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        running = list(self._running.values())
        for task in running:  # a decision waiting for a gate is dropped: the next leader asks again
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _round(self) -> None:
        if self.is_leader():
            await self.tick(wait=False)

    async def tick(self, *, wait: bool = True) -> None:
        """Read every model's counters (idle ones too: a rollout an operator starts next is measured from the
        reading before its start) and analyse each model with an active rollout in a task of its own, except one
        whose previous analysis is still under way. One model's failure is logged and never stops the others'.
        ``wait``: return once the analyses started here end (the periodic loop does not wait, so a model waiting
        for its confirm gate holds up no other model nor the next rounds)."""
        await self.source.refresh()
        now = self.clock()
        started = []
        for name in list(self.store.models):
            try:
                state = self.store.get(name)
                reading = self._record(state, now)
            except Exception:
                log.exception("canary round for %s failed; its state is left as it was", name)
                continue
            if state.canary.phase not in ACTIVE or state.canary.candidate is None:
                self._tallies.pop(name, None)  # idle: read (above), nothing to analyse, no task
                continue
            if name not in self._running:
                task = asyncio.get_running_loop().create_task(self._guarded(name, state, reading),
                                                              name=f"canary-controller:{name}")
                self._running[name] = task
                started.append(task)
        if wait and started:
            await asyncio.wait(started)

    async def _guarded(self, name: str, state: ModelState, reading: Reading) -> None:
        try:
            await self._model(state, reading)
        except Exception:
            log.exception("canary round for %s failed; its state is left as it was", name)
        finally:
            self._running.pop(name, None)

    async def _model(self, state: ModelState, reading: Reading) -> None:
        name, now, status = state.name, reading.time, state.canary
        tally = self._tally(name, status)
        tally.observe(reading)
        # Without a reading from before the last analysis (a new leader), watch one interval first: judged
        # at once, the interval would look empty ("no candidate requests") though it was not.
        if now - max(status.last_analysis, tally.base_time) >= status.policy.interval_s * (1 - 1e-9):
            await self.analyse(state, status, reading, tally)

    def _tally(self, name: str, status: Status) -> Tally:
        key = (status.started_at, status.stage, status.stage_started)
        tally = self._tallies.get(name)
        if tally is None or tally.key != key:
            base = self._before(name, status.stage_started)
            tally = self._tallies[name] = Tally.starting_at(key, base)
            for reading in self._history[name]:  # whatever came between the baseline and now
                if reading.time > base.time:
                    tally.observe(reading)
        return tally

    def _record(self, state: ModelState, now: float) -> Reading:
        threshold = state.canary.policy.max_p95_ms
        reading = Reading(now, {c: self.source.rows(state.name, c, state.colors[c].version, threshold)
                                for c in COLORS})
        history = self._history.setdefault(state.name, deque())
        history.append(reading)
        # Keep the newest reading older than the horizon too: it is the one "before" a start at the horizon.
        while len(history) > 2 and history[1].time < now - self.history_s:
            history.popleft()
        return reading

    def _before(self, name: str, t: float) -> Reading:
        """The last reading taken before ``t`` (strictly: one taken at the same instant may already hold
        requests of the new stage); else the oldest one held, which starts the sample late, never early."""
        history = self._history[name]
        found = history[0]
        for reading in history:
            if reading.time >= t:
                break
            found = reading
        return found

    def snapshot(self, state: ModelState, status: Status, now: Reading, tally: Tally) -> Snapshot:
        """The step's input: the stage's counts (the tally), the candidate requests since the previous analysis,
        the stable color's counts over the recent window, p95 over the recent window (shown only)."""
        assert status.candidate is not None
        cand, stab = status.candidate, other(status.candidate)
        span = max(status.policy.interval_s, self.window_s)
        agreement, samples = self.source.shadow(state.name)

        def sample(color: Color, counts: Counts, breaker: bool) -> ColorSample:
            win: WindowSnapshot = self.source.window(state.name, color, span)
            p95 = win.quantile(0.95)
            return ColorSample(counts.requests, counts.errors, win.count, None if p95 is None else p95 * 1000,
                               breaker, counts.feedback, counts.correct, counts.timed, counts.slow,
                               outcomes=counts.outcomes, outcome_sum=counts.outcome_sum, outcome_sq=counts.outcome_sq)

        stage_c = tally.total(cand)
        recent = _since(now, self._before(state.name, now.time - self.window_s), stab)
        return Snapshot(sample(cand, stage_c, self.source.breaker_open(state.name, cand)),
                        sample(stab, tally.total(stab), False), max(0, stage_c.requests - tally.analysed),
                        agreement, samples,
                        ColorSample(recent.requests, recent.errors, 0, None, False, 0, 0, recent.timed, recent.slow))

    async def analyse(self, state: ModelState, status: Status, now: Reading, tally: Tally) -> None:
        snap = self.snapshot(state, status, now, tally)
        # The step's time is the reading's: a stage this decision starts begins exactly at this reading, and
        # the next analysis counts new requests from it.
        new, actions = canary.step(status.policy, status, snap, now.time)
        tally.analysed = snap.candidate.count
        if new == status:
            return
        for gate, url in confirm.gates(status.policy, status, new):  # none for a rollback: it never waits
            doc = confirm.body(state.name, gate, status, new)
            if self._http is None:
                self._http = confirm.client()
            refused = await confirm.ask(self._http, url, doc, status.policy.confirm_timeout_s)
            if refused is not None:
                new, actions = canary.held_at_gate(status, new, gate, refused), []
                break
        key = (new.started_at, new.stage, new.stage_started)
        if key != tally.key:  # a stage this decision starts is counted from this very reading
            self._tallies[state.name] = Tally.starting_at(key, now)
        try:
            await self.release.apply(state, new, actions, fenced=True)
        except PreconditionFailed:
            log.info("canary decision for %s dropped: the state changed meanwhile", state.name)
        except Conflict as exc:
            # The release core refused the decision (an advance while releases are frozen): the rollout holds
            # where it is, its status unchanged, and the next interval decides again.
            log.warning("canary decision for %s refused: %s", state.name, exc)
