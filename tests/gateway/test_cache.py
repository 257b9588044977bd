"""gateway/cache.py: entries without their id, the canonical digest, L1 bounds and TTLs, a guarded L2, single flight.

Time is two fake clocks: the wall clock entries are stamped with and the monotonic one that drives the Redis
breaker. The L2 is :class:`MemoryL2`, a dict behind the ``L2Store`` protocol that can be told to fail or hang;
the only real waits are the Redis timeout itself (50 ms) in the tests that hang.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import Any, Literal

import orjson
import pytest

from gateway.cache import KEY_PREFIX, Entry, L2Store, Lookup, PredictionCache, digest
from gateway.settings import CacheSettings
from tests.gateway.support import FakeClock

Fault = Literal["none", "raise", "hang"]

JSON_RESPONSE = orjson.dumps({
    "id": "req-1", "model_name": "digits", "model_version": "1",
    "outputs": [{"name": "label", "datatype": "INT64", "shape": [1], "data": [3]}]})
TAIL = struct.pack("<10f", *(i / 10 for i in range(10)))  # probabilities, binary
BINARY_HEADER = orjson.dumps({
    "id": "req-1", "model_name": "digits", "model_version": "1",
    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 10],
                 "parameters": {"binary_data_size": len(TAIL)}}]})
REQUEST = {"id": "a", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


class MemoryL2:
    """The ``L2Store`` protocol over a dict, expiring on the test's wall clock like Redis would.

    ``fault`` switches it between healthy, raising on every call (Redis down) and never answering until
    ``released`` is set (Redis stopped answering). Every call is counted, refused or not."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[bytes, float]] = {}
        self.fault: Fault = "none"
        self.released = asyncio.Event()
        self.gets = 0
        self.sets = 0
        self.closed = False

    async def _maybe_fail(self) -> None:
        if self.fault == "raise":
            raise ConnectionError("redis is down")
        if self.fault == "hang":
            await self.released.wait()

    async def get(self, key: str) -> bytes | None:
        self.gets += 1
        await self._maybe_fail()
        item = self.data.get(key)
        if item is None or self.clock() >= item[1]:
            return None
        return item[0]

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self.sets += 1
        await self._maybe_fail()
        self.data[key] = (value, self.clock() + ttl_s)

    async def close(self) -> None:
        self.closed = True


def _l2_is_a_store(l2: MemoryL2) -> L2Store:
    return l2  # mypy checks here that MemoryL2 implements the protocol


@pytest.fixture
def mono() -> FakeClock:
    return FakeClock(50.0)


@pytest.fixture
def l2(clock: FakeClock) -> MemoryL2:
    return MemoryL2(clock)


def make(clock: FakeClock, mono: FakeClock, l2: MemoryL2 | None = None, **overrides: Any) -> PredictionCache:
    return PredictionCache(CacheSettings(**overrides), l2, clock, mono)


def entry(clock: FakeClock, version: str = "1", size: int | None = None) -> Entry:
    """A JSON entry stamped now; with ``size``, padded to exactly that many body bytes."""
    body = JSON_RESPONSE
    if size is not None:
        pad = size - len(b'{"pad":""}')
        assert pad >= 0
        body = orjson.dumps({"pad": "x" * pad})
    made = Entry.from_response(version, "application/json", None, body, clock())
    assert made is not None
    assert size is None or len(made.body) == size
    return made


def key(name: str, version: str = "1") -> str:
    return PredictionCache.key("digits", version, name)


async def until(condition: Callable[[], bool], limit: int = 1000) -> None:
    """Let other tasks run until ``condition`` holds (no fixed sleeps)."""
    for _ in range(limit):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


# ---------------------------------------------------------------------------------------------------- Entry


