"""The canary analysis: a pure state machine, ``step(policy, status, snapshot, now) -> (status, actions)``.

No I/O, no clock of its own: the controller (``controller.py``) feeds it numbers and applies what it returns,
so thousands of simulated rollouts run in a second and every decision is reproducible.

Phases (the ``phase`` field of ``GET /admin/v1/models/{m}/canary``)::

    idle         no rollout; the stable color carries the traffic
    progressing  the candidate holds a stage's weight and is analysed every interval
    paused       an operator paused it, a stage awaits approval, or a breach the stable color shows too
                 (a load spike, not the candidate's fault) holds it
    promoting    the candidate is at 100%, analysed for one more interval before the roles swap
    promoted     the candidate is the new stable color; the next release goes to the other color
    rolled_back  the candidate is at 0% and stays deployed for inspection

Rules: a stage passes when its hold time has elapsed, the candidate served
``min_requests`` in the stage and no trigger fires. Triggers need evidence, not noise:

- errors: the exact (Clopper-Pearson) lower confidence bound of the candidate's error rate in the stage is above
  ``max_error_rate`` — a single error in a few hundred requests is not evidence;
- latency: the candidate's p95 over the analysis window exceeds ``max_p95_ms`` on at least ``min_requests``;
- a breach the stable color shows too over the same window pauses instead of rolling back;
- quality: with feedback on both colors (``min_feedback`` each), the candidate's online accuracy below the
  stable color's by more than ``max_accuracy_drop``; without feedback: "no data", which blocks nothing;
- shadow agreement below ``min_shadow_agreement``, only where a policy sets one;
- every candidate backend's breaker open: immediate rollback;
- no candidate requests in an interval: hold, even at 100%; more than ``max_no_data_intervals`` such intervals
  in a row: rollback ("no data" never promotes). While paused the count stands still; an operator's resume
  or promote resets it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

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
    "operator",
    "start",
    "step",
]

Result = Literal["hold", "advance", "promote", "promoted", "rollback", "pause", "resume", "start", "abort",
                 "approve"]
"""What a decision did (the audit log's ``canary_<result>`` action)."""
Verdict = Literal["ok", "wait", "spike", "rollback"]
"""What one analysis found: pass, not enough evidence yet, a breach the stable color shares, a rollback."""
PausedBy = Literal["operator", "approval", "controller"]
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


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class ColorSample:
    """One color's numbers for an analysis. ``count``/``errors``: since the stage started; ``p95_ms``: over the
    recent analysis window (None without data); ``window_count``: requests in that window."""

    count: int = 0
    errors: int = 0
    window_count: int = 0
    p95_ms: float | None = None
    breaker_open: bool = False
    feedback: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.feedback if self.feedback else None


@dataclass(frozen=True, slots=True)
class Snapshot:
    candidate: ColorSample
    stable: ColorSample
    new_candidate_requests: int = 0
    """Candidate requests since the previous analysis (0: this interval had no data)."""
    shadow_agreement: float | None = None
    shadow_samples: int = 0


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
                "waiting_for": self.pending_gates() if self.paused_by == "approval" else []}

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> Status:
        if not doc:
            return cls()
        last = doc.get("last_decision")
        return cls(Phase(doc["phase"]), doc.get("candidate"), int(doc.get("stage", 0)),
                   float(doc.get("stage_started", 0)), float(doc.get("started_at", 0)), doc.get("finished_at"),
                   doc.get("paused_by"), int(doc.get("no_data_intervals", 0)), float(doc.get("last_analysis", 0)),
                   Decision(**last) if last else None, Policy.from_json(doc.get("policy")),
                   tuple(Approval(**a) for a in doc.get("approved") or ()))


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


# ----------------------------------------------------------------------------------------------- analysis


@dataclass(frozen=True, slots=True)
class Analysis:
    verdict: Verdict
    reason: str
    evidence: dict[str, Any]


