"""The gateway's metrics (docs/configuration.md, "Telemetry") and traces.

Recording is cheap by construction (see ``serving/metrics.py`` for the measured reason): the hot path
observes into plain series; Prometheus (admin ``/metrics``) and OTLP (when ``OTEL_EXPORTER_OTLP_*`` is set)
read them at collection. ``bluegreen_requests_total`` is derived from the request-duration histogram's counts,
so a request costs two observations and one increment. Label values come only from configured models and
colors: a request for an unknown model is refused before anything is recorded, so it never creates a series.

Traces (OpenTelemetry SDK, when an OTLP endpoint is configured or a test installs a provider): a server span
per request with an upstream client span; the W3C trace context goes to the model server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from serving.metrics import Counters, MetricSet, make_tracer, shutdown_tracing, tracing_requested

_CLIENT_OUTCOMES = {403: "forbidden", 429: "rate_limited"}


class Telemetry(MetricSet):
    def __init__(self, enabled: bool = True, *, service_name: str = "bluegreen-gateway") -> None:
        super().__init__(service_name)
        self.enabled = enabled
        self.request_duration = self.histogram(
            "bluegreen_request_duration_seconds", "Time from request to response at the gateway.",
            ("model", "color", "version", "outcome", "cache"))
        self.upstream_duration = self.histogram(
            "bluegreen_upstream_duration_seconds", "Each upstream attempt, by the color that made it.",
            ("model", "color", "version", "outcome"))
        self.overhead = self.histogram(
            "bluegreen_gateway_overhead_seconds", "Gateway time per request: total minus upstream.",
            ("model", "color"))
        self.cache_requests = self.counter(
            "bluegreen_cache_requests", "Cache results (hit, miss, stale, bypass) per model and color.",
            ("model", "color", "result"))
        self.auth_failures = self.counter(
            "bluegreen_auth_failures", "Refused authentications and authorizations, by listener and reason "
            "(missing, unknown, forbidden, rate_limited, locked_out).", ("listener", "reason"))
        self.client_requests = self.counter(
            "bluegreen_client_requests", "Requests of each client key, by model and outcome (ok, forbidden, "
            "rate_limited, client_error, server_error); the client is the key's name in the keys file.",
            ("client", "model", "outcome"))
        self.payload_records = self.counter(
            "bluegreen_payload_records", "Sampled prediction records by model and outcome: logged (the sink took "
            "them) or dropped (queue full, no sink, or the sink failed).", ("model", "outcome"))
        self.tracer: Any = None
        #: Requests refused by the concurrency limit (set by the app that owns the limiter).
        self.load_shed: Callable[[], int] = lambda: 0

    # ------------------------------------------------------------------ hot path

    def record_request(self, model: str, color: str, version: str, outcome: str, cache: str, total_s: float,
                       upstream_s: float | None) -> None:
        if not self.enabled:
            return
        self.request_duration.observe((model, color, version, outcome, cache), total_s)
        self.cache_requests.inc((model, color, cache))
        if upstream_s is not None:
            self.overhead.observe((model, color), max(0.0, total_s - upstream_s))

    def auth_failure(self, listener: str, reason: str) -> None:
        """Counted even with request metrics off: it is security monitoring, and it is cheap and rare."""
        self.auth_failures.inc((listener, reason))

    def record_client(self, client: str, model: str, status: int) -> None:
        if self.enabled:
            outcome = "ok" if status < 400 else _CLIENT_OUTCOMES.get(status) or (
                "client_error" if status < 500 else "server_error")
            self.client_requests.inc((client, model, outcome))

    def record_attempt(self, model: str, color: str, version: str, ok: bool, seconds: float) -> None:
        if self.enabled:
            self.upstream_duration.observe((model, color, version, "success" if ok else "error"), seconds)

    # ------------------------------------------------------------------ collection side

    def derived_counters(self) -> Iterator[Counters]:
        requests = Counters("bluegreen_requests", "Requests answered, by model, color, version, outcome and "
                            "cache result.", self.request_duration.labels)
        for key, counts, _ in self.request_duration.snapshot():
            requests.series[key] = sum(counts)
        yield requests
        shed = Counters("bluegreen_load_shed", "Requests refused with 503 because the gateway had its limit of "
                        "requests in flight (before any model or color was chosen).", ())
        if self.enabled:
            shed.series[()] = self.load_shed()
        yield shed

    def start_exporters(self) -> None:
        if not self.enabled:
            return
        self.start_otlp()
        if tracing_requested():
            self.tracer = make_tracer(self.service_name, otlp=True)

    def shutdown(self) -> None:
        self.stop_otlp()
        if self.tracer is not None:
            shutdown_tracing()
