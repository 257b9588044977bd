"""The business-metric trigger (gateway/analysis.py ``_outcome``, gateway/stats.py ``outcome_lower_bound``) and its
policy fields: a candidate whose mean outcome is lower than stable's by more than ``max_outcome_drop`` beyond
doubt is rolled back; inside the margin it is not; without evidence a stage waits; without outcomes at all the
trigger is not judged; impossible figures are a hold, never an exception."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from gateway.canary import ColorSample, Policy, Snapshot, analyse
from gateway.stats import outcome_lower_bound
from tests.gateway.test_canary import P, color, snap


def conv(n: int, k: int, sample: ColorSample | None = None) -> ColorSample:
    """A color whose version has ``n`` 0/1 outcomes, ``k`` of them conversions."""
    return dataclasses.replace(sample or color(), outcomes=n, outcome_sum=float(k), outcome_sq=float(k))


def numeric(values: Any) -> ColorSample:
    v = np.asarray(values, dtype=float)
    return dataclasses.replace(color(), outcomes=len(v), outcome_sum=float(v.sum()),
                               outcome_sq=float((v * v).sum()))


def judge(c: ColorSample, s: ColorSample, policy: Policy = P) -> tuple[str, dict[str, Any], str]:
    a = analyse(policy, snap(c, s))
    return a.verdict, a.evidence.get("outcome", {}), a.reason


def test_policy_defaults_and_validation() -> None:
    p = Policy()
    assert (p.max_outcome_drop, p.min_outcomes, p.detect_outcome_drop, p.require_outcomes) == (0.05, 100, 0.10, False)
    for bad in ({"max_outcome_drop": 1.0}, {"max_outcome_drop": -0.1}, {"min_outcomes": -1},
                {"max_outcome_drop": 0.2}, {"detect_outcome_drop": True}, {"require_outcomes": "yes"},
                {"max_outcome_drop": float("nan")}):
        with pytest.raises(ValueError):
            Policy.from_json(bad)
    assert Policy.from_json({"max_outcome_drop": 0.02, "detect_outcome_drop": None}).detect_outcome_drop is None


def test_the_power_derived_minimum_follows_the_normal_approximation() -> None:
    p = Policy()
    # z(0.99995) + z(0.95) = 3.8906 + 1.6449; 10% conversions: variance 0.09, excess (0.10 - 0.05) * 0.10.
    expected = math.ceil((3.890592 + 1.644854) ** 2 * 0.09 / 0.005 ** 2)
    assert abs(p.min_outcome_sample(0.10, 0.09) - expected) <= 2
    assert p.min_outcome_sample(0.10, 0.0) == 100  # no variance: the floor
    assert p.min_outcome_sample(0.0, 0.09) == 100  # no positive mean: no relative drop to size for
    assert dataclasses.replace(p, detect_outcome_drop=None).min_outcome_sample(0.10, 0.09) == 100


def test_a_candidate_converting_clearly_worse_is_rolled_back_with_the_evidence() -> None:
    # 8% against 10% on 20,000 outcomes each: 20% worse, the 5% margin far exceeded.
    verdict, outcome, reason = judge(conv(20_000, 1600), conv(20_000, 2000))
    assert verdict == "rollback", reason
    assert reason.startswith("mean outcome 0.08 vs stable 0.1: lower by more than 5% of stable's")
    assert outcome["lower_bound"] > 0 and outcome["candidate"] == {"outcomes": 20_000, "mean": 0.08}
    a = analyse(P, snap(conv(20_000, 1600), conv(20_000, 2000)))
    assert a.evidence["thresholds"]["max_outcome_drop"] == 0.05 and a.evidence["thresholds"]["min_outcomes"] == 100


def test_inside_the_margin_or_better_never_rolls_back() -> None:
    for k in (1920, 2000, 2100):  # 4% worse (inside 5%), equal, better
        verdict, outcome, reason = judge(conv(400_000, k * 20), conv(400_000, 2000 * 20))
        assert verdict == "ok", (k, reason)
        assert "lower_bound" not in outcome or outcome["lower_bound"] <= 0


def test_a_drop_not_yet_beyond_doubt_waits_for_the_needed_outcomes() -> None:
    # 20% worse but on 300 outcomes: noise could do that at 99.995%; the stage may not pass either.
    verdict, outcome, reason = judge(conv(300, 24), conv(50_000, 5000))
    need = P.min_outcome_sample(0.1, 0.1 * 0.9 * 50_000 / 49_999)
    assert verdict == "wait" and outcome["needed"] == need and f"outcomes: 300 of {need} candidate" in reason
    # Below min_outcomes on either side: waiting, never judged.
    for c, s in ((conv(99, 0), conv(50_000, 5000)), (conv(50_000, 0), conv(99, 10, color()))):
        verdict, outcome, _ = judge(c, s, dataclasses.replace(P, require_outcomes=True))
        assert (verdict, outcome["result"]) == ("wait", "waiting for outcomes")
    # No conversion at all in 100 outcomes against 10%: P = 0.9^100 ~ 3e-5 for a healthy candidate, so the
    # floor (the candidate's variance is at least stable's) keeps it from being read as proof.
    assert judge(conv(100, 0), conv(50_000, 5000))[0] == "wait"
    # Enough outcomes and inside the margin: the stage passes.
    assert judge(conv(need, round(need * 0.1)), conv(50_000, 5000))[0] == "ok"


def test_without_outcomes_the_trigger_is_not_judged_unless_the_policy_requires_them() -> None:
    for c, s in ((color(), color()), (conv(5000, 0), color()), (conv(5000, 0), conv(99, 99))):
        verdict, outcome, _ = judge(c, s)
        assert (verdict, outcome["result"]) == ("ok", "no outcomes: not judged")
    required = dataclasses.replace(P, require_outcomes=True)
    verdict, outcome, reason = judge(color(), color(), required)
    assert verdict == "wait" and outcome["result"] == "waiting for outcomes" and "outcomes: 0 candidate" in reason
    # A stable mean at or below zero gives a relative drop no meaning: reported, not judged.
    verdict, outcome, _ = judge(conv(5000, 0), conv(5000, 0))
    assert verdict == "ok" and "not positive" in outcome["result"]


def test_numeric_outcomes_are_judged_on_their_variance() -> None:
    rng = np.random.default_rng(5)
    # Revenue: 10% of answers buy, for a lognormal amount (mean ~ 55). Heavy-tailed: a large variance.
    def revenue(n: int, buy: float) -> np.ndarray:
        return np.where(rng.random(n) < buy, rng.lognormal(4.0, 0.5, n), 0.0)

    stable = numeric(revenue(200_000, 0.10))
    assert judge(numeric(revenue(200_000, 0.10)), stable)[0] == "ok"
    verdict, outcome, reason = judge(numeric(revenue(200_000, 0.08)), stable)
    assert verdict == "rollback" and outcome["lower_bound"] > 0, reason
    # The same 20% drop on 2,000 answers is within the noise of so variable a figure: no rollback yet.
    assert judge(numeric(revenue(2_000, 0.08)), stable)[0] == "wait"
    # The variance is what decides: the same means with no spread at all are beyond doubt on few outcomes.
    assert judge(numeric(np.full(200, 40.0)), numeric(np.full(200, 50.0)))[0] == "rollback"


def test_the_bound_matches_the_textbook_two_proportion_formula_and_vectorises() -> None:
    z = 3.890592
    ps, pc, n = 0.10, 0.08, 20_000
    vs, vc = ps * (1 - ps) * n / (n - 1), pc * (1 - pc) * n / (n - 1)
    textbook = 0.95 * ps - pc - z * math.sqrt(0.95 ** 2 * vs / n + max(vc, vs) / n)
    got = float(outcome_lower_bound(n, ps * n, ps * n, n, pc * n, pc * n, 0.95, 0.99995))
    assert got == pytest.approx(textbook, rel=1e-5)
    many = outcome_lower_bound(np.array([n, n]), np.array([2000.0, 2000.0]), np.array([2000.0, 2000.0]),
                               np.array([n, n]), np.array([1600.0, 2000.0]), np.array([1600.0, 2000.0]), 0.95,
                               0.99995)
    assert many[0] == pytest.approx(got) and many[1] < 0


@pytest.mark.parametrize("changes", [
    {"outcomes": -1}, {"outcomes": 1.5}, {"outcomes": True}, {"outcome_sum": math.nan},
    {"outcome_sq": math.inf}, {"outcome_sum": "5"}, {"outcome_sq": -1.0},
    {"outcomes": 0, "outcome_sum": 3.0, "outcome_sq": 9.0},
    {"outcomes": 10, "outcome_sum": 100.0, "outcome_sq": 10.0},  # a squared sum above n times the squares
])
def test_impossible_outcome_figures_are_a_hold_not_an_exception(changes: dict[str, Any]) -> None:
    good = conv(20_000, 1600)
    for c, s in ((dataclasses.replace(good, **changes), conv(20_000, 2000)),
                 (conv(20_000, 2000), dataclasses.replace(good, **changes))):
        a = analyse(P, Snapshot(c, s, 100, None, 0, s))
        assert a.verdict == "wait" and a.reason.startswith("impossible input"), a.reason
        assert any("outcome" in p for p in a.evidence["invalid"])
