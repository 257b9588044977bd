"""The data listener's handler: hand-written V2 routing, client keys, load shedding and request ids, in one class.

A request reaches :meth:`DataApp.handle` only once its body is complete (``serving.http_server`` reads it under
deadlines and limits), so the in-flight count that sheds load counts requests being served, not clients being
slow. No ASGI and no middleware chain on the hot path: each layer costs microseconds per request at the rates a
gateway runs (docs/architecture.md, "The lean request path").
"""

from __future__ import annotations

import os

import orjson
from starlette.types import Receive, Scope, Send

from gateway.dataplane import DataPlane, InferRequest, Reply
from gateway.errors import BadRequest, MethodNotAllowed, NotFound, ServingError, Unavailable
from gateway.keys import ClientGate
from gateway.settings import COLORS
from serving.http_server import Request
from serving.limits import read_body

VERSION = "0.1.0"
_JSON = [(b"content-type", b"application/json")]
_REQUEST_HEADERS = {b"inference-header-content-length": "header_length", b"x-bluegreen-key": "key",
                    b"x-bluegreen-color": "forced_color", b"x-bluegreen-timeout-ms": "timeout_ms",
                    b"content-type": "content_type", b"traceparent": "traceparent", b"tracestate": "tracestate",
                    b"cache-control": "cache_control"}


_HEALTH_PREFIX = "/v2/health"
_SERVER_META = orjson.dumps({"name": "bluegreen-gateway", "version": VERSION, "extensions": ["binary_tensor_data"]})
_LIVE = orjson.dumps({"live": True})
_READY = orjson.dumps({"ready": True})
_REQUEST_ID_MAX = 128
_MAX_ROUTES = 1024


def _json_reply(doc: object, status: int = 200) -> Reply:
    return Reply(status, orjson.dumps(doc), list(_JSON))


def _request_id(value: bytes | None) -> tuple[bytes, bool]:
    """A client's ``x-request-id`` when sane (1-128 visible ASCII characters), else a fresh one; and whether it
    was generated (the feedback store shares only ids a client chose across replicas)."""
    if value is not None and 0 < len(value) <= _REQUEST_ID_MAX and value.isascii() and all(
            0x21 <= c <= 0x7E for c in value):
        return value, False
    return _ids.next(), True


class _RandomIds:
    """Fresh request ids from the OS's CSPRNG, read 4,096 at a time: one ``getrandom`` call per 4,096 requests
    instead of one per request. Ids stay unguessable (feedback can name an answer by its id)."""

    _BATCH = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        if self._at >= len(self._pool):
            self._pool = os.urandom(12 * self._BATCH).hex().encode()
            self._at = 0
        at = self._at
        self._at = at + 24
        return self._pool[at:at + 24]


_ids = _RandomIds()


