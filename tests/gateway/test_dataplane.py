"""gateway/dataplane.py and gateway/forward.py in-process: a real DataPlane in front of real HTTP servers on
loopback (``upstream_stub.py``: each answers with its own label, so a reply shows which color gave it).

Routing by weight, the failover rules (what moves to the other color freely, what the retry budget rations, what
a pinned request never does), the cache (hit, miss, Cache-Control, stale when both colors fail) and single
flight; every attempt shows on its color's :class:`~gateway.runtime.ColorRuntime`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.cache import PredictionCache
from gateway.dataplane import DataPlane, InferRequest, Reply
from gateway.errors import Unavailable
from gateway.settings import CacheSettings, GatewaySettings, RoutingFile, UpstreamSettings
from gateway.state import ColorState, MemoryStateStore, ModelState
from tests.gateway.support import DIGITS, FakeClock
from tests.gateway.upstream_stub import StubUpstream, stubs
from tests.procs import free_port

MODEL = "digits"
BLUE_LABEL, GREEN_LABEL = 1, 2


@dataclasses.dataclass
class Rig:
    plane: DataPlane
    blue: StubUpstream
    green: StubUpstream

    async def infer(self, i: int = 0, /, **fields: Any) -> Reply:
        return await self.plane.infer(InferRequest(MODEL, body(i), **fields))


def body(i: int = 0, request_id: str | None = None) -> bytes:
    """A valid digits request; ``i`` makes it distinct (a different cache key)."""
    doc: dict[str, Any] = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "data": [float(i)] * 64}]}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


def label(reply: Reply) -> int:
    return int(orjson.loads(reply.body)["outputs"][0]["data"][0])


def header(reply: Reply, name: str) -> str | None:
    found = [v.decode() for k, v in reply.headers if k.decode() == name]
    return found[0] if found else None


@contextlib.asynccontextmanager
async def rig(weights: tuple[int, int] = (100, 0), *, dead_blue: bool = False, cache: PredictionCache | None = None,
              upstream: UpstreamSettings | None = None, shadow_percent: int = 0, **settings: Any
              ) -> AsyncIterator[Rig]:
    """Blue (version 1) and green (version 2) on their own stub servers; ``dead_blue`` points blue at a port
    nothing listens on (a connection that cannot be opened)."""
    async with stubs(BLUE_LABEL, GREEN_LABEL) as (blue, green):
        blue_url = f"http://127.0.0.1:{free_port()}" if dead_blue else blue.url
        routing = RoutingFile.model_validate({"models": {MODEL: {
            "colors": {"blue": {"version": "1", "backends": [blue_url]},
                       "green": {"version": "2", "backends": [green.url]}},
            "weights": {"blue": weights[0], "green": weights[1]}, "candidate": "green",
            "shadow_percent": shadow_percent}}})
        plane = DataPlane(GatewaySettings(upstream=upstream or UpstreamSettings(), **settings),
                          MemoryStateStore.from_routing(routing), cache)
        for version in ("1", "2"):  # known up front: no metadata calls to the stubs
            plane.signatures[(MODEL, version)] = DIGITS
        await plane.start()
        try:
            yield Rig(plane, blue, green)
        finally:
            await plane.close()


NO_RETRY_BUDGET = UpstreamSettings(retry_budget_ratio=0.0, retry_budget_min=0)


# ------------------------------------------------------------------ routing


async def test_requests_split_exactly_by_weight_and_each_color_counts_its_own() -> None:
    async with rig((70, 30)) as r:
        replies = [await r.infer(i) for i in range(100)]
        assert [x.status for x in replies] == [200] * 100
        by_color = {c: [x for x in replies if x.color == c] for c in ("blue", "green")}
        assert (len(by_color["blue"]), len(by_color["green"])) == (70, 30)
        # Each reply came from its color's own server, with that color's version.
        assert {(label(x), x.version) for x in by_color["blue"]} == {(BLUE_LABEL, "1")}
        assert {(label(x), x.version) for x in by_color["green"]} == {(GREEN_LABEL, "2")}
        assert (r.blue.calls, r.green.calls) == (70, 30)
        blue, green = r.plane.runtime(MODEL, "blue"), r.plane.runtime(MODEL, "green")
        assert (blue.requests, blue.errors, green.requests, green.errors) == (70, 0, 30, 0)
        assert (blue.snapshot().count, green.snapshot().count) == (70, 30)
        assert r.blue.paths[0] == "/v2/models/digits/versions/1/infer"
        assert r.green.paths[0] == "/v2/models/digits/versions/2/infer"
        assert r.plane.in_flight == 0


async def test_a_repointed_color_keeps_its_runtime_and_counts_and_serves_from_its_new_backend() -> None:
    async with rig((0, 100)) as r, stubs(3) as (third,):
        await r.infer(0)
        green = r.plane.runtime(MODEL, "green")
        assert (green.requests, green.snapshot().count) == (1, 1)

        def repoint(s: ModelState) -> ModelState:
            return dataclasses.replace(s, colors={**s.colors, "green": ColorState("2", (third.url,))})

        await r.plane.store.update(MODEL, None, repoint, who="alice", action="set_color")
        assert r.plane.runtime(MODEL, "green") is green and green.requests == 1
        assert [b.url for b in green.backends] == [third.url]
        reply = await r.infer(1)
        assert (label(reply), third.calls, r.green.calls, green.requests) == (3, 1, 1, 2)
        with pytest.raises(KeyError):
            r.plane.runtime("nope", "blue")


# ------------------------------------------------------------------ failover


async def test_a_connection_that_cannot_be_opened_moves_to_the_other_color_without_the_budget() -> None:
    async with rig(dead_blue=True, upstream=NO_RETRY_BUDGET) as r:
        reply = await r.infer()
        assert (reply.status, reply.color, label(reply)) == (200, "green", GREEN_LABEL)
        assert header(reply, "x-bluegreen-degraded") == "failover"
        blue = r.plane.runtime(MODEL, "blue")
        assert (blue.requests, blue.errors) == (1, 1)  # the failed attempt counts against blue
        assert r.plane.runtime(MODEL, "green").requests == 1


async def test_a_dropped_connection_is_the_backends_own_failure_and_moves_on_freely() -> None:
    async with rig(upstream=NO_RETRY_BUDGET) as r:
        r.blue.behaviour = "close"
        reply = await r.infer()
        assert (reply.status, reply.color) == (200, "green")
        assert r.blue.calls >= 1 and r.green.calls == 1


async def test_a_5xx_is_retried_once_on_the_other_color_within_the_budget() -> None:
    async with rig() as r:
        r.blue.status = 503
        reply = await r.infer()
        assert (reply.status, reply.color, label(reply)) == (200, "green", GREEN_LABEL)
        assert header(reply, "x-bluegreen-degraded") == "failover"
        blue = r.plane.runtime(MODEL, "blue")
        assert (blue.requests, blue.errors, r.blue.calls, r.green.calls) == (1, 1, 1, 1)
        assert r.plane.forwarder.retries_in_flight == 0


async def test_a_5xx_is_not_retried_once_the_budget_is_spent() -> None:
    async with rig(upstream=NO_RETRY_BUDGET) as r:
        r.blue.status = 500
        with pytest.raises(Unavailable) as refused:
            await r.infer()
        assert "retry budget exhausted" in str(refused.value) and refused.value.status == 503
        assert (r.blue.calls, r.green.calls) == (1, 0)


async def test_a_4xx_is_the_clients_answer_passed_through_and_not_an_error() -> None:
    async with rig() as r:
        r.blue.status = 400
        reply = await r.infer()
        assert (reply.status, reply.color) == (400, "blue")
        assert (r.blue.calls, r.green.calls) == (1, 0)
        blue = r.plane.runtime(MODEL, "blue")
        assert (blue.requests, blue.errors) == (1, 0)


async def test_a_color_whose_breakers_are_all_open_is_skipped_without_an_attempt() -> None:
    async with rig() as r:
        r.plane.runtime(MODEL, "blue").backends[0].breaker.force_open()
        assert r.plane.runtime(MODEL, "blue").breakers_open()
        reply = await r.infer()
        assert (reply.status, reply.color) == (200, "green")
        assert r.blue.calls == 0 and r.plane.runtime(MODEL, "blue").requests == 0


@pytest.mark.parametrize("timeout_ms", ["0.001", "0.9"])
async def test_a_deadline_under_a_millisecond_is_exceeded_before_any_attempt(timeout_ms: str) -> None:
    """The loop's timers count whole milliseconds: an attempt given 1 µs could come back 200 within the timer's
    millisecond, a deadline the client set and the gateway did not keep. Under 1 ms left, nothing is sent."""
    async with rig() as r:
        with pytest.raises(Unavailable, match="blue: deadline exceeded before the attempt"):
            await r.infer(timeout_ms=timeout_ms)
        assert (r.blue.calls, r.green.calls) == (0, 0)
        assert (await r.infer(timeout_ms="1000")).status == 200


@pytest.mark.parametrize("pin", [{"version": "1"}, {"forced_color": "blue"}])
async def test_a_pinned_request_is_never_answered_by_the_other_color(pin: dict[str, str]) -> None:
    async with rig(dead_blue=True, allow_color_override=True) as r:
        with pytest.raises(Unavailable):
            await r.infer(**pin)
        assert r.green.calls == 0
        r.plane.runtime(MODEL, "blue").backends[0].breaker.force_open()
        with pytest.raises(Unavailable) as refused:
            await r.infer(**pin)
        assert "blue: circuit open" in str(refused.value) and r.green.calls == 0


@pytest.mark.exclusive
async def test_a_hanging_color_leaves_the_other_one_time_within_the_deadline() -> None:
    async with rig(upstream=UpstreamSettings(deadline_s=1.2, attempt_timeout_s=1.0)) as r:
        r.blue.behaviour = "hang"
        started = time.perf_counter()
        try:
            reply = await r.infer()
        finally:
            r.blue.release.set()
        elapsed = time.perf_counter() - started
        assert (reply.status, reply.color) == (200, "green")
        # The first attempt got half of the time left (0.6 s), not its whole 1 s: green answered well before.
        assert 0.6 <= elapsed < 0.95, elapsed
        assert r.plane.runtime(MODEL, "blue").errors == 1


# ------------------------------------------------------------------ cache


def l1_cache(clock: FakeClock | None = None) -> PredictionCache:
    return PredictionCache(CacheSettings(ttl_s=60, stale_s=600), clock=clock or FakeClock())


async def test_a_repeated_body_is_a_hit_without_an_upstream_call() -> None:
    async with rig(cache=l1_cache()) as r:
        first, second = await r.infer(7), await r.infer(7)
        assert (first.cache, second.cache) == ("miss", "hit")
        assert second.body == first.body and (second.color, second.version) == ("blue", "1")
        assert header(second, "x-bluegreen-cache") == "hit"
        assert r.blue.calls == 1 and r.plane.runtime(MODEL, "blue").requests == 1
        assert (await r.infer(8)).cache == "miss" and r.blue.calls == 2  # another body, another key


async def test_a_cached_answer_carries_this_requests_id() -> None:
    async with rig(cache=l1_cache()) as r:
        await r.plane.infer(InferRequest(MODEL, body(3, "first")))
        hit = await r.plane.infer(InferRequest(MODEL, body(3, "second")))
        assert (hit.cache, hit.client_id, orjson.loads(hit.body)["id"]) == ("hit", "second", "second")
        assert r.blue.calls == 1


@pytest.mark.parametrize(("cache_control", "second_cache", "calls"), [
    ("no-cache", "bypass", 2),  # never read: the second goes upstream (and is stored again)
    ("no-store", "miss", 2),  # never stored: the first left nothing to hit
    ("no-cache, no-store", "bypass", 2),
    ("max-age=0", "hit", 1),  # anything else reads and writes as usual
])
async def test_cache_control_decides_reads_and_writes(cache_control: str, second_cache: str, calls: int) -> None:
    async with rig(cache=l1_cache()) as r:
        await r.infer(5, cache_control=cache_control)
        second = await r.infer(5, cache_control=cache_control)
        assert (second.cache, r.blue.calls) == (second_cache, calls)


async def test_a_stale_answer_comes_before_a_503_when_both_colors_fail() -> None:
    clock = FakeClock()
    async with rig(cache=l1_cache(clock)) as r:
        fresh = await r.infer(9)
        clock.advance(120)  # past the TTL, within the stale time
        r.blue.status = r.green.status = 500
        stale = await r.infer(9)
        assert (stale.status, stale.cache, stale.body) == (200, "stale", fresh.body)
        assert header(stale, "x-bluegreen-degraded") == "stale-cache"
        with pytest.raises(Unavailable):  # no stale answer for another body
            await r.infer(10)


async def test_identical_concurrent_misses_share_one_upstream_call() -> None:
    async with rig(cache=l1_cache()) as r:
        r.blue.behaviour = "hang"
        waiting = [asyncio.ensure_future(r.infer(4)) for _ in range(5)]
        for _ in range(500):  # the leader's call reached the server (the followers joined it long before)
            if r.blue.calls:
                break
            await asyncio.sleep(0.01)
        r.blue.release.set()
        replies = await asyncio.gather(*waiting)
        assert [x.status for x in replies] == [200] * 5 and len({x.body for x in replies}) == 1
        assert r.blue.calls == 1 and r.plane.runtime(MODEL, "blue").requests == 1
        assert (await r.infer(4)).cache == "hit"

