"""The canary rollout: a pure state machine, ``step(policy, status, snapshot, now) -> (status, actions)``.

No I/O, no clock of its own: the controller (``controller.py``) feeds it numbers and applies what it returns,
so thousands of simulated rollouts run in a second and every decision is reproducible. The judgement of one
snapshot is ``analysis.analyse`` (every trigger a one-sided test at the policy's confidence); this module is
the phases around it.

Phases (the ``phase`` field of ``GET /admin/v1/models/{m}/canary``)::

    idle         no rollout; the stable color carries the traffic
    progressing  the candidate holds a stage's weight and is analysed every interval
    paused       an operator paused it, a stage awaits approval, a breach the stable color shows too (a shared
                 dependency, not the candidate's fault) holds it, or it stayed inconclusive past the policy's
                 limit and waits for an operator
    promoting    the candidate is at 100%, judged like a stage before the roles swap
    promoted     the candidate is the new stable color; the next release goes to the other color
    rolled_back  the candidate is at 0% and stays deployed for inspection

Rules:

- a stage passes when its hold time has elapsed (paused time does not count) and the analysis is "ok": no
  trigger fired *and* every trigger has its minimum evidence in the stage. The 100% stage is judged the same
  way on all the candidate's traffic since it began. Missing evidence is never a pass: the rollout holds
  ("inconclusive", with the reason) and, past ``max_inconclusive_s``, pauses for an operator — it does not roll
  back for it. Only ``promote`` with ``force`` waives the evidence minimum (at 100%; audited as forced).
- a rollback verdict rolls back in any active phase, paused included: a rollback never waits.
- shared trouble ("spike") pauses in every phase, promoting included, and resumes by itself when it clears;
  past ``max_inconclusive_s`` the pause becomes the operator's.
- an operator's pause is the operator's: the controller never resumes it (an operator pausing a controller's
  pause takes it over). An operator's approval or resume ends a wait for a person, not a wait for evidence.
- no candidate requests in an interval: hold, even at 100%; more than ``max_no_data_intervals`` such intervals
  in a row: rollback ("no data" never promotes). While paused the count stands still; an operator's resume
  or promote resets it.
- impossible inputs (negative counts, more errors than requests, NaN) are no evidence: a hold with the reason,
  never an exception.
- a confirm gate's refusal (the controller asks it, ``gateway/confirm.py``) is a hold (``held_at_gate``), never
  inconclusive, never in the way of a rollback. An operator's command is not sent to a gate (its reason says so).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from gateway.analysis import Analysis, ColorSample, Snapshot, Verdict, analyse
from gateway.complaints import ComplaintTally
from gateway.policy import Policy, Stage
from gateway.settings import Color, other
from gateway.stats import error_rate_lower_bound

__all__ = [
    "ACTIVE",
    "Action",
    "Analysis",
    "Approval",
    "ColorSample",
    "Command",
    "Decision",
    "Phase",
    "Policy",
    "Promoted",
    "SetWeight",
    "Snapshot",
    "Stage",
    "Status",
    "Verdict",
    "advance",
    "analyse",
    "approve",
    "error_rate_lower_bound",
    "held_at_gate",
    "operator",
    "start",
    "step",
]

Result = Literal["hold", "advance", "promote", "promoted", "rollback", "pause", "resume", "start", "abort",
                 "approve"]
"""What a decision did (the audit log's ``canary_<result>`` action)."""
PausedBy = Literal["operator", "approval", "controller", "inconclusive"]
"""Who holds a pause: an operator, a stage's approval, the controller (shared trouble; it resumes by itself), or
an operator-to-be (inconclusive past the policy's limit: only an operator resumes it)."""
Command = Literal["pause", "resume", "promote", "abort"]
COMMANDS: tuple[Command, ...] = ("pause", "resume", "promote", "abort")


class Phase(StrEnum):
    IDLE = "idle"
    PROGRESSING = "progressing"
    PAUSED = "paused"
    PROMOTING = "promoting"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


ACTIVE = frozenset({Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING})


# ----------------------------------------------------------------------------------------------- status


@dataclass(frozen=True, slots=True)
class Decision:
    time: float
    result: Result
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Approval:
    """One named gate approved: which, by whom (the token's name), when."""

    gate: str
    by: str
    time: float


@dataclass(frozen=True, slots=True)
class Status:
    """The persisted canary status of one model: one small object (Flagger's CanaryStatus)."""

    phase: Phase = Phase.IDLE
    candidate: Color | None = None
    stage: int = 0  # 1-based index of the current stage; len(stages) + 1 while promoting
    stage_started: float = 0.0
    started_at: float = 0.0
    finished_at: float | None = None
    paused_by: PausedBy | None = None
    no_data_intervals: int = 0
    last_analysis: float = 0.0
    last_decision: Decision | None = None
    policy: Policy = field(default_factory=Policy)
    approved: tuple[Approval, ...] = ()
    """The named gates of the current stage approved so far; cleared when the stage ends, however it ends."""
    paused_at: float | None = None
    """When the current pause began (None while not paused)."""
    paused_s: float = 0.0
    """Seconds this stage spent paused, ended pauses only: they do not count toward the stage's hold."""
    inconclusive_since: float | None = None
    """Since when the rollout has been held without a conclusion (hold done but evidence missing, or shared
    trouble); cleared by a conclusive analysis or an operator's resume."""
    reference: ColorSample | None = None
    """The stable color's recent figures, as last seen before the 100% stage (frozen there): what shared trouble
    at 100% is compared with."""
    forced: bool = False
    """Promoted by an operator with ``force``: the 100% stage waives the evidence minimum (triggers still fire)."""
    complaints: ComplaintTally = field(default_factory=ComplaintTally)
    """Users' complaints about this rollout (the signals endpoint) and the requests they can be about."""

    def held_s(self, now: float) -> float:
        """Time in the current stage, paused time excluded."""
        ongoing = now - self.paused_at if self.paused_at is not None else 0.0
        return now - self.stage_started - self.paused_s - ongoing

    def pending_gates(self) -> list[str]:
        """The current stage's named gates still waiting for an approval."""
        if not 1 <= self.stage <= len(self.policy.stages):
            return []
        given = {a.gate for a in self.approved}
        return [g for g in self.policy.stages[self.stage - 1].approvals if g not in given]

    def candidate_weight(self) -> int:
        if self.phase in (Phase.PROMOTING, Phase.PROMOTED):
            return 100
        if self.phase in (Phase.IDLE, Phase.ROLLED_BACK) or self.stage == 0:
            return 0
        if self.stage > len(self.policy.stages):  # paused while promoting: still at 100%
            return 100
        return self.policy.stages[self.stage - 1].weight

    def as_json(self) -> dict[str, Any]:
        return {"phase": self.phase.value, "candidate": self.candidate, "stage": self.stage,
                "stages": len(self.policy.stages), "stage_started": self.stage_started,
                "started_at": self.started_at, "finished_at": self.finished_at, "paused_by": self.paused_by,
                "no_data_intervals": self.no_data_intervals, "last_analysis": self.last_analysis,
                "last_decision": self.last_decision.as_json() if self.last_decision else None,
                "policy": self.policy.as_json(), "approved": [dataclasses.asdict(a) for a in self.approved],
                "waiting_for": self.pending_gates() if self.paused_by == "approval" else [],
                "paused_at": self.paused_at, "paused_s": self.paused_s, "inconclusive_since": self.inconclusive_since,
                "reference": self.reference.as_json() if self.reference is not None else None, "forced": self.forced,
                "complaints": self.complaints.as_json()}

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Status:
        if not doc:
            return cls()
        last = doc.get("last_decision")
        return cls(Phase(doc["phase"]), doc.get("candidate"), int(doc.get("stage", 0)),
                   float(doc.get("stage_started", 0)), float(doc.get("started_at", 0)), doc.get("finished_at"),
                   doc.get("paused_by"), int(doc.get("no_data_intervals", 0)), float(doc.get("last_analysis", 0)),
                   Decision(**last) if last else None, Policy.from_json(doc.get("policy")),
                   tuple(Approval(**a) for a in doc.get("approved") or ()),
                   _opt_float(doc.get("paused_at")), float(doc.get("paused_s") or 0.0),
                   _opt_float(doc.get("inconclusive_since")), ColorSample.from_json(doc.get("reference")),
                   bool(doc.get("forced", False)), ComplaintTally.from_json(doc.get("complaints")))


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True, slots=True)
class SetWeight:
    """Give the candidate this weight (the stable color gets the rest)."""

    candidate: Color
    weight: int


