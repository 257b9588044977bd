"""The operator verbs — ``bluegreen status|weights|canary|audit`` — as HTTP calls to the admin API.

``gateway/cli.py`` only parses arguments; everything here takes plain values, so the tests drive each step
(``put_weights`` with a given ETag, ``watch`` with a given sleep) against a real gateway. httpx's exceptions
never leave :class:`AdminClient`: they become one of these, and :func:`run` turns them into a message on
stderr and an exit status::

    OperatorError (exit 1)
    ├── UsageError (exit 2)        no token, a malformed weights spec or policy: nothing was sent
    ├── AdminUnreachable (exit 1)  the admin URL refused the connection, timed out, is not HTTP
    └── AdminError (exit 1)        the API answered 4xx/5xx; carries the status and the server's "error"
        └── StaleWeights           412 on a weight change: someone else wrote first; carries what is there now
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

COLORS = ("blue", "green")
CANARY_COMMANDS = ("start", "pause", "resume", "promote", "abort")
DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
ADMIN_URL_ENV = "BLUEGREEN_ADMIN_URL"
ADMIN_TOKEN_ENV = "BLUEGREEN_ADMIN_TOKEN"
_AUDIT_MAX = 10_000  # the admin API's largest ?limit=
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


class OperatorError(Exception):
    exit_code = 1


class UsageError(OperatorError):
    exit_code = 2


class AdminUnreachable(OperatorError):
    pass


class AdminError(OperatorError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth trying again later (``status --watch`` keeps going): the gateway is busy or failing."""
        return self.status >= 500


class StaleWeights(AdminError):
    def __init__(self, model: str, current: Mapping[str, int] | None, etag: str | None) -> None:
        now = f" they are now {format_weights(current)} (ETag {etag})" if current else ""
        super().__init__(412, f"the weights of {model!r} changed since they were read; nothing was written;{now}. "
                              "Check who changed them (`bluegreen audit`) and run the command again if still wanted.")
        self.current = dict(current) if current else None
        self.etag = etag


# ------------------------------------------------------------------------------------------ connection


def admin_url(given: str | None, environ: Mapping[str, str] = os.environ) -> str:
    return (given or environ.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL).rstrip("/")


def admin_token(token_file: Path | None, environ: Mapping[str, str] = os.environ) -> str:
    """``--token-file`` when given (it names a deliberate choice), else ``$BLUEGREEN_ADMIN_TOKEN``."""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read the admin token file {token_file}: {exc.strerror or exc}") from None
        if not token:
            raise UsageError(f"the admin token file {token_file} is empty")
        return token
    token = environ.get(ADMIN_TOKEN_ENV, "").strip()
    if not token:
        raise UsageError(f"no admin token: set {ADMIN_TOKEN_ENV} or pass --token-file FILE "
                         "(`bluegreen up` prints the token it uses)")
    return token


