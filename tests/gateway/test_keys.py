"""gateway/keys.py: the keys file, the key check, token buckets in process and shared through a real redis-server.

The data app's refusals (401/403/429) are checked in process on the gateway fixture, whose upstream is never
started: a refused request that reached a backend would fail loudly. tests/integration/test_access.py drives the
same through real gateway processes, two replicas and Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest
import yaml

from gateway.app import Gateway
from gateway.data_app import DataApp
from gateway.errors import Forbidden, TooManyRequests, Unauthorized
from gateway.keys import Bucket, ClientGate, ClientKey, RateLimiter, load_keys, new_key, rate_redis
from tests.procs import start_redis

KEY_A = "bg_test-key-of-app-a-0123456789abcdef"
KEY_B = "bg_test-key-of-app-b-0123456789abcdef"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_file(tmp_path: Path, entries: dict[str, dict[str, object]]) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def two_apps(tmp_path: Path, rate: float | None = None, burst: int | None = None) -> Path:
    a: dict[str, object] = {"key_sha256": sha(KEY_A), "models": ["digits"]}
    if rate is not None:
        a["rate_per_s"] = rate
    if burst is not None:
        a["burst"] = burst
    return keys_file(tmp_path, {"app-a": a, "app-b": {"key_sha256": sha(KEY_B), "models": ["*"]}})


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


# ------------------------------------------------------------------------------------------------ the file


def test_new_key_prints_an_entry_that_loads_and_matches_the_key(tmp_path: Path) -> None:
    key, entry = new_key("mobile-app", ["digits"], 50, 100)
    assert key.startswith("bg_") and len(key) > 40 and key not in entry
    path = tmp_path / "keys.yaml"
    path.write_text(entry)
    loaded = load_keys(path)
    assert loaded == {hashlib.sha256(key.encode()).digest(): ClientKey("mobile-app", frozenset({"digits"}), 50, 100)}
    assert new_key("x", ["*"])[0] != new_key("x", ["*"])[0]


def test_the_keys_new_command_prints_the_key_once_and_an_entry_that_holds_its_hash(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["keys", "new", "mobile-app", "--models", "digits,wide", "--rate", "50", "--burst", "100"]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[0].rsplit(" ", 1)[1]
    path = tmp_path / "keys.yaml"
    path.write_text(out.split("\n", 2)[2])
    (client,) = ClientGate(path).keys.values()
    assert ClientGate(path).authenticate(bearer(key)) == client
    assert client == ClientKey("mobile-app", frozenset({"digits", "wide"}), 50, 100)
    assert out.count(key) == 1
    assert main(["keys", "new", "x", "--models", "digits", "--rate", "-1"]) == 2
    assert "rate_per_s: Input should be greater than 0" in capsys.readouterr().err


@pytest.mark.parametrize(("entry", "message"), [
    ({"key_sha256": "abc", "models": ["*"]}, "app: key_sha256"),
    ({"key_sha256": sha(KEY_A), "models": []}, "app: models"),
    ({"key_sha256": sha(KEY_A), "models": ["*"], "rate_per_s": 0}, "app: rate_per_s"),
    ({"key_sha256": sha(KEY_A), "models": ["*"], "burst": 0}, "app: burst"),
    ({"key_sha256": sha(KEY_A), "models": ["*"], "key": KEY_A}, "app: key: unknown field"),
])
def test_a_bad_entry_is_named(tmp_path: Path, entry: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        load_keys(keys_file(tmp_path, {"app": entry}))
    assert KEY_A not in str(caught.value)


def test_the_same_key_twice_is_refused(tmp_path: Path) -> None:
    entry = {"key_sha256": sha(KEY_A), "models": ["*"]}
    with pytest.raises(ValueError, match="the same key as"):
        load_keys(keys_file(tmp_path, {"one": entry, "two": entry}))


def test_burst_defaults_to_a_seconds_worth(tmp_path: Path) -> None:
    clients = {c.name: c for c in load_keys(two_apps(tmp_path, rate=50)).values()}
    assert clients["app-a"].burst == 50


# ------------------------------------------------------------------------------------------------ the check


def test_keys_are_read_from_either_header_and_checked_by_model(tmp_path: Path) -> None:
    failures: list[str] = []
    gate = ClientGate(two_apps(tmp_path), on_failure=failures.append)
    assert gate.authenticate(bearer(KEY_A)).name == "app-a"
    assert gate.authenticate([(b"x-api-key", KEY_B.encode())]).name == "app-b"
    with pytest.raises(Unauthorized, match="an API key is required"):
        gate.authenticate([])
    with pytest.raises(Unauthorized, match="unknown API key") as caught:
        gate.authenticate(bearer(KEY_A + "x"))
    assert KEY_A not in caught.value.message
    gate.authorize(gate.authenticate(bearer(KEY_B)), "anything")
    with pytest.raises(Forbidden, match="'app-a' may not call model 'wide'"):
        gate.authorize(gate.authenticate(bearer(KEY_A)), "wide")
    assert failures == ["missing", "unknown", "forbidden"]


def test_an_edited_file_takes_effect_and_a_broken_one_keeps_the_old_keys(tmp_path: Path) -> None:
    path = two_apps(tmp_path)
    gate = ClientGate(path)
    assert gate.refresh() is False  # unchanged
    path.write_text(yaml.safe_dump({"app-c": {"key_sha256": sha("bg_c-key-0123456789abcdefghij"),
                                              "models": ["*"]}}))
    assert gate.refresh() is True
    assert gate.authenticate(bearer("bg_c-key-0123456789abcdefghij")).name == "app-c"
    with pytest.raises(Unauthorized):
        gate.authenticate(bearer(KEY_A))
    path.write_text("app-c: {key_sha256: nope}\n")
    assert gate.refresh() is False
    assert gate.authenticate(bearer("bg_c-key-0123456789abcdefghij")).name == "app-c"


# ------------------------------------------------------------------------------------------------ rates


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    b = Bucket(rate=10, burst=5, tokens=5, last=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.wait_s() == pytest.approx(0.1)
    assert b.take(0.1) and not b.take(0.1)
    assert b.take(10.0) and b.tokens == pytest.approx(4)  # refills to the burst, never beyond


async def test_over_the_rate_is_429_with_rate_limit_headers() -> None:
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    client = ClientKey("app-a", frozenset({"*"}), rate_per_s=2, burst=3)
    for _ in range(3):
        await limiter.admit(client)
    with pytest.raises(TooManyRequests) as caught:
        await limiter.admit(client)
    headers = caught.value.headers
    assert headers["retry-after"] == "1" and headers["ratelimit-limit"] == "3"
    assert headers["ratelimit-remaining"] == "0" and headers["ratelimit-reset"] == "2"
    assert "over its rate of 2 requests/s" in caught.value.message
    now[0] += 0.5
    await limiter.admit(client)  # one token back after half a second at 2/s
    await limiter.admit(ClientKey("unlimited", frozenset({"*"})))


@pytest.fixture
def redis_port(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc, port = start_redis(tmp_path)
    yield port
    proc.stop()


async def test_replicas_sharing_redis_hold_the_rate_together(redis_port: int) -> None:
    """Two limiters (two replicas) draw from one bucket: over 2 s at a 50/s key with burst 10, both together
    admit 50 x 2 + 10 (+ one lease in flight each), not twice that."""
    limiters = [RateLimiter(redis=rate_redis(f"redis://127.0.0.1:{redis_port}/0")) for _ in range(2)]
    client = ClientKey("shared", frozenset({"*"}), rate_per_s=50, burst=10)
    admitted = 0
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            for limiter in limiters:
                try:
                    await limiter.admit(client)
                    admitted += 1
                except TooManyRequests:
                    pass
            await asyncio.sleep(0.002)
        assert all(lim.redis_down_until == float("-inf") for lim in limiters)
        assert 100 <= admitted <= 100 + 10 + 2 * 5 + 5, admitted
    finally:
        for limiter in limiters:
            await limiter.redis.aclose()


async def test_without_redis_each_replica_limits_locally(tmp_path: Path) -> None:
    proc, port = start_redis(tmp_path)
    limiter = RateLimiter(redis=rate_redis(f"redis://127.0.0.1:{port}/0"))
    client = ClientKey("app", frozenset({"*"}), rate_per_s=1, burst=2)
    try:
        await limiter.admit(client)  # from Redis
        proc.stop()
        limiter.leases.clear()
        await limiter.admit(client)  # Redis fails: local bucket, full at start
        assert limiter.redis_down_until > time.monotonic()
        await limiter.admit(client)
        with pytest.raises(TooManyRequests):
            await limiter.admit(client)
    finally:
        await limiter.redis.aclose()


# ------------------------------------------------------------------------------------------------ the data app


async def test_the_data_app_refuses_before_any_backend(gateway: Gateway, tmp_path: Path) -> None:
    """The fixture's upstream is never started: any refused request that reached a backend would raise."""
    failures: list[str] = []
    gate = ClientGate(two_apps(tmp_path, rate=1, burst=1), on_failure=failures.append)
    gateway.plane.telemetry.enabled = True
    app = DataApp(gateway.plane, 64, 4096, gate)
    infer = "/v2/models/digits/infer"
    none = await app.handle("POST", infer, [], b"{}")
    assert none.status == 401 and (b"www-authenticate", b'Bearer realm="bluegreen"') in none.headers
    assert (await app.handle("POST", infer, bearer("bg_wrong-key-0123456789abcdef"), b"{}")).status == 401
    assert (await app.handle("POST", "/v2/models/wide/infer", bearer(KEY_A), b"{}")).status == 403
    assert (await app.handle("GET", "/v2/models/digits", bearer(KEY_A), b"")).status != 401  # the one token
    limited = await app.handle("GET", "/v2/models/digits", bearer(KEY_A), b"")
    assert limited.status == 429 and dict(limited.headers)[b"retry-after"] == b"1"
    assert (await app.handle("GET", "/v2/health/ready", [], b"")).status == 200  # health needs no key
    counts = dict(gateway.telemetry.client_requests.series)
    assert counts[("app-a", "wide", "forbidden")] == 1 and counts[("app-a", "digits", "rate_limited")] == 1
    assert counts[("app-a", "digits", "ok")] == 1
    assert failures == ["missing", "unknown", "forbidden", "rate_limited"]
