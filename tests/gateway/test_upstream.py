"""gateway/upstream.py: balancing within a color — least outstanding, ties in turn, open breakers skipped."""

from __future__ import annotations

from collections import Counter

from gateway.settings import BreakerSettings
from gateway.upstream import ColorPool

URLS = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]


def pool() -> ColorPool:
    return ColorPool(list(URLS), BreakerSettings(window_size=4, minimum_calls=4, open_s=60))


def test_the_least_loaded_backend_is_picked() -> None:
    p = pool()
    p.backends[0].outstanding, p.backends[1].outstanding, p.backends[2].outstanding = 3, 1, 2
    for _ in range(5):
        picked = p.pick()
        assert picked is not None and picked[0].url == URLS[1]
        picked[0].breaker.record(picked[1], True, 0.001)


def test_idle_backends_take_turns() -> None:
    """Sequential requests (nothing outstanding) spread over every backend, not always the first one."""
    p = pool()
    seen: Counter[str] = Counter()
    for _ in range(30):
        picked = p.pick()
        assert picked is not None
        backend, permit = picked
        seen[backend.url] += 1
        backend.breaker.record(permit, True, 0.001)
    assert seen == {u: 10 for u in URLS}


def test_a_backend_with_an_open_breaker_is_skipped() -> None:
    p = pool()
    dead = p.backends[1]
    for _ in range(4):
        permit = dead.breaker.acquire()
        assert permit is not None
        dead.breaker.record(permit, False, 0.001)
    assert dead.breaker.state == "open"
    picks = []
    for _ in range(10):
        picked = p.pick()
        assert picked is not None
        picks.append(picked[0].url)
        picked[0].breaker.record(picked[1], True, 0.001)
    assert URLS[1] not in picks and set(picks) == {URLS[0], URLS[2]}


def test_none_when_every_breaker_refuses() -> None:
    p = pool()
    for b in p.backends:
        for _ in range(4):
            permit = b.breaker.acquire()
            assert permit is not None
            b.breaker.record(permit, False, 0.001)
    assert p.pick() is None
