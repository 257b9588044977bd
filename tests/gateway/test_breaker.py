"""gateway/breaker.py: resilience4j semantics, every transition driven by a fake clock (no sleeping)."""

from __future__ import annotations

import pytest

from gateway.breaker import STATE_CODES, Breaker
from gateway.settings import BreakerSettings
from tests.gateway.support import FakeClock


def make(clock: FakeClock | None = None, **overrides: float) -> tuple[Breaker, FakeClock]:
    clock = clock or FakeClock()
    return Breaker(BreakerSettings(**overrides), clock), clock  # type: ignore[arg-type]


def call(breaker: Breaker, ok: bool, duration_s: float = 0.01) -> bool:
    """One admitted call with the given outcome; False when the breaker refused it."""
    permit = breaker.acquire()
    if permit is None:
        return False
    breaker.record(permit, ok, duration_s)
    return True


def open_it(breaker: Breaker) -> None:
    while breaker.state == "closed":
        assert call(breaker, False)
    assert breaker.state == "open"


def test_defaults_match_the_design() -> None:
    s = BreakerSettings()
    assert (s.window_size, s.minimum_calls, s.failure_rate_threshold, s.half_open_probes) == (50, 20, 0.2, 3)
    assert STATE_CODES == {"closed": 0, "half_open": 1, "open": 2}


def test_interleaved_30_percent_failures_open_within_one_window() -> None:
    breaker, _ = make()  # window 50, minimum 20, threshold 0.2
    pattern = [True, True, False, True, True, False, True, True, False, True]  # 30% failures, interleaved
    calls = 0
    while breaker.state == "closed":
        assert call(breaker, pattern[calls % len(pattern)])
        calls += 1
        assert calls <= breaker.settings.window_size, "did not open within one window"
    assert breaker.state == "open"
    assert calls == breaker.settings.minimum_calls  # the first verdict already trips it
    assert breaker.acquire() is None  # open: refused


def test_no_verdict_before_minimum_calls() -> None:
    breaker, _ = make(minimum_calls=20)
    for _ in range(19):
        assert call(breaker, False)
    assert breaker.state == "closed"  # 19 of 19 failed, still no verdict
    assert call(breaker, False)
    assert breaker.state == "open"


def test_threshold_is_inclusive_and_below_it_stays_closed() -> None:
    at, _ = make(minimum_calls=20, window_size=20)
    below, _ = make(minimum_calls=20, window_size=20)
    for i in range(20):
        call(at, i % 5 != 0)  # 4 of 20 fail: exactly 20%
        call(below, i not in (0, 5, 10))  # 3 of 20 fail: 15%
    assert at.state == "open"
    assert below.state == "closed"


def test_window_slides_old_failures_out() -> None:
    breaker, _ = make(window_size=20, minimum_calls=20)
    for _ in range(3):
        call(breaker, False)
    for _ in range(200):
        assert call(breaker, True)
    # The three early failures slid out long ago; three more now make 3/20 = 15% < 20%.
    for _ in range(3):
        call(breaker, False)
    assert breaker.state == "closed"
    call(breaker, False)  # 4/20 = 20%
    assert breaker.state == "open"


def test_slow_call_rate_opens_even_when_every_call_succeeds() -> None:
    breaker, _ = make(minimum_calls=10, window_size=10, slow_call_duration_s=0.5, slow_call_rate_threshold=0.5)
    for i in range(9):
        call(breaker, True, 0.9 if i % 2 else 0.1)
    assert breaker.state == "closed"
    call(breaker, True, 0.9)  # 5 of 10 slow
    assert breaker.state == "open"


def test_slow_rate_under_threshold_stays_closed() -> None:
    breaker, _ = make(minimum_calls=10, window_size=10, slow_call_duration_s=0.5, slow_call_rate_threshold=0.5)
    for i in range(100):
        call(breaker, True, 0.9 if i % 3 == 0 else 0.1)  # a third slow
    assert breaker.state == "closed"


def test_open_turns_half_open_after_open_s() -> None:
    breaker, clock = make(open_s=5.0)
    open_it(breaker)
    clock.advance(4.999)
    assert breaker.state == "open"
    assert breaker.acquire() is None
    clock.advance(0.001)
    assert breaker.state == "half_open"


