"""Shared test set-up. Under CI=true no test may be skipped: a skip there means a part was not exercised."""

from __future__ import annotations

import os

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
