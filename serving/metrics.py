"""Metric primitives shared by the model server and the gateway: cheap on the hot path, exported on demand.

Why not the OpenTelemetry SDK's instruments on the hot path (docs/architecture.md): measured here, one
``Histogram.record`` with five attributes costs ~10 µs and one ``Counter.add`` ~8.5 µs; a handful of them per
request is about a tenth of what the gateway spends per request on these machines. Recording here is a bisect
and a few integer increments on series keyed by label tuples (~0.2 µs). Exporters read the series at
collection time:

- Prometheus: :meth:`MetricSet.prometheus_text` (prometheus_client's text format);
- OTLP: :class:`OtlpMetricsThread` turns the same series into OpenTelemetry ``MetricsData`` every
  ``OTEL_METRIC_EXPORT_INTERVAL`` ms and hands it to the SDK's OTLP exporter — the role of a metric producer,
  which the Python SDK does not offer.

Gauges are callbacks evaluated at collection, so they cost nothing per request.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

log = logging.getLogger(__name__)

#: Latency buckets for 0.5 ms - 10 s: dense where predictions live (1-150 ms), sparse in the tail.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04,
    0.05, 0.06, 0.075, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

Labels = tuple[str, ...]


class Histograms:
    """One histogram metric (name ends in its unit, e.g. ``_seconds``): series keyed by label values."""

    __slots__ = ("bounds", "description", "labels", "name", "series", "unit")

    def __init__(self, name: str, description: str, labels: Sequence[str],
                 bounds: Sequence[float] = DURATION_BUCKETS, unit: str = "seconds") -> None:
        self.name = name
        self.description = description
        self.labels = tuple(labels)
        self.bounds = tuple(bounds)
        self.unit = unit
        # key -> [count per bucket..., count above the last bound, sum]: one dict lookup per observation
        self.series: dict[Labels, list[float]] = {}

    def observe(self, key: Labels, value: float) -> None:
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = [0.0] * (len(self.bounds) + 2)
        s[bisect.bisect_left(self.bounds, value)] += 1
        s[-1] += value

    def snapshot(self) -> Iterator[tuple[Labels, list[int], float]]:
        """(labels, per-bucket counts including +Inf, sum) for every series."""
        for key, s in list(self.series.items()):
            values = list(s)
            yield key, [int(v) for v in values[:-1]], values[-1]


class Counters:
    """One counter metric (name without ``_total``): series keyed by label values."""

    __slots__ = ("description", "labels", "name", "series")

    def __init__(self, name: str, description: str, labels: Sequence[str]) -> None:
        self.name = name
        self.description = description
        self.labels = tuple(labels)
        self.series: dict[Labels, float] = {}

    def inc(self, key: Labels, n: float = 1) -> None:
        self.series[key] = self.series.get(key, 0) + n


@dataclass(frozen=True, slots=True)
class Gauge:
    """A gauge computed at collection: ``read()`` yields (label values, value)."""

    name: str
    description: str
    labels: tuple[str, ...]
    read: Callable[[], Iterable[tuple[Labels, float]]]


class MetricSet:
    """The metrics of one process, exportable to Prometheus and OTLP."""

    def __init__(self, service_name: str) -> None:
        self.service_name = service_name
        self.histograms: list[Histograms] = []
        self.counters: list[Counters] = []
        self.gauges: list[Gauge] = []
        self.live_counters: list[Gauge] = []  # counters read at collection, like gauges (e.g. process CPU time)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self._exporter: OtlpMetricsThread | None = None

    def histogram(self, name: str, description: str, labels: Sequence[str], **kw: Any) -> Histograms:
        h = Histograms(name, description, labels, **kw)
        self.histograms.append(h)
        return h

    def counter(self, name: str, description: str, labels: Sequence[str]) -> Counters:
        c = Counters(name, description, labels)
        self.counters.append(c)
        return c

    def gauge(self, name: str, description: str, labels: Sequence[str],
              read: Callable[[], Iterable[tuple[Labels, float]]]) -> None:
        self.gauges.append(Gauge(name, description, tuple(labels), read))

    def live_counter(self, name: str, description: str, labels: Sequence[str],
                     read: Callable[[], Iterable[tuple[Labels, float]]]) -> None:
        """A counter someone else keeps (name without ``_total``), read at collection."""
        self.live_counters.append(Gauge(name, description, tuple(labels), read))

    def derived_counters(self) -> Iterator[Counters]:
        """Counters computed from other series at collection (subclasses override)."""
        return iter(())

    def families(self) -> Iterator[Metric]:
        for h in self.histograms:
            base = h.name.removesuffix(f"_{h.unit}") if h.unit else h.name
            fam = HistogramMetricFamily(base, h.description, labels=h.labels, unit=h.unit)
            for key, counts, total in h.snapshot():
                cumulative, buckets = 0, []
                for bound, n_in_bucket in zip((*h.bounds, float("inf")), counts, strict=True):
                    cumulative += n_in_bucket
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                fam.add_metric(list(key), buckets, total)
            yield fam
        for c in (*self.counters, *self.derived_counters()):
            fam_c = CounterMetricFamily(c.name, c.description, labels=c.labels)
            for key, n in list(c.series.items()):
                fam_c.add_metric(list(key), n)
            yield fam_c
        for lc in self.live_counters:
            fam_c = CounterMetricFamily(lc.name, lc.description, labels=lc.labels)
            for key, n in lc.read():
                fam_c.add_metric(list(key), n)
            yield fam_c
        for g in self.gauges:
            fam_g = GaugeMetricFamily(g.name, g.description, labels=g.labels)
            for key, value in g.read():
                fam_g.add_metric(list(key), value)
            yield fam_g

    def prometheus_text(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def start_otlp(self) -> bool:
        """Start exporting to OTLP when the standard variables name an endpoint; True if started."""
        env = os.environ
        if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")):
            return False
        interval_s = float(env.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")) / 1000.0
        self._exporter = OtlpMetricsThread(self, max(0.1, interval_s))
        self._exporter.start()
        return True

    def stop_otlp(self) -> None:
        if self._exporter is not None:
            self._exporter.stop()
            self._exporter = None


class _Collector:
    def __init__(self, metrics: MetricSet) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.families()


def tracing_requested() -> bool:
    env = os.environ
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def make_tracer(service_name: str, *, otlp: bool) -> Any:
    """A tracer on the global provider. When no SDK provider is installed yet, one is created with the
    sampler of ``OTEL_TRACES_SAMPLER*`` (default here: parent-based, 1% of new traces) and, with ``otlp``,
    a batching OTLP exporter. A test may install its own provider first (e.g. an in-memory exporter)."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    global _OWN_PROVIDER
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else ParentBased(TraceIdRatioBased(0.01))
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}), sampler=sampler)
        if otlp:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        _OWN_PROVIDER = provider
    return trace.get_tracer("bluegreen")


