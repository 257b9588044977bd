"""One canary analysis: the candidate judged on its stage's sample, every trigger with a stated error probability.

Pure and constant time (``canary.step`` calls it; the controller feeds it numbers). Each trigger is a one-sided
test whose null hypothesis is "the candidate is acceptable", rejected only at the policy's per-look
``confidence`` — so noise alone rolls a healthy candidate back with probability about 1 - confidence per look:

- errors: the exact (Clopper-Pearson) lower bound of the candidate's error rate in the stage above
  ``max_error_rate``;
- latency, as a proportion: "p95 over ``max_p95_ms``" is "more than 5% of requests slower than it"; the exact
  lower bound of the share of the stage's timed requests over the threshold above 5%;
- quality: the two-sample lower bound of (stable's accuracy less the margin) minus the candidate's above zero —
  the margin is the null hypothesis, so a candidate equal to stable is practically never rolled back and one
  inside the margin rarely; relative to stable's accuracy by default (``accuracy_drop``);
- business outcome (conversions, revenue per answer): the lower bound of (stable's mean outcome less the relative
  margin ``max_outcome_drop``) minus the candidate's above zero — the same construction as quality, on means with
  each side's sample variance (``stats.outcome_lower_bound``);
- shadow agreement below ``min_shadow_agreement`` (only where a policy sets one); an open breaker on every
  candidate backend: immediate rollback.
- complaints (users', sent to the signals endpoint): the candidate's per request above ``max_complaint_ratio``
  times the stable color's beyond doubt (``complaints.complaint_trigger``); the candidate's own, like quality.

A breach of errors or latency is shared trouble (a dependency both colors use: "spike", never a rollback) when
the stable color shows it too over the same stage — its observed rate over the threshold — and the candidate is
not worse than the stable color beyond doubt (the two-sample bound at the same confidence); otherwise it is the
candidate's. (Comparing two one-sample verdicts instead splits two
colors with the same trouble near the threshold, one bound just over and one just under, and rolls back for a
shared cause.) At 100% the stable color serves nothing: its figures over the last window before the promotion
stand in, and with none the breach holds as well.

No evidence, no progress: "ok" needs every trigger's minimum evidence in the stage — ``min_error_sample``
requests, ``min_latency_sample`` timed requests, ``min_feedback`` labels on both colors where quality is in
force, ``min_outcome_sample`` outcomes where the business metric is, ``min_shadow_samples`` where shadow
agreement is — otherwise "wait". Impossible inputs (negative counts,
more errors than requests, NaN) are no evidence either: "wait" with the reason, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from gateway.complaints import ComplaintSample, complaint_problems, complaint_trigger
from gateway.policy import SLOW_SHARE, Policy
from gateway.stats import difference_lower_bound, error_rate_lower_bound, outcome_lower_bound

__all__ = ["Analysis", "ColorSample", "Snapshot", "Verdict", "analyse", "problems"]

Verdict = Literal["ok", "wait", "spike", "rollback"]
"""What one analysis found: pass, not enough evidence yet, a breach the stable color shares, a rollback."""


@dataclass(frozen=True, slots=True)
class ColorSample:
    """One color's numbers for an analysis. ``count``/``errors``: since the stage started; ``timed``/``slow``:
    requests timed against the policy's ``max_p95_ms`` since the stage started and how many took longer;
    ``window_count``/``p95_ms``: the recent window (shown, not judged); ``feedback``/``correct``: labels of the
    color's version."""

    count: int = 0
    errors: int = 0
    window_count: int = 0
    p95_ms: float | None = None
    breaker_open: bool = False
    feedback: int = 0
    correct: int = 0
    timed: int = 0
    slow: int = 0
    outcomes: int = 0
    """Business outcomes of the color's version (conversions 0/1, revenue): how many, their sum and sum of squares
    (so a mean and a variance exist, and replicas' figures add up)."""
    outcome_sum: float = 0.0
    outcome_sq: float = 0.0

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.feedback if self.feedback > 0 else None

    @property
    def outcome_mean(self) -> float | None:
        return self.outcome_sum / self.outcomes if self.outcomes > 0 else None

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> ColorSample | None:
        if not isinstance(doc, dict):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass(frozen=True, slots=True)