class AdminClient:
    """The admin API under ``/admin/v1``, one method per call used by the verbs."""

    def __init__(self, url: str, token: str, timeout_s: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url
        self._http = httpx.Client(base_url=f"{url}/admin/v1", timeout=timeout_s, transport=transport,
                                  headers={"authorization": f"Bearer {token}", "accept": "application/json"})

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, json_body: Any = None,
                headers: dict[str, str] | None = None, params: dict[str, str] | None = None) -> httpx.Response:
        """The response when 2xx; AdminError (the server's message) or AdminUnreachable otherwise."""
        try:
            response = self._http.request(method, path, json=json_body, headers=headers, params=params)
        except httpx.ConnectError as exc:
            raise AdminUnreachable(f"cannot connect to the admin API at {self.url} ({exc}); is the gateway "
                                   f"running? (--admin-url or {ADMIN_URL_ENV})") from None
        except httpx.TimeoutException:
            raise AdminUnreachable(f"the admin API at {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise AdminUnreachable(f"talking to the admin API at {self.url} failed: {exc}") from None
        if response.is_success:
            return response
        raise AdminError(response.status_code, _error_message(response))

    def get(self, path: str, params: dict[str, str] | None = None) -> Any:
        return _json(self.request("GET", path, params=params))

    def models(self) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = self.get("/models")["models"]
        return models

    def stats(self, model: str) -> dict[str, Any]:
        stats: dict[str, Any] = self.get(f"/models/{_seg(model)}/stats")
        return stats

    def split(self, model: str) -> tuple[dict[str, int], str]:
        response = self.request("GET", f"/models/{_seg(model)}/split")
        return _json(response), response.headers.get("etag", "*")

    def put_split(self, model: str, weights: Mapping[str, int], etag: str,
                  reason: str | None = None) -> tuple[dict[str, int], str]:
        body: dict[str, Any] = dict(weights)
        if reason:
            body["reason"] = reason
        response = self.request("PUT", f"/models/{_seg(model)}/split", json_body=body, headers={"if-match": etag})
        return _json(response), response.headers.get("etag", "")

    def shadow(self, model: str) -> tuple[dict[str, Any], str]:
        response = self.request("GET", f"/models/{_seg(model)}/shadow")
        return _json(response), response.headers.get("etag", "*")

    def put_shadow(self, model: str, percent: int, etag: str, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"percent": percent}
        if reason:
            body["reason"] = reason
        doc: dict[str, Any] = _json(self.request("PUT", f"/models/{_seg(model)}/shadow", json_body=body,
                                                 headers={"if-match": etag}))
        return doc

    def canary(self, model: str) -> dict[str, Any]:
        doc: dict[str, Any] = self.get(f"/models/{_seg(model)}/canary")
        return doc

    def canary_command(self, model: str, command: str, body: Mapping[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = _json(self.request("POST", f"/models/{_seg(model)}/canary/{command}",
                                                 json_body=dict(body)))
        return doc

    def audit(self, limit: int) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = self.get("/audit", params={"limit": str(limit)})["entries"]
        return entries


def _seg(name: str) -> str:
    """A model name as one path segment."""
    return quote(name, safe="")


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise AdminUnreachable(f"{response.request.url} answered {response.status_code} with a body that is "
                               "not JSON; is --admin-url the gateway's admin listener?") from None


def _error_message(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return f"{doc['error']} (HTTP {response.status_code})"
    text = response.text.strip()[:200]
    return f"HTTP {response.status_code} from {response.request.url}" + (f": {text}" if text else "")


def run(url: str | None, token_file: Path | None, verb: Callable[[AdminClient], int],
        environ: Mapping[str, str] = os.environ) -> int:
    """Resolve URL and token, run ``verb``; an OperatorError becomes ``error: ...`` on stderr and its exit code."""
    try:
        with AdminClient(admin_url(url, environ), admin_token(token_file, environ)) as client:
            return verb(client)
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


# ------------------------------------------------------------------------------------------ status


def fetch_status(client: AdminClient) -> dict[str, Any]:
    """``{"models": GET /models, "stats": [GET /models/{m}/stats, ...]}``, the server's documents unchanged."""
    models = client.models()
    return {"models": models, "stats": [client.stats(m["name"]) for m in models]}


def status(client: AdminClient, *, as_json: bool = False) -> int:
    doc = fetch_status(client)
    print(json.dumps(doc, indent=2) if as_json else format_status(doc))
    return 0


def watch(client: AdminClient, interval_s: float, *, as_json: bool = False,
          sleep: Callable[[float], None] = time.sleep, tty: bool | None = None) -> int:
    """Redraw the status every ``interval_s`` until Ctrl-C. The screen is cleared only on a terminal, so a
    redirected watch is a plain log of frames (with ``--json``: one document per line). A gateway that is
    down or failing shows as a line and the watch goes on; an answer that will not change (a wrong token,
    which would also get this address locked out) ends it."""
    if interval_s <= 0:
        raise UsageError("--interval must be positive")
    tty = sys.stdout.isatty() if tty is None else tty
    try:
        while True:
            try:
                doc = fetch_status(client)
                frame = json.dumps(doc) if as_json else format_status(doc)
            except (AdminUnreachable, AdminError) as exc:
                if isinstance(exc, AdminError) and not exc.transient:
                    raise
                frame = f"error: {exc}"
            if tty:
                frame = _CLEAR_SCREEN + frame
            if not as_json:
                frame += f"\n\n{time.strftime('%H:%M:%S')}  every {interval_s:g}s; Ctrl-C to stop"
            print(frame, flush=True)
            sleep(interval_s)
    except KeyboardInterrupt:
        return 0


def format_status(doc: Mapping[str, Any]) -> str:
    stats = {s["model"]: s for s in doc.get("stats", [])}
    blocks = [_format_model(m, stats.get(m["name"], {})) for m in doc.get("models", [])]
    return "\n\n".join(blocks) if blocks else "no models configured"


def _format_model(model: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    canary = model.get("canary") or {}
    lines = [f"{model['name']}  weights {format_weights(model['weights'])}  stable {model.get('stable', '?')}  "
             f"candidate {model.get('candidate', '?')}  revision {model.get('revision', '?')}",
             f"  canary {_canary_summary(canary)}"]
    rows = [("color", "version", "weight", "p50 ms", "p95 ms", "p99 ms", "errors", "rps", "requests", "breakers")]
    for color in COLORS:
        c = model["colors"][color]
        s = stats.get("colors", {}).get(color, {})
        rows.append((color, str(c.get("version", "?")), f"{model['weights'][color]}%", _ms(s.get("p50_ms")),
                     _ms(s.get("p95_ms")), _ms(s.get("p99_ms")), _percent(s.get("error_rate"), s.get("count")),
                     _number(s.get("rps")), _number(s.get("count")), _breakers(c.get("backends", []))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    window = next((s.get("window_s") for s in stats.get("colors", {}).values() if s.get("window_s")), None)
    if window:
        lines.append(f"  (latency, errors and rps over the last {window:g} s)")
    return "\n".join(lines)


def _canary_summary(canary: Mapping[str, Any]) -> str:
    phase = canary.get("phase", "idle")
    if phase == "idle":
        return "idle"
    text = f"{phase}, candidate {canary.get('candidate', '?')}, stage {_stage(canary)}"
    if canary.get("time_in_stage_s") is not None:
        text += f" for {canary['time_in_stage_s']:.0f} s"
    last = canary.get("last_decision")
    if last:
        text += f"; last decision: {last.get('result')} — {last.get('reason')}"
    return text


def _stage(canary: Mapping[str, Any]) -> str:
    stage, stages = canary.get("stage", 0), canary.get("stages", 0)
    if stages and stage > stages:
        return "promotion"
    return f"{stage}/{stages}"


def _breakers(backends: Iterable[Mapping[str, Any]]) -> str:
    states = [str(b.get("breaker", "?")) for b in backends]
    if not states:
        return "no backends"
    if len(set(states)) == 1:
        return states[0] if len(states) == 1 else f"{len(states)}× {states[0]}"
    return " ".join(states)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


def _percent(rate: Any, count: Any) -> str:
    return "-" if rate is None or not count else f"{rate * 100:.2f}%"


def format_weights(weights: Mapping[str, Any]) -> str:
    return " / ".join(f"{c} {weights.get(c, '?')}%" for c in COLORS)


# ------------------------------------------------------------------------------------------ weights


def parse_weights(specs: Sequence[str]) -> dict[str, int]:
    """``["green=20"]`` → ``{"blue": 80, "green": 20}``; both colors may be given if they sum to 100."""
    given: dict[str, int] = {}
    for spec in specs:
        color, sep, value = spec.partition("=")
        color = color.strip().lower()
        if not sep or color not in COLORS:
            raise UsageError(f"expected blue=N or green=N, got {spec!r}")
        if color in given:
            raise UsageError(f"{color} is given twice")
        try:
            weight = int(value)
        except ValueError:
            raise UsageError(f"{color}'s weight must be an integer 0-100, got {value!r}") from None
        if not 0 <= weight <= 100:
            raise UsageError(f"{color}'s weight must be 0-100, got {weight}")
        given[color] = weight
    if not given:
        raise UsageError("give the new weight of a color: green=N or blue=N")
    if len(given) == 1:
        (color, weight), = given.items()
        given[next(c for c in COLORS if c != color)] = 100 - weight
    elif sum(given.values()) != 100:
        raise UsageError(f"the weights must sum to 100, got {given['blue']} + {given['green']}")
    return {c: given[c] for c in COLORS}


def put_weights(client: AdminClient, model: str, weights: Mapping[str, int], etag: str,
                reason: str | None = None) -> tuple[dict[str, int], str]:
    """PUT the split with ``If-Match: etag``. On 412 the current weights are read back for the message and
    :class:`StaleWeights` is raised: the change was decided on numbers that no longer hold, so it is not
    retried."""
    try:
        return client.put_split(model, weights, etag, reason)
    except AdminError as exc:
        if exc.status != 412:
            raise
    try:
        current, current_etag = client.split(model)
    except OperatorError:
        current, current_etag = None, None
    raise StaleWeights(model, current, current_etag)


def set_weights(client: AdminClient, model: str, specs: Sequence[str], reason: str | None = None) -> int:
    weights = parse_weights(specs)
    before, etag = client.split(model)
    after, _ = put_weights(client, model, weights, etag, reason)
    print(f"{model}: weights {format_weights(after)} (were {format_weights(before)})")
    return 0


# ------------------------------------------------------------------------------------------ shadow


def shadow(client: AdminClient, model: str, percent: int | None, reason: str | None = None) -> int:
    """Show the shadow share and agreement, or set the share (``If-Match`` on what was just read)."""
    if percent is not None and not 0 <= percent <= 100:
        raise UsageError(f"the shadow share must be 0-100, got {percent}")
    current, etag = client.shadow(model)
    agreement = current.get("agreement")
    seen = f"agreement {agreement:.3f} over {current.get('compared', 0)} copies" if agreement is not None \
        else "no copies compared yet"
    if percent is None:
        print(f"{model}: shadow {current['percent']}% ({seen})")
        return 0
    after = client.put_shadow(model, percent, etag, reason)
    print(f"{model}: shadow {after['percent']}% (was {current['percent']}%; {seen})")
    return 0


# ------------------------------------------------------------------------------------------ canary


def parse_policy(text: str) -> dict[str, Any]:
    """``--policy``: a JSON object, or ``@FILE`` holding one."""
    source = "--policy"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise UsageError(f"cannot read the policy file {source}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{source} must be a JSON object of policy overrides")
    return doc


def canary_body(command: str, *, force: bool = False, candidate: str | None = None,
                policy: str | None = None, reason: str | None = None) -> dict[str, Any]:
    if command not in CANARY_COMMANDS:
        raise UsageError(f"unknown canary command {command!r}: {', '.join(CANARY_COMMANDS)}")
    body: dict[str, Any] = {}
    if command == "start":
        if policy is not None:
            body["policy"] = parse_policy(policy)
        if candidate is not None:
            body["candidate"] = candidate
        if force:
            body["force"] = True
    else:
        given = [flag for flag, value in (("--force", force), ("--candidate", candidate), ("--policy", policy))
                 if value]
        if given:
            raise UsageError(f"{', '.join(given)} only go with `canary MODEL start`")
    if reason:
        body["reason"] = reason
    return body


def canary(client: AdminClient, model: str, command: str, *, force: bool = False, candidate: str | None = None,
           policy: str | None = None, reason: str | None = None, as_json: bool = False) -> int:
    """POST the command (a malformed ``--policy`` is refused before anything is sent) and show the outcome."""
    body = canary_body(command, force=force, candidate=candidate, policy=policy, reason=reason)
    doc = client.canary_command(model, command, body)
    print(json.dumps(doc, indent=2) if as_json else format_canary(doc))
    return 0


def format_canary(doc: Mapping[str, Any]) -> str:
    lines = [f"{doc.get('model', '?')}: canary {doc.get('phase')}, candidate {doc.get('candidate')}, "
             f"stage {_stage(doc)}",
             f"  weights {format_weights(doc.get('weights') or {})}"]
    last = doc.get("last_decision")
    if last:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last["time"])) if last.get("time") else "?"
        lines.append(f"  last decision {when}: {last.get('result')} — {last.get('reason')}")
        if last.get("evidence"):
            lines.append(f"  evidence {_compact(last['evidence'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ audit


def audit(client: AdminClient, limit: int, model: str | None = None, *, as_json: bool = False) -> int:
    """The newest ``limit`` entries, of one model when given. The API has no model filter, so a filtered view
    reads as far back as the API goes and filters here."""
    if limit < 1:
        raise UsageError("--limit must be at least 1")
    entries = client.audit(min(limit, _AUDIT_MAX) if model is None else _AUDIT_MAX)
    if model is not None:
        entries = [e for e in entries if e.get("model") == model]
    entries = entries[:limit]
    if as_json:
        print(json.dumps({"entries": entries}, indent=2))
    elif not entries:
        print("no audit entries" + (f" for {model!r}" if model else ""))
    else:
        for entry in entries:
            print(format_audit_entry(entry))
    return 0


def format_audit_entry(entry: Mapping[str, Any]) -> str:
    when = entry.get("time_iso") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.get("time", 0)))
    parts = [when, str(entry.get("who")), str(entry.get("action")), str(entry.get("model") or "-"),
             json.dumps(entry["reason"], ensure_ascii=False) if entry.get("reason") else "-"]
    change = _change(entry.get("old"), entry.get("new"))
    if change:
        parts.append(change)
    return "  ".join(parts)


def _change(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [*old, *(k for k in new if k not in old)]
        return "; ".join(f"{k} {_compact(old.get(k))} → {_compact(new.get(k))}" for k in keys)
    if old is None and new is None:
        return ""
    return f"{_compact(old)} → {_compact(new)}"


def _compact(value: Any) -> str:
    if isinstance(value, dict) and all(not isinstance(v, dict | list) for v in value.values()):
        keys = sorted(value, key=lambda k: (COLORS.index(k) if k in COLORS else len(COLORS), str(k)))
        return " ".join(f"{k}={value[k]}" for k in keys)  # blue before green, whichever was written first
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
