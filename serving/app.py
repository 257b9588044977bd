"""The V2 model server's REST layer: thin handlers over :class:`ModelServer` (the data plane).

Endpoints (Open Inference Protocol, REST)::

    GET  /v2/health/live  /v2/health/ready  /v2
    GET  /v2/models/{m}[/versions/{v}]            metadata
    GET  /v2/models/{m}[/versions/{v}]/ready
    GET  /v2/models/{m}[/versions/{v}]/stats      executions and batch sizes (Triton-style)
    GET  /metrics                                  Prometheus: queue depth, batch size, inference time
    POST /v2/models/{m}[/versions/{v}]/infer      JSON tensors or the binary tensor extension

The process is live as soon as it listens and ready once every model is loaded and warmed up; models load
on a worker thread after start-up so liveness probes answer meanwhile. A model that fails to load stops the
server with a non-zero exit status rather than leaving a half-ready process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving import protocol
from serving.batching import QueueFull
from serving.errors import InferenceFailed, NotFound, ServingError, Unavailable, exception_handlers
from serving.lifecycle import GracefulServer, tune_gc
from serving.limits import BodyLimitMiddleware
from serving.metrics import MetricSet, make_tracer, shutdown_tracing, tracing_requested
from serving.model import Model
from serving.repository import ModelRef, Repository
from serving.settings import ServingSettings

log = logging.getLogger("bluegreen.serving")

SERVER_NAME = "bluegreen"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data"]
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


class ModelServer:
    """The data plane: the loaded models, readiness and inference, independent of HTTP."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        repo = Repository(settings.repo)
        self.models: dict[tuple[str, str], Model] = {}
        self.latest: dict[str, str] = {}
        for text in settings.models:
            name, version, folder = repo.resolve(ModelRef.parse(text))
            self.models[(name, version)] = Model(
                name, version, folder, device=settings.device, threads=settings.threads,
                max_batch_size=settings.max_batch_size, max_queue_delay_ms=settings.max_queue_delay_ms,
                max_queue_size=settings.max_queue_size, warmup_runs=settings.warmup_runs)
        for name, version in sorted(self.models, key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else -1)):
            self.latest[name] = version
        self.load_error: str | None = None
        self.metrics = MetricSet("bluegreen-model-server")
        self.batch_size = self.metrics.histogram(
            "bluegreen_serving_batch_size", "Rows per model run (dynamic batching).", ("model", "version"),
            bounds=BATCH_BUCKETS, unit="")
        self.inference_duration = self.metrics.histogram(
            "bluegreen_serving_inference_duration_seconds", "Time of one model run (one batch).",
            ("model", "version"))
        self.requests = self.metrics.counter(
            "bluegreen_serving_requests", "Inference requests by model, version and status code.",
            ("model", "version", "code"))

        def queue_depth() -> Iterator[tuple[tuple[str, ...], float]]:
            for (name, version), model in self.models.items():
                yield (name, version), model.batcher.queue_depth if model.batcher is not None else 0

        self.metrics.gauge("bluegreen_serving_queue_depth", "Requests waiting for a model run.",
                           ("model", "version"), queue_depth)
        self.tracer: Any = None
        self._fault_calls = 0  # --fault-error-rate spreads its errors evenly: call n fails when the count steps

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.ready for m in self.models.values())

    async def load_all(self) -> None:
        for model in self.models.values():
            await asyncio.to_thread(model.load)
            key = (model.name, model.version)

            def on_batch(rows: int, seconds: float, key: tuple[str, str] = key) -> None:
                self.batch_size.observe(key, rows)
                self.inference_duration.observe(key, seconds)

            model.start(on_batch)

    async def unload_all(self) -> None:
        for model in self.models.values():
            await model.unload()

    def versions(self, name: str) -> list[str]:
        return [v for (n, v) in self.models if n == name]

    def get(self, name: str, version: str | None) -> Model:
        if version is None:
            version = self.latest.get(name)
            if version is None:
                raise NotFound(f"unknown model {name!r}; served: {', '.join(sorted(self.latest)) or 'none'}")
        model = self.models.get((name, version))
        if model is None:
            if name not in self.latest:
                raise NotFound(f"unknown model {name!r}; served: {', '.join(sorted(self.latest))}")
            raise NotFound(f"model {name!r} has no version {version!r}; served: {', '.join(self.versions(name))}")
        return model

    async def infer(self, model: Model, body: bytes, header_length: str | None) -> tuple[bytes, int | None]:
        if not model.ready:
            raise Unavailable(f"model {model.name}:{model.version} is not ready")
        header, binary = protocol.split_body(body, header_length)
        request = protocol.check_request(header, len(binary), model.signature, self.settings.max_request_rows)
        inputs = protocol.decode_inputs(request, binary)
        s = self.settings
        if s.fault_latency_ms:
            await asyncio.sleep(s.fault_latency_ms / 1000.0)
        if s.fault_error_rate:
            # Deterministic and interleaved: exactly that fraction of calls fail, spread evenly (a drill that
            # must open a breaker "within one window" cannot depend on a lucky draw).
            n = self._fault_calls = self._fault_calls + 1
            if int(n * s.fault_error_rate) > int((n - 1) * s.fault_error_rate):
                raise InferenceFailed("injected fault (--fault-error-rate)")
        try:
            outputs = await model.predict(inputs, request.batch_size)
        except QueueFull as exc:
            raise Unavailable(str(exc)) from None
        except ServingError:
            raise
        except Exception as exc:  # onnxruntime's errors: a bad value the shape checks could not see
            log.warning("inference failed for %s:%s: %s", model.name, model.version, exc)
            raise InferenceFailed(f"inference failed: {exc}") from None
        return protocol.encode_response(model.name, model.version, request, outputs, model.signature.outputs)


