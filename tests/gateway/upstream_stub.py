"""A tiny real HTTP/1.1 server on a loopback port standing in for one model server in in-process tests.

It answers every POST with a V2 JSON answer whose ``label`` the test chose (so a reply shows which server gave
it), or with what the test scripted: another status, a connection dropped without an answer, or a hang until the
test releases it. It counts the requests it read. Keep-alive, like the model server, so the gateway's connection
pool behaves as it does in production.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal

import orjson

Behaviour = Literal["answer", "close", "hang"]


class StubUpstream:
    def __init__(self, label: int) -> None:
        self.label = label
        self.status = 200
        self.behaviour: Behaviour = "answer"
        self.calls = 0
        self.paths: list[str] = []
        self.release = asyncio.Event()  # lets "hang" requests go on (with the scripted status)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        """Stop listening and end every connection's handler (none is left for the loop to cancel)."""
        if self._server is not None:
            self._server.close()
            self.release.set()
            for w in list(self._writers):
                w.close()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=5)
            await self._server.wait_closed()

    def answer(self, request_id: object) -> bytes:
        doc: dict[str, object] = {"model_name": "digits", "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [1], "data": [self.label]},
            {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}]}
        if isinstance(request_id, str):
            doc["id"] = request_id
        return orjson.dumps(doc)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, path, _ = head[0].split(" ", 2)
                length = 0
                for line in head[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                if method != "POST":
                    writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}")
                    await writer.drain()
                    continue
                self.calls += 1
                self.paths.append(path)
                if self.behaviour == "close":
                    return
                if self.behaviour == "hang":
                    await self.release.wait()
                try:
                    request_id = orjson.loads(body).get("id")
                except (orjson.JSONDecodeError, AttributeError):
                    request_id = None
                payload = self.answer(request_id) if self.status == 200 else b'{"error":"scripted"}'
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (self.status, len(payload), payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def stubs(*labels: int) -> AsyncIterator[list[StubUpstream]]:
    """Started stub servers, one per label, closed afterwards."""
    started = [StubUpstream(label) for label in labels]
    try:
        for s in started:
            await s.start()
        yield started
    finally:
        for s in started:
            await s.close()
