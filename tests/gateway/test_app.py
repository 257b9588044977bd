"""gateway/app.py: the data listener's hand-written routing, in-process, with no backend at all.

The data plane's upstream session is never started: any path that tried to call a backend would fail with an
AssertionError raised through the transport, so every 4xx/503 below also proves that no backend was called.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.app import VERSION, Gateway
from gateway.settings import COLORS
from tests.gateway.support import client

INFER = "/v2/models/digits/infer"


def infer_body(**override: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}
    tensor.update(override)
    return {"id": "r1", "inputs": [tensor]}


@pytest.fixture
async def data(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with client(gateway.data_app()) as c:
        yield c


def no_attempts(gateway: Gateway) -> bool:
    """Nothing entered any color's window, and no backend has a request outstanding."""
    return all(rt.snapshot().count == 0 for rt in gateway.plane.runtimes()) and all(
        b.outstanding == 0 for rt in gateway.plane.runtimes() for b in rt.backends)


async def test_gateway_health_does_not_depend_on_backends(data: httpx.AsyncClient, gateway: Gateway) -> None:
    for rt in gateway.plane.runtimes():  # every backend known dead
        for backend in rt.backends:
            backend.breaker.force_open()
    r = await data.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}
    assert (await data.get("/v2/health/live")).json() == {"live": True}
    r = await data.get("/v2")
    assert r.json() == {"name": "bluegreen-gateway", "version": VERSION, "extensions": ["binary_tensor_data"]}
    # The model's readiness does reflect the backends.
    r = await data.get("/v2/models/digits/ready")
    assert r.status_code == 503 and r.json() == {"name": "digits", "ready": False, "colors": {"blue": False}}


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v2/models/nope"), ("POST", "/v2/models/nope/infer"), ("GET", "/v2/models/nope/ready"),
    ("POST", "/v2/models/nope/versions/1/infer"), ("GET", "/"), ("GET", "/v1/models/digits"),
    ("GET", "/v2/health"), ("GET", "/v2/models/digits/explain"), ("POST", "/v2/models/digits/infer/more"),
    ("GET", "/v2/models/digits/versions/9"), ("POST", "/v2/models/digits/versions/9/infer"),
])
async def test_unknown_routes_models_and_versions_are_404_json(data: httpx.AsyncClient, gateway: Gateway,
                                                               method: str, path: str) -> None:
    r = await data.request(method, path, json=infer_body())
    assert r.status_code == 404, r.text
    assert r.headers["content-type"] == "application/json" and set(r.json()) == {"error"}
    assert no_attempts(gateway)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", INFER), ("PUT", INFER), ("DELETE", "/v2/models/digits"), ("POST", "/v2/models/digits/ready"),
    ("POST", "/v2/health/ready"), ("POST", "/v2"),
])
async def test_wrong_method_is_405_json(data: httpx.AsyncClient, method: str, path: str) -> None:
    r = await data.request(method, path)
    assert r.status_code == 405, r.text
    assert r.headers["content-type"] == "application/json" and "not allowed" in r.json()["error"]


@pytest.mark.parametrize(("case", "body"), [
    ("malformed JSON", b'{"inputs": [{"name": "input"'),
    ("not JSON", b"\x00\x01\x02"),
    ("empty", b""),
    ("not an object", b"[1, 2, 3]"),
    ("no inputs", b"{}"),
    ("wrong input name", orjson.dumps(infer_body(name="pixels"))),
    ("wrong datatype", orjson.dumps(infer_body(datatype="INT64"))),
    ("wrong element count", orjson.dumps(infer_body(data=[0.0] * 63))),
    ("wrong rank", orjson.dumps(infer_body(shape=[64]))),
    ("wrong feature size", orjson.dumps(infer_body(shape=[1, 32], data=[0.0] * 32))),
])
async def test_bad_infer_bodies_are_400_without_an_upstream_call(data: httpx.AsyncClient, gateway: Gateway,
                                                                 case: str, body: bytes) -> None:
    r = await data.post(INFER, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    assert no_attempts(gateway)


async def test_oversized_bodies_are_413(data: httpx.AsyncClient, gateway: Gateway) -> None:
    limit = gateway.settings.max_body_bytes
    r = await data.post(INFER, content=b" " * (limit + 1))
    assert r.status_code == 413 and set(r.json()) == {"error"}

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(limit // 1000 + 2):
            yield b" " * 1000

    r = await data.post(INFER, content=chunked())
    assert r.status_code == 413 and set(r.json()) == {"error"}
    assert no_attempts(gateway)


async def test_request_headers_are_checked_before_any_call(data: httpx.AsyncClient, gateway: Gateway) -> None:
    body = orjson.dumps(infer_body())
    r = await data.post(INFER, content=body, headers={"x-bluegreen-color": "green"})
    assert r.status_code == 400 and "not allowed" in r.json()["error"]  # overrides are off by default
    for timeout in ("soon", "0", "-5"):
        r = await data.post(INFER, content=body, headers={"x-bluegreen-timeout-ms": timeout})
        assert r.status_code == 400, timeout
    r = await data.post(INFER, content=body, headers={"inference-header-content-length": "99999"})
    assert r.status_code == 400
    assert no_attempts(gateway)


async def test_both_colors_down_is_503_with_retry_after_and_no_call(data: httpx.AsyncClient,
                                                                    gateway: Gateway) -> None:
    for color in COLORS:
        gateway.plane.runtime("digits", color).backends[0].breaker.force_open()
    r = await data.post(INFER, content=orjson.dumps(infer_body()), headers={"x-request-id": "req-7"})
    assert r.status_code == 503
    assert r.headers["retry-after"] == str(int(gateway.settings.breaker.open_s))
    assert r.headers["x-bluegreen-degraded"] == "unavailable"
    assert r.headers["x-request-id"] == "req-7"
    assert "circuit open" in r.json()["error"]
    assert no_attempts(gateway)  # a refusal by the breakers is no attempt: no window counts it
    assert (await data.get("/v2/health/ready")).status_code == 200  # the gateway stays ready


async def test_model_metadata_from_the_learned_signature(data: httpx.AsyncClient) -> None:
    r = await data.get("/v2/models/digits")
    assert r.status_code == 200
    doc = r.json()
    assert doc["name"] == "digits" and doc["versions"] == ["1", "2"]
    assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
    assert (await data.get("/v2/models/digits/versions/2")).status_code == 200


async def test_request_ids_wrap_the_data_app(data: httpx.AsyncClient, gateway: Gateway) -> None:
    r = await data.get("/v2/models/nope", headers={"x-request-id": "abc"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "abc"
    generated = (await data.get("/v2/health/ready")).headers["x-request-id"]
    assert len(generated) == 24
