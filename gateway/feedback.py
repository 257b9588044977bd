"""Ground truth and business outcomes for earlier predictions, per model version.

The gateway remembers, bounded in number and time, which color and version answered each request id and
the response body; ``POST /feedback/v1/models/{m}`` with ``{"id": ..., "label": ...}`` (or a list) looks the
answer up, reads its predicted ``label`` output and counts it correct or not for that version. Bodies are
parsed only when feedback arrives, so remembering costs the hot path one dict insert.

An item may also (or instead) carry an ``outcome``: what the answer led to, a conversion (0/1) or any finite
number (revenue). Outcomes are kept per version as count, sum and sum of squares — enough for a mean and a
variance, and sums add up across replicas — for the canary's business-metric trigger. Each answer takes one
label and one outcome, each at most once, in one body or two (a conversion is known later than a label).

Accuracy is kept per (model, version) rather than per color: a color re-pointed at another version starts
from zero instead of inheriting the old version's record.

With Redis (several replicas), each answer whose id the client chose (the V2 body's ``id`` or its own
``x-request-id``; not an id the gateway generated) is also written — version, color and predicted label, off the
request's critical path, bounded — under ``bluegreen:answer:{model}:{id}`` with the TTL, so feedback can land
on any replica. A label or outcome claims the answer for its kind with a marker key set only if absent (one Lua
call per body: the answer must exist and the marker be new), so the same feedback sent to two replicas counts
once. Each replica counts what it receives; the controller sums every replica's counts.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from gateway.errors import BadRequest
from serving.lifecycle import Background

log = logging.getLogger(__name__)
ANSWER_PREFIX = "bluegreen:answer:"
CLAIM_PREFIX = "bluegreen:answer-claimed:"
MAX_OUTCOME = 1e12
"""The largest outcome magnitude accepted: beyond any revenue figure, and small enough that sums of squares of
millions of them stay exact enough for a variance."""
KINDS = {"label": "l", "outcome": "o"}
"""Feedback kinds and the letter that marks, in a remembered answer, that the kind was given."""
FORMAT = '{"id": "<request id>", "label": <int>, "outcome": <finite number>} with a label, an outcome or both'

# Claims every answer of a body for one kind: returns each answer, or false where it is unknown (expired) or
# its marker exists (that kind was given already); an answer that has had both kinds is deleted (the markers
# expire with the TTL). KEYS: per answer its key, this kind's marker, the other kind's; ARGV[1]: marker TTL ms.
_CLAIM = """
local found = {}
for i = 1, #KEYS, 3 do
  local answer = redis.call('GET', KEYS[i])
  if answer and redis.call('SET', KEYS[i + 1], '1', 'NX', 'PX', ARGV[1]) then
    found[#found + 1] = answer
    if redis.call('EXISTS', KEYS[i + 2]) == 1 then
      redis.call('DEL', KEYS[i])
    end
  else
    found[#found + 1] = false
  end
end
return found
"""


# An answer remembered: (color, version, body, JSON length of a binary body, monotonic time, written to Redis,
# the letters of the feedback kinds given already).
# A plain tuple of atoms under a str key: the garbage collector stops tracking such tuples, so 50,000
# remembered answers do not lengthen every full collection (measured: they did, as dataclass instances
# under tuple keys).
Answered = tuple[str, str, bytes, int | None, float, bool, str]


def _malformed(item: Any) -> bool:
    """Not an id with a label (a whole number), an outcome (a finite number, not a boolean, within
    ``MAX_OUTCOME``) or both."""
    if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not ("label" in item or "outcome" in item):
        return True
    label, outcome = item.get("label", 0), item.get("outcome", 0)
    if isinstance(label, bool) or not isinstance(label, int):
        return True
    return isinstance(outcome, bool) or not isinstance(outcome, int | float) or not math.isfinite(outcome) \
        or abs(outcome) > MAX_OUTCOME


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
        self._writes = Background("remembering an answer in Redis failed", logging.DEBUG, log)
        self._answers: OrderedDict[str, Answered] = OrderedDict()
        self.accuracy: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [labelled, correct]
        self.outcomes: dict[tuple[str, str], tuple[int, float, float]] = {}  # (model, version) -> (n, sum, squares)

    def remember(self, model: str, request_id: str, color: str, version: str, body: bytes,
                 header_length: int | None, share: bool = True) -> None:
        """Remember an answer in memory; with Redis and ``share``, also for feedback landing on other replicas."""
        key = f"{model}\0{request_id}"
        self._answers.pop(key, None)
        shared = share and self.redis is not None and len(self._writes) < self.max_pending_writes
        self._answers[key] = (color, version, body, header_length, self._clock(), shared, "")
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)
        if shared:
            doc = orjson.dumps({"v": version, "c": color, "l": predicted_label(body, header_length)})
            self._writes.spawn(self.redis.set(f"{ANSWER_PREFIX}{model}:{request_id}", doc,
                                              px=int(self.ttl_s * 1000)))

    async def _claim(self, model: str, kind: str, ids: list[str]) -> dict[str, tuple[str, int | None]] | None:
        """Claim the answers with these ids in Redis for one feedback kind (atomically: one label and one outcome
        per answer across replicas): id -> (version, predicted label). None without Redis or when Redis fails
        (use local memory)."""
        if self.redis is None:
            return None
        await self._writes.wait(1.0)  # this replica's own recent answers must be in Redis before we look
        other = next(k for k in KINDS if k != kind)
        keys = []
        for i in ids:
            keys += [f"{ANSWER_PREFIX}{model}:{i}", f"{CLAIM_PREFIX}{kind}:{model}:{i}",
                     f"{CLAIM_PREFIX}{other}:{model}:{i}"]
        try:
            values = await self.redis.eval(_CLAIM, len(keys), *keys, int(self.ttl_s * 1000))
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
        """Apply feedback items; return how many labels matched an answer, had no predicted label to compare
        (``unlabelled``), how many outcomes were counted (``outcomes``, only when the body carried any), and how
        many labels and outcomes found no answer (``unknown``: an unknown or expired id, or one that already
        received that kind). A malformed body is refused whole, before anything is counted."""
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or not items or len(items) > 10_000:
            raise BadRequest(f"feedback must be {FORMAT}, or a non-empty list of them")
        for i, item in enumerate(items):
            if _malformed(item):
                raise BadRequest(f"feedback[{i}] must be {FORMAT}")
        result = {"matched": 0, "unknown": 0, "unlabelled": 0}
        if any("outcome" in item for item in items):
            result["outcomes"] = 0
        for kind in KINDS:
            batch = [item for item in items if kind in item]
            if batch:
                await self._apply(model, kind, batch, result)
        return result

    async def _apply(self, model: str, kind: str, items: list[dict[str, Any]], result: dict[str, int]) -> None:
        ids = list(dict.fromkeys(item["id"] for item in items))
        claimed = await self._claim(model, kind, ids)
        known = claimed or {}
        now = self._clock()
        flag = KINDS[kind]
        for rid in ids:
            # This replica's memory: every answer without Redis or when Redis failed; with Redis only answers
            # never written there (a shared one missing from Redis was given this kind already, or expired).
            answered = self._answers.get(f"{model}\0{rid}")
            if rid in known or answered is None or now - answered[4] > self.ttl_s or flag in answered[6]:
                continue
            _, version, body, length, _, shared, _ = answered
            if claimed is None or not shared:
                known[rid] = (version, predicted_label(body, length) if kind == "label" else None)
        for item in items:
            rid = item["id"]
            found = known.pop(rid, None)  # one of each kind per answer
            self._given(f"{model}\0{rid}", flag)
            if found is None:
                result["unknown"] += 1
                continue
            version, predicted = found
            if kind == "outcome":
                value = float(item["outcome"])
                n, total, squares = self.outcomes.get((model, version), (0, 0.0, 0.0))
                self.outcomes[(model, version)] = (n + 1, total + value, squares + value * value)
                result["outcomes"] += 1
                continue
            if predicted is None:
                result["unlabelled"] += 1
                continue
            counts = self.accuracy.setdefault((model, version), [0, 0])
            counts[0] += 1
            counts[1] += predicted == item["label"]
            result["matched"] += 1

    def _given(self, key: str, flag: str) -> None:
        """Mark a kind given on the remembered answer (also when it was claimed in Redis: should Redis fail later,
        memory must not count it again); forgotten once every kind is in."""
        answered = self._answers.get(key)
        if answered is None or flag in answered[6]:
            return
        given = answered[6] + flag
        if len(given) == len(KINDS):
            del self._answers[key]
        else:
            self._answers[key] = (*answered[:6], given)

    async def close(self) -> None:
        await self._writes.wait(1.0)

    def counts(self, model: str, version: str) -> tuple[int, int]:
        labelled, correct = self.accuracy.get((model, version), (0, 0))
        return labelled, correct

    def outcome_counts(self, model: str, version: str) -> tuple[int, float, float]:
        """(outcomes, their sum, their sum of squares) of a version on this replica."""
        return self.outcomes.get((model, version), (0, 0.0, 0.0))
