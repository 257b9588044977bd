"""Sliding windows of request counts, errors and latency, per model and color.

A window is a ring of time slots (``slot_s`` wide, ``span_s`` in all). Each slot holds a count, an error count
and a latency histogram with fixed log-scale buckets (growth 2% per bucket, so a quantile read from the bucket's
geometric midpoint is within 1% of the true value). Fixed buckets make windows **mergeable exactly**: the
snapshot of several processes is the bucket-wise sum, which is how replicas combine their views.

The canary's latency trigger is a proportion ("more than 5% of requests slower than ``max_p95_ms``"), judged over
a whole stage, so it needs the exact count above the policy's threshold, which a 2% bucket cannot resolve. A
window therefore also counts, cumulatively, the requests slower than each *watched* threshold (``watch``; the
release plan's 120 ms from the start): one comparison per watched threshold per request, and the count is exact.
A threshold watched later counts from then on, with its own count of requests timed since (``over``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

GROWTH = 1.02
MIN_LATENCY_S = 1e-5
_LOG_GROWTH = math.log(GROWTH)


def bucket_of(latency_s: float) -> int:
    if latency_s <= MIN_LATENCY_S:
        return 0
    return math.ceil(math.log(latency_s / MIN_LATENCY_S) / _LOG_GROWTH)


def bucket_value(index: int) -> float:
    """The geometric midpoint of a bucket: the value reported for every latency in it."""
    if index <= 0:
        return MIN_LATENCY_S
    return float(MIN_LATENCY_S * GROWTH ** (index - 0.5))


@dataclass(slots=True)
class Snapshot:
    """Counts over a span of time; ``merge`` adds another snapshot (another process, another span)."""

    span_s: float
    count: int = 0
    errors: int = 0
    buckets: dict[int, int] = field(default_factory=dict)

    def merge(self, other: Snapshot) -> Snapshot:
        buckets = dict(self.buckets)
        for k, v in other.buckets.items():
            buckets[k] = buckets.get(k, 0) + v
        return Snapshot(max(self.span_s, other.span_s), self.count + other.count, self.errors + other.errors, buckets)

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    @property
    def rps(self) -> float:
        return self.count / self.span_s if self.span_s > 0 else 0.0

    def quantile(self, q: float) -> float | None:
        """The q-quantile of latency in seconds (None without data)."""
        total = sum(self.buckets.values())
        if total == 0:
            return None
        rank = max(1, math.ceil(q * total))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return bucket_value(index)
        return bucket_value(max(self.buckets))  # pragma: no cover - unreachable

    def as_json(self) -> dict[str, float | int | None]:
        def ms(q: float) -> float | None:
            v = self.quantile(q)
            return None if v is None else round(v * 1000, 3)

        return {"count": self.count, "errors": self.errors, "error_rate": round(self.error_rate, 6),
                "p50_ms": ms(0.5), "p95_ms": ms(0.95), "p99_ms": ms(0.99), "rps": round(self.rps, 2),
                "window_s": self.span_s}


@dataclass(slots=True)
class _Slot:
    start: float = -1.0
    count: int = 0
    errors: int = 0
    buckets: dict[int, int] = field(default_factory=dict)


DEFAULT_THRESHOLD_MS = 120.0
"""The release plan's ``max_p95_ms``: watched from the start."""
MAX_WATCHED = 8


class Window:
    def __init__(self, span_s: float = 60.0, slot_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if slot_s <= 0 or span_s < slot_s:
            raise ValueError("need 0 < slot_s <= span_s")
        self.recorded = 0
        """Every request recorded since the window was made (cumulative, never reset)."""
        self._over: dict[float, list[float]] = {}
        """threshold in ms -> [threshold in s, ``recorded`` when it was first watched, requests slower since]."""
        self.watch(DEFAULT_THRESHOLD_MS)
        self.slot_s = slot_s
        self.n_slots = math.ceil(span_s / slot_s)
        self.span_s = self.n_slots * slot_s
        self._slots = [_Slot() for _ in range(self.n_slots)]
        self._clock = clock

    def _slot(self, now: float) -> _Slot:
        start = now - (now % self.slot_s)
        slot = self._slots[int(start // self.slot_s) % self.n_slots]
        if slot.start != start:
            slot.start = start
            slot.count = slot.errors = 0
            slot.buckets = {}
        return slot

    def record(self, latency_s: float, ok: bool) -> None:
        slot = self._slot(self._clock())
        slot.count += 1
        if not ok:
            slot.errors += 1
        b = bucket_of(latency_s)
        slot.buckets[b] = slot.buckets.get(b, 0) + 1
        self.recorded += 1
        for watched in self._over.values():
            if latency_s > watched[0]:
                watched[2] += 1

    def watch(self, threshold_ms: float) -> None:
        """Count the requests slower than ``threshold_ms`` from now on (a no-op when already watched). At most
        ``MAX_WATCHED`` thresholds: the oldest other than the default is dropped for a new one."""
        if threshold_ms in self._over or not math.isfinite(threshold_ms) or threshold_ms < 0:
            return
        if len(self._over) >= MAX_WATCHED:
            oldest = next(t for t in self._over if t != DEFAULT_THRESHOLD_MS)
            del self._over[oldest]
        self._over[threshold_ms] = [threshold_ms / 1000, self.recorded, 0]

    def over(self, threshold_ms: float) -> tuple[int, int] | None:
        """(requests timed, how many slower than ``threshold_ms``) since it was first watched; None if it is not."""
        watched = self._over.get(threshold_ms)
        if watched is None:
            return None
        return self.recorded - int(watched[1]), int(watched[2])

    def watched(self) -> dict[str, list[int]]:
        """Every watched threshold (ms, as text) -> [timed, slower]: what a replica publishes."""
        return {repr(t): [self.recorded - int(w[1]), int(w[2])] for t, w in self._over.items()}

    def snapshot(self, span_s: float | None = None) -> Snapshot:
        """Everything recorded in the last ``span_s`` seconds (default: the whole window), slot-aligned."""
        now = self._clock()
        span = min(span_s or self.span_s, self.span_s)
        oldest = now - (now % self.slot_s) - (math.ceil(span / self.slot_s) - 1) * self.slot_s
        snap = Snapshot(span_s=span)
        for slot in self._slots:
            if slot.start >= oldest and slot.start >= 0 and slot.count:
                snap.count += slot.count
                snap.errors += slot.errors
                for k, v in slot.buckets.items():
                    snap.buckets[k] = snap.buckets.get(k, 0) + v
        return snap


def merge_all(snapshots: Iterable[Snapshot]) -> Snapshot:
    result = Snapshot(span_s=0.0)
    for s in snapshots:
        result = result.merge(s)
    return result
