"""gateway/payload_log.py: which answered requests become prediction records, what a record holds, and what
happens when the sink cannot keep up or is down — with a real data plane in front of real loopback servers
(``upstream_stub.py``), real files and a real HTTP receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.app import Gateway
from gateway.auth import Principal
from gateway.dataplane import DataPlane, InferRequest, Reply
from gateway.errors import Forbidden
from gateway.payload_log import FILE_NAME, FileSink, PayloadLog, tensors
from gateway.release import PayloadLogBody
from gateway.settings import GatewaySettings, PayloadLogSettings, RoutingFile
from gateway.state import MemoryStateStore
from gateway.telemetry import Telemetry
from tests.gateway.support import ALICE, DIGITS, client
from tests.gateway.test_dataplane import MODEL, body
from tests.gateway.upstream_stub import stubs
from tests.procs import free_port


@contextlib.asynccontextmanager
async def plane_with(log: PayloadLogSettings, *, percent: int, inputs: bool = True, blue_url: str | None = None
                     ) -> AsyncIterator[DataPlane]:
    """A data plane whose digits model logs ``percent`` of its answers (blue 100%, on a stub server)."""
    async with stubs(1, 2) as (blue, green):
        routing = RoutingFile.model_validate({"models": {MODEL: {
            "colors": {"blue": {"version": "1", "backends": [blue_url or blue.url]},
                       "green": {"version": "2", "backends": [green.url]}},
            "payload_log_percent": percent, "payload_log_inputs": inputs}}})
        plane = DataPlane(GatewaySettings(payload_log=log, cache={"enabled": False}),
                          MemoryStateStore.from_routing(routing), routes=routing.models)
        for version in ("1", "2"):
            plane.signatures[(MODEL, version)] = DIGITS
        await plane.start()
        try:
            yield plane
        finally:
            await plane.close()


def records(directory: Path) -> list[dict[str, Any]]:
    """Every record in the log files, oldest first."""
    files = sorted(directory.glob(f"{FILE_NAME}*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit()
                   else 0)
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


async def infer(plane: DataPlane, i: int) -> Reply:
    return await plane.infer(InferRequest(MODEL, body(i, request_id=f"req-{i}"), request_id=f"x-{i}"))


async def test_a_tenth_of_the_answers_become_records_that_match_them(tmp_path: Path) -> None:
    async with plane_with(PayloadLogSettings(dir=tmp_path), percent=10) as plane:
        replies = {f"req-{i}": await infer(plane, i) for i in range(300)}
    found = records(tmp_path)  # close() wrote what was queued
    assert len(found) == 30  # the deterministic stride: exactly 10 in every 100
    assert plane.payload_log.counts(MODEL) == {"logged": 30, "dropped": 0}
    for rec in found:
        assert (rec["specversion"], rec["type"], rec["subject"]) == ("1.0", "io.bluegreen.prediction.v1", MODEL)
        assert rec["source"].startswith("/bluegreen/gateway/") and len(rec["id"]) == 32 and rec["time"].endswith("Z")
        data = rec["data"]
        reply = replies[data["client_id"]]
        assert data["request_id"] == "x-" + data["client_id"].removeprefix("req-")
        assert (data["model"], data["color"], data["version"], data["cache"]) == (MODEL, "blue", "1", "bypass")
        assert data["outputs"] == orjson.loads(reply.body)["outputs"]  # what the client got
        i = int(data["client_id"].removeprefix("req-"))
        assert data["inputs"] == orjson.loads(body(i))["inputs"]
        assert 0 < data["latency_ms"] < 5000
    assert len({r["id"] for r in found}) == 30


async def test_inputs_are_left_out_where_the_routing_file_says_so_and_outputs_kept(tmp_path: Path) -> None:
    async with plane_with(PayloadLogSettings(dir=tmp_path), percent=100, inputs=False) as plane:
        reply = await infer(plane, 7)
    (rec,) = records(tmp_path)
    assert rec["data"]["inputs"] is None and rec["data"]["inputs_omitted"] is True
    assert rec["data"]["outputs"] == orjson.loads(reply.body)["outputs"]
    assert "7.0" not in json.dumps(rec)  # no input value anywhere in the record


async def test_a_share_changed_live_applies_to_the_next_requests(tmp_path: Path) -> None:
    async with plane_with(PayloadLogSettings(dir=tmp_path), percent=0) as plane:
        for i in range(50):
            await infer(plane, i)
        await plane.store.update(MODEL, None, lambda s: dataclasses.replace(s, payload_log_percent=100),
                                 who="test", action="set_payload_log")
        for i in range(50, 60):
            await infer(plane, i)
    assert [r["data"]["client_id"] for r in records(tmp_path)] == [f"req-{i}" for i in range(50, 60)]


def test_files_rotate_within_the_size_and_count_limits(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, max_bytes=2000, max_files=3)
    lines = [orjson.dumps({"n": i, "pad": "x" * 80}) for i in range(200)]
    for start in range(0, 200, 7):  # batches of 7, as the writer hands them over
        asyncio.run(sink.write(lines[start:start + 7]))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [FILE_NAME, f"{FILE_NAME}.1", f"{FILE_NAME}.2"]
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    kept = [json.loads(x)["n"] for x in records_text(tmp_path)]
    assert kept == list(range(200 - len(kept), 200)) and len(kept) > 40  # the newest, contiguous, in order
    one = FileSink(tmp_path / "one", max_bytes=1024, max_files=1)
    asyncio.run(one.write(lines[:30]))
    assert [p.name for p in (tmp_path / "one").iterdir()] == [FILE_NAME]
    assert (tmp_path / "one" / FILE_NAME).stat().st_size <= 1024


def records_text(directory: Path) -> list[str]:
    return [json.dumps(r) for r in records(directory)]


@pytest.mark.exclusive
async def test_a_full_queue_drops_and_counts_without_waiting(tmp_path: Path) -> None:
    telemetry = Telemetry()
    log = PayloadLog(PayloadLogSettings(dir=tmp_path, queue_size=5), telemetry, {})  # writer not started
    started = time.perf_counter()
    for i in range(100):
        log.maybe_log(MODEL, 100, "blue", "1", None, None, body(i), None, b'{"outputs": []}', None, 0.001, "miss")
    assert time.perf_counter() - started < 0.05
    assert log.counts(MODEL) == {"logged": 0, "dropped": 95} and log.queued == 5
    assert 'bluegreen_payload_records_total{model="digits",outcome="dropped"} 95.0' in \
        telemetry.prometheus_text().decode()


async def test_http_sink_gets_batches_and_a_sink_that_is_down_costs_records_not_requests() -> None:
    received: list[tuple[str, list[dict[str, Any]]]] = []

    async def collect(request: web.Request) -> web.Response:
        received.append((request.content_type, await request.json()))
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/events", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        log = PayloadLogSettings(url=f"http://127.0.0.1:{port}/events", batch_size=20, flush_s=0.2)
        async with plane_with(log, percent=100) as plane:
            for i in range(45):
                await infer(plane, i)
        assert [len(batch) for _, batch in received] == [20, 20, 5]
        assert {ct for ct, _ in received} == {"application/cloudevents-batch+json"}
        assert [r["data"]["client_id"] for _, b in received for r in b] == [f"req-{i}" for i in range(45)]
    finally:
        await runner.cleanup()

    down = PayloadLogSettings(url=f"http://127.0.0.1:{free_port()}/events", batch_size=10, flush_s=0.05)
    async with plane_with(down, percent=100) as plane:
        started = time.perf_counter()
        replies = [await infer(plane, i) for i in range(30)]
        took = time.perf_counter() - started
        assert [r.status for r in replies] == [200] * 30 and took < 3
        for _ in range(200):  # bounded: the writer counts each failed batch as it gives up on it
            if plane.payload_log.counts(MODEL)["dropped"] == 30:
                break
            await asyncio.sleep(0.01)
    assert plane.payload_log.counts(MODEL) == {"logged": 0, "dropped": 30}


async def test_without_a_sink_selected_records_are_counted_as_dropped() -> None:
    async with plane_with(PayloadLogSettings(), percent=50) as plane:
        for i in range(100):
            assert (await infer(plane, i)).status == 200
        assert plane.payload_log.counts(MODEL) == {"logged": 0, "dropped": 50}
        assert plane.payload_log.describe(MODEL, 50)["sink"] is None


def test_binary_tensors_are_decoded_into_data_lists() -> None:
    import numpy as np

    values = np.arange(6, dtype="<f4")
    head = orjson.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
        {"name": "b", "datatype": "INT64", "shape": [1], "data": [5]},
        {"name": "c", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 3}}]})
    found = tensors(head + values.tobytes() + b"abc", len(head), "inputs")
    assert found[0] == {"name": "a", "datatype": "FP32", "shape": [2, 3], "data": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}
    assert found[1]["data"] == [5] and found[2]["data_base64"] == "YWJj"


# ------------------------------------------------------------------ the admin API and the release core


async def test_the_share_is_set_through_the_admin_api_with_etag_and_audit(gateway: Gateway) -> None:
    path = "/admin/v1/models/digits/payload-log"
    auth = {"authorization": f"Bearer {ALICE}"}
    async with client(gateway.admin_app()) as admin:
        r = await admin.get(path, headers=auth)
        assert r.status_code == 200
        assert r.json() == {"percent": 0, "inputs_logged": True, "sink": None, "queued": 0, "logged": 0,
                            "dropped": 0}
        r = await admin.put(path, json={"percent": 10, "reason": "study v2"},
                            headers={**auth, "if-match": r.headers["etag"]})
        assert r.status_code == 200, r.text
        assert r.json()["percent"] == 10 and gateway.store.get("digits").payload_log_percent == 10
        entry = gateway.store.audit_log[-1]
        assert (entry.action, entry.old, entry.new, entry.reason) == (
            "set_payload_log", {"payload_log_percent": 0}, {"payload_log_percent": 10}, "study v2")
        for bad in ({"percent": 101}, {"percent": 5.5}, {}):
            assert (await admin.put(path, json=bad, headers={**auth, "if-match": "*"})).status_code == 400
        assert (await admin.put(path, json={"percent": 1}, headers=auth)).status_code == 428
    assert gateway.store.get("digits").payload_log_percent == 10
    viewer = Principal("val", frozenset({"viewer"}))
    with pytest.raises(Forbidden):
        await gateway.release.set_payload_logging("digits", PayloadLogBody(percent=50), actor=viewer,
                                                  if_revision=None)


def test_the_share_survives_a_restart_through_the_state_file(tmp_path: Path) -> None:
    routing = RoutingFile.model_validate({"models": {MODEL: {
        "colors": {"blue": {"version": "1", "backends": ["http://127.0.0.1:1"]},
                   "green": {"version": "2", "backends": ["http://127.0.0.1:2"]}}}}})
    store = MemoryStateStore.from_routing(routing, tmp_path / "state.json")
    asyncio.run(store.update(MODEL, None, lambda s: dataclasses.replace(s, payload_log_percent=25), who="t",
                             action="set_payload_log"))
    assert MemoryStateStore.from_routing(routing, tmp_path / "state.json").get(MODEL).payload_log_percent == 25


def test_one_sink_only() -> None:
    with pytest.raises(ValueError, match="not both"):
        PayloadLogSettings(dir=Path("/tmp"), url="http://127.0.0.1:1/x")
    with pytest.raises(ValueError, match="http"):
        PayloadLogSettings(url="ftp://x")



