"""gateway/complaints.py and its place in canary.step: the complaint trigger's statistic, the tally a rollout's
status keeps, and the rollback it causes (evidence included)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from gateway import canary
from gateway.canary import ColorSample, Phase, Policy, Snapshot, Stage, Status
from gateway.complaints import ComplaintSample, ComplaintTally, complaint_trigger

STRICT = Policy()  # the release plan: confidence 0.99995, factor 2, at least 5 candidate complaints
QUICK = Policy(stages=(Stage(10, 0), Stage(50, 0)), interval_s=1, min_requests=0, detect_error_rate=None,
               detect_slow_share=None, detect_accuracy_drop=None)


def test_a_spike_on_the_candidate_rolls_back_with_the_figures_as_evidence() -> None:
    judged = complaint_trigger(STRICT, ComplaintSample(candidate=12, stable=3, candidate_requests=500,
                                                       stable_requests=9500))
    assert judged.verdict == "rollback", judged.reason
    e = judged.evidence
    assert (e["candidate"], e["stable"], e["candidate_requests"], e["stable_requests"]) == (12, 3, 500, 9500)
    assert e["candidate_per_1000"] == 24.0 and e["stable_per_1000"] == round(3000 / 9500, 3)
    assert (e["max_complaint_ratio"], e["min_complaints"], e["confidence"]) == (2.0, 5, 0.99995)
    assert e["share_lower_bound"] > e["share_null"] == round(2 * 500 / (2 * 500 + 9500), 6)
    assert "24.0/1000" in judged.reason


def test_equal_rates_do_not_roll_back() -> None:
    judged = complaint_trigger(STRICT, ComplaintSample(50, 950, 1000, 19000))
    assert judged.verdict == "ok" and judged.evidence["share_lower_bound"] < judged.evidence["share_null"]


def test_under_the_minimum_is_not_judged_however_lopsided() -> None:
    judged = complaint_trigger(STRICT, ComplaintSample(4, 0, 10, 100_000))
    assert judged.verdict == "ok" and "4 of 5" in judged.reason
    assert complaint_trigger(dataclasses.replace(STRICT, min_complaints=4),
                             ComplaintSample(4, 0, 10, 100_000)).verdict == "rollback"


def test_no_complaints_on_stable_needs_enough_on_the_candidate_for_its_share_of_traffic() -> None:
    # 5% of the traffic: under the null the candidate would get ~10% of the complaints; 8 of 8 is beyond doubt.
    assert complaint_trigger(STRICT, ComplaintSample(8, 0, 500, 9500)).verdict == "rollback"
    # Half the traffic: 5 of 5 happens with probability (2/3)^5 ~ 13% under the null: not evidence.
    assert complaint_trigger(STRICT, ComplaintSample(5, 0, 5000, 5000)).verdict == "ok"


def test_a_color_without_requests_is_not_judged() -> None:
    assert "no requests of the candidate" in complaint_trigger(STRICT, ComplaintSample(9, 0, 0, 100)).reason
    assert complaint_trigger(STRICT, ComplaintSample(9, 0, 100, 0)).verdict == "ok"


@pytest.mark.parametrize("sample", [ComplaintSample(-1, 0, 10, 10), ComplaintSample(5, 0, -10, 10),
                                    ComplaintSample(True, 0, 10, 10), ComplaintSample(5, 1.5, 10, 10),  # type: ignore[arg-type]
                                    ComplaintSample(5, 0, 10, 10, -2)])
def test_impossible_counts_are_a_wait_naming_them(sample: ComplaintSample) -> None:
    judged = complaint_trigger(STRICT, sample)
    assert judged.verdict == "wait" and judged.evidence["invalid"] and "complaints." in judged.reason


def test_at_the_null_the_false_alarm_rate_stays_under_one_minus_confidence() -> None:
    """The candidate's true rate exactly ``factor`` times stable's (the worst acceptable): over 4,000 simulated
    looks at confidence 0.99, at most ~1% roll back (3% allowed: the bound is conservative, the margin wide)."""
    policy = dataclasses.replace(STRICT, confidence=0.99)
    rng = random.Random(7)
    fired = 0
    for _ in range(4000):
        n_c, n_s = 2000, 18000
        c = sum(rng.random() < 0.004 for _ in range(n_c))  # 4 per 1000 = 2x stable's 2 per 1000
        s = int(rng.gauss(n_s * 0.002, (n_s * 0.002) ** 0.5))
        fired += complaint_trigger(policy, ComplaintSample(c, max(s, 0), n_c, n_s)).verdict == "rollback"
    assert fired <= 120, fired


def test_a_candidate_five_times_worse_is_caught() -> None:
    """10 complaints per 1,000 requests against stable's 2, on 10,000 candidate requests (~100 complaints)."""
    rng = random.Random(11)
    caught = sum(complaint_trigger(STRICT, ComplaintSample(sum(rng.random() < 0.01 for _ in range(10_000)),
                                                           sum(rng.random() < 0.002 for _ in range(40_000)),
                                                           10_000, 40_000)).verdict == "rollback"
                 for _ in range(40))
    assert caught >= 36, caught


