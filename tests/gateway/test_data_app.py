"""gateway/app.py's DataApp: request ids and load shedding, merged into the data listener's one app."""

from __future__ import annotations

import asyncio
import re

import orjson
import pytest

from gateway.app import DataApp, Gateway
from gateway.dataplane import InferRequest, Reply
from tests.gateway.support import client
from tests.gateway.test_app import infer_body

INFER = "/v2/models/digits/infer"


class Held:
    """Stands in for the data plane's infer: holds every request until released, counting them."""

    def __init__(self, wanted: int) -> None:
        self.release = asyncio.Event()
        self.all_in = asyncio.Event()
        self.wanted = wanted
        self.inside = 0
        self.calls = 0
        self.seen_ids: list[str | None] = []

    async def __call__(self, req: InferRequest) -> Reply:
        self.calls += 1
        self.seen_ids.append(req.request_id)
        self.inside += 1
        if self.inside >= self.wanted:
            self.all_in.set()
        await self.release.wait()
        self.inside -= 1
        return Reply(200, b'{"ok":true}', [(b"content-type", b"application/json")])


@pytest.fixture
def held(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Held:
    h = Held(wanted=3)
    monkeypatch.setattr(gateway.plane, "infer", h)
    return h


BODY = orjson.dumps(infer_body())


@pytest.mark.parametrize("rid", ["abc-123", "0f" * 64, "a", "req/42:x=y"])
async def test_a_sane_request_id_is_propagated(gateway: Gateway, held: Held, rid: str) -> None:
    held.release.set()
    async with client(gateway.data_app()) as c:
        r = await c.post(INFER, content=BODY, headers={"x-request-id": rid})
    assert r.headers["x-request-id"] == rid
    assert held.seen_ids == [rid]


@pytest.mark.parametrize("rid", [None, "", "has space", "x" * 129, "tab\there", "caf\u00e9"])
async def test_a_missing_or_insane_request_id_is_replaced(gateway: Gateway, held: Held, rid: str | None) -> None:
    held.release.set()
    headers = {} if rid is None else {"x-request-id": rid.encode()}
    async with client(gateway.data_app()) as c:
        first = await c.post(INFER, content=BODY, headers=headers)
        second = await c.post(INFER, content=BODY, headers=headers)
    generated = first.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{24}", generated)
    assert held.seen_ids[0] == generated
    assert second.headers["x-request-id"] != generated  # fresh every time
    assert first.headers.get_list("x-request-id") == [generated]  # one header, not the client's and ours


async def test_sheds_with_503_past_the_limit_while_health_passes(gateway: Gateway, held: Held) -> None:
    app = DataApp(gateway.plane, max_concurrency=3, max_body_bytes=4096)
    async with client(app) as c:
        waiting = [asyncio.ensure_future(c.post(INFER, content=BODY)) for _ in range(3)]
        await asyncio.wait_for(held.all_in.wait(), 5)
        assert app.in_flight == 3

        shed = await c.post(INFER, content=BODY, headers={"x-request-id": "shed-1"})
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1" and shed.headers["x-bluegreen-degraded"] == "load-shed"
        assert shed.headers["x-request-id"] == "shed-1"
        assert "error" in shed.json()
        assert held.calls == 3  # the shed request never reached the data plane
        assert app.shed == 1

        for path in ("/v2/health/ready", "/v2/health/live"):
            assert (await c.get(path)).status_code == 200  # probes are never shed

        held.release.set()
        assert [r.status_code for r in await asyncio.gather(*waiting)] == [200, 200, 200]
        assert app.in_flight == 0
        assert (await c.post(INFER, content=BODY)).status_code == 200  # room again


async def test_in_flight_is_released_when_the_request_fails(gateway: Gateway,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(req: InferRequest) -> Reply:
        raise RuntimeError("boom")

    monkeypatch.setattr(gateway.plane, "infer", broken)
    app = DataApp(gateway.plane, max_concurrency=1, max_body_bytes=4096)
    async with client(app) as c:
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await c.post(INFER, content=BODY)
    assert app.in_flight == 0


def test_limit_must_be_positive(gateway: Gateway) -> None:
    with pytest.raises(ValueError):
        DataApp(gateway.plane, max_concurrency=0, max_body_bytes=4096)


async def test_shed_requests_are_counted_in_the_gateways_metrics(gateway: Gateway) -> None:
    gateway.telemetry.enabled = True  # the unit-test gateway records nothing by default
    app = gateway.data_app()
    app.in_flight = app.limit  # as if that many requests were being served
    async with client(app) as c:
        for _ in range(3):
            assert (await c.post(INFER, content=b"{}")).status_code == 503
        assert (await c.get("/v2/health/ready")).status_code == 200  # never shed, never counted
    text = gateway.telemetry.prometheus_text().decode()
    assert "bluegreen_load_shed_total 3.0" in text
