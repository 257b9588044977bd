"""The gateway process: a data listener (V2 endpoints for client apps) and an admin listener, one event loop.

Both listeners run on ``serving.http_server`` — a lean HTTP/1.1 server that reads each request whole, under
header and body deadlines and size limits, before any handler sees it. The data listener's handler is
:class:`DataApp`: hand-written V2 routing, load shedding and request ids in one class, over the data plane
(no ASGI and no middleware chain on the hot path). The admin app is Starlette, served through an ASGI adapter
with the same limits. Both share one :class:`Gateway`, which owns the state store and the data plane;
:func:`run` starts both listeners and, on SIGTERM, stops accepting, lets in-flight requests finish, closes
the upstream pool and exits 0.

The gateway's own ``/v2/health/ready`` means *the gateway* can serve (config loaded, listeners up), not that
backends are healthy: a gateway with both colors down still answers clients with clear 503s (or, with the
cache, stale answers). ``/v2/models/{m}/ready`` reflects the backends.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admin import create_admin_app
from gateway.auth import Authenticator
from gateway.breaker import STATE_CODES
from gateway.cache import PredictionCache, RedisL2
from gateway.canary import Phase
from gateway.controller import Controller
from gateway.dataplane import DataPlane, InferRequest, Reply
from gateway.errors import BadRequest, MethodNotAllowed, NotFound, ServingError, Unavailable
from gateway.release import Release
from gateway.settings import COLORS, GatewaySettings
from gateway.sources import LocalMetrics, MergedMetrics, MetricsPublisher
from gateway.state import MemoryStateStore, StateStore
from gateway.state_redis import Lease, RedisStateStore
from gateway.telemetry import Telemetry
from serving.http_server import AsgiHandler, HttpServer, Request
from serving.lifecycle import serve_together, tune_gc
from serving.limits import read_body

log = logging.getLogger("bluegreen.gateway")

VERSION = "0.1.0"
_JSON = [(b"content-type", b"application/json")]
_REQUEST_HEADERS = {b"inference-header-content-length": "header_length", b"x-bluegreen-key": "key",
                    b"x-bluegreen-color": "forced_color", b"x-bluegreen-timeout-ms": "timeout_ms",
                    b"content-type": "content_type", b"traceparent": "traceparent", b"tracestate": "tracestate",
                    b"cache-control": "cache_control"}


@dataclass
class Gateway:
    settings: GatewaySettings
    store: StateStore
    plane: DataPlane
    auth: Authenticator
    telemetry: Telemetry
    release: Release
    controller: Controller
    lease: Lease | None = None
    publisher: MetricsPublisher | None = None
    data: DataApp | None = None
    listeners: dict[str, HttpServer] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Gateway:
        routing = settings.routing()
        store: StateStore
        if settings.redis_url:
            store = RedisStateStore(settings.redis_url, routing)
        else:
            store = MemoryStateStore.from_routing(routing, settings.state_file)
        cache = None
        if settings.cache.enabled:
            l2 = None
            if settings.redis_url:
                l2 = RedisL2(settings.redis_url, settings.cache.redis_timeout_s, settings.cache.redis_max_connections)
            cache = PredictionCache(settings.cache, l2)
        telemetry = Telemetry(settings.telemetry)
        plane = DataPlane(settings, store, cache, telemetry, routes=routing.models)
        auth = Authenticator(settings.tokens(), settings.auth_max_failures, settings.auth_window_s)
        release = Release(store, settings.validation_repo, {name: r.canary for name, r in routing.models.items()})
        if isinstance(store, RedisStateStore):
            plane.feedback.redis = store.redis  # answers are shared, so feedback may reach any replica
            # Replicas share state; one of them, the lease holder, runs the rollouts on everyone's numbers.
            lease = Lease(store)
            store.fence = lease.current
            controller = Controller(release, MergedMetrics(store, plane), is_leader=lease.is_leader,
                                    window_s=settings.window_s)
            publisher = MetricsPublisher(store, plane, window_s=settings.window_s)
            gateway = cls(settings, store, plane, auth, telemetry, release, controller, lease, publisher)
        else:
            gateway = cls(settings, store, plane, auth, telemetry, release,
                          Controller(release, LocalMetrics(plane), window_s=settings.window_s))
        gateway._register_gauges()
        return gateway

    def _register_gauges(self) -> None:
        plane, store = self.plane, self.store

        def breakers() -> Iterator[tuple[tuple[str, ...], float]]:
            for rt in plane.runtimes():
                for b in rt.backends:
                    yield (rt.model, rt.color, b.url), STATE_CODES[b.breaker.state]

        def weights() -> Iterator[tuple[tuple[str, ...], float]]:
            for name, state in store.models.items():
                for color in COLORS:
                    yield (name, color), state.weights[color]

        def in_flight() -> Iterator[tuple[tuple[str, ...], float]]:
            yield (), self.data.in_flight if self.data is not None else plane.in_flight

        def canary_stage() -> Iterator[tuple[tuple[str, ...], float]]:
            for name, state in store.models.items():
                yield (name,), state.canary.stage

        def canary_phase() -> Iterator[tuple[tuple[str, ...], float]]:
            for name, state in store.models.items():
                current = state.canary.phase
                for phase in Phase:
                    yield (name, phase.value), float(phase == current)

        def shadow_agreement() -> Iterator[tuple[tuple[str, ...], float]]:
            for name in store.models:
                ratio, samples = plane.shadow.agreement(name)
                if samples:
                    yield (name,), float(ratio or 0.0)

        def online_accuracy() -> Iterator[tuple[tuple[str, ...], float]]:
            for name, state in store.models.items():
                for color in COLORS:
                    labelled, correct = plane.feedback.counts(name, state.colors[color].version)
                    if labelled:
                        yield (name, color), correct / labelled

        t = self.telemetry
        t.gauge("bluegreen_canary_stage", "Current canary stage (1-based; 0 idle; stages+1 promoting).",
                ("model",), canary_stage)
        t.gauge("bluegreen_canary_phase", "1 for the current canary phase of each model.", ("model", "phase"),
                canary_phase)
        t.gauge("bluegreen_shadow_agreement_ratio", "Share of shadow copies that agreed with the answer given.",
                ("model",), shadow_agreement)
        t.gauge("bluegreen_online_accuracy_ratio", "Accuracy from feedback, per color's current version.",
                ("model", "color"), online_accuracy)
        t.gauge("bluegreen_breaker_state", "Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
                    ("model", "color", "backend"), breakers)
        t.gauge("bluegreen_split_weight", "Traffic weight per color, percent.", ("model", "color"), weights)
        t.gauge("bluegreen_in_flight_requests", "Requests in flight on the data listener.", (), in_flight)

    async def start(self) -> None:
        await self.plane.start()
        await self.store.start()
        self.telemetry.start_exporters()
        if self.lease is not None:
            self.lease.start()
        if self.publisher is not None:
            self.publisher.start()
        self.controller.start()

    async def close(self) -> None:
        await self.controller.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        if self.lease is not None:
            await self.lease.stop()
        await self.plane.close()
        self.telemetry.shutdown()
        await self.store.aclose()

    def data_app(self) -> DataApp:
        if self.data is None:
            data = self.data = DataApp(self.plane, self.settings.max_concurrency, self.settings.max_body_bytes)
            self.telemetry.load_shed = lambda: data.shed
        return self.data

    def admin_app(self) -> ASGIApp:
        return create_admin_app(self.release, self.plane, self.auth,
                                require_if_match=self.settings.admin.require_if_match)


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

    def __init__(self, plane: DataPlane, max_concurrency: int, max_body_bytes: int) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be positive")
        self.plane = plane
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
        elif self.in_flight >= self.limit:
            self.shed += 1
            reply = Reply(503, orjson.dumps({"error": f"gateway overloaded: {self.limit} requests in flight"}),
                          [*_JSON, (b"retry-after", b"1"), (b"x-bluegreen-degraded", b"load-shed")])
        else:
            self.in_flight += 1
            try:
                reply = await self._route(method, path, headers, body, rid.decode(), generated)
            except ServingError as exc:
                reply = _error_reply(exc)
            finally:
                self.in_flight -= 1
        reply.headers.append((b"x-request-id", rid))
        return reply

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


async def run_gateway(settings: GatewaySettings) -> None:
    gateway = Gateway.from_settings(settings)
    if not gateway.auth.enabled:
        log.warning("no admin tokens configured: the admin API refuses every request")
    await gateway.start()
    limits = settings.limits.for_listener(settings.max_body_bytes)
    graceful = settings.graceful_shutdown_s
    data = HttpServer(gateway.data_app().serve, settings.data.host, settings.data.port, limits=limits,
                      graceful_s=graceful, name="data")
    admin = HttpServer(AsgiHandler(gateway.admin_app()), settings.admin.host, settings.admin.port,
                       limits=limits, graceful_s=graceful, name="admin")
    gateway.listeners = {"data": data, "admin": admin}
    try:
        await data.start()
        await admin.start()
        log.info("gateway data on http://%s:%d, admin on http://%s:%d", settings.data.host, data.port,
                 settings.admin.host, admin.port)
        await serve_together([data, admin])
    finally:
        await gateway.close()


def _tune_process() -> None:
    """Open-file limit: the soft limit up to the hard one (two listeners of up to ``max_connections`` each, plus
    the upstream pools, need more than the usual 1,024). malloc: blocks of 128 KiB and more (request bodies)
    come from mmap and go back to the system when freed; glibc otherwise raises that threshold after the first
    big body is freed, and later bodies stay in its heap (RSS 169 MB instead of 81 MB 10 s after 16 bodies of
    16 MiB)."""
    import ctypes
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def run(settings: GatewaySettings) -> int:
    import uvloop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _tune_process()
    tune_gc()
    uvloop.run(run_gateway(settings))
    return 0

