"""An hour of each model's numbers, one point every ``BLUEGREEN_HISTORY_INTERVAL_S`` (10 s): what the console's
charts draw and what ``GET /admin/v1/models/{m}/history`` returns to scripts.

Why points are sampled here and not computed by the page: a page opened during an incident must see the hour
before it was opened, and a script must read the same numbers the page drew. Each point holds, per color, the
p50/p95/p99, error rate, requests/s and request count over the recent window (``BLUEGREEN_WINDOW_S``, the span
``/stats`` and the canary controller read, so a chart's newest point and ``/stats`` agree), the online accuracy
from feedback, and per model the weights, the canary phase and stage and the shadow agreement.

The numbers come from the same :class:`~gateway.sources.MetricsSource` kind the controller reads —
:class:`~gateway.sources.LocalMetrics` in one process, :class:`~gateway.sources.MergedMetrics` with Redis — so
with replicas the history is already every replica's traffic, merged; each replica keeps its own copy of it
(the points are cheap: one small dict per model every 10 s). Sampling runs in a :class:`Periodic`, never on a
request: the data path pays nothing for it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from gateway.canary import Phase
from gateway.policy import Policy
from gateway.release import Release
from gateway.settings import COLORS
from gateway.sources import MetricsSource
from serving.lifecycle import Periodic

__all__ = ["SPAN_S", "History"]

SPAN_S = 3600.0
"""How far back the history reaches: an hour (what an on-call engineer scrolls back to during an incident)."""
_MAX_POINTS = 7200
"""Points kept per model at most, whatever the interval (a test's 0.5 s interval would otherwise keep 7,200)."""
_FRESH_S = 1.0
"""A ``now`` point refreshes a merged source at most this often (one Redis round trip per page poll, at most)."""


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class History:
    """Per model, a ring of points over the last hour; :meth:`sample` adds one for every model."""

    def __init__(self, release: Release, source: MetricsSource, *, interval_s: float = 10.0,
                 window_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.release = release
        self.source = source
        self.interval_s = interval_s
        self.window_s = window_s
        self.clock = clock
        self.maxlen = min(_MAX_POINTS, math.ceil(SPAN_S / interval_s))
        self._points: dict[str, deque[dict[str, Any]]] = {}
        self._refreshed = -math.inf
        self._loop = Periodic("history", interval_s, self.sample, first_after_s=0.0)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _refresh(self) -> None:
        now = self.clock()
        if now - self._refreshed >= _FRESH_S:
            await self.source.refresh()
            self._refreshed = now

    async def sample(self) -> None:
        """One point for every model, now."""
        await self._refresh()
        for name in list(self.release.store.models):
            ring = self._points.get(name)
            if ring is None:
                ring = self._points[name] = deque(maxlen=self.maxlen)
            ring.append(self.point(name))

    def point(self, model: str) -> dict[str, Any]:
        """The model's numbers at this moment, from the source as last refreshed."""
        state = self.release.get(model)
        doc: dict[str, Any] = {"t": round(self.clock(), 3), "weights": dict(state.weights),
                               "phase": state.canary.phase.value, "stage": state.canary.stage}
        for color in COLORS:
            win = self.source.window(model, color, self.window_s)
            counts = self.source.counts(model, color, state.colors[color].version)
            doc[color] = {"p50_ms": _ms(win.quantile(0.5)), "p95_ms": _ms(win.quantile(0.95)),
                          "p99_ms": _ms(win.quantile(0.99)), "error_rate": round(win.error_rate, 6),
                          "rps": round(win.rps, 2), "count": win.count, "errors": win.errors,
                          "version": state.colors[color].version,
                          "accuracy": round(counts.correct / counts.feedback, 6) if counts.feedback else None,
                          "feedback": counts.feedback}
        agreement, compared = self.source.shadow(model)
        doc["shadow"] = {"agreement": None if agreement is None else round(agreement, 6), "compared": compared}
        return doc

    def thresholds(self, model: str) -> dict[str, Any]:
        """What the charts draw as limits: the running (or last) rollout's policy, else the routing file's."""
        state = self.release.get(model)
        policy = state.canary.policy if state.canary.phase != Phase.IDLE else \
            self.release.policies.get(model, Policy())
        return {"max_p95_ms": policy.max_p95_ms, "max_error_rate": policy.max_error_rate,
                "min_requests": policy.min_requests, "max_accuracy_drop": policy.max_accuracy_drop,
                "min_shadow_agreement": policy.min_shadow_agreement}

    async def document(self, model: str, since: float | None = None) -> dict[str, Any]:
        """``GET /admin/v1/models/{m}/history``: the points after ``since`` (all of them without), a ``now``
        point computed at this moment (the page draws it as the newest one) and the thresholds."""
        self.release.get(model)  # NotFound for an unknown model
        await self._refresh()
        points = list(self._points.get(model, ()))
        if since is not None:
            points = [p for p in points if p["t"] > since]
        return {"model": model, "interval_s": self.interval_s, "span_s": SPAN_S, "window_s": self.window_s,
                "thresholds": self.thresholds(model), "points": points, "now": self.point(model)}
