"""Forwarding one request upstream: which color, which backend, how many tries, how much time each.

The data plane (``dataplane.py``) decides *what* to send — the color the router chose, after the cache and
the body check — and hands it here; this module decides *where and how often*: the chosen color first, then
(unless the request is pinned) the other; a backend whose breaker admits it, least outstanding first; the retry
budget and the deadline split; and every attempt's outcome recorded on its color's
:class:`~gateway.runtime.ColorRuntime` (breaker, window, cumulative counts) and in telemetry.

Retries: a connection that could not be opened, a color whose breakers all refuse, and a failure that is the
backend's own (reset, closed connection, garbage, or its breaker opened) move to the other color at no cost; a
slow or 5xx answer is retried once on the other color while retries in flight stay under
max(ratio × in flight, min). A request pinned to a color (``/versions/{v}/infer`` or a forced color) is never
answered by the other one. Tensor data is never re-encoded: the original body bytes go upstream as they came.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from gateway.errors import Unavailable, UpstreamFailure
from gateway.http_client import Endpoint
from gateway.runtime import ColorRuntime
from gateway.settings import Color, GatewaySettings, other
from gateway.state import ModelState
from gateway.telemetry import Telemetry
from gateway.upstream import Backend, Upstream, UpstreamResponse

MIN_ATTEMPT_S = 0.001
"""Less time left than this is no time: the event loop's timers (libuv's) count whole milliseconds, so an
attempt given 1 µs was measured answering 200 when the model server replied within the timer's millisecond — a
client's deadline of 0.001 ms met by a call that took 0.5 ms."""

__all__ = ["Answer", "Forwarder", "InferRequest"]


@dataclass(slots=True)
class InferRequest:
    """One inference request as the HTTP front end hands it over: the body's bytes untouched, and the headers
    the request path reads (pins, cache policy, timeout) or forwards (content type, ids, trace context)."""

    model: str
    body: bytes
    header_length: str | None = None
    version: str | None = None
    key: bytes | None = None
    forced_color: str | None = None
    timeout_ms: str | None = None
    request_id: str | None = None
    request_id_generated: bool = True  # made up by the gateway rather than sent by the client
    content_type: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    cache_control: str | None = None


@dataclass(slots=True)
class Answer:
    """What one forwarded request produced: the response and who gave it."""

    resp: UpstreamResponse
    color: Color
    version: str
    upstream_s: float
    failed_over: bool