@dataclass(frozen=True, slots=True)
class Promoted:
    """The candidate is the new stable color: the next release goes to ``next_candidate``."""

    next_candidate: Color


Action = SetWeight | Promoted


# ----------------------------------------------------------------------------------------------- the step


def start(policy: Policy, candidate: Color, now: float, reason: str = "started") -> tuple[Status, list[Action]]:
    status = Status(Phase.PROGRESSING, candidate, 1, now, now, None, None, 0, now,
                    Decision(now, "start", reason, {"candidate": candidate}), policy)
    return status, [SetWeight(candidate, policy.stages[0].weight)]


def step(policy: Policy, status: Status, snap: Snapshot, now: float) -> tuple[Status, list[Action]]:
    """One analysis interval. Idempotent in time: called again before ``interval_s`` has passed, it changes
    nothing, so a controller that retries (or two that race) cannot double-step. Never raises: impossible inputs
    are a hold with the reason."""
    if status.phase not in ACTIVE or status.candidate is None:
        return status, []
    # A hair of tolerance: analyses timed by a float clock (k · interval) must not skip an interval by an ulp.
    if not isinstance(now, int | float) or not math.isfinite(now) \
            or now - status.last_analysis < policy.interval_s * (1 - 1e-9):
        return status, []
    candidate = status.candidate
    at_full = status.stage > len(policy.stages)
    # Complaints are judged on the requests since the rollout started: the ended stages' (in the tally) and this
    # stage's, which the tally keeps as of this analysis (a stage ended by an approval adds them without a snap).
    tally, c_n, s_n = status.complaints, snap.candidate.count, snap.stable.count
    counted = type(c_n) is int and type(s_n) is int and c_n >= 0 and s_n >= 0
    if counted and snap.complaints is None and (tally.candidate or tally.stable or tally.unattributed):
        snap = dataclasses.replace(snap, complaints=tally.sample(c_n, s_n))
    result = analyse(policy, snap, reference=status.reference, at_full=at_full,
                     need_evidence=not (at_full and status.forced))
    valid = "invalid" not in result.evidence
    if valid and counted and (tally.stage_candidate, tally.stage_stable) != (c_n, s_n):
        tally = dataclasses.replace(tally, stage_candidate=c_n, stage_stable=s_n)
    # Paused, nothing can advance, so a quiet candidate proves nothing either way: the count of intervals
    # without data stands still (it would otherwise roll back a release waiting for approval over a lull).
    if not valid:
        no_data = status.no_data_intervals
    elif snap.new_candidate_requests:
        no_data = 0
    else:
        no_data = status.no_data_intervals + (status.phase != Phase.PAUSED)
    reference = status.reference
    if not at_full and valid and snap.stable_recent is not None and snap.stable_recent.count > 0:
        reference = snap.stable_recent  # frozen once at 100%
    since = status.inconclusive_since if status.inconclusive_since is not None else now

    def decide(kind: Result, reason: str, **changes: Any) -> Status:
        """The new status in one copy (the step runs thousands of times a second in simulations)."""
        return dataclasses.replace(status, last_analysis=now, no_data_intervals=no_data, reference=reference,
                                   complaints=tally, last_decision=Decision(now, kind, reason, result.evidence),
                                   **changes)

    def inconclusive(paused_at: float | None) -> tuple[Status, list[Action]]:
        """Held without a conclusion: hold (or stay paused) with the reason; past ``max_inconclusive_s`` pause
        for an operator (never a rollback: the candidate has not been shown to be at fault)."""
        waited = now - since
        if waited > policy.max_inconclusive_s:
            return decide("pause", f"inconclusive for {waited:.0f}s (limit {policy.max_inconclusive_s:.0f}s), "
                                   f"waiting for an operator: {result.reason}",
                          phase=Phase.PAUSED, paused_by="inconclusive", paused_at=paused_at or now,
                          inconclusive_since=since), []
        return decide("hold", f"inconclusive for {waited:.0f}s: {result.reason}", inconclusive_since=since), []

    if result.verdict == "rollback" or no_data > policy.max_no_data_intervals:
        # In any active phase, paused included: a rollback must never wait.
        why = result.reason if result.verdict == "rollback" else f"no candidate requests for {no_data} intervals"
        return decide("rollback", why, phase=Phase.ROLLED_BACK, finished_at=now, paused_by=None, paused_at=None,
                      approved=(), inconclusive_since=None), [SetWeight(candidate, 0)]

    if status.phase == Phase.PAUSED:
        if status.paused_by == "controller":
            if result.verdict != "spike":
                return decide("resume", f"the breach cleared ({result.reason})",
                              **_unpaused(status, now, _running(policy, status))), []
            return inconclusive(status.paused_at)
        return decide("hold", f"paused by {status.paused_by}: {result.reason}"), []

    if result.verdict == "spike":
        if now - since > policy.max_inconclusive_s:
            return inconclusive(now)
        return decide("pause", result.reason, phase=Phase.PAUSED, paused_by="controller", paused_at=now,
                      inconclusive_since=since), []
    if no_data:  # no data passes nothing, whatever the sample so far: hold (and roll back, above, if it lasts)
        return decide("hold", f"no candidate requests this interval ({no_data} in a row, "
                              f"{policy.max_no_data_intervals} allowed)"), []

    if at_full:
        if result.verdict == "ok" and status.held_s(now) < policy.promote_hold_s:
            return decide("hold", f"holding at 100%: {status.held_s(now):.0f}s of {policy.promote_hold_s:.0f}s"), []
        if result.verdict == "ok":
            return decide("promoted", f"{candidate} is stable now", phase=Phase.PROMOTED, finished_at=now,
                          inconclusive_since=None), [Promoted(other(candidate))]
        return inconclusive(None)

    stage = policy.stages[status.stage - 1]
    held = status.held_s(now)
    if held < stage.hold_s:
        why = f"holding stage {status.stage}: {held:.0f}s of {stage.hold_s:.0f}s"
        return decide("hold", why + (f" ({result.reason})" if result.verdict == "wait" else "")), []
    if result.verdict == "wait":
        return inconclusive(None)
    # The stage passed.
    if stage.gated:
        pending = [g for g in stage.approvals if g not in {a.gate for a in status.approved}]
        waiting = f"waiting for approval: {', '.join(pending)}" if stage.approvals else "awaiting approval"
        return decide("pause", f"stage {status.stage} passed; {waiting}", phase=Phase.PAUSED, paused_by="approval",
                      paused_at=now, inconclusive_since=None), []
    base = dataclasses.replace(status, last_analysis=now, no_data_intervals=no_data, reference=reference,
                               complaints=tally)
    return advance(policy, base, now, result.evidence, f"stage {status.stage} passed")


