"""The canary policy: stages and thresholds, validated by pydantic wherever a policy enters the gateway.

One schema for the three ways in — the routing file's ``canary:`` block (checked when the gateway starts, so a
misspelled field stops ``bluegreen gateway`` with the field named instead of surfacing as a 400 on an operator's
``canary start``), the overrides of ``POST /admin/v1/models/{m}/canary/start`` and the status persisted in a state
file or in Redis. The classes are pydantic dataclasses: positional construction and ``dataclasses.replace`` keep
working (the canary simulations build thousands), and reading a field costs what a plain dataclass costs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, TypeAdapter, ValidationError
from pydantic import dataclasses as pdc
from scipy.special import ndtri

from gateway.stats import minimum_sample


def _plain_number(value: Any) -> float:
    """A JSON number and nothing else: not ``true``, not ``"120"``, not NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("must be a finite number")
    return float(value)


Number = Annotated[float, BeforeValidator(_plain_number)]
_STRICT = ConfigDict(extra="forbid")
SLOW_SHARE = 0.05
"""A p95 over ``max_p95_ms`` is more than this share of requests slower than it: the latency trigger's null."""


GATE_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
Gate = Annotated[str, Field(pattern=GATE_NAME)]
"""An approval gate's name (``security``, ``product-owner``); a token approves it with the role ``approve:<name>``."""


