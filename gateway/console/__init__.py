"""The operator console: ``/ui`` on the admin listener, and the three reads it needs beyond the admin API.

Routes (``routes()`` returns them; ``gateway/admin.py`` includes them in one line):

* ``GET /ui/`` and its assets: plain HTML, JS and CSS files from ``gateway/console/static`` (package data, read
  once at start-up), served with a Content-Security-Policy that allows only this origin — the page holds an
  admin token, so no script but ours may run in it, and nothing is fetched from elsewhere (no CDN);
* ``GET /admin/v1/whoami`` — the caller's name and roles (any valid token, no role needed): the page offers the
  controls those roles allow, and the API still judges every write;
* ``GET /admin/v1/models/{m}/history`` (viewer) — :class:`gateway.history.History`: an hour of points per color
  and the thresholds; ``?since=T`` returns only the newer points (the page fetches the hour once, then deltas);
* ``GET /admin/v1/models/{m}/policy`` (viewer) — the policy a ``canary start`` without overrides would run
  (the routing file's): the page shows it before the operator confirms a start.

Why the page polls (every 1.5 s) instead of a server-sent event stream: an open stream is a request that never
finishes, and ``serving.http_server`` waits up to ``graceful_shutdown_s`` for running requests on SIGTERM. Tried:
a Starlette ``StreamingResponse`` does stream through ``AsgiHandler``, but one open stream held the listener's
stop for the whole grace period (3.0 s of 3.0 s), so every open console tab would hold each gateway shutdown
for 30 s. A poll is four small admin reads, none on the data path (measured: no change in the gateway's
requests/s or CPU per request at saturation), and it survives a gateway restart without reconnect logic.
"""

from __future__ import annotations

from importlib import resources

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.auth import Authenticator, Principal
from gateway.dataplane import DataPlane
from gateway.errors import BadRequest, NotFound
from gateway.history import History
from gateway.release import Release
from gateway.sources import LocalMetrics

__all__ = ["SECURITY_HEADERS", "routes"]

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _assets() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) of every file in the static folder, read once."""
    found: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _TYPES:
            found[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return found


def routes(release: Release, plane: DataPlane, auth: Authenticator, history: History | None) -> list[BaseRoute]:
    """The console's routes over the same release core, authenticator and history the admin API uses (without a
    running history — an admin app built alone, as the unit tests do — the history holds only its ``now`` point)."""
    assets = _assets()
    if history is None:
        history = History(release, LocalMetrics(plane))
    hist = history

    def caller(request: Request) -> Principal:
        client = request.client.host if request.client else "unknown"
        return auth.authenticate(client, request.headers.get("authorization"))

    def json(doc: object) -> Response:
        return Response(orjson.dumps(doc), media_type="application/json")

    async def page(request: Request) -> Response:
        name = request.path_params.get("name") or "index.html"
        found = assets.get(name)
        if found is None:
            raise NotFound(f"no console file {name!r}")
        body, kind = found
        return Response(body, media_type=kind, headers=SECURITY_HEADERS)

    async def to_page(request: Request) -> Response:
        return RedirectResponse("/ui/", status_code=308)

    async def whoami(request: Request) -> Response:
        actor = caller(request)
        return json({"name": actor.name, "roles": actor.role_list})

    async def model_history(request: Request) -> Response:
        caller(request).require("viewer", "reading the admin API")
        since = request.query_params.get("since")
        try:
            after = float(since) if since is not None else None
        except ValueError:
            raise BadRequest("since must be a number (seconds since the epoch)") from None
        return json(await hist.document(request.path_params["model"], after))

    async def model_policy(request: Request) -> Response:
        caller(request).require("viewer", "reading the admin API")
        model = release.get(request.path_params["model"]).name
        return json(release.policy_for(model, None).as_json())

    return [
        Route("/ui", to_page, methods=["GET"]),
        Route("/ui/", page, methods=["GET"]),
        Route("/ui/{name}", page, methods=["GET"]),
        Route("/admin/v1/whoami", whoami, methods=["GET"]),
        Route("/admin/v1/models/{model}/history", model_history, methods=["GET"]),
        Route("/admin/v1/models/{model}/policy", model_policy, methods=["GET"]),
    ]