_OWN_PROVIDER: Any = None  # the provider make_tracer created, if any: the only one shutdown_tracing ends


def shutdown_tracing() -> None:
    """Flush and end the provider this module created (never one a host application or a test installed)."""
    global _OWN_PROVIDER
    if _OWN_PROVIDER is not None:
        _OWN_PROVIDER.shutdown()
        _OWN_PROVIDER = None


class OtlpMetricsThread:
    """Periodically converts the metric set to OTLP and exports it (cumulative temporality)."""

    def __init__(self, metrics: MetricSet, interval_s: float) -> None:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        self.metrics = metrics
        self.interval_s = interval_s
        self.exporter = OTLPMetricExporter()
        self.started_ns = time.time_ns()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.export_once()
        self.exporter.shutdown()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.export_once()

    def export_once(self) -> None:
        try:
            self.exporter.export(to_metrics_data(self.metrics, self.started_ns))
        except Exception as exc:  # an unreachable collector must never hurt serving
            log.warning("OTLP metric export failed: %s", exc)


def to_metrics_data(metrics: MetricSet, start_ns: int) -> Any:
    """The metric set as OpenTelemetry ``MetricsData``."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.metrics.export import Metric as OtelMetric
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    now = time.time_ns()
    cumulative = AggregationTemporality.CUMULATIVE
    out = []
    for h in metrics.histograms:
        # min and max are not tracked (a cost on the hot path): None leaves them unset on the wire, where 0.0
        # would tell a collector that every observation was 0.
        points = [HistogramDataPoint(dict(zip(h.labels, key, strict=True)), start_ns, now, sum(counts), total,
                                     counts, list(h.bounds), None, None)  # type: ignore[arg-type]
                  for key, counts, total in h.snapshot()]
        out.append(OtelMetric(h.name, h.description, h.unit, Histogram(points, cumulative)))
    for c in (*metrics.counters, *metrics.derived_counters()):
        numbers = [NumberDataPoint(dict(zip(c.labels, key, strict=True)), start_ns, now, n)
                   for key, n in list(c.series.items())]
        out.append(OtelMetric(f"{c.name}_total", c.description, None, Sum(numbers, cumulative, True)))
    for lc in metrics.live_counters:
        numbers = [NumberDataPoint(dict(zip(lc.labels, key, strict=True)), start_ns, now, n) for key, n in lc.read()]
        out.append(OtelMetric(f"{lc.name}_total", lc.description, None, Sum(numbers, cumulative, True)))
    for g in metrics.gauges:
        numbers = [NumberDataPoint(dict(zip(g.labels, key, strict=True)), start_ns, now, v) for key, v in g.read()]
        out.append(OtelMetric(g.name, g.description, None, Gauge(numbers)))
    resource = Resource.create({"service.name": metrics.service_name})
    return MetricsData([ResourceMetrics(resource, [ScopeMetrics(InstrumentationScope("bluegreen"), out, "")], "")])