def _unpaused(status: Status, now: float, phase: Phase) -> dict[str, Any]:
    """Out of a pause: its time is added to the stage's paused time (it does not count toward the hold)."""
    extra = now - status.paused_at if status.paused_at is not None else 0.0
    return {"phase": phase, "paused_by": None, "paused_at": None, "paused_s": status.paused_s + max(0.0, extra)}


def _running(policy: Policy, status: Status) -> Phase:
    """The phase a paused rollout resumes in: promoting once it is past the last stage (paused at 100%)."""
    return Phase.PROMOTING if status.stage > len(policy.stages) else Phase.PROGRESSING


def advance(policy: Policy, status: Status, now: float, evidence: dict[str, Any],
            reason: str) -> tuple[Status, list[Action]]:
    """Move to the next stage, or to promoting after the last one."""
    assert status.candidate is not None
    nxt = status.stage + 1
    full = nxt > len(policy.stages)
    st = dataclasses.replace(status, phase=Phase.PROMOTING if full else Phase.PROGRESSING, stage=nxt,
                             stage_started=now, paused_by=None, paused_at=None, paused_s=0.0, last_analysis=now,
                             approved=(), inconclusive_since=None, complaints=status.complaints.stage_ended(),
                             last_decision=Decision(now, "promote" if full else "advance", reason, evidence))
    return st, [SetWeight(status.candidate, 100 if full else policy.stages[nxt - 1].weight)]


