"""The Redis store's logic against a real redis-server on a free port: compare-and-set writes, the audit stream,
pub/sub between replicas, the controller's lease with its fencing epoch, and every replica's published numbers
merged for the controller (rows of replicas that stopped publishing dropped).

(``test_state_redis.py`` covers what happens when Redis restarts empty.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import orjson
import pytest

from gateway.dataplane import DataPlane
from gateway.errors import PreconditionFailed
from gateway.settings import COLORS, GatewaySettings, RoutingFile
from gateway.sources import Counts, MergedMetrics, MetricsPublisher
from gateway.state import ModelState
from gateway.state_redis import LEADER, Lease, RedisStateStore
from tests.gateway.support import routing_doc
from tests.procs import start_redis

MODEL = "digits"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    proc, port = start_redis(tmp_path)
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[RedisStateStore, RedisStateStore]]:
    """Two gateway replicas' stores on one Redis (no periodic reload: what reaches them comes by pub/sub)."""
    stores = [RedisStateStore(redis_url, RoutingFile.model_validate(routing_doc()), refresh_s=3600, replica=name)
              for name in ("a", "b")]
    for s in stores:
        await s.start()
    yield stores[0], stores[1]
    for s in stores:
        await s.aclose()


def weights(blue: int, green: int) -> Callable[[ModelState], ModelState]:
    return lambda s: dataclasses.replace(s, weights={"blue": blue, "green": green})


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def stored(store: RedisStateStore) -> ModelState:
    raw = await store.redis.get(f"bluegreen:state:{MODEL}")
    assert raw is not None
    return ModelState.from_json(orjson.loads(raw))


# ------------------------------------------------------------------ compare-and-set and audit