def test_json_response_is_stored_without_its_id() -> None:
    made = Entry.from_response("1", "application/json", None, JSON_RESPONSE, 1234.5)
    assert made is not None
    expected = orjson.loads(JSON_RESPONSE)
    del expected["id"]
    assert orjson.loads(made.body) == expected
    assert (made.version, made.content_type, made.header_length, made.stored_at) == (
        "1", "application/json", None, 1234.5)


def test_binary_response_loses_the_id_from_its_json_header_and_keeps_the_tail() -> None:
    body = BINARY_HEADER + TAIL
    made = Entry.from_response("1", "application/octet-stream", str(len(BINARY_HEADER)), body, 1.0)
    assert made is not None
    assert made.header_length is not None
    assert made.header_length == len(made.body) - len(TAIL)
    header = orjson.loads(made.body[:made.header_length])
    assert "id" not in header and header["outputs"] == orjson.loads(BINARY_HEADER)["outputs"]
    assert made.body[made.header_length:] == TAIL


@pytest.mark.parametrize("request_id", ["new-id", 'ré"q\\\u2603'])  # escapes and multi-byte UTF-8 shift the length
def test_render_splices_the_new_id_first_and_keeps_the_rest(request_id: str) -> None:
    made = Entry.from_response("1", "application/json", None, JSON_RESPONSE, 1.0)
    assert made is not None
    body, header_length = made.render(request_id)
    assert header_length is None
    assert body.startswith(b'{"id":' + orjson.dumps(request_id) + b",")
    doc = orjson.loads(body)
    assert doc == {**orjson.loads(JSON_RESPONSE), "id": request_id}
    assert next(iter(doc)) == "id"


@pytest.mark.parametrize("request_id", ["new-id", 'ré"q\\\u2603'])
def test_render_of_a_binary_response_fixes_the_header_length(request_id: str) -> None:
    made = Entry.from_response("1", "application/octet-stream", str(len(BINARY_HEADER)), BINARY_HEADER + TAIL, 1.0)
    assert made is not None
    body, header_length = made.render(request_id)
    assert header_length is not None and header_length == len(body) - len(TAIL)
    assert orjson.loads(body[:header_length]) == {**orjson.loads(BINARY_HEADER), "id": request_id}
    assert body[header_length:] == TAIL
    assert struct.unpack("<10f", body[header_length:]) == struct.unpack("<10f", TAIL)


def test_render_without_an_id_is_the_stored_body() -> None:
    made = Entry.from_response("1", "application/octet-stream", str(len(BINARY_HEADER)), BINARY_HEADER + TAIL, 1.0)
    assert made is not None
    body, header_length = made.render(None)
    assert (body, header_length) == (made.body, made.header_length)
    assert header_length is not None and "id" not in orjson.loads(body[:header_length])


def test_a_response_that_was_only_its_id() -> None:
    made = Entry.from_response("1", "application/json", None, b'{"id":"x"}', 1.0)
    assert made is not None and made.body == b"{}"
    assert made.render(None) == (b"{}", None)
    body, _ = made.render("y")
    assert body == b'{"id":"y"}' and orjson.loads(body) == {"id": "y"}

    binary = Entry.from_response("1", "application/octet-stream", "10", b'{"id":"x"}' + TAIL, 1.0)
    assert binary is not None and binary.body == b"{}" + TAIL and binary.header_length == 2
    body, header_length = binary.render("y")
    assert header_length == len(b'{"id":"y"}') and body == b'{"id":"y"}' + TAIL


@pytest.mark.parametrize("body,header_length", [
    (b"upstream connect error", None), (b"", None), (b"\xff\xfe", None), (b"[1, 2]", None), (b'"text"', None),
    (b"not json" + TAIL, "8"), (BINARY_HEADER + TAIL, "abc"), (BINARY_HEADER + TAIL, "-1"),
    (BINARY_HEADER + TAIL, str(len(BINARY_HEADER + TAIL) + 1)),
])
def test_a_body_that_is_not_a_json_object_is_not_cacheable(body: bytes, header_length: str | None) -> None:
    assert Entry.from_response("1", "text/plain", header_length, body, 1.0) is None