def create_app(settings: ServingSettings, server: ModelServer | None = None,
               on_load_failure: Any = None) -> Starlette:
    core = server or ModelServer(settings)

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        ok = core.ready
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    def _model(request: Request) -> Model:
        return core.get(request.path_params["model"], request.path_params.get("version"))

    async def model_metadata(request: Request) -> Response:
        model = _model(request)
        if model.session is None:
            raise Unavailable(f"model {model.name}:{model.version} is still loading")
        return _json(model.metadata_json(core.versions(model.name)))

    async def model_ready(request: Request) -> Response:
        model = _model(request)
        return _json({"name": model.name, "version": model.version, "ready": model.ready},
                     200 if model.ready else 503)

    async def model_stats(request: Request) -> Response:
        """Triton-style statistics: how many inferences ran and in batches of which sizes."""
        model = _model(request)
        stats = model.batcher.stats if model.batcher is not None else None
        doc = {"name": model.name, "version": model.version,
               "inference_count": stats.rows if stats else 0, "execution_count": stats.batches if stats else 0,
               "queue_depth": model.batcher.queue_depth if model.batcher else 0,
               "batch_stats": [{"batch_size": size, "compute_infer": {"count": count}}
                               for size, count in sorted(stats.sizes.items())] if stats else []}
        return _json({"model_stats": [doc]})

    async def infer(request: Request) -> Response:
        model = _model(request)
        code = 500
        try:
            if core.tracer is None:
                response = await _infer(request, model)
            else:
                from opentelemetry.propagate import extract
                from opentelemetry.trace import SpanKind

                with core.tracer.start_as_current_span(f"infer {model.name}:{model.version}",
                                                       context=extract(dict(request.headers)), kind=SpanKind.SERVER):
                    response = await _infer(request, model)
            code = response.status_code
            return response
        except ServingError as exc:
            code = exc.status
            raise
        finally:
            core.requests.inc((model.name, model.version, str(code)))

    async def metrics(request: Request) -> Response:
        return Response(core.metrics.prometheus_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _infer(request: Request, model: Model) -> Response:
        body = await request.body()
        payload, json_length = await core.infer(model, body, request.headers.get(protocol.HEADER_LENGTH))
        if json_length is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream",
                        headers={"inference-header-content-length": str(json_length)})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def load() -> None:
            try:
                await core.load_all()
                log.info("ready: %s", ", ".join(f"{n}:{v}" for n, v in core.models))
            except Exception as exc:
                core.load_error = f"{type(exc).__name__}: {exc}"
                log.error("model load failed: %s", core.load_error)
                if on_load_failure is not None:
                    on_load_failure()

        task = asyncio.create_task(load())
        core.metrics.start_otlp()
        if tracing_requested():
            core.tracer = make_tracer("bluegreen-model-server", otlp=True)
        try:
            yield
        finally:
            core.metrics.stop_otlp()
            if core.tracer is not None:
                shutdown_tracing()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await core.unload_all()

    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/{model}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/versions/{version}/stats", model_stats, methods=["GET"]),
        Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model}/versions/{version}/infer", infer, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)],
                    exception_handlers=exception_handlers())
    app.state.core = core
    return app


def serve(settings: ServingSettings) -> int:
    """Run one model-server process until SIGTERM/SIGINT; in-flight requests finish first. Returns the exit code."""
    failed = False
    holder: dict[str, GracefulServer] = {}

    def on_load_failure() -> None:
        nonlocal failed
        failed = True
        holder["server"].should_exit = True

    try:
        core = ModelServer(settings)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, core, on_load_failure)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
                            lifespan="on", access_log=False, log_level="warning", proxy_headers=False,
                            timeout_graceful_shutdown=int(settings.graceful_shutdown_s), backlog=4096)
    server = GracefulServer(config)
    tune_gc()
    holder["server"] = server
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("model server on http://%s:%d (%s)", settings.host, settings.port, ", ".join(settings.models))
    server.run()
    return 1 if failed else 0
