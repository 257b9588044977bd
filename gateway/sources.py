"""Where the canary controller's numbers come from: a :class:`MetricsSource`.

Two sources, both reading the data plane's per-(model, color) :class:`~gateway.runtime.ColorRuntime` objects and
its feedback and shadow counts through their public reads:

* :class:`LocalMetrics` — this process's own numbers (the embedded, single-process deployment);
* with Redis, every replica runs a :class:`MetricsPublisher` that writes its numbers every second to
  ``bluegreen:metrics:{model}:{color}`` (a hash, one field per replica), and the leader's controller reads
  :class:`MergedMetrics`: every live replica's rows summed, rows older than ``stale_s`` dropped (a replica that
  stopped publishing no longer counts). Windows merge exactly because their histograms share fixed buckets.

Breakers are per replica: both sources judge "every breaker of the candidate open" by this process's own.

The canary needs counts *since a stage started*, and a sum of per-replica cumulative counters cannot give them
safely: a replica that restarts starts again from zero, one that goes stale leaves the sum, one that appears
mid-stage adds everything it ever served. So the sources also give the rows one by one (``rows``), each keyed
by the replica's *incarnation* (its id and the time its publisher started, so a restart under the same id — a
pod's pid 1 — is a new incarnation), and the controller keeps a baseline per incarnation (``controller.Tally``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson

from gateway.canary import ACTIVE
from gateway.dataplane import DataPlane
from gateway.settings import COLORS, Color
from gateway.state_redis import PREFIX, RedisStateStore
from gateway.windows import Snapshot
from serving.lifecycle import Periodic

log = logging.getLogger(__name__)

__all__ = ["Counts", "LocalMetrics", "MergedMetrics", "MetricsPublisher", "MetricsSource"]


@dataclass(frozen=True, slots=True)
class Counts:
    """Cumulative numbers of one color (and its version's feedback); ``timed``/``slow``: requests timed against a
    latency threshold since it was first watched, and how many were slower; ``since``: when the incarnation
    that counted them started (0: unknown)."""

    requests: int = 0
    errors: int = 0
    feedback: int = 0
    correct: int = 0
    timed: int = 0
    slow: int = 0
    since: float = 0.0
    outcomes: int = 0
    """Business outcomes of the version: how many, their sum and sum of squares (like labels, version totals)."""
    outcome_sum: float = 0.0
    outcome_sq: float = 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.requests + other.requests, self.errors + other.errors, self.feedback + other.feedback,
                      self.correct + other.correct, self.timed + other.timed, self.slow + other.slow,
                      outcomes=self.outcomes + other.outcomes, outcome_sum=self.outcome_sum + other.outcome_sum,
                      outcome_sq=self.outcome_sq + other.outcome_sq)

    def __sub__(self, other: Counts) -> Counts:
        """The counts since ``other`` (an earlier reading of the same incarnation), never negative."""
        return Counts(max(0, self.requests - other.requests), max(0, self.errors - other.errors),
                      max(0, self.feedback - other.feedback), max(0, self.correct - other.correct),
                      max(0, self.timed - other.timed), max(0, self.slow - other.slow), self.since)


def _plain(doc: dict[str, Any], threshold_ms: float, version: str) -> Counts | None:
    """A published row as Counts (None when it is malformed: one bad row never stops a round)."""
    try:
        timed, slow = (doc.get("over") or {}).get(repr(float(threshold_ms)), (0, 0))
        same = doc.get("version") == version
        counts = Counts(int(doc["requests"]), int(doc["errors"]), int(doc["feedback"]) if same else 0,
                        int(doc["correct"]) if same else 0, int(timed), int(slow), float(doc.get("since", 0.0)))
        if same and doc.get("outcomes"):  # absent in rows of replicas from before outcomes existed
            counts = replace(counts, outcomes=int(doc["outcomes"]), outcome_sum=float(doc["outcome_sum"]),
                             outcome_sq=float(doc["outcome_sq"]))
    except (KeyError, TypeError, ValueError):
        return None
    if counts.outcomes < 0 or counts.outcome_sq < 0 or not math.isfinite(counts.outcome_sum) \
            or not math.isfinite(counts.outcome_sq):
        return None
    if min(counts.requests, counts.errors, counts.feedback, counts.correct, counts.timed, counts.slow) < 0 \
            or counts.errors > counts.requests or counts.slow > counts.timed or counts.correct > counts.feedback:
        return None
    return counts


def _well_formed(doc: dict[str, Any]) -> bool:
    """A row the sums (``counts``, ``window``, ``shadow``) can read: plausible counts and a window of numbers."""
    if _plain(doc, 0.0, str(doc.get("version"))) is None:
        return False
    try:
        w, shadow = doc["window"], doc["shadow"]
        float(w["span"]), int(w["count"]), int(w["errors"]), int(shadow[0]), int(shadow[1])
        return all(isinstance(v, int) for v in w["buckets"].values())
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return False


class MetricsSource(Protocol):
    async def refresh(self) -> None: ...
    def counts(self, model: str, color: Color, version: str) -> Counts: ...
    def rows(self, model: str, color: Color, version: str, threshold_ms: float) -> dict[str, Counts]:
        """Each incarnation's cumulative counts (key: ``replica@since``), slow counts against ``threshold_ms``."""
        ...
    def window(self, model: str, color: Color, span_s: float) -> Snapshot: ...
    def breaker_open(self, model: str, color: Color) -> bool: ...
    def shadow(self, model: str) -> tuple[float | None, int]: ...


STARTED = time.time()
"""When this process started counting (its incarnation)."""


def _metrics_key(model: str, color: str) -> str:
    return f"{PREFIX}metrics:{model}:{color}"


class LocalMetrics:
    """The numbers of this process's data plane (the embedded, single-process deployment)."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def refresh(self) -> None:
        """Nothing to fetch: the numbers are this process's own."""

    def counts(self, model: str, color: Color, version: str) -> Counts:
        rt = self.plane.runtime(model, color)
        labelled, correct = self.plane.feedback.counts(model, version)
        n, total, squares = self.plane.feedback.outcome_counts(model, version)
        return Counts(rt.requests, rt.errors, labelled, correct, outcomes=n, outcome_sum=total, outcome_sq=squares)

    def rows(self, model: str, color: Color, version: str, threshold_ms: float) -> dict[str, Counts]:
        rt = self.plane.runtime(model, color)
        rt.window.watch(threshold_ms)
        timed, slow = rt.window.over(threshold_ms) or (0, 0)
        return {f"local@{STARTED}": replace(self.counts(model, color, version), timed=timed, slow=slow,
                                            since=STARTED)}

    def window(self, model: str, color: Color, span_s: float) -> Snapshot:
        return self.plane.runtime(model, color).snapshot(span_s)

    def breaker_open(self, model: str, color: Color) -> bool:
        return self.plane.runtime(model, color).breakers_open()

    def shadow(self, model: str) -> tuple[float | None, int]:
        return self.plane.shadow.agreement(model)


class MetricsPublisher:
    """Each replica publishes its cumulative counts and recent window per model and color, every second."""

    def __init__(self, store: RedisStateStore, plane: DataPlane, interval_s: float = 1.0,
                 window_s: float = 60.0) -> None:
        self.store = store
        self.plane = plane
        self.interval_s = interval_s
        self.window_s = window_s
        self.since = time.time()
        """This incarnation's start: with the replica id, what tells a restart from a counter going back."""
        self._loop = Periodic("metrics-publisher", interval_s, self.publish, first_after_s=0.0)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    def document(self, model: str, color: Color, now: float) -> dict[str, Any]:
        """What this replica publishes for one (model, color): counts since it started, the recent window, and
        the model's shadow counts (repeated under each color; :class:`MergedMetrics` reads blue's)."""
        rt = self.plane.runtime(model, color)
        win = rt.snapshot(self.window_s)
        version = self.store.get(model).colors[color].version
        labelled, correct = self.plane.feedback.counts(model, version)
        compared, agreed = self.plane.shadow.counts(model)
        outcomes, outcome_sum, outcome_sq = self.plane.feedback.outcome_counts(model, version)
        status = self.store.get(model).canary
        if status.phase in ACTIVE:  # count the rollout's latency threshold exactly from now on
            rt.window.watch(status.policy.max_p95_ms)
        return {"t": now, "since": self.since, "requests": rt.requests, "errors": rt.errors, "version": version,
                "feedback": labelled, "correct": correct, "shadow": [compared, agreed], "over": rt.window.watched(),
                "outcomes": outcomes, "outcome_sum": outcome_sum, "outcome_sq": outcome_sq,
                "window": {"span": win.span_s, "count": win.count, "errors": win.errors,
                           "buckets": {str(k): v for k, v in win.buckets.items()}}}

    async def publish(self) -> None:
        pipe = self.store.redis.pipeline(transaction=False)
        now = time.time()
        for rt in self.plane.runtimes():
            key = _metrics_key(rt.model, rt.color)
            pipe.hset(key, self.store.replica, orjson.dumps(self.document(rt.model, rt.color, now)))
            pipe.expire(key, 600)
        await pipe.execute()


class MergedMetrics:
    """The controller's view with Redis: every live replica's published numbers, summed (windows merge
    exactly: their histograms share fixed buckets). Reads are cached per tick by :meth:`refresh`."""

    def __init__(self, store: RedisStateStore, plane: DataPlane, stale_s: float = 10.0) -> None:
        self.store = store
        self.plane = plane
        self.stale_s = stale_s
        self._docs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._rejected: set[tuple[str, str, str]] = set()

    async def refresh(self) -> None:
        # One round trip for every model and color: the controller reads the counters every tick.
        keys = [(model, color) for model in self.store.models for color in COLORS]
        pipe = self.store.redis.pipeline(transaction=False)
        for model, color in keys:
            pipe.hgetall(_metrics_key(model, color))
        results = await pipe.execute()
        now = time.time()
        docs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        every: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for key, rows in zip(keys, results, strict=True):
            parsed: dict[str, dict[str, Any]] = {}
            for replica, value in rows.items():
                try:
                    doc = orjson.loads(value)
                    float(doc["t"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a malformed row is no evidence; it never stops the round
                if isinstance(doc, dict):
                    name = replica.decode() if isinstance(replica, bytes) else str(replica)
                    parsed[f"{name}@{doc.get('since', 0.0)}"] = doc
            every[key] = parsed
            docs[key] = [d for d in parsed.values() if now - float(d["t"]) <= self.stale_s and _well_formed(d)]
        self._docs = docs
        self._rows = every

    def rows(self, model: str, color: Color, version: str, threshold_ms: float) -> dict[str, Counts]:
        """Every incarnation's row still in Redis, stale ones included: a replica that stopped publishing keeps
        the counts it reached (the controller also remembers rows that expired)."""
        found: dict[str, Counts] = {}
        for key, doc in self._rows.get((model, color), {}).items():
            counts = _plain(doc, threshold_ms, version)
            if counts is not None:
                found[key] = counts
            elif (model, color, key) not in self._rejected:  # said once per row, not every tick
                self._rejected.add((model, color, key))
                log.warning("metrics row %s of %s/%s is impossible (negative counts, more errors than requests "
                            "or a missing field): not counted", key, model, color)
        return found

    def counts(self, model: str, color: Color, version: str) -> Counts:
        """Requests and errors of every replica; feedback only from rows of ``version`` (a replica that has not
        yet seen a re-pointed color still reports the old version's labels)."""
        rows = self._docs.get((model, color), [])
        same = [d for d in rows if d.get("version") == version]
        return Counts(sum(d["requests"] for d in rows), sum(d["errors"] for d in rows),
                      sum(d["feedback"] for d in same), sum(d["correct"] for d in same),
                      outcomes=sum(int(d.get("outcomes", 0)) for d in same),
                      outcome_sum=sum(float(d.get("outcome_sum", 0.0)) for d in same),
                      outcome_sq=sum(float(d.get("outcome_sq", 0.0)) for d in same))

    def window(self, model: str, color: Color, span_s: float) -> Snapshot:
        merged = Snapshot(span_s=0.0)
        for d in self._docs.get((model, color), []):
            w = d["window"]
            merged = merged.merge(Snapshot(w["span"], w["count"], w["errors"],
                                           {int(k): v for k, v in w["buckets"].items()}))
        return merged

    def breaker_open(self, model: str, color: Color) -> bool:
        # Breakers are per replica; the leader judges by its own, which see the same backends.
        return self.plane.runtime(model, color).breakers_open()

    def shadow(self, model: str) -> tuple[float | None, int]:
        # Shadow counts are per model; every replica repeats them under each color, so read one color's rows.
        rows = self._docs.get((model, "blue"), [])
        compared = sum(d["shadow"][0] for d in rows)
        agreed = sum(d["shadow"][1] for d in rows)
        return (agreed / compared if compared else None), compared
