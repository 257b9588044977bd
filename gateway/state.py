"""Routing state — weights, colors, candidate — and the audit log, behind a compare-and-set store.

Every model's state carries a ``revision``; a write names the revision it read (the admin API's ETag /
If-Match) and fails with :class:`PreconditionFailed` when another write came first, so of N concurrent
writers with the same ETag exactly one wins. Writes are applied without yielding to the event loop in
between check and set, which makes the in-memory store atomic within a process.

:class:`MemoryStateStore` is the embedded default; with a state file it survives restarts (``bluegreen up``).
The Redis store for several gateway replicas implements the same methods (canary/control-plane issue).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.canary import ACTIVE, Status
from gateway.errors import NotFound, PreconditionFailed
from gateway.settings import COLORS, Color, RoutingFile, other

log = logging.getLogger(__name__)

AUDIT_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class ColorState:
    version: str
    backends: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        return {"version": self.version, "backends": list(self.backends)}


@dataclass(frozen=True, slots=True)
class Freeze:
    """Releases of a model frozen by an incident (``gateway/signals.py``): who froze them, when and why. While it
    stands no write raises the candidate's weight (a start, a split, an advance or promotion) and no color carrying
    traffic is re-pointed (``gateway/release.py``); an admin lifts it."""

    by: str
    time: float
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"by": self.by, "time": self.time, "reason": self.reason,
                "time_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))}

    @classmethod
    def from_json(cls, doc: Any) -> Freeze | None:
        return cls(str(doc["by"]), float(doc["time"]), str(doc["reason"])) if isinstance(doc, dict) else None


@dataclass(frozen=True, slots=True)
class ModelState:
    """One model's routing state. Immutable: a write replaces it, so readers never see half an update."""

    name: str
    colors: dict[Color, ColorState]
    weights: dict[Color, int]
    candidate_override: Color | None = None
    shadow_percent: int = 0
    revision: int = 1
    canary: Status = field(default_factory=Status)
    """The canary status, typed; it becomes JSON only where it is persisted (state file, Redis)."""
    payload_log_percent: int = 0
    """Share of answered requests logged as prediction records (gateway/payload_log.py)."""
    frozen: Freeze | None = None
    """Releases frozen by an incident (None: not frozen)."""

    @property
    def candidate(self) -> Color:
        """The color a release goes to. During a rollout, the rollout's candidate; otherwise the color at 0% (so
        after a promotion, an abort or any manual split that leaves one color idle, that color is next); when
        both carry traffic, the color last named (the routing file's ``candidate``, the last rollout's), else
        green."""
        if self.canary.phase in ACTIVE and self.canary.candidate is not None:
            return self.canary.candidate
        for color in COLORS:
            if self.weights[color] == 0:
                return color
        return self.candidate_override or "green"

    @property
    def stable(self) -> Color:
        return other(self.candidate)

    @property
    def etag(self) -> str:
        return f'"{self.revision}"'

    def color_of_version(self, version: str) -> Color | None:
        for color in COLORS:
            if self.colors[color].version == version:
                return color
        return None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "colors": {c: s.as_json() for c, s in self.colors.items()},
                "weights": dict(self.weights), "candidate": self.candidate, "stable": self.stable,
                "shadow_percent": self.shadow_percent, "payload_log_percent": self.payload_log_percent,
                "revision": self.revision, "canary": self.canary.as_json(),
                "frozen": self.frozen.as_json() if self.frozen else None}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ModelState:
        colors = {c: ColorState(str(v["version"]), tuple(v["backends"])) for c, v in doc["colors"].items()}
        return cls(doc["name"], colors, dict(doc["weights"]), doc.get("candidate_override"),
                   int(doc.get("shadow_percent", 0)), int(doc.get("revision", 1)), Status.from_json(doc.get("canary")),
                   int(doc.get("payload_log_percent", 0)), Freeze.from_json(doc.get("frozen")))

    def persisted(self) -> dict[str, Any]:
        """The JSON kept in a state file or in Redis (``from_json`` reads it back)."""
        return {"name": self.name, "colors": {c: s.as_json() for c, s in self.colors.items()},
                "weights": dict(self.weights), "candidate_override": self.candidate_override,
                "shadow_percent": self.shadow_percent, "payload_log_percent": self.payload_log_percent,
                "revision": self.revision, "canary": self.canary.as_json() if self.canary != Status() else None,
                "frozen": self.frozen.as_json() if self.frozen else None}