class Snapshot:
    candidate: ColorSample
    stable: ColorSample
    new_candidate_requests: int = 0
    """Candidate requests since the previous analysis (0: this interval had no data)."""
    shadow_agreement: float | None = None
    shadow_samples: int = 0
    stable_recent: ColorSample | None = None
    """The stable color's counts over the recent window (the controller's history): shared trouble that began
    late in a long stage, and the reference kept for the 100% stage."""
    complaints: ComplaintSample | None = None
    """Complaints about the rollout and the requests they can be about (``canary.step`` fills it in from the
    status, where the signals endpoint counts them); None: no complaints, nothing to judge."""


@dataclass(frozen=True, slots=True)
class Analysis:
    verdict: Verdict
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def _plausible(s: ColorSample) -> bool:
    """The common case in one expression (the full check, with the reasons, runs only when this fails)."""
    return (type(s.count) is int and type(s.errors) is int and type(s.timed) is int and type(s.slow) is int
            and type(s.feedback) is int and type(s.correct) is int and type(s.window_count) is int
            and 0 <= s.errors <= s.count and 0 <= s.slow <= s.timed and 0 <= s.correct <= s.feedback
            and s.window_count >= 0 and (s.p95_ms is None or (type(s.p95_ms) in (float, int)
                                                               and math.isfinite(s.p95_ms))))


def problems(snap: Snapshot) -> list[str]:
    """What makes a snapshot impossible (empty: none). Checked before anything is computed from it."""
    a = snap.shadow_agreement
    if _plausible(snap.candidate) and _plausible(snap.stable) \
            and not _outcome_problems(snap.candidate) and not _outcome_problems(snap.stable) \
            and (snap.stable_recent is None or _plausible(snap.stable_recent)) \
            and type(snap.new_candidate_requests) is int and snap.new_candidate_requests >= 0 \
            and type(snap.shadow_samples) is int and snap.shadow_samples >= 0 \
            and (a is None or (type(a) in (float, int) and 0.0 <= a <= 1.0)):
        return []
    found: list[str] = []
    samples = [("candidate", snap.candidate), ("stable", snap.stable)]
    if snap.stable_recent is not None:
        samples.append(("stable_recent", snap.stable_recent))
    for name, s in samples:
        for part, whole, what in ((s.errors, s.count, "errors"), (s.slow, s.timed, "slow"),
                                  (s.correct, s.feedback, "correct")):
            if not _count(part) or not _count(whole) or part > whole:
                found.append(f"{name}.{what} {part!r} of {whole!r}")
        if not _count(s.window_count):
            found.append(f"{name}.window_count {s.window_count!r}")
        found += [f"{name}.{p}" for p in _outcome_problems(s)]
        if s.p95_ms is not None and not (isinstance(s.p95_ms, int | float) and math.isfinite(s.p95_ms)):
            found.append(f"{name}.p95_ms {s.p95_ms!r}")
    if not _count(snap.new_candidate_requests):
        found.append(f"new_candidate_requests {snap.new_candidate_requests!r}")
    if not _count(snap.shadow_samples):
        found.append(f"shadow_samples {snap.shadow_samples!r}")
    if a is not None and not (isinstance(a, int | float) and 0.0 <= a <= 1.0):
        found.append(f"shadow_agreement {a!r}")
    return found


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _outcome_problems(s: ColorSample) -> list[str]:
    """Outcome figures no set of real numbers gives: a negative or fractional count, sums that are not finite
    numbers, a negative sum of squares, sums without outcomes, or a squared sum above count times the sum of
    squares (Cauchy-Schwarz, with room for rounding)."""
    n, total, sq = s.outcomes, s.outcome_sum, s.outcome_sq
    if not _count(n):
        return [f"outcomes {n!r}"]
    if not all(type(v) in (int, float) and math.isfinite(v) for v in (total, sq)):
        return [f"outcome sums {total!r}, {sq!r}"]
    if sq < 0 or (n == 0 and (total != 0 or sq != 0)) or total * total > n * sq * (1 + 1e-9) + 1e-9:
        return [f"outcome sums {total!r}, {sq!r} of {n} outcomes"]
    return []