async def test_a_write_based_on_a_stale_revision_is_refused_and_changes_nothing(
        replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = replicas
    assert (await a.update(MODEL, 1, weights(80, 20), who="alice", action="set_weights")).revision == 2
    with pytest.raises(PreconditionFailed, match="revision 2"):
        await b.update(MODEL, 1, weights(0, 100), who="bob", action="set_weights")
    assert ((await stored(a)).revision, (await stored(a)).weights) == (2, {"blue": 80, "green": 20})
    assert [e.who for e in await a.read_audit()] == ["alice"]


async def test_of_concurrent_writes_on_one_revision_exactly_one_wins(
        replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = replicas
    results = await asyncio.gather(*(
        (a if i % 2 else b).update(MODEL, 1, weights(100 - i, i), who=f"op{i}", action="set_weights")
        for i in range(10)), return_exceptions=True)
    won = [r for r in results if isinstance(r, ModelState)]
    assert len(won) == 1 and all(isinstance(r, PreconditionFailed) for r in results if r not in won)
    assert await stored(a) == won[0]
    assert len(await a.read_audit()) == 1


async def test_unconditional_writes_retry_on_conflict_and_none_is_lost(
        replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = replicas

    def one_more(s: ModelState) -> ModelState:
        return dataclasses.replace(s, shadow_percent=s.shadow_percent + 1)

    # Five writers: each round of the compare-and-set loop lets one through, and a writer tries five times.
    await asyncio.gather(*((a if i % 2 else b).update(MODEL, None, one_more, who=f"op{i}", action="set_shadow")
                           for i in range(5)))
    final = await stored(a)
    assert (final.shadow_percent, final.revision) == (5, 6)
    assert len(await a.read_audit()) == 5


async def test_a_write_reaches_the_other_replica_by_pub_sub(replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = replicas
    seen: list[ModelState] = []
    b.subscribe(seen.append)
    written = await a.update(MODEL, 1, weights(60, 40), who="alice", action="set_weights")
    await eventually(lambda: b.get(MODEL).revision == 2, "replica b to see the write")
    assert b.get(MODEL) == written and seen == [written]
    # b's write based on what it now holds goes through.
    assert (await b.update(MODEL, 2, weights(50, 50), who="bob", action="set_weights")).revision == 3


async def test_the_audit_is_newest_first_with_what_changed_and_why(
        replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, _ = replicas
    await a.update(MODEL, None, weights(90, 10), who="alice", action="set_weights", reason="first step")
    await a.update(MODEL, None, weights(80, 20), who="controller", action="canary_advance", audit=False)
    await a.update(MODEL, None, weights(70, 30), who="bob", action="set_weights", evidence={"p95_ms": 12})
    entries = await a.read_audit()
    assert [(e.who, e.action) for e in entries] == [("bob", "set_weights"), ("alice", "set_weights")]
    bob, alice = entries
    assert bob.old["weights"] == {"blue": 80, "green": 20} and bob.new["weights"] == {"blue": 70, "green": 30}
    assert (bob.evidence, alice.reason, alice.model) == ({"p95_ms": 12}, "first step", MODEL)
    assert [e.who for e in await a.read_audit(limit=1)] == ["bob"]


async def test_an_unreadable_state_in_redis_is_ignored(replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, _ = replicas
    before = a.get(MODEL)
    await a.redis.set(f"bluegreen:state:{MODEL}", b"{not json")
    await a.reload()
    assert a.get(MODEL) == before


# ------------------------------------------------------------------ the lease and its fence


async def test_one_leader_among_replicas_and_the_next_takes_over_when_it_stops(
        replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = replicas
    la, lb = Lease(a, ttl_s=5.0), Lease(b, ttl_s=5.0)
    await la.tick()
    await lb.tick()
    assert la.is_leader() and not lb.is_leader()
    assert la.current() == "a:1" and await a.redis.get(LEADER) == b"a:1"
    await la.tick()  # renewed, same token
    assert la.current() == "a:1" and 4000 < await a.redis.pttl(LEADER) <= 5000
    await la.stop()  # lets the lease lapse at once (a millisecond)
    assert not la.is_leader()
    for _ in range(100):
        await lb.tick()
        if lb.is_leader():
            break
        await asyncio.sleep(0.01)
    assert lb.current() == "b:2"  # a new holder, a new epoch


async def test_a_fenced_write_needs_the_current_lease(replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = replicas
    la, lb = Lease(a, ttl_s=5.0), Lease(b, ttl_s=5.0)
    a.fence, b.fence = la.current, lb.current
    with pytest.raises(PreconditionFailed, match="lease"):  # no lease held at all
        await a.update(MODEL, None, weights(90, 10), who="controller", action="canary_advance", fenced=True)
    await la.tick()
    assert (await a.update(MODEL, None, weights(90, 10), who="controller", action="canary_advance",
                           fenced=True)).revision == 2
    # The lease lapses in Redis (a paused leader) and b takes it while a still believes it holds it.
    await a.redis.delete(LEADER)
    await lb.tick()
    assert la.is_leader() and lb.is_leader()
    with pytest.raises(PreconditionFailed, match="no longer holds the lease"):
        await a.update(MODEL, None, weights(80, 20), who="controller", action="canary_advance", fenced=True)
    assert (await stored(a)).weights == {"blue": 90, "green": 10}
    assert (await b.update(MODEL, None, weights(80, 20), who="controller", action="canary_advance",
                           fenced=True)).revision == 3
    # Operators' writes are never fenced.
    assert (await a.update(MODEL, None, weights(100, 0), who="alice", action="set_weights")).revision == 4


# ------------------------------------------------------------------ every replica's numbers, merged


def plane_with(store: RedisStateStore, blue: list[bool], green: list[bool]) -> DataPlane:
    """A (never started) data plane whose colors recorded these attempt outcomes, 10 ms each."""
    plane = DataPlane(GatewaySettings(), store)
    for color in COLORS:
        for ok in blue if color == "blue" else green:
            plane.runtime(MODEL, color).record(0.010, ok)
    return plane


async def test_merged_numbers_sum_live_replicas_and_drop_stale_rows(
        replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = replicas
    plane_a = plane_with(a, [True] * 8 + [False] * 2, [True] * 3)
    plane_b = plane_with(b, [True] * 5, [False])
    plane_a.feedback.remember(MODEL, "r1", "blue", "1", b'{"outputs":[{"name":"label","data":[1]}]}', None)
    assert (await plane_a.feedback.record(MODEL, {"id": "r1", "label": 1}))["matched"] == 1
    for store, plane in ((a, plane_a), (b, plane_b)):
        await MetricsPublisher(store, plane).publish()
    # A replica that stopped publishing a minute ago, and one still on another version of blue.
    ghost = MetricsPublisher(a, plane_with(a, [False] * 100, [False] * 100)).document(MODEL, "blue", time.time() - 60)
    other = MetricsPublisher(a, plane_with(a, [True], [])).document(MODEL, "blue", time.time())
    other.update(version="0", feedback=7, correct=7)
    await a.redis.hset(f"bluegreen:metrics:{MODEL}:blue", mapping={"ghost": orjson.dumps(ghost),
                                                                   "old-version": orjson.dumps(other)})

    merged = MergedMetrics(a, plane_a, stale_s=10.0)
    assert merged.counts(MODEL, "blue", "1") == Counts()  # nothing before the first refresh
    await merged.refresh()
    # Requests and errors of every live replica (the old version's one request included); feedback of version 1
    # only.
    assert merged.counts(MODEL, "blue", "1") == Counts(requests=16, errors=2, feedback=1, correct=1)
    assert merged.counts(MODEL, "green", "2") == Counts(requests=4, errors=1)
    window = merged.window(MODEL, "blue", 60.0)
    assert (window.count, window.errors) == (16, 2)
    p95 = window.quantile(0.95)
    assert p95 is not None and p95 == pytest.approx(0.010, rel=0.02)
    assert merged.shadow(MODEL) == (None, 0)

    # Breakers are judged by this replica's own.
    assert not merged.breaker_open(MODEL, "green")
    plane_a.runtime(MODEL, "green").backends[0].breaker.force_open()
    assert merged.breaker_open(MODEL, "green")


async def test_shadow_counts_are_read_once_per_replica(replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = replicas
    now = time.time()
    for replica, (compared, agreed) in (("a", (10, 9)), ("b", (30, 21))):
        for color in COLORS:  # every replica repeats the model's shadow counts under each color
            doc = MetricsPublisher(a, plane_with(a, [], [])).document(MODEL, color, now)
            doc["shadow"] = [compared, agreed]
            await a.redis.hset(f"bluegreen:metrics:{MODEL}:{color}", replica, orjson.dumps(doc))
    merged = MergedMetrics(b, plane_with(b, [], []))
    await merged.refresh()
    ratio, compared = merged.shadow(MODEL)
    assert compared == 40 and ratio == pytest.approx(0.75)
