"""Telemetry end to end: a real Prometheus scraping the gateway, the model server's /metrics, and OTLP export of
metrics and traces from both processes to a tiny OTLP/HTTP receiver.

Which numbers are compared with which (gateway/dataplane.py): the per-color window behind
``/admin/v1/models/{m}/stats`` records every *upstream attempt* with the latency of that attempt, exactly the
value ``bluegreen_upstream_duration_seconds`` observes; ``bluegreen_request_duration_seconds`` is the whole
request at the gateway. So the window p95 is compared with PromQL's p95 of the upstream histogram — same
observations, two estimators: the window reports the geometric midpoint of a 2% bucket, PromQL interpolates
linearly inside a ``DURATION_BUCKETS`` bucket, so they can differ by up to that bucket's width and no more.
The client's latency contains the upstream attempt plus the gateway and the client's own overhead, so its p95
is not below either (to each estimator's resolution).
"""

from __future__ import annotations

import asyncio
import bisect
import gzip
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from gateway.windows import GROWTH
from serving.metrics import DURATION_BUCKETS
from tests.integration.expect import describe, expect, expect_all
from tests.procs import (
    admin_headers,
    free_port,
    routing,
    start_gateway,
    start_model_server,
    start_prometheus,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("model_repo")

ROW = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
       0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]})
INFER = "/v2/models/digits/infer"
NO_CACHE = {"cache-control": "no-cache, no-store"}  # every request goes upstream
GREEN_EXTRA_MS = 20  # green is slower, so the two colors' percentiles are told apart
UNKNOWN = "nosuchmodel"


@dataclass
class Servers:
    blue: str
    green: str


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("servers")
    blue, blue_url = start_model_server(tmp, ["digits:1"])
    try:
        green, green_url = start_model_server(tmp, ["digits:2"], extra=["--fault-latency-ms", str(GREEN_EXTRA_MS)])
    except BaseException:
        blue.stop()
        raise
    yield Servers(blue_url, green_url)
    blue.stop()
    green.stop()


def nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile as the window computes it: the ceil(q·n)-th smallest value."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def bucket_of(seconds: float) -> tuple[float, float]:
    """(lower, upper] of the DURATION_BUCKETS bucket holding ``seconds``."""
    i = bisect.bisect_left(DURATION_BUCKETS, seconds)
    assert i < len(DURATION_BUCKETS), f"{seconds} s is above the last bucket"
    return (DURATION_BUCKETS[i - 1] if i else 0.0), DURATION_BUCKETS[i]


async def paced_load(url: str, n: int, rate: float, concurrency: int) -> list[tuple[str, float]]:
    """``n`` predictions started at ``rate`` per second (at most ``concurrency`` at once); returns
    (answering color, client-side latency in seconds) per request."""
    out: list[tuple[str, float]] = []
    start = time.perf_counter()
    queue = iter(range(n))
    async with httpx.AsyncClient(base_url=url, timeout=20,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker() -> None:
            for i in queue:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                t0 = time.perf_counter()
                r = await client.post(INFER, content=BODY, headers=NO_CACHE)
                elapsed = time.perf_counter() - t0
                expect(r, 200)
                out.append((r.headers["x-bluegreen-color"], elapsed))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


class PromQL:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = expect(httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5), 200, expr)
        doc = r.json()
        assert doc["status"] == "success", describe(r)
        return doc["data"]["result"]  # type: ignore[no-any-return]

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr)}


# ------------------------------------------------------------------------------------------ Prometheus


