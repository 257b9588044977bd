"""The verbs about the world outside the gateway — ``bluegreen signal``, ``bluegreen freeze`` and ``bluegreen
notifications`` — as calls to the admin API.

Apart from :mod:`gateway.admin_client` (the other verbs; this uses its :class:`~gateway.admin_client.AdminClient`
and error tree) so that module stays one screenful per verb. A signal carries no ETag (it is an event, not an edit
of something read); lifting the freeze sends ``If-Match: *`` (the freeze has no ETag either). Options that do not
go with a signal's kind are refused here, before anything is sent.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from gateway.admin_client import AdminClient, AdminError, UsageError, _json, _seg
from gateway.admin_text import format_freeze

MAX_COUNT = 100_000
_FIELD = re.compile(r"\b(?:complaint|incident)\.(count|color|reason)\b")


def signal_body(kind: str, *, color: str | None = None, count: int | None = None,
                reason: str | None = None) -> dict[str, Any]:
    """The signal's JSON body; UsageError names the flag that is missing or does not belong."""
    if kind == "complaint":
        if reason:
            raise UsageError("--reason goes with `signal MODEL incident`; a complaint carries --color and --count")
        if count is None:
            raise UsageError("a complaint needs --count N: how many complaints (1-100000)")
        if not 1 <= count <= MAX_COUNT:
            raise UsageError(f"--count must be 1-{MAX_COUNT}, got {count}")
        return {"kind": "complaint", "color": color, "count": count}
    if kind == "incident":
        given = [flag for flag, value in (("--color", color), ("--count", count)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} go with `signal MODEL complaint`")
        if not reason or not reason.strip():
            raise UsageError("an incident needs --reason TEXT: it is shown with the freeze and in the audit log")
        return {"kind": "incident", "reason": reason}
    raise UsageError(f"unknown signal {kind!r}: complaint or incident")


def _flags(exc: AdminError) -> AdminError:
    """The server's message (naming body fields such as ``complaint.count``) with the CLI's flags instead."""
    return AdminError(exc.status, _FIELD.sub(lambda m: f"--{m.group(1)}", str(exc)), exc.retry_after_s)


def signal(client: AdminClient, model: str, kind: str, *, color: str | None = None, count: int | None = None,
           reason: str | None = None, as_json: bool = False) -> int:
    body = signal_body(kind, color=color, count=count, reason=reason)
    try:
        doc = _json(client.request("POST", f"/models/{_seg(model)}/signals", json_body=body))
    except AdminError as exc:
        raise _flags(exc) from None
    print(json.dumps(doc, indent=2) if as_json else format_signal(model, body, doc))
    return 0


def format_signal(model: str, body: dict[str, Any], doc: dict[str, Any]) -> str:
    if body["kind"] == "incident":
        rolled = ", ".join(doc.get("rolled_back") or []) or "none (no rollout was active)"
        return (f"incident recorded: releases frozen on {', '.join(doc.get('frozen') or [])}; rolled back: {rolled}"
                "\nan admin lifts the freeze: bluegreen freeze lift --reason TEXT")
    about = body.get("color") or "no color"
    if not doc.get("counted"):
        return f"{model}: recorded {body['count']} complaint(s) about {about}; no rollout is active, nothing is judged"
    t = doc.get("complaints") or {}
    cand = doc.get("candidate")
    counts = f"candidate {cand} {t.get('candidate', 0)}, stable {t.get('stable', 0)}, " \
             f"unattributed {t.get('unattributed', 0)}"
    return f"{model}: {body['count']} complaint(s) about {about} counted ({counts}); judged at the next analysis"


def freeze(client: AdminClient, action: str | None, *, reason: str | None = None, as_json: bool = False) -> int:
    """Show the freeze (no ``action``), or lift it on every model (``lift``)."""
    if action is None:
        if reason:
            raise UsageError("--reason goes with `freeze lift`")
        doc = client.get("/freeze")
        print(json.dumps(doc, indent=2) if as_json else format_freeze(doc))
        return 0
    if action != "lift":
        raise UsageError(f"unknown freeze action {action!r}: lift (or none, to show the freeze)")
    body = {"reason": reason} if reason else None
    try:
        doc = _json(client.request("DELETE", "/freeze", json_body=body, headers={"if-match": "*"}))
    except AdminError as exc:
        raise _flags(exc) from None
    print(json.dumps(doc, indent=2) if as_json else f"lifted the release freeze on {', '.join(doc['lifted'])}")
    return 0


def notifications(client: AdminClient, limit: int, *, as_json: bool = False) -> int:
    """The sinks (URLs without their path) and the latest deliveries with their outcome, newest first."""
    if not 1 <= limit <= 500:
        raise UsageError("--limit must be 1-500")
    doc = client.get("/notifications", params={"limit": str(limit)})
    print(json.dumps(doc, indent=2) if as_json else format_notifications(doc))
    return 0


def format_notifications(doc: dict[str, Any]) -> str:
    sinks = doc.get("sinks") or []
    if not sinks:
        return "no notification sinks (the routing file's notifications: list is empty)"
    lines = [f"sinks ({'this replica sends' if doc.get('sending') else 'another replica sends, or none yet'}):"]
    for s in sinks:
        signed = "signed" if s.get("signed") else "unsigned"
        error = f"; last error: {s['last_error']}" if s.get("last_error") else ""
        lines.append(f"  {s['name']}  {s['url']}  {s['format']}  {signed}  queued {s.get('queued', 0)}{error}")
    deliveries = doc.get("deliveries") or []
    lines.append("deliveries, newest first:" if deliveries else "no deliveries yet")
    for d in deliveries:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.get("time") or 0))
        tries = d.get("attempts")
        how = f"{tries} attempt{'s' if tries != 1 else ''}" + (f", {d['status']}" if d.get("status") else "")
        error = f" ({d['error']})" if d.get("error") and d.get("outcome") != "delivered" else ""
        lines.append(f"  {when}  {d['sink']}  {d['type']}  {d.get('model') or '-'}  {d['outcome']}  {how}{error}")
    return "\n".join(lines)
