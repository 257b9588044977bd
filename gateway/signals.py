"""Outside signals — users' complaints, incidents — and the release freeze: the part of the release core that
acts on news from outside the gateway.

``POST /admin/v1/models/{m}/signals`` takes one signal (role ``operator``, or ``signals``, which grants only
this). Signals are events, not edits of a state someone read, so they carry no ETag; each is audited as
``signal_received`` with its body, and the writes it causes are compare-and-set writes judged on the state they
apply to (a concurrent change is re-judged, never overwritten):

- a complaint (``{"kind": "complaint", "color": "green", "count": 3}``) is counted in the active rollout's status
  (``signal_complaint``); the controller's next analysis judges it (``complaints.complaint_trigger``). With no
  rollout active it is only recorded: there is nothing to judge it against.
- an incident (``{"kind": "incident", "reason": "..."}``) freezes releases of every model and rolls back every
  active rollout, at once and by the caller: one compare-and-set write per model sets the freeze and, when a
  rollout is active, rolls it back (candidate at 0%), so no model is ever left frozen with its rollout still
  active, whatever fails or races. That write is audited as ``freeze_set`` (reason ``incident: ...``); when it
  rolled a rollout back, an entry ``canary_rollback`` follows it (same reason, the rollout as the write left it),
  so both notifications go out, freeze first. The freeze is per model (each model's state carries it, so every
  replica sees it with the rest of that state) but one incident writes it on all of them: during an incident
  nobody knows yet which release is to blame.

While frozen ``release.Release`` refuses a rollout's start, any split or canary write that raises the candidate's
weight, and re-pointing a color that carries traffic (even forced); an admin lifts the freeze on every model at
once (``DELETE /admin/v1/freeze``, audited as ``freeze_lifted``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictInt

from gateway import canary
from gateway.auth import Principal
from gateway.canary import ACTIVE, Decision
from gateway.errors import Conflict, PreconditionFailed
from gateway.release import Reason, Release
from gateway.settings import Color, other
from gateway.state import AuditEntry, Freeze, ModelState, changes, rollout_summary

log = logging.getLogger(__name__)

MAX_COMPLAINTS = 100_000
"""The most complaints one signal may carry: a larger count is a client's mistake, not a burst of users."""
_TRIES = 5


class ComplaintBody(BaseModel):
    """Users' complaints about a model: ``color`` names the color they are about (null: not known, recorded and
    shown as unattributed, never judged)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["complaint"]
    color: Color | None = None
    count: Annotated[StrictInt, Field(ge=1, le=MAX_COMPLAINTS)]


class IncidentBody(BaseModel):
    """An incident: every active rollout rolls back and releases freeze until an admin lifts the freeze."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["incident"]
    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=r"\S")]


class SignalBody(RootModel[Annotated[ComplaintBody | IncidentBody, Field(discriminator="kind")]]):
    """``POST /admin/v1/models/{m}/signals``: one signal, told apart by ``kind``."""


