"""gateway/state_redis.py against a real redis-server: a state missing from Redis (restarted empty) is re-seeded
from a replica's last known state, audited as a recovery, and writes go on without a gateway restart."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from gateway import canary
from gateway.auth import Principal
from gateway.release import Release
from gateway.settings import RoutingFile
from gateway.state import ModelState
from gateway.state_redis import RedisStateStore
from tests.gateway.support import routing_doc
from tests.procs import Proc, start_redis

ALICE = Principal("alice", frozenset({"admin"}))
BOB = Principal("bob", frozenset({"admin"}))
MODEL = "digits"


class Server:
    """A private redis-server that the test can kill and start again, empty, on the same port."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.proc, self.port = start_redis(tmp_path)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restart_empty(self) -> None:
        self.proc.stop()
        self.proc, _ = start_redis(self.tmp_path, port=self.port)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.proc.stop()


def new_store(server: Server, replica: str) -> RedisStateStore:
    return RedisStateStore(server.url, RoutingFile.model_validate(routing_doc()), refresh_s=3600, replica=replica)


@pytest.fixture
async def store(server: Server) -> AsyncIterator[RedisStateStore]:
    s = new_store(server, "a")
    await s.start()
    yield s
    await s.aclose()


def weights(blue: int, green: int) -> Callable[[ModelState], ModelState]:
    return lambda s: dataclasses.replace(s, weights={"blue": blue, "green": green})


async def test_a_write_after_redis_restarted_empty_reseeds_the_last_known_state_and_applies(
        server: Server, store: RedisStateStore) -> None:
    before = await store.update(MODEL, 1, weights(80, 20), who="alice", action="set_weights")
    assert before.revision == 2
    server.restart_empty()
    assert server.client().get(f"bluegreen:state:{MODEL}") is None
    # The ETag the operator holds from before the outage is still the current one.
    after = await store.update(MODEL, 2, weights(70, 30), who="alice", action="set_weights")
    assert (after.revision, after.weights) == (3, {"blue": 70, "green": 30})
    assert store.get(MODEL) == after
    entries = await store.read_audit()
    assert [(e.action, e.who) for e in entries] == [("set_weights", "alice"), ("state_recovered", "gateway:a")]
    recovered = entries[1]
    assert recovered.model == MODEL and recovered.new == {"revision": 2, "weights": {"blue": 80, "green": 20},
                                                          "canary": "idle"}
    assert recovered.reason is not None and "missing from Redis" in recovered.reason
    assert recovered.evidence["state"]["revision"] == 2 and recovered.evidence["seen_in_redis"] is True
    assert entries[0].old == {"weights": {"blue": 80, "green": 20}}  # the write applied on the recovered state


async def test_the_refresh_reseeds_without_a_write_and_a_rollout_carries_on(server: Server,
                                                                           store: RedisStateStore) -> None:
    policy = canary.Policy(stages=(canary.Stage(10, 60),))
    status, actions = canary.start(policy, "green", 1000.0)
    started = await Release(store).apply(store.get(MODEL), status, actions, actor=ALICE, audit=True)
    server.restart_empty()
    await store.reload()  # what the state-refresh loop runs every refresh_s
    raw = server.client().get(f"bluegreen:state:{MODEL}")
    assert raw is not None
    assert store.get(MODEL) == started  # nothing changed, the revision included
    assert [e.action for e in await store.read_audit()] == ["state_recovered"]
    # The rollout is where it was: an operator can pause it (and a controller go on with it).
    paused, more = canary.operator("pause", store.get(MODEL).canary, 1001.0, "bob")
    done = await Release(store).apply(store.get(MODEL), paused, more, actor=BOB, audit=True)
    assert done.canary.phase == "paused" and done.weights == {"blue": 90, "green": 10}


async def test_replicas_racing_to_recover_seed_once(server: Server, store: RedisStateStore) -> None:
    other = new_store(server, "b")
    await other.start()
    try:
        await store.update(MODEL, 1, weights(60, 40), who="alice", action="set_weights")
        await other.reload()
        server.restart_empty()
        results = await asyncio.gather(*(s.recover(MODEL) for s in (store, other, store, other)))
        # At most one of these seeded (a listener's reload of the write's event may have come first): the
        # invariant is one seed, one audit entry.
        assert sum(results) <= 1
        assert [e.action for e in await store.read_audit()] == ["state_recovered"]
        assert other.get(MODEL).weights == store.get(MODEL).weights == {"blue": 60, "green": 40}
        # An existing state is never overwritten by a recovery.
        assert await other.recover(MODEL) is False
    finally:
        await other.aclose()


def test_helpers_stop_what_they_start(tmp_path: Path) -> None:
    s = Server(tmp_path)
    first: Proc = s.proc
    s.restart_empty()
    assert first.popen.poll() is not None and s.proc.popen.poll() is None
    s.proc.stop()
