"""The release core: every rule about changing a model's routing, and the one write (with its audit entry).

The admin API, the CLI (through the admin API), the canary controller and any later transport (the console,
signals) call these methods and nothing else to change routing state, so a rule lives in exactly one place:

- weights are set by hand only while no rollout is active (the rollout owns them until it ends);
- a color is re-pointed to another version only while it carries no traffic, unless forced (audited as such);
- a rollout starts only when none is active, on a candidate that does not already carry everything, and — with
  the validation gate on — only for a version whose report passed, unless forced (audited with the reason);
- while an incident's freeze stands (``ModelState.frozen``, ``gateway/signals.py``) no rollout starts, no split
  and no canary write (the controller's decision, a resume, promote or approval) raises the candidate's weight,
  and no color carrying traffic is re-pointed, even with force; a split back to the stable color, a rollback, an
  abort, a pause or a hold still passes, and so does re-pointing an idle color (how a fix is deployed);
- an operator's pause / resume / promote / abort is judged by the pure ``canary.operator``, a named approval by
  ``canary.approve``;
- the controller's decision (``canary.step``) is applied with the weights and candidate it implies;
- who may do what (``gateway.auth``): ``operator`` sets the split, the shadow and payload-logging shares and
  pauses, resumes and aborts;
  ``admin`` also re-points colors, starts and promotes; ``approve:<gate>`` approves that gate.

Each write is one compare-and-set on the model's state (``StateStore.update``): the rule is judged inside the
change function, on the state the write applies to, so a write that raced another one is refused (412) or
re-judged, never applied to a state nobody looked at. Requests arrive here already parsed into the pydantic
bodies below; a refusal is a :class:`~gateway.errors.ServingError` carrying its HTTP status.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from gateway import canary
from gateway.auth import CONTROLLER, Principal
from gateway.canary import ACTIVE, Command, Policy, Status
from gateway.errors import BadRequest, Conflict, PreconditionFailed
from gateway.policy import Gate
from gateway.settings import COLORS, Color, ColorConfig, other
from gateway.state import AuditEntry, ColorState, Freeze, ModelState, StateStore

Reason = Annotated[str, Field(max_length=500)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reason: Reason | None = None
    """Recorded in the audit entry."""


class SplitBody(_Body):
    """``PUT /admin/v1/models/{m}/split``: both weights, integers summing to 100."""

    blue: Annotated[StrictInt, Field(ge=0, le=100)]
    green: Annotated[StrictInt, Field(ge=0, le=100)]

    @model_validator(mode="after")
    def _sum(self) -> SplitBody:
        if self.blue + self.green != 100:
            raise ValueError(f"weights must sum to 100, got {self.blue + self.green}")
        return self

    def weights(self) -> dict[Color, int]:
        return {"blue": self.blue, "green": self.green}


class ColorBody(ColorConfig):
    """``PUT /admin/v1/models/{m}/colors/{c}``: the version and backends a color serves."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    force: StrictBool = False
    """Re-point a color that carries traffic (audited as ``set_color_forced``)."""
    reason: Reason | None = None


class ShadowBody(_Body):
    """``PUT /admin/v1/models/{m}/shadow``: the share of answered requests copied to the color not chosen."""

    percent: Annotated[StrictInt, Field(ge=0, le=100)]


class PayloadLogBody(_Body):
    """``PUT /admin/v1/models/{m}/payload-log``: the share of answered requests logged as prediction records."""

    percent: Annotated[StrictInt, Field(ge=0, le=100)]


class StartBody(_Body):
    """``POST /admin/v1/models/{m}/canary/start``. Policy overrides go in ``policy`` (validated on top of the
    routing file's policy for the model); ``candidate`` defaults to the model's candidate (the color at 0%)."""

    force: StrictBool = False
    """Start without a passing validation report (audited as ``canary_start_forced``)."""
    candidate: Color | None = None
    policy: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _overrides_alone(cls, doc: Any) -> Any:
        """Overrides may also come alone, beside the other keys (``{"interval_s": 2}``): the first API's form."""
        if not isinstance(doc, dict) or "policy" in doc:
            return doc
        own = {k: v for k, v in doc.items() if k in ("force", "candidate", "reason")}
        rest = {k: v for k, v in doc.items() if k not in own}
        return {**own, "policy": rest} if rest else own


class CommandBody(_Body):
    """``POST /admin/v1/models/{m}/canary/{pause|resume|promote|abort}``: a reason, and for promote ``force``."""

    force: StrictBool = False
    """Promote only: the 100% stage waives its evidence minimum (triggers still fire); audited as
    ``canary_promote_forced``."""


class ApproveBody(_Body):
    """``POST /admin/v1/models/{m}/canary/approve``: the named gate approved."""

    gate: Gate


COMMAND_ROLES: dict[str, str] = {"pause": "operator", "resume": "operator", "abort": "operator",
                                 "promote": "admin"}


