"""Ground truth for earlier predictions, turned into online accuracy per model version.

The gateway remembers, bounded in number and time, which color and version answered each request id and
the response body; ``POST /feedback/v1/models/{m}`` with ``{"id": ..., "label": ...}`` (or a list) looks the
answer up, reads its predicted ``label`` output and counts it correct or not for that version. Bodies are
parsed only when feedback arrives, so remembering costs the hot path one dict insert.

Accuracy is kept per (model, version) rather than per color: a color re-pointed at another version starts
from zero instead of inheriting the old version's record.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import BadRequest


@dataclass(frozen=True, slots=True)
class Answered:
    color: str
    version: str
    body: bytes
    header_length: int | None
    at: float


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
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._answers: OrderedDict[tuple[str, str], Answered] = OrderedDict()
        self.accuracy: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [labelled, correct]

    def remember(self, model: str, request_id: str, color: str, version: str, body: bytes,
                 header_length: int | None) -> None:
        key = (model, request_id)
        self._answers.pop(key, None)
        self._answers[key] = Answered(color, version, body, header_length, self._clock())
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

    def record(self, model: str, items: Any) -> dict[str, int]:
        """Apply feedback items; return how many matched an answer, were unknown/expired, or had no label."""
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list) or not items or len(items) > 10_000:
            raise BadRequest('feedback must be {"id": ..., "label": <int>} or a non-empty list of them')
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("id"), str) \
                    or isinstance(item.get("label"), bool) or not isinstance(item.get("label"), int):
                raise BadRequest(f'feedback[{i}] must be {{"id": "<request id>", "label": <int>}}')
        now = self._clock()
        result = {"matched": 0, "unknown": 0, "unlabelled": 0}
        for item in items:
            answered = self._answers.get((model, item["id"]))
            if answered is None or now - answered.at > self.ttl_s:
                result["unknown"] += 1
                continue
            predicted = predicted_label(answered.body, answered.header_length)
            if predicted is None:
                result["unlabelled"] += 1
                continue
            counts = self.accuracy.setdefault((model, answered.version), [0, 0])
            counts[0] += 1
            counts[1] += predicted == item["label"]
            result["matched"] += 1
            del self._answers[(model, item["id"])]  # one label per answer
        return result

    def counts(self, model: str, version: str) -> tuple[int, int]:
        labelled, correct = self.accuracy.get((model, version), (0, 0))
        return labelled, correct
