"""gateway/windows.py: quantiles against numpy, exact merges, slot expiry on a fake clock, rates."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.windows import GROWTH, MIN_LATENCY_S, Snapshot, Window, bucket_of, bucket_value, merge_all
from tests.gateway.support import FakeClock


def lognormal(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.lognormal(mean=np.log(0.02), sigma=0.8, size=n)  # median 20 ms, long tail


def test_bucket_value_is_within_one_percent_of_every_latency_in_the_bucket() -> None:
    for latency in np.geomspace(MIN_LATENCY_S * 1.0001, 100.0, 5000):
        assert abs(bucket_value(bucket_of(float(latency))) / latency - 1) <= GROWTH**0.5 - 1 + 1e-9
    assert bucket_of(0.0) == 0 and bucket_of(MIN_LATENCY_S) == 0 and bucket_value(0) == MIN_LATENCY_S


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantiles_within_one_percent_of_numpy(seed: int) -> None:
    clock = FakeClock()
    window = Window(60, 5, clock)
    latencies = lognormal(seed, 20_000)
    for x in latencies:
        window.record(float(x), True)
    snap = window.snapshot()
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        # The window reports the sample at rank ceil(q·n), numpy's "inverted_cdf" quantile. (np.quantile, not
        # np.percentile: 99.9 / 100 rounds to a hair above 0.999, which moves the rank by one in the tail.)
        expected = float(np.quantile(latencies, q, method="inverted_cdf"))
        got = snap.quantile(q)
        assert got is not None
        assert abs(got / expected - 1) < 0.01, (q, got, expected)
        # ...and close to numpy's default (interpolated) percentile too, with this many samples.
        assert abs(got / float(np.percentile(latencies, q * 100)) - 1) < 0.02


def test_quantile_without_data_is_none() -> None:
    snap = Window(60, 5, FakeClock()).snapshot()
    assert snap.quantile(0.5) is None
    assert snap.as_json() == {"count": 0, "errors": 0, "error_rate": 0.0, "p50_ms": None, "p95_ms": None,
                              "p99_ms": None, "rps": 0.0, "window_s": 60}


def test_merge_of_two_windows_equals_one_window_fed_both_streams() -> None:
    clock = FakeClock()
    a, b, both = Window(60, 5, clock), Window(60, 5, clock), Window(60, 5, clock)
    rng = np.random.default_rng(11)
    for i, (x, y) in enumerate(zip(lognormal(4, 3000), lognormal(5, 2000), strict=False)):
        clock.now += 0.01  # spread over several slots
        ok_x, ok_y = bool(rng.random() > 0.05), bool(rng.random() > 0.2)
        a.record(float(x), ok_x)
        both.record(float(x), ok_x)
        if i < 2000:
            b.record(float(y), ok_y)
            both.record(float(y), ok_y)
    merged = a.snapshot().merge(b.snapshot())
    expected = both.snapshot()
    assert merged.buckets == expected.buckets  # exact, bucket by bucket
    assert (merged.count, merged.errors, merged.span_s) == (expected.count, expected.errors, expected.span_s)
    assert merged.as_json() == expected.as_json()
    assert merge_all([a.snapshot(), b.snapshot()]) == merged
    assert merge_all([]).count == 0


def test_merge_does_not_modify_its_operands() -> None:
    x = Snapshot(60, 2, 1, {3: 2})
    y = Snapshot(60, 1, 0, {3: 1, 4: 0})
    x.merge(y)
    assert x == Snapshot(60, 2, 1, {3: 2}) and y == Snapshot(60, 1, 0, {3: 1, 4: 0})


def test_slots_expire_after_the_span() -> None:
    clock = FakeClock(1000.0)
    window = Window(span_s=60, slot_s=5, clock=clock)
    window.record(0.01, True)
    clock.now = 1030.0
    window.record(0.02, False)
    assert window.snapshot().count == 2
    clock.now = 1059.9
    assert window.snapshot().count == 2  # the first slot [1000, 1005) is still inside the span
    clock.now = 1060.0
    snap = window.snapshot()
    assert (snap.count, snap.errors) == (1, 1)  # it has aged out; the second has not
    clock.now = 1090.0
    assert window.snapshot().count == 0
    # A slot reused by a later lap of the ring starts from zero.
    window.record(0.03, True)
    assert window.snapshot().count == 1


def test_snapshot_of_a_shorter_span() -> None:
    clock = FakeClock(1000.0)
    window = Window(60, 5, clock)
    for t in range(0, 60, 5):
        clock.now = 1000.0 + t
        window.record(0.01, True)
    assert window.snapshot().count == 12
    assert window.snapshot(10).count == 2  # the current slot and the one before
    assert window.snapshot(10).span_s == 10


def test_error_rate_and_rps() -> None:
    clock = FakeClock(1000.0)
    window = Window(60, 5, clock)
    for i in range(600):
        clock.now = 1000.0 + i * 0.1  # 10 per second for 60 s
        window.record(0.01, i % 4 != 0)
    snap = window.snapshot()
    assert snap.count == 600 and snap.errors == 150
    assert snap.error_rate == pytest.approx(0.25)
    assert snap.rps == pytest.approx(10.0)
    doc = snap.as_json()
    assert doc["error_rate"] == 0.25 and doc["rps"] == 10.0 and doc["p50_ms"] == pytest.approx(10.0, rel=0.01)


def test_window_validates_its_shape() -> None:
    with pytest.raises(ValueError):
        Window(span_s=1, slot_s=5)
    with pytest.raises(ValueError):
        Window(span_s=60, slot_s=0)
    assert Window(span_s=61, slot_s=5).span_s == 65  # rounded up to whole slots


def test_requests_over_a_watched_threshold_are_counted_exactly() -> None:
    """The canary's latency trigger is a proportion over a stage: the count over the policy's threshold must be
    exact, which a 2% bucket cannot give (120 ms and 121 ms share one)."""
    window = Window(60, 5, FakeClock())
    for latency in (0.119, 0.12, 0.1201, 0.121, 0.5, 0.01):  # strictly slower than 120 ms: three
        window.record(latency, True)
    assert bucket_of(0.1201) == bucket_of(0.121)
    assert window.over(120.0) == (6, 3)
    assert window.over(100.0) is None
    window.watch(100.0)  # a rollout's own threshold: counted from now on, with its own count of timed requests
    window.record(0.11, False)
    assert window.over(100.0) == (1, 1) and window.over(120.0) == (7, 3)
    assert window.watched() == {"120.0": [7, 3], "100.0": [1, 1]}
    for ms in range(200, 220):  # bounded: the default threshold stays, the oldest other ones go
        window.watch(float(ms))
    assert len(window.watched()) == 8 and window.over(120.0) == (7, 3)
