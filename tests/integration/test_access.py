"""Client keys through real gateways: refusals are fast and reach no model server; a key's rate holds across two
replicas sharing Redis, and per replica when Redis dies; an edited keys file takes effect without a restart."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.expect import expect
from tests.procs import Proc, routing, start_gateway, start_model_server, start_redis, wait_until

ROW = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
       0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
INFER = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}
FAST = "bg_fast-client-key-0123456789abcdefghijkl"
SLOW = "bg_slow-client-key-0123456789abcdefghijkl"
NEW = "bg_new-client-key-0123456789abcdefghijklm"


def entry(key: str, models: list[str], rate: float | None = None, burst: int | None = None) -> dict[str, object]:
    doc: dict[str, object] = {"key_sha256": hashlib.sha256(key.encode()).hexdigest(), "models": models}
    if rate is not None:
        doc["rate_per_s"] = rate
    if burst is not None:
        doc["burst"] = burst
    return doc


def served(url: str) -> float:
    """The model server's count of inference requests, from its own /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(float(m) for m in re.findall(r'^bluegreen_serving_requests_total\{[^}]*\} ([0-9.e+]+)$', text,
                                            re.MULTILINE))


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_model_server(tmp_path_factory.mktemp("backend"), ["digits:1"])
    yield url
    proc.stop()


def keys_gateway(tmp_path: Path, backend: str, keys: Path, env: dict[str, str] | None = None,
                 name: str = "gateway") -> tuple[Proc, str]:
    proc, data, _ = start_gateway(tmp_path, routing([backend], [backend]), {
        "BLUEGREEN_CLIENT_KEYS_FILE": str(keys), "BLUEGREEN_CACHE__ENABLED": "false", **(env or {})}, name=name)
    return proc, data


@pytest.mark.exclusive
def test_refusals_are_fast_and_reach_no_model_server(tmp_path: Path, backend: str) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"fast": entry(FAST, ["digits"]), "slow": entry(SLOW, ["wide"], 1, 1)}))
    proc, data = keys_gateway(tmp_path, backend, keys)
    try:
        with httpx.Client(base_url=data, timeout=5) as client:
            expect(client.post("/v2/models/digits/infer", json=INFER, headers={"x-api-key": FAST}), 200)
            before = served(backend)
            cases = [({}, 401), ({"authorization": "Bearer bg_not-a-key-0123456789abcdef"}, 401),
                     ({"authorization": f"Bearer {SLOW}"}, 403)]
            for headers, status in cases:
                started = time.perf_counter()
                r = client.post("/v2/models/digits/infer", json=INFER, headers=headers)
                elapsed = time.perf_counter() - started
                expect(r, status)
                assert set(r.json()) == {"error"} and elapsed < 0.1, (r.text, elapsed)
            # The slow key's one token goes on a model it may call; the next request is over its rate.
            client.get("/v2/models/wide", headers={"x-api-key": SLOW})
            started = time.perf_counter()
            r = client.get("/v2/models/wide/ready", headers={"x-api-key": SLOW})
            assert time.perf_counter() - started < 0.1
            expect(r, 429)
            assert int(r.headers["retry-after"]) >= 1 and r.headers["ratelimit-limit"] == "1"
            assert r.headers["ratelimit-remaining"] == "0" and int(r.headers["ratelimit-reset"]) >= 1
            assert served(backend) == before  # no refused request reached the model server
            expect(client.get("/v2/health/ready"), 200)  # health checks need no key
    finally:
        proc.stop()


@pytest.mark.exclusive
def test_an_edited_keys_file_takes_effect_within_two_seconds(tmp_path: Path, backend: str) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"fast": entry(FAST, ["*"])}))
    proc, data = keys_gateway(tmp_path, backend, keys)
    try:
        with httpx.Client(base_url=data, timeout=5) as client:
            expect(client.post("/v2/models/digits/infer", json=INFER, headers={"x-api-key": FAST}), 200)
            keys.write_text(yaml.safe_dump({"new": entry(NEW, ["digits"])}))
            edited = time.monotonic()

            def new_key_works() -> bool:
                return client.post("/v2/models/digits/infer", json=INFER,
                                   headers={"x-api-key": NEW}).status_code == 200
            wait_until(new_key_works, 2.0, interval=0.05, what="the new key to work")
            assert time.monotonic() - edited < 2.0
            expect(client.post("/v2/models/digits/infer", json=INFER, headers={"x-api-key": FAST}), 401)
    finally:
        proc.stop()


async def _drive(urls: list[str], key: str, seconds: float, per_second: float) -> tuple[dict[int, int], float]:
    """Open-loop load: ``per_second`` requests a second to each URL for ``seconds``; counts by status and the
    seconds it really took (on a busy machine the client falls behind its schedule)."""
    counts: dict[int, int] = {}
    async with httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_connections=64)) as client:
        async def one(url: str) -> None:
            try:
                r = await client.post(f"{url}/v2/models/digits/infer", json=INFER, headers={"x-api-key": key})
                counts[r.status_code] = counts.get(r.status_code, 0) + 1
            except httpx.HTTPError:
                counts[0] = counts.get(0, 0) + 1
        tasks = []
        start = time.monotonic()
        n = int(seconds * per_second)
        for i in range(n):
            delay = start + i / per_second - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks += [asyncio.create_task(one(url)) for url in urls]
        await asyncio.gather(*tasks)
    return counts, time.monotonic() - start


@pytest.mark.exclusive
def test_a_keys_rate_holds_across_two_replicas_and_per_replica_without_redis(tmp_path: Path, backend: str) -> None:
    """50/s through two replicas (each offered 100/s) over 10 s: 50 +- 5 answered per second (the burst of 10
    comes on top once). Then Redis is killed: no 5xx, each replica limits on its own."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"fast": entry(FAST, ["digits"], rate=50, burst=10)}))
    redis_proc, port = start_redis(tmp_path)
    env = {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
    a, url_a = keys_gateway(tmp_path, backend, keys, env, name="a")
    b, url_b = keys_gateway(tmp_path, backend, keys, env, name="b")
    try:
        counts, seconds = asyncio.run(_drive([url_a, url_b], FAST, 10.0, 100))
        assert set(counts) <= {200, 429}, counts
        rate = (counts.get(200, 0) - 10) / seconds
        assert 45 <= rate <= 55, (counts, seconds)
        redis_proc.stop()
        counts, seconds = asyncio.run(_drive([url_a, url_b], FAST, 3.0, 100))
        assert set(counts) <= {200, 429}, counts  # no 5xx, no dropped connection
        # Locally each replica allows 50/s and its own burst: together more than one bucket, at most two.
        local = (counts.get(200, 0) - 2 * 10) / seconds
        assert 50 < local <= 2 * 50 * 1.1, (counts, seconds)
    finally:
        a.stop()
        b.stop()
        redis_proc.stop()
