"""gateway/telemetry.py and serving/metrics.py in-process: traces across gateway and model server, and the
metric primitives against both of their exporters (Prometheus text and OTLP ``MetricsData``).

The traces run through the real pieces: the model server's Starlette app under uvicorn on a loopback port (a
background thread, so its spans end on another thread as they would in another process) and a gateway built
by ``Gateway.from_settings`` whose data app is called through ``httpx.ASGITransport``. Each side gets a tracer
from its own SDK provider (``service.name`` as in production) with one shared in-memory exporter. The
providers are not installed as the global one: the code under test takes its tracer from ``telemetry.tracer``
and ``core.tracer``, and W3C propagation does not depend on the provider, so nothing here leaks into other
tests and nothing depends on OpenTelemetry's set-once global.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import Gauge as OtelGauge
from opentelemetry.sdk.metrics.export import Histogram as OtelHistogram
from opentelemetry.sdk.metrics.export import Sum as OtelSum
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.settings import Color, GatewaySettings
from gateway.telemetry import Telemetry
from serving.app import ModelServer, create_app
from serving.metrics import MetricSet, to_metrics_data
from serving.settings import ServingSettings
from tests.procs import free_port, wait_until

INFER = "/v2/models/digits/infer"
BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]})
NO_CACHE = {"cache-control": "no-cache, no-store"}  # every request reaches a model server
GATEWAY, MODEL_SERVER = "bluegreen-gateway", "bluegreen-model-server"


# ------------------------------------------------------------------------------------------ fixtures


@dataclass
class Tracing:
    exporter: InMemorySpanExporter
    gateway: TracerProvider
    model_server: TracerProvider

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture(scope="module")
def tracing() -> Iterator[Tracing]:
    exporter = InMemorySpanExporter()
    providers = []
    for service in (GATEWAY, MODEL_SERVER):
        provider = TracerProvider(sampler=ALWAYS_ON, resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        providers.append(provider)
    yield Tracing(exporter, *providers)
    for provider in providers:
        provider.shutdown()


@dataclass
class Served:
    url: str
    core: ModelServer


@pytest.fixture(scope="module")
def model_server(model_repo: Path, tracing: Tracing) -> Iterator[Served]:
    """digits:1 and digits:2 in one model server (blue and green both point at it), traced."""
    port = free_port()
    settings = ServingSettings(models=["digits:1", "digits:2"], port=port, threads=1, warmup_runs=1)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, loop="asyncio", http="h11",
                                           ws="none", lifespan="on", log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="model-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert thread.is_alive(), "the model server thread exited"
        try:
            return httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 30, interval=0.05, what="the in-process model server")
    core: ModelServer = app.state.core
    core.tracer = tracing.model_server.get_tracer("serving")
    yield Served(url, core)
    core.tracer = None  # its lifespan would otherwise shut down the global provider, which is not ours
    server.should_exit = True
    thread.join(15)
    assert not thread.is_alive()


@pytest.fixture
async def traced(tmp_path: Path, model_server: Served, tracing: Tracing,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    """A gateway at 50/50 whose colors both point at the model server, traced; spans cleared before the test."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):  # a developer's collector must not receive test telemetry
            monkeypatch.delenv(name)
    config = tmp_path / "routing.json"
    config.write_bytes(orjson.dumps({"models": {"digits": {
        "colors": {"blue": {"version": "1", "backends": [model_server.url]},
                   "green": {"version": "2", "backends": [model_server.url]}},
        "weights": {"blue": 50, "green": 50}}}}))
    gw = Gateway.from_settings(GatewaySettings(config=config))
    await gw.start()
    assert ("digits", "1") in gw.plane.signatures  # learned from the real model server
    gw.telemetry.tracer = tracing.gateway.get_tracer("gateway")
    tracing.exporter.clear()
    yield gw
    gw.telemetry.tracer = None  # as above: close() must not shut down a provider this test owns
    await gw.close()


def data_client(gw: Gateway) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=gw.data_app()), base_url="http://gateway")


def service(span: ReadableSpan) -> str:
    assert span.resource is not None
    return str(span.resource.attributes["service.name"])


@dataclass
class Trace:
    """The three spans one forwarded request must produce."""

    server: ReadableSpan
    upstream: ReadableSpan
    model: ReadableSpan