# ----------------------------------------------------------------------------------------------- in the step


def _progressing(tally: ComplaintTally) -> Status:
    status, _ = canary.start(QUICK, "green", 0.0)
    return dataclasses.replace(status, complaints=tally)


def _snap(cand: int, stab: int) -> Snapshot:
    return Snapshot(ColorSample(cand, 0, cand, None, False, 0, 0, cand, 0),
                    ColorSample(stab, 0, stab, None, False, 0, 0, stab, 0), new_candidate_requests=cand)


def test_the_step_rolls_back_on_complaints_in_any_active_phase_with_the_evidence() -> None:
    for paused in (False, True):
        status = _progressing(ComplaintTally(candidate=30, stable=2, unattributed=4))
        if paused:
            status, _ = canary.operator("pause", status, 0.5, "alice")
        new, actions = canary.step(QUICK, status, _snap(1000, 9000), 1.0)
        assert new.phase == Phase.ROLLED_BACK and actions == [canary.SetWeight("green", 0)]
        assert new.last_decision is not None and new.last_decision.result == "rollback"
        assert "complaints: candidate 30 in 1000 requests" in new.last_decision.reason
        evidence = new.last_decision.evidence["complaints"]
        assert (evidence["unattributed"], evidence["stable"], evidence["stable_requests"]) == (4, 2, 9000)


def test_the_step_counts_the_requests_of_ended_stages() -> None:
    status = _progressing(ComplaintTally(candidate=3))  # under the minimum: judged, not fired
    status, _ = canary.step(QUICK, status, _snap(400, 3600), 1.0)  # stage 1 passes (no hold, no minimum)
    assert status.stage == 2
    assert (status.complaints.served_candidate, status.complaints.served_stable) == (400, 3600)
    assert (status.complaints.stage_candidate, status.complaints.stage_stable) == (0, 0)
    status = dataclasses.replace(status, complaints=dataclasses.replace(status.complaints, candidate=40))
    new, _ = canary.step(QUICK, status, _snap(100, 100), 2.0)  # judged on 500 vs 3700 requests
    assert new.phase == Phase.ROLLED_BACK
    evidence = new.last_decision.evidence["complaints"]  # type: ignore[union-attr]
    assert (evidence["candidate_requests"], evidence["stable_requests"]) == (500, 3700)


def test_a_stage_ended_by_an_approval_adds_the_requests_seen_at_the_last_analysis() -> None:
    policy = dataclasses.replace(QUICK, stages=(Stage(10, 0, approve=True), Stage(50, 0)))
    status, _ = canary.start(policy, "green", 0.0)
    status, _ = canary.step(policy, status, _snap(300, 2700), 1.0)
    assert status.phase == Phase.PAUSED and status.complaints.stage_candidate == 300
    status, _ = canary.operator("resume", status, 2.0, "alice")
    assert (status.stage, status.complaints.served_candidate, status.complaints.served_stable) == (2, 300, 2700)


def test_an_impossible_tally_is_a_hold_never_an_exception() -> None:
    status = _progressing(ComplaintTally(candidate=-5))
    new, actions = canary.step(QUICK, status, _snap(100, 900), 1.0)
    assert actions == [] and new.phase == Phase.PROGRESSING
    assert new.last_decision is not None and "complaints.candidate -5" in new.last_decision.reason


def test_the_tally_is_persisted_with_the_status() -> None:
    status = _progressing(ComplaintTally(1, 2, 3, 4, 5, 6, 7))
    assert Status.from_json(status.as_json()) == status
    assert Status.from_json({**status.as_json(), "complaints": None}).complaints == ComplaintTally()
