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
from collections.abc import Iterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp

from gateway.admin import create_admin_app
from gateway.auth import Authenticator
from gateway.breaker import STATE_CODES
from gateway.breaker_watch import BreakerWatch
from gateway.cache import PredictionCache, RedisL2
from gateway.canary import Phase
from gateway.controller import Controller
from gateway.data_app import VERSION, DataApp
from gateway.dataplane import DataPlane
from gateway.history import History
from gateway.keys import ClientGate, RateLimiter, rate_redis
from gateway.notify import Notifier
from gateway.release import Release
from gateway.settings import COLORS, GatewaySettings
from gateway.sources import LocalMetrics, MergedMetrics, MetricsPublisher
from gateway.state import MemoryStateStore, StateStore
from gateway.state_redis import Lease, RedisStateStore
from gateway.telemetry import Telemetry
from serving.http_server import AsgiHandler, HttpServer
from serving.lifecycle import Periodic, serve_together, tune_gc
from serving.resources import register_process_metrics

log = logging.getLogger("bluegreen.gateway")

__all__ = ["VERSION", "DataApp", "Gateway", "run"]

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
    gate: ClientGate | None = None
    _keys_refresh: Periodic | None = None
    history: History | None = None
    notifier: Notifier | None = None
    breakers: BreakerWatch | None = None

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
        auth = Authenticator(settings.tokens(), settings.auth_max_failures, settings.auth_window_s,
                             on_failure=lambda reason: telemetry.auth_failure("admin", reason))
        release = Release(store, settings.validation_repo, {name: r.canary for name, r in routing.models.items()})
        if isinstance(store, RedisStateStore):
            plane.feedback.redis = store.redis  # answers are shared, so feedback may reach any replica
            # Replicas share state; one of them, the lease holder, runs the rollouts on everyone's numbers.
            lease = Lease(store, ttl_s=settings.controller_lease_ttl_s)
            store.fence = lease.current
            controller = Controller(release, MergedMetrics(store, plane), is_leader=lease.is_leader,
                                    window_s=settings.window_s)
            publisher = MetricsPublisher(store, plane, window_s=settings.window_s)
            gateway = cls(settings, store, plane, auth, telemetry, release, controller, lease, publisher)
        else:
            gateway = cls(settings, store, plane, auth, telemetry, release,
                          Controller(release, LocalMetrics(plane), window_s=settings.window_s))
        if settings.client_keys_file is not None:
            limiter = RateLimiter(redis=rate_redis(settings.redis_url) if settings.redis_url else None)
            gateway.gate = ClientGate(settings.client_keys_file, limiter,
                                      on_failure=lambda reason: telemetry.auth_failure("data", reason))
        # The console's history reads the controller's kind of source (merged across replicas with Redis).
        source = MergedMetrics(store, plane) if isinstance(store, RedisStateStore) else LocalMetrics(plane)
        gateway.history = History(release, source, interval_s=settings.history_interval_s,
                                  window_s=settings.window_s)
        # Notifications are sent by the lease holder (the only controller) from the shared audit stream.
        gateway.notifier = Notifier(
            store, routing.notifications, is_leader=gateway.lease.is_leader if gateway.lease else lambda: True,
            redis=store.redis if isinstance(store, RedisStateStore) else None,
            counter=telemetry.counter("bluegreen_notifications", "Notification deliveries by sink, event type and "
                                      "outcome (delivered, retried, failed, dropped).", ("sink", "event", "outcome")))
        gateway.breakers = BreakerWatch(plane, store, replica=store.replica if isinstance(store, RedisStateStore)
                                        else None)
        gateway._register_gauges()
        return gateway

    def _register_gauges(self) -> None:
        plane, store = self.plane, self.store

        def breakers() -> Iterator[tuple[tuple[str, ...], float]]:
            for rt in plane.runtimes():
                for b in rt.backends:
                    yield (rt.model, rt.color, b.url), STATE_CODES[b.breaker.state]

        def backends() -> Iterator[tuple[tuple[str, ...], float]]:
            for rt in plane.runtimes():
                yield (rt.model, rt.color), len(rt.backends)

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

        def outcome_rate() -> Iterator[tuple[tuple[str, ...], float]]:
            # Configured models and colors only; the version is the one the state points the color at.
            for name, state in store.models.items():
                for color in COLORS:
                    version = state.colors[color].version
                    n, total, _ = plane.feedback.outcome_counts(name, version)
                    if n:
                        yield (name, color, version), total / n

        t = self.telemetry
        t.gauge("bluegreen_canary_stage", "Current canary stage (1-based; 0 idle; stages+1 promoting).",
                ("model",), canary_stage)
        t.gauge("bluegreen_canary_phase", "1 for the current canary phase of each model.", ("model", "phase"),
                canary_phase)
        t.gauge("bluegreen_shadow_agreement_ratio", "Share of shadow copies that agreed with the answer given.",
                ("model",), shadow_agreement)
        t.gauge("bluegreen_online_accuracy_ratio", "Accuracy from feedback, per color's current version.",
                ("model", "color"), online_accuracy)
        t.gauge("bluegreen_outcome_rate", "Mean business outcome (conversions, revenue per answer) from feedback, "
                "per color's current version, on this replica.", ("model", "color", "version"), outcome_rate)
        t.gauge("bluegreen_breaker_state", "Circuit breaker per backend: 0 closed, 1 half-open, 2 open.",
                    ("model", "color", "backend"), breakers)
        t.gauge("bluegreen_split_weight", "Traffic weight per color, percent.", ("model", "color"), weights)
        t.gauge("bluegreen_in_flight_requests", "Requests in flight on the data listener.", (), in_flight)
        t.gauge("bluegreen_backends", "Model-server pods behind each color, as discovery last saw them (a change "
                "is a scaling event).", ("model", "color"), backends)
        register_process_metrics(t)

    async def start(self) -> None:
        if self.gate is not None:
            self._keys_refresh = Periodic("client-keys", self.settings.client_keys_refresh_s, self._reload_keys)
            self._keys_refresh.start()
        await self.plane.start()
        await self.store.start()
        self.telemetry.start_exporters()
        if self.lease is not None:
            self.lease.start()
        if self.publisher is not None:
            self.publisher.start()
        self.controller.start()
        if self.history is not None:
            self.history.start()
        if self.notifier is not None:
            await self.notifier.start()
        if self.breakers is not None:
            self.breakers.start()

    async def _reload_keys(self) -> None:
        assert self.gate is not None
        self.gate.refresh()

    async def close(self) -> None:
        if self._keys_refresh is not None:
            await self._keys_refresh.stop()
        if self.gate is not None and self.gate.limiter.redis is not None:
            await self.gate.limiter.redis.aclose()
        await self.controller.stop()
        if self.notifier is not None:
            await self.notifier.stop()
        if self.breakers is not None:
            await self.breakers.stop()
        if self.history is not None:
            await self.history.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        if self.lease is not None:
            await self.lease.stop()
        await self.plane.close()
        self.telemetry.shutdown()
        await self.store.aclose()

    def data_app(self) -> DataApp:
        if self.data is None:
            data = self.data = DataApp(self.plane, self.settings.max_concurrency, self.settings.max_body_bytes,
                                       self.gate)
            self.telemetry.load_shed = lambda: data.shed
        return self.data

    def admin_app(self) -> ASGIApp:
        return create_admin_app(self.release, self.plane, self.auth,
                                require_if_match=self.settings.admin.require_if_match, history=self.history,
                                notifier=self.notifier)