def traces(spans: list[ReadableSpan]) -> dict[int, Trace]:
    by_trace: dict[int, list[ReadableSpan]] = {}
    for s in spans:
        assert s.context is not None
        by_trace.setdefault(s.context.trace_id, []).append(s)
    out = {}
    for trace_id, group in by_trace.items():
        kinds = sorted((service(s), s.kind.name, s.name) for s in group)
        assert len(group) == 3, kinds
        server = [s for s in group if service(s) == GATEWAY and s.kind == SpanKind.SERVER]
        upstream = [s for s in group if service(s) == GATEWAY and s.kind == SpanKind.CLIENT]
        model = [s for s in group if service(s) == MODEL_SERVER and s.kind == SpanKind.SERVER]
        assert len(server) == len(upstream) == len(model) == 1, kinds
        out[trace_id] = Trace(server[0], upstream[0], model[0])
    return out


def assert_linked(t: Trace) -> None:
    """gateway server span → upstream client span → model server span, by parent span id."""
    assert t.server.context is not None and t.upstream.context is not None
    assert t.upstream.parent is not None and t.upstream.parent.span_id == t.server.context.span_id
    assert t.model.parent is not None and t.model.parent.span_id == t.upstream.context.span_id
    assert t.model.parent.is_remote  # it came over HTTP, not through an in-process context
    assert t.upstream.name == "upstream" and t.server.name == "infer digits"


# ------------------------------------------------------------------------------------------ traces