def test_encode_decode_round_trip() -> None:
    for made in (Entry.from_response("v-2", "application/json", None, JSON_RESPONSE, 1717171717.123456),
                 Entry.from_response("3", "application/octet-stream", str(len(BINARY_HEADER)),
                                     BINARY_HEADER + TAIL, 0.5)):
        assert made is not None
        assert Entry.decode(made.encode()) == made


# ---------------------------------------------------------------------------------------------------- digest


def d(header: dict[str, Any], binary: bytes = b"") -> str:
    """The digest of ``header`` sent compactly, as the request path computes it from the body's bytes."""
    head = orjson.dumps(header)
    rid = header.get("id")
    return digest(head + binary, str(len(head)) if binary else None, rid if isinstance(rid, str) else None)


def test_the_same_bytes_with_another_id_or_none_have_one_digest() -> None:
    inputs = b'"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]'
    no_id = digest(b"{" + inputs + b"}", None, None)
    assert digest(b'{"id":"a",' + inputs + b"}", None, "a") == no_id  # id first
    assert digest(b"{" + inputs + b',"id":"some-much-longer-id-42"}', None, "some-much-longer-id-42") == no_id
    spaced = b'{ "id" : "x", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2]}]}'
    assert digest(spaced, None, "x") == digest(spaced.replace(b'"x"', b'"y"'), None, "y")
    assert digest(b'{"id":"a"}', None, "a") == digest(b"{}", None, None)


def test_the_digest_is_of_the_bytes_sent() -> None:
    """No re-serialisation: other spacing is another key (a miss, never a wrong answer)."""
    compact = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'
    spaced = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'
    assert digest(compact, None, None) == digest(compact, None, None)
    assert digest(compact, None, None) != digest(spaced, None, None)


def test_an_id_that_cannot_be_cut_out_cleanly_keeps_the_whole_body() -> None:
    """Two ``"id":`` members (one nested in parameters): the id is not guessed at, the whole body is hashed."""
    body = b'{"id":"a","parameters":{"id":"a"},"inputs":[]}'
    other = b'{"id":"b","parameters":{"id":"a"},"inputs":[]}'
    assert digest(body, None, "a") != digest(other, None, "b")


def _changed(path: str, value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(orjson.dumps(REQUEST))
    target: Any = doc
    *parents, last = path.split(".")
    for part in parents:
        target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
    target[last] = value
    return doc


@pytest.mark.parametrize("path,value", [
    ("inputs.0.data", [1, 2, 3, 5]),
    ("inputs.0.shape", [2, 2]),
    ("inputs.0.datatype", "FP64"),
    ("inputs.0.name", "other"),
    ("inputs.0.parameters", {"binary_data_size": 16}),
    ("outputs", [{"name": "label"}]),
    ("parameters", {"binary_data_output": True}),
])
def test_what_changes_the_prediction_changes_the_digest(path: str, value: Any) -> None:
    assert d(_changed(path, value)) != d(REQUEST)


def test_requested_outputs_and_binary_output_are_distinguished_from_each_other() -> None:
    variants = [REQUEST, _changed("outputs", [{"name": "label"}]), _changed("outputs", [{"name": "probabilities"}]),
                _changed("parameters", {"binary_data_output": True}),
                _changed("parameters", {"binary_data_output": False})]
    assert len({d(v) for v in variants}) == len(variants)


def test_the_binary_tail_and_its_split_are_in_the_digest() -> None:
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                          "parameters": {"binary_data_size": 16}}]}
    assert d(header, struct.pack("<4f", 1, 2, 3, 4)) != d(header, struct.pack("<4f", 1, 2, 3, 5))
    assert d(header, struct.pack("<4f", 1, 2, 3, 4)) == d(header, struct.pack("<4f", 1, 2, 3, 4))
    raw = orjson.dumps(header) + struct.pack("<4f", 1, 2, 3, 4)
    assert digest(raw, "10", None) != digest(raw, "11", None)