def test_prometheus_p95_agrees_with_window_and_client(servers: Servers, tmp_path: Path) -> None:
    gw, data, admin = start_gateway(tmp_path, routing([servers.blue], [servers.green], weights=(50, 50)))
    prom_proc = None
    try:
        prom_proc, prom_url = start_prometheus(tmp_path, [admin.removeprefix("http://")])
        prom = PromQL(prom_url)
        # An unknown model is refused before anything is recorded: no series may carry its name.
        for path in (f"/v2/models/{UNKNOWN}/infer", f"/v2/models/{UNKNOWN}/versions/1/infer"):
            expect(httpx.post(f"{data}{path}", content=BODY, headers=NO_CACHE), 404)

        # 900 requests, about 450 per color: each color's p95 rests on its ~23 slowest, and both estimators see
        # the same observations, so more requests only take longer (1,500 did, by 2 s of pacing).
        n = 900
        results = asyncio.run(paced_load(data, n, rate=300.0, concurrency=12))
        load_s = time.perf_counter()
        client = {c: [s for color, s in results if color == c] for c in ("blue", "green")}
        assert all(len(v) > n / 4 for v in client.values()), {c: len(v) for c, v in client.items()}

        stats = httpx.get(f"{admin}/admin/v1/models/digits/stats", headers=admin_headers()).json()["colors"]
        window_count = {c: stats[c]["count"] for c in ("blue", "green")}
        assert window_count == {c: len(v) for c, v in client.items()}  # one attempt per request: no failures

        # Prometheus has scraped after the load once it holds every attempt the window holds.
        counts = 'sum by (color) (bluegreen_upstream_duration_seconds_count{model="digits"})'
        wait_until(lambda: prom.by(counts, "color") == window_count, 15, interval=0.2,
                   what="Prometheus to scrape the whole load")
        scraped_s = time.perf_counter() - load_s

        upstream_p95 = prom.by('histogram_quantile(0.95, sum by (le, color) '
                               '(bluegreen_upstream_duration_seconds_bucket{model="digits"}))', "color")
        request_p95 = prom.by('histogram_quantile(0.95, sum by (le, color) '
                              '(bluegreen_request_duration_seconds_bucket{model="digits"}))', "color")
        report = []
        for color in ("blue", "green"):
            window = stats[color]["p95_ms"] / 1000.0
            promql = upstream_p95[color]
            mine = nearest_rank(client[color], 0.95)
            report.append(f"{color}: PromQL upstream p95 {promql * 1000:.2f} ms, window p95 {window * 1000:.2f} ms, "
                          f"PromQL request p95 {request_p95[color] * 1000:.2f} ms, "
                          f"client p95 {mine * 1000:.2f} ms (n={len(client[color])})")
            # Within one bucket width: of the bucket holding either value (they may sit on either side of a bound).
            # The window's own error (half a 2% bucket) is added: it is what lets its value cross a bound.
            width = max(hi - lo for lo, hi in (bucket_of(promql), bucket_of(window)))
            assert abs(promql - window) <= width + window * (math.sqrt(GROWTH) - 1), report[-1]
            # The client's p95 is not below the gateway's: the window's estimate is at most half a 2% bucket
            # above the sample it stands for; PromQL's interpolation can land anywhere in its bucket, so the
            # client's p95 must at least reach that bucket.
            assert mine >= window / math.sqrt(GROWTH), report[-1]
            assert mine > bucket_of(promql)[0], report[-1]
            assert mine > bucket_of(request_p95[color])[0], report[-1]
        assert upstream_p95["green"] >= GREEN_EXTRA_MS / 1000.0 and upstream_p95["green"] > upstream_p95["blue"], report
        print("\n".join([*report, f"Prometheus caught up {scraped_s:.1f} s after the load"]))

        # The gauges are scraped too.
        weights = prom.by('bluegreen_split_weight{model="digits"}', "color")
        assert weights == {"blue": 50.0, "green": 50.0}
        breakers = prom.by('bluegreen_breaker_state{model="digits"}', "backend")
        assert breakers == {servers.blue: 0.0, servers.green: 0.0}
        assert prom.by('up{job="gateway"}', "job") == {"gateway": 1.0}

        # No series anywhere names the unknown model, and "model" only ever took the configured name.
        r = httpx.get(f"{prom_url}/api/v1/series", params={"match[]": f'{{model="{UNKNOWN}"}}'}, timeout=5)
        assert r.json() == {"status": "success", "data": []}
        r = httpx.get(f"{prom_url}/api/v1/label/model/values", timeout=5)
        assert r.json()["data"] == ["digits"]
    finally:
        if prom_proc is not None:
            prom_proc.stop()
        assert gw.stop() == 0


