"""Which color serves a request: weights, sticky buckets, forced colors, versioned paths.

Sticky keys (``x-bluegreen-key``): bucket = first 8 bytes of ``blake2b(key)`` as a big-endian integer modulo
10,000; the candidate color owns buckets ``[0, weight × 100)``. The mapping depends on nothing but the key, so
it is the same in every process and release, and raising the candidate's weight only moves keys *to* it.

Requests without a key follow a deterministic spread rather than a coin flip: request n of a model goes to the
candidate when ``(n × 37) mod 100 < weight``. 37 is coprime to 100, so every 100 consecutive requests split
exactly by weight, interleaved — the observed split of a process is exact to 1% at any sample size,
where random choice would wander by ±2% over 2,000 requests.
"""

from __future__ import annotations

import hashlib
import itertools

from gateway.errors import BadRequest, NotFound
from gateway.settings import COLORS, Color
from gateway.state import ModelState

BUCKETS = 10_000
_STRIDE = 37


def bucket(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key).digest()[:8], "big") % BUCKETS


class Router:
    def __init__(self, allow_color_override: bool) -> None:
        self.allow_color_override = allow_color_override
        self._counters: dict[str, itertools.count[int]] = {}

    def choose(self, state: ModelState, *, key: bytes | None = None, forced: str | None = None,
               version: str | None = None) -> Color:
        if version is not None:
            color = state.color_of_version(version)
            if color is None:
                served = ", ".join(f"{c}={state.colors[c].version}" for c in COLORS)
                raise NotFound(f"no color of model {state.name!r} serves version {version!r} ({served})")
            return color
        if forced is not None:
            if not self.allow_color_override:
                raise BadRequest("x-bluegreen-color is not allowed by this gateway's settings")
            for color in COLORS:
                if forced == color:
                    return color
            raise BadRequest(f"x-bluegreen-color must be blue or green, got {forced[:20]!r}")
        candidate = state.candidate
        weight = state.weights[candidate]
        if weight <= 0:
            return state.stable
        if weight >= 100:
            return candidate
        if key is not None:
            return candidate if bucket(key) < weight * (BUCKETS // 100) else state.stable
        counter = self._counters.get(state.name)
        if counter is None:
            counter = self._counters[state.name] = itertools.count()
        return candidate if (next(counter) * _STRIDE) % 100 < weight else state.stable
