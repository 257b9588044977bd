"""Process lifecycle shared by the model server and the gateway: graceful stop on SIGTERM/SIGINT, exit 0.

uvicorn stops accepting and lets in-flight requests finish on SIGTERM, but then re-raises the signal so the
process dies *by* it (status -15). Kubernetes and ``bluegreen up`` read a clean drain as exit 0, so the
signal is handled here and not re-raised. Several uvicorn servers (the gateway's data and admin listeners)
share one loop and stop together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Protocol

import uvicorn

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose signal handling ends in a normal return instead of a re-raised signal.

    With ``manage_signals=False`` it installs no handlers at all: :func:`serve_together` owns them.
    """

    def __init__(self, config: uvicorn.Config, *, manage_signals: bool = True) -> None:
        super().__init__(config)
        self.manage_signals = manage_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if not self.manage_signals or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Server(Protocol):
    """What :func:`serve_together` needs of a server: uvicorn's and ``serving.http_server``'s both fit."""

    should_exit: bool

    async def serve(self) -> None: ...

    def handle_exit(self, sig: int, frame: Any) -> None: ...


async def serve_together(servers: Sequence[Server]) -> None:
    """Run several servers (built with ``manage_signals=False``) on this loop until a signal or until any
    one of them stops; then all of them drain and stop."""
    loop = asyncio.get_running_loop()

    def stop_all(sig: int) -> None:
        for s in servers:
            s.handle_exit(sig, None)

    for sig in HANDLED_SIGNALS:
        loop.add_signal_handler(sig, stop_all, sig)
    try:
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for s in servers:
            s.should_exit = True
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            t.result()
    finally:
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)


def tune_gc() -> None:
    """Fewer, cheaper full collections. Measured under load: ~2 full collections a second at 33-54 ms each
    (7-8% of the gateway's time, and its p99 tail). Start-up objects are frozen out of the collector's view
    and the thresholds raised, so young garbage is still collected often but the full sweeps are rare."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


class Background:
    """Fire-and-forget tasks (writes to Redis off a request's path): each kept until it ends — a task nobody
    holds may be collected mid-flight — and its failure logged with ``what`` at ``level``. The caller bounds
    them (``len``) and may wait for the ones under way."""

    def __init__(self, what: str, level: int = logging.WARNING, logger: logging.Logger = log) -> None:
        self.what = what
        self.level = level
        self.logger = logger
        self.tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self.tasks)

    def spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.logger.log(self.level, "%s: %s", self.what, task.exception())

    async def wait(self, timeout_s: float) -> None:
        """Until the tasks under way now end, for ``timeout_s`` at most."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout_s)


class FailureStreak:
    """Logs the failures of one repeated task as streaks: the first failure of a streak with its traceback,
    then nothing per failure — only a one-line reminder every ``remind_s`` while it lasts — and one line with
    the count when the task succeeds again. A Redis outage made every background round log a whole traceback
    (1,586 lines in 20 s), which buried the one line that mattered and cost CPU while the gateway was busy."""

    def __init__(self, name: str, *, remind_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.name = name
        self.remind_s = remind_s
        self.clock = clock
        self.logger = logger
        self.failures = 0
        """Failures in the current streak (0: the last attempt succeeded)."""
        self._since = 0.0
        self._reminded = 0.0

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.failures += 1
        if self.failures == 1:
            self._since = self._reminded = now
            self.logger.error("%s failed: %s (further failures are counted, not logged, until it recovers)",
                              self.name, _summary(exc), exc_info=exc)
        elif now - self._reminded >= self.remind_s:
            self._reminded = now
            self.logger.error("%s still failing: %d failures in %.0f s, the last: %s", self.name, self.failures,
                              now - self._since, _summary(exc))

    def succeeded(self) -> None:
        if self.failures:
            self.logger.warning("%s recovered after %d failure%s in %.1f s", self.name, self.failures,
                                "" if self.failures == 1 else "s", self.clock() - self._since)
            self.failures = 0


def _summary(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Periodic:
    """A background loop: ``work()`` every ``interval_s`` on the running loop until :meth:`stop`. A failing
    round is logged as part of a :class:`FailureStreak` and the loop goes on: one bad round must not end a
    controller, a lease or a refresher, and an outage must not log a traceback per round."""

    def __init__(self, name: str, interval_s: float, work: Callable[[], Awaitable[None]], *,
                 first_after_s: float | None = None, streak: FailureStreak | None = None) -> None:
        self.name = name
        self.interval_s = interval_s
        self.work = work
        self.first_after_s = interval_s if first_after_s is None else first_after_s
        self.streak = streak or FailureStreak(f"{name}: background round")
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            # The flag ends the loop even where a library swallows the cancellation (redis-py's pub/sub did).
            self._stopping = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        await asyncio.sleep(self.first_after_s)
        while not self._stopping:
            try:
                await self.work()
            except Exception as exc:
                self.streak.failed(exc)
            else:
                self.streak.succeeded()
            await asyncio.sleep(self.interval_s)