def analyse(policy: Policy, snap: Snapshot, *, reference: ColorSample | None = None, at_full: bool = False,
            need_evidence: bool = True) -> Analysis:
    """Judge the candidate on one snapshot (no phase logic). ``at_full``: the 100% stage, where the stable color
    serves nothing and ``reference`` (its figures from before the promotion) stands in for it; without
    ``need_evidence`` (a forced promotion) missing evidence does not hold the rollout."""
    bad = problems(snap)
    if snap.complaints is not None:
        bad += complaint_problems(snap.complaints)
    if bad:
        return Analysis("wait", "impossible input, no evidence: " + "; ".join(bad), {"invalid": bad})
    c, s = snap.candidate, snap.stable
    err_c = _bound_errors(c, policy)
    lat_c = _bound_slow(c, policy)
    evidence: dict[str, Any] = {
        "candidate": _describe(c, err_c, lat_c),
        "stable": _describe(s, _bound_errors(s, policy), _bound_slow(s, policy)),
        "thresholds": {"max_error_rate": policy.max_error_rate, "max_p95_ms": policy.max_p95_ms,
                       "max_accuracy_drop": policy.max_accuracy_drop, "accuracy_drop": policy.accuracy_drop,
                       "confidence": policy.confidence, "min_error_sample": policy.min_error_sample,
                       "min_latency_sample": policy.min_latency_sample, "min_feedback": policy.min_feedback,
                       "min_shadow_agreement": policy.min_shadow_agreement},
        "shadow": {"agreement": snap.shadow_agreement, "samples": snap.shadow_samples},
    }
    if at_full:
        evidence["reference"] = reference.as_json() if reference is not None else None
    if c.breaker_open:
        return Analysis("rollback", "the candidate's circuit breaker is open", evidence)

    # Quality is the candidate's own (a load spike does not explain it): a breach rolls back in any phase.
    quality, missing_labels = _quality(policy, c, s)
    evidence["quality"] = quality
    if quality.startswith("rollback: "):
        return Analysis("rollback", quality.removeprefix("rollback: "), evidence)
    # The business metric likewise: its own trigger, a rollback in any phase.
    outcome, missing_outcomes = _outcome(policy, c, s)
    evidence["outcome"] = outcome
    evidence["thresholds"].update(max_outcome_drop=policy.max_outcome_drop, min_outcomes=policy.min_outcomes,
                                  detect_outcome_drop=policy.detect_outcome_drop,
                                  require_outcomes=policy.require_outcomes)
    if outcome["result"].startswith("rollback: "):
        return Analysis("rollback", outcome["result"].removeprefix("rollback: "), evidence)
    if policy.min_shadow_agreement is not None and snap.shadow_samples >= policy.min_shadow_samples \
            and snap.shadow_agreement is not None and snap.shadow_agreement < policy.min_shadow_agreement:
        return Analysis("rollback", f"shadow agreement {snap.shadow_agreement:.3f} < "
                                    f"{policy.min_shadow_agreement}", evidence)
    if snap.complaints is not None:  # the candidate's own, like quality: a rollback in any phase
        judged = complaint_trigger(policy, snap.complaints)
        evidence["complaints"] = judged.evidence
        if judged.verdict == "rollback":
            return Analysis("rollback", judged.reason, evidence)

    breaches: list[str] = []
    shared: list[bool] = []
    ref = reference if at_full else s
    if err_c > policy.max_error_rate:
        breaches.append(f"error rate {c.errors}/{c.count}: lower bound {err_c:.4%} > {policy.max_error_rate:.4%}")
        shared.append(ref is not None and ref.errors > ref.count * policy.max_error_rate
                      and not _worse(c.errors, c.count, ref.errors, ref.count, policy))
    if lat_c > SLOW_SHARE:
        breaches.append(f"p95 over {policy.max_p95_ms:.1f} ms: {c.slow}/{c.timed} requests slower, lower bound "
                        f"{lat_c:.2%} > {SLOW_SHARE:.0%}")
        shared.append(ref is not None and ref.slow > ref.timed * SLOW_SHARE
                      and not _worse(c.slow, c.timed, ref.slow, ref.timed, policy))
    if breaches:
        text = "; ".join(breaches)
        if at_full and (ref is None or ref.count == 0):
            return Analysis("spike", f"{text}; no stable figures from before the promotion to compare: held", evidence)
        if all(shared):
            where = "before the promotion" if at_full else "too"
            return Analysis("spike", f"the stable color breaches {where}: {text}", evidence)
        return Analysis("rollback", text, evidence)

    if not need_evidence:
        return Analysis("ok", "no trigger fired (evidence minimum waived by a forced promotion)", evidence)
    missing: list[str] = []
    if c.count < policy.min_error_sample:
        missing.append(f"{c.count} of {policy.min_error_sample} candidate requests in this stage")
    if c.timed < policy.min_latency_sample:
        missing.append(f"{c.timed} of {policy.min_latency_sample} timed candidate requests")
    missing += missing_labels
    missing += missing_outcomes
    if policy.min_shadow_agreement is not None and snap.shadow_samples < policy.min_shadow_samples:
        missing.append(f"{snap.shadow_samples} of {policy.min_shadow_samples} shadow comparisons")
    if missing:
        return Analysis("wait", "; ".join(missing), evidence)
    return Analysis("ok", "no trigger fired", evidence)


