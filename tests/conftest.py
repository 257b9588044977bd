"""Shared test set-up. Under CI=true no test may be skipped: a skip there means a part was not exercised."""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import subprocess
import time
from collections.abc import Generator
from pathlib import Path

import pluggy
import pytest

from models.build import DEFAULT_REPOSITORY, build_all


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _send_turns(session.config)
    for turns in _TURNS.values():
        turns.close()
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped:
        if reporter is not None:
            reporter.write_line(f"CI=true: {skipped} test(s) were skipped; every test must run in CI", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def model_repo(request: pytest.FixtureRequest) -> os.PathLike[str]:
    """The default repository with every bundled model built (idempotent: only missing ones are built).

    Session-scoped, so each xdist worker runs it once: a file lock makes the first one build and the others wait
    and then find the models current (two builders would write the same ``model.onnx.tmp``)."""
    folder = _run_dir(request.config)
    if folder is None:
        build_all(DEFAULT_REPOSITORY)
    else:
        with open(folder / "build-models.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            build_all(DEFAULT_REPOSITORY)
    return DEFAULT_REPOSITORY


# --------------------------------------------------------------------- parallel runs (pytest-xdist workers)


def _run_dir(config: pytest.Config) -> Path | None:
    """The folder every xdist worker of this run shares (the controller's basetemp: each worker's own is a
    ``popen-gwN`` folder inside it), or None outside a worker: a serial run has no one to coordinate with."""
    if not hasattr(config, "workerinput"):
        return None
    return Path(config.option.basetemp).parent


class _Turns:
    """A readers-writer lock across the workers: every test holds ``tests.lock`` shared, an ``exclusive`` test
    holds it alone. ``flock`` alone would let a stream of overlapping shared holders starve a waiting exclusive
    one, so each taker first passes a turnstile (``turnstile.lock``, held only while taking the main lock): a
    waiting exclusive test keeps the turnstile, and the other worker's next test queues behind it.

    Unlocked explicitly rather than by closing: a lock belongs to the open file, and a child forked during a
    test would otherwise keep it."""

    def __init__(self, folder: Path) -> None:
        self.gate = open(folder / "turnstile.lock", "a")  # open for the worker's life
        self.main = open(folder / "tests.lock", "a")
        self.held: int | None = None
        self.waited_s = self.alone_s = 0.0  # what the lock cost this worker, for the run's summary line
        self.exclusive_tests = 0
        self._alone_since = 0.0

    def take(self, mode: int) -> None:
        if self.held == mode:
            return
        self.release()
        started = time.monotonic()
        fcntl.flock(self.gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.main, mode)
        finally:
            fcntl.flock(self.gate, fcntl.LOCK_UN)
        self._alone_since = time.monotonic()
        self.waited_s += self._alone_since - started
        self.held = mode

    def close(self) -> None:
        """At the worker's end: the lock files closed (after the last unlock)."""
        self.release()
        self.gate.close()
        self.main.close()

    def release(self) -> None:
        if self.held is not None:
            fcntl.flock(self.main, fcntl.LOCK_UN)
            if self.held == fcntl.LOCK_EX:
                self.alone_s += time.monotonic() - self._alone_since
            self.held = None


_TURNS: dict[Path, _Turns] = {}


def _exclusive(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker("exclusive") is not None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """Under xdist, a test marked ``exclusive`` (its assertions are about time or rates) runs while no other
    worker runs a test; the others share. The whole protocol is covered — set-up, call and teardown — since
    module fixtures start and stop their servers inside the first and last test's set-up and teardown, and that
    load is what an exclusive test must not see. Outermost (``tryfirst``), so that the wait for the lock does
    not count against the test's own timeout.

    A shared hold ends with its test, so that a waiting exclusive test gets in at the next boundary; an
    exclusive hold carries on into the next test when that one is exclusive too (a file's run of them), rather
    than queueing again behind whatever the other worker started meanwhile."""
    folder = _run_dir(item.config)
    if folder is None:
        yield
        return
    turns = _TURNS.get(folder) or _TURNS.setdefault(folder, _Turns(folder))
    exclusive = _exclusive(item)
    turns.take(fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    turns.exclusive_tests += exclusive
    try:
        yield
    finally:
        if not (exclusive and _exclusive(nextitem)):
            turns.release()


# Where the files that start real processes live: seconds a file rather than milliseconds.
_HEAVY_FIRST = ("tests/integration/", "tests/models/", "tests/k8s/")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the heavy directories' files go first (``--no-loadscope-reorder`` makes the scheduler keep
    this order): the long files start early and the many short unit-test files fill in at the end, so the two
    workers finish together. xdist's own order (most tests first) puts the long files, which have few tests,
    last, where the two workers' busy times came out 35 s apart. A serial run keeps the collection order."""
    if _run_dir(config) is None:
        return

    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return next((i for i, d in enumerate(_HEAVY_FIRST) if path.startswith(d)), len(_HEAVY_FIRST))

    items.sort(key=rank)  # stable: a file's tests keep their order


_TURNS_KEY = "bluegreen_turns"
_TURNS_SEEN: list[tuple[float, float, int]] = []


def _send_turns(config: pytest.Config) -> None:
    """A worker's lock figures go to the controller in xdist's ``workeroutput``."""
    output = getattr(config, "workeroutput", None)
    if output is not None and _TURNS:
        output[_TURNS_KEY] = [(t.waited_s, t.alone_s, t.exclusive_tests) for t in _TURNS.values()]


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent under -p no:xdist
def pytest_testnodedown(node: object, error: object) -> None:
    _TURNS_SEEN.extend(tuple(t) for t in getattr(node, "workeroutput", {}).get(_TURNS_KEY, []))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line on what running tests alone cost the run: the time exclusive tests held the lock (the other
    worker idle) and the time workers waited to take it. Which tests to mark is a trade against these."""
    if _TURNS_SEEN:
        waited, alone, count = (sum(column) for column in zip(*_TURNS_SEEN, strict=True))
        terminalreporter.write_line(f"xdist lock: {count:.0f} exclusive test(s) ran alone for {alone:.0f} s; "
                                    f"workers waited {waited:.0f} s in all to take the lock")


_LOG_TAIL_LINES = 40
_LOG_FILES_SHOWN = 8


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed test that ran real processes shows the end of their logs (the ``*.log`` files under its
    ``tmp_path``, where tests/procs.py writes them): the gateway's traceback or a model server's refusal is
    usually the reason, and the temporary folder is gone or hard to find by the time someone reads the failure."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call":
        return
    item.stash[_CALL_FAILED] = report.failed
    if not report.failed:
        return
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if tmp is None:
        return
    logs = sorted(Path(tmp).glob("**/*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for log in logs[:_LOG_FILES_SHOWN]:
        lines = log.read_text(errors="replace").splitlines()
        if lines:
            report.sections.append((f"{log.name}, last {_LOG_TAIL_LINES} lines", "\n".join(lines[-_LOG_TAIL_LINES:])))


def _children() -> dict[int, str]:
    """pid -> command line of this process's children, zombies included (a zombie's ``Popen`` still warns when
    collected). Read from ``/proc/self/task/*/children``: a fraction of a millisecond, where a scan of /proc
    for parent ids takes milliseconds — this runs around every test."""
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            pids.update(int(p) for p in Path(f"/proc/self/task/{tid}/children").read_text().split())
        except OSError:
            continue
    found = {}
    for pid in pids:
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            found[pid] = "(exited)"
    return found


_CHILDREN_BEFORE = pytest.StashKey[set[int]]()
_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    item.stash[_CHILDREN_BEFORE] = set(_children())  # after set-up: module fixtures' processes are in it
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, pluggy.Result[None], None]:
    """A process the test started and left running after its teardown is stopped here, and the test errors
    naming it (unless it failed already: then its own failure is the story, and this only cleans up).

    Left alone it would run on through the rest of the session, and its ``Popen`` object, collected during some
    later test, raises "subprocess N is still running" there (warnings are errors): a failure in an innocent
    test. The usual cause is a test whose set-up of a later process failed before its ``try``/``finally``.
    Checked after teardown, so that a process a test starts and its fixture stops is not counted."""
    outcome = yield
    before = item.stash.get(_CHILDREN_BEFORE, None)
    if before is None:  # the set-up failed: the call never ran
        return
    leaked = {pid: cmd for pid, cmd in _children().items() if pid not in before}
    if not leaked:
        return
    _stop(leaked)
    if outcome.exception is None and not item.stash.get(_CALL_FAILED, False):
        named = "; ".join(f"{pid}: {cmd.strip()[:200]}" for pid, cmd in leaked.items())
        outcome.force_exception(AssertionError(f"the test left processes running (stopped now): {named}"))


def _stop(pids: dict[int, str]) -> None:
    """SIGTERM to each process and its group (tests/procs.py starts each child in its own session), then
    SIGKILL; the ``Popen`` objects learn the exit status, so that collecting them later warns of nothing."""
    popens = [o for o in gc.get_objects() if isinstance(o, subprocess.Popen) and o.pid in pids]
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGTERM)
            except OSError:
                pass
    for popen in popens:
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)
