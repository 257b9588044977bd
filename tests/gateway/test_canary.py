"""gateway/canary.py: the pure canary state machine, by seeded simulation and by unit tests.

The simulation is the issue's: 200 requests/s in total split by the current weights, a check every 10 s, the
default stages' weights (5/25/50) held 200 s each (20 checks), then one interval at 100%. Each interval the
candidate serves ~Poisson(200 · 10 · w / 100) requests with binomial errors and the stable color the rest;
``step`` sees counts since the stage started (reset when the stage changes), the requests of the last 60 s
window (the gateway's default ``window_s``) for p95, and the interval's new candidate requests.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from gateway.canary import (
    ACTIVE,
    Action,
    ColorSample,
    Decision,
    Phase,
    Policy,
    Promoted,
    SetWeight,
    Snapshot,
    Stage,
    Status,
    analyse,
    error_rate_lower_bound,
    operator,
    start,
    step,
)
from gateway.canary_sim import slow_share
from gateway.settings import Color, other

# ----------------------------------------------------------------------------------------------- simulation

RPS = 200
INTERVAL_S = 10.0
WINDOW_INTERVALS = 6  # the analysis window: 60 s, the gateway's default window_s
SIM = Policy(stages=(Stage(5, 200), Stage(25, 200), Stage(50, 200)), interval_s=INTERVAL_S)
HEALTHY_ERRORS = 0.0005
HEALTHY_P95 = 80.0
SLOW_P95 = 150.0
PROMOTED_AT = 610.0  # three stages of 200 s, then one clean interval at 100%
RUNS = 1000


def steady(_t: float) -> tuple[float, float]:
    return HEALTHY_P95, HEALTHY_P95


@dataclass
class Rollout:
    status: Status
    weights: list[tuple[float, int]] = field(default_factory=list)
    """(time, candidate weight) of every SetWeight, start included."""
    promoted: list[Color] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    """The decision of every analysis (holds included)."""
    candidate_requests: int = 0
    """Candidate requests served until the rollout ended."""

    def results(self) -> list[str]:
        return [d.result for d in self.decisions]

    def first(self, result: str) -> Decision:
        return next(d for d in self.decisions if d.result == result)


def simulate(rng: np.random.Generator, candidate: Color = "green", *, errors: float = HEALTHY_ERRORS,
             stable_errors: float = HEALTHY_ERRORS, p95: Callable[[float], tuple[float, float]] = steady,
             breaker_open_at: float = math.inf, candidate_traffic_until: float = math.inf,
             max_checks: int = 500) -> Rollout:
    """One rollout under SIM until it is promoted or rolled back (or ``max_checks`` analyses)."""
    status, actions = start(SIM, candidate, 0.0)
    run = Rollout(status)

    def apply(now: float, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SetWeight):
                assert a.candidate == candidate
                run.weights.append((now, a.weight))
            else:
                run.promoted.append(a.next_candidate)

    apply(0.0, actions)
    per_interval = RPS * SIM.interval_s
    c_n = c_e = s_n = s_e = c_slow = s_slow = 0
    recent_c: deque[int] = deque(maxlen=WINDOW_INTERVALS)
    recent_s: deque[tuple[int, int, int]] = deque(maxlen=WINDOW_INTERVALS)
    t = 0.0
    for _ in range(max_checks):
        if status.phase not in ACTIVE:
            break
        t += SIM.interval_s
        share = per_interval * run.weights[-1][1] / 100
        new_c = int(rng.poisson(share)) if t <= candidate_traffic_until else 0
        new_s = int(rng.poisson(per_interval - share))
        c_n += new_c
        c_e += int(rng.binomial(new_c, errors)) if new_c else 0
        s_n += new_s
        new_s_e = int(rng.binomial(new_s, stable_errors)) if new_s else 0
        s_e += new_s_e
        p95_c, p95_s = p95(t)
        slow_c = int(rng.binomial(new_c, slow_share(p95_c, SIM.max_p95_ms)))
        slow_s = int(rng.binomial(new_s, slow_share(p95_s, SIM.max_p95_ms)))
        c_slow += slow_c
        s_slow += slow_s
        recent_c.append(new_c)
        recent_s.append((new_s, new_s_e, slow_s))
        window_c, window_s = sum(recent_c), sum(r[0] for r in recent_s)
        recent = ColorSample(window_s, sum(r[1] for r in recent_s), 0, None, False, 0, 0, window_s,
                             sum(r[2] for r in recent_s))
        snap = Snapshot(ColorSample(c_n, c_e, window_c, p95_c if window_c else None, t >= breaker_open_at,
                                    0, 0, c_n, c_slow),
                        ColorSample(s_n, s_e, window_s, p95_s if window_s else None, False, 0, 0, s_n, s_slow),
                        new_c, stable_recent=recent)
        run.candidate_requests += new_c
        before = status.stage_started
        status, actions = step(SIM, status, snap, t)
        assert status.last_decision is not None and status.last_analysis == t  # every call is an analysis
        run.decisions.append(status.last_decision)
        apply(t, actions)
        if status.stage_started != before:  # a new stage: its sample starts afresh
            c_n = c_e = s_n = s_e = c_slow = s_slow = 0
    run.status = status
    return run


def test_a_candidate_with_1_percent_errors_is_rolled_back_within_3000_requests_in_99_percent_of_runs() -> None:
    rng = np.random.default_rng(20240601)
    served: list[int] = []
    for i in range(RUNS):
        run = simulate(rng, "green" if i % 2 else "blue", errors=0.01)
        assert run.status.phase == Phase.ROLLED_BACK and not run.promoted
        assert run.decisions[-1].result == "rollback" and "error rate" in run.decisions[-1].reason
        assert run.weights[-1] == (run.status.finished_at, 0)
        served.append(run.candidate_requests)
    within = sum(n <= 3000 for n in served) / RUNS
    assert within >= 0.99, f"rolled back within 3,000 candidate requests in {within:.1%} of runs"
    assert statistics.median(served) < 1000, statistics.median(served)


def test_a_healthy_candidate_is_never_rolled_back_in_1000_complete_rollouts() -> None:
    rng = np.random.default_rng(20240602)
    for i in range(RUNS):
        candidate: Color = "green" if i % 2 else "blue"  # slots, not versions: nothing about green is special
        run = simulate(rng, candidate)
        assert run.status.phase == Phase.PROMOTED, (i, run.status.last_decision)
        assert run.status.finished_at == PROMOTED_AT
        # 20 checks per stage, each stage passing at its 20th, then one clean interval at 100%.
        assert run.weights == [(0.0, 5), (200.0, 25), (400.0, 50), (600.0, 100)]
        assert run.promoted == [other(candidate)]
        assert len(run.decisions) == 61
        assert [d.time for d in run.decisions if d.result != "hold"] == [200.0, 400.0, 600.0, 610.0]
        assert set(run.results()) == {"hold", "advance", "promote", "promoted"}


def slowdown(start_s: float, end_s: float, *, stable_too: bool) -> Callable[[float], tuple[float, float]]:
    def p95(t: float) -> tuple[float, float]:
        if start_s <= t < end_s:
            return SLOW_P95, SLOW_P95 if stable_too else HEALTHY_P95
        return HEALTHY_P95, HEALTHY_P95
    return p95


def next_check(t: float) -> float:
    return math.ceil(t / INTERVAL_S) * INTERVAL_S


def test_a_slowdown_the_stable_color_shows_too_pauses_then_resumes_and_completes() -> None:
    """Changed: latency is judged as a proportion over the stage, so a short shared slowdown may not
    breach at all; where it does (the candidate's bound over the stage), the stable color's bound shows it too,
    and the rollout pauses, resumes when it clears, and completes. Never a rollback."""
    rng = np.random.default_rng(20240603)
    pauses = 0
    for _ in range(300):
        begin = float(rng.uniform(60, 400))  # within the stages (tests/gateway/test_canary_sim.py: at 100%)
        end = begin + float(rng.uniform(60, 200))
        run = simulate(rng, p95=slowdown(begin, end, stable_too=True))
        assert "rollback" not in run.results()
        assert run.status.phase == Phase.PROMOTED and run.promoted == ["blue"]
        if "pause" not in run.results():
            continue
        pauses += 1
        paused, resumed = run.first("pause"), run.first("resume")
        assert begin < paused.time < resumed.time and "stable color breaches too" in paused.reason
        assert paused.evidence["candidate"]["slow_share_lower_bound"] > 0.05
        # Paused means paused: no stage change and no weight change in between.
        assert not [w for w in run.weights if paused.time <= w[0] <= resumed.time]
        between = [d.result for d in run.decisions if paused.time < d.time < resumed.time]
        assert set(between) <= {"hold", "pause"}
        assert run.status.finished_at is not None and run.status.finished_at >= PROMOTED_AT
    assert pauses >= 100, pauses


def test_a_slowdown_of_the_candidate_alone_rolls_it_back() -> None:
    rng = np.random.default_rng(20240604)
    for _ in range(100):
        begin = float(rng.uniform(60, 600))
        run = simulate(rng, p95=slowdown(begin, math.inf, stable_too=False))
        assert run.status.phase == Phase.ROLLED_BACK and not run.promoted
        # Changed: judged over the stage as a proportion, the slowdown has to outweigh the stage's
        # earlier requests; no longer at the first check that sees it in the window.
        assert run.status.finished_at is not None and begin < run.status.finished_at <= begin + 200
        assert run.status.last_decision is not None
        assert run.status.last_decision.reason.startswith("p95 over 120.0 ms")


def test_no_data_never_promotes_it_holds_then_rolls_back() -> None:
    rng = np.random.default_rng(20240605)
    limit = SIM.max_no_data_intervals
    for _ in range(100):
        run = simulate(rng, candidate_traffic_until=0.0)
        assert run.candidate_requests == 0 and not run.promoted
        assert run.results() == ["hold"] * limit + ["rollback"]
        assert all("no candidate requests" in d.reason for d in run.decisions)
        assert run.status.last_decision is not None
        assert run.status.last_decision.reason == f"no candidate requests for {limit + 1} intervals"
        assert run.weights == [(0.0, 5), ((limit + 1) * INTERVAL_S, 0)]
        assert run.status.stage == 1


def test_data_that_stops_mid_rollout_never_promotes_and_rolls_back() -> None:
    """Even at a stage's end with its sample complete, or at 100%, an interval without data passes nothing."""
    rng = np.random.default_rng(20240606)
    for _ in range(300):
        stop = float(rng.uniform(0, PROMOTED_AT))
        run = simulate(rng, candidate_traffic_until=stop)
        assert run.status.phase == Phase.ROLLED_BACK and not run.promoted
        last_data = math.floor(stop / INTERVAL_S) * INTERVAL_S
        assert run.status.finished_at == last_data + (SIM.max_no_data_intervals + 1) * INTERVAL_S
        assert not [w for w in run.weights if last_data < w[0] and w[1] != 0]  # no step up after the data stopped


def test_an_open_breaker_rolls_back_at_the_next_analysis() -> None:
    rng = np.random.default_rng(20240607)
    for i in range(300):
        opened = float(rng.uniform(0.01, PROMOTED_AT))  # any stage, the interval at 100% included
        run = simulate(rng, "green" if i % 2 else "blue", breaker_open_at=opened)
        assert run.status.phase == Phase.ROLLED_BACK and not run.promoted
        assert run.status.finished_at == next_check(opened)
        assert run.results().count("rollback") == 1
        assert run.status.last_decision is not None and "circuit breaker" in run.status.last_decision.reason
        assert run.weights[-1] == (next_check(opened), 0)


# ----------------------------------------------------------------------------------------------- unit helpers

P = Policy(stages=(Stage(5, 30), Stage(25, 30), Stage(50, 30)), interval_s=10, detect_error_rate=None,
           detect_slow_share=None, detect_accuracy_drop=None)
"""The unit tests' policy: ``min_requests`` (200) is the whole evidence minimum, so small samples show the bounds
at work (the power-derived minimum has its own tests)."""


def color(count: int = 2000, errors: int = 0, *, window: int | None = None, p95: float | None = 80.0,
          breaker: bool = False, feedback: int = 0, correct: int = 0, timed: int | None = None,
          slow: int | None = None) -> ColorSample:
    """A color's sample; by default every request timed, and all of them slow when ``p95`` is over the threshold
    (a clear breach); 2,000 requests by default: above the policy's evidence minimum (1,874 requests)."""
    window = count if window is None else window
    timed = count if timed is None else timed
    if slow is None:
        slow = timed if p95 is not None and p95 > P.max_p95_ms else 0
    return ColorSample(count, errors, window, p95, breaker, feedback, correct, timed, slow)


def snap(candidate: ColorSample | None = None, stable: ColorSample | None = None, *, new: int = 100,
         agreement: float | None = None, samples: int = 0, recent: ColorSample | None = None) -> Snapshot:
    """``recent`` (the stable color's recent window) defaults to ``stable``."""
    stable = stable or color()
    return Snapshot(candidate or color(), stable, new, agreement, samples, recent or stable)


CLEAN = snap()


def drive(status: Status, snapshot: Snapshot, until: float, policy: Policy = P) -> tuple[Status, list[Action]]:
    """Analyse every interval after the last analysis up to ``until``; all actions in order."""
    actions: list[Action] = []
    t = status.last_analysis + policy.interval_s
    while t <= until:
        status, new = step(policy, status, snapshot, t)
        actions += new
        t += policy.interval_s
    return status, actions


def at_stage(n: int, policy: Policy = P, candidate: Color = "green") -> Status:
    """A rollout that has just entered stage n (len + 1: promoting) on clean data."""
    status, _ = start(policy, candidate, 0.0)
    while status.stage < n:
        status, _ = step(policy, status, CLEAN, status.last_analysis + policy.interval_s)
        assert status.phase in (Phase.PROGRESSING, Phase.PROMOTING)
    return status


# ----------------------------------------------------------------------------------------------- error bound


def brute_force_lower_bound(k: int, n: int, confidence: float) -> float:
    """Bisection over [0, 1] on P(X >= k), X ~ Binomial(n, p), summed term by term from k up with math.comb
    (independent of the code's 1 - cdf in log space)."""
    combs = [float(math.comb(n, i)) for i in range(k, n + 1)]

    def upper_tail(p: float) -> float:
        return sum(c * p**i * (1 - p) ** (n - i) for i, c in enumerate(combs, start=k))

    lo, hi = 0.0, 1.0
    for _ in range(64):
        mid = (lo + hi) / 2
        if upper_tail(mid) > 1 - confidence:
            hi = mid
        else:
            lo = mid
    return lo


@pytest.mark.parametrize("confidence", [0.9, 0.99, 0.999, 0.999999])
@pytest.mark.parametrize(("k", "n"), [(1, 1), (1, 10), (3, 10), (10, 10), (1, 200), (2, 300), (5, 300),
                                      (30, 300), (150, 300), (299, 300), (300, 300)])
def test_lower_bound_matches_a_brute_force_bisection_on_the_exact_binomial_tail(k: int, n: int,
                                                                                 confidence: float) -> None:
    assert error_rate_lower_bound(k, n, confidence) == pytest.approx(brute_force_lower_bound(k, n, confidence),
                                                                     rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("n", [1, 7, 300, 20000])
@pytest.mark.parametrize("confidence", [0.95, 0.999])
def test_lower_bound_closed_forms(n: int, confidence: float) -> None:
    alpha = 1 - confidence
    # One error: 1 - (1 - p)^n = alpha. Every request an error: p^n = alpha.
    assert error_rate_lower_bound(1, n, confidence) == pytest.approx(1 - (1 - alpha) ** (1 / n), rel=1e-9)
    if n <= 300:
        assert error_rate_lower_bound(n, n, confidence) == pytest.approx(alpha ** (1 / n), rel=1e-9)
    assert error_rate_lower_bound(0, n, confidence) == 0.0
    assert error_rate_lower_bound(0, 0, confidence) == 0.0


def test_lower_bound_is_monotone_and_below_the_observed_rate() -> None:
    by_errors = [error_rate_lower_bound(k, 500, 0.999) for k in range(0, 60)]
    assert by_errors[0] == 0.0 and all(a < b for a, b in itertools.pairwise(by_errors))
    by_n = [error_rate_lower_bound(5, n, 0.999) for n in range(5, 3000, 37)]
    assert all(a > b for a, b in itertools.pairwise(by_n))
    by_confidence = [error_rate_lower_bound(5, 300, c) for c in (0.5, 0.9, 0.99, 0.999, 0.999999)]
    assert all(a > b for a, b in itertools.pairwise(by_confidence))
    for k, n in [(1, 1), (1, 300), (5, 300), (40, 20000), (299, 300)]:
        assert 0 < error_rate_lower_bound(k, n, 0.999) < k / n


@pytest.mark.parametrize("n", [200, 1000, 5000])
def test_a_candidate_at_the_threshold_breaches_one_check_with_probability_at_most_alpha(n: int) -> None:
    """The smallest error count that breaches 0.1% has an exact tail probability <= alpha at p = 0.1%, and one
    error fewer would not (the bound is exact, not merely conservative)."""
    confidence = Policy().confidence
    k = next(k for k in range(1, n) if error_rate_lower_bound(k, n, confidence) > 0.001)
    p, alpha = Fraction(1, 1000), 1 - Fraction(str(confidence))

    def tail(k: int) -> Fraction:
        return 1 - sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k)), Fraction(0))

    assert tail(k) <= alpha < tail(k - 1)


