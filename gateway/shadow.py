"""Shadow traffic: copies of a model's requests sent to the color that was not chosen, for comparison.

A copy goes out after the client's answer is ready, in its own task: it never delays or fails the client's
request. Copies are dropped, never queued, when ``max_in_flight`` of them are already out or when the other
color's breakers are all open. Shadow calls take no breaker permit and enter no color's window: they are
evidence for operators, not traffic. Agreement per model: the same ``label`` output when the model has one,
else every floating output within ``tolerance`` (max absolute difference).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.runtime import ColorRuntime
from gateway.settings import Color, other
from gateway.state import ModelState
from gateway.upstream import Upstream
from serving.agreement import compare

log = logging.getLogger(__name__)

_STRIDE = 37  # the same deterministic spread as the router: exact percentages, interleaved

__all__ = ["Shadow", "ShadowCounts", "compare"]  # compare: the agreement rule, shared with the bench (serving)


@dataclass(slots=True)
class ShadowCounts:
    """One model's shadow copies: compared (both answered comparably), agreed among those, dropped (never sent:
    too many out, or the other color's breakers all open) and failed (sent, but no comparable answer)."""

    compared: int = 0
    agreed: int = 0
    dropped: int = 0
    failed: int = 0
    max_diff: float = 0.0  # the largest absolute difference between floating outputs seen


class Shadow:
    def __init__(self, upstream: Upstream, runtime: Callable[[str, Color], ColorRuntime], *,
                 max_in_flight: int = 32, timeout_s: float = 2.0, tolerance: float = 1e-4) -> None:
        self.upstream = upstream
        self._runtime = runtime  # the data plane's: the other color's backends and breakers
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.tolerance = tolerance
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._counters: dict[str, itertools.count[int]] = {}
        self._stats: dict[str, ShadowCounts] = {}

    def maybe_copy(self, state: ModelState, answered: Color, body: bytes, headers: Mapping[str, str],
                   answer: bytes) -> None:
        """Send a copy of this request to the other color if the model's shadow share selects it."""
        pct = state.shadow_percent
        if pct <= 0:
            return
        counter = self._counters.setdefault(state.name, itertools.count())
        if (next(counter) * _STRIDE) % 100 >= pct:
            return
        stats = self._stats.get(state.name)
        if stats is None:
            stats = self._stats[state.name] = ShadowCounts()
        target = other(answered)
        backends = [b for b in self._runtime(state.name, target).backends if b.breaker.state != "open"]
        if self.in_flight >= self.max_in_flight or not backends:
            stats.dropped += 1
            return
        backend = min(backends, key=lambda b: b.outstanding)
        url = f"{backend.url}/v2/models/{state.name}/versions/{state.colors[target].version}/infer"
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(state.name, url, body, dict(headers), answer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, model: str, url: str, body: bytes, headers: dict[str, str], answer: bytes) -> None:
        stats = self._stats[model]
        try:
            resp = await self.upstream.post(url, body, headers, self.timeout_s)
            result = compare(answer, resp.body, self.tolerance) if resp.status == 200 else None
            if result is None:
                stats.failed += 1
                return
            agree, diff = result
            stats.compared += 1
            stats.agreed += agree
            stats.max_diff = max(stats.max_diff, diff)
        except Exception as exc:  # a shadow failure is only counted
            stats.failed += 1
            log.debug("shadow copy failed: %s", exc)
        finally:
            self.in_flight -= 1

    def stats(self, model: str) -> ShadowCounts:
        """A copy of the model's shadow counts (zeros before its first copy)."""
        found = self._stats.get(model)
        return ShadowCounts() if found is None else ShadowCounts(found.compared, found.agreed, found.dropped,
                                                                   found.failed, found.max_diff)

    def counts(self, model: str) -> tuple[int, int]:
        """(compared, agreed) since this process started: what replicas publish and the controller sums."""
        found = self._stats.get(model)
        return (0, 0) if found is None else (found.compared, found.agreed)

    def agreement(self, model: str) -> tuple[float | None, int]:
        """(share of compared copies that agreed, or None before any; how many were compared)."""
        compared, agreed = self.counts(model)
        return (agreed / compared if compared else None), compared

    async def close(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.timeout_s)