# ------------------------------------------------------------------------------------------ model server /metrics


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_model_server_metrics(servers: Servers) -> None:
    url = servers.blue
    labels = (("model", "digits"), ("version", "1"))
    before = scrape(url)
    ok = (("code", "200"), *labels)

    async def load() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=20) as c:
            responses = await asyncio.gather(*(c.post(INFER, content=BODY) for _ in range(64)))
            expect_all(responses, 200)
            bad = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
            expect(await c.post(INFER, content=bad), 400)

    asyncio.run(load())
    after = scrape(url)
    stats = httpx.get(f"{url}/v2/models/digits/stats", timeout=5).json()["model_stats"][0]

    assert after[("bluegreen_serving_queue_depth", labels)] == 0  # present, and empty at rest
    assert after[("bluegreen_serving_requests_total", ok)] - before.get(("bluegreen_serving_requests_total", ok), 0) \
        == 64
    assert after[("bluegreen_serving_requests_total", (("code", "400"), *labels))] >= 1
    batches = after[("bluegreen_serving_batch_size_count", labels)]
    assert batches > 0 and batches == stats["execution_count"]
    assert after[("bluegreen_serving_batch_size_sum", labels)] == stats["inference_count"]  # rows
    assert after[("bluegreen_serving_batch_size_bucket", (("le", "+Inf"), *labels))] == batches
    assert after[("bluegreen_serving_inference_duration_seconds_count", labels)] == batches
    assert after[("bluegreen_serving_inference_duration_seconds_sum", labels)] > 0
    # The 64 good requests' rows all went through model runs (the refused one never reached the batcher).
    rows = ("bluegreen_serving_batch_size_sum", labels)
    assert after[rows] - before.get(rows, 0) == 64


# ------------------------------------------------------------------------------------------ OTLP


@dataclass
class OtlpReceiver:
    """A minimal OTLP/HTTP (protobuf) receiver: records the bodies POSTed to /v1/metrics and /v1/traces."""

    metrics: list[ExportMetricsServiceRequest] = field(default_factory=list)
    traces: list[ExportTraceServiceRequest] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                with receiver.lock:
                    if self.path == "/v1/metrics":
                        receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                    elif self.path == "/v1/traces":
                        receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                    else:
                        receiver.errors.append(f"POST {self.path}")
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def attrs(kvs: Any) -> dict[str, Any]:
    def value(kv: KeyValue) -> Any:
        kind = kv.value.WhichOneof("value")
        return None if kind is None else getattr(kv.value, kind)

    return {kv.key: value(kv) for kv in kvs}


@pytest.fixture
def otlp() -> Iterator[tuple[OtlpReceiver, str]]:
    receiver = OtlpReceiver()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), receiver.handler())
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    yield receiver, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


GATEWAY_METRICS = {"bluegreen_request_duration_seconds", "bluegreen_upstream_duration_seconds",
                   "bluegreen_gateway_overhead_seconds", "bluegreen_requests_total", "bluegreen_cache_requests_total",
                   "bluegreen_breaker_state", "bluegreen_split_weight"}
SERVING_METRICS = {"bluegreen_serving_queue_depth", "bluegreen_serving_batch_size",
                   "bluegreen_serving_inference_duration_seconds", "bluegreen_serving_requests_total"}


def latest_metrics(receiver: OtlpReceiver) -> dict[str, dict[str, list[Any]]]:
    """service.name -> metric name -> data points of the most recent export that carried that metric."""
    out: dict[str, dict[str, list[Any]]] = {}
    with receiver.lock:
        requests = list(receiver.metrics)
    for req in requests:
        for rm in req.resource_metrics:
            svc = attrs(rm.resource.attributes).get("service.name", "")
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    out.setdefault(svc, {})[m.name] = list(getattr(m, kind).data_points) if kind else []
    return out