# ----------------------------------------------------------------------------------------------- triggers


@pytest.mark.parametrize(("n", "errors"), [(200, 1), (300, 1), (500, 1), (300, 3)])
def test_a_single_error_in_a_few_hundred_requests_neither_rolls_back_nor_blocks_promotion(n: int,
                                                                                          errors: int) -> None:
    one = snap(color(n, errors, window=n))
    result = analyse(P, one)
    assert result.verdict == "ok", result.reason
    assert errors / n > P.max_error_rate  # the observed rate is above the threshold: only the bound saves it
    assert 0 < error_rate_lower_bound(errors, n, P.confidence) < P.max_error_rate
    assert result.evidence["candidate"]["error_rate_lower_bound"] < P.max_error_rate
    status, actions = drive(at_stage(3), one, 200.0)  # through the last stage and promotion
    assert status.phase == Phase.PROMOTED and actions == [SetWeight("green", 100), Promoted("blue")]


def test_enough_errors_in_a_few_hundred_requests_roll_back() -> None:
    assert analyse(P, snap(color(300, 4, window=300))).verdict == "ok"
    result = analyse(P, snap(color(300, 5, window=300)))
    assert result.verdict == "rollback" and result.reason.startswith("error rate 5/300: lower bound")
    assert result.evidence["candidate"]["error_rate_lower_bound"] > P.max_error_rate


