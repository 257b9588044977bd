"""Client keys on the prediction API: who may call which model, and how fast.

``BLUEGREEN_CLIENT_KEYS_FILE`` names a YAML file with one entry per client app::

    mobile-app:
      key_sha256: "<hex sha256 of the key>"   # keys are never stored in clear
      models: ["digits"]                        # or ["*"]
      rate_per_s: 50                            # sustained; omit for no limit
      burst: 100                                # default: one second's worth

With the file set, every data-plane request but the health checks must carry ``Authorization: Bearer <key>`` or
``x-api-key: <key>``. The gateway hashes what it is given (SHA-256: a key is 256 random bits, so a fast hash is
the right one — there is nothing to brute-force) and looks the digest up: a missing or unknown key is 401, a model
the key may not use 403 (whether or not the model exists: a key learns nothing about other clients' models), a
request over the key's rate 429 with ``Retry-After`` and ``RateLimit-Limit`` / ``-Remaining`` / ``-Reset``. Each
is decided before any backend is called. The file is re-read when it changes (checked every second); a file that
no longer parses is logged and the keys it replaced stay in force, so a typo locks nobody out.

Rates are token buckets. One gateway keeps them in process. Replicas sharing Redis draw from one bucket per
client in Redis, leasing tokens in batches (a tenth of a second's worth, at least one) so a request costs no
Redis round trip until its replica's lease runs out; a lease unspent after a second lapses, so a replica that
stops receiving a client's traffic cannot hoard its rate. When Redis fails, each replica limits the client
locally at the full rate (answers keep flowing; the limit is then per replica) and tries Redis again after two
seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from gateway.errors import Forbidden, TooManyRequests, Unauthorized
from gateway.policy import describe

log = logging.getLogger(__name__)

LEASE_S = 1.0
"""How long leased tokens may be spent; what is left after that lapses."""
LEASE_SHARE = 0.1
"""A lease is this many seconds of the client's rate (at least one token, at most its burst)."""
REDIS_RETRY_S = 2.0
"""After a failed Redis call, limit locally this long before trying Redis again."""
_PREFIX = "bluegreen:ratelimit:"


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key_sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
    models: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    rate_per_s: Annotated[float, Field(gt=0, le=1e6)] | None = None
    burst: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = None


@dataclass(frozen=True, slots=True)
class ClientKey:
    """One client app: its name (what metrics and logs show: never the key), models, rate and burst."""

    name: str
    models: frozenset[str]
    rate_per_s: float | None = None
    burst: int = 1

    def may_call(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def load_keys(path: Path) -> dict[bytes, ClientKey]:
    """The keys file as digest -> client; ValueError names the entry and field that is wrong."""
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping of client name to its entry")
    keys: dict[bytes, ClientKey] = {}
    for name, raw in doc.items():
        try:
            entry = KeyEntry.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"{path}: {name}: {describe(exc)}") from None
        digest = bytes.fromhex(entry.key_sha256)
        if digest in keys:
            raise ValueError(f"{path}: {name}: the same key as {keys[digest].name}")
        burst = entry.burst or max(1, math.ceil(entry.rate_per_s or 1))
        keys[digest] = ClientKey(str(name), frozenset(entry.models), entry.rate_per_s, burst)
    return keys


def new_key(name: str, models: list[str], rate_per_s: float | None = None, burst: int | None = None
            ) -> tuple[str, str]:
    """A fresh key (shown once, never stored) and the keys-file entry that holds its hash."""
    key = "bg_" + secrets.token_urlsafe(32)
    entry: dict[str, Any] = {"key_sha256": hashlib.sha256(key.encode()).hexdigest(), "models": models}
    if rate_per_s is not None:
        entry["rate_per_s"] = rate_per_s
    if burst is not None:
        entry["burst"] = burst
    try:
        KeyEntry.model_validate(entry)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None
    return key, yaml.safe_dump({name: entry}, default_flow_style=None, sort_keys=False)


# ------------------------------------------------------------------------------------------------- rates


@dataclass(slots=True)
class Bucket:
    """A token bucket: ``rate`` tokens a second up to ``burst``; starts full."""

    rate: float
    burst: float
    tokens: float
    last: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait_s(self) -> float:
        """Until the next token."""
        return max(0.0, (1 - self.tokens) / self.rate)

    def full_in_s(self) -> float:
        return max(0.0, (self.burst - self.tokens) / self.rate)


# A token bucket in Redis: refill by the server's clock (one clock for every replica), grant up to ARGV[3]
# tokens, and say how long until the next token. Returns {granted, tokens left * 1000, ms until one token}.
_LEASE_SCRIPT = """
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if tokens == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
local wait = 0
if tokens < 1 then wait = math.ceil((1 - tokens) / rate * 1000) end
return {granted, math.floor(tokens * 1000), wait}
"""


@dataclass(slots=True)
class _Lease:
    tokens: int = 0
    expires: float = 0.0
    wait_s: float = 0.0
    remaining: float = 0.0
    empty_until: float = 0.0
    fetching: asyncio.Future[None] | None = None


