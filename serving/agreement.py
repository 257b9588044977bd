"""Whether two V2 answers to one request agree: the rule of the gateway's shadow comparison, and of the offline
comparison ``bluegreen bench shadow`` sets beside it (both compare the same way, so the two figures can be read
together). Here in ``serving``, the lowest layer, so that the load tests need nothing from ``gateway``.

Agreement: the same ``label`` output when both answers have one, else every floating output within
``tolerance`` (max absolute difference).
"""

from __future__ import annotations

from typing import Any

import orjson


def outputs(body: bytes) -> dict[str, list[Any]] | None:
    """A JSON V2 answer's outputs by name (those with a ``data`` list); None if the body is not such an answer."""
    try:
        doc = orjson.loads(body)
        return {o["name"]: o["data"] for o in doc["outputs"] if isinstance(o.get("data"), list)}
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def compare(primary: bytes, shadow: bytes, tolerance: float) -> tuple[bool, float] | None:
    """(agree, max absolute difference over floating outputs) of two JSON V2 responses; None if incomparable."""
    a, b = outputs(primary), outputs(shadow)
    if not a or not b:
        return None
    max_diff = 0.0
    floats_agree = True
    for name in a.keys() & b.keys():
        xa, xb = a[name], b[name]
        if len(xa) != len(xb):
            return False, float("inf")
        for u, v in zip(xa, xb, strict=True):
            if isinstance(u, float) or isinstance(v, float):
                d = abs(float(u) - float(v))
                max_diff = max(max_diff, d)
                floats_agree = floats_agree and d <= tolerance
    if "label" in a and "label" in b:
        return a["label"] == b["label"], max_diff
    return floats_agree, max_diff
