"""The prediction cache: an in-process L1 in front of an optional Redis L2, version-safe, single-flight.

Keys are ``model + version + digest(request bytes)`` — never the color, and never the request ``id`` — where
the version is that of the color chosen for *this* request, so a request routed to green is never answered
with blue's output and a rollout never serves an old version's answer under the new one. The digest is of the
body's own bytes (JSON and binary tail) with its ``"id"`` member cut out (:func:`digest`): the same tensors
spelled with other spacing or key order are another key, a miss and never a wrong answer. Every value carries
its version, checked on read.

Trust rules for Redis (it must never hurt a prediction): reads and writes have a short timeout and no retries;
a breaker stops calling a failing Redis for at most ``redis_open_s`` before it probes again; every error is a
miss; writes run off the request's critical path, bounded in number. Entries live ``ttl_s`` fresh and
``stale_s`` more as *stale*: a stale entry never answers a healthy request, only one that both colors failed
(stale-if-error).

Responses are stored without their ``id``; a hit gets the current request's id spliced in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.breaker import Breaker
from gateway.settings import BreakerSettings, CacheSettings

log = logging.getLogger(__name__)

KEY_PREFIX = "bluegreen:cache:"


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached 200 response, without its request id."""

    version: str
    content_type: str
    header_length: int | None  # JSON length of a binary response
    body: bytes
    stored_at: float  # wall clock, comparable across gateway processes

    def fresh(self, now: float, ttl_s: float) -> bool:
        return now - self.stored_at < ttl_s

    def encode(self) -> bytes:
        meta = orjson.dumps({"v": self.version, "ct": self.content_type, "hl": self.header_length,
                             "t": self.stored_at})
        return struct.pack(">I", len(meta)) + meta + self.body

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        (n,) = struct.unpack_from(">I", raw)
        meta = orjson.loads(raw[4:4 + n])
        return cls(str(meta["v"]), str(meta["ct"]), meta["hl"], raw[4 + n:], float(meta["t"]))

    @classmethod
    def from_response(cls, version: str, content_type: str, header_length: str | None, body: bytes,
                      now: float) -> Entry | None:
        """Strip the ``id`` from a V2 response; None when the body is not a V2 response we can rewrite."""
        try:
            n = int(header_length) if header_length is not None else len(body)
            doc = orjson.loads(body[:n]) if 0 <= n <= len(body) else None
        except ValueError:  # a bad header length or not JSON (orjson.JSONDecodeError is a ValueError)
            return None
        if not isinstance(doc, dict):
            return None
        doc.pop("id", None)
        head = orjson.dumps(doc)
        return cls(version, content_type, len(head) if header_length is not None else None, head + body[n:], now)

    def render(self, request_id: str | None) -> tuple[bytes, int | None]:
        """The body for a request with ``request_id`` (spliced in as the first key) and its JSON length."""
        if request_id is None:
            return self.body, self.header_length
        prefix = b'{"id":' + orjson.dumps(request_id) + (b"," if self.body[1:2] != b"}" else b"")
        body = prefix + self.body[1:]
        return body, None if self.header_length is None else self.header_length + len(prefix) - 1


_ID_MEMBER = re.compile(rb'"id"\s*:\s*')
_SPACE = b" \t\r\n"


def _without_id(body: bytes, request_id: str) -> tuple[bytes, bytes] | None:
    """``body`` around its top-level ``"id": "<request_id>"`` member and that member's comma, or None when the
    member does not appear exactly once as expected (then nothing is guessed)."""
    matches = list(_ID_MEMBER.finditer(body))
    if len(matches) != 1:
        return None
    start, value_at = matches[0].start(), matches[0].end()
    value = orjson.dumps(request_id)
    if not body.startswith(value, value_at):
        return None
    end = value_at + len(value)
    after = end
    while after < len(body) and body[after] in _SPACE:
        after += 1
    if after < len(body) and body[after] == ord(","):  # "id" first or in the middle: its comma follows
        after += 1
        while after < len(body) and body[after] in _SPACE:
            after += 1
        return body[:start], body[after:]
    before = start  # "id" last: the comma before it goes
    while before > 0 and body[before - 1] in _SPACE:
        before -= 1
    if before > 0 and body[before - 1] == ord(","):
        return body[:before - 1], body[end:]
    return body[:start], body[end:]  # the only member