@dataclass
class Release:
    """The release rules over a state store. ``policies``: per model, the routing file's canary policy (the base
    that a start's overrides apply to); ``validation_repo``: where the release gate's reports are (None: off)."""

    store: StateStore
    validation_repo: Path | None = None
    policies: dict[str, Policy] = field(default_factory=dict)
    clock: Callable[[], float] = time.time

    def get(self, model: str) -> ModelState:
        return self.store.get(model)

    # ------------------------------------------------------------------ operator writes

    async def set_split(self, model: str, body: SplitBody, *, actor: Principal,
                        if_revision: int | None) -> ModelState:
        actor.require("operator", "setting the split")
        weights = body.weights()

        def change(s: ModelState) -> ModelState:
            if s.canary.phase in ACTIVE:
                raise Conflict(f"a canary rollout of {model!r} is {s.canary.phase.value}: abort it (or let it "
                               "finish) before setting weights by hand")
            cand = s.candidate
            if s.frozen is not None and weights[cand] > s.weights[cand]:
                raise Conflict(f"{frozen_message(s.frozen)} (while frozen a split may only move traffic back to "
                               f"the stable color {other(cand)}: {cand} would go from {s.weights[cand]}% to "
                               f"{weights[cand]}%)")
            return dataclasses.replace(s, weights=weights)

        return await self._write(model, if_revision, change, actor, "set_weights", body.reason)

    async def set_color(self, model: str, color: Color, body: ColorBody, *, actor: Principal,
                        if_revision: int | None) -> ModelState:
        actor.require("admin", "re-pointing a color")
        new_color = ColorState(body.version, tuple(body.backends))

        def change(s: ModelState) -> ModelState:
            if s.weights[color] > 0 and not body.force:
                raise Conflict(f"{color} carries {s.weights[color]}% of {model!r}; move its traffic away first, "
                               "or re-point it anyway with force")
            if s.weights[color] > 0 and s.frozen is not None:
                raise Conflict(f"{frozen_message(s.frozen)} (while frozen a color carrying traffic is not re-pointed, "
                               f"even with force: {color} carries {s.weights[color]}% of {model!r}; re-pointing "
                               "the idle color stays allowed)")
            return dataclasses.replace(s, colors={**s.colors, color: new_color})

        return await self._write(model, if_revision, change, actor,
                                 "set_color_forced" if body.force else "set_color", body.reason)

    async def set_shadow(self, model: str, body: ShadowBody, *, actor: Principal,
                         if_revision: int | None) -> ModelState:
        actor.require("operator", "setting the shadow share")
        return await self._write(model, if_revision, lambda s: dataclasses.replace(s, shadow_percent=body.percent),
                                 actor, "set_shadow", body.reason)

    async def set_payload_logging(self, model: str, body: PayloadLogBody, *, actor: Principal,
                                  if_revision: int | None) -> ModelState:
        """The payload-logging share: an operator's setting like the shadow share (which inputs a model's records
        may hold is the routing file's, not live: a privacy rule should not be one API call away)."""
        actor.require("operator", "setting the payload-logging share")
        return await self._write(model, if_revision,
                                 lambda s: dataclasses.replace(s, payload_log_percent=body.percent),
                                 actor, "set_payload_log", body.reason)

    async def _write(self, model: str, if_revision: int | None, change: Callable[[ModelState], ModelState],
                     actor: Principal, action: str, reason: str | None) -> ModelState:
        return await self.store.update(model, if_revision, change, who=actor.name, roles=tuple(actor.role_list),
                                       action=action, reason=reason)

    # ------------------------------------------------------------------ rollouts

    def policy_for(self, model: str, overrides: dict[str, Any] | None) -> Policy:
        """The routing file's policy for ``model`` with a start's overrides on top; BadRequest names the field."""
        try:
            return Policy.from_json(overrides, self.policies.get(model))
        except ValueError as exc:
            raise BadRequest(f"invalid policy: {exc}") from None

    async def start(self, model: str, body: StartBody, *, actor: Principal,
                    if_revision: int | None = None) -> ModelState:
        actor.require("admin", "starting a rollout")
        policy = self.policy_for(model, body.policy)
        state = self._at(model, if_revision)
        if state.frozen is not None:
            raise Conflict(frozen_message(state.frozen))
        if state.canary.phase in ACTIVE:
            raise Conflict(f"a rollout of {model!r} is already {state.canary.phase.value}")
        cand = body.candidate or state.candidate
        if state.weights[cand] == 100:
            raise Conflict(f"{cand} already carries 100% of {model!r}: deploy the release to {other(cand)} "
                           "and start again")
        version = state.colors[cand].version
        report = validation_report(self.validation_repo, model, version)
        if report is not True and not body.force:
            # Refused, and told (audit, notifications): a release blocked by its gate is news for the release manager.
            await self.store.append_audit(AuditEntry(
                self.clock(), actor.name, "canary_start_refused", model, {}, {"candidate": cand, "version": version},
                f"the validation gate refused {model}:{version}: {report}", None, actor.role_list))
            raise Conflict(f"{model}:{version} has no passing validation report ({report}); run "
                           f"`bluegreen validate --model {model}:{version}`, or start anyway with force")
        status, actions = canary.start(policy, cand, self.clock(), f"started by {actor.name}")
        if report is True:
            return await self.apply(state, status, actions, actor=actor, reason=body.reason, audit=True,
                                    action="canary_start")
        why = f"forced: {report}" + (f"; {body.reason}" if body.reason else "")
        return await self.apply(state, status, actions, actor=actor, reason=why, audit=True,
                                action="canary_start_forced")

    async def command(self, model: str, command: Command, body: CommandBody, *, actor: Principal,
                      if_revision: int | None = None) -> ModelState:
        actor.require(COMMAND_ROLES[command], f"{command} of a rollout")
        state = self._at(model, if_revision)
        try:
            status, actions = canary.operator(command, state.canary, self.clock(), actor.name, force=body.force)
        except ValueError as exc:
            raise Conflict(f"cannot {command}: {exc}") from None
        return await self.apply(state, status, actions, actor=actor, reason=body.reason, audit=True,
                                action="canary_promote_forced" if body.force else None)

    async def approve(self, model: str, body: ApproveBody, *, actor: Principal,
                      if_revision: int | None = None) -> ModelState:
        """One named gate approved by a token holding ``approve:<gate>``; the last pending one advances."""
        actor.require(f"approve:{body.gate}", f"approving the {body.gate!r} gate")
        state = self._at(model, if_revision)
        try:
            status, actions = canary.approve(state.canary, body.gate, actor.name, self.clock())
        except ValueError as exc:
            raise Conflict(f"cannot approve: {exc}") from None
        return await self.apply(state, status, actions, actor=actor, reason=body.reason, audit=True,
                                action="canary_approve")

    def _at(self, model: str, if_revision: int | None) -> ModelState:
        """The model's state, refused at once when the caller's ETag is stale (the write would be refused too)."""
        state = self.store.get(model)
        if if_revision is not None and state.revision != if_revision:
            raise PreconditionFailed(f"stale ETag: model {model!r} is at revision {state.revision}, "
                                     f"the write was based on {if_revision}")
        return state

    async def apply(self, state: ModelState, status: Status, actions: list[canary.Action], *,
                    actor: Principal = CONTROLLER, reason: str | None = None, audit: bool = False,
                    action: str | None = None, fenced: bool = False) -> ModelState:
        """Write a canary decision — the status and the weights and candidate it implies — in one compare-and-set
        on the revision the decision was based on (a decision made on stale state is refused with 412, never
        applied twice). Audited when ``audit`` or whenever the decision is not a plain "hold".

        While the model is frozen, a write raising the candidate's weight (a start, an advance, a promotion, an
        approval or resume that advances) is refused with 409, judged on the state the write applies to; a
        rollback, an abort, a pause or a hold passes (a rollback is never held)."""
        def change(s: ModelState) -> ModelState:
            weights = dict(s.weights)
            candidate = s.candidate_override
            raised: list[Color] = []
            for act in actions:
                if isinstance(act, canary.SetWeight):
                    weights = {act.candidate: act.weight, other(act.candidate): 100 - act.weight}
                    candidate = act.candidate
                    raised.append(act.candidate)
                elif isinstance(act, canary.Promoted):
                    candidate = act.next_candidate
            up = next((c for c in raised if weights[c] > s.weights[c]), None)
            if s.frozen is not None and up is not None:
                raise Conflict(f"{frozen_message(s.frozen)} (while frozen a rollout may not raise its candidate's "
                               f"weight: {up} would go from {s.weights[up]}% to {weights[up]}%; a rollback, abort "
                               "or pause still passes)")
            return dataclasses.replace(s, weights=weights, candidate_override=candidate, canary=status)

        decision = status.last_decision
        kind = decision.result if decision else "update"
        audited = audit or kind != "hold"
        return await self.store.update(state.name, state.revision, change, who=actor.name,
                                       roles=tuple(actor.role_list), action=action or f"canary_{kind}",
                                       reason=reason or (decision.reason if decision else None),
                                       evidence=decision.evidence if decision and audited else None,
                                       audit=audited, fenced=fenced)

    def time_in_stage(self, status: Status) -> float | None:
        return round(self.clock() - status.stage_started, 3) if status.phase in ACTIVE else None


def frozen_message(freeze: Freeze) -> str:
    """Why a release is refused while an incident's freeze stands, and how it ends."""
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(freeze.time))
    return (f"releases are frozen since {since} by {freeze.by}: {freeze.reason}; an admin lifts the freeze with "
            "DELETE /admin/v1/freeze")


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


__all__ = ["COLORS", "ApproveBody", "ColorBody", "CommandBody", "PayloadLogBody", "Release", "ShadowBody",
           "SplitBody", "StartBody", "validation_report"]
