"""The admin listener: ``/admin/v1`` behind named bearer tokens.

Authentication: tokens are compared in constant time against every configured token (no early exit on the
first match). An address with ``auth_max_failures`` failed attempts in the last ``auth_window_s`` gets 429 for
every admin request until the oldest failure ages out — it cannot keep guessing — while other addresses,
valid tokens or not, are judged on their own. Every write is compare-and-set (If-Match) and audited with the
token's name; a refused request changes nothing.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import canary
from gateway.controller import apply as apply_decision
from gateway.dataplane import DataPlane
from gateway.errors import (
    BadRequest,
    Conflict,
    NotFound,
    TooManyRequests,
    Unauthorized,
)
from gateway.settings import COLORS, Color, ColorConfig, GatewaySettings, check_weights
from gateway.state import ColorState, ModelState, StateStore
from serving.errors import exception_handlers
from serving.limits import BodyLimitMiddleware

ADMIN_BODY_LIMIT = 64 * 1024
_TRACKED_ADDRESSES = 10_000


class Authenticator:
    def __init__(self, tokens: dict[str, str], max_failures: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tokens = [(t.encode(), name) for t, name in tokens.items()]
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def authenticate(self, client: str, authorization: str | None) -> str:
        """The token's name, or Unauthorized / TooManyRequests."""
        now = self._clock()
        recent = self._failures.get(client)
        if recent is not None:
            while recent and now - recent[0] >= self.window_s:
                recent.popleft()
            if len(recent) >= self.max_failures:
                raise TooManyRequests(f"too many failed authentications from {client}; try again later",
                                      math.ceil(self.window_s - (now - recent[0])))
        if not self._tokens:
            raise Unauthorized("the admin API is disabled: no admin tokens are configured")
        scheme, _, presented = (authorization or "").partition(" ")
        name: str | None = None
        if scheme.lower() == "bearer" and presented:
            candidate = presented.strip().encode()
            for token, token_name in self._tokens:  # compare with all of them: time does not tell which matched
                if hmac.compare_digest(token, candidate):
                    name = token_name
        if name is None:
            self._fail(client, now)
            raise Unauthorized("missing or invalid bearer token" if presented else "missing bearer token")
        return name

    def _fail(self, client: str, now: float) -> None:
        recent = self._failures.get(client)
        if recent is None:
            recent = self._failures[client] = deque()
            while len(self._failures) > _TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        recent.append(now)


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def _if_match(request: Request) -> int | None:
    """The revision an If-Match header names; None when absent or ``*`` (unconditional write)."""
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    tag = value.strip().removeprefix("W/").strip('"')
    try:
        return int(tag)
    except ValueError:
        return -1  # not one of our ETags: it matches no revision, so 412 (RFC 9110 13.1.1)


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("the body must be a JSON object")
    return doc


def _reason(doc: dict[str, Any]) -> str | None:
    reason = doc.pop("reason", None)
    if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
        raise BadRequest("'reason' must be a string of at most 500 characters")
    return reason


