"""The admin listener: ``/admin/v1`` as thin endpoints over the release core.

Each endpoint authenticates (``gateway.auth``), parses the body into one of the release core's pydantic bodies,
calls the core (``gateway.release``) and renders its answer; every rule about what may change, when and by whom
lives in the core (reads need the ``viewer`` role, checked here). Every write is compare-and-set: it must carry
``If-Match`` with the ETag its author read (428 without one, unless ``BLUEGREEN_ADMIN__REQUIRE_IF_MATCH=false``;
``If-Match: *`` is an explicit unconditional write) and is audited with the token's name and roles; a refused
request changes nothing.
Outside signals (``POST /admin/v1/models/{m}/signals``) are events, not edits of a state read, and need no
If-Match; lifting the release freeze (``DELETE /admin/v1/freeze``) takes ``If-Match: *`` (the freeze has no ETag).
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import orjson
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import console
from gateway import release as core
from gateway.auth import Authenticator, Principal
from gateway.canary import COMMANDS, Command
from gateway.dataplane import DataPlane
from gateway.errors import BadRequest, Forbidden, NotFound, PreconditionFailed, PreconditionRequired, render
from gateway.history import History
from gateway.notify import Notifier
from gateway.policy import describe
from gateway.release import ApproveBody, ColorBody, CommandBody, Release, ShadowBody, SplitBody, StartBody
from gateway.settings import COLORS, Color
from gateway.signals import LiftBody, SignalBody, Signals
from gateway.state import ModelState
from serving.errors import exception_handlers
from serving.limits import BodyLimitMiddleware

ADMIN_BODY_LIMIT = 64 * 1024
B = TypeVar("B", bound=BaseModel)


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def _if_match(request: Request, required: bool) -> int | None:
    """The revision an If-Match header names; None for ``*`` (an unconditional write) or, where allowed, none."""
    value = request.headers.get("if-match")
    if value is None:
        if required:
            raise PreconditionRequired("admin writes need If-Match with the model's ETag (read it with a GET: "
                                       "the ETag header), or If-Match: * to write unconditionally")
        return None
    if value.strip() == "*":
        return None
    tag = value.strip().removeprefix("W/").strip('"')
    try:
        return int(tag)
    except ValueError:
        return -1  # not one of our ETags: it matches no revision, so 412 (RFC 9110 13.1.1)


async def _parse(request: Request, body: type[B], *, optional: bool = False) -> B:
    """The request's JSON object as ``body``; BadRequest names the field that is wrong."""
    raw = await request.body()
    if optional and not raw.strip():
        return body.model_validate({})
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return body.model_validate(doc)
    except ValidationError as exc:
        raise BadRequest(f"invalid body: {describe(exc)}") from None


