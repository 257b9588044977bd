"""Prediction payload logging: a sampled share of each model's answered requests, as CloudEvents JSON records.

Why: online accuracy says *that* a version got worse; the requests and answers themselves say *why* (a client
sending a new population, a version answering one class differently), and are what a data scientist studies
drift on. KServe's inference logger and BentoML's monitor give users the same.

The request path pays for this only when the model's share selects a request: a share of 0 costs the caller's one
integer test, a share above 0 one counter step (the shadow's deterministic stride: exactly ``percent`` in every
100) and, for the selected ones, a ``put_nowait`` of references to the bytes already in hand. Nothing is parsed
or encoded there. A writer task takes records off the bounded queue, turns each into JSON on a worker thread
(the request and answer bodies are parsed only there) and hands batches to the sink: rotating JSON-lines files
(``predictions.jsonl``, ``.1`` newest rotated, up to ``max_files`` in all, each under ``max_file_bytes`` unless
one record alone is larger) or an HTTP endpoint, one POST per batch in CloudEvents' batched mode. A full queue,
a sink that fails and a gateway without a sink drop records, counted in
``bluegreen_payload_records_total{outcome="dropped"}``: never retried, never waited for.

A record (CloudEvents 1.0 structured mode, ``type`` ``io.bluegreen.prediction.v1``)::

    {"specversion": "1.0", "id": "...", "source": "/bluegreen/gateway/<host>", "type": "...", "time": "...",
     "subject": "<model>", "datacontenttype": "application/json",
     "data": {"request_id": ..., "client_id": ..., "model": ..., "color": ..., "version": ..., "cache": "miss",
              "latency_ms": 3.1, "inputs": [V2 tensors as sent], "outputs": [V2 tensors as answered]}}

Binary tensors (the V2 binary extension) are decoded into plain ``data`` lists; a model whose routing entry says
``payload_log_inputs: false`` gets ``"inputs": null, "inputs_omitted": true`` (outputs are kept).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import itertools
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from gateway.settings import ModelRoute, PayloadLogSettings
from gateway.telemetry import Telemetry
from serving.protocol import DATATYPES

log = logging.getLogger(__name__)

__all__ = ["FileSink", "HttpSink", "PayloadLog", "tensors"]

_STRIDE = 37  # the router's and the shadow's spread: exactly ``percent`` of every 100 requests, interleaved
EVENT_TYPE = "io.bluegreen.prediction.v1"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
FILE_NAME = "predictions.jsonl"


@dataclass(slots=True)
class Pending:
    """One selected request, as the request path had it: references only, nothing copied or parsed."""

    model: str
    color: str
    version: str
    request_id: str | None
    client_id: str | None
    body: bytes
    header_length: str | None
    answer: bytes
    answer_header_length: int | None
    latency_s: float
    cache: str
    time: float
    inputs: bool


class Sink(Protocol):
    name: str

    async def write(self, lines: list[bytes]) -> None:
        """Take a batch of encoded records (each one JSON object, no newline); raise when they were not taken."""


def tensors(body: bytes, header_length: int | None, key: str) -> list[dict[str, Any]]:
    """A V2 body's ``inputs`` or ``outputs`` as JSON tensors: binary ones (``binary_data_size``) decoded from the
    body's tail into ``data`` lists (``BYTES`` ones as ``data_base64``), in the order the tail holds them."""
    if header_length is None:
        header, tail = orjson.loads(body), b""
    else:
        header, tail = orjson.loads(body[:header_length]), body[header_length:]
    found = header.get(key) if isinstance(header, dict) else None
    out: list[dict[str, Any]] = []
    offset = 0
    for tensor in found if isinstance(found, list) else []:
        params = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if isinstance(size, int) and "data" not in tensor:
            chunk = tail[offset:offset + size]
            offset += size
            rest = {k: v for k, v in tensor.items() if k != "parameters"}
            dtype = DATATYPES.get(str(tensor.get("datatype")))
            if dtype is None:
                rest["data_base64"] = base64.b64encode(chunk).decode()
            else:
                rest["data"] = np.frombuffer(chunk, dtype).tolist()
            tensor = rest
        out.append(tensor)
    return out