def _worse(k_c: int, n_c: int, k_s: int, n_s: int, policy: Policy) -> bool:
    """The candidate's proportion is above the stable color's beyond doubt (the two-sample lower bound of the
    difference above zero at the policy's confidence): the breach is the candidate's own. Without a stable sample
    (0 requests) nothing says it is shared: the candidate's."""
    if n_s == 0:
        return True
    if n_c == 0 or k_c * n_s <= k_s * n_c:
        return False
    return difference_lower_bound(k_c, n_c, k_s, n_s, 1.0, policy.confidence) > 0


def _bound_errors(s: ColorSample, policy: Policy) -> float:
    """The error rate's lower bound, computed only when the observed rate is above the threshold (the bound is
    never above the observed rate, so below it the answer is known: no breach, reported as 0)."""
    if s.count == 0 or s.errors <= s.count * policy.max_error_rate:
        return 0.0
    return error_rate_lower_bound(s.errors, s.count, policy.confidence)


def _bound_slow(s: ColorSample, policy: Policy) -> float:
    """The lower bound of the share of timed requests over the latency threshold (0 when at most 5% observed)."""
    if s.timed == 0 or s.slow <= s.timed * SLOW_SHARE:
        return 0.0
    return error_rate_lower_bound(s.slow, s.timed, policy.confidence)


def _quality(policy: Policy, c: ColorSample, s: ColorSample) -> tuple[str, list[str]]:
    """("rollback: why" | a description, missing evidence). Quality is in force where the policy requires labels
    or the stable color's version has ``min_feedback`` of them (a model that is labelled); a few stray labels on
    the candidate alone, with nothing to compare them with, do not hold a rollout."""
    n = policy.min_feedback
    in_force = policy.require_feedback or s.feedback >= max(n, 1)
    if not in_force:
        return "no labels: not judged", []
    if s.feedback < max(n, 1):
        return "waiting for labels", [f"labels: {c.feedback} candidate and {s.feedback} stable of {max(n, 1)} each"]
    assert s.accuracy is not None
    need = max(1, policy.min_labels(s.accuracy))
    if c.feedback < max(n, 1):
        return "waiting for labels", [f"labels: {c.feedback} of {need} candidate"]
    assert c.accuracy is not None
    m = policy.max_accuracy_drop
    scale, offset = (1.0 - m, 0.0) if policy.accuracy_drop == "relative" else (1.0, m)
    quality = f"accuracy {c.accuracy:.3f} vs stable {s.accuracy:.3f}"
    # Only a candidate observed below the margin can breach it (the bound is below the estimate).
    if c.accuracy < scale * s.accuracy - offset:
        low = difference_lower_bound(s.correct, s.feedback, c.correct, c.feedback, scale, policy.confidence)
        if low - offset > 0:
            margin = f"{m:.0%} of stable's" if policy.accuracy_drop == "relative" else f"{m} points"
            return (f"rollback: {quality}: worse by more than {margin} (lower bound of the excess "
                    f"{low - offset:.4f})"), []
    if c.feedback < need:
        return quality, [f"labels: {c.feedback} of {need} candidate"]
    return quality, []


