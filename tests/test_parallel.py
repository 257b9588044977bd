"""tests/conftest.py's lock across xdist workers: a test marked ``exclusive`` runs while no other worker runs a
test, and the unmarked ones still run side by side.

A small suite is generated in a temporary folder and run by pytest on two workers (a child process, as the real
suite is run), with tests/conftest.py's hook as its only plugin. Each inner test writes the interval it ran in;
the intervals are then checked for overlaps. The inner tests hold for a fraction of a second: that is the work
whose overlap is under test, not a wait for a condition.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.procs import ROOT

INNER = '''
import os, time, pytest

def record(name):
    started = time.monotonic()
    time.sleep(0.2)
    with open(os.environ["INTERVALS"], "a") as f:
        f.write(f"{name} {os.environ['PYTEST_XDIST_WORKER']} {started} {time.monotonic()}\\n")
'''


def test_an_exclusive_test_overlaps_no_other_and_shared_tests_overlap_each_other(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers = exclusive: runs alone\n")
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_protocol  # noqa: F401\n")
    (tmp_path / "inner.py").write_text(INNER)
    (tmp_path / "test_a.py").write_text(
        "import pytest\nfrom inner import record\n\n"
        "@pytest.mark.parametrize('i', range(6))\ndef test_shared(i): record(f'a{i}')\n\n"
        "@pytest.mark.exclusive\ndef test_alone(): record('exclusive-a')\n\n"
        "@pytest.mark.exclusive\ndef test_alone_too(): record('exclusive-a2')\n\n"  # held on from the one before
        "@pytest.mark.parametrize('i', range(3))\ndef test_after(i): record(f'a-after{i}')\n")
    (tmp_path / "test_b.py").write_text(
        "import pytest\nfrom inner import record\n\n"
        "@pytest.mark.parametrize('i', range(8))\ndef test_shared(i): record(f'b{i}')\n\n"
        "@pytest.mark.exclusive\ndef test_alone(): record('exclusive-b')\n")
    intervals = tmp_path / "intervals.txt"
    env = {**os.environ, "INTERVALS": str(intervals), "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                          "loadfile", "--basetemp", str(tmp_path / "base")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split() for line in intervals.read_text().splitlines()]
    ran = [(name, worker, float(start), float(end)) for name, worker, start, end in rows]
    assert len(ran) == 20 and {worker for _, worker, _, _ in ran} == {"gw0", "gw1"}, ran

    def overlapping(name: str) -> list[str]:
        _, worker, start, end = next(r for r in ran if r[0] == name)
        return [n for n, w, s, e in ran if w != worker and s < end and start < e]

    assert [overlapping(name) for name in ("exclusive-a", "exclusive-a2", "exclusive-b")] == [[], [], []], ran
    # The lock is not a plain mutex: unmarked tests of the two files did run at the same time.
    assert any(overlapping(name) for name, _, _, _ in ran if not name.startswith("exclusive")), ran