def test_half_open_admits_at_most_the_probe_count() -> None:
    breaker, clock = make(open_s=5.0, half_open_probes=3)
    open_it(breaker)
    clock.advance(5)
    permits = [breaker.acquire() for _ in range(200)]  # a storm of 200 waiting requests
    admitted = [p for p in permits if p is not None]
    assert len(admitted) == 3
    assert breaker.state == "half_open"
    # resilience4j: N probes per half-open period, not N at a time — a finished probe frees no slot.
    breaker.record(admitted[0], True, 0.01)
    breaker.record(admitted[1], True, 0.01)
    assert breaker.state == "half_open"
    assert breaker.acquire() is None


def test_successful_probes_close_it() -> None:
    breaker, clock = make(open_s=5.0, half_open_probes=3)
    open_it(breaker)
    clock.advance(5)
    permits = [breaker.acquire() for _ in range(3)]
    for i, p in enumerate(permits):
        assert p is not None
        breaker.record(p, True, 0.01)
        assert breaker.state == ("closed" if i == 2 else "half_open")
    # Closed again with a fresh window: one failure does not reopen it.
    assert call(breaker, False)
    assert breaker.state == "closed"


def test_failed_probes_open_it_again_for_another_open_s() -> None:
    breaker, clock = make(open_s=5.0, half_open_probes=3)
    open_it(breaker)
    clock.advance(5)
    permits = [breaker.acquire() for _ in range(3)]
    for p in permits:
        assert p is not None
        breaker.record(p, False, 0.01)
    assert breaker.state == "open"
    clock.advance(4.9)
    assert breaker.state == "open"
    clock.advance(0.1)
    assert breaker.state == "half_open"


def test_one_failed_probe_in_three_is_enough_to_reopen() -> None:
    breaker, clock = make(open_s=5.0, half_open_probes=3)  # threshold 0.2: 1/3 trips it
    open_it(breaker)
    clock.advance(5)
    outcomes = [True, False, True]
    for ok in outcomes:
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, ok, 0.01)
    assert breaker.state == "open"


def test_outcomes_with_a_stale_permit_are_ignored() -> None:
    breaker, clock = make(open_s=5.0, half_open_probes=2)
    stale = [breaker.acquire() for _ in range(10)]  # admitted while closed
    open_it(breaker)
    clock.advance(5)
    assert breaker.state == "half_open"
    # Late failures of calls admitted before the breaker opened say nothing about the half-open backend.
    for p in stale:
        assert p is not None
        breaker.record(p, False, 5.0)
    assert breaker.state == "half_open"
    probes = [breaker.acquire(), breaker.acquire()]
    assert breaker.acquire() is None  # the stale outcomes did not free probe slots either
    for p in probes:
        assert p is not None
        breaker.record(p, True, 0.01)
    assert breaker.state == "closed"
    # A stale success after closing does not count toward the new window.
    transitions = breaker.transitions
    for p in stale:
        assert p is not None
        breaker.record(p, True, 0.01)
    assert breaker.transitions == transitions


def test_release_frees_a_probe_slot_without_judging() -> None:
    breaker, clock = make(open_s=5.0, half_open_probes=3)
    open_it(breaker)
    clock.advance(5)
    permits = [breaker.acquire() for _ in range(3)]
    assert breaker.acquire() is None
    for p in permits:  # none of the three calls was made after all (e.g. the retry budget said no)
        assert p is not None
        breaker.release(p)
    assert breaker.state == "half_open"  # unmade calls prove nothing: still waiting for real probes
    fresh = [breaker.acquire() for _ in range(3)]
    assert None not in fresh and breaker.acquire() is None
    # A neutral "success" in their place would have closed it without the backend ever answering.
    for p in fresh:
        assert p is not None
        breaker.record(p, True, 0.0)
    assert breaker.state == "closed"


def test_release_in_closed_state_leaves_the_window_alone() -> None:
    breaker, _ = make(minimum_calls=20, window_size=20)
    for _ in range(16):
        call(breaker, True)
    for _ in range(3):
        call(breaker, False)
    for _ in range(100):
        permit = breaker.acquire()
        assert permit is not None
        breaker.release(permit)
    call(breaker, False)  # 4 of 20: the released permits did not dilute the failure rate
    assert breaker.state == "open"


def test_force_open() -> None:
    breaker, clock = make(open_s=2.0)
    breaker.force_open()
    assert breaker.state == "open" and breaker.acquire() is None
    clock.advance(2)
    assert breaker.state == "half_open"


@pytest.mark.parametrize("field", ["window_size", "minimum_calls", "half_open_probes"])
def test_settings_refuse_nonpositive_counts(field: str) -> None:
    with pytest.raises(ValueError):
        BreakerSettings(**{field: 0})  # type: ignore[arg-type]