def _outcome(policy: Policy, c: ColorSample, s: ColorSample) -> tuple[dict[str, Any], list[str]]:
    """(evidence with its ``result`` — "rollback: why" or a description —, missing evidence). The business metric:
    null hypothesis "candidate mean >= (1 - ``max_outcome_drop``) x stable mean", rejected when the lower bound of
    the excess drop (``stats.outcome_lower_bound``) at the policy's confidence is above zero. In force where the
    policy requires outcomes or the stable color's version has ``min_outcomes`` of them; a relative drop means
    nothing against a stable mean at or below zero, so that is reported and not judged."""
    n = max(policy.min_outcomes, 2)  # a variance needs two
    doc: dict[str, Any] = {"candidate": _outcome_side(c), "stable": _outcome_side(s)}
    if not (policy.require_outcomes or s.outcomes >= n):
        doc["result"] = "no outcomes: not judged"
        return doc, []
    if s.outcomes < n:
        doc["result"] = "waiting for outcomes"
        return doc, [f"outcomes: {c.outcomes} candidate and {s.outcomes} stable of {n} each"]
    mean_s = s.outcome_sum / s.outcomes
    var_s = max(s.outcome_sq - s.outcome_sum * mean_s, 0.0) / (s.outcomes - 1)
    if mean_s <= 0:
        doc["result"] = f"stable's mean outcome {mean_s:.4g} is not positive: a relative drop is not judged"
        return doc, []
    need = policy.min_outcome_sample(mean_s, var_s)
    doc["needed"] = need
    if c.outcomes < n:
        doc["result"] = "waiting for outcomes"
        return doc, [f"outcomes: {c.outcomes} of {need} candidate"]
    mean_c = c.outcome_sum / c.outcomes
    scale = 1.0 - policy.max_outcome_drop
    text = f"mean outcome {mean_c:.4g} vs stable {mean_s:.4g}"
    doc["result"] = text
    if mean_c < scale * mean_s:  # only a candidate observed below the margin can breach it
        low = float(outcome_lower_bound(s.outcomes, float(s.outcome_sum), float(s.outcome_sq), c.outcomes,
                                        float(c.outcome_sum), float(c.outcome_sq), scale, policy.confidence))
        doc["lower_bound"] = round(low, 6)
        if low > 0:
            doc["result"] = (f"rollback: {text}: lower by more than {policy.max_outcome_drop:.0%} of stable's "
                             f"(lower bound of the excess {low:.4g})")
            return doc, []
    if c.outcomes < need:
        return doc, [f"outcomes: {c.outcomes} of {need} candidate"]
    return doc, []


def _outcome_side(s: ColorSample) -> dict[str, Any]:
    mean = s.outcome_mean
    return {"outcomes": s.outcomes, "mean": None if mean is None else round(mean, 6)}


def _describe(s: ColorSample, err_low: float, slow_low: float) -> dict[str, Any]:
    return {"requests": s.count, "errors": s.errors, "error_rate": _ratio(s.errors, s.count),
            "error_rate_lower_bound": round(err_low, 6),
            "timed": s.timed, "slow": s.slow, "slow_share": _ratio(s.slow, s.timed),
            "slow_share_lower_bound": round(slow_low, 6), "p95_ms": s.p95_ms,
            "window_requests": s.window_count, "accuracy": s.accuracy, "feedback": s.feedback,
            "breaker_open": s.breaker_open}


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 6) if b else None