def spans_by_service(receiver: OtlpReceiver) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    with receiver.lock:
        requests = list(receiver.traces)
    for req in requests:
        for rs in req.resource_spans:
            svc = attrs(rs.resource.attributes).get("service.name", "")
            out.setdefault(svc, []).extend(s for ss in rs.scope_spans for s in ss.spans)
    return out


def test_otlp_metrics_and_traces_from_gateway_and_model_server(tmp_path: Path,
                                                               otlp: tuple[OtlpReceiver, str]) -> None:
    receiver, endpoint = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "500",
           "OTEL_TRACES_SAMPLER": "always_on", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    server, url = start_model_server(tmp_path, ["digits:1", "digits:2"], env=env)
    gw = None
    try:
        gw, data, _ = start_gateway(tmp_path, routing([url], [url], weights=(50, 50)), env=env)
        n = 20
        with httpx.Client(base_url=data, timeout=10) as c:
            colors = []
            for _ in range(n):
                r = c.post(INFER, content=BODY, headers=NO_CACHE)
                expect(r, 200)
                colors.append(r.headers["x-bluegreen-color"])

        def request_count(service: str, metric: str) -> float:
            points = latest_metrics(receiver).get(service, {}).get(metric, [])
            return float(sum(p.as_int or p.as_double for p in points))

        # Each process exports on its own timer: wait for an export from each that counts every request.
        wait_until(lambda: request_count("bluegreen-gateway", "bluegreen_requests_total") == n
                   and request_count("bluegreen-model-server", "bluegreen_serving_requests_total") == n,
                   15, interval=0.1, what="OTLP exports with every request from the gateway and the model server")

        metrics = latest_metrics(receiver)
        for svc, names in (("bluegreen-gateway", GATEWAY_METRICS), ("bluegreen-model-server", SERVING_METRICS)):
            assert names <= set(metrics.get(svc, {})), (svc, sorted(metrics.get(svc, {})))
            for name in names:
                assert any(attrs(p.attributes).get("model") == "digits" for p in metrics[svc][name]), (svc, name)
        assert "bluegreen_in_flight_requests" in metrics["bluegreen-gateway"]
        durations = metrics["bluegreen-gateway"]["bluegreen_request_duration_seconds"]
        assert sum(p.count for p in durations) == n
        for p in durations:
            assert sum(p.bucket_counts) == p.count and list(p.explicit_bounds) == list(DURATION_BUCKETS)
        by_color = {c: sum(p.count for p in durations if attrs(p.attributes)["color"] == c) for c in ("blue", "green")}
        assert by_color == {c: colors.count(c) for c in ("blue", "green")}

        def joined() -> set[bytes]:
            """Trace ids with spans from both services."""
            spans = spans_by_service(receiver)
            return ({s.trace_id for s in spans.get("bluegreen-gateway", [])}
                    & {s.trace_id for s in spans.get("bluegreen-model-server", [])})

        wait_until(lambda: len(joined()) == n, 15, interval=0.1, what="every request's trace from both processes")
        spans = spans_by_service(receiver)
        for trace_id in joined():
            gateway_spans = [s for s in spans["bluegreen-gateway"] if s.trace_id == trace_id]
            model_spans = [s for s in spans["bluegreen-model-server"] if s.trace_id == trace_id]
            (server_span,) = [s for s in gateway_spans if s.kind == Span.SPAN_KIND_SERVER]
            (client_span,) = [s for s in gateway_spans if s.kind == Span.SPAN_KIND_CLIENT]
            (model_span,) = model_spans
            assert model_span.kind == Span.SPAN_KIND_SERVER
            assert client_span.parent_span_id == server_span.span_id
            assert model_span.parent_span_id == client_span.span_id
        assert receiver.errors == []
    finally:
        if gw is not None:
            assert gw.stop() == 0
        server.stop()
