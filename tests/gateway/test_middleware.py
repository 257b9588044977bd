"""gateway/middleware/: request ids and load shedding, on tiny inline ASGI apps."""

from __future__ import annotations

import asyncio
import re

import orjson
import pytest
from starlette.types import Receive, Scope, Send

from gateway.app import Gateway
from gateway.middleware import BodyLimitMiddleware
from gateway.middleware.concurrency import ConcurrencyLimitMiddleware
from gateway.middleware.request_id import RequestIdMiddleware
from tests.gateway.support import client


async def reply(send: Send, status: int, doc: object) -> None:
    body = orjson.dumps(doc)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def echo_request_id(scope: Scope, receive: Receive, send: Send) -> None:
    await reply(send, 200, {"seen": scope["state"]["request_id"]})


# ---------------------------------------------------------------- request id


@pytest.mark.parametrize("rid", ["abc-123", "0f" * 64, "a", "req/42:x=y"])
async def test_a_sane_request_id_is_propagated(rid: str) -> None:
    async with client(RequestIdMiddleware(echo_request_id)) as c:
        r = await c.get("/", headers={"x-request-id": rid})
    assert r.headers["x-request-id"] == rid
    assert r.json() == {"seen": rid}


@pytest.mark.parametrize("rid", [None, "", "has space", "x" * 129, "tab\there", "caf\u00e9"])
async def test_a_missing_or_insane_request_id_is_replaced(rid: str | None) -> None:
    headers = {} if rid is None else {"x-request-id": rid.encode()}
    async with client(RequestIdMiddleware(echo_request_id)) as c:
        first = await c.get("/", headers=headers)
        second = await c.get("/", headers=headers)
    generated = first.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{24}", generated)
    assert first.json() == {"seen": generated}
    assert second.headers["x-request-id"] != generated  # fresh every time
    assert first.headers.get_list("x-request-id") == [generated]  # one header, not the client's and ours


async def test_request_id_passes_other_scopes_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    await RequestIdMiddleware(app)({"type": "lifespan"}, _never, _discard)
    assert seen == ["lifespan"]


async def _never() -> dict[str, object]:
    raise AssertionError("receive must not be called")


async def _discard(message: object) -> None:
    raise AssertionError("send must not be called")


# ---------------------------------------------------------------- load shedding


class Held:
    """An app that holds every non-health request until released, counting them in flight."""

    def __init__(self, wanted: int) -> None:
        self.release = asyncio.Event()
        self.all_in = asyncio.Event()
        self.wanted = wanted
        self.inside = 0
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        if scope["path"].startswith("/v2/health"):
            await reply(send, 200, {"ready": True})
            return
        self.inside += 1
        if self.inside >= self.wanted:
            self.all_in.set()
        await self.release.wait()
        self.inside -= 1
        await reply(send, 200, {"ok": True})


async def test_sheds_with_503_past_the_limit_while_health_passes() -> None:
    held = Held(wanted=3)
    limiter = ConcurrencyLimitMiddleware(held, limit=3)
    async with client(limiter) as c:
        waiting = [asyncio.ensure_future(c.post("/v2/models/digits/infer", content=b"{}")) for _ in range(3)]
        await asyncio.wait_for(held.all_in.wait(), 5)
        assert limiter.in_flight == 3

        shed = await c.post("/v2/models/digits/infer", content=b"{}")
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1" and shed.headers["x-bluegreen-degraded"] == "load-shed"
        assert "error" in shed.json()
        assert held.calls == 3  # the shed request never reached the app
        assert limiter.shed == 1

        for path in ("/v2/health/ready", "/v2/health/live"):
            assert (await c.get(path)).status_code == 200  # probes are never shed

        held.release.set()
        assert [r.status_code for r in await asyncio.gather(*waiting)] == [200, 200, 200]
        assert limiter.in_flight == 0
        assert (await c.post("/v2/models/digits/infer", content=b"{}")).status_code == 200  # room again


async def test_in_flight_is_released_when_the_app_fails() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    limiter = ConcurrencyLimitMiddleware(broken, limit=1)
    async with client(limiter) as c:
        for _ in range(3):
            with pytest.raises(RuntimeError):
                await c.get("/x")
    assert limiter.in_flight == 0


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ConcurrencyLimitMiddleware(echo_request_id, limit=0)


async def test_body_limit_is_reexported_for_the_data_listener() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("an oversized body must not reach the app")

    async with client(BodyLimitMiddleware(app, max_bytes=10)) as c:
        r = await c.post("/", content=b"x" * 11)
    assert r.status_code == 413 and isinstance(r.json()["error"], str)


async def test_stack_order_gives_shed_responses_a_request_id() -> None:
    held = Held(wanted=1)
    app = RequestIdMiddleware(ConcurrencyLimitMiddleware(held, limit=1))
    async with client(app) as c:
        first = asyncio.ensure_future(c.get("/work"))
        await asyncio.wait_for(held.all_in.wait(), 5)
        shed = await c.get("/work", headers={"x-request-id": "shed-1"})
        held.release.set()
        await first
    assert shed.status_code == 503 and shed.headers["x-request-id"] == "shed-1"



async def test_shed_requests_are_counted_in_the_gateways_metrics(gateway: Gateway) -> None:
    gateway.telemetry.enabled = True  # the unit-test gateway records nothing by default
    app = gateway.data_app()
    assert gateway.shedder is not None
    gateway.shedder.in_flight = gateway.shedder.limit  # as if that many requests were being served
    async with client(app) as c:
        for _ in range(3):
            assert (await c.post("/v2/models/digits/infer", content=b"{}")).status_code == 503
        assert (await c.get("/v2/health/ready")).status_code == 200  # never shed, never counted
    text = gateway.telemetry.prometheus_text().decode()
    assert "bluegreen_load_shed_total 3.0" in text