# ---------------------------------------------------------------------------------------------------- L1


async def test_second_lookup_is_an_l1_hit(clock: FakeClock, mono: FakeClock) -> None:
    cache = make(clock, mono)
    assert await cache.lookup(key("a"), "1") == Lookup()
    stored = entry(clock)
    cache.store(key("a"), stored)
    found = await cache.lookup(key("a"), "1")
    assert found.entry is stored and found.tier == "l1" and found.stale is None
    stats = cache.stats()
    assert (stats["l1_hits"], stats["misses"], stats["l1_entries"], stats["l1_bytes"]) == (1, 1, 1, len(stored.body))
    assert stats["l2"] is None


async def test_l1_evicts_the_least_recently_used_entry_by_count(clock: FakeClock, mono: FakeClock) -> None:
    cache = make(clock, mono, l1_max_entries=3)
    for name in "abc":
        cache.store(key(name), entry(clock))
    assert (await cache.lookup(key("a"), "1")).entry is not None  # a is now the most recently used
    cache.store(key("d"), entry(clock))
    hits = {name: (await cache.lookup(key(name), "1")).entry is not None for name in "abcd"}
    assert hits == {"a": True, "b": False, "c": True, "d": True}
    assert cache.stats()["l1_entries"] == 3


async def test_l1_evicts_by_bytes(clock: FakeClock, mono: FakeClock) -> None:
    cache = make(clock, mono, l1_max_bytes=1024)
    for name in "abc":
        cache.store(key(name), entry(clock, size=400))
    assert cache.stats()["l1_bytes"] == 800 and cache.stats()["l1_entries"] == 2
    assert (await cache.lookup(key("a"), "1")).entry is None
    assert (await cache.lookup(key("c"), "1")).entry is not None
    cache.store(key("c"), entry(clock, size=100))  # replacing an entry replaces its bytes
    assert cache.stats()["l1_bytes"] == 500


