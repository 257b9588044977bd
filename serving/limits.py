"""Request bodies over ASGI, capped while they stream in: :func:`read_body` for the model server's and the
gateway's ASGI front ends (in-process use), :class:`BodyLimitMiddleware` for a framework app (the admin API).

A declared ``Content-Length`` over the limit is refused before any byte is read; a chunked body (no length)
is counted as it arrives and refused the moment it passes the limit, so memory stays bounded either way.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import BadRequest, PayloadTooLarge, error_response


async def read_body(headers: list[tuple[bytes, bytes]], receive: Receive, limit: int) -> bytes | None:
    """The whole body of an ASGI request (``headers`` with lower-case names), or None when the client went away
    first; BadRequest for a malformed Content-Length, PayloadTooLarge past ``limit``."""
    for key, value in headers:
        if key == b"content-length":
            if not value.isdigit():
                raise BadRequest("invalid Content-Length")
            if int(value) > limit:
                raise PayloadTooLarge(f"request body of {int(value)} bytes exceeds the limit of {limit} bytes")
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > limit:
                    message = (f"request body of {declared} bytes exceeds the limit of {limit} bytes" if declared >= 0
                               else "invalid Content-Length")
                    status = 413 if declared >= 0 else 400
                    await error_response(status, message, {"connection": "close"})(scope, receive, send)
                    return
                break
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as exc:
            # An app with its own ServingError handler answers 413 itself; any other app lets the error
            # reach this point, and the refusal must not depend on how the wrapped app handles errors.
            if not exceeded or started:
                raise
            await error_response(413, exc.message, {"connection": "close"})(scope, receive, send)