def digest(body: bytes, header_length: str | None, request_id: str | None) -> str:
    """Digest of a request's own bytes (JSON header and binary tail), its top-level ``id`` member left out.

    Hashing the bytes the gateway already holds costs about a microsecond and no memory, where re-serialising
    the parsed JSON canonically cost ~5 µs for a 64-value row and a second copy of a large body. The price:
    the same tensors sent with other spacing or key order get another key (a miss, never a wrong answer).
    The ``"id": ...`` member (and its comma) is cut out when it appears exactly once in the JSON part, so the
    same JSON request with another id, or with none, has the same key; otherwise the whole body is hashed. The
    header length of a binary request is part of it (so there, a request with an id and one without differ: a
    miss)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(b"%d|" % (-1 if header_length is None else len(header_length)))
    if header_length is not None:
        h.update(header_length.encode("latin-1"))
    json_end = len(body) if header_length is None else int(header_length)  # checked by split_body before
    parts = _without_id(body[:json_end] if json_end < len(body) else body, request_id) if request_id else None
    if parts is None:
        h.update(body)
        return h.hexdigest()
    head, tail = parts
    h.update(head)
    h.update(tail)
    h.update(memoryview(body)[json_end:])
    return h.hexdigest()


class L2Store(Protocol):
    """A shared second tier (Redis). Implementations raise on failure; the cache turns that into a miss."""

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def close(self) -> None: ...


class RedisL2:
    def __init__(self, url: str, timeout_s: float, max_connections: int) -> None:
        from redis.asyncio import Redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                     retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                     max_connections=max_connections, health_check_interval=0)

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(key)
        assert value is None or isinstance(value, bytes)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._redis.set(key, value, px=max(1, int(ttl_s * 1000)))

    async def close(self) -> None:
        await self._redis.aclose()


_NOBODY: Any = object()


class LeaderGone(Exception):
    """The request leading a single flight went away before its answer: followers ask for themselves."""


@dataclass(slots=True)
class Lookup:
    entry: Entry | None = None  # a fresh hit
    tier: str | None = None  # "l1" | "l2"
    stale: Entry | None = None  # an expired entry still within its stale grace


class PredictionCache:
    def __init__(self, settings: CacheSettings, l2: L2Store | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        """``clock`` is the wall clock entries are stamped with (comparable across processes); ``monotonic``
        times Redis calls and drives the Redis breaker. Both are injected so tests need not sleep."""
        self.settings = settings
        self.l2 = l2
        self.clock = clock
        self._monotonic = monotonic
        self._l1: OrderedDict[str, Entry] = OrderedDict()
        self._l1_bytes = 0
        self._inflight: dict[str, asyncio.Future[Any] | None] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self.l2_breaker = Breaker(BreakerSettings(window_size=20, minimum_calls=5, failure_rate_threshold=0.5,
                                                  slow_call_duration_s=max(settings.redis_timeout_s, 0.001) * 2,
                                                  open_s=settings.redis_open_s, half_open_probes=1),
                                  clock=monotonic)
        self.counters: dict[str, int] = {"l1_hits": 0, "l2_hits": 0, "misses": 0, "stale": 0, "coalesced": 0,
                                         "l2_errors": 0, "l2_writes": 0, "l2_writes_dropped": 0}

    @staticmethod
    def key(model: str, version: str, request_digest: str) -> str:
        return f"{KEY_PREFIX}{model}:{version}:{request_digest}"

    # ------------------------------------------------------------------ reads

    def hit(self, key: str, version: str) -> Entry | None:
        """A fresh L1 entry for ``version`` (counted as an L1 hit), else None: the request path's first look,
        with no await and no Redis."""
        entry = self._l1.get(key)
        if entry is None or entry.version != version or not entry.fresh(self.clock(), self.settings.ttl_s):
            return None
        self._l1.move_to_end(key)
        self.counters["l1_hits"] += 1
        return entry

    async def lookup(self, key: str, version: str) -> Lookup:
        now = self.clock()
        ttl = self.settings.ttl_s
        result = Lookup()
        entry = self._l1_get(key)
        if entry is not None and entry.version == version:
            if entry.fresh(now, ttl):
                self.counters["l1_hits"] += 1
                return Lookup(entry, "l1")
            result.stale = entry
        if self.l2 is not None:
            raw = await self._l2_call(self.l2.get(key))
            if raw is not None:
                try:
                    remote = Entry.decode(raw)
                except (ValueError, KeyError, TypeError, struct.error):  # anything else under our prefix
                    remote = None
                if remote is not None and remote.version == version:
                    if remote.fresh(now, ttl):
                        self._l1_put(key, remote)
                        self.counters["l2_hits"] += 1
                        return Lookup(remote, "l2")
                    if result.stale is None or remote.stored_at > result.stale.stored_at:
                        result.stale = remote
        self.counters["misses"] += 1
        return result

    def _l1_get(self, key: str) -> Entry | None:
        entry = self._l1.get(key)
        if entry is None:
            return None
        if self.clock() - entry.stored_at >= self.settings.ttl_s + self.settings.stale_s:
            self._l1_drop(key)
            return None
        self._l1.move_to_end(key)
        return entry

    # ------------------------------------------------------------------ writes

    def store(self, key: str, entry: Entry) -> None:
        if len(entry.body) > self.settings.max_entry_bytes:
            return
        self._l1_put(key, entry)
        if self.l2 is None:
            return
        if len(self._writes) >= self.settings.max_pending_writes:
            self.counters["l2_writes_dropped"] += 1
            return
        task = asyncio.get_running_loop().create_task(
            self._l2_call(self.l2.set(key, entry.encode(), self.settings.ttl_s + self.settings.stale_s)))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        self.counters["l2_writes"] += 1

    def _l1_put(self, key: str, entry: Entry) -> None:
        if key in self._l1:
            self._l1_drop(key)
        if len(entry.body) > self.settings.l1_max_bytes:
            return  # it would evict every other entry and then itself; L2 may still hold it
        self._l1[key] = entry
        self._l1_bytes += len(entry.body)
        s = self.settings
        while self._l1 and (len(self._l1) > s.l1_max_entries or self._l1_bytes > s.l1_max_bytes):
            self._l1_drop(next(iter(self._l1)))

    def _l1_drop(self, key: str) -> None:
        entry = self._l1.pop(key)
        self._l1_bytes -= len(entry.body)

    # ------------------------------------------------------------------ Redis, guarded

    async def _l2_call(self, call: Awaitable[Any]) -> Any:
        """Run a Redis call under the breaker and the timeout; any failure is None (a miss)."""
        permit = self.l2_breaker.acquire()
        if permit is None:
            if asyncio.iscoroutine(call):
                call.close()
            return None
        t0 = self._monotonic()
        try:
            async with asyncio.timeout(self.settings.redis_timeout_s):  # no extra task, unlike wait_for
                result = await call
        except asyncio.CancelledError:
            # The request went away, which says nothing about Redis; but a half-open probe's slot must come
            # back, or the breaker stays half-open refusing every call and the cache never returns to Redis.
            self.l2_breaker.release(permit)
            raise
        except Exception as exc:  # redis errors, timeouts, protocol errors: all misses
            self.l2_breaker.record(permit, False, self._monotonic() - t0)
            self.counters["l2_errors"] += 1
            log.debug("redis call failed: %s", exc)
            return None
        self.l2_breaker.record(permit, True, self._monotonic() - t0)
        return result

    # ------------------------------------------------------------------ single flight

    async def single_flight(self, key: str, produce: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """Run ``produce`` once for concurrent callers with the same key; (result, whether this caller led).

        The leader runs ``produce`` itself — no extra task, and a future only once a follower comes. Its result
        or exception reaches every follower. A leader whose client goes away (cancelled) lets its followers go
        on: one of them leads a new call, so nobody is failed by someone else's disconnect."""
        while True:
            pending = self._inflight.get(key, _NOBODY)
            if pending is _NOBODY:
                self._inflight[key] = None
                try:
                    result = await produce()
                except BaseException as exc:
                    self._settle(key, None, exc if isinstance(exc, Exception) else LeaderGone())
                    raise
                self._settle(key, result, None)
                return result, True
            if pending is None:
                pending = self._inflight[key] = asyncio.get_running_loop().create_future()
            self.counters["coalesced"] += 1
            try:
                return await asyncio.shield(pending), False
            except LeaderGone:
                continue

    def _settle(self, key: str, result: Any, error: BaseException | None) -> None:
        pending = self._inflight.pop(key, None)
        if pending is None or pending.done():
            return
        if error is not None:
            pending.set_exception(error)
            pending.exception()  # retrieved: no "never retrieved" warning when every follower went away
        else:
            pending.set_result(result)

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=1.0)
        if self.l2 is not None:
            await self.l2.close()

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "l1_entries": len(self._l1), "l1_bytes": self._l1_bytes,
                "l2": None if self.l2 is None else self.l2_breaker.state}