def analyse(policy: Policy, snap: Snapshot) -> Analysis:
    """Judge the candidate on one snapshot (no phase logic)."""
    c, s = snap.candidate, snap.stable
    lower_c = _bound_if_above(c.errors, c.count, policy)
    lower_s = _bound_if_above(s.errors, s.count, policy)
    evidence: dict[str, Any] = {
        "candidate": {"requests": c.count, "errors": c.errors, "error_rate": _ratio(c.errors, c.count),
                      "error_rate_lower_bound": round(lower_c, 6), "p95_ms": c.p95_ms,
                      "window_requests": c.window_count, "accuracy": c.accuracy, "feedback": c.feedback,
                      "breaker_open": c.breaker_open},
        "stable": {"requests": s.count, "errors": s.errors, "error_rate": _ratio(s.errors, s.count),
                   "error_rate_lower_bound": round(lower_s, 6), "p95_ms": s.p95_ms,
                   "window_requests": s.window_count, "accuracy": s.accuracy, "feedback": s.feedback},
        "thresholds": {"max_error_rate": policy.max_error_rate, "max_p95_ms": policy.max_p95_ms,
                       "max_accuracy_drop": policy.max_accuracy_drop, "min_requests": policy.min_requests,
                       "confidence": policy.confidence, "min_shadow_agreement": policy.min_shadow_agreement},
        "shadow": {"agreement": snap.shadow_agreement, "samples": snap.shadow_samples},
    }
    if c.breaker_open:
        return Analysis("rollback", "the candidate's circuit breaker is open", evidence)
    breaches: list[str] = []
    stable_too = True
    if lower_c > policy.max_error_rate:
        breaches.append(f"error rate {c.errors}/{c.count}: lower bound {lower_c:.4%} > {policy.max_error_rate:.4%}")
        stable_too = stable_too and lower_s > policy.max_error_rate
    if c.p95_ms is not None and c.window_count >= policy.min_requests and c.p95_ms > policy.max_p95_ms:
        breaches.append(f"p95 {c.p95_ms:.1f} ms > {policy.max_p95_ms:.1f} ms")
        stable_too = stable_too and s.p95_ms is not None and s.p95_ms > policy.max_p95_ms
    quality = "no data"
    if c.feedback >= policy.min_feedback and s.feedback >= policy.min_feedback:
        assert c.accuracy is not None and s.accuracy is not None
        drop = s.accuracy - c.accuracy
        quality = f"accuracy {c.accuracy:.3f} vs stable {s.accuracy:.3f}"
        if drop > policy.max_accuracy_drop:
            # Quality is the candidate's own: a load spike does not explain it.
            return Analysis("rollback", f"{quality}: worse by {drop:.3f} > {policy.max_accuracy_drop}", evidence)
    evidence["quality"] = quality
    if policy.min_shadow_agreement is not None and snap.shadow_samples >= policy.min_shadow_samples \
            and snap.shadow_agreement is not None and snap.shadow_agreement < policy.min_shadow_agreement:
        return Analysis("rollback", f"shadow agreement {snap.shadow_agreement:.3f} < "
                                    f"{policy.min_shadow_agreement}", evidence)
    if breaches:
        if stable_too:
            return Analysis("spike", "the stable color breaches too: " + "; ".join(breaches), evidence)
        return Analysis("rollback", "; ".join(breaches), evidence)
    if c.count < policy.min_requests:
        return Analysis("wait", f"{c.count} of {policy.min_requests} candidate requests in this stage", evidence)
    return Analysis("ok", "no trigger fired", evidence)


def _bound_if_above(errors: int, n: int, policy: Policy) -> float:
    """The error rate's lower bound, computed only when the observed rate is above the threshold (the bound is
    never above the observed rate, so below it the answer is known: no breach)."""
    if n == 0 or errors / n <= policy.max_error_rate:
        return 0.0
    return error_rate_lower_bound(errors, n, policy.confidence)


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 6) if b else None


# ----------------------------------------------------------------------------------------------- the step


def start(policy: Policy, candidate: Color, now: float, reason: str = "started") -> tuple[Status, list[Action]]:
    status = Status(Phase.PROGRESSING, candidate, 1, now, now, None, None, 0, now,
                    Decision(now, "start", reason, {"candidate": candidate}), policy)
    return status, [SetWeight(candidate, policy.stages[0].weight)]


def step(policy: Policy, status: Status, snap: Snapshot, now: float) -> tuple[Status, list[Action]]:
    """One analysis interval. Idempotent in time: called again before ``interval_s`` has passed, it changes
    nothing, so a controller that retries (or two that race) cannot double-step."""
    if status.phase not in ACTIVE or status.candidate is None:
        return status, []
    if now - status.last_analysis < policy.interval_s:
        return status, []
    candidate = status.candidate
    result = analyse(policy, snap)
    # Paused, nothing can advance, so a quiet candidate proves nothing either way: the count of intervals
    # without data stands still (it would otherwise roll back a release waiting for approval over a lull).
    if snap.new_candidate_requests:
        no_data = 0
    else:
        no_data = status.no_data_intervals + (status.phase != Phase.PAUSED)
    base = dataclasses.replace(status, last_analysis=now, no_data_intervals=no_data)

    def decide(st: Status, kind: Result, reason: str) -> Status:
        return dataclasses.replace(st, last_decision=Decision(now, kind, reason, result.evidence))

    if result.verdict == "rollback":  # in any active phase, paused included: a rollback must never wait
        st = dataclasses.replace(base, phase=Phase.ROLLED_BACK, finished_at=now, paused_by=None, approved=())
        return decide(st, "rollback", result.reason), [SetWeight(candidate, 0)]
    if no_data > policy.max_no_data_intervals:
        st = dataclasses.replace(base, phase=Phase.ROLLED_BACK, finished_at=now, paused_by=None, approved=())
        return decide(st, "rollback", f"no candidate requests for {no_data} intervals"), [SetWeight(candidate, 0)]

    if status.phase == Phase.PAUSED:
        if status.paused_by == "controller" and result.verdict != "spike":
            st = dataclasses.replace(base, phase=_running(policy, status), paused_by=None)
            return decide(st, "resume", f"the breach cleared ({result.reason})"), []
        return decide(base, "hold", f"paused by {status.paused_by}: {result.reason}"), []

    if result.verdict == "spike":
        st = dataclasses.replace(base, phase=Phase.PAUSED, paused_by="controller")
        return decide(st, "pause", result.reason), []
    if no_data:  # no data passes nothing, whatever the sample so far: hold (and roll back, above, if it lasts)
        return decide(base, "hold", f"no candidate requests this interval ({no_data} in a row, "
                                     f"{policy.max_no_data_intervals} allowed)"), []

    if status.phase == Phase.PROMOTING:
        if result.verdict in ("ok", "wait"):  # at 100% one clean interval completes the promotion
            st = dataclasses.replace(base, phase=Phase.PROMOTED, finished_at=now)
            return decide(st, "promoted", f"{candidate} is stable now"), [Promoted(other(candidate))]
        return decide(base, "hold", result.reason), []

    stage = policy.stages[status.stage - 1]
    held = now - status.stage_started
    if result.verdict == "wait" or held < stage.hold_s:
        why = result.reason if result.verdict == "wait" else f"holding stage {status.stage}: {held:.0f}s of " \
                                                               f"{stage.hold_s:.0f}s"
        return decide(base, "hold", why), []
    # The stage passed.
    if stage.gated:
        st = dataclasses.replace(base, phase=Phase.PAUSED, paused_by="approval")
        waiting = f"waiting for approval: {', '.join(st.pending_gates())}" if stage.approvals else "awaiting approval"
        return decide(st, "pause", f"stage {status.stage} passed; {waiting}"), []
    return advance(policy, base, now, result.evidence, f"stage {status.stage} passed")


