"""The operator verbs — ``bluegreen status|weights|shadow|canary|audit`` — as HTTP calls to the admin API.

``gateway/cli.py`` only parses arguments and ``gateway/admin_text.py`` only renders; everything here takes plain
values, so the tests drive each step (``put_weights`` with a given ETag, ``watch`` with a given sleep) against a
real gateway. httpx's exceptions never leave :class:`AdminClient`: they become one of these, and :func:`run`
turns them into a message on stderr and an exit status::

    OperatorError (exit 1)
    ├── UsageError (exit 2)        no token, a malformed weights spec or policy: nothing was sent
    ├── AdminUnreachable (exit 1)  the admin URL refused the connection, timed out, is not HTTP
    └── AdminError (exit 1)        the API answered 4xx/5xx; carries the status, the server's "error" and, after
        │                          a 429, how long to wait (Retry-After)
        ├── StaleWeights           412 on a weight change: someone else wrote first; carries what is there now
        └── StaleRollout           412 on a canary command: the rollout changed between the read and the write

Every write carries ``If-Match`` with the ETag read just before it (a gateway may require one: 428 without), so
a write decided on a state that has changed since is refused (412) and reported rather than applied blindly.
The server's messages name JSON body keys (it serves any client); where the CLI has a flag for a key, the
message is rewritten to name the flag (:func:`cli_wording`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from gateway.admin_text import format_audit_entry, format_canary, format_status, format_weights

COLORS = ("blue", "green")
CANARY_COMMANDS = ("start", "pause", "resume", "promote", "abort", "approve")
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
    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        if retry_after_s is not None:
            message += f"; wait {retry_after_s} s before trying again"
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s

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


class StaleRollout(AdminError):
    def __init__(self, model: str, command: str, current: Mapping[str, Any] | None) -> None:
        now = f" it is now {current.get('phase')} at {format_weights(current.get('weights') or {})}" if current else ""
        super().__init__(412, f"the rollout of {model!r} changed while `canary {command}` was sent; nothing was "
                              f"done;{now}. Run the command again if still wanted.")
        self.current = dict(current) if current else None


_FLAGS = {"force": "--force", "candidate": "--candidate", "policy": "--policy", "reason": "--reason"}
_JSON_KEY = re.compile(r'"(force|candidate|policy|reason)": ?(?:true|"[^"]*"|\{[^}]*\})')
_BARE_KEY = re.compile(r"\b(with|send|pass|add) (force)\b")
_FIELD = re.compile(r"(body: |; )(force|candidate|policy|reason)([:.])")


def cli_wording(message: str) -> str:
    """The server's message with its body keys named as the CLI's flags. The admin API serves any client, so it
    names JSON keys: ``start with "force": true`` (the first API's wording), ``start anyway with force`` (the
    release core's), ``invalid body: reason: ...`` (a field refused); the CLI's user knows only the flags."""
    message = _JSON_KEY.sub(lambda m: _FLAGS[m.group(1)], message)
    message = _BARE_KEY.sub(lambda m: f"{m.group(1)} {_FLAGS[m.group(2)]}", message)
    return _FIELD.sub(lambda m: f"{m.group(1)}{_FLAGS[m.group(2)]}{':' if m.group(3) == ':' else ' '}", message)


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
        raise AdminError(response.status_code, _error_message(response), _retry_after(response))

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

    def canary(self, model: str) -> tuple[dict[str, Any], str]:
        response = self.request("GET", f"/models/{_seg(model)}/canary")
        return _json(response), response.headers.get("etag", "*")

    def canary_command(self, model: str, command: str, body: Mapping[str, Any], etag: str) -> dict[str, Any]:
        doc: dict[str, Any] = _json(self.request("POST", f"/models/{_seg(model)}/canary/{command}",
                                                 json_body=dict(body), headers={"if-match": etag}))
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


def _retry_after(response: httpx.Response) -> int | None:
    """A 429's Retry-After in whole seconds (the admin API sends delta-seconds); None when absent or unreadable."""
    if response.status_code != 429:
        return None
    try:
        return max(0, int(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def run(url: str | None, token_file: Path | None, verb: Callable[[AdminClient], int],
        environ: Mapping[str, str] = os.environ) -> int:
    """Resolve URL and token, run ``verb``; an OperatorError becomes ``error: ...`` on stderr and its exit code."""
    try:
        with AdminClient(admin_url(url, environ), admin_token(token_file, environ)) as client:
            return verb(client)
    except OperatorError as exc:
        print(f"error: {cli_wording(str(exc))}", file=sys.stderr)
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
    """Show the split (no ``specs``) or set it, ``If-Match`` on the split just read."""
    weights = parse_weights(specs) if specs else None
    if weights is None and reason:
        raise UsageError("--reason goes with a change: give the new weight of a color (green=N or blue=N)")
    before, etag = client.split(model)
    if weights is None:
        print(f"{model}: weights {format_weights(before)}")
        return 0
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
                policy: str | None = None, reason: str | None = None, gate: str | None = None) -> dict[str, Any]:
    """The command's JSON body. Each option goes with its commands (``--force`` with start and promote, ``--gate``
    with approve, the rest with start): one given elsewhere is refused here rather than silently dropped."""
    if command not in CANARY_COMMANDS:
        raise UsageError(f"unknown canary command {command!r}: {', '.join(CANARY_COMMANDS)}")
    body: dict[str, Any] = {}
    if force and command not in ("start", "promote"):
        raise UsageError("--force only goes with `canary MODEL start` or `canary MODEL promote`")
    given = [flag for flag, value in (("--candidate", candidate), ("--policy", policy)) if value]
    if command == "start":
        if policy is not None:
            body["policy"] = parse_policy(policy)
        if candidate is not None:
            body["candidate"] = candidate
    elif given:
        raise UsageError(f"{', '.join(given)} only go with `canary MODEL start`")
    if force:
        body["force"] = True
    if command == "approve":
        if not gate:
            raise UsageError("approve needs --gate NAME: the gate of the stage this token approves")
        body["gate"] = gate
    elif gate:
        raise UsageError("--gate only goes with `canary MODEL approve`")
    if reason:
        body["reason"] = reason
    return body


def canary(client: AdminClient, model: str, command: str | None, *, force: bool = False,
           candidate: str | None = None, policy: str | None = None, reason: str | None = None,
           gate: str | None = None, as_json: bool = False) -> int:
    """Show the rollout (no ``command``), or POST the command with ``If-Match`` on the rollout just read and show
    the outcome. A malformed ``--policy`` is refused before anything is sent; a 412 is not retried (the command
    was decided on a rollout that has moved on); the server's refusals name the CLI's flags."""
    if command is None:
        given = [flag for flag, value in (("--force", force), ("--candidate", candidate), ("--policy", policy),
                                          ("--reason", reason), ("--gate", gate)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} go with a command: `canary MODEL start|pause|...`")
        doc, _ = client.canary(model)
    else:
        body = canary_body(command, force=force, candidate=candidate, policy=policy, reason=reason, gate=gate)
        _, etag = client.canary(model)
        try:
            doc = client.canary_command(model, command, body, etag)
        except AdminError as exc:
            if exc.status != 412:
                raise
            try:
                current: dict[str, Any] | None = client.canary(model)[0]
            except OperatorError:
                current = None
            raise StaleRollout(model, command, current) from None
    print(json.dumps(doc, indent=2) if as_json else format_canary(doc))
    return 0


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