def _confirm_url(value: Any) -> str:
    """An http(s) URL with a host: where a confirm gate is asked. Loopback is allowed on purpose (a receiver on
    the gateway's host, the tests'); the URL is shown in the rollout's status, so it should carry no secret."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if len(value) > 2048:
        raise ValueError("must be at most 2,048 characters")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- a port that is not a number raises here
    except ValueError:
        raise ValueError("must be an http or https URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http or https URL with a host")
    if "@" in parts.netloc:  # the URL is shown to every viewer of the rollout's status
        raise ValueError("must not carry a user name or password (user:pass@): the URL is shown in the rollout's "
                         "status")
    return value


ConfirmUrl = Annotated[str, BeforeValidator(_confirm_url)]
"""A confirm gate: the controller POSTs the rollout's status there before it leaves a stage, and goes on only on a
2xx answer (see ``gateway/confirm.py``)."""


@pdc.dataclass(frozen=True, slots=True, config=_STRICT)
class Stage:
    weight: Annotated[StrictInt, Field(ge=1, le=99)]
    hold_s: Annotated[Number, Field(ge=0, le=1e9)] = 0.0
    approve: StrictBool = False
    """Pause after the hold until an operator resumes (an unnamed approval)."""
    approvals: tuple[Gate, ...] = ()
    """Named gates: pause after the hold until each is approved by a token holding ``approve:<gate>``, each by a
    different token."""
    confirm_url: ConfirmUrl | None = None
    """A confirm gate: when the controller would leave this stage, it first POSTs the rollout's status there and
    leaves only on a 2xx answer; otherwise the rollout holds and asks again the next interval."""

    def __post_init__(self) -> None:
        if len(set(self.approvals)) != len(self.approvals):
            raise ValueError("approvals: a gate is named twice")
        # A person's approval advances the stage by itself (the controller never leaves a stage that waits for
        # people), so a confirm gate on such a stage would never be asked: refused rather than silently ignored.
        if self.confirm_url is not None and self.gated:
            raise ValueError("confirm_url: a stage waits either for people (approve, approvals) or for a confirm "
                             "gate, not both")

    @property
    def gated(self) -> bool:
        return self.approve or bool(self.approvals)


@pdc.dataclass(frozen=True, slots=True, config=_STRICT)
class Policy:
    """The release plan by default: 5% for 2 h, 25% for 6 h, 50% for 12 h, then 100%."""

    stages: tuple[Stage, ...] = (Stage(5, 7200), Stage(25, 21600), Stage(50, 43200))
    interval_s: Annotated[Number, Field(gt=0, le=1e9)] = 60.0
    min_requests: Annotated[StrictInt, Field(ge=0)] = 200
    max_error_rate: Annotated[Number, Field(ge=0, le=1)] = 0.001
    max_p95_ms: Annotated[Number, Field(ge=0, le=1e9)] = 120.0
    max_accuracy_drop: Annotated[Number, Field(ge=0, le=1)] = 0.05
    min_feedback: Annotated[StrictInt, Field(ge=0)] = 100
    min_shadow_agreement: Annotated[Number | None, Field(ge=0, le=1)] = None
    min_shadow_samples: Annotated[StrictInt, Field(ge=0)] = 100
    max_no_data_intervals: Annotated[StrictInt, Field(ge=1)] = 10
    """At least one: with zero, the first quiet interval (a lull, a scrape that came late) rolled every rollout
    back at once."""
    confidence: Annotated[Number, Field(ge=0.5, le=0.999999)] = 0.99995
    """One-sided confidence of the error-rate bound (alpha = 1 - confidence per check). The bound is checked
    every interval on a growing sample, so per rollout the false alarms add up: simulated at 200 requests/s,
    20 checks per stage, a candidate at half the threshold was rolled back in ~2 of 10,000 rollouts at 0.999
    and ~6 in a million at 0.99995, while one at 10x the threshold is still caught in ~600 requests."""
    grace_s: Annotated[Number, Field(ge=0, le=1e9)] = 3600.0
    """How long the old stable color stays deployed after a promotion (a rollback needs no redeploy)."""
    detect_error_rate: Annotated[Number | None, Field(gt=0, le=1)] = 0.01
    """The error rate every stage must be able to catch before it can pass: the stage needs the sample on which
    the error trigger fires with probability ``power`` for a candidate this bad (``min_error_sample``). Null:
    ``min_requests`` alone."""
    detect_slow_share: Annotated[Number | None, Field(gt=0, le=1)] = 0.10
    """Likewise for latency: the share of requests over ``max_p95_ms`` (above the 5% a p95 allows) every stage
    must be able to catch before it can pass. Null: ``min_requests`` alone."""
    power: Annotated[Number, Field(ge=0.5, le=0.9999)] = 0.95
    """Probability that a stage catches a candidate at ``detect_error_rate`` / ``detect_slow_share``; each stage
    and the 100% one judge a fresh sample, so such a candidate passes two of them at most (1 - power)^2."""
    detect_accuracy_drop: Annotated[Number | None, Field(gt=0, le=1)] = 0.10
    """Likewise for quality (in ``accuracy_drop``'s unit): the candidate needs the labels on which a drop this
    large would be caught with ``power`` (``min_labels``) before a stage can pass. Null: ``min_feedback`` alone."""
    promote_hold_s: Annotated[Number, Field(ge=0, le=1e9)] = 0.0
    """The 100% stage's own hold (paused time excluded) before the roles swap; 0: as soon as its evidence is in."""
    max_inconclusive_s: Annotated[Number, Field(gt=0, le=1e9)] = 3600.0
    """How long a rollout may stay inconclusive (its hold done but evidence missing, or a breach the stable
    color shares) before it pauses for an operator; it never rolls back for that."""
    accuracy_drop: Literal["relative", "points"] = "relative"
    """How ``max_accuracy_drop`` reads: a share of the stable color's accuracy (0.05 of 0.90 is 4.5 points), or
    points of accuracy."""
    require_feedback: StrictBool = False
    """Quality evidence (labels on both colors) is required even for a model whose stable color has no labels
    (otherwise it is required once the stable color's version has ``min_feedback`` labels)."""
    promote_confirm_url: ConfirmUrl | None = None
    """The promotion's confirm gate: asked before the controller moves the candidate to 100% (after the last
    stage's own gate, if it has one)."""
    confirm_timeout_s: Annotated[Number, Field(gt=0, le=30)] = 5.0
    """How long a confirm gate may take to answer; no answer in time is a refusal (the rollout holds). Short, as
    the controller analyses the models one after the other."""

    max_outcome_drop: Annotated[Number, Field(ge=0, lt=1)] = 0.05
    """The business metric's margin: the candidate's mean outcome (conversions, revenue per answer) may be this
    share below the stable color's; rolled back only when it is lower beyond doubt (``analysis._outcome``)."""
    min_outcomes: Annotated[StrictInt, Field(ge=0)] = 100
    """Outcomes each color's version needs before the outcome trigger judges (and, once the stable color's
    version has them, before a stage can pass)."""
    detect_outcome_drop: Annotated[Number | None, Field(gt=0, lt=1)] = 0.10
    """Likewise for the business metric (a share of stable's mean outcome): the candidate needs the outcomes on
    which a drop this large is caught with ``power`` (``min_outcome_sample``). Null: ``min_outcomes`` alone."""
    require_outcomes: StrictBool = False
    """Outcome evidence is required even for a model whose stable color has no outcomes yet."""
    max_complaint_ratio: Annotated[Number, Field(ge=1, le=1e6)] = 2.0
    """Complaints (``POST /admin/v1/models/{m}/signals``): the candidate's complaints per request may be this many
    times the stable color's; rolled back only when they are higher beyond doubt (``analysis.complaint_trigger``)."""
    min_complaints: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 5
    """Complaints about the candidate before the complaint trigger may fire: a handful of angry users is not
    judged, however small the stable color's count."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        weights = [s.weight for s in self.stages]
        if any(b <= a for a, b in itertools.pairwise(weights)):
            raise ValueError("stage weights must increase")
        if self.detect_error_rate is not None and self.detect_error_rate <= self.max_error_rate:
            raise ValueError("detect_error_rate must be above max_error_rate")
        if self.detect_accuracy_drop is not None and self.detect_accuracy_drop <= self.max_accuracy_drop:
            raise ValueError("detect_accuracy_drop must be above max_accuracy_drop")
        if self.detect_outcome_drop is not None and self.detect_outcome_drop <= self.max_outcome_drop:
            raise ValueError("detect_outcome_drop must be above max_outcome_drop")
        if self.detect_slow_share is not None and self.detect_slow_share <= SLOW_SHARE:
            raise ValueError(f"detect_slow_share must be above {SLOW_SHARE} (the share over a p95)")

    @property
    def min_error_sample(self) -> int:
        """Candidate requests a stage needs before it can pass (``min_requests``, raised to the sample that
        catches ``detect_error_rate`` with ``power``)."""
        if self.detect_error_rate is None:
            return self.min_requests
        return max(self.min_requests, minimum_sample(self.max_error_rate, self.detect_error_rate, self.confidence,
                                                     self.power))

    def min_labels(self, stable_accuracy: float) -> int:
        """Candidate labels a stage needs before it can pass, given the stable color's accuracy: ``min_feedback``,
        raised to the sample on which a candidate ``detect_accuracy_drop`` worse is caught with ``power`` by the
        two-sample bound (normal approximation, the stable side's labels taken as plentiful)."""
        if self.detect_accuracy_drop is None:
            return self.min_feedback
        relative = self.accuracy_drop == "relative"
        worse = stable_accuracy * (1 - self.detect_accuracy_drop) if relative \
            else stable_accuracy - self.detect_accuracy_drop
        excess = (self.detect_accuracy_drop - self.max_accuracy_drop) * (stable_accuracy if relative else 1.0)
        worse = min(max(worse, 0.0), 1.0)
        if excess <= 0 or worse <= 0:
            return self.min_feedback
        z = float(ndtri(self.confidence) + ndtri(self.power))
        return max(self.min_feedback, math.ceil(z * z * worse * (1 - worse) / (excess * excess)))

    def min_outcome_sample(self, stable_mean: float, stable_variance: float) -> int:
        """Candidate outcomes a stage needs before it can pass: ``min_outcomes``, raised to the sample on which a
        candidate whose mean is ``detect_outcome_drop`` below stable's is caught with ``power`` by the outcome
        trigger (normal approximation; the candidate's variance taken as the stable color's, as the trigger does
        at least, and the stable side's outcomes as plentiful)."""
        n = max(self.min_outcomes, 1)
        if self.detect_outcome_drop is None or not stable_mean > 0 or not math.isfinite(stable_variance):
            return n
        excess = (self.detect_outcome_drop - self.max_outcome_drop) * stable_mean
        z = float(ndtri(self.confidence) + ndtri(self.power))
        return max(n, math.ceil(z * z * max(stable_variance, 0.0) / (excess * excess)))

    @property
    def min_latency_sample(self) -> int:
        """Timed candidate requests a stage needs before it can pass (the same rule for latency)."""
        if self.detect_slow_share is None:
            return self.min_requests
        return max(self.min_requests, minimum_sample(SLOW_SHARE, self.detect_slow_share, self.confidence,
                                                     self.power))

    @classmethod
    def from_json(cls, doc: Any, base: Policy | None = None) -> Policy:
        """A policy from overrides on top of ``base`` (default: the release plan); ValueError names the field."""
        base = base or cls()
        if doc is not None and not isinstance(doc, dict):
            raise ValueError("policy must be an object")
        if not doc:
            return base
        return parse_policy({**base.as_json(), **doc})

    def as_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["stages"] = [{**dataclasses.asdict(s), "approvals": list(s.approvals)} for s in self.stages]
        return doc


_POLICY = TypeAdapter(Policy)


def parse_policy(doc: Any) -> Policy:
    try:
        return _POLICY.validate_python(doc)
    except ValidationError as exc:
        raise ValueError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """A pydantic error in one line an operator can act on: ``where: what`` for each problem. It never quotes the
    input (pydantic's own ``str`` does), so a body or file holding a secret cannot leak it into an answer or log."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown field"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)
