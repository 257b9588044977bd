"""CPU time readings of processes (serving/process.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from serving import process as cpu


def test_process_cpu_time_of_this_process() -> None:
    used = cpu.process_cpu_s(os.getpid())
    assert used is not None and used >= 0
    assert cpu.process_cpu_s(2**22 + 12345) is None  # beyond pid_max: no such process


def test_children_cpu_counts_a_reaped_child() -> None:
    user0, sys0 = cpu.children_cpu_s()
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(300_000))"], check=True, timeout=60)
    user1, sys1 = cpu.children_cpu_s()
    assert (user1 - user0) + (sys1 - sys0) > 0


def test_cpu_pressure_reads_the_some_total(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    psi.write_text("some avg10=1.82 avg60=4.98 avg300=11.72 total=155045520\n"
                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert cpu.cpu_pressure_s(psi) == 155.04552
    psi.write_text("garbage\n")
    assert cpu.cpu_pressure_s(psi) is None
    assert cpu.cpu_pressure_s(tmp_path / "missing") is None