class Forwarder:
    """Sends requests to the colors' backends and records each attempt; counts requests and retries in flight
    (the retry budget's inputs)."""

    def __init__(self, settings: GatewaySettings, upstream: Upstream, telemetry: Telemetry,
                 runtimes: Mapping[tuple[str, Color], ColorRuntime], clock: Callable[[], float]) -> None:
        self.upstream_settings = settings.upstream
        self.breaker_open_s = settings.breaker.open_s
        self.upstream = upstream
        self.telemetry = telemetry
        self.runtimes = runtimes  # the data plane's, shared: a pool re-pointed there is the one used here
        self._clock = clock
        self._targets: dict[tuple[str, str], bytes] = {}
        self.in_flight = 0
        self.retries_in_flight = 0

    async def forward(self, state: ModelState, color: Color, req: InferRequest, deadline_s: float,
                      stale_ready: bool = False) -> Answer:
        """Send the original bytes to ``color``, then (unless pinned) the other color; record every attempt.

        Retry rules: a connection that could not be opened, a breaker that refuses, and a failure that is
        clearly the backend's own (it reset or closed the connection, answered garbage, or its breaker opened
        with this failure) move to the other color freely; only retries after slow or 5xx answers — what
        overload looks like — are rationed by the retry budget. An attempt that is not the last gets at most
        half of the time left, so a hanging color leaves the other one room within the client's deadline. With a
        stale cached answer at hand (``stale_ready``), a timed-out first attempt ends the forwarding at once:
        the stale answer beats waiting on the other color, which may hang too."""
        pinned = req.version is not None or req.forced_color is not None
        order: tuple[Color, ...] = (color,) if pinned else (color, other(color))
        header_lines = _header_lines(req)
        end = self._clock() + deadline_s
        attempt_timeout = self.upstream_settings.attempt_timeout_s
        failures: list[str] = []
        rationed = False  # the next attempt is a retry the budget must admit
        self.in_flight += 1
        try:
            for i, c in enumerate(order):
                # Budget and deadline are checked before a breaker permit is taken: a permit always ends in
                # an outcome, and a half-open breaker must never close on calls that were not made.
                is_retry = rationed
                if is_retry and not self._retry_allowed():
                    failures.append(f"{c}: retry budget exhausted")
                    break
                remaining = end - self._clock()
                if remaining < MIN_ATTEMPT_S:
                    failures.append(f"{c}: deadline exceeded before the attempt")
                    break
                rt = self.runtimes[(state.name, c)]
                picked = rt.pool.pick()
                if picked is None:
                    failures.append(f"{c}: circuit open")
                    continue
                backend, permit = picked
                timeout = min(remaining, attempt_timeout)
                if (i + 1 < len(order) and remaining < 2 * attempt_timeout
                        and self.runtimes[(state.name, order[i + 1])].pool.any_admitting()):
                    timeout = remaining / 2  # leave the other color, if it can be tried, as much time as this one
                version = state.colors[c].version
                endpoint = backend.endpoint or self._endpoint(backend)
                target = self._target(state.name, version)
                backend.outstanding += 1
                if is_retry:
                    self.retries_in_flight += 1
                t0 = time.perf_counter()
                try:
                    if self.telemetry.tracer is None:
                        resp = await endpoint.request(target + header_lines, req.body, timeout)
                    else:
                        resp = await self._traced_post(endpoint, target, req, timeout, c, version)
                except UpstreamFailure as exc:
                    self._settle(backend, permit, rt, version, is_retry, False, time.perf_counter() - t0)
                    failures.append(f"{c}: {exc.reason}")
                    if exc.timed_out and stale_ready:
                        break
                    rationed = exc.sent and not exc.dead and backend.breaker.state != "open"
                    continue
                except asyncio.CancelledError:  # the client went away: the breaker counts it, the window does not
                    self._settle(backend, permit, None, version, is_retry, False, time.perf_counter() - t0)
                    raise
                elapsed = time.perf_counter() - t0
                ok = resp.status < 500  # a 4xx is the client's problem, not the backend's
                self._settle(backend, permit, rt, version, is_retry, ok, elapsed)
                if not ok:
                    failures.append(f"{c}: HTTP {resp.status}")
                    rationed = backend.breaker.state != "open"
                    continue
                return Answer(resp, c, version, elapsed, failed_over=c != color)
        finally:
            self.in_flight -= 1
        raise Unavailable(f"no color of model {state.name!r} could serve the request ({'; '.join(failures)})",
                          retry_after_s=max(1, int(self.breaker_open_s)))

    def _settle(self, backend: Backend, permit: int, rt: ColorRuntime | None, version: str,
                is_retry: bool, ok: bool, elapsed: float) -> None:
        """An attempt's end: its breaker always; its color's window and counts unless ``rt`` is None (the client
        went away). The counts are incremented inline: one attribute each, on every attempt."""
        backend.outstanding -= 1
        if is_retry:
            self.retries_in_flight -= 1
        backend.breaker.record(permit, ok, elapsed)
        if rt is not None:
            rt.window.record(elapsed, ok)
            rt.requests += 1
            rt.errors += not ok
            self.telemetry.record_attempt(rt.model, rt.color, version, ok, elapsed)

    def _endpoint(self, backend: Backend) -> Endpoint:
        backend.endpoint = endpoint = self.upstream.endpoint(backend.url)
        return endpoint

    def _target(self, model: str, version: str) -> bytes:
        """The request line of an inference call, built once per (model, version)."""
        line = self._targets.get((model, version))
        if line is None:
            line = self._targets[(model, version)] = (
                f"POST /v2/models/{quote(model)}/versions/{quote(version)}/infer HTTP/1.1\r\n".encode())
        return line

    async def _traced_post(self, endpoint: Endpoint, target: bytes, req: InferRequest, timeout_s: float,
                           color: Color, version: str) -> UpstreamResponse:
        """The upstream call in a client span whose context goes to the model server (W3C traceparent)."""
        from opentelemetry.propagate import inject
        from opentelemetry.trace import SpanKind

        with self.telemetry.tracer.start_as_current_span("upstream", kind=SpanKind.CLIENT) as span:
            span.set_attribute("bluegreen.color", color)
            span.set_attribute("bluegreen.model_version", version)
            span.set_attribute("url.full", f"{endpoint.url}{target.split(b' ')[1].decode()}")
            carrier: dict[str, str] = {}
            inject(carrier)
            traced = InferRequest(req.model, req.body, header_length=req.header_length, request_id=req.request_id,
                                  content_type=req.content_type, traceparent=carrier.get("traceparent"),
                                  tracestate=carrier.get("tracestate"))
            resp = await endpoint.request(target + _header_lines(traced), req.body, timeout_s)
            span.set_attribute("http.response.status_code", resp.status)
            return resp

    def _retry_allowed(self) -> bool:
        u = self.upstream_settings
        return self.retries_in_flight < max(u.retry_budget_ratio * self.in_flight, u.retry_budget_min)


_CONTENT_TYPE_LINES: dict[str | None, bytes] = {None: b"content-type: application/json\r\n"}


def _header_lines(req: InferRequest) -> bytes:
    """The forwarded request headers, as HTTP/1.1 lines."""
    lines = _CONTENT_TYPE_LINES.get(req.content_type)
    if lines is None:
        lines = b"content-type: %s\r\n" % (req.content_type or "application/json").encode("latin-1")
        if len(_CONTENT_TYPE_LINES) < 64:
            _CONTENT_TYPE_LINES[req.content_type] = lines
    if req.header_length is not None:
        lines += b"inference-header-content-length: %s\r\n" % req.header_length.encode("latin-1")
    if req.request_id is not None:
        lines += b"x-request-id: %s\r\n" % req.request_id.encode("latin-1")
    if req.traceparent is not None:
        lines += b"traceparent: %s\r\n" % req.traceparent.encode("latin-1")
        if req.tracestate is not None:
            lines += b"tracestate: %s\r\n" % req.tracestate.encode("latin-1")
    return lines