# ----------------------------------------------------------------------------------------------- confirm gates


def held_at_gate(before: Status, after: Status, gate: str, answer: str) -> Status:
    """The step's decision to leave a stage, refused by the confirm gate ``gate`` (``answer`` says how): a hold at
    the stage instead, asked again at the next interval. Not inconclusive (the evidence is in; the wait is for
    someone else's system, like an approval), so it never pauses the rollout for an operator by itself."""
    decision = after.last_decision
    assert decision is not None
    where = "the promotion" if gate == "promotion" else f"stage {before.stage}"
    why = f"waiting for the confirm gate of {where}: {answer} ({decision.reason})"
    return dataclasses.replace(before, last_analysis=after.last_analysis, no_data_intervals=after.no_data_intervals,
                               reference=after.reference, inconclusive_since=None,
                               last_decision=Decision(decision.time, "hold", why,
                                                      {**decision.evidence, "confirm_gate": gate}))


def _unasked(decision: Decision, status: Status, to_stage: int) -> Decision:
    """``decision``, an operator's command moving the rollout to ``to_stage``, noting the confirm gates it moves
    past: a person's explicit decision is not sent to a gate, and its reason and audited evidence say so."""
    policy = status.policy
    names = [f"stage-{i}" for i in range(max(status.stage, 1), min(to_stage, len(policy.stages) + 1))
             if policy.stages[i - 1].confirm_url]
    if policy.promote_confirm_url and status.stage <= len(policy.stages) < to_stage:
        names.append("promotion")
    if not names:
        return decision
    return dataclasses.replace(decision, reason=f"{decision.reason}; confirm gates not asked (an operator's "
                                                f"command): {', '.join(names)}",
                               evidence={**decision.evidence, "confirm_gates_not_asked": names})