def test_latency_is_a_proportion_judged_with_the_exact_bound() -> None:
    """Changed: "p95 over 120 ms" is "more than 5% of requests slower", decided by the exact lower
    bound on the stage's timed requests (it was the window's p95 against the threshold, on min_requests)."""
    assert analyse(P, snap(color(timed=199, slow=199))).verdict == "rollback"  # every request slow: evidence
    few = analyse(P, snap(color(timed=100, slow=12)))  # 12% observed, too few to say
    assert few.verdict == "wait" and few.evidence["candidate"]["slow_share_lower_bound"] < 0.05
    at = analyse(P, snap(color(timed=2000, slow=200)))
    assert at.verdict == "rollback" and at.reason.startswith("p95 over 120.0 ms: 200/2000 requests slower")
    assert at.evidence["candidate"]["slow_share_lower_bound"] > 0.05
    assert analyse(P, snap(color(timed=2000, slow=100))).verdict == "ok"  # 5% is not more than 5%
    assert analyse(P, snap(color(timed=2000, slow=130))).verdict == "ok"  # 6.5% observed: not beyond doubt
    missing = analyse(P, snap(color(window=0, p95=None, timed=0)))
    assert missing.verdict == "wait" and "0 of 200 timed candidate requests" in missing.reason


def test_a_breach_the_stable_color_shows_too_is_a_spike_otherwise_a_rollback() -> None:
    assert analyse(P, snap(color(p95=200), color(p95=130))).verdict == "spike"
    assert analyse(P, snap(color(p95=200), color(p95=100))).verdict == "rollback"
    assert analyse(P, snap(color(p95=200), color(window=0, p95=None))).verdict == "rollback"
    assert analyse(P, snap(color(1000, 30), color(1000, 30))).verdict == "spike"
    assert analyse(P, snap(color(1000, 30), color(1000, 0))).verdict == "rollback"
    # Two breaches, the stable color showing only one of them: the candidate's own fault.
    assert analyse(P, snap(color(1000, 30, p95=200), color(1000, 0, p95=200))).verdict == "rollback"
    status, actions = step(P, at_stage(1), snap(color(p95=200), color(p95=130)), 10.0)
    assert (status.phase, status.paused_by, actions) == (Phase.PAUSED, "controller", [])