def record(p: Pending, source: str) -> bytes:
    """One CloudEvents record, encoded (run on the writer's thread: this is where the bodies are parsed)."""
    data: dict[str, Any] = {
        "request_id": p.request_id, "client_id": p.client_id, "model": p.model, "color": p.color,
        "version": p.version, "cache": p.cache, "latency_ms": round(p.latency_s * 1000, 3),
        "inputs": tensors(p.body, None if p.header_length is None else int(p.header_length), "inputs")
        if p.inputs else None,
        "outputs": tensors(p.answer, p.answer_header_length, "outputs"),
    }
    if not p.inputs:
        data["inputs_omitted"] = True
    when = dt.datetime.fromtimestamp(p.time, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return orjson.dumps({"specversion": "1.0", "id": uuid.uuid4().hex, "source": source, "type": EVENT_TYPE,
                         "time": when, "subject": p.model, "datacontenttype": "application/json", "data": data})


class FileSink:
    """JSON lines in ``<dir>/predictions.jsonl``, rotated before a file would pass ``max_bytes``; ``max_files``
    files are kept in all (``.1`` the newest rotated one). Writes run on a worker thread, one batch at a time."""

    name = "file"

    def __init__(self, directory: Path, max_bytes: int, max_files: int) -> None:
        self.path = directory / FILE_NAME
        self.max_bytes = max_bytes
        self.max_files = max_files
        self._size = -1  # unknown until the file is opened (a restart appends to what is there)

    async def write(self, lines: list[bytes]) -> None:
        await asyncio.to_thread(self._write, lines)

    def _write(self, lines: list[bytes]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._size < 0:
            self._size = self.path.stat().st_size if self.path.exists() else 0
        f = self.path.open("ab")
        try:
            for line in lines:
                n = len(line) + 1
                if self._size and self._size + n > self.max_bytes:
                    f.close()
                    self._rotate()
                    f = self.path.open("ab")
                    self._size = 0
                f.write(line + b"\n")
                self._size += n
        finally:
            f.close()

    def _rotate(self) -> None:
        def rotated(i: int) -> Path:
            return self.path.with_name(f"{FILE_NAME}.{i}")

        with contextlib.suppress(FileNotFoundError):
            if self.max_files == 1:
                self.path.unlink()
                return
            rotated(self.max_files - 1).unlink()
        for i in range(self.max_files - 2, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                rotated(i).replace(rotated(i + 1))
        self.path.replace(rotated(1))


Post = Callable[[str, bytes, Mapping[str, str], float], Awaitable[Any]]


class HttpSink:
    """One POST per batch, a JSON array of records (CloudEvents batched mode); any answer but 2xx fails it."""

    name = "http"

    def __init__(self, url: str, post: Post, timeout_s: float) -> None:
        self.url = url
        self._post = post  # the gateway's upstream client: its pools, its CA settings
        self.timeout_s = timeout_s

    async def write(self, lines: list[bytes]) -> None:
        resp = await self._post(self.url, b"[" + b",".join(lines) + b"]", {"content-type": BATCH_CONTENT_TYPE},
                                self.timeout_s)
        if not 200 <= resp.status < 300:
            raise OSError(f"the payload sink answered {resp.status}")


class PayloadLog:
    """The sampler (request path) and the writer task (off it); see the module docstring."""

    def __init__(self, settings: PayloadLogSettings, telemetry: Telemetry, routes: Mapping[str, ModelRoute],
                 post: Post | None = None) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.sink: Sink | None = None
        if settings.dir is not None:
            self.sink = FileSink(settings.dir, settings.max_file_bytes, settings.max_files)
        elif settings.url is not None and post is not None:
            self.sink = HttpSink(settings.url, post, settings.http_timeout_s)
        self._inputs = {name: r.payload_log_inputs for name, r in routes.items()}
        self._counters: dict[str, itertools.count[int]] = {}
        self._queue: asyncio.Queue[Pending] = asyncio.Queue(settings.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_error_log = float("-inf")
        self.source = f"/bluegreen/gateway/{socket.gethostname()}"

    # ------------------------------------------------------------------ request path

    def maybe_log(self, model: str, percent: int, color: str, version: str, request_id: str | None,
                  client_id: str | None, body: bytes, header_length: str | None, answer: bytes,
                  answer_header_length: int | None, latency_s: float, cache: str) -> None:
        """Queue this answered request if the model's share selects it (the caller checked ``percent > 0``)."""
        counter = self._counters.get(model)
        if counter is None:
            counter = self._counters[model] = itertools.count()
        if (next(counter) * _STRIDE) % 100 >= percent:
            return
        if self.sink is None or self._closing:
            self._count(model, "dropped")
            return
        try:
            self._queue.put_nowait(Pending(model, color, version, request_id, client_id, body, header_length, answer,
                                           answer_header_length, latency_s, cache, time.time(),
                                           self._inputs.get(model, True)))
        except asyncio.QueueFull:
            self._count(model, "dropped")

    # ------------------------------------------------------------------ the writer

    def start(self) -> None:
        if self.sink is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="payload-log")

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records, write what is queued (within ``timeout_s``; for an HTTP sink at most one batch's
        wait and deadline: a sink that hangs must not hold a shutdown for every batch), stop the writer."""
        self._closing = True
        if self._task is None:
            return
        if isinstance(self.sink, HttpSink):
            timeout_s = min(timeout_s, self.settings.flush_s + self.settings.http_timeout_s)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            if isinstance(self.sink, HttpSink):  # a POST per record would cost the sink more than the records
                until = loop.time() + self.settings.flush_s
                while len(batch) < self.settings.batch_size and (left := until - loop.time()) > 0:
                    try:
                        batch.append(await asyncio.wait_for(self._queue.get(), left))
                    except TimeoutError:
                        break
            while len(batch) < self.settings.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write(self, batch: list[Pending]) -> None:
        assert self.sink is not None
        try:
            lines = await asyncio.to_thread(self._encode, batch)
            encoded = [line for line in lines if line is not None]
            if encoded:
                await self.sink.write(encoded)
        except Exception as exc:  # a sink that is down loses the batch, counted; the next batch tries again
            for p in batch:
                self._count(p.model, "dropped")
            now = time.monotonic()
            if now - self._last_error_log > 60:
                self._last_error_log = now
                log.warning("payload log: %s sink failed, %d records dropped: %s", self.sink.name, len(batch), exc)
            return
        for p, line in zip(batch, lines, strict=True):
            self._count(p.model, "logged" if line is not None else "dropped")

    def _encode(self, batch: list[Pending]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for p in batch:
            try:
                out.append(record(p, self.source))
            except (ValueError, TypeError, KeyError):  # an answer that is not V2 JSON: not loggable
                out.append(None)
        return out

    def _count(self, model: str, outcome: str) -> None:
        self.telemetry.payload_records.inc((model, outcome))

    def describe(self, model: str, percent: int) -> dict[str, Any]:
        """What ``/admin/v1/models/{m}/payload-log`` shows: the share, the privacy setting, the sink, the counts."""
        return {"percent": percent, "inputs_logged": self._inputs.get(model, True),
                "sink": None if self.sink is None else self.sink.name, "queued": self.queued, **self.counts(model)}

    def counts(self, model: str) -> dict[str, int]:
        series = self.telemetry.payload_records.series
        return {o: int(series.get((model, o), 0)) for o in ("logged", "dropped")}

    @property
    def queued(self) -> int:
        return self._queue.qsize()
