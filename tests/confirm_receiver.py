"""A confirm gate for tests: a real HTTP server on a loopback port, in a thread of the test process.

It answers every POST with the status the test sets (``receiver.status = 200``), after ``delay_s`` if set (a
gate that answers too late) or a byte every ``drip_s`` (a gate that never quite stops answering), and keeps
every JSON body it got, so a test shows both sides: what the gateway sent and what the rollout did with the
answer. A thread, not the test's event loop, so the same receiver serves an in-process controller (which awaits
the call on that loop) and a gateway process alike.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson


class ConfirmReceiver:
    """Also the webhook receiver of the notification tests: ``got`` keeps each request's headers (lower-cased)
    and raw body, what a signature is checked over; ``port`` binds a chosen port (one a sink was pointed at
    before the receiver came up)."""

    def __init__(self, status: int = 503, port: int = 0) -> None:
        self.status = status
        self.delay_s = 0.0
        self.drip_s = 0.0
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.got: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def url(self, path: str = "/confirm") -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def received(self, gate: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [b for b in self.bodies if gate is None or b.get("gate") == gate]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.bodies.append(orjson.loads(raw))
                    receiver.paths.append(self.path)
                    receiver.got.append(({k.lower(): v for k, v in self.headers.items()}, raw))
                    status, delay, drip = receiver.status, receiver.delay_s, receiver.drip_s
                if delay:
                    time.sleep(delay)
                body = b"{}" if not drip else b" " * 60 + b"{}"
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                for i in range(len(body)):  # dripping: one byte every drip_s, each read well within a timeout
                    if drip:
                        self.wfile.flush()
                        time.sleep(drip)
                    self.wfile.write(body[i:i + 1])

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> ConfirmReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@contextmanager
def confirm_receiver(status: int = 503) -> Iterator[ConfirmReceiver]:
    receiver = ConfirmReceiver(status).start()
    try:
        yield receiver
    finally:
        receiver.stop()
