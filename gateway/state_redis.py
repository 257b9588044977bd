"""Routing state shared by gateway replicas through Redis: versioned compare-and-set, pub/sub, audit stream and
a leader lease with a fencing token. (Every replica's numbers, merged for the canary controller, are published
and read by ``gateway/sources.py`` under the metrics key below.)

Keys (all under ``bluegreen:``; the prediction cache lives apart under ``bluegreen:cache:``)::

    bluegreen:state:{model}            JSON of the model's state, with its revision
    bluegreen:audit                    stream of audit entries (capped)
    bluegreen:events                   pub/sub channel: the name of a model whose state changed
    bluegreen:leader                   "{replica}:{epoch}" of the controller holding the lease (PX ttl)
    bluegreen:leader:epoch             fencing counter, incremented by every new holder
    bluegreen:metrics:{model}:{color}  hash replica -> JSON of its cumulative counts and recent window

Reads on the request path come from a local copy, refreshed by pub/sub within milliseconds of a write and by
a full reload every ``refresh_s`` (so a lost message costs at most that). A write is a Lua script that sets
the new state only if the stored one is byte-for-byte what the writer read (and, for the controller, only
while its lease epoch is still current), appends the audit entry and publishes the event, atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.errors import NotFound, PreconditionFailed
from gateway.settings import COLORS, RoutingFile
from gateway.state import AUDIT_LIMIT, AuditEntry, ColorState, Listener, ModelState, changes, rollout_summary
from serving.lifecycle import FailureStreak, Periodic

log = logging.getLogger(__name__)

PREFIX = "bluegreen:"
EVENTS = f"{PREFIX}events"
AUDIT = f"{PREFIX}audit"
LEADER = f"{PREFIX}leader"
EPOCH = f"{PREFIX}leader:epoch"

_CAS = """
if ARGV[4] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[4] then return -1 end
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'entry', ARGV[3])
end
redis.call('PUBLISH', KEYS[3], ARGV[5])
return 1
"""

_SEED = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'entry', ARGV[2])
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def _state_key(model: str) -> str:
    return f"{PREFIX}state:{model}"


def _encode(state: ModelState) -> bytes:
    return orjson.dumps(state.persisted())


class RedisStateStore:
    def __init__(self, url: str, routing: RoutingFile, *, refresh_s: float = 1.0,
                 replica: str | None = None) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        # A Redis that restarted leaves every pooled connection dead, and each would fail one command (an admin
        # write among them) with 503: retry once, at once, on a new connection. Only on a connection error: a
        # timeout may mean the command ran.
        self.redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0,
                                    retry=Retry(NoBackoff(), 1, (RedisConnectionError,)))
        # The subscription has a client of its own, without that retry: redis-py's pub/sub, retrying a read on a
        # dead connection, swallowed the cancellation at shutdown and never returned.
        self._events = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.refresh_s = refresh_s
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"
        self.models: dict[str, ModelState] = {
            name: ModelState(name, {c: ColorState(r.colors[c].version, tuple(r.colors[c].backends)) for c in COLORS},
                             dict(r.weights), r.candidate, r.shadow_percent,
                             payload_log_percent=r.payload_log_percent)
            for name, r in routing.models.items()}
        self._raw: dict[str, bytes] = {}
        self._listeners: list[Listener] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._cas = self.redis.register_script(_CAS)
        self._seed = self.redis.register_script(_SEED)
        self.fence: Callable[[], str | None] = lambda: None
        self._refresher = Periodic("state-refresh", refresh_s, self.reload)  # covers lost pub/sub messages

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Seed the state of models no replica has written yet (the routing file's), load all, subscribe."""
        for name, state in self.models.items():
            await self.redis.set(_state_key(name), _encode(state), nx=True)
        await self.reload()
        pubsub = self._events.pubsub()
        await pubsub.subscribe(EVENTS)
        self._tasks = [asyncio.get_running_loop().create_task(self._listen(pubsub), name="state-events")]
        self._refresher.start()

    async def aclose(self) -> None:
        await self._refresher.stop()
        # The flag, not the cancellation alone, ends the listener: redis-py's get_message, reading on a
        # connection that Redis closed, swallowed the cancellation and the shutdown waited forever.
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3.0)  # a listener's read times out within a second
        await self.redis.aclose()
        await self._events.aclose()

    async def reload(self, only: str | None = None) -> None:
        """Read the models' states from Redis; one that is missing there (Redis restarted empty) is re-seeded
        from this replica's copy, so the refresh loop restores it within ``refresh_s`` even without writes."""
        names = [only] if only else list(self.models)
        values = await self.redis.mget([_state_key(n) for n in names])
        for name, raw in zip(names, values, strict=True):
            if raw is None:
                await self.recover(name)
            elif isinstance(raw, bytes) and raw != self._raw.get(name):
                self._apply(name, raw)

    async def recover(self, name: str) -> bool:
        """Put this replica's last known state of ``name`` back into Redis if the key is missing, audited as a
        recovery, atomically (of replicas racing to do it, one wins; the others find the key and read it).
        The state keeps its revision, so ETags that clients hold stay valid. True when this replica seeded."""
        state = self.models[name]
        raw = self._raw.get(name) or _encode(state)
        phase = state.canary.phase.value
        entry = AuditEntry(time.time(), f"gateway:{self.replica}", "state_recovered", name, {},
                           {"revision": state.revision, "weights": dict(state.weights), "canary": phase},
                           f"the state of {name!r} was missing from Redis (restarted empty?); re-seeded from this "
                           f"replica's last known state, revision {state.revision}",
                           {"state": state.as_json(), "seen_in_redis": name in self._raw})
        seeded = await self._seed(keys=[_state_key(name), AUDIT, EVENTS],
                                  args=[raw, orjson.dumps(dataclasses.asdict(entry)), name, AUDIT_LIMIT])
        if seeded == 1:
            log.warning("the state of %s was missing from Redis: re-seeded it at revision %d", name, state.revision)
            if raw != self._raw.get(name):
                self._apply(name, raw)
        return bool(seeded == 1)

    def _apply(self, name: str, raw: bytes) -> None:
        try:
            state = ModelState.from_json(orjson.loads(raw))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring unreadable state of %s in Redis: %s", name, exc)
            return
        previous = self.models.get(name)
        if previous is not None and previous.revision > state.revision:
            return  # an older event arriving late
        self._raw[name] = raw
        self.models[name] = state
        for listener in self._listeners:
            listener(state)

    async def _listen(self, pubsub: Any) -> None:
        streak = FailureStreak("state events")
        try:
            while not self._closing:
                try:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        name = message["data"].decode()
                        if name in self.models:
                            await self.reload(name)
                    streak.succeeded()
                except Exception as exc:  # Redis gone: the refresh loop and a new subscription take over
                    streak.failed(exc)
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(Exception):
                        await pubsub.subscribe(EVENTS)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    # ------------------------------------------------------------------ reads

    def get(self, name: str) -> ModelState:
        state = self.models.get(name)
        if state is None:
            raise NotFound(f"unknown model {name!r}; configured: {', '.join(sorted(self.models))}")
        return state

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    async def read_audit(self, limit: int = 100) -> list[AuditEntry]:
        return _entries(await self.redis.xrevrange(AUDIT, count=limit))

    async def read_audit_after(self, after: str | None, limit: int = 100) -> list[AuditEntry]:
        """Entries after the stream id ``after`` (None: from the oldest kept), oldest first."""
        return _entries(await self.redis.xrange(AUDIT, min=f"({after}" if after else "-", count=limit))

    async def append_audit(self, entry: AuditEntry) -> AuditEntry:
        """Record an event that is not a state write (a breaker opened, a signal, a refused start)."""
        doc = dataclasses.asdict(entry)
        doc.pop("id", None)
        sid = await self.redis.xadd(AUDIT, {"entry": orjson.dumps(doc)}, maxlen=AUDIT_LIMIT, approximate=True)
        return dataclasses.replace(entry, id=sid.decode() if isinstance(sid, bytes) else str(sid))

    # ------------------------------------------------------------------ writes

    async def update(self, name: str, if_revision: int | None, change: Callable[[ModelState], ModelState], *,
                     who: str, action: str, reason: str | None = None, evidence: Any = None,
                     audit: bool = True, fenced: bool = False, roles: tuple[str, ...] = ()) -> ModelState:
        """Compare-and-set against the state in Redis; ``fenced`` writes (the controller's) also require the
        writer's lease epoch to be the current one."""
        self.get(name)
        fence = (self.fence() or "\x00no-lease") if fenced else ""
        for _ in range(5):
            raw = await self.redis.get(_state_key(name))
            if raw is None:  # Redis restarted empty: put the last known state back, then write on top of it
                await self.recover(name)
                continue
            current = ModelState.from_json(orjson.loads(raw))
            if if_revision is not None and current.revision != if_revision:
                raise PreconditionFailed(f"stale ETag: model {name!r} is at revision {current.revision}, "
                                         f"the write was based on {if_revision}")
            updated = dataclasses.replace(change(current), revision=current.revision + 1)
            entry = b""
            if audit:
                old, new = changes(current, updated)
                doc = dataclasses.asdict(AuditEntry(time.time(), who, action, name, old, new, reason, evidence,
                                                    list(roles), rollout=rollout_summary(current, updated)))
                doc.pop("id")  # the stream gives it
                entry = orjson.dumps(doc)
            new_raw = _encode(updated)
            result = await self._cas(keys=[_state_key(name), AUDIT, EVENTS, LEADER],
                                     args=[raw, new_raw, entry, fence, name, AUDIT_LIMIT])
            if result == 1:
                self._apply(name, new_raw)
                return updated
            if result == -1:
                raise PreconditionFailed("this controller no longer holds the lease")
            if if_revision is not None:
                raise PreconditionFailed(f"stale ETag: model {name!r} changed while this write was prepared")
        raise PreconditionFailed(f"model {name!r} kept changing; try again")