@dataclass
class RateLimiter:
    """Per-client token buckets: in process, or (``redis`` set) shared through Redis with leased batches."""

    redis: Any = None
    clock: Callable[[], float] = time.monotonic
    local: dict[str, Bucket] = field(default_factory=dict)
    leases: dict[str, _Lease] = field(default_factory=dict)
    redis_down_until: float = float("-inf")

    async def admit(self, client: ClientKey) -> None:
        """Take one token for ``client`` or raise 429 with the rate-limit headers."""
        if client.rate_per_s is None:
            return
        now = self.clock()
        if self.redis is not None and now >= self.redis_down_until:
            lease = self.leases.get(client.name)
            if lease is not None:
                if lease.tokens > 0 and now < lease.expires:
                    lease.tokens -= 1
                    return
                if now < lease.empty_until:  # the shared bucket was empty: no Redis call until a token is due
                    raise self._refusal(client, lease.empty_until - now, 0, client.burst / client.rate_per_s)
            if await self._lease(client, now):
                return
            if now >= self.redis_down_until:  # Redis answered: the shared bucket is empty
                lease = self.leases[client.name]
                raise self._refusal(client, lease.wait_s, lease.remaining, client.burst / client.rate_per_s)
        bucket = self.local.get(client.name)
        if bucket is None or bucket.rate != client.rate_per_s or bucket.burst != client.burst:
            bucket = self.local[client.name] = Bucket(client.rate_per_s, client.burst, client.burst, now)
        if not bucket.take(now):
            raise self._refusal(client, bucket.wait_s(), bucket.tokens, bucket.full_in_s())

    async def _lease(self, client: ClientKey, now: float) -> bool:
        """Fetch a batch of tokens (one fetch per client at a time; the others wait for it); True when this
        request got one. On a Redis failure, marks Redis down and returns False."""
        assert client.rate_per_s is not None
        lease = self.leases.setdefault(client.name, _Lease())
        if lease.fetching is not None:
            await asyncio.shield(lease.fetching)
            if lease.tokens > 0 and self.clock() < lease.expires:
                lease.tokens -= 1
                return True
            if self.clock() < self.redis_down_until or (lease.tokens == 0 and lease.wait_s > 0):
                return False
        want = max(1, min(client.burst, math.ceil(client.rate_per_s * LEASE_SHARE)))
        lease.fetching = asyncio.get_running_loop().create_future()
        try:
            granted, left_milli, wait_ms = await asyncio.wait_for(
                self.redis.eval(_LEASE_SCRIPT, 1, f"{_PREFIX}{client.name}", client.rate_per_s, client.burst, want),
                timeout=0.25)
        except Exception as exc:
            self.redis_down_until = self.clock() + REDIS_RETRY_S
            log.warning("rate limits fall back to per-replica buckets for %.0fs: Redis failed (%s)",
                        REDIS_RETRY_S, type(exc).__name__)
            return False
        finally:
            done, lease.fetching = lease.fetching, None
            done.set_result(None)
        lease.tokens, lease.expires = int(granted), now + LEASE_S
        lease.wait_s, lease.remaining = int(wait_ms) / 1000, int(left_milli) / 1000
        lease.empty_until = now + lease.wait_s if lease.tokens == 0 else 0.0
        if lease.tokens > 0:
            lease.tokens -= 1
            return True
        return False

    @staticmethod
    def _refusal(client: ClientKey, wait_s: float, remaining: float, reset_s: float) -> TooManyRequests:
        error = TooManyRequests(f"client {client.name!r} is over its rate of {client.rate_per_s:g} requests/s "
                                f"(burst {client.burst})", math.ceil(wait_s))
        error.headers.update({"ratelimit-limit": str(client.burst), "ratelimit-remaining": str(int(remaining)),
                              "ratelimit-reset": str(max(1, math.ceil(reset_s)))})
        return error


# ------------------------------------------------------------------------------------------------- the gate


class ClientGate:
    """The data listener's check: the key (401), the model (403), the rate (429); and the numbers of each."""

    def __init__(self, path: Path, limiter: RateLimiter | None = None,
                 on_failure: Callable[[str], None] = lambda reason: None) -> None:
        self.path = path
        self.limiter = limiter or RateLimiter()
        self.on_failure = on_failure
        self.keys = load_keys(path)  # at start-up a bad file is fatal: better than serving without keys
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when new keys took effect."""
        seen = self._signature()
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            self.keys = load_keys(self.path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.error("client keys file %s not reloaded, the previous keys stay in force: %s", self.path, exc)
            return False
        log.info("client keys reloaded from %s: %d clients", self.path, len(self.keys))
        return True

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> ClientKey:
        presented: bytes | None = None
        for name, value in headers:
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer" and rest.strip():
                    presented = rest.strip()
                    break
            elif name == b"x-api-key" and value:
                presented = value.strip()
                break
        if presented is None:
            self.on_failure("missing")
            raise Unauthorized("an API key is required: send Authorization: Bearer <key> or x-api-key: <key>",
                               realm="bluegreen")
        client = self.keys.get(hashlib.sha256(presented).digest())
        if client is None:
            self.on_failure("unknown")
            raise Unauthorized("unknown API key", realm="bluegreen")
        return client

    def authorize(self, client: ClientKey, model: str) -> None:
        if not client.may_call(model):
            self.on_failure("forbidden")
            raise Forbidden(f"client {client.name!r} may not call model {model!r}")

    async def limit(self, client: ClientKey) -> None:
        try:
            await self.limiter.admit(client)
        except TooManyRequests:
            self.on_failure("rate_limited")
            raise


def rate_redis(url: str) -> Any:
    """The rate limiter's own Redis client: short timeouts and no retries (a slow Redis must fall back to local
    limits at once, not hold requests)."""
    from redis.asyncio import Redis

    return Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25, max_connections=64)