async def run_gateway(settings: GatewaySettings) -> None:
    gateway = Gateway.from_settings(settings)
    if not gateway.auth.enabled:
        log.warning("no admin tokens configured: the admin API refuses every request")
    await gateway.start()
    limits = settings.limits.for_listener(settings.max_body_bytes)
    graceful = settings.graceful_shutdown_s
    data = HttpServer(gateway.data_app().serve, settings.data.host, settings.data.port, limits=limits,
                      graceful_s=graceful, name="data", ssl=settings.tls.server_context())
    admin = HttpServer(AsgiHandler(gateway.admin_app()), settings.admin.host, settings.admin.port,
                       limits=limits, graceful_s=graceful, name="admin",
                       ssl=settings.tls.server_context(settings.admin.client_ca_file))
    gateway.listeners = {"data": data, "admin": admin}
    try:
        await data.start()
        await admin.start()
        scheme = "https" if data.ssl is not None else "http"
        log.info("gateway data on %s://%s:%d, admin on %s://%s:%d", scheme, settings.data.host, data.port,
                 scheme, settings.admin.host, admin.port)
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
    # httpx logs every request's full URL at INFO: a Slack webhook's path is its secret (notifications,
    # confirm gates). What failed is logged by our own code, with the URL shown without its path.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _tune_process()
    tune_gc()
    uvloop.run(run_gateway(settings))
    return 0