# ----------------------------------------------------------------------------------------------- operators


def operator(command: Command, status: Status, now: float, who: str, *,
             force: bool = False) -> tuple[Status, list[Action]]:
    """pause | resume | promote | abort, as an operator asks; ValueError when the phase does not allow it.
    ``force`` (promote only) waives the evidence minimum of the 100% stage; the decision says so."""
    policy = status.policy
    cand = status.candidate
    if status.phase not in ACTIVE or cand is None:
        raise ValueError(f"no rollout in progress (phase {status.phase.value})")
    if force and command != "promote":
        raise ValueError("force applies to promote only")
    decision = Decision(now, command, f"by {who}" + (" (forced: the evidence minimum is waived)" if force else ""))
    if command == "pause":
        # A pause the controller holds (shared trouble, inconclusive) becomes the operator's: it no longer
        # resumes by itself. An operator's or an approval's pause cannot be paused again.
        if status.phase == Phase.PAUSED and status.paused_by in ("operator", "approval"):
            raise ValueError("already paused")
        paused_at = status.paused_at if status.phase == Phase.PAUSED and status.paused_at is not None else now
        return dataclasses.replace(status, phase=Phase.PAUSED, paused_by="operator", paused_at=paused_at,
                                   last_decision=decision), []
    if command == "resume":
        if status.phase != Phase.PAUSED:
            raise ValueError("not paused")
        # An operator's resume or promote starts a fresh count of intervals without data, and a fresh wait for
        # evidence: it ends a wait for a person, never one for evidence.
        pending = status.pending_gates()
        if status.paused_by == "approval" and pending:
            raise ValueError(f"waiting for approval: {', '.join(pending)}; a resume cannot stand in for a named "
                             "approval (approve each gate with a token holding approve:<gate>)")
        if status.paused_by == "approval":
            return _approved(status, now, {}, f"stage {status.stage} approved by {who}")
        return dataclasses.replace(status, no_data_intervals=0, inconclusive_since=None, last_decision=decision,
                                   **_unpaused(status, now, _running(policy, status))), []
    if command == "promote":
        gated = _gates_ahead(status)
        if gated:
            raise ValueError(f"stages ahead need named approvals ({', '.join(gated)}): a promotion cannot skip them")
        st = dataclasses.replace(status, phase=Phase.PROMOTING, stage=len(policy.stages) + 1, stage_started=now,
                                 paused_by=None, paused_at=None, paused_s=0.0, last_analysis=now, no_data_intervals=0,
                                 last_decision=_unasked(decision, status, len(policy.stages) + 1), approved=(),
                                 inconclusive_since=None, forced=status.forced or force,
                                 complaints=status.complaints.stage_ended())
        return st, [SetWeight(cand, 100)]
    if command == "abort":
        st = dataclasses.replace(status, phase=Phase.ROLLED_BACK, finished_at=now, paused_by=None, paused_at=None,
                                 last_decision=decision, approved=(), inconclusive_since=None)
        return st, [SetWeight(cand, 0)]
    raise ValueError(f"unknown command {command!r}")


