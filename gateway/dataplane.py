"""The request path, independent of HTTP framing (DESIGN.md, "A request's way through the gateway").

read body (size-limited, by the middleware) → parse the JSON header once and check it against the model's
declared inputs → pick the color → [cache: later] → breaker admits? → upstream call with the original bytes
and a deadline → on failure the other color → every attempt recorded in its own color's window → reply with
provenance headers. Tensor data is never decoded or re-encoded here.

Retries (DESIGN.md, "Routing rules"): a connection that could not be opened, or a color whose breakers all
refuse, moves to the other color at no cost; a failure after the request was sent (reset, 5xx, deadline)
is retried once on the other color while retries in flight stay under max(ratio × in flight, min). A request
pinned to a color (``/versions/{v}/infer`` or a forced color) is never answered by the other one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import BadRequest, Unavailable, UpstreamFailure
from gateway.router import Router
from gateway.settings import COLORS, Color, GatewaySettings, other
from gateway.state import MemoryStateStore, ModelState
from gateway.upstream import Backend, ColorPool, Upstream, UpstreamResponse
from gateway.windows import Window
from serving import protocol
from serving.protocol import Signature, TensorSpec

log = logging.getLogger(__name__)

FORWARDED_HEADERS = ("content-type", protocol.HEADER_LENGTH, "traceparent", "tracestate")


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]


@dataclass(slots=True)
class InferRequest:
    model: str
    body: bytes
    header_length: str | None = None
    version: str | None = None
    key: bytes | None = None
    forced_color: str | None = None
    timeout_ms: str | None = None
    request_id: str | None = None
    content_type: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None


class DataPlane:
    def __init__(self, settings: GatewaySettings, store: MemoryStateStore,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.store = store
        self.router = Router(settings.allow_color_override)
        self.upstream = Upstream(settings.upstream)
        self._clock = clock
        self.pools: dict[tuple[str, Color], ColorPool] = {}
        self.windows: dict[tuple[str, Color], Window] = {}
        self.signatures: dict[tuple[str, str], Signature] = {}
        self.in_flight = 0
        self.retries_in_flight = 0
        self._signature_refresh: asyncio.Task[None] | None = None
        self._last_signature_refresh = float("-inf")
        slot = max(1.0, settings.window_s / 12)
        for name, state in store.models.items():
            for color in COLORS:
                self.pools[(name, color)] = ColorPool(list(state.colors[color].backends), settings.breaker)
                self.windows[(name, color)] = Window(settings.window_s, slot, clock)
        store.subscribe(self._on_state_change)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.upstream.start()
        await self.refresh_signatures()

    async def close(self) -> None:
        if self._signature_refresh is not None:
            self._signature_refresh.cancel()
        await self.upstream.close()

    def _on_state_change(self, state: ModelState) -> None:
        """A color re-pointed at other backends gets a fresh pool; breakers of backends it keeps carry over."""
        for color in COLORS:
            pool = self.pools[(state.name, color)]
            urls = list(state.colors[color].backends)
            if [b.url for b in pool.backends] != urls:
                kept = {b.url: b for b in pool.backends}
                fresh = ColorPool(urls, self.settings.breaker)
                fresh.backends = [kept.get(b.url, b) for b in fresh.backends]
                self.pools[(state.name, color)] = fresh
        self._refresh_soon(force=True)

    def _refresh_soon(self, force: bool = False) -> None:
        """Re-learn missing signatures in the background, at most once a second unless forced."""
        now = self._clock()
        if self._signature_refresh is not None and not self._signature_refresh.done():
            return
        if not force and now - self._last_signature_refresh < 1.0:
            return
        self._last_signature_refresh = now
        self._signature_refresh = asyncio.get_running_loop().create_task(self.refresh_signatures())

    async def refresh_signatures(self) -> None:
        """Learn each served version's inputs/outputs from its backends' V2 metadata (best effort)."""
        for name, state in list(self.store.models.items()):
            for color in COLORS:
                cs = state.colors[color]
                if (name, cs.version) in self.signatures:
                    continue
                for url in cs.backends:
                    doc = await self.upstream.get_json(f"{url}/v2/models/{name}/versions/{cs.version}", 1.0)
                    sig = _signature(doc)
                    if sig is not None:
                        self.signatures[(name, cs.version)] = sig
                        break

    def signature(self, state: ModelState, color: Color) -> Signature | None:
        sig = self.signatures.get((state.name, state.colors[color].version))
        if sig is None:
            sig = self.signatures.get((state.name, state.colors[other(color)].version))
            if sig is None:
                self._refresh_soon()
        return sig

    # ------------------------------------------------------------------ the request path

    def _deadline_s(self, timeout_ms: str | None) -> float:
        deadline = self.settings.upstream.deadline_s
        if timeout_ms is not None:
            try:
                client = float(timeout_ms) / 1000.0
            except ValueError:
                raise BadRequest("x-bluegreen-timeout-ms must be a number of milliseconds") from None
            if client <= 0:
                raise BadRequest("x-bluegreen-timeout-ms must be positive")
            deadline = min(deadline, client)
        return deadline

    async def infer(self, req: InferRequest) -> Reply:
        started = time.perf_counter()
        state = self.store.get(req.model)
        deadline_s = self._deadline_s(req.timeout_ms)
        color = self.router.choose(state, key=req.key, forced=req.forced_color, version=req.version)
        header, binary = protocol.split_body(req.body, req.header_length)
        sig = self.signature(state, color)
        if sig is not None:
            protocol.check_request(header, len(binary), sig, None)
        pinned = req.version is not None or req.forced_color is not None
        order: tuple[Color, ...] = (color,) if pinned else (color, other(color))

        headers = {"content-type": req.content_type or "application/json"}
        for name, value in ((protocol.HEADER_LENGTH, req.header_length), ("x-request-id", req.request_id),
                            ("traceparent", req.traceparent), ("tracestate", req.tracestate)):
            if value is not None:
                headers[name] = value
        end = self._clock() + deadline_s
        failures: list[str] = []
        sent_failure = False
        self.in_flight += 1
        try:
            for c in order:
                pool = self.pools[(state.name, c)]
                picked = pool.pick()
                if picked is None:
                    failures.append(f"{c}: circuit open")
                    continue
                backend, permit = picked
                is_retry = sent_failure
                if is_retry and not self._retry_allowed():
                    backend.breaker.record(permit, True, 0.0)  # unused permit: release it neutrally
                    failures.append(f"{c}: retry budget exhausted")
                    break
                remaining = end - self._clock()
                if remaining <= 0:
                    backend.breaker.record(permit, True, 0.0)
                    failures.append(f"{c}: deadline exceeded before the attempt")
                    break
                timeout = min(remaining, self.settings.upstream.attempt_timeout_s)
                version = state.colors[c].version
                url = f"{backend.url}/v2/models/{state.name}/versions/{version}/infer"
                backend.outstanding += 1
                if is_retry:
                    self.retries_in_flight += 1
                t0 = time.perf_counter()
                try:
                    resp = await self.upstream.post(url, req.body, headers, timeout)
                except UpstreamFailure as exc:
                    self._settle(backend, permit, state.name, c, is_retry, False, time.perf_counter() - t0)
                    failures.append(f"{c}: {exc.reason}")
                    sent_failure = sent_failure or exc.sent
                    continue
                except asyncio.CancelledError:  # the client went away: the breaker counts it, the window does not
                    self._settle(backend, permit, None, c, is_retry, False, time.perf_counter() - t0)
                    raise
                elapsed = time.perf_counter() - t0
                ok = resp.status < 500  # a 4xx is the client's problem, not the backend's
                self._settle(backend, permit, state.name, c, is_retry, ok, elapsed)
                if not ok:
                    failures.append(f"{c}: HTTP {resp.status}")
                    sent_failure = True
                    continue
                return self._reply(resp, c, version, degraded=c != color, upstream_s=elapsed,
                                   total_s=time.perf_counter() - started)
        finally:
            self.in_flight -= 1
        raise Unavailable(f"no color of model {state.name!r} could serve the request ({'; '.join(failures)})",
                          retry_after_s=max(1, int(self.settings.breaker.open_s)))

    def _settle(self, backend: Backend, permit: int, model: str | None, color: Color, is_retry: bool, ok: bool,
                elapsed: float) -> None:
        backend.outstanding -= 1
        if is_retry:
            self.retries_in_flight -= 1
        backend.breaker.record(permit, ok, elapsed)
        if model is not None:
            self.windows[(model, color)].record(elapsed, ok)

    def _retry_allowed(self) -> bool:
        u = self.settings.upstream
        return self.retries_in_flight < max(u.retry_budget_ratio * self.in_flight, u.retry_budget_min)

    def _reply(self, resp: UpstreamResponse, color: Color, version: str, *, degraded: bool, upstream_s: float,
               total_s: float) -> Reply:
        headers = [
            (b"content-type", resp.content_type.encode()),
            (b"x-bluegreen-color", color.encode()),
            (b"x-bluegreen-model-version", version.encode()),
            (b"x-bluegreen-cache", b"bypass"),
            (b"server-timing", f"upstream;dur={upstream_s * 1000:.2f}, "
                                f"gateway;dur={max(0.0, total_s - upstream_s) * 1000:.2f}".encode()),
        ]
        if resp.header_length is not None:
            headers.append((protocol.HEADER_LENGTH.encode(), resp.header_length.encode()))
        if degraded:
            headers.append((b"x-bluegreen-degraded", f"failover:{other(color)}-unavailable".encode()))
        return Reply(resp.status, resp.body, headers)

    # ------------------------------------------------------------------ read side

    async def model_ready(self, name: str) -> dict[str, bool]:
        """Per color carrying traffic: does a backend with an admitting breaker report the version ready?"""
        state = self.store.get(name)
        result: dict[str, bool] = {}
        for color in COLORS:
            if state.weights[color] == 0:
                continue
            version = state.colors[color].version
            ready = False
            for backend in self.pools[(name, color)].backends:
                if backend.breaker.state == "open":
                    continue
                doc = await self.upstream.get_json(f"{backend.url}/v2/models/{name}/versions/{version}/ready", 1.0)
                if isinstance(doc, dict) and doc.get("ready") is True:
                    ready = True
                    break
            result[color] = ready
        return result


def _signature(doc: object) -> Signature | None:
    if not isinstance(doc, dict):
        return None
    try:
        ins = tuple(TensorSpec(i["name"], i["datatype"], tuple(int(d) for d in i["shape"])) for i in doc["inputs"])
        outs = tuple(TensorSpec(o["name"], o["datatype"], tuple(int(d) for d in o["shape"])) for o in doc["outputs"])
    except (KeyError, TypeError, ValueError):
        return None
    return Signature(ins, outs)
