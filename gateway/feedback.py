"""Ground truth for earlier predictions, turned into online accuracy per model version.

The gateway remembers, bounded in number and time, which color and version answered each request id and
the response body; ``POST /feedback/v1/models/{m}`` with ``{"id": ..., "label": ...}`` (or a list) looks the
answer up, reads its predicted ``label`` output and counts it correct or not for that version. Bodies are
parsed only when feedback arrives, so remembering costs the hot path one dict insert.

Accuracy is kept per (model, version) rather than per color: a color re-pointed at another version starts
from zero instead of inheriting the old version's record.

With Redis (several replicas), each answer whose id the client chose (the V2 body's ``id`` or its own
``x-request-id``; not an id the gateway generated) is also written — version, color and predicted label, off the
request's critical path, bounded — under ``bluegreen:answer:{model}:{id}`` with the TTL, so feedback can land
on any replica. Each replica counts the labels it receives; the controller sums every replica's counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from gateway.errors import BadRequest

log = logging.getLogger(__name__)
ANSWER_PREFIX = "bluegreen:answer:"


# An answer remembered: (color, version, body, JSON length of a binary body, monotonic time, written to Redis).
# A plain tuple of atoms under a str key: the garbage collector stops tracking such tuples, so 50,000
# remembered answers do not lengthen every full collection (measured: they did, as dataclass instances
# under tuple keys).
Answered = tuple[str, str, bytes, int | None, float, bool]


def predicted_label(body: bytes, header_length: int | None) -> int | None:
    """The first element of a JSON ``label`` output (INT64), or None."""
    try:
        doc = orjson.loads(body[:header_length] if header_length is not None else body)
        for out in doc.get("outputs", ()):
            if out.get("name") == "label" and isinstance(out.get("data"), list) and out["data"]:
                value = out["data"][0]
                return int(value) if isinstance(value, int) else None
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None
    return None


class FeedbackStore:
    def __init__(self, max_entries: int = 50_000, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic, redis: Any = None,
                 max_pending_writes: int = 1000) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self.redis = redis
        self.max_pending_writes = max_pending_writes
        self._writes: set[asyncio.Task[Any]] = set()
        self._answers: OrderedDict[str, Answered] = OrderedDict()
        self.accuracy: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [labelled, correct]

    def remember(self, model: str, request_id: str, color: str, version: str, body: bytes,
                 header_length: int | None, share: bool = True) -> None:
        """Remember an answer in memory; with Redis and ``share``, also for feedback landing on other replicas."""
        key = f"{model}\0{request_id}"
        self._answers.pop(key, None)
        shared = share and self.redis is not None and len(self._writes) < self.max_pending_writes
        self._answers[key] = (color, version, body, header_length, self._clock(), shared)
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)
        if shared:
            doc = orjson.dumps({"v": version, "c": color, "l": predicted_label(body, header_length)})
            task = asyncio.get_running_loop().create_task(
                self.redis.set(f"{ANSWER_PREFIX}{model}:{request_id}", doc, px=int(self.ttl_s * 1000)))
            self._writes.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._writes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("remembering an answer in Redis failed: %s", task.exception())

    async def _claim(self, model: str, ids: list[str]) -> dict[str, tuple[str, int | None]] | None:
        """Take (GETDEL: atomically, so one label per answer across replicas) the answers with these ids from
        Redis: id -> (version, predicted label). None without Redis or when Redis fails (use local memory)."""
        if self.redis is None:
            return None
        if self._writes:  # this replica's own recent answers must be in Redis before we look
            await asyncio.wait(list(self._writes), timeout=1.0)
        try:
            pipe = self.redis.pipeline(transaction=False)
            for i in ids:
                pipe.getdel(f"{ANSWER_PREFIX}{model}:{i}")
            values = await pipe.execute()
        except Exception as exc:
            log.warning("feedback lookup in Redis failed, using this replica's memory: %s", exc)
            return None
        found = {}
        for i, raw in zip(ids, values, strict=True):
            if raw:
                doc = orjson.loads(raw)
                found[i] = (str(doc["v"]), doc.get("l"))
        return found

    async def record(self, model: str, items: Any) -> dict[str, int]:
        """Apply feedback items; return how many matched an answer, were unknown/expired, or had no label."""
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or not items or len(items) > 10_000:
            raise BadRequest('feedback must be {"id": ..., "label": <int>} or a non-empty list of them')
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) \
                    or isinstance(item.get("label"), bool) or not isinstance(item.get("label"), int):
                raise BadRequest(f'feedback[{i}] must be {{"id": "<request id>", "label": <int>}}')
        ids = list(dict.fromkeys(item["id"] for item in items))
        claimed = await self._claim(model, ids)
        known = claimed or {}
        now = self._clock()
        for rid in ids:
            # This replica's memory: every answer without Redis or when Redis failed; with Redis only answers
            # never written there (a shared one missing from Redis was labelled already, or expired).
            answered = self._answers.get(f"{model}\0{rid}")
            if rid in known or answered is None or now - answered[4] > self.ttl_s:
                continue
            _, version, body, length, _, shared = answered
            if claimed is None or not shared:
                known[rid] = (version, predicted_label(body, length))
        result = {"matched": 0, "unknown": 0, "unlabelled": 0}
        for item in items:
            rid = item["id"]
            found = known.pop(rid, None)  # one label per answer
            self._answers.pop(f"{model}\0{rid}", None)
            if found is None:
                result["unknown"] += 1
                continue
            version, predicted = found
            if predicted is None:
                result["unlabelled"] += 1
                continue
            counts = self.accuracy.setdefault((model, version), [0, 0])
            counts[0] += 1
            counts[1] += predicted == item["label"]
            result["matched"] += 1
        return result

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=1.0)

    def counts(self, model: str, version: str) -> tuple[int, int]:
        labelled, correct = self.accuracy.get((model, version), (0, 0))
        return labelled, correct
