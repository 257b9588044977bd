"""Shared test set-up. Under CI=true no test may be skipped: a skip there means a part was not exercised."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.build import DEFAULT_REPOSITORY, build_all


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped:
        if reporter is not None:
            reporter.write_line(f"CI=true: {skipped} test(s) were skipped; every test must run in CI", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def model_repo() -> os.PathLike[str]:
    """The default repository with every bundled model built (idempotent: only missing ones are built)."""
    build_all(DEFAULT_REPOSITORY)
    return DEFAULT_REPOSITORY


_LOG_TAIL_LINES = 40
_LOG_FILES_SHOWN = 8


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed test that ran real processes shows the end of their logs (the ``*.log`` files under its
    ``tmp_path``, where tests/procs.py writes them): the gateway's traceback or a model server's refusal is
    usually the reason, and the temporary folder is gone or hard to find by the time someone reads the failure."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if tmp is None:
        return
    logs = sorted(Path(tmp).glob("**/*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    for log in logs[:_LOG_FILES_SHOWN]:
        lines = log.read_text(errors="replace").splitlines()
        if lines:
            report.sections.append((f"{log.name}, last {_LOG_TAIL_LINES} lines", "\n".join(lines[-_LOG_TAIL_LINES:])))