async def test_an_entry_larger_than_l1_does_not_flush_l1(clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    cache = make(clock, mono, l2, l1_max_bytes=1024, max_entry_bytes=4096)
    cache.store(key("small"), entry(clock, size=400))
    cache.store(key("big"), entry(clock, size=2000))  # cacheable, but larger than all of L1
    assert (await cache.lookup(key("small"), "1")).tier == "l1"
    assert cache.stats()["l1_bytes"] == 400
    await cache.close()
    assert (await cache.lookup(key("big"), "1")).tier == "l2"  # it still went to the shared tier


async def test_ttl_then_stale_grace_then_gone(clock: FakeClock, mono: FakeClock) -> None:
    cache = make(clock, mono, ttl_s=10, stale_s=20)
    stored = entry(clock)
    cache.store(key("a"), stored)
    clock.advance(9.999)
    assert (await cache.lookup(key("a"), "1")).entry is stored
    clock.advance(0.001)  # exactly ttl: expired
    found = await cache.lookup(key("a"), "1")
    assert found.entry is None and found.tier is None and found.stale is stored
    clock.advance(19.999)
    assert (await cache.lookup(key("a"), "1")).stale is stored
    clock.advance(0.001)  # ttl + stale: gone
    assert await cache.lookup(key("a"), "1") == Lookup()
    assert cache.stats()["l1_entries"] == 0 and cache.stats()["l1_bytes"] == 0


async def test_no_stale_grace_means_no_stale_answer(clock: FakeClock, mono: FakeClock) -> None:
    cache = make(clock, mono, ttl_s=10, stale_s=0)
    cache.store(key("a"), entry(clock))
    clock.advance(10)
    assert await cache.lookup(key("a"), "1") == Lookup()


async def test_another_version_is_neither_a_hit_nor_stale(clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    cache = make(clock, mono, l2, ttl_s=10, stale_s=20)
    cache.store(key("a"), entry(clock, version="1"))
    await cache.close()
    assert await cache.lookup(key("a"), "2") == Lookup()  # neither L1 nor L2 answers for version 2
    clock.advance(15)
    assert await cache.lookup(key("a"), "2") == Lookup()
    assert (await cache.lookup(key("a"), "1")).stale is not None


async def test_entries_over_max_entry_bytes_are_not_stored(clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    cache = make(clock, mono, l2, max_entry_bytes=100)
    cache.store(key("big"), entry(clock, size=101))
    cache.store(key("fits"), entry(clock, size=100))
    await cache.close()
    assert (await cache.lookup(key("big"), "1")).entry is None
    assert (await cache.lookup(key("fits"), "1")).tier == "l1"
    assert l2.sets == 1 and list(l2.data) == [key("fits")]


def test_keys_carry_the_prefix_model_and_version_never_a_color() -> None:
    assert PredictionCache.key("digits", "2", "abc") == f"{KEY_PREFIX}digits:2:abc"
    assert KEY_PREFIX == "bluegreen:cache:"


# ---------------------------------------------------------------------------------------------------- L2


async def test_writes_go_to_l2_in_the_background(clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    cache = make(clock, mono, l2, ttl_s=10, stale_s=20)
    stored = entry(clock)
    cache.store(key("a"), stored)
    assert l2.sets == 0  # store returned before Redis was touched
    await cache.close()
    assert l2.sets == 1 and l2.closed
    value, expires = l2.data[key("a")]
    assert Entry.decode(value) == stored and expires == clock() + 30
    assert cache.stats()["l2_writes"] == 1


async def test_l2_hit_fills_l1(clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    writer = make(clock, mono, l2)  # another gateway process on the same Redis
    stored = entry(clock)
    writer.store(key("a"), stored)
    await writer.close()

    cache = make(clock, mono, l2)
    first = await cache.lookup(key("a"), "1")
    assert first.tier == "l2" and first.entry == stored
    second = await cache.lookup(key("a"), "1")
    assert second.tier == "l1" and second.entry == stored
    assert l2.gets == 1  # the second lookup never reached Redis
    stats = cache.stats()
    assert (stats["l2_hits"], stats["l1_hits"], stats["misses"], stats["l2"]) == (1, 1, 0, "closed")


async def test_a_stale_l2_entry_answers_only_as_stale(clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    writer = make(clock, mono, l2, ttl_s=10, stale_s=20)
    writer.store(key("a"), entry(clock))
    await writer.close()
    clock.advance(15)
    cache = make(clock, mono, l2, ttl_s=10, stale_s=20)
    found = await cache.lookup(key("a"), "1")
    assert found.entry is None and found.stale is not None and found.stale.version == "1"
    assert cache.stats()["l1_entries"] == 0  # a stale remote entry is not copied into L1


@pytest.mark.parametrize("raw", [b"", b"\x00\x00", b"\x00\x00\x00\x04nope", b"\x00\x00\x00\x02{}",
                                 b"\x00\x00\x00\x03[1]", b"\xff\xff\xff\xff"])
async def test_garbage_in_l2_is_a_miss(clock: FakeClock, mono: FakeClock, l2: MemoryL2, raw: bytes) -> None:
    l2.data[key("a")] = (raw, clock() + 100)
    cache = make(clock, mono, l2)
    assert await cache.lookup(key("a"), "1") == Lookup()


async def test_a_failing_l2_is_a_miss_then_the_breaker_stops_calling_it(
        clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    cache = make(clock, mono, l2, redis_open_s=2.0)
    cache.store(key("local"), entry(clock))
    await until(lambda: l2.sets == 1)  # written while Redis was healthy
    l2.fault = "raise"
    l2.data.clear()
    calls = 0
    while cache.stats()["l2"] == "closed":
        assert await cache.lookup(key("a"), "1") == Lookup()
        calls += 1
        assert calls <= 20, "the breaker never opened"
    assert l2.gets == calls and cache.stats()["l2_errors"] == calls
    # Open: no Redis call at all, reads or writes, and L1 still answers.
    for _ in range(10):
        assert await cache.lookup(key("a"), "1") == Lookup()
    cache.store(key("b"), entry(clock))
    await cache.close()
    assert l2.gets == calls and l2.sets == 1
    assert (await cache.lookup(key("local"), "1")).tier == "l1"
    # After redis_open_s, one probe: Redis is back, so it closes and writes/hits resume.
    mono.advance(1.999)
    await cache.lookup(key("a"), "1")
    assert l2.gets == calls
    mono.advance(0.001)
    l2.fault = "none"
    await cache.lookup(key("a"), "1")
    assert l2.gets == calls + 1 and cache.stats()["l2"] == "closed"
    cache.store(key("c"), entry(clock))
    await cache.close()
    assert key("c") in l2.data


async def test_a_failed_probe_opens_the_breaker_again(clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    cache = make(clock, mono, l2, redis_open_s=5.0)
    l2.fault = "raise"
    while cache.stats()["l2"] == "closed":
        await cache.lookup(key("a"), "1")
    before = l2.gets
    mono.advance(5)
    await cache.lookup(key("a"), "1")  # the probe, failing
    assert l2.gets == before + 1 and cache.stats()["l2"] == "open"
    await cache.lookup(key("a"), "1")
    assert l2.gets == before + 1


@pytest.mark.exclusive
async def test_a_hanging_l2_read_is_a_miss_within_the_timeout(clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    cache = make(clock, mono, l2, redis_timeout_s=0.05)
    l2.fault = "hang"
    started = time.perf_counter()
    assert await cache.lookup(key("a"), "1") == Lookup()
    elapsed = time.perf_counter() - started
    assert 0.04 <= elapsed < 0.5, elapsed  # the 50 ms timeout, not forever (margin for a busy machine)
    assert l2.gets == 1 and cache.stats()["l2_errors"] == 1


async def test_a_cancelled_probe_does_not_leave_the_breaker_half_open_for_good(
        clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    """A request whose client goes away while its lookup is the half-open probe must give the probe slot back;
    otherwise every later call is refused and the cache never returns to Redis."""
    cache = make(clock, mono, l2, redis_open_s=2.0)
    l2.fault = "raise"
    while cache.stats()["l2"] == "closed":
        await cache.lookup(key("a"), "1")
    mono.advance(2)
    l2.fault = "hang"
    before = l2.gets
    probe = asyncio.create_task(cache.lookup(key("a"), "1"))
    await until(lambda: l2.gets == before + 1)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    l2.fault = "none"
    l2.data[key("a")] = (entry(clock).encode(), clock() + 100)
    assert (await cache.lookup(key("a"), "1")).tier == "l2"
    assert cache.stats()["l2"] == "closed"


async def test_pending_writes_are_bounded(clock: FakeClock, mono: FakeClock, l2: MemoryL2) -> None:
    cache = make(clock, mono, l2, max_pending_writes=2)
    l2.fault = "hang"
    for name in "abc":
        cache.store(key(name), entry(clock))
    stats = cache.stats()
    assert (stats["l2_writes"], stats["l2_writes_dropped"], stats["l1_entries"]) == (2, 1, 3)
    l2.released.set()  # Redis answers again
    await cache.close()
    assert sorted(l2.data) == [key("a"), key("b")]
    cache.store(key("d"), entry(clock))  # room again
    await cache.close()
    assert key("d") in l2.data and cache.stats()["l2_writes_dropped"] == 1


# ---------------------------------------------------------------------------------------------------- single flight


class Work:
    """An upstream call that waits for ``go`` and counts how often it ran and whether it was cancelled."""

    def __init__(self, fail: bool = False) -> None:
        self.go = asyncio.Event()
        self.runs = 0
        self.cancelled = False
        self.fail = fail
        self.result = object()

    async def __call__(self) -> object:
        self.runs += 1
        try:
            await self.go.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise RuntimeError("both colors failed")
        return self.result


async def test_fifty_identical_misses_make_one_call(clock: FakeClock, mono: FakeClock) -> None:
    cache = make(clock, mono)
    work = Work()
    callers = [asyncio.create_task(cache.single_flight("k", work)) for _ in range(50)]
    await until(lambda: cache.counters["coalesced"] == 49)
    work.go.set()
    results = await asyncio.gather(*callers)
    assert work.runs == 1
    assert [leader for _, leader in results].count(True) == 1
    assert all(result is work.result for result, _ in results)
    assert results[0][1]  # the first caller led


async def test_an_exception_reaches_every_caller(clock: FakeClock, mono: FakeClock) -> None:
    cache = make(clock, mono)
    work = Work(fail=True)
    callers = [asyncio.create_task(cache.single_flight("k", work)) for _ in range(50)]
    await until(lambda: cache.counters["coalesced"] == 49)
    work.go.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert work.runs == 1
    assert all(isinstance(r, RuntimeError) for r in results)
    assert len({id(r) for r in results}) == 1  # the same failure, not 50 calls


async def test_a_leader_that_goes_away_does_not_fail_its_followers(clock: FakeClock, mono: FakeClock) -> None:
    """The leader's call goes with its client; the followers carry on, one of them leading a new call."""
    cache = make(clock, mono)
    work = Work()
    leader = asyncio.create_task(cache.single_flight("k", work))
    followers = [asyncio.create_task(cache.single_flight("k", work)) for _ in range(5)]
    await until(lambda: cache.counters["coalesced"] == 5 and work.runs == 1)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    await until(lambda: work.runs == 2)  # one follower leads again; the other four follow it
    work.go.set()
    results = await asyncio.gather(*followers)
    assert all(result is work.result for result, _ in results)
    assert [led for _, led in results].count(True) == 1


async def test_nothing_is_left_in_flight_when_every_caller_went_away(clock: FakeClock, mono: FakeClock) -> None:
    cache = make(clock, mono)
    work = Work()
    callers = [asyncio.create_task(cache.single_flight("k", work)) for _ in range(3)]
    await until(lambda: work.runs == 1 and cache.counters["coalesced"] == 2)
    for caller in callers:
        caller.cancel()
    await asyncio.gather(*callers, return_exceptions=True)
    assert not cache._inflight  # private, but the only view of the work in flight
    assert work.cancelled  # nobody waits for it any more: the call went with its client


async def test_different_keys_run_independently(clock: FakeClock, mono: FakeClock) -> None:
    cache = make(clock, mono)
    slow, fast = Work(), Work()
    a = asyncio.create_task(cache.single_flight("a", slow))
    b = asyncio.create_task(cache.single_flight("b", fast))
    await until(lambda: slow.runs == 1 and fast.runs == 1)
    fast.go.set()
    assert await b == (fast.result, True)
    assert not a.done()
    slow.go.set()
    assert await a == (slow.result, True)
    assert cache.counters["coalesced"] == 0


@pytest.mark.parametrize("fail", [False, True])
async def test_the_key_is_free_once_the_work_is_done(clock: FakeClock, mono: FakeClock, fail: bool) -> None:
    cache = make(clock, mono)
    first = Work(fail=fail)
    first.go.set()
    if fail:
        with pytest.raises(RuntimeError):
            await cache.single_flight("k", first)
    else:
        assert await cache.single_flight("k", first) == (first.result, True)
    second = Work()
    second.go.set()
    assert await cache.single_flight("k", second) == (second.result, True)
    assert first.runs == second.runs == 1 and cache.counters["coalesced"] == 0