def create_admin_app(release: Release, plane: DataPlane, auth: Authenticator, *,
                     require_if_match: bool = True, history: History | None = None,
                     notifier: Notifier | None = None) -> Starlette:
    """The admin API over ``release`` (the rules and the state) and ``plane`` (the live numbers it shows)."""

    signals = Signals(release)

    def caller(request: Request) -> Principal:
        client = request.client.host if request.client else "unknown"
        return auth.authenticate(client, request.headers.get("authorization"))

    def who(request: Request) -> Principal:
        """A reader: any token with the viewer role (or more)."""
        actor = caller(request)
        actor.require("viewer", "reading the admin API")
        return actor

    def writer(request: Request) -> tuple[Principal, str, int | None]:
        """A writer: the caller (roles are the core's to judge), the model and the If-Match revision — in that
        order, so an unknown path is 404 whatever the headers."""
        actor = caller(request)
        model = model_of(request).name
        color = request.path_params.get("color")
        if color is not None and color not in COLORS:
            raise NotFound(f"unknown color {color!r}: blue or green")
        return actor, model, _if_match(request, require_if_match)

    def model_of(request: Request) -> ModelState:
        return release.get(request.path_params["model"])

    def canary_json(state: ModelState) -> dict[str, Any]:
        status = state.canary
        doc = status.as_json()
        doc.update(model=state.name, weights=dict(state.weights), candidate=status.candidate or state.candidate,
                   time_in_stage_s=release.time_in_stage(status))
        return doc

    def model_json(state: ModelState) -> dict[str, Any]:
        doc = state.as_json()
        for color in COLORS:
            doc["colors"][color]["backends"] = plane.runtime(state.name, color).backends_json()
        doc["etag"] = state.etag
        doc["canary"] = canary_json(state)
        return doc

    def tagged(doc: Any, state: ModelState) -> Response:
        return _json(doc, headers={"etag": state.etag})

    async def list_models(request: Request) -> Response:
        who(request)
        return _json({"models": [model_json(release.get(name)) for name in release.store.models]})

    async def get_model(request: Request) -> Response:
        who(request)
        state = model_of(request)
        return tagged(model_json(state), state)

    async def get_split(request: Request) -> Response:
        who(request)
        state = model_of(request)
        return tagged(dict(state.weights), state)

    async def put_split(request: Request) -> Response:
        actor, model, revision = writer(request)
        body = await _parse(request, SplitBody)
        state = await release.set_split(model, body, actor=actor, if_revision=revision)
        return tagged(dict(state.weights), state)

    async def put_color(request: Request) -> Response:
        actor, model, revision = writer(request)
        color = request.path_params["color"]
        body = await _parse(request, ColorBody)
        c: Color = "blue" if color == "blue" else "green"
        state = await release.set_color(model, c, body, actor=actor, if_revision=revision)
        return tagged(model_json(state), state)

    async def get_shadow(request: Request) -> Response:
        who(request)
        state = model_of(request)
        ratio, samples = plane.shadow.agreement(state.name)
        return tagged({"percent": state.shadow_percent, "agreement": ratio, "compared": samples}, state)

    async def put_shadow(request: Request) -> Response:
        actor, model, revision = writer(request)
        body = await _parse(request, ShadowBody)
        state = await release.set_shadow(model, body, actor=actor, if_revision=revision)
        return tagged({"percent": state.shadow_percent}, state)

    async def payload_log(request: Request) -> Response:
        if request.method == "GET":
            who(request)
            state = model_of(request)
        else:
            actor, model, revision = writer(request)
            state = await release.set_payload_logging(model, await _parse(request, core.PayloadLogBody), actor=actor,
                                                      if_revision=revision)
        return tagged(plane.payload_log.describe(state.name, state.payload_log_percent), state)

    async def drift(request: Request) -> Response:
        who(request)
        return _json(plane.drift.report(model_of(request).name, COLORS))

    async def stats(request: Request) -> Response:
        who(request)
        state = model_of(request)
        colors = {c: {"version": state.colors[c].version, "weight": state.weights[c],
                      **plane.runtime(state.name, c).snapshot().as_json()} for c in COLORS}
        return _json({"model": state.name, "colors": colors})

    async def get_canary(request: Request) -> Response:
        who(request)
        state = model_of(request)
        return tagged(canary_json(state), state)

    async def canary_command(request: Request) -> Response:
        command = request.path_params["command"]
        if command not in ("start", "approve", *COMMANDS):
            caller(request)
            raise NotFound(f"unknown canary command {command!r}: start, pause, resume, promote, abort or approve")
        actor, model, revision = writer(request)
        if command == "start":
            start = await _parse(request, StartBody, optional=True)
            state = await release.start(model, start, actor=actor, if_revision=revision)
        elif command == "approve":
            state = await release.approve(model, await _parse(request, ApproveBody), actor=actor,
                                          if_revision=revision)
        else:
            body = await _parse(request, CommandBody, optional=True)
            state = await release.command(model, cast(Command, command), body, actor=actor, if_revision=revision)
        return tagged(canary_json(state), state)

    async def post_signal(request: Request) -> Response:
        """An outside signal (gateway/signals.py): no If-Match, signals are events rather than state edits."""
        actor = caller(request)
        model = model_of(request).name
        doc = await signals.receive(model, await _parse(request, SignalBody), actor=actor)
        if doc.get("failed"):  # an incident left some model unfrozen or not rolled back: say so loudly
            return _json({"error": f"the incident could not be applied to {', '.join(doc['failed'])}; send it "
                                   "again", **doc}, status=503)
        return _json(doc)

    async def freeze(request: Request) -> Response:
        if request.method == "GET":
            who(request)
            return _json(signals.describe())
        actor = caller(request)
        if _if_match(request, require_if_match) is not None:
            raise PreconditionFailed("the release freeze has no ETag: lift it with If-Match: *")
        return _json(await signals.lift(await _parse(request, LiftBody, optional=True), actor=actor))

    async def cache_stats(request: Request) -> Response:
        who(request)
        cache = plane.cache
        return _json({"enabled": cache is not None, **(cache.stats() if cache is not None else {})})

    def limit_of(request: Request, most: int) -> int:
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        if not 1 <= limit <= most:
            raise BadRequest(f"limit must be 1-{most}")
        return limit

    async def audit(request: Request) -> Response:
        who(request)
        limit = limit_of(request, 10_000)
        return _json({"entries": [e.as_json() for e in await release.store.read_audit(limit)]})

    async def notifications(request: Request) -> Response:
        who(request)
        limit = limit_of(request, 500)
        if notifier is None:
            return _json({"sending": False, "sinks": [], "deliveries": []})
        return _json(await notifier.status(limit))

    async def metrics(request: Request) -> Response:
        return Response(plane.telemetry.prometheus_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    prefix = "/admin/v1"
    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        Route(f"{prefix}/models", list_models, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}", get_model, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/split", get_split, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/split", put_split, methods=["PUT"]),
        Route(f"{prefix}/models/{{model}}/colors/{{color}}", put_color, methods=["PUT"]),
        Route(f"{prefix}/models/{{model}}/stats", stats, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/shadow", get_shadow, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/shadow", put_shadow, methods=["PUT"]),
        Route(f"{prefix}/models/{{model}}/payload-log", payload_log, methods=["GET", "PUT"]),
        Route(f"{prefix}/models/{{model}}/drift", drift, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/canary", get_canary, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/canary/{{command}}", canary_command, methods=["POST"]),
        Route(f"{prefix}/models/{{model}}/signals", post_signal, methods=["POST"]),
        Route(f"{prefix}/freeze", freeze, methods=["GET", "DELETE"]),
        Route(f"{prefix}/audit", audit, methods=["GET"]),
        Route(f"{prefix}/notifications", notifications, methods=["GET"]),
        Route(f"{prefix}/cache", cache_stats, methods=["GET"]),
        *console.routes(release, plane, auth, history),  # /ui, whoami, history, policy: gateway/console
    ]
    async def forbidden(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Forbidden)
        plane.telemetry.auth_failure("admin", "forbidden")
        return render(exc)

    handlers = {**exception_handlers(), Forbidden: forbidden}
    return Starlette(routes=routes, middleware=[Middleware(BodyLimitMiddleware, max_bytes=ADMIN_BODY_LIMIT)],
                     exception_handlers=handlers)
