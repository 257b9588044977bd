"""The canary controller: a thin driver around the pure ``canary.step``.

Every ``tick_s`` the leader looks at each model with an active rollout; when the policy's interval has
passed it builds a :class:`~gateway.canary.Snapshot` from the numbers of the current stage, calls ``step``
and applies the result with one compare-and-set write of the model's state (weights, canary status,
candidate). The write names the revision the decision was based on, so a decision made on stale state — a
second controller, an operator's write in between — is dropped, never applied twice. Decisions other than
"hold" are audited with their evidence.

Stage counts are the difference between cumulative counters now and at the start of the stage. The
baseline lives in memory: a restarted controller starts the stage's sample afresh, which can delay a
promotion but never hastens one. Where the counters come from is a :class:`MetricsSource` — this
process's data plane, or (with Redis) every replica's, merged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway import canary
from gateway.canary import ACTIVE, ColorSample, Snapshot, Status
from gateway.dataplane import DataPlane
from gateway.errors import PreconditionFailed
from gateway.settings import Color, other
from gateway.state import ModelState, StateStore
from gateway.windows import Snapshot as WindowSnapshot
from serving.lifecycle import Periodic

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Counts:
    """Cumulative numbers of one color (and its version's feedback)."""

    requests: int = 0
    errors: int = 0
    feedback: int = 0
    correct: int = 0


class MetricsSource(Protocol):
    async def refresh(self) -> None: ...
    def counts(self, model: str, color: Color, version: str) -> Counts: ...
    def window(self, model: str, color: Color, span_s: float) -> WindowSnapshot: ...
    def breaker_open(self, model: str, color: Color) -> bool: ...
    def shadow(self, model: str) -> tuple[float | None, int]: ...


class LocalMetrics:
    """The numbers of this process's data plane (the embedded, single-process deployment)."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def refresh(self) -> None:
        """Nothing to fetch: the numbers are this process's own."""

    def counts(self, model: str, color: Color, version: str) -> Counts:
        requests, errors = self.plane.totals[(model, color)]
        labelled, correct = self.plane.feedback.counts(model, version)
        return Counts(requests, errors, labelled, correct)

    def window(self, model: str, color: Color, span_s: float) -> WindowSnapshot:
        return self.plane.windows[(model, color)].snapshot(span_s)

    def breaker_open(self, model: str, color: Color) -> bool:
        return all(b.breaker.state == "open" for b in self.plane.pools[(model, color)].backends)

    def shadow(self, model: str) -> tuple[float | None, int]:
        return self.plane.shadow.agreement(model)


class Controller:
    def __init__(self, store: StateStore, source: MetricsSource, *, tick_s: float = 0.25,
                 clock: Callable[[], float] = time.time, is_leader: Callable[[], bool] = lambda: True,
                 window_s: float = 60.0) -> None:
        self.store = store
        self.source = source
        self.tick_s = tick_s
        self.clock = clock
        self.is_leader = is_leader
        self.window_s = window_s
        self._baselines: dict[tuple[str, int, float], tuple[Counts, Counts]] = {}
        self._last_seen: dict[tuple[str, float], int] = {}
        self._loop = Periodic("canary-controller", tick_s, self._round, first_after_s=0.0)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _round(self) -> None:
        if self.is_leader():
            await self.tick()

    async def tick(self) -> None:
        refreshed = False
        for name in list(self.store.models):
            state = self.store.get(name)
            status = Status.from_json(state.canary)
            if status.phase in ACTIVE and self.clock() - status.last_analysis >= status.policy.interval_s:
                if not refreshed:
                    await self.source.refresh()
                    refreshed = True
                await self.analyse(state, status)

    def snapshot(self, state: ModelState, status: Status) -> Snapshot:
        assert status.candidate is not None
        cand, stab = status.candidate, other(status.candidate)
        now_c = self.source.counts(state.name, cand, state.colors[cand].version)
        now_s = self.source.counts(state.name, stab, state.colors[stab].version)
        key = (state.name, status.stage, status.stage_started)
        base_c, base_s = self._baselines.setdefault(key, (now_c, now_s))
        run = (state.name, status.started_at)
        last = self._last_seen.get(run, now_c.requests)
        self._last_seen[run] = now_c.requests
        # p95 over the recent window (BLUEGREEN_WINDOW_S), never shorter than an interval: at 5% of modest
        # traffic one interval alone may never hold min_requests, and the latency trigger would never fire.
        span = max(status.policy.interval_s, self.window_s)
        win_c = self.source.window(state.name, cand, span)
        win_s = self.source.window(state.name, stab, span)
        agreement, samples = self.source.shadow(state.name)

        def sample(now: Counts, base: Counts, win: WindowSnapshot, breaker: bool) -> ColorSample:
            p95 = win.quantile(0.95)
            return ColorSample(max(0, now.requests - base.requests), max(0, now.errors - base.errors), win.count,
                               None if p95 is None else p95 * 1000, breaker, now.feedback, now.correct)

        return Snapshot(sample(now_c, base_c, win_c, self.source.breaker_open(state.name, cand)),
                        sample(now_s, base_s, win_s, False),
                        max(0, now_c.requests - last), agreement, samples)

    async def analyse(self, state: ModelState, status: Status) -> None:
        snap = self.snapshot(state, status)
        new, actions = canary.step(status.policy, status, snap, self.clock())
        if new == status:
            return
        try:
            await apply(self.store, state, new, actions, who="controller", fenced=True)
        except PreconditionFailed:
            log.info("canary decision for %s dropped: the state changed meanwhile", state.name)


async def apply(store: StateStore, state: ModelState, status: Status, actions: list[canary.Action], *,
                who: str, reason: str | None = None, force_audit: bool = False,
                action: str | None = None, fenced: bool = False) -> ModelState:
    """Write a canary decision: the status, the weights and candidate it implies, in one compare-and-set."""
    def change(s: ModelState) -> ModelState:
        weights = dict(s.weights)
        candidate = s.candidate_override
        for action in actions:
            if isinstance(action, canary.SetWeight):
                weights = {action.candidate: action.weight, other(action.candidate): 100 - action.weight}
                candidate = action.candidate
            elif isinstance(action, canary.Promoted):
                candidate = action.next_candidate
        return dataclasses.replace(s, weights=weights, candidate_override=candidate, canary=status.as_json())

    decision = status.last_decision
    kind = decision.result if decision else "update"
    audited = force_audit or kind != "hold"
    return await store.update(state.name, state.revision, change, who=who, action=action or f"canary_{kind}",
                              reason=reason or (decision.reason if decision else None),
                              evidence=decision.evidence if decision and audited else None, audit=audited,
                              fenced=fenced)