def _entries(rows: Any) -> list[AuditEntry]:
    """Stream rows as entries, each carrying its stream id (rows that do not parse are skipped)."""
    entries = []
    for sid, fields in rows or []:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            doc = orjson.loads(fields[b"entry"])
            doc["id"] = sid.decode() if isinstance(sid, bytes) else str(sid)
            entries.append(AuditEntry(**doc))
    return entries


class Lease:
    """The controller's lease: one holder among replicas, with a fencing epoch in the stored value."""

    def __init__(self, store: RedisStateStore, ttl_s: float = 5.0) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.token: str | None = None
        self._valid_until = 0.0
        self._renew = store.redis.register_script(_RENEW)
        self._loop = Periodic("leader-lease", ttl_s / 3, self.tick, first_after_s=0.0)

    def is_leader(self) -> bool:
        return self.token is not None and time.monotonic() < self._valid_until

    def current(self) -> str | None:
        return self.token if self.is_leader() else None

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        if self.token is not None:
            with contextlib.suppress(Exception):
                await self._renew(keys=[LEADER], args=[self.token, 1])  # let it lapse at once
        self.token = None

    async def tick(self) -> None:
        redis = self.store.redis
        started = time.monotonic()
        ttl_ms = int(self.ttl_s * 1000)
        if self.token is not None and await self._renew(keys=[LEADER], args=[self.token, ttl_ms]) == 1:
            self._valid_until = started + self.ttl_s * 0.8
            return
        if self.token is not None:
            log.warning("lost the controller lease (%s)", self.token)
            self.token = None
        if await redis.exists(LEADER):
            return
        epoch = await redis.incr(EPOCH)
        token = f"{self.store.replica}:{epoch}"
        if await redis.set(LEADER, token, nx=True, px=ttl_ms):
            self.token = token
            self._valid_until = started + self.ttl_s * 0.8
            log.info("holding the controller lease (%s)", token)
