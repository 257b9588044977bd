"""Payload logging and input drift through a real gateway in front of a real model server (real digits models).

5,000 requests, each color fed its own population (blue: rows drawn from the holdout; green: the same with one
pixel brightened), the logging share set to 10% through the admin API as an operator would: the rotating files
hold 500 ± 70 records that parse and match what the clients got, within the size and count limits; the drift
endpoint calls green drifting on that pixel and blue not. A second gateway logs everything to a sink that
accepts connections and never answers: records are lost, counted, and no request waits for it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import orjson
import pytest

from tests.integration.expect import expect
from tests.procs import admin_headers, routing, start_gateway, start_model_server, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")
INFER = "/v2/models/digits/infer"
REQUESTS = 5000
SHIFTED = 27
MAX_FILE_BYTES = 256 * 1024
MAX_FILES = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[str]:
    proc, url = start_model_server(tmp_path_factory.mktemp("payload-server"), ["digits:1", "digits:2"])
    yield url
    proc.stop()


def rows(model_repo: Path) -> np.ndarray:
    with np.load(Path(model_repo) / "digits" / "1" / "holdout.npz") as data:
        x = np.asarray(data["input"], dtype=np.float64)
    return x[np.random.default_rng(0).integers(0, len(x), REQUESTS)]


async def send_all(data: str, bodies: list[tuple[bytes, str]], concurrency: int = 16
                   ) -> list[tuple[int, dict[str, str], bytes, float]]:
    """Each body to its pinned color; (status, headers, body, seconds) per request, in order."""
    results: list[Any] = [None] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            body, color = bodies[i]
            started = time.perf_counter()
            async with session.post(f"{data}{INFER}", data=body, headers={
                    "content-type": "application/json", "x-bluegreen-color": color}) as r:
                results[i] = (r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read(),
                              time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results


def set_share(admin: str, percent: int) -> None:
    url = f"{admin}/admin/v1/models/digits/payload-log"
    etag = expect(httpx.get(url, headers=admin_headers())).headers["etag"]
    r = httpx.put(url, json={"percent": percent, "reason": "study the release"},
                  headers={**admin_headers(), "if-match": etag})
    assert r.status_code == 200, r.text


def test_a_tenth_is_logged_matching_the_answers_and_green_drifts_alone(server: str, tmp_path: Path,
                                                                       model_repo: Path) -> None:
    logs = tmp_path / "payloads"
    env = {"BLUEGREEN_PAYLOAD_LOG__DIR": str(logs), "BLUEGREEN_PAYLOAD_LOG__MAX_FILE_BYTES": str(MAX_FILE_BYTES),
           "BLUEGREEN_PAYLOAD_LOG__MAX_FILES": str(MAX_FILES), "BLUEGREEN_DRIFT__REFERENCE_REPO": str(model_repo),
           "BLUEGREEN_DRIFT__SAMPLE_PERCENT": "20", "BLUEGREEN_DRIFT__MIN_ROWS": "200"}
    gw, data, admin = start_gateway(tmp_path, routing([server], [server], weights=(50, 50)), env)
    try:
        set_share(admin, 10)
        x = rows(model_repo)
        bodies = []
        for i, row in enumerate(x):
            color = "blue" if i % 2 == 0 else "green"
            if color == "green":
                row = row.copy()
                row[SHIFTED] = min(row[SHIFTED] + 6, 16)
            doc = {"id": f"r{i}", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                              "data": row.tolist()}]}
            bodies.append((orjson.dumps(doc), color))
        results = asyncio.run(send_all(data, bodies))
        assert [r[0] for r in results] == [200] * REQUESTS
        url = f"{admin}/admin/v1/models/digits/payload-log"
        counts = wait_until(lambda: (c := httpx.get(url, headers=admin_headers()).json())["logged"] >= 430 and
                            c["queued"] == 0 and c, 10, interval=0.1, what="the records to be written")
        assert 430 <= counts["logged"] <= 570 and counts["dropped"] == 0, counts

        files = sorted(logs.iterdir())
        assert 2 <= len(files) <= MAX_FILES, [f.name for f in files]  # rotated, within the count limit
        assert all(f.stat().st_size <= MAX_FILE_BYTES for f in files)
        records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
        assert len(records) == counts["logged"]
        for rec in records:
            d = rec["data"]
            _, headers, answer, _ = results[int(d["client_id"][1:])]
            assert d["outputs"] == orjson.loads(answer)["outputs"], d["client_id"]  # what the client got
            assert (d["color"], d["version"], d["cache"]) == (headers["x-bluegreen-color"],
                                                             headers["x-bluegreen-model-version"],
                                                             headers["x-bluegreen-cache"])
            assert d["inputs"] == orjson.loads(bodies[int(d["client_id"][1:])][0])["inputs"]
            assert d["request_id"] == headers.get("x-request-id"), (d, headers)
            assert rec["specversion"] == "1.0"

        drift = expect(httpx.get(f"{admin}/admin/v1/models/digits/drift", headers=admin_headers())).json()
        blue, green = drift["colors"]["blue"], drift["colors"]["green"]
        assert blue["rows"] >= 200 and green["rows"] >= 200, drift
        assert blue["drifting"] is False and blue["drift"] < 0.15, blue
        assert green["drifting"] is True and green["top"][0]["feature"] == f"input[{SHIFTED}]", green
        metrics = httpx.get(f"{admin}/metrics").text
        assert 'bluegreen_payload_records_total{model="digits",outcome="logged"}' in metrics
        assert 'bluegreen_input_drift{color="green",model="digits"}' in metrics
    finally:
        gw.stop()


def test_a_sink_that_never_answers_loses_records_not_requests(server: str, tmp_path: Path) -> None:
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    env = {"BLUEGREEN_PAYLOAD_LOG__URL": f"http://127.0.0.1:{silent.getsockname()[1]}/events",
           "BLUEGREEN_PAYLOAD_LOG__HTTP_TIMEOUT_S": "2", "BLUEGREEN_PAYLOAD_LOG__FLUSH_S": "0.1",
           "BLUEGREEN_PAYLOAD_LOG__BATCH_SIZE": "50", "BLUEGREEN_PAYLOAD_LOG__QUEUE_SIZE": "100"}
    gw, data, admin = start_gateway(tmp_path, routing([server], [server]), env)
    try:
        set_share(admin, 100)
        bodies = [(orjson.dumps({"id": f"s{i}", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                             "data": [float(i % 17)] * 64}]}), "blue")
                  for i in range(600)]
        results = asyncio.run(send_all(data, bodies, concurrency=8))
        assert [r[0] for r in results] == [200] * len(bodies)
        slowest = max(r[3] for r in results)
        assert slowest < 1.0, slowest  # a request waiting on the sink would take its 2 s timeout
        counts = httpx.get(f"{admin}/admin/v1/models/digits/payload-log", headers=admin_headers()).json()
        assert counts["logged"] == 0 and counts["dropped"] >= 600 - 100 - 50, counts  # beyond queue + one batch
    finally:
        gw.stop()
        silent.close()
