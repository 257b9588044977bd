"""Request ids: propagate a client's ``x-request-id`` (when sane) or generate one; echo it on the response
and leave it in ``scope["state"]["request_id"]`` for the upstream call and logs.
``scope["state"]["request_id_generated"]`` says whether the gateway made it up (the feedback store shares only
ids a client chose across replicas)."""

from __future__ import annotations

import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_MAX_LEN = 128


def _acceptable(value: bytes) -> bool:
    return 0 < len(value) <= _MAX_LEN and all(0x21 <= c <= 0x7E for c in value)


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = b""
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value
                break
        generated = not _acceptable(rid)
        if generated:
            rid = os.urandom(12).hex().encode()
        state = scope.setdefault("state", {})
        state["request_id"] = rid.decode()
        state["request_id_generated"] = generated
        header = (b"x-request-id", rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
