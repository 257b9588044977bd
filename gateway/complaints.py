"""The complaint trigger: users' complaints about a rollout, judged per request served, candidate against stable.

Complaints arrive from outside (``POST /admin/v1/models/{m}/signals``, from a support desk or a feedback form) and
are counted in the rollout's status (:class:`ComplaintTally`, persisted with it); ``canary.step`` turns the tally
into a :class:`ComplaintSample` for each analysis and ``analysis.analyse`` rolls back when
:func:`complaint_trigger` says so. A complaint names the color it is about, or none (shown, never judged: it
cannot be blamed on either). Pure and constant time, like the other triggers.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from gateway.policy import Policy
from gateway.stats import error_rate_lower_bound

__all__ = ["ComplaintSample", "ComplaintTally", "Judged", "complaint_problems", "complaint_trigger"]


@dataclass(frozen=True, slots=True)
class Judged:
    """One look of the complaint trigger: its verdict, why, and the figures (the rollback's evidence)."""

    verdict: Literal["ok", "wait", "rollback"]
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ComplaintSample:
    """Complaints per color since the rollout started and the requests each color served since then (the
    requests a complaint can be about). Unattributed complaints (no color given) are shown, never judged."""

    candidate: int = 0
    stable: int = 0
    candidate_requests: int = 0
    stable_requests: int = 0
    unattributed: int = 0


@dataclass(frozen=True, slots=True)
class ComplaintTally:
    """The complaint counts a rollout's status keeps (persisted with it, so every replica and the controller see
    the same): complaints per color, the requests of the stages that ended, and the current stage's requests as
    of the last analysis (so a stage ended by an approval, without a snapshot, still adds its requests)."""

    candidate: int = 0
    stable: int = 0
    unattributed: int = 0
    served_candidate: int = 0
    served_stable: int = 0
    stage_candidate: int = 0
    stage_stable: int = 0

    def sample(self, stage_candidate: int, stage_stable: int) -> ComplaintSample:
        """The complaints with the requests so far: the ended stages' plus the current stage's ``stage_*``."""
        return ComplaintSample(self.candidate, self.stable, self.served_candidate + stage_candidate,
                               self.served_stable + stage_stable, self.unattributed)

    def stage_ended(self) -> ComplaintTally:
        return ComplaintTally(self.candidate, self.stable, self.unattributed, self.served_candidate
                              + self.stage_candidate, self.served_stable + self.stage_stable)

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, doc: Any) -> ComplaintTally:
        if not isinstance(doc, dict):
            return cls()
        return cls(**{f.name: int(doc.get(f.name) or 0) for f in fields(cls)})


def complaint_problems(c: ComplaintSample) -> list[str]:
    """What makes a complaint sample impossible (empty: none): counts that are not whole numbers >= 0."""
    return [f"complaints.{f.name} {getattr(c, f.name)!r}" for f in fields(c) if not _count(getattr(c, f.name))]


def complaint_trigger(policy: Policy, c: ComplaintSample) -> Judged:
    """The complaint trigger: ``ok``, ``rollback`` or (impossible input) ``wait``, with the figures as evidence.

    The null hypothesis is "the candidate's complaints per request are ``max_complaint_ratio`` times the stable
    color's". Given the K complaints about either color, under it the candidate's share of them is binomial with
    p0 = f·n_c / (f·n_c + n_s) (each color's requests weighted by its allowed rate) whatever the unknown base rate,
    so the test needs no model of how often users complain: it rolls back when the exact (Clopper-Pearson) lower
    bound of the candidate's share, at the policy's confidence, is above p0 — noise alone does that with
    probability at most 1 - confidence per look — and the candidate has at least ``min_complaints``. Without
    requests of a color to relate complaints to there is nothing to compare: not judged."""
    bad = complaint_problems(c)
    if bad:
        return Judged("wait", "impossible complaint counts: " + "; ".join(bad), {"invalid": bad})
    f, n_c, n_s = policy.max_complaint_ratio, c.candidate_requests, c.stable_requests
    total = c.candidate + c.stable
    evidence: dict[str, Any] = {
        "candidate": c.candidate, "stable": c.stable, "unattributed": c.unattributed,
        "candidate_requests": n_c, "stable_requests": n_s,
        "candidate_per_1000": _per_1000(c.candidate, n_c), "stable_per_1000": _per_1000(c.stable, n_s),
        "max_complaint_ratio": f, "min_complaints": policy.min_complaints, "confidence": policy.confidence}
    if c.candidate < policy.min_complaints:
        return Judged("ok", f"{c.candidate} of {policy.min_complaints} candidate complaints: not judged", evidence)
    if n_c == 0 or n_s == 0:
        return Judged("ok", "no requests of " + ("the candidate" if n_c == 0 else "the stable color")
                        + " since the rollout started to relate complaints to: not judged", evidence)
    p0 = f * n_c / (f * n_c + n_s)
    low = error_rate_lower_bound(c.candidate, total, policy.confidence) if c.candidate > total * p0 else 0.0
    evidence.update(share=round(c.candidate / total, 6), share_lower_bound=round(low, 6), share_null=round(p0, 6))
    if low <= p0:
        return Judged("ok", "complaints not above the stable color's beyond doubt", evidence)
    return Judged("rollback", f"complaints: candidate {c.candidate} in {n_c} requests "
                                f"({evidence['candidate_per_1000']}/1000) vs stable {c.stable} in {n_s} "
                                f"({evidence['stable_per_1000']}/1000): the candidate's share of complaints, lower "
                                f"bound {low:.3f}, is above {p0:.3f} ({f:g}x the stable rate)", evidence)


def _per_1000(k: int, n: int) -> float | None:
    return round(1000 * k / n, 3) if n else None


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