def test_quality_is_judged_with_a_two_sample_bound_once_labels_flow() -> None:
    """Changed: quality is in force once the stable color's version has min_feedback labels (or the
    policy requires it); in force, missing labels hold the stage ("wait", never a pass),
    and a rollback needs the two-sample bound: the margin (5% of stable's accuracy) is the null hypothesis."""
    n = P.min_feedback
    unlabelled = analyse(P, snap(color(), color()))
    assert (unlabelled.verdict, unlabelled.evidence["quality"]) == ("ok", "no labels: not judged")
    stray = analyse(P, snap(color(feedback=n, correct=n // 2), color(feedback=n - 1, correct=n - 1)))
    assert (stray.verdict, stray.evidence["quality"]) == ("ok", "no labels: not judged")  # stable not labelled
    for cand, stab in [(color(feedback=n - 1, correct=0), color(feedback=n, correct=n)),
                       (color(feedback=0), color(feedback=5000, correct=4500))]:
        result = analyse(P, snap(cand, stab))
        assert (result.verdict, result.evidence["quality"]) == ("wait", "waiting for labels"), result.reason
    required = dataclasses.replace(P, require_feedback=True)
    assert analyse(required, snap(color(), color())).verdict == "wait"
    # 10 points under a stable at 0.90 on 100 labels each: not beyond doubt at 99.995% yet; on 2,000 it is.
    assert analyse(P, snap(color(feedback=100, correct=80), color(feedback=100, correct=90))).verdict == "ok"
    rollback = analyse(P, snap(color(feedback=2000, correct=1600), color(feedback=2000, correct=1800)))
    assert rollback.verdict == "rollback" and rollback.reason.startswith("accuracy 0.800 vs stable 0.900")
    # Inside the margin (4 points of a 4.5-point margin) or equal: never, however many labels.
    for correct in (1720, 1800, 1850):
        fine = analyse(P, snap(color(feedback=2000, correct=correct), color(feedback=2000, correct=1800)))
        assert fine.verdict == "ok", (correct, fine.reason)
    points = dataclasses.replace(P, accuracy_drop="points", max_accuracy_drop=0.02)
    assert analyse(points, snap(color(feedback=20000, correct=17200),
                                color(feedback=20000, correct=18000))).verdict == "rollback"


def test_shadow_agreement_triggers_only_where_the_policy_sets_a_minimum() -> None:
    assert analyse(P, snap(agreement=0.0, samples=10_000)).verdict == "ok"
    strict = dataclasses.replace(P, min_shadow_agreement=0.95)
    low = analyse(strict, snap(agreement=0.9, samples=strict.min_shadow_samples))
    assert low.verdict == "rollback" and low.reason.startswith("shadow agreement 0.900")
    # Changed: below the minimum sample (or without a figure) the shadow trigger has no evidence.
    assert analyse(strict, snap(agreement=0.9, samples=strict.min_shadow_samples - 1)).verdict == "wait"
    assert analyse(strict, snap(agreement=None, samples=0)).verdict == "wait"
    assert analyse(strict, snap(agreement=0.96, samples=10_000)).verdict == "ok"


def test_an_open_breaker_rolls_back_even_without_a_sample() -> None:
    status, actions = step(P, at_stage(1), snap(color(0, window=0, p95=None, breaker=True), new=0), 10.0)
    assert status.phase == Phase.ROLLED_BACK and actions == [SetWeight("green", 0)]


# ----------------------------------------------------------------------------------------------- the step


def test_start_sets_the_first_stage() -> None:
    status, actions = start(P, "blue", 5.0)
    assert actions == [SetWeight("blue", 5)]
    assert (status.phase, status.candidate, status.stage, status.stage_started, status.last_analysis) == \
        (Phase.PROGRESSING, "blue", 1, 5.0, 5.0)
    assert status.candidate_weight() == 5


def test_stages_pass_on_hold_time_and_minimum_sample() -> None:
    status, _ = start(P, "green", 0.0)
    status, actions = drive(status, snap(color(P.min_requests - 1)), 100.0)
    assert (status.stage, actions) == (1, [])  # below the sample: holds however long
    assert status.last_decision is not None  # past the hold, the missing evidence is shown
    assert status.last_decision.reason == "inconclusive for 70s: 199 of 200 candidate requests in this stage; " \
                                          "199 of 200 timed candidate requests"
    status, actions = step(P, status, CLEAN, 110.0)
    assert (status.stage, status.stage_started, actions) == (2, 110.0, [SetWeight("green", 25)])
    status, actions = drive(status, CLEAN, 130.0)
    assert (status.stage, actions) == (2, [])  # 20 s of 30
    status, actions = step(P, status, CLEAN, 140.0)
    assert (status.stage, actions) == (3, [SetWeight("green", 50)])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_a_candidate_with_5_percent_errors_is_rolled_back_at_the_first_analysis_of_any_stage(stage: int) -> None:
    """The default policy: the first analysis of a stage that sees min_requests requests since the stage's
    start, 5% of them errors, rolls back; it never waits for a second interval."""
    policy = Policy()
    status = start(policy, "green", 0.0)[0] if stage == 1 else at_stage(stage, policy)
    n = policy.min_requests
    first = status.last_analysis + policy.interval_s
    status, actions = step(policy, status, Snapshot(ColorSample(n, n // 20, n), ColorSample(19 * n, 0, 19 * n),
                                                    n), first)
    assert (status.phase, actions) == (Phase.ROLLED_BACK, [SetWeight("green", 0)])
    assert status.last_decision is not None and status.last_decision.time == first
    assert status.last_decision.reason.startswith(f"error rate {n // 20}/{n}")


def test_step_is_idempotent_within_the_interval() -> None:
    status = at_stage(2)
    t = status.last_analysis + P.interval_s
    once, actions = step(P, status, CLEAN, t)
    assert once != status
    for when in (t, t + P.interval_s - 0.001):
        again, more = step(P, once, snap(color(breaker=True)), when)
        assert again is once and more == []
    assert step(P, status, CLEAN, t) == (once, actions)  # the same input gives the same answer


def test_promoting_becomes_promoted_after_one_clean_interval() -> None:
    for candidate in ("green", "blue"):
        status = at_stage(4, candidate=candidate)
        assert (status.phase, status.candidate_weight()) == (Phase.PROMOTING, 100)
        status, actions = step(P, status, CLEAN, status.last_analysis + 10)
        assert status.phase == Phase.PROMOTED and status.finished_at == status.last_analysis
        assert actions == [Promoted(other(candidate))] and status.candidate_weight() == 100
        assert step(P, status, CLEAN, status.last_analysis + 10) == (status, [])  # finished: nothing more


def test_promoting_rolls_back_on_a_breach() -> None:
    status = at_stage(4)
    status, actions = step(P, status, snap(color(2000, 40), color(0, window=0, p95=None)), status.last_analysis + 10)
    assert status.phase == Phase.ROLLED_BACK and actions == [SetWeight("green", 0)]


def test_promoting_without_data_holds_and_then_rolls_back() -> None:
    """Regression: an interval at 100% without a single candidate request completed the promotion."""
    status = at_stage(4)
    t0 = status.last_analysis
    status, actions = drive(status, snap(color(0, window=0, p95=None), new=0), t0 + P.max_no_data_intervals * 10)
    assert (status.phase, actions) == (Phase.PROMOTING, [])
    status, actions = step(P, status, snap(color(0, window=0, p95=None), new=0), status.last_analysis + 10)
    assert status.phase == Phase.ROLLED_BACK and actions == [SetWeight("green", 0)]


def test_without_a_minimum_sample_no_data_still_passes_nothing() -> None:
    """Regression: with min_requests 0, a stage passed on intervals without a single candidate request."""
    policy = Policy.from_json({"min_requests": 0, "max_no_data_intervals": 5}, P)  # stage 1 holds 30 s
    status, _ = start(policy, "green", 0.0)
    empty = snap(color(0, window=0, p95=None), new=0)
    status, actions = drive(status, empty, 50.0, policy)
    assert (status.phase, status.stage, actions) == (Phase.PROGRESSING, 1, [])
    status, actions = step(policy, status, empty, 60.0)
    assert (status.phase, status.stage, actions) == (Phase.ROLLED_BACK, 1, [SetWeight("green", 0)])


def test_no_data_counts_intervals_in_a_row() -> None:
    policy = dataclasses.replace(P, max_no_data_intervals=3, stages=(Stage(5, 1000),))
    status, _ = start(policy, "green", 0.0)
    empty = snap(color(500), new=0)
    status, _ = drive(status, empty, 30.0, policy)
    assert (status.phase, status.no_data_intervals) == (Phase.PROGRESSING, 3)
    status, _ = step(policy, status, snap(color(600), new=100), 40.0)  # one interval with data resets the count
    assert status.no_data_intervals == 0
    status, _ = drive(status, empty, 70.0, policy)
    assert status.phase == Phase.PROGRESSING
    status, actions = step(policy, status, empty, 80.0)
    assert status.phase == Phase.ROLLED_BACK and actions == [SetWeight("green", 0)]
    assert status.last_decision is not None and status.last_decision.reason == "no candidate requests for 4 intervals"


def test_a_spike_pauses_and_resumes_where_it_was_also_at_100_percent() -> None:
    """Regression: a rollout paused while promoting resumed as 'progressing' at stage 4 and the next step
    raised IndexError; while paused it reported the last stage's weight instead of 100.
    Changed: at 100% the stable color's figures from before the promotion (``reference``) are what
    the candidate is compared with (here: slow already), and paused time no longer counts toward the hold, so
    stage 2 needs its 30 s of unpaused time after the resume."""
    spike = snap(color(p95=200), color(p95=200))
    for stage, phase in [(2, Phase.PROGRESSING), (4, Phase.PROMOTING)]:
        status = at_stage(stage)
        if stage == 4:
            status = dataclasses.replace(status, reference=color(p95=200))
        weight = status.candidate_weight()
        status, actions = step(P, status, spike, status.last_analysis + 10)
        assert (status.phase, status.paused_by, actions, status.candidate_weight()) == \
            (Phase.PAUSED, "controller", [], weight)
        status, actions = drive(status, spike, status.last_analysis + 100)  # holds, whatever the hold time
        assert (status.phase, actions, status.stage) == (Phase.PAUSED, [], stage)
        status, actions = step(P, status, CLEAN, status.last_analysis + 10)
        assert (status.phase, status.paused_by, actions) == (phase, None, [])
        assert status.last_decision is not None and status.last_decision.result == "resume"
        if stage == 2:
            status, actions = drive(status, CLEAN, status.last_analysis + 10)
            assert actions == [] and status.held_s(status.last_analysis) == 20.0
        status, actions = step(P, status, CLEAN, status.last_analysis + 10)
        assert actions == ([SetWeight("green", 50)] if stage == 2 else [Promoted("blue")])


def test_operator_pause_and_resume_while_promoting_stays_at_100_percent() -> None:
    status, _ = operator("pause", at_stage(4), 700.0, "alice")
    assert status.candidate_weight() == 100
    status, _ = operator("resume", status, 701.0, "alice")
    assert status.phase == Phase.PROMOTING
    status, actions = step(P, status, CLEAN, status.last_analysis + 10)
    assert status.phase == Phase.PROMOTED and actions == [Promoted("blue")]


# ----------------------------------------------------------------------------------------------- approvals


APPROVE_2 = Policy(stages=(Stage(5, 30), Stage(25, 30, approve=True), Stage(50, 30)), interval_s=10)


def test_an_approval_stage_pauses_until_an_operator_resumes() -> None:
    status = at_stage(2, APPROVE_2)
    status, actions = drive(status, CLEAN, status.stage_started + 30, APPROVE_2)
    assert (status.phase, status.paused_by, status.stage, actions) == (Phase.PAUSED, "approval", 2, [])
    assert status.last_decision is not None and status.last_decision.reason == "stage 2 passed; awaiting approval"
    status, actions = drive(status, CLEAN, status.last_analysis + 500, APPROVE_2)
    assert (status.phase, status.stage, actions) == (Phase.PAUSED, 2, [])
    assert status.last_decision is not None and status.last_decision.reason.startswith("paused by approval")
    status, actions = operator("resume", status, 1000.0, "alice")
    assert (status.phase, status.stage, status.stage_started, actions) == \
        (Phase.PROGRESSING, 3, 1000.0, [SetWeight("green", 50)])
    assert status.last_decision is not None and status.last_decision.reason == "stage 2 approved by alice"


def test_approving_the_last_stage_promotes() -> None:
    policy = Policy(stages=(Stage(5, 10), Stage(50, 10, approve=True)), interval_s=10)
    status = at_stage(2, policy)
    status, _ = drive(status, CLEAN, status.stage_started + 10, policy)
    assert status.paused_by == "approval"
    resumed, actions = operator("resume", status, 500.0, "bob")
    assert (resumed.phase, resumed.stage, actions) == (Phase.PROMOTING, 3, [SetWeight("green", 100)])
    promoted, actions = operator("promote", status, 500.0, "bob")
    assert (promoted.phase, actions) == (Phase.PROMOTING, [SetWeight("green", 100)])


def test_a_quiet_pause_for_approval_neither_rolls_back_nor_carries_its_lull_into_the_next_stage() -> None:
    """A release waiting for approval over a traffic lull: the count of intervals without data stands still
    while paused, and the operator's resume starts a fresh one."""
    quiet = snap(new=0)
    limit = APPROVE_2.max_no_data_intervals
    status = at_stage(2, APPROVE_2)
    status, _ = drive(status, CLEAN, status.stage_started + 30, APPROVE_2)
    assert status.paused_by == "approval"
    status, _ = step(APPROVE_2, status, quiet, status.last_analysis + 10)
    status, _ = step(APPROVE_2, status, quiet, status.last_analysis + 10)
    assert status.no_data_intervals == 0  # not counted while paused
    status = dataclasses.replace(status, no_data_intervals=limit)  # a lull counted before the pause
    for _ in range(3 * limit):
        status, actions = step(APPROVE_2, status, quiet, status.last_analysis + 10)
        assert (status.phase, actions) == (Phase.PAUSED, [])
    for command in ("resume", "promote"):
        resumed, _ = operator(command, status, status.last_analysis + 1, "alice")
        assert resumed.no_data_intervals == 0, command
        held, actions = step(APPROVE_2, resumed, quiet, resumed.last_analysis + 10)
        assert (held.no_data_intervals, actions) == (1, []) and held.phase in (Phase.PROGRESSING, Phase.PROMOTING)


# ----------------------------------------------------------------------------------------------- operators


def test_operator_commands_and_their_transitions() -> None:
    status = at_stage(2)
    paused, actions = operator("pause", status, 100.0, "alice")
    assert (paused.phase, paused.paused_by, actions) == (Phase.PAUSED, "operator", [])
    assert paused.last_decision == Decision(100.0, "pause", "by alice")
    held, actions = drive(paused, CLEAN, 500.0)  # an operator's pause holds through passed stages
    assert (held.phase, held.stage, actions) == (Phase.PAUSED, 2, [])
    resumed, actions = operator("resume", held, 501.0, "alice")
    assert (resumed.phase, resumed.paused_by, resumed.stage, actions) == (Phase.PROGRESSING, None, 2, [])
    promoting, actions = operator("promote", status, 102.0, "bob")
    assert (promoting.phase, promoting.stage, promoting.stage_started, actions) == \
        (Phase.PROMOTING, 4, 102.0, [SetWeight("green", 100)])
    for before in (status, paused, promoting):
        aborted, actions = operator("abort", before, 103.0, "bob")
        assert (aborted.phase, aborted.finished_at, aborted.paused_by, actions) == \
            (Phase.ROLLED_BACK, 103.0, None, [SetWeight("green", 0)])
        assert aborted.candidate_weight() == 0


@pytest.mark.parametrize(("command", "phase", "message"), [
    ("pause", "paused", "already paused"),
    ("resume", "progressing", "not paused"),
    ("resume", "promoting", "not paused"),
    ("reboot", "progressing", "unknown command"),
])
def test_operator_refuses_commands_the_phase_does_not_allow(command: str, phase: str, message: str) -> None:
    status = {"paused": operator("pause", at_stage(1), 10.0, "a")[0], "progressing": at_stage(1),
              "promoting": at_stage(4)}[phase]
    with pytest.raises(ValueError, match=message):
        operator(command, status, 20.0, "alice")


@pytest.mark.parametrize("command", ["pause", "resume", "promote", "abort"])
def test_operator_refuses_everything_without_a_rollout(command: str) -> None:
    promoted, _ = step(P, at_stage(4), CLEAN, 1000.0)
    rolled_back, _ = operator("abort", at_stage(1), 5.0, "a")
    for status in (Status(), promoted, rolled_back):
        with pytest.raises(ValueError, match="no rollout in progress"):
            operator(command, status, 2000.0, "alice")


@pytest.mark.parametrize("paused_by", ["operator", "approval", "controller"])
def test_a_rollback_verdict_while_paused_still_rolls_back(paused_by: str) -> None:
    status = dataclasses.replace(at_stage(2), phase=Phase.PAUSED, paused_by=paused_by)
    for bad in (snap(color(breaker=True)), snap(color(1000, 30)), snap(color(p95=300), color(p95=90))):
        rolled, actions = step(P, status, bad, status.last_analysis + 10)
        assert (rolled.phase, rolled.paused_by, actions) == (Phase.ROLLED_BACK, None, [SetWeight("green", 0)])
        assert rolled.last_decision is not None and rolled.last_decision.result == "rollback"


def test_inactive_phases_are_left_alone() -> None:
    for status in (Status(), operator("abort", at_stage(1), 5.0, "a")[0]):
        assert step(P, status, snap(color(breaker=True)), 10_000.0) == (status, [])


# ----------------------------------------------------------------------------------------------- policy


DESIGN_EXAMPLE: dict[str, Any] = {
    "stages": [{"weight": 5, "hold_s": 2}, {"weight": 25, "hold_s": 2}, {"weight": 50, "hold_s": 2, "approve": True}],
    "interval_s": 1, "min_requests": 200, "max_error_rate": 0.001, "max_p95_ms": 120}


def test_default_policy_is_the_release_plan() -> None:
    p = Policy()
    assert p.stages == (Stage(5, 7200), Stage(25, 21600), Stage(50, 43200))
    assert (p.min_requests, p.max_error_rate, p.max_p95_ms, p.max_accuracy_drop) == (200, 0.001, 120.0, 0.05)
    assert p.min_shadow_agreement is None


def test_policy_accepts_the_design_example() -> None:
    p = Policy.from_json(DESIGN_EXAMPLE)
    assert p.stages == (Stage(5, 2.0), Stage(25, 2.0), Stage(50, 2.0, approve=True))
    assert (p.interval_s, p.min_requests, p.max_error_rate, p.max_p95_ms) == (1.0, 200, 0.001, 120.0)
    assert p.max_accuracy_drop == Policy().max_accuracy_drop  # the rest: defaults
    assert Policy.from_json(json.loads(json.dumps(p.as_json()))) == p


def test_policy_overrides_apply_on_a_base() -> None:
    assert Policy.from_json(None, P) is P and Policy.from_json({}, P) is P
    p = Policy.from_json({"min_requests": 5, "min_shadow_agreement": 0.9}, P)
    assert (p.stages, p.interval_s, p.min_requests, p.min_shadow_agreement) == (P.stages, 10, 5, 0.9)
    assert Policy.from_json({"min_shadow_agreement": None}, p).min_shadow_agreement is None


@pytest.mark.parametrize(("doc", "message"), [
    ({"bogus": 1, "stage": []}, "bogus: unknown field; stage: unknown field"),
    ({"stages": [{"weight": 5, "hold_s": 1, "wait": True}]}, r"stages\.0\.wait: unknown field"),
    ({"stages": [{"weight": 5}, {"weight": 5}]}, "must increase"),
    ({"stages": [{"weight": 25}, {"weight": 5}]}, "must increase"),
    ({"stages": [{"weight": 0}]}, r"stages\.0\.weight: .*greater than or equal to 1"),
    ({"stages": [{"weight": 100}]}, r"stages\.0\.weight: .*less than or equal to 99"),
    ({"stages": [{"weight": -5}]}, r"stages\.0\.weight: .*greater than or equal to 1"),
    ({"stages": [{"weight": 5.0}]}, r"stages\.0\.weight: .*valid integer"),
    ({"stages": [{"weight": True}]}, r"stages\.0\.weight: .*valid integer"),
    ({"stages": [{"hold_s": 5}]}, r"stages\.0\.weight: Field required"),
    ({"stages": []}, "stages: at least one stage"),
    ({"stages": {"weight": 5}}, "stages: .*valid tuple"),
    ({"stages": [5]}, r"stages\.0: .*dictionary"),
    ({"stages": [{"weight": 5, "hold_s": True}]}, r"stages\.0\.hold_s: must be a finite number"),
    ({"stages": [{"weight": 5, "hold_s": -1}]}, r"stages\.0\.hold_s: .*greater than or equal to 0"),
    ({"stages": [{"weight": 5, "approve": "yes"}]}, r"stages\.0\.approve: .*valid boolean"),
    ({"max_error_rate": True}, "max_error_rate: must be a finite number"),
    ({"max_error_rate": 1.5}, "max_error_rate: .*less than or equal to 1"),
    ({"max_p95_ms": "120"}, "max_p95_ms: must be a finite number"),
    ({"max_p95_ms": False}, "max_p95_ms: must be a finite number"),
    ({"max_p95_ms": float("nan")}, "max_p95_ms: must be a finite number"),
    ({"interval_s": True}, "interval_s: must be a finite number"),
    ({"interval_s": 0}, "interval_s: .*greater than 0"),
    ({"min_requests": True}, "min_requests: .*valid integer"),
    ({"min_requests": 200.0}, "min_requests: .*valid integer"),
    ({"min_requests": -1}, "min_requests: .*greater than or equal to 0"),
    ({"max_no_data_intervals": "10"}, "max_no_data_intervals: .*valid integer"),
    ({"min_shadow_agreement": True}, "min_shadow_agreement: must be a finite number"),
    ({"confidence": 1.0}, "confidence: .*less than or equal to 0.999999"),
    ({"confidence": 0.3}, "confidence: .*greater than or equal to 0.5"),
])
def test_policy_rejects_bad_overrides(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Policy.from_json(doc)


@pytest.mark.parametrize("doc", [[], [1], "", "stages", 0])
def test_policy_must_be_an_object(doc: Any) -> None:
    """Regression for the falsy ones: [], "" and 0 were read as "no overrides"."""
    with pytest.raises(ValueError, match="policy must be an object"):
        Policy.from_json(doc)


# ----------------------------------------------------------------------------------------------- status JSON


def roundtrip(status: Status) -> Status:
    return Status.from_json(json.loads(json.dumps(status.as_json())))


def test_status_json_round_trips_in_every_phase() -> None:
    custom = Policy.from_json({**DESIGN_EXAMPLE, "max_no_data_intervals": 4, "accuracy_drop": "points",
                               "max_inconclusive_s": 99, "detect_slow_share": None})
    paused, _ = drive(at_stage(3, custom), CLEAN, 100.0, custom)
    assert paused.paused_by == "approval"
    statuses = [Status(), start(P, "blue", 1.5)[0], at_stage(2), at_stage(4), paused,
                step(P, at_stage(2), snap(color(p95=200), color(p95=200)), 1000.0)[0],
                step(P, at_stage(2), snap(color(1000, 40)), 1000.0)[0],
                step(P, at_stage(4), CLEAN, 1000.0)[0], operator("abort", at_stage(1), 7.0, "alice")[0]]
    assert {s.phase for s in statuses} == set(Phase)
    for status in statuses:
        assert roundtrip(status) == status
        assert roundtrip(status).as_json() == status.as_json()
    doc = statuses[6].as_json()
    assert (doc["phase"], doc["candidate"], doc["stage"], doc["stages"]) == ("rolled_back", "green", 2, 3)
    assert doc["last_decision"]["result"] == "rollback"
    assert doc["last_decision"]["evidence"]["candidate"]["errors"] == 40
    assert Status.from_json(None) == Status() and Status.from_json({}) == Status()
