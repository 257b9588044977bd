"""serving/lifecycle.py ``Periodic`` and ``FailureStreak`` (one traceback per failure streak, not one per round), and
``Background`` (fire-and-forget tasks held until they end)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from serving.lifecycle import Background, FailureStreak, Periodic
from tests.gateway.support import FakeClock


def records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "serving.lifecycle" and r.getMessage().startswith(name)]


async def test_an_outage_logs_one_traceback_then_one_line_with_the_count_when_it_recovers(
        caplog: pytest.LogCaptureFixture) -> None:
    rounds = 0
    fifty = asyncio.Event()

    async def work() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 50:
            fifty.set()
        if 3 <= rounds <= 42:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    caplog.set_level(logging.INFO, logger="serving.lifecycle")
    loop = Periodic("publisher", 0.001, work, first_after_s=0.0)
    loop.start()
    await asyncio.wait_for(fifty.wait(), 10)
    await loop.stop()
    assert rounds >= 50
    lines = records(caplog, "publisher")
    assert len(lines) == 2, [r.getMessage() for r in lines]
    first, recovered = lines
    assert first.levelno == logging.ERROR and first.exc_info is not None
    assert "ConnectionError: Error 111 connecting" in first.getMessage()
    assert recovered.levelno == logging.WARNING and recovered.exc_info is None
    assert "recovered after 40 failures" in recovered.getMessage()
    assert loop.streak.failures == 0


def test_a_long_streak_reminds_without_a_traceback_and_a_new_streak_starts_with_one(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    streak = FailureStreak("lease", remind_s=60.0, clock=clock)
    caplog.set_level(logging.INFO, logger="serving.lifecycle")
    for _ in range(1000):  # 250 s of rounds every 0.25 s
        streak.failed(TimeoutError("Timeout reading from socket"))
        clock.advance(0.25)
    streak.succeeded()
    streak.succeeded()  # nothing more to say
    lines = records(caplog, "lease")
    assert [r.exc_info is not None for r in lines] == [True] + [False] * 5  # reminders at 60, 120, 180, 240 s
    assert [r.getMessage().split(":")[0] for r in lines[1:5]] == ["lease still failing"] * 4
    assert "still failing: 241 failures in 60 s, the last: TimeoutError: Timeout reading" in lines[1].getMessage()
    assert lines[-1].getMessage() == "lease recovered after 1000 failures in 250.0 s"
    caplog.clear()
    streak.failed(OSError())
    streak.succeeded()
    lines = records(caplog, "lease")
    assert [r.exc_info is not None for r in lines] == [True, False]
    assert "lease failed: OSError" in lines[0].getMessage()
    assert lines[1].getMessage() == "lease recovered after 1 failure in 0.0 s"


async def test_background_tasks_are_kept_until_they_end_and_their_failures_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> None:
        raise RuntimeError("redis away")

    gate = asyncio.Event()
    tasks = Background("a background write failed", logging.WARNING)
    tasks.spawn(gate.wait())
    tasks.spawn(fail())
    assert len(tasks) == 2
    await tasks.wait(0.05)  # bounded: returns with the waiter still under way
    assert len(tasks) == 1, "the failed one ended; the waiting one is still held"
    assert "a background write failed: redis away" in caplog.text
    gate.set()
    await tasks.wait(1.0)
    assert len(tasks) == 0
