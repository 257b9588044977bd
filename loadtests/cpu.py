"""CPU time of processes, for reports that put a load generator's and each server's CPU beside throughput.

Linux only (``/proc``), as the benchmark machines are; a process that cannot be read gives None, never an error.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a live process (all its threads) from /proc/<pid>/stat; None where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state); the comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    """user + sys CPU of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_s() -> tuple[float, float]:
    """(user, sys) CPU of this process's children that have been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def cpu_pressure_s(path: Path = Path("/proc/pressure/cpu")) -> float | None:
    """Seconds, since boot, during which at least one runnable task waited for a core (Linux PSI "some" total).

    The difference over a run, divided by its length, says how crowded the cores were: the benchmark's own
    processes count, and so does anything else on a shared machine. None where PSI is not available.
    """
    try:
        for line in path.read_text().splitlines():
            if line.startswith("some "):
                fields = dict(part.split("=", 1) for part in line.split()[1:])
                return int(fields["total"]) / 1e6
    except (OSError, ValueError, KeyError):
        return None
    return None