@dataclass(frozen=True, slots=True)
class AuditEntry:
    time: float
    who: str
    action: str
    model: str | None
    old: Any
    new: Any
    reason: str | None = None
    evidence: Any = None
    roles: list[str] | None = None
    """The roles of the token that acted (None: an entry written before roles existed)."""
    id: str | None = None
    """The entry's place in the audit stream, ``<ms>-<seq>`` (Redis stream ids; the memory store counts the same
    way): increasing, unique, and the id of every notification sent for the entry."""
    rollout: dict[str, Any] | None = None
    """Where the rollout stands after the write, for a write that changed it (``rollout_summary``): what a
    notification says, without reading the state again later."""

    def as_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["time_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time))
        return doc


Listener = Callable[[ModelState], None]


class StateStore(Protocol):
    """What the gateway needs from a state store; :class:`MemoryStateStore` (one process, optional state
    file) and ``state_redis.RedisStateStore`` (replicas sharing Redis) implement it."""

    models: dict[str, ModelState]

    def get(self, name: str) -> ModelState: ...
    def subscribe(self, listener: Listener) -> None: ...
    async def read_audit(self, limit: int = 100) -> list[AuditEntry]: ...
    async def read_audit_after(self, after: str | None, limit: int = 100) -> list[AuditEntry]: ...
    async def append_audit(self, entry: AuditEntry) -> AuditEntry: ...
    async def update(self, name: str, if_revision: int | None, change: Callable[[ModelState], ModelState], *,
                     who: str, action: str, reason: str | None = None, evidence: Any = None,
                     audit: bool = True, fenced: bool = False, roles: tuple[str, ...] = ()) -> ModelState: ...
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


@dataclass
class MemoryStateStore:
    models: dict[str, ModelState]
    state_file: Path | None = None
    audit_log: deque[AuditEntry] = field(default_factory=lambda: deque(maxlen=AUDIT_LIMIT))
    _listeners: list[Listener] = field(default_factory=list)

    @classmethod
    def from_routing(cls, routing: RoutingFile, state_file: Path | None = None) -> MemoryStateStore:
        models = {
            name: ModelState(name, {c: ColorState(r.colors[c].version, tuple(r.colors[c].backends)) for c in COLORS},
                             dict(r.weights), r.candidate, r.shadow_percent,
                             payload_log_percent=r.payload_log_percent)
            for name, r in routing.models.items()
        }
        store = cls(models, state_file)
        store._load_file()
        return store

    # ------------------------------------------------------------------ reads

    def get(self, name: str) -> ModelState:
        state = self.models.get(name)
        if state is None:
            raise NotFound(f"unknown model {name!r}; configured: {', '.join(sorted(self.models))}")
        return state

    def audit(self, limit: int = 100) -> list[AuditEntry]:
        return list(reversed(self.audit_log))[:limit]

    async def read_audit(self, limit: int = 100) -> list[AuditEntry]:
        return self.audit(limit)

    async def read_audit_after(self, after: str | None, limit: int = 100) -> list[AuditEntry]:
        """Entries after the one with id ``after`` (None: from the oldest kept), oldest first."""
        key = id_key(after) if after else (-1, -1)
        newer: list[AuditEntry] = []
        for e in reversed(self.audit_log):  # from the newest back: a reader that keeps up reads one or two
            if e.id is None or id_key(e.id) <= key:
                break
            newer.append(e)
        return newer[::-1][:limit]

    async def append_audit(self, entry: AuditEntry) -> AuditEntry:
        """Record an event that is not a state write (a breaker opened, a signal, a refused start)."""
        entry = dataclasses.replace(entry, id=self._next_id(entry.time))
        self.audit_log.append(entry)
        self._save_file()
        return entry

    def _next_id(self, t: float) -> str:
        """``<ms>-<seq>``, increasing even when the clock steps back (as a Redis stream's ids are)."""
        ms, seq = int(t * 1000), 0
        if self.audit_log and self.audit_log[-1].id:
            last_ms, last_seq = id_key(self.audit_log[-1].id)
            if ms <= last_ms:
                ms, seq = last_ms, last_seq + 1
        return f"{ms}-{seq}"

    async def start(self) -> None:
        """Nothing to connect: the state was loaded (from the routing file and state file) at construction."""

    async def aclose(self) -> None:
        self.close()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with a model's new state after every change to it."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ writes

    async def update(self, name: str, if_revision: int | None, change: Callable[[ModelState], ModelState], *,
                     who: str, action: str, reason: str | None = None, evidence: Any = None,
                     audit: bool = True, fenced: bool = False, roles: tuple[str, ...] = ()) -> ModelState:
        """Compare-and-set: apply ``change`` if the model is still at ``if_revision`` (None: unconditionally).
        ``change`` may raise (a ServingError) to refuse the write after seeing the current state. ``fenced``
        (controller writes) means nothing in one process: it is trivially the only controller."""
        current = self.get(name)
        if if_revision is not None and current.revision != if_revision:
            raise PreconditionFailed(f"stale ETag: model {name!r} is at revision {current.revision}, "
                                     f"the write was based on {if_revision}")
        updated = dataclasses.replace(change(current), revision=current.revision + 1)
        self.models[name] = updated
        if audit:
            old, new = changes(current, updated)
            now = time.time()
            self.audit_log.append(AuditEntry(now, who, action, name, old, new, reason, evidence, list(roles),
                                             self._next_id(now), rollout_summary(current, updated)))
        self._save_file()
        for listener in self._listeners:
            listener(updated)
        return updated

    # ------------------------------------------------------------------ persistence

    def _load_file(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            doc = json.loads(self.state_file.read_text())
            for name, m in doc.get("models", {}).items():
                if name in self.models:  # models removed from the routing file are dropped
                    self.models[name] = ModelState.from_json(m)
            for a in doc.get("audit", []):
                self.audit_log.append(AuditEntry(**a))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring unreadable state file %s: %s", self.state_file, exc)

    def _save_file(self) -> None:
        if self.state_file is None:
            return
        doc = {"models": {n: m.persisted() for n, m in self.models.items()},
               "audit": [dataclasses.asdict(a) for a in self.audit_log]}
        tmp = self.state_file.with_suffix(".tmp")
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.state_file)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._save_file()


def id_key(entry_id: str) -> tuple[int, int]:
    """An audit id as a sortable pair (``"1733300000000-2"`` → (1733300000000, 2)); (-1, -1) when malformed."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return -1, -1


def rollout_summary(before: ModelState, after: ModelState) -> dict[str, Any] | None:
    """The rollout after a write that changed it: phase, stage, weight, the decision's result (None otherwise)."""
    if before.canary == after.canary:
        return None
    st = after.canary
    return {"phase": st.phase.value, "candidate": st.candidate, "stage": st.stage, "stages": len(st.policy.stages),
            "weight": st.candidate_weight(), "paused_by": st.paused_by,
            "result": st.last_decision.result if st.last_decision else None,
            "waiting_for": st.pending_gates() if st.paused_by == "approval" else []}


def changes(before: ModelState, after: ModelState) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields a write changed: (as they were, as they are now)."""
    a, b = before.as_json(), after.as_json()
    keys = [k for k in b if k not in ("revision", "canary") and a.get(k) != b.get(k)]
    return {k: a[k] for k in keys}, {k: b[k] for k in keys}
