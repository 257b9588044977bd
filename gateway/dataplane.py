"""The request path, independent of HTTP framing (docs/architecture.md, "Gateway").

body (read whole by the server, under its limits) → pick the color → digest of the body's own bytes → a fresh
L1 entry for that color's version answers at once → parse the JSON header and check it against the model
(``serving.protocol.check_request``, the model server's own check; big bodies on a worker thread, one at a
time) → L2 → single flight → breaker admits? → upstream call with the original bytes and a deadline → on
failure the other color → every attempt recorded in its own color's window → reply with provenance headers.
Tensor data is never re-encoded here. When both colors fail, a stale cached answer
(``x-bluegreen-cache: stale``) comes before a 503.

This module admits the request and answers it (color, cache, body check, single flight, replies, feedback and
shadow copies afterwards); ``forward.py`` sends it upstream (color order, breakers, retry budget, deadline split,
each attempt recorded on its color's :class:`~gateway.runtime.ColorRuntime`). The plane owns one ColorRuntime per
(model, color); everything outside the request path reads them through :meth:`DataPlane.runtime`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.cache import Entry, PredictionCache, digest
from gateway.discovery import Discovery, FileResolver, Resolver, SystemResolver, is_dynamic
from gateway.drift import DriftMonitor
from gateway.errors import BadRequest, ServingError, Unavailable
from gateway.feedback import FeedbackStore
from gateway.forward import Answer, Forwarder, InferRequest
from gateway.inputs import OFF_LOOP_BYTES, learn_signature, parse_and_check_off_loop
from gateway.payload_log import PayloadLog
from gateway.router import Router
from gateway.runtime import ColorRuntime
from gateway.settings import COLORS, Color, GatewaySettings, ModelRoute, other
from gateway.shadow import Shadow
from gateway.state import ModelState, StateStore
from gateway.telemetry import Telemetry
from gateway.upstream import ColorPool, Upstream
from gateway.windows import Window
from serving import protocol
from serving.protocol import Signature

__all__ = ["DataPlane", "InferRequest", "Reply"]

log = logging.getLogger(__name__)

@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    color: str = "none"
    version: str = ""
    cache: str = "bypass"
    upstream_s: float | None = None
    client_id: str | None = None  # the V2 body's "id"
    header_length: int | None = None  # JSON length of a binary answer


_HEADER_LENGTH = protocol.HEADER_LENGTH.encode()
_CACHE_NAMES = {b"hit": "hit", b"miss": "miss", b"stale": "stale", b"bypass": "bypass"}


_OUTCOMES = {2: "success", 4: "client_error", 5: "error"}


_CACHE_POLICIES: dict[str, tuple[bool, bool]] = {}


def _cache_policy(cache_control: str | None) -> tuple[bool, bool]:
    """(may read, may write) from the request's Cache-Control: ``no-cache`` skips reads, ``no-store`` writes."""
    if not cache_control:
        return True, True
    policy = _CACHE_POLICIES.get(cache_control)
    if policy is None:
        tokens = {t.strip().lower() for t in cache_control.split(",")}
        policy = ("no-cache" not in tokens, "no-store" not in tokens)
        if len(_CACHE_POLICIES) < 256:  # clients send a handful of spellings; anything else is parsed each time
            _CACHE_POLICIES[cache_control] = policy
    return policy


