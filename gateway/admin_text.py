"""The admin API's documents as the text the ``bluegreen`` operator verbs print.

Kept apart from :mod:`gateway.admin_client` (the HTTP calls) because the two change for different reasons: a new
column or wording changes only this module, a new endpoint or header only the client. Everything here is a pure
function of the JSON documents the admin API returns, so the wording can be checked without a gateway.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

COLORS = ("blue", "green")


def format_weights(weights: Mapping[str, Any]) -> str:
    return " / ".join(f"{c} {weights.get(c, '?')}%" for c in COLORS)


# ------------------------------------------------------------------------------------------ status


def format_status(doc: Mapping[str, Any]) -> str:
    """``{"models": [...], "stats": [...]}`` as one block per model: a headline, the rollout, a row per color."""
    stats = {s["model"]: s for s in doc.get("stats", [])}
    blocks = [_format_model(m, stats.get(m["name"], {})) for m in doc.get("models", [])]
    return "\n\n".join(blocks) if blocks else "no models configured"


def _format_model(model: Mapping[str, Any], stats: Mapping[str, Any]) -> str:
    canary = model.get("canary") or {}
    lines = [f"{model['name']}  weights {format_weights(model['weights'])}  stable {model.get('stable', '?')}  "
             f"candidate {model.get('candidate', '?')}  revision {model.get('revision', '?')}",
             f"  canary {_canary_summary(canary)}"]
    if model.get("frozen"):
        lines.append(f"  {format_frozen(model['frozen'])}")
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


# ------------------------------------------------------------------------------------------ canary


def format_canary(doc: Mapping[str, Any]) -> str:
    """``GET /models/{m}/canary`` (or a command's answer): phase, candidate, stage, weights, the last decision."""
    lines = [f"{doc.get('model', '?')}: canary {doc.get('phase')}, candidate {doc.get('candidate')}, "
             f"stage {_stage(doc)}",
             f"  weights {format_weights(doc.get('weights') or {})}"]
    if doc.get("waiting_for"):
        lines.append(f"  waiting for approval: {', '.join(doc['waiting_for'])}")
    last = doc.get("last_decision")
    if last:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last["time"])) if last.get("time") else "?"
        lines.append(f"  last decision {when}: {last.get('result')} — {last.get('reason')}")
        if last.get("evidence"):
            lines.append(f"  evidence {compact(last['evidence'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ freeze


def format_frozen(frozen: Mapping[str, Any]) -> str:
    return f"releases frozen since {frozen.get('time_iso', '?')} by {frozen.get('by', '?')}: {frozen.get('reason')}"


def format_freeze(doc: Mapping[str, Any]) -> str:
    """``GET /admin/v1/freeze``: one line per model, and how a freeze ends."""
    models = doc.get("models") or {}
    lines = [f"{name}: {format_frozen(f) if isinstance(f, dict) else 'not frozen'}" for name, f in models.items()]
    if doc.get("frozen"):
        lines.append("an admin lifts the freeze on every model: bluegreen freeze lift --reason TEXT")
    return "\n".join(lines) if lines else "no models configured"


# ------------------------------------------------------------------------------------------ audit


def format_audit_entry(entry: Mapping[str, Any]) -> str:
    """One line: time, who, action, model, reason (quoted) and what changed (``old → new``)."""
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
        return "; ".join(f"{k} {compact(old.get(k))} → {compact(new.get(k))}" for k in keys)
    if old is None and new is None:
        return ""
    return f"{compact(old)} → {compact(new)}"


def compact(value: Any) -> str:
    """A flat mapping as ``k=v`` pairs (blue before green, whichever was written first); anything else as JSON."""
    if isinstance(value, dict) and all(not isinstance(v, dict | list) for v in value.values()):
        keys = sorted(value, key=lambda k: (COLORS.index(k) if k in COLORS else len(COLORS), str(k)))
        return " ".join(f"{k}={value[k]}" for k in keys)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
