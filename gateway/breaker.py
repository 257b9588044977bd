"""A circuit breaker per backend, with resilience4j's semantics.

States (``state`` as the admin API shows it)::

    closed     calls flow; each outcome enters a count-based sliding window
    open       calls are refused for ``open_s``; the request goes to the other color
    half_open  ``half_open_probes`` calls are let through, the rest refused; their outcomes decide:
               failure rate (or slow rate) at/above the threshold → open again, else → closed

Rules: no verdict before ``minimum_calls`` outcomes are in the window; a timeout or a cancelled call counts as
a failure; an outcome from a call admitted before the last state change is ignored (it says nothing about the
new state). The clock is injected so every transition is tested without sleeping.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from gateway.settings import BreakerSettings

State = Literal["closed", "open", "half_open"]
STATE_CODES: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}  # bluegreen_breaker_state


class Breaker:
    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._state: State = "closed"
        self._generation = 0
        self._opened_at = 0.0
        # Sliding window of (failed, slow) outcomes, with running totals.
        self._window: deque[tuple[bool, bool]] = deque()
        self._failures = 0
        self._slow = 0
        self._probes_admitted = 0
        self.transitions = 0

    @property
    def state(self) -> State:
        if self._state == "open" and self._clock() - self._opened_at >= self.settings.open_s:
            self._transition("half_open")
        return self._state

    @property
    def settled_state(self) -> State:
        """The state as last set, without the move to half-open that reading :attr:`state` makes once ``open_s``
        has passed: what a watcher reads, so that watching never changes the breaker."""
        return self._state

    def acquire(self) -> int | None:
        """Ask to make a call: a permit (pass it to :meth:`record`) or None when the call is refused."""
        state = self.state
        if state == "closed":
            return self._generation
        if state == "half_open" and self._probes_admitted < self.settings.half_open_probes:
            self._probes_admitted += 1
            return self._generation
        return None

    def record(self, permit: int, ok: bool, duration_s: float) -> None:
        """The outcome of a call admitted with ``permit``."""
        if permit != self._generation:
            return  # admitted under an earlier state
        s = self.settings
        slow = duration_s >= s.slow_call_duration_s
        self._window.append((not ok, slow))
        self._failures += not ok
        self._slow += slow
        limit = s.window_size if self._state == "closed" else s.half_open_probes
        while len(self._window) > limit:
            old_failed, old_slow = self._window.popleft()
            self._failures -= old_failed
            self._slow -= old_slow
        n = len(self._window)
        if self._state == "closed":
            if n >= s.minimum_calls and self._tripped(n):
                self._transition("open")
        elif self._state == "half_open" and n >= s.half_open_probes:
            self._transition("open" if self._tripped(n) else "closed")

    def release(self, permit: int) -> None:
        """Give back a permit whose call was never made (e.g. the retry budget said no): judges nothing.

        In half-open the probe slot is returned, so another call can probe. Recording a neutral success instead
        would let calls that never happened close a half-open breaker; recording nothing would leave the slot
        taken and the breaker half-open, refusing everything, for good.
        """
        if permit == self._generation and self._state == "half_open":
            self._probes_admitted = max(0, self._probes_admitted - 1)

    def _tripped(self, n: int) -> bool:
        s = self.settings
        return self._failures / n >= s.failure_rate_threshold or self._slow / n >= s.slow_call_rate_threshold

    def _transition(self, state: State) -> None:
        self._state = state
        self._generation += 1
        self.transitions += 1
        self._window.clear()
        self._failures = self._slow = 0
        self._probes_admitted = 0
        if state == "open":
            self._opened_at = self._clock()

    def force_open(self) -> None:
        """Open now (used when a backend is known dead, e.g. a refused connection in half-open)."""
        self._transition("open")