class DataApp:
    """The data listener: the V2 paths routed by hand, load shedding and request ids, in one place.

    ``/v2/models/{m}[/versions/{v}][/infer|/ready]``, the health checks and feedback. A request reaches
    :meth:`handle` only once its body is complete (the server reads it under deadlines and limits), so the
    in-flight count that sheds load counts requests being served, not clients being slow. Health probes are
    never shed. Every answer carries ``x-request-id``. :meth:`__call__` is the same app over ASGI, for
    in-process tests."""

    def __init__(self, plane: DataPlane, max_concurrency: int, max_body_bytes: int,
                 gate: ClientGate | None = None) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be positive")
        self.plane = plane
        self.gate = gate
        self.limit = max_concurrency
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0
        self.shed = 0
        self._infer_routes: dict[str, tuple[str, str | None]] = {}  # path -> (model, version), once parsed

    async def serve(self, request: Request) -> Reply:
        """The handler for :class:`~serving.http_server.HttpServer` (a :class:`Reply` is a response to it)."""
        return await self.handle(request.method, request.path, request.headers, request.body)

    async def handle(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> Reply:
        rid_header = None
        for key, value in headers:
            if key == b"x-request-id":
                rid_header = value
                break
        rid, generated = _request_id(rid_header)
        if path.startswith(_HEALTH_PREFIX):
            reply = self._health(method, path)
        elif self.gate is not None:
            reply = await self._gated(self.gate, method, path, headers, body, rid, generated)
        else:
            reply = await self._admitted(method, path, headers, body, rid, generated)
        reply.headers.append((b"x-request-id", rid))
        return reply

    async def _gated(self, gate: ClientGate, method: str, path: str, headers: list[tuple[bytes, bytes]],
                     body: bytes, rid: bytes, generated: bool) -> Reply:
        """A request under client keys: the key (401), the model in the path (403), the key's rate (429), each
        before load shedding and routing, so a refused request costs no backend and no slot in flight."""
        client = None
        model = _model_in(path)
        try:
            client = gate.authenticate(headers)
            if model is not None:
                gate.authorize(client, model)
            await gate.limit(client)
        except ServingError as exc:
            reply = _error_reply(exc)
        else:
            reply = await self._admitted(method, path, headers, body, rid, generated)
        if client is not None:
            self.plane.telemetry.record_client(client.name, model or "-", reply.status)
        return reply

    async def _admitted(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, rid: bytes,
                        generated: bool) -> Reply:
        """Shed with 503 at the in-flight limit, else route; the slot is held until the answer is ready."""
        if self.in_flight >= self.limit:
            self.shed += 1
            return Reply(503, orjson.dumps({"error": f"gateway overloaded: {self.limit} requests in flight"}),
                         [*_JSON, (b"retry-after", b"1"), (b"x-bluegreen-degraded", b"load-shed")])
        self.in_flight += 1
        try:
            return await self._route(method, path, headers, body, rid.decode(), generated)
        except ServingError as exc:
            return _error_reply(exc)
        finally:
            self.in_flight -= 1

    def _health(self, method: str, path: str) -> Reply:
        if method != "GET":
            return _error_reply(MethodNotAllowed(f"method {method} not allowed on {path}"))
        if path == "/v2/health/live":
            return Reply(200, _LIVE, list(_JSON))
        if path == "/v2/health/ready":
            return Reply(200, _READY, list(_JSON))
        return _error_reply(NotFound(f"no route for {method} {path}"))

    async def _route(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                     request_id: str, generated: bool) -> Reply:
        known = self._infer_routes.get(path)
        if known is not None and method == "POST":  # an inference path seen before: no parsing
            return await self._infer(headers, body, known[0], known[1], request_id, generated)
        parts = path.strip("/").split("/")
        if parts[:3] == ["feedback", "v1", "models"] and len(parts) == 4:
            if method != "POST":
                raise MethodNotAllowed(f"method {method} not allowed on {path}")
            return await self._feedback(body, parts[3])
        if parts[0] != "v2":
            raise NotFound(f"no route for {method} {path}")
        if len(parts) >= 3 and parts[1] == "models":
            model = parts[2]
            rest = parts[3:]
            version = None
            if len(rest) >= 2 and rest[0] == "versions":
                version = rest[1]
                rest = rest[2:]
            action = rest[0] if rest else ""
            if len(rest) > 1:
                raise NotFound(f"no route for {method} {path}")
            if action == "infer":
                if method != "POST":
                    raise MethodNotAllowed(f"method {method} not allowed on {path}")
                self.plane.store.get(model)  # 404 for a model that does not exist
                if len(self._infer_routes) >= _MAX_ROUTES:  # versions in paths are the client's: bounded
                    self._infer_routes.clear()
                self._infer_routes[path] = (model, version)
                return await self._infer(headers, body, model, version, request_id, generated)
            if method != "GET":
                raise MethodNotAllowed(f"method {method} not allowed on {path}")
            if action == "ready":
                return await self._model_ready(model, version)
            if action == "":
                return self._model_metadata(model, version)
            raise NotFound(f"no route for {method} {path}")
        if method != "GET":
            raise MethodNotAllowed(f"method {method} not allowed on {path}")
        if parts == ["v2"]:
            return Reply(200, _SERVER_META, list(_JSON))
        raise NotFound(f"no route for {method} {path}")

    async def _feedback(self, body: bytes, model: str) -> Reply:
        self.plane.store.get(model)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"malformed JSON: {exc}") from None
        return _json_reply(await self.plane.feedback.record(model, doc))

    async def _infer(self, headers: list[tuple[bytes, bytes]], body: bytes, model: str, version: str | None,
                     request_id: str, generated: bool) -> Reply:
        req = InferRequest(model, body, version=version, request_id=request_id, request_id_generated=generated)
        for key, value in headers:
            field = _REQUEST_HEADERS.get(key)
            if field is not None:
                setattr(req, field, value if field == "key" else value.decode("latin-1"))
        return await self.plane.infer(req)

    async def _model_ready(self, model: str, version: str | None) -> Reply:
        state = self.plane.store.get(model)
        if version is not None:  # a pinned version is served by its color whatever that color's weight
            color = state.color_of_version(version)
            if color is None:
                raise NotFound(f"no color of model {model!r} serves version {version!r}")
            ready = await self.plane.model_ready(model, (color,))
            ok = ready[color]
        else:
            ready = await self.plane.model_ready(model)
            ok = any(ready.values())
        return _json_reply({"name": model, "ready": ok, "colors": ready}, 200 if ok else 503)

    def _model_metadata(self, model: str, version: str | None) -> Reply:
        state = self.plane.store.get(model)
        color = state.stable
        if version is not None:
            found = state.color_of_version(version)
            if found is None:
                raise NotFound(f"no color of model {model!r} serves version {version!r}")
            color = found
        sig = self.plane.signature(state, color)
        if sig is None:
            raise Unavailable(f"metadata of {model!r} is not known yet: no backend has answered")
        versions = sorted({state.colors[c].version for c in COLORS})
        return _json_reply({"name": model, "versions": versions, "platform": "onnxruntime_onnx",
                            "inputs": [s.as_json() for s in sig.inputs],
                            "outputs": [s.as_json() for s in sig.outputs]})

    # ------------------------------------------------------------------ ASGI, for in-process tests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = [(k.lower(), v) for k, v in scope["headers"]]
        try:
            body = await read_body(headers, receive, self.max_body_bytes)
            if body is None:  # the client went away: nothing to answer
                return
        except ServingError as exc:
            reply = _error_reply(exc)
            reply.headers.append((b"connection", b"close"))
        else:
            reply = await self.handle(scope["method"], scope["path"], headers, body)
        out = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
        await send({"type": "http.response.start", "status": reply.status, "headers": out})
        await send({"type": "http.response.body", "body": reply.body})


def _model_in(path: str) -> str | None:
    """The model a data-plane path names (``/v2/models/{m}/...``, ``/feedback/v1/models/{m}``), else None."""
    parts = path.split("/", 5)
    if len(parts) > 3 and parts[1] == "v2" and parts[2] == "models":
        return parts[3] or None
    if len(parts) > 4 and parts[1] == "feedback" and parts[3] == "models":
        return parts[4] or None
    return None


def _error_reply(exc: ServingError) -> Reply:
    headers = [*_JSON, *((k.encode(), v.encode()) for k, v in exc.headers.items())]
    if isinstance(exc, Unavailable):
        headers.append((b"x-bluegreen-degraded", b"unavailable"))
    return Reply(exc.status, orjson.dumps({"error": exc.message}), headers)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