def create_admin_app(settings: GatewaySettings, store: StateStore, plane: DataPlane,
                     auth: Authenticator, canary_defaults: dict[str, dict[str, Any]] | None = None,
                     clock: Callable[[], float] = time.time) -> Starlette:
    """The admin API. ``canary_defaults``: per model, the routing file's canary policy overrides."""
    def who(request: Request) -> str:
        client = request.client.host if request.client else "unknown"
        return auth.authenticate(client, request.headers.get("authorization"))

    def model_json(state: ModelState) -> dict[str, Any]:
        doc = state.as_json()
        for color in COLORS:
            doc["colors"][color]["backends"] = plane.runtime(state.name, color).backends_json()
        doc["etag"] = state.etag
        doc["canary"] = canary_json(state)
        return doc

    async def list_models(request: Request) -> Response:
        who(request)
        return _json({"models": [model_json(s) for s in store.models.values()]})

    async def get_split(request: Request) -> Response:
        who(request)
        state = store.get(request.path_params["model"])
        return _json(dict(state.weights), headers={"etag": state.etag})

    async def write_request(request: Request) -> tuple[str, str, dict[str, Any], str | None]:
        """A model write's common start: the token's name, a model that exists, the JSON object body and its
        optional reason (taken out of the body)."""
        name = who(request)
        model = request.path_params["model"]
        store.get(model)
        doc = await _body(request)
        return name, model, doc, _reason(doc)

    async def put_split(request: Request) -> Response:
        name, model, doc, reason = await write_request(request)
        try:
            weights = check_weights(doc)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

        def change(s: ModelState) -> ModelState:
            phase = canary.Status.from_json(s.canary).phase
            if phase in canary.ACTIVE:
                raise Conflict(f"a canary rollout of {model!r} is {phase.value}: abort it (or let it finish) "
                               "before setting weights by hand")
            return _replace(s, weights=weights)

        state = await store.update(model, _if_match(request), change, who=name, action="set_weights",
                                   reason=reason)
        return _json(dict(state.weights), headers={"etag": state.etag})

    async def put_color(request: Request) -> Response:
        name = who(request)
        model = request.path_params["model"]
        color = request.path_params["color"]
        store.get(model)
        if color not in COLORS:
            raise NotFound(f"unknown color {color!r}: blue or green")
        doc = await _body(request)
        reason = _reason(doc)
        force = doc.pop("force", False)
        if not isinstance(force, bool):
            raise BadRequest("'force' must be true or false")
        try:
            cfg = ColorConfig.model_validate(doc)
        except ValidationError as exc:
            raise BadRequest(f"invalid color: {_first_error(exc)}") from None
        new_color = ColorState(cfg.version, tuple(cfg.backends))

        def change(s: ModelState) -> ModelState:
            # Judged on the state the write applies to, inside the compare-and-set: a weight change may have
            # landed while this request's body was arriving.
            if s.weights[color] > 0 and not force:
                raise Conflict(f"{color} carries {s.weights[color]}% of {model!r}; move its traffic away "
                               f"first or send \"force\": true")
            return _replace(s, colors={**s.colors, color: new_color})

        state = await store.update(model, _if_match(request), change, who=name,
                             action="set_color_forced" if force else "set_color", reason=reason)
        return _json(model_json(state), headers={"etag": state.etag})

    async def get_shadow(request: Request) -> Response:
        who(request)
        state = store.get(request.path_params["model"])
        ratio, samples = plane.shadow.agreement(state.name)
        return _json({"percent": state.shadow_percent, "agreement": ratio, "compared": samples},
                     headers={"etag": state.etag})

    async def put_shadow(request: Request) -> Response:
        """``{"percent": 0-100}``: the share of answered requests copied to the color not chosen."""
        name, model, doc, reason = await write_request(request)
        percent = doc.pop("percent", None)
        if doc:
            raise BadRequest(f"unknown keys: {', '.join(sorted(doc))} (expected 'percent' and optional 'reason')")
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise BadRequest("'percent' must be an integer from 0 to 100")
        state = await store.update(model, _if_match(request), lambda s: _replace(s, shadow_percent=percent),
                                   who=name, action="set_shadow", reason=reason)
        return _json({"percent": state.shadow_percent}, headers={"etag": state.etag})

    async def stats(request: Request) -> Response:
        who(request)
        state = store.get(request.path_params["model"])
        colors = {c: {"version": state.colors[c].version, "weight": state.weights[c],
                      **plane.runtime(state.name, c).snapshot().as_json()} for c in COLORS}
        return _json({"model": state.name, "colors": colors})

    def canary_json(state: ModelState) -> dict[str, Any]:
        status = canary.Status.from_json(state.canary)
        doc = status.as_json()
        doc["model"] = state.name
        doc["weights"] = dict(state.weights)
        doc["candidate"] = status.candidate or state.candidate
        doc["time_in_stage_s"] = round(clock() - status.stage_started, 3) if status.phase in canary.ACTIVE else None
        return doc

    async def get_canary(request: Request) -> Response:
        who(request)
        state = store.get(request.path_params["model"])
        return _json(canary_json(state), headers={"etag": state.etag})

    async def canary_command(request: Request) -> Response:
        name = who(request)
        model, command = request.path_params["model"], request.path_params["command"]
        state = store.get(model)
        raw = await request.body()
        doc = await _body(request) if raw.strip() else {}
        reason = _reason(doc)
        if command == "start":
            return await start_canary(name, state, doc, reason)
        if command not in ("pause", "resume", "promote", "abort"):
            raise NotFound(f"unknown canary command {command!r}: start, pause, resume, promote or abort")
        if doc:
            raise BadRequest(f"{command} takes no body other than an optional 'reason'")
        try:
            status, actions = canary.operator(command, canary.Status.from_json(state.canary), clock(), name)
        except ValueError as exc:
            raise Conflict(f"cannot {command}: {exc}") from None
        state = await apply_decision(store, state, status, actions, who=name, reason=reason, force_audit=True)
        return _json(canary_json(state), headers={"etag": state.etag})

    async def start_canary(name: str, state: ModelState, doc: dict[str, Any], reason: str | None) -> Response:
        force = doc.pop("force", False)
        candidate = doc.pop("candidate", None)
        if not isinstance(force, bool):
            raise BadRequest("'force' must be true or false")
        if candidate is not None and candidate not in COLORS:
            raise BadRequest("'candidate' must be blue or green")
        overrides = doc.pop("policy", None)
        if overrides is None:
            overrides, doc = doc, {}
        if doc:
            raise BadRequest(f"unknown keys: {', '.join(sorted(doc))} (policy overrides go in 'policy' or alone)")
        try:
            base = canary.Policy.from_json((canary_defaults or {}).get(state.name))
            policy = canary.Policy.from_json(overrides, base)
        except ValueError as exc:
            raise BadRequest(f"invalid policy: {exc}") from None
        status = canary.Status.from_json(state.canary)
        if status.phase in canary.ACTIVE:
            raise Conflict(f"a rollout of {state.name!r} is already {status.phase.value}")
        cand: Color = candidate or state.candidate
        if state.weights[cand] == 100:
            raise Conflict(f"{cand} already carries 100% of {state.name!r}: deploy the release to the other color")
        version = state.colors[cand].version
        report = validation_report(settings.validation_repo, state.name, version)
        if report is not True and not force:
            raise Conflict(f"{state.name}:{version} has no passing validation report ({report}); run "
                           f"`bluegreen validate --model {state.name}:{version}` or start with \"force\": true")
        new, actions = canary.start(policy, cand, clock(), f"started by {name}")
        forced = report is not True
        state = await apply_decision(store, state, new, actions, who=name, force_audit=True,
                                     action="canary_start_forced" if forced else "canary_start",
                                     reason=f"forced: {report}" + (f"; {reason}" if reason else "") if forced
                                     else reason)
        return _json(canary_json(state), headers={"etag": state.etag})

    async def cache_stats(request: Request) -> Response:
        who(request)
        cache = plane.cache
        return _json({"enabled": cache is not None, **(cache.stats() if cache is not None else {})})

    async def audit(request: Request) -> Response:
        who(request)
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            raise BadRequest("limit must be an integer") from None
        if not 1 <= limit <= 10_000:
            raise BadRequest("limit must be 1-10000")
        return _json({"entries": [e.as_json() for e in await store.read_audit(limit)]})

    async def metrics(request: Request) -> Response:
        return Response(plane.telemetry.prometheus_text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    prefix = "/admin/v1"
    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        Route(f"{prefix}/models", list_models, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/split", get_split, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/split", put_split, methods=["PUT"]),
        Route(f"{prefix}/models/{{model}}/colors/{{color}}", put_color, methods=["PUT"]),
        Route(f"{prefix}/models/{{model}}/stats", stats, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/shadow", get_shadow, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/shadow", put_shadow, methods=["PUT"]),
        Route(f"{prefix}/models/{{model}}/canary", get_canary, methods=["GET"]),
        Route(f"{prefix}/models/{{model}}/canary/{{command}}", canary_command, methods=["POST"]),
        Route(f"{prefix}/audit", audit, methods=["GET"]),
        Route(f"{prefix}/cache", cache_stats, methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(BodyLimitMiddleware, max_bytes=ADMIN_BODY_LIMIT)],
                     exception_handlers=exception_handlers())


def validation_report(repo: Path | None, model: str, version: str) -> bool | str:
    """True when ``<repo>/<model>/<version>/validation.json`` says the release gate passed, else why not."""
    if repo is None:
        return True  # the gate is switched off (BLUEGREEN_VALIDATION_REPO unset)
    path = repo / model / version / "validation.json"
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return f"no report at {path}"
    except (OSError, orjson.JSONDecodeError) as exc:
        return f"unreadable report {path}: {exc}"
    if isinstance(doc, dict) and doc.get("passed") is True:
        return True
    failed = [c.get("check") for c in doc.get("checks", []) if isinstance(c, dict) and c.get("result") == "FAIL"] \
        if isinstance(doc, dict) else []
    return f"the report at {path} did not pass" + (f" (failed: {', '.join(map(str, failed))})" if failed else "")


def _replace(state: ModelState, **changes: Any) -> ModelState:
    import dataclasses

    return dataclasses.replace(state, **changes)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