async def test_one_trace_per_request_spans_gateway_and_model_server(traced: Gateway, tracing: Tracing) -> None:
    n = 40
    async with data_client(traced) as c:
        # Concurrent on purpose: each request's context must stay its own across interleaved awaits.
        responses = await asyncio.gather(*(c.post(INFER, content=BODY, headers=NO_CACHE) for _ in range(n)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    colors = [r.headers["x-bluegreen-color"] for r in responses]
    assert {"blue", "green"} <= set(colors)

    found = traces(tracing.spans())
    assert len(found) == n  # one new trace per request, none shared
    answered = {"blue": 0, "green": 0}
    for t in found.values():
        assert_linked(t)
        assert t.server.parent is None  # no traceparent from the client: the gateway starts the trace
        color = t.server.attributes["bluegreen.color"] if t.server.attributes else None
        assert color in answered
        answered[str(color)] += 1
        assert t.upstream.attributes is not None and t.upstream.attributes["bluegreen.color"] == color
        version = "1" if color == "blue" else "2"
        assert t.upstream.attributes["bluegreen.model_version"] == version
        assert t.model.name == f"infer digits:{version}"  # the model server ran the version of that color
        assert t.server.attributes is not None and t.server.attributes["http.response.status_code"] == 200
        # Nesting in time as well as by id.
        assert t.server.start_time is not None and t.upstream.start_time is not None
        assert t.server.end_time is not None and t.upstream.end_time is not None
        assert t.server.start_time <= t.upstream.start_time <= t.upstream.end_time <= t.server.end_time
    assert answered == {"blue": colors.count("blue"), "green": colors.count("green")}


async def test_client_traceparent_is_continued(traced: Gateway, tracing: Tracing) -> None:
    trace_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    headers = {**NO_CACHE, "traceparent": f"00-{trace_id:032x}-{parent_id:016x}-01", "tracestate": "vendor=opaque"}
    async with data_client(traced) as c:
        r = await c.post(INFER, content=BODY, headers=headers)
    assert r.status_code == 200, r.text
    found = traces(tracing.spans())
    assert list(found) == [trace_id]
    t = found[trace_id]
    assert_linked(t)
    assert t.server.parent is not None and t.server.parent.is_remote and t.server.parent.span_id == parent_id
    assert t.model.parent is not None and t.model.parent.trace_state.get("vendor") == "opaque"


async def test_refused_request_is_still_one_linked_trace(traced: Gateway, tracing: Tracing, model_server: Served,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A request only the model server refuses still gives one linked trace, with the model server's status on
    it. The gateway runs the model server's own check, so the refusal comes from a limit the model server
    lowered after the gateway learned its model: two rows where it now takes one."""
    monkeypatch.setattr(model_server.core.settings, "max_request_rows", 1)
    bad = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": [0.5] * 128}]})
    async with data_client(traced) as c:
        r = await c.post(INFER, content=bad, headers=NO_CACHE)
    assert r.status_code == 400, r.text
    spans = tracing.spans()
    assert {service(s) for s in spans} == {GATEWAY, MODEL_SERVER}
    found = traces(spans)
    assert len(found) == 1
    t = next(iter(found.values()))
    assert_linked(t)
    assert t.upstream.attributes is not None and t.upstream.attributes["http.response.status_code"] == 400


# ------------------------------------------------------------------------------------------ gateway metrics


def prometheus(metrics: MetricSet) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the Prometheus text as {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(metrics.prometheus_text().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def otlp_points(metrics: MetricSet) -> dict[str, list[Any]]:
    """metric name -> its data points, from the OTLP ``MetricsData``."""
    data = to_metrics_data(metrics, 1)
    (resource_metrics,) = data.resource_metrics
    assert resource_metrics.resource.attributes["service.name"] == metrics.service_name
    return {m.name: list(m.data.data_points) for sm in resource_metrics.scope_metrics for m in sm.metrics}


async def test_requests_show_in_metrics_as_in_windows(traced: Gateway) -> None:
    async with data_client(traced) as c:
        responses = [await c.post(INFER, content=BODY, headers=NO_CACHE) for _ in range(30)]
        for path in ("/v2/models/nope/infer", "/v2/models/nope/versions/1/infer"):
            assert (await c.post(path, content=BODY, headers=NO_CACHE)).status_code == 404
    assert all(r.status_code == 200 for r in responses)
    samples = prometheus(traced.telemetry)
    pairs: tuple[tuple[Color, str], ...] = (("blue", "1"), ("green", "2"))
    for color, version in pairs:
        answered = sum(r.headers["x-bluegreen-color"] == color for r in responses)
        labels = (("cache", "bypass"), ("color", color), ("model", "digits"), ("outcome", "success"),
                  ("version", version))
        assert samples[("bluegreen_request_duration_seconds_count", labels)] == answered
        assert samples[("bluegreen_requests_total", labels)] == answered
        attempts = (("color", color), ("model", "digits"), ("outcome", "success"), ("version", version))
        window = traced.plane.runtime("digits", color).snapshot()
        assert samples[("bluegreen_upstream_duration_seconds_count", attempts)] == window.count == answered
        assert samples[("bluegreen_gateway_overhead_seconds_count", (("color", color), ("model", "digits")))] \
            == answered
        assert samples[("bluegreen_cache_requests_total",
                        (("color", color), ("model", "digits"), ("result", "bypass")))] == answered
        assert samples[("bluegreen_split_weight", (("color", color), ("model", "digits")))] == 50
        assert samples[("bluegreen_breaker_state",
                        (("backend", traced.plane.runtime("digits", color).backends[0].url), ("color", color),
                         ("model", "digits")))] == 0
    assert samples[("bluegreen_in_flight_requests", ())] == 0
    # The unknown model made no series, in either exporter.
    assert not any(dict(labels).get("model") == "nope" for _, labels in samples)
    assert all(dict(p.attributes).get("model") in ("digits", None)
               for points in otlp_points(traced.telemetry).values() for p in points)


# ------------------------------------------------------------------------------------------ MetricSet


BOUNDS = (0.1, 0.5, 1.0)
VALUES = {"a": [0.05, 0.1, 0.1000001, 0.5, 0.7, 1.0, 2.0, 30.0], "b": [5.0]}  # edges, and only above the last


def test_histogram_prometheus_buckets_are_cumulative_and_otlp_counts_match() -> None:
    m = MetricSet("unit-test")
    h = m.histogram("x_duration_seconds", "A duration.", ("k",), bounds=BOUNDS)
    for key, values in VALUES.items():
        for v in values:
            h.observe((key,), v)
    samples = prometheus(m)
    points = {dict(p.attributes)["k"]: p for p in otlp_points(m)["x_duration_seconds"]}
    for key, values in VALUES.items():
        expected = [sum(v <= le for v in values) for le in (*BOUNDS, float("inf"))]  # "le": less or equal
        got = [samples[("x_duration_seconds_bucket", (("k", key), ("le", le)))]
               for le in ("0.1", "0.5", "1.0", "+Inf")]
        assert got == expected
        assert samples[("x_duration_seconds_count", (("k", key),))] == len(values)
        assert samples[("x_duration_seconds_sum", (("k", key),))] == pytest.approx(sum(values))
        p = points[key]  # OTLP: per-bucket (not cumulative) counts with one more bucket than bounds
        assert list(p.explicit_bounds) == list(BOUNDS)
        assert len(p.bucket_counts) == len(BOUNDS) + 1
        assert [sum(p.bucket_counts[: i + 1]) for i in range(len(p.bucket_counts))] == expected
        assert p.count == len(values) and p.sum == pytest.approx(sum(values))

    # Through the OTLP wire encoding too: min and max are not tracked, so they must be absent, not zero.
    request = encode_metrics(to_metrics_data(m, 1))
    (metric,) = request.resource_metrics[0].scope_metrics[0].metrics
    assert metric.name == "x_duration_seconds" and metric.unit == "seconds"
    for pt in metric.histogram.data_points:
        assert not pt.HasField("min") and not pt.HasField("max")
        assert pt.count == sum(pt.bucket_counts)


def test_counter_and_gauge_round_trip() -> None:
    m = MetricSet("unit-test")
    c = m.counter("y_events", "Events.", ("k",))
    c.inc(("a",))
    c.inc(("a",), 2)
    c.inc(("b",), 0.5)
    level = {("a",): 2.0, ("b",): 0.25}
    m.gauge("z_level", "A level.", ("k",), lambda: list(level.items()))

    samples = prometheus(m)
    assert samples[("y_events_total", (("k", "a"),))] == 3
    assert samples[("y_events_total", (("k", "b"),))] == 0.5
    assert samples[("z_level", (("k", "a"),))] == 2.0 and samples[("z_level", (("k", "b"),))] == 0.25

    data = to_metrics_data(m, 1)
    metrics = {x.name: x.data for x in data.resource_metrics[0].scope_metrics[0].metrics}
    total = metrics["y_events_total"]
    assert isinstance(total, OtelSum) and total.is_monotonic
    assert {dict(p.attributes or {})["k"]: p.value for p in total.data_points} == {"a": 3, "b": 0.5}
    gauge = metrics["z_level"]
    assert isinstance(gauge, OtelGauge)
    assert {dict(p.attributes or {})["k"]: p.value for p in gauge.data_points} == {"a": 2.0, "b": 0.25}

    level[("a",)] = 7.0  # gauges are read at collection
    assert prometheus(m)[("z_level", (("k", "a"),))] == 7.0


def test_disabled_telemetry_records_and_exports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    t = Telemetry(enabled=False)
    t.start_exporters()
    t.record_request("digits", "blue", "1", "success", "bypass", 0.010, 0.004)
    t.record_attempt("digits", "blue", "1", True, 0.004)
    assert t.tracer is None
    assert not any(th.name == "otlp-metrics" for th in threading.enumerate())
    assert all(not h.series for h in t.histograms) and all(not c.series for c in t.counters)
    assert prometheus(t) == {}
    assert all(points == [] for points in otlp_points(t).values())
    t.shutdown()


def test_requests_total_is_derived_from_the_duration_histogram() -> None:
    t = Telemetry()
    for _ in range(3):
        t.record_request("digits", "blue", "1", "success", "miss", 0.010, 0.004)
    t.record_request("digits", "green", "2", "error", "bypass", 0.020, None)  # no upstream answer: no overhead
    t.record_request("digits", "blue", "1", "success", "hit", 0.001, None)
    t.record_request("digits", "blue", "1", "success", "miss", 0.003, 0.005)  # upstream > total: overhead 0
    samples = prometheus(t)
    totals = {labels: v for (name, labels), v in samples.items() if name == "bluegreen_requests_total"}
    counts = {labels: v for (name, labels), v in samples.items()
              if name == "bluegreen_request_duration_seconds_count"}
    assert totals == counts and sum(totals.values()) == 6
    overhead = (("color", "blue"), ("model", "digits"))
    assert samples[("bluegreen_gateway_overhead_seconds_count", overhead)] == 4
    assert samples[("bluegreen_gateway_overhead_seconds_sum", overhead)] == pytest.approx(3 * 0.006)
    assert ("bluegreen_gateway_overhead_seconds_count", (("color", "green"), ("model", "digits"))) not in samples
    assert samples[("bluegreen_cache_requests_total", (("color", "blue"), ("model", "digits"), ("result", "miss")))] \
        == 4

    points = otlp_points(t)
    otlp_totals = {tuple(sorted(dict(p.attributes).items())): p.value for p in points["bluegreen_requests_total"]}
    otlp_counts = {tuple(sorted(dict(p.attributes).items())): p.count
                   for p in points["bluegreen_request_duration_seconds"]}
    assert otlp_totals == otlp_counts == totals
    assert isinstance(to_metrics_data(t, 1).resource_metrics[0].scope_metrics[0].metrics[0].data, OtelHistogram)