class DataPlane:
    def __init__(self, settings: GatewaySettings, store: StateStore, cache: PredictionCache | None = None,
                 telemetry: Telemetry | None = None, clock: Callable[[], float] = time.monotonic,
                 routes: Mapping[str, ModelRoute] | None = None) -> None:
        self.settings = settings
        self.routes = dict(routes or {})  # the routing file's per-model limits (max_batch_size, allow_non_finite)
        # Big bodies are parsed and checked on a worker thread, one at a time: the loop never stalls on one, and
        # the Python objects a big JSON body becomes exist for one body at a time, not for every one in flight.
        self._big_bodies = asyncio.Semaphore(1)
        self.store = store
        self.router = Router(settings.allow_color_override)
        self.upstream = Upstream(settings.upstream)
        self.cache = cache
        self.telemetry = telemetry or Telemetry(enabled=False)
        self._clock = clock
        self._runtimes: dict[tuple[str, Color], ColorRuntime] = {}
        self.signatures: dict[tuple[str, str], Signature] = {}
        self._provenance_headers: dict[tuple[str, str, str, bytes], tuple[tuple[bytes, bytes], ...]] = {}
        self._signature_refresh: asyncio.Task[None] | None = None
        self._last_signature_refresh = float("-inf")
        slot = max(1.0, settings.window_s / 12)
        resolver: Resolver = (FileResolver(settings.discovery_file) if settings.discovery_file is not None
                              else SystemResolver())
        self.discovery = Discovery(resolver, settings.discovery_refresh_s, self._sync_pools)
        for name, state in store.models.items():
            for color in COLORS:
                pool = ColorPool(self.discovery.expand(state.colors[color].backends), settings.breaker)
                self._runtimes[(name, color)] = ColorRuntime(name, color, pool,
                                                             Window(settings.window_s, slot, clock))
        self.forwarder = Forwarder(settings, self.upstream, self.telemetry, self._runtimes, clock)
        self.feedback = FeedbackStore()
        self.shadow = Shadow(self.upstream, self.runtime)
        # Prediction records and input drift take their copies in _after_answer; their work runs in their tasks.
        self.payload_log = PayloadLog(settings.payload_log, self.telemetry, self.routes, self.upstream.post)
        self.drift = DriftMonitor(settings.drift, settings.drift.reference_repo or settings.validation_repo,
                                  self.telemetry)
        store.subscribe(self._on_state_change)

    def runtime(self, model: str, color: Color) -> ColorRuntime:
        """The backends, window and counts of one color of a configured model (KeyError for another)."""
        return self._runtimes[(model, color)]

    def runtimes(self) -> Iterator[ColorRuntime]:
        """Every (model, color) this plane serves."""
        return iter(list(self._runtimes.values()))

    @property
    def in_flight(self) -> int:
        """Requests being forwarded upstream now."""
        return self.forwarder.in_flight

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.upstream.start()
        await self.discovery.refresh(self._configured_urls())
        self.discovery.start(self._configured_urls)
        await self.refresh_signatures()
        self.payload_log.start()
        self.drift.start()

    async def close(self) -> None:
        await self.discovery.stop()
        if self._signature_refresh is not None:
            self._signature_refresh.cancel()
        await self.shadow.close()
        await self.payload_log.close()
        await self.drift.close()
        await self.feedback.close()
        await self.upstream.close()
        if self.cache is not None:
            await self.cache.close()

    def _configured_urls(self) -> list[str]:
        return [u for state in self.store.models.values() for c in COLORS for u in state.colors[c].backends]

    def _on_state_change(self, state: ModelState) -> None:
        """A color re-pointed at other backends gets them now (``dns+`` names at the next resolution)."""
        self._sync_pools()
        if any(is_dynamic(u) for c in COLORS for u in state.colors[c].backends):
            asyncio.get_running_loop().create_task(self.discovery.refresh(self._configured_urls()))
        self._refresh_soon(force=True)

    def _sync_pools(self) -> None:
        """Point every pool at its color's current backends; backends that stay keep their breakers."""
        for name, state in self.store.models.items():
            for color in COLORS:
                self._runtimes[(name, color)].pool.update(self.discovery.expand(state.colors[color].backends))

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
        """Learn each served version's inputs/outputs and limits from its backends' V2 metadata and config
        (best effort; :func:`gateway.inputs.learn_signature`)."""
        for name, state in list(self.store.models.items()):
            for color in COLORS:
                cs = state.colors[color]
                if (name, cs.version) in self.signatures:
                    continue
                for url in [b.url for b in self._runtimes[(name, color)].backends]:
                    sig = await learn_signature(self.upstream.get_json, url, name, cs.version, self.routes.get(name))
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
        """Answer one inference request; its metrics are recorded whatever happens (for known models)."""
        if self.telemetry.tracer is not None:
            return await self._infer_traced(req)
        return await self._infer(req)

    async def _infer(self, req: InferRequest) -> Reply:
        started = time.perf_counter()
        state = self.store.get(req.model)  # an unknown model is refused before anything is recorded
        reply: Reply | None = None
        outcome = "cancelled"
        color = "none"
        try:
            deadline_s = self._deadline_s(req.timeout_ms)
            color = self.router.choose(state, key=req.key, forced=req.forced_color, version=req.version)
            reply = await self._answer(state, color, req, deadline_s, started)
            status = reply.status
            outcome = "success" if status < 300 else _OUTCOMES.get(status // 100, "error")
            if status == 200:
                self._after_answer(state, req, reply, started)
            return reply
        except ServingError as exc:
            outcome = _OUTCOMES.get(exc.status // 100, "error")
            raise
        finally:
            total_s = time.perf_counter() - started
            if reply is not None:
                self.telemetry.record_request(state.name, reply.color, reply.version, outcome, reply.cache, total_s,
                                              reply.upstream_s)
            else:
                version = state.colors[color].version if color != "none" else ""  # type: ignore[index]
                self.telemetry.record_request(state.name, color, version, outcome, "bypass", total_s, None)

    async def _infer_traced(self, req: InferRequest) -> Reply:
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        assert self.telemetry.tracer is not None
        carrier = {k: v for k, v in (("traceparent", req.traceparent), ("tracestate", req.tracestate)) if v}
        with self.telemetry.tracer.start_as_current_span(f"infer {req.model}", context=extract(carrier),
                                                         kind=SpanKind.SERVER) as span:
            reply = await self._infer(req)
            span.set_attribute("bluegreen.color", reply.color)
            span.set_attribute("http.response.status_code", reply.status)
            return reply

    async def _answer(self, state: ModelState, color: Color, req: InferRequest, deadline_s: float,
                      started: float) -> Reply:
        """The answer, from the cache or upstream. A fresh L1 entry answers before anything else is done: its
        key is a digest of these very bytes, which were checked and answered 200 before."""
        # Checked against this color's own version only: another version's inputs or limits may differ (the
        # model server checks anyway; the signature is learned in the background meanwhile).
        sig = self.signatures.get((state.name, state.colors[color].version))
        if sig is None:
            self._refresh_soon()
        big = len(req.body) > OFF_LOOP_BYTES
        if big:
            async with self._big_bodies:
                await asyncio.sleep(0)  # a loop turn between big bodies: others (health probes) go first
                header = await self._read_big(req, sig)
            checked = True
        else:
            header, binary = protocol.split_body(req.body, req.header_length)
            checked = False
        rid = header.get("id")
        client_id = rid if type(rid) is str else None
        cache = self.cache
        read = write = True
        if req.cache_control is not None:
            read, write = _cache_policy(req.cache_control)
        if cache is None or not (read or write):
            if not checked and sig is not None:
                protocol.check_request(header, binary, sig)
            answer = await self.forwarder.forward(state, color, req, deadline_s)
            return self._reply(answer, b"bypass", started, client_id)

        version = state.colors[color].version
        if big:  # 40 ms for 16 MiB; hashlib lets go of the GIL, so the loop goes on meanwhile
            request_digest = await asyncio.to_thread(digest, req.body, req.header_length, client_id)
        else:
            request_digest = digest(req.body, req.header_length, client_id)
        key = cache.key(state.name, version, request_digest)
        stale: Entry | None = None
        if read:
            entry = cache.hit(key, version)
            if entry is not None:
                return self._reply_cached(entry, color, b"hit", client_id, started)
        if not checked and sig is not None:
            protocol.check_request(header, binary, sig)
        del header  # a big body's objects are not kept while the request waits upstream
        if read:
            found = await cache.lookup(key, version)  # L2, and an expired L1 entry kept for stale-if-error
            if found.entry is not None:
                return self._reply_cached(found.entry, color, b"hit", client_id, started)
            stale = found.stale

        async def produce() -> tuple[Answer, Entry | None]:
            answer = await self.forwarder.forward(state, color, req, deadline_s, stale_ready=stale is not None)
            entry = None
            resp = answer.resp
            if resp.status == 200:
                if client_id is None:  # no id in the request, none in the answer: stored as it came
                    entry = Entry(answer.version, resp.content_type,
                                  None if resp.header_length is None else int(resp.header_length), resp.body,
                                  cache.clock())
                else:
                    entry = Entry.from_response(answer.version, resp.content_type, resp.header_length, resp.body,
                                                cache.clock())
                if entry is not None and write:  # stored under the version that answered, after any failover
                    cache.store(cache.key(state.name, answer.version, request_digest), entry)
            return answer, entry

        try:
            if read:  # identical concurrent misses share one upstream call
                # A pinned request only shares a call made for the same pin (its answer must be its color's).
                pinned = req.version is not None or req.forced_color is not None
                (answer, entry), leader = await cache.single_flight(f"{key}|{color}" if pinned else key, produce)
            else:
                (answer, entry), leader = await produce(), True
        except Unavailable:
            if stale is None:
                raise
            cache.counters["stale"] += 1
            return self._reply_cached(stale, state.color_of_version(stale.version) or color, b"stale", client_id,
                                      started, degraded=b"stale-cache")
        if not leader and entry is not None:  # a follower: the leader's answer, with this request's id
            return self._reply_cached(entry, answer.color, b"miss", client_id, started,
                                      degraded=b"failover" if answer.failed_over else None)
        return self._reply(answer, b"miss" if read else b"bypass", started, client_id)

    def _after_answer(self, state: ModelState, req: InferRequest, reply: Reply, started: float) -> None:
        """Off the answer's critical path: remember it for feedback, send a shadow copy if selected, queue a
        prediction record and an input-drift sample if selected (references to the bytes; parsed elsewhere).

        Feedback finds an answer by the V2 body's ``id``, else by ``x-request-id``. Only ids the client chose
        are shared through Redis: a generated id (echoed in ``x-request-id``) is remembered in this replica's
        bounded memory alone, so anonymous traffic costs no Redis write per request."""
        client_id = reply.client_id
        request_id = client_id or req.request_id
        if request_id is not None:
            shared = client_id is not None or not req.request_id_generated
            self.feedback.remember(state.name, request_id, reply.color, reply.version, reply.body,
                                   reply.header_length, share=shared)
        if state.shadow_percent and reply.cache != "hit" and reply.color in COLORS:
            headers = {"content-type": req.content_type or "application/json"}
            if req.header_length is not None:
                headers[protocol.HEADER_LENGTH] = req.header_length
            self.shadow.maybe_copy(state, reply.color, req.body, headers, reply.body)
        if state.payload_log_percent:
            self.payload_log.maybe_log(state.name, state.payload_log_percent, reply.color, reply.version,
                                       req.request_id, client_id, req.body, req.header_length, reply.body,
                                       reply.header_length, time.perf_counter() - started, reply.cache)
        if self.drift.enabled:
            self.drift.offer(state.name, reply.color, reply.version, req.body, req.header_length)

    def _provenance(self, content_type: str, color: str, version: str, cache_result: bytes
                    ) -> tuple[tuple[bytes, bytes], ...]:
        """The fixed response headers of an answer, encoded once per combination."""
        key = (content_type, color, version, cache_result)
        found = self._provenance_headers.get(key)
        if found is None:
            found = self._provenance_headers[key] = (
                (b"content-type", content_type.encode("latin-1")), (b"x-bluegreen-color", color.encode()),
                (b"x-bluegreen-model-version", version.encode()), (b"x-bluegreen-cache", cache_result))
            if len(self._provenance_headers) > 1024:  # versions come and go: bounded
                self._provenance_headers.clear()
        return found

    def _reply(self, answer: Answer, cache_result: bytes, started: float, client_id: str | None) -> Reply:
        resp = answer.resp
        upstream_s = answer.upstream_s
        gateway_s = time.perf_counter() - started - upstream_s
        headers = [*self._provenance(resp.content_type, answer.color, answer.version, cache_result),
                   (b"server-timing", b"upstream;dur=%.2f, gateway;dur=%.2f" % (
                       upstream_s * 1000, max(0.0, gateway_s) * 1000))]
        if resp.header_length is not None:
            headers.append((_HEADER_LENGTH, resp.header_length.encode("latin-1")))
        if answer.failed_over:
            headers.append((b"x-bluegreen-degraded", b"failover"))
        return Reply(resp.status, resp.body, headers, answer.color, answer.version, _CACHE_NAMES[cache_result],
                     upstream_s, client_id, None if resp.header_length is None else int(resp.header_length))

    async def _read_big(self, req: InferRequest, sig: Signature | None) -> dict[str, Any]:
        """A big body, checked against the model. A plain JSON body whose ``data`` arrays are flat numbers (what
        clients send) is read as a skeleton: its structure and element counts come from C-level scans, and no
        Python object is built per number (orjson made ~150 MB of them from a 16 MiB body, and held the loop
        ~280 ms). Anything else is parsed whole on a worker thread."""
        if req.header_length is None:
            skeleton = protocol.split_skeleton(req.body)
            if skeleton is not None:
                header, shapes = skeleton
                inputs = header.get("inputs")
                if isinstance(inputs, list) and len(inputs) == len(shapes):
                    if sig is not None:
                        protocol.check_request(header, 0, sig, data_shapes=shapes)
                    return header
        header, _ = await parse_and_check_off_loop(req.body, req.header_length, sig)
        return header

    def _reply_cached(self, entry: Entry, color: Color, cache_result: bytes, request_id: str | None,
                      started: float, degraded: bytes | None = None) -> Reply:
        body, header_length = entry.render(request_id)
        headers = [*self._provenance(entry.content_type, color, entry.version, cache_result),
                   (b"server-timing", b"gateway;dur=%.2f" % ((time.perf_counter() - started) * 1000))]
        if header_length is not None:
            headers.append((_HEADER_LENGTH, b"%d" % header_length))
        if degraded is not None:
            headers.append((b"x-bluegreen-degraded", degraded))
        return Reply(200, body, headers, color, entry.version, _CACHE_NAMES[cache_result], None, request_id,
                     header_length)

    # ------------------------------------------------------------------ read side

    async def model_ready(self, name: str, colors: tuple[Color, ...] | None = None) -> dict[str, bool]:
        """Per color (default: those carrying traffic): does a backend whose breaker is not open report the
        color's version ready?"""
        state = self.store.get(name)
        result: dict[str, bool] = {}
        for color in colors or tuple(c for c in COLORS if state.weights[c] > 0):
            version = state.colors[color].version
            ready = False
            for backend in self._runtimes[(name, color)].backends:
                if backend.breaker.state == "open":
                    continue
                doc = await self.upstream.get_json(f"{backend.url}/v2/models/{name}/versions/{version}/ready", 1.0)
                if isinstance(doc, dict) and doc.get("ready") is True:
                    ready = True
                    break
            result[color] = ready
        return result
