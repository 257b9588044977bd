"""A small asyncio TCP fault proxy for the reliability tests, on loopback only.

Modes (switch at any time with :meth:`FaultProxy.set_mode`; new data follows the new mode)::

    pass     forward both ways
    latency  forward, delaying client->server data by ``latency_s``
    hang     accept and read, forward nothing, answer nothing
    reset    answer new data with a TCP reset (SO_LINGER 0)
    close    close the connection without answering

It counts requests forwarded to the backend and the most requests in flight at once — a request is in flight
from the first client bytes of an exchange until the first server bytes back, which is exact for the small
single-segment request/response exchanges of these tests.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Literal

Mode = Literal["pass", "latency", "hang", "reset", "close"]


class FaultProxy:
    def __init__(self, target_port: int, listen_port: int = 0) -> None:
        self.target_port = target_port
        self.mode: Mode = "pass"
        self.latency_s = 0.0
        self.forwarded = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(listen_port), self._loop).result(5)

    async def _start(self, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: Mode, latency_s: float = 0.0) -> None:
        self.mode = mode
        self.latency_s = latency_s

    def reset_counters(self) -> None:
        self.forwarded = 0
        self.max_in_flight = self.in_flight

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            for _ in range(3):  # let the closed transports finish closing
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._proxy(reader, writer)
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode in ("reset", "close"):
            await reader.read(65536)
            self._reset(writer) if self.mode == "reset" else writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            self._reset(writer)
            return
        busy = [False]

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                mode = self.mode
                if mode == "hang":
                    await asyncio.sleep(3600)
                if mode in ("reset", "close"):
                    self._reset(writer) if mode == "reset" else writer.close()
                    up_writer.close()
                    return
                if mode == "latency":
                    await asyncio.sleep(self.latency_s)
                if not busy[0]:
                    busy[0] = True
                    self.forwarded += 1
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if busy[0]:
                    busy[0] = False
                    self.in_flight -= 1
                writer.write(data)
                await writer.drain()
            writer.close()

        tasks = [asyncio.ensure_future(client_to_server()), asyncio.ensure_future(server_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if busy[0]:
                self.in_flight -= 1
            for w in (writer, up_writer):
                w.close()
