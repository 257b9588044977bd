"""An ASGI adapter for :class:`~serving.http_server.HttpServer`, for the listeners that want a framework."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from serving.http_messages import STREAMED, Headers, Request, Response


class AsgiHandler:
    """Serve an ASGI application (HTTP scopes only, no lifespan) on :class:`HttpServer`: for listeners where
    a framework's routing is worth its cost (the admin API), with the same limits as the data listener.
    A response with a ``content-length`` is sent in one write; one without is streamed chunked."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, scheme: str = "http") -> None:
        self.app = app
        self.scheme = scheme

    async def __call__(self, request: Request) -> Response:
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": self.scheme, "path": request.path,
            "raw_path": request.path.encode(), "query_string": request.query, "root_path": "",
            "headers": request.headers, "client": request.client,
            "server": request.local_address, "state": request.state,
        }
        body_sent = False
        status = 500
        headers: Headers = []
        chunks: list[bytes] = []
        streaming = started = done = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await request.wait_disconnected()  # nothing more will come: wait for the client to go
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers, streaming, started, done
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                raw = [(bytes(k).lower(), bytes(v)) for k, v in message.get("headers", [])]
                streaming = not any(k == b"content-length" for k, _ in raw)
                headers = [(k, v) for k, v in raw if k not in (b"content-length", b"transfer-encoding", b"connection")]
            elif kind == "http.response.body" and not done:
                chunk = bytes(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if not streaming:
                    chunks.append(chunk)
                    return
                if not started:
                    request.start_stream(status, headers)
                    started = True
                request.write(chunk)
                if more:
                    await request.drain()
                else:
                    request.end_stream()
                    done = True

        await self.app(scope, receive, send)
        if streaming and started:
            if not done:
                request.end_stream()
            return STREAMED
        return Response(status, b"".join(chunks), headers)