class LiftBody(BaseModel):
    """``DELETE /admin/v1/freeze``: the body is optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    reason: Reason | None = None


class _Nothing(Exception):
    """Raised inside a change function: the state it sees needs no write (no rollout, not frozen)."""


@dataclass
class Signals:
    """The signal rules over the release core's store and clock (``release``): the admin API's only way in."""

    release: Release

    async def receive(self, model: str, body: SignalBody, *, actor: Principal) -> dict[str, Any]:
        """Audit the signal as received (before acting on it: a signal that fails halfway is still on record),
        then act on it."""
        actor.require_any(("operator", "signals"), "sending a signal")
        self.release.get(model)  # an unknown model is 404 before anything is recorded
        signal = body.root
        doc = signal.model_dump()
        await self.release.store.append_audit(AuditEntry(
            self.release.clock(), actor.name, "signal_received", model, {}, doc, doc.get("reason"), None,
            actor.role_list))
        if isinstance(signal, ComplaintBody):
            return await self.complaint(model, signal, actor)
        return await self.incident(signal, actor)

    async def complaint(self, model: str, body: ComplaintBody, actor: Principal) -> dict[str, Any]:
        """Counted in the active rollout's status, per color; recorded only (the audit entry) without one."""
        def change(s: ModelState) -> ModelState:
            st = s.canary
            if st.phase not in ACTIVE or st.candidate is None:
                raise _Nothing
            t = st.complaints
            if body.color is None:
                t = dataclasses.replace(t, unattributed=t.unattributed + body.count)
            elif body.color == st.candidate:
                t = dataclasses.replace(t, candidate=t.candidate + body.count)
            else:
                t = dataclasses.replace(t, stable=t.stable + body.count)
            return dataclasses.replace(s, canary=dataclasses.replace(st, complaints=t))

        state = await self._write(model, change, actor, "signal_complaint",
                                  f"{body.count} complaint(s) about {body.color or 'no color'}",
                                  {"color": body.color, "count": body.count})
        if state is None:
            return {"model": model, "kind": "complaint", "counted": False,
                    "note": "no rollout is active: recorded in the audit log only"}
        return {"model": model, "kind": "complaint", "counted": True, "candidate": state.canary.candidate,
                "complaints": state.canary.complaints.as_json()}

    async def incident(self, body: IncidentBody, actor: Principal) -> dict[str, Any]:
        """Freeze every model and roll back its active rollout, in one write per model (a model is frozen and
        rolled back, or left as it was: never frozen with its rollout still active); one model's failure does
        not stop the rest."""
        now = self.release.clock()
        freeze = Freeze(actor.name, now, body.reason)
        why = f"incident: {body.reason}"
        evidence = {"incident": body.reason}
        seen: dict[str, ModelState] = {}  # the state each model's write applied to (its last try's)

        def freezing(s: ModelState) -> ModelState:
            seen[s.name] = s
            st = s.canary
            if st.phase not in ACTIVE or st.candidate is None:
                return dataclasses.replace(s, frozen=freeze)
            status, _ = canary.operator("abort", st, now, actor.name)
            status = dataclasses.replace(status, last_decision=Decision(now, "rollback", why, evidence))
            return dataclasses.replace(s, frozen=freeze, weights={st.candidate: 0, other(st.candidate): 100},
                                       candidate_override=st.candidate, canary=status)

        frozen: list[str] = []
        rolled_back: list[str] = []
        failed: dict[str, str] = {}
        for name in list(self.release.store.models):
            try:
                state = await self._write(name, freezing, actor, "freeze_set", why)
            except PreconditionFailed as exc:
                failed[name] = str(exc)
                continue
            assert state is not None
            frozen.append(name)
            before = seen[name]
            if before.canary == state.canary:
                continue
            rolled_back.append(name)
            old, new = changes(before, state)
            old.pop("frozen", None)
            new.pop("frozen", None)
            try:  # the rollback is written already (with the freeze): this entry tells it as a rollback
                await self.release.store.append_audit(AuditEntry(
                    self.release.clock(), actor.name, "canary_rollback", name, old, new, why, evidence,
                    actor.role_list, rollout=rollout_summary(before, state)))
            except Exception:
                log.exception("the rollback of %s is written (audited with its freeze_set), but its "
                              "canary_rollback entry was not", name)
        return {"kind": "incident", "reason": body.reason, "frozen": frozen, "rolled_back": rolled_back,
                "failed": failed}

    async def lift(self, body: LiftBody, *, actor: Principal) -> dict[str, Any]:
        """Lift the freeze on every model (409 when none is frozen: nothing changes)."""
        actor.require("admin", "lifting the release freeze")
        names = [n for n, s in self.release.store.models.items() if s.frozen is not None]
        if not names:
            raise Conflict("releases are not frozen")

        def lifting(s: ModelState) -> ModelState:
            if s.frozen is None:
                raise _Nothing
            return dataclasses.replace(s, frozen=None)

        lifted = [n for n in names
                  if await self._write(n, lifting, actor, "freeze_lifted", body.reason) is not None]
        return {"lifted": lifted, **self.describe()}

    def describe(self) -> dict[str, Any]:
        """``GET /admin/v1/freeze``: each model's freeze, or "not frozen"."""
        models = self.release.store.models
        return {"frozen": any(s.frozen is not None for s in models.values()),
                "models": {n: s.frozen.as_json() if s.frozen else "not frozen" for n, s in models.items()}}

    async def _write(self, model: str, change: Callable[[ModelState], ModelState], actor: Principal, action: str,
                     reason: str | None, evidence: Any = None) -> ModelState | None:
        """One audited compare-and-set write judged on the state it applies to (None: ``change`` found nothing to
        do). A signal names no revision, so a write that lost a race is tried again on the new state."""
        for attempt in range(_TRIES):
            try:
                return await self.release.store.update(model, None, change, who=actor.name, action=action,
                                                       reason=reason, evidence=evidence, roles=tuple(actor.role_list))
            except _Nothing:
                return None
            except PreconditionFailed:
                if attempt == _TRIES - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover
