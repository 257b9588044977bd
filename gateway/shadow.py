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
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.settings import Color, other
from gateway.state import ModelState
from gateway.upstream import ColorPool, Upstream

log = logging.getLogger(__name__)

_STRIDE = 37  # the same deterministic spread as the router: exact percentages, interleaved


def _outputs(body: bytes) -> dict[str, list[Any]] | None:
    try:
        doc = orjson.loads(body)
        return {o["name"]: o["data"] for o in doc["outputs"] if isinstance(o.get("data"), list)}
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


def compare(primary: bytes, shadow: bytes, tolerance: float) -> tuple[bool, float] | None:
    """(agree, max absolute difference over floating outputs) of two JSON V2 responses; None if incomparable."""
    a, b = _outputs(primary), _outputs(shadow)
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


class Shadow:
    def __init__(self, upstream: Upstream, pools: Mapping[tuple[str, Color], ColorPool], *,
                 max_in_flight: int = 32, timeout_s: float = 2.0, tolerance: float = 1e-4) -> None:
        self.upstream = upstream
        self.pools = pools
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.tolerance = tolerance
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._counters: dict[str, itertools.count[int]] = {}
        # model -> [compared, agreed, dropped, failed]; model -> largest absolute difference seen
        self.stats: dict[str, list[int]] = {}
        self.max_diff: dict[str, float] = {}

    def maybe_copy(self, state: ModelState, answered: Color, body: bytes, headers: Mapping[str, str],
                   answer: bytes) -> None:
        """Send a copy of this request to the other color if the model's shadow share selects it."""
        pct = state.shadow_percent
        if pct <= 0:
            return
        counter = self._counters.setdefault(state.name, itertools.count())
        if (next(counter) * _STRIDE) % 100 >= pct:
            return
        stats = self.stats.setdefault(state.name, [0, 0, 0, 0])
        target = other(answered)
        pool = self.pools[(state.name, target)]
        backends = [b for b in pool.backends if b.breaker.state != "open"]
        if self.in_flight >= self.max_in_flight or not backends:
            stats[2] += 1
            return
        backend = min(backends, key=lambda b: b.outstanding)
        url = f"{backend.url}/v2/models/{state.name}/versions/{state.colors[target].version}/infer"
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._send(state.name, url, body, dict(headers), answer))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, model: str, url: str, body: bytes, headers: dict[str, str], answer: bytes) -> None:
        stats = self.stats[model]
        try:
            resp = await self.upstream.post(url, body, headers, self.timeout_s)
            result = compare(answer, resp.body, self.tolerance) if resp.status == 200 else None
            if result is None:
                stats[3] += 1
                return
            agree, diff = result
            stats[0] += 1
            stats[1] += agree
            self.max_diff[model] = max(self.max_diff.get(model, 0.0), diff)
        except Exception as exc:  # a shadow failure is only counted
            stats[3] += 1
            log.debug("shadow copy failed: %s", exc)
        finally:
            self.in_flight -= 1

    def agreement(self, model: str) -> tuple[float | None, int]:
        compared, agreed, _, _ = self.stats.get(model, (0, 0, 0, 0))
        return (agreed / compared if compared else None), compared

    async def close(self) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.timeout_s)
