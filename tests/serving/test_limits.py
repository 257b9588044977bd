"""serving/limits.py: BodyLimitMiddleware on tiny inline apps, declared and streamed bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from serving.errors import ServingError, render
from serving.limits import BodyLimitMiddleware

LIMIT = 1000


class Echo:
    """An app that reads the whole body and says how long it was; counts how often it was called."""

    def __init__(self) -> None:
        self.calls = 0

    async def endpoint(self, request: Request) -> Response:
        self.calls += 1
        return JSONResponse({"received": len(await request.body())})

    def app(self, *, with_handler: bool = False) -> Starlette:
        async def serving_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, ServingError)
            return render(exc)

        return Starlette(routes=[Route("/", self.endpoint, methods=["POST"])],
                         middleware=[Middleware(BodyLimitMiddleware, max_bytes=LIMIT)],
                         exception_handlers={ServingError: serving_error} if with_handler else {})


def client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def chunks(n: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b"x" * size


async def test_declared_too_large_is_refused_before_the_app_runs() -> None:
    echo = Echo()
    async with client(echo.app()) as c:
        r = await c.post("/", content=b"x" * (LIMIT + 1))
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/json" and r.headers["connection"] == "close"
    assert r.json() == {"error": f"request body of {LIMIT + 1} bytes exceeds the limit of {LIMIT} bytes"}
    assert echo.calls == 0


async def test_invalid_content_length_is_a_bad_request() -> None:
    echo = Echo()
    async with client(echo.app()) as c:
        r = await c.post("/", content=b"x", headers={"content-length": "lots"})
    assert r.status_code == 400 and r.json() == {"error": "invalid Content-Length"}
    assert echo.calls == 0


@pytest.mark.parametrize("with_handler", [False, True])
async def test_streamed_too_large_is_refused(with_handler: bool) -> None:
    # Without a length httpx sends the async generator chunked; the middleware counts as chunks arrive,
    # whether or not the wrapped app has its own handler for serving errors.
    echo = Echo()
    async with client(echo.app(with_handler=with_handler)) as c:
        r = await c.post("/", content=chunks(5, 300))
    assert r.status_code == 413
    assert r.json() == {"error": f"request body exceeds the limit of {LIMIT} bytes"}


@pytest.mark.parametrize("content", [b"", b"x" * LIMIT])
async def test_bodies_within_the_limit_pass(content: bytes) -> None:
    echo = Echo()
    async with client(echo.app()) as c:
        r = await c.post("/", content=content)
    assert r.status_code == 200 and r.json() == {"received": len(content)}
    assert echo.calls == 1


async def test_streamed_bodies_within_the_limit_pass() -> None:
    echo = Echo()
    async with client(echo.app()) as c:
        r = await c.post("/", content=chunks(4, 250))
    assert r.status_code == 200 and r.json() == {"received": LIMIT}


async def test_errors_after_the_response_started_are_not_masked() -> None:
    """A too-large body noticed after the app began answering cannot become a 413: the error propagates."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive()).get("more_body"):
            pass

    async with client(BodyLimitMiddleware(app, max_bytes=LIMIT)) as c:  # type: ignore[arg-type]
        with pytest.raises(ServingError, match="exceeds the limit"):
            await c.post("/", content=chunks(5, 300))


async def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        assert (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    await BodyLimitMiddleware(app, max_bytes=1)({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert seen == ["lifespan"] and sent == [{"type": "lifespan.startup.complete"}]


def test_max_bytes_must_be_positive() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="max_bytes must be positive"):
        BodyLimitMiddleware(app, max_bytes=0)