def _gates_ahead(status: Status) -> list[str]:
    """Named gates not yet approved in the current stage and every later one (what a promotion would skip)."""
    later = status.policy.stages[status.stage:] if status.stage >= 1 else status.policy.stages
    return status.pending_gates() + [g for s in later for g in s.approvals]


def approve(status: Status, gate: str, who: str, now: float) -> tuple[Status, list[Action]]:
    """One named gate of the stage the rollout waits at, approved by ``who``; the last one advances the rollout.
    ValueError when the rollout is not waiting for that gate, or ``who`` already approved another gate (each gate
    needs its own approver: one token cannot stand in for two teams)."""
    if status.phase != Phase.PAUSED or status.paused_by != "approval" or status.candidate is None:
        raise ValueError(f"the rollout is not waiting for an approval (phase {status.phase.value})")
    pending = status.pending_gates()
    if gate not in pending:
        given = next((a for a in status.approved if a.gate == gate), None)
        if given is not None:
            raise ValueError(f"{gate!r} was already approved by {given.by}")
        raise ValueError(f"stage {status.stage} has no pending gate {gate!r}"
                         + (f"; it waits for: {', '.join(pending)}" if pending else ""))
    mine = next((a for a in status.approved if a.by == who), None)
    if mine is not None:
        raise ValueError(f"{who} already approved {mine.gate!r}: each gate needs a different approver")
    approved = (*status.approved, Approval(gate, who, now))
    st = dataclasses.replace(status, approved=approved)
    evidence = {"approved": [dataclasses.asdict(a) for a in approved]}
    rest = st.pending_gates()
    if rest:
        why = f"{gate} approved by {who}; waiting for approval: {', '.join(rest)}"
        return dataclasses.replace(st, last_decision=Decision(now, "approve", why, evidence)), []
    names = ", ".join(f"{a.gate} by {a.by}" for a in approved)
    return _approved(st, now, evidence, f"stage {status.stage} approved: {names}")


def _approved(status: Status, now: float, evidence: dict[str, Any], reason: str) -> tuple[Status, list[Action]]:
    """The next stage, as people's approval decides: the promotion's confirm gate is not asked (noted)."""
    st, actions = advance(status.policy, dataclasses.replace(status, no_data_intervals=0), now, evidence, reason)
    assert st.last_decision is not None
    return dataclasses.replace(st, last_decision=_unasked(st.last_decision, status, st.stage)), actions