def _running(policy: Policy, status: Status) -> Phase:
    """The phase a paused rollout resumes in: promoting once it is past the last stage (paused at 100%)."""
    return Phase.PROMOTING if status.stage > len(policy.stages) else Phase.PROGRESSING


def advance(policy: Policy, status: Status, now: float, evidence: dict[str, Any],
            reason: str) -> tuple[Status, list[Action]]:
    """Move to the next stage, or to promoting after the last one."""
    assert status.candidate is not None
    nxt = status.stage + 1
    if nxt > len(policy.stages):
        st = dataclasses.replace(status, phase=Phase.PROMOTING, stage=nxt, stage_started=now, paused_by=None,
                                 last_analysis=now, last_decision=Decision(now, "promote", reason, evidence),
                                 approved=())
        return st, [SetWeight(status.candidate, 100)]
    st = dataclasses.replace(status, phase=Phase.PROGRESSING, stage=nxt, stage_started=now, paused_by=None,
                             last_analysis=now, last_decision=Decision(now, "advance", reason, evidence), approved=())
    return st, [SetWeight(status.candidate, policy.stages[nxt - 1].weight)]


# ----------------------------------------------------------------------------------------------- operators


def operator(command: Command, status: Status, now: float, who: str) -> tuple[Status, list[Action]]:
    """pause | resume | promote | abort, as an operator asks; ValueError when the phase does not allow it."""
    policy = status.policy
    cand = status.candidate
    if status.phase not in ACTIVE or cand is None:
        raise ValueError(f"no rollout in progress (phase {status.phase.value})")
    decision = Decision(now, command, f"by {who}")
    if command == "pause":
        if status.phase == Phase.PAUSED:
            raise ValueError("already paused")
        return dataclasses.replace(status, phase=Phase.PAUSED, paused_by="operator", last_decision=decision), []
    if command == "resume":
        if status.phase != Phase.PAUSED:
            raise ValueError("not paused")
        # An operator's resume or promote starts a fresh count of intervals without data.
        pending = status.pending_gates()
        if status.paused_by == "approval" and pending:
            raise ValueError(f"waiting for approval: {', '.join(pending)}; a resume cannot stand in for a named "
                             "approval (approve each gate with a token holding approve:<gate>)")
        if status.paused_by == "approval":
            return advance(policy, dataclasses.replace(status, no_data_intervals=0), now, {},
                           f"stage {status.stage} approved by {who}")
        return dataclasses.replace(status, phase=_running(policy, status), paused_by=None, no_data_intervals=0,
                                   last_decision=decision), []
    if command == "promote":
        gated = _gates_ahead(status)
        if gated:
            raise ValueError(f"stages ahead need named approvals ({', '.join(gated)}): a promotion cannot skip them")
        st = dataclasses.replace(status, phase=Phase.PROMOTING, stage=len(policy.stages) + 1, stage_started=now,
                                 paused_by=None, last_analysis=now, no_data_intervals=0, last_decision=decision,
                                 approved=())
        return st, [SetWeight(cand, 100)]
    if command == "abort":
        st = dataclasses.replace(status, phase=Phase.ROLLED_BACK, finished_at=now, paused_by=None,
                                 last_decision=decision, approved=())
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
    return advance(status.policy, dataclasses.replace(st, no_data_intervals=0), now, evidence,
                   f"stage {status.stage} approved: {names}")
