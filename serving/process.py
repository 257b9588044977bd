"""Child processes on loopback ports: start one with its log in a file, wait until it is ready while noticing if it
died, stop it (SIGTERM, then SIGKILL after a grace), and read its CPU time.

One helper for every place that runs our servers as children — ``bluegreen up``, ``bluegreen bench``,
``bluegreen validate`` and the tests — so that they all fail the same way: a child that exits during start-up is
reported at once with the tail of its log, instead of after a timeout or, worse, not at all. It lives in
``serving`` (the lowest layer) because every other package may import it.

CPU readings are Linux only (``/proc``), as the benchmark machines are; a process that cannot be read gives None,
never an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

LOOPBACK = "127.0.0.1"
LOG_TAIL_CHARS = 3000
_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class ChildFailed(RuntimeError):
    """A child exited, or was not ready in time, during start-up; the message carries its log's tail."""


# ------------------------------------------------------------------------------------------------------ ports


def free_port(host: str = LOOPBACK) -> int:
    """A port free on ``host`` now (the kernel's choice; released again before it is returned)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` distinct free ports (each probe releases its port, so two probes may agree: retried)."""
    ports: list[int] = []
    for _ in range(100 * count):
        port = free_port(host)
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"could not find {count} distinct free ports")


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (``"address already in use"``), or None when it can: checked by
    binding it, as the server that will listen there would (SO_REUSEADDR, as uvicorn sets it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


# ------------------------------------------------------------------------------------------------------ CPU


def process_cpu_s(pid: int | None) -> float | None:
    """utime + stime of a live process (all its threads) from /proc/<pid>/stat; None where unknown or unreadable."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state); the comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of the live direct children of ``pid`` (from /proc; zombies left out)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, IndexError, ValueError):
            continue
    return found


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


# ------------------------------------------------------------------------------------------------------ waiting


def wait_for(predicate: Callable[[], T], timeout_s: float, *, interval_s: float = 0.05,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns a truthy value (returned); TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def http_ok(url: str, timeout_s: float = 1.0) -> Callable[[], bool]:
    """A readiness probe: ``GET url`` answers 200."""

    def probe() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url, timeout=timeout_s).status_code == 200
        return False

    return probe


def redis_pong(port: int, host: str = LOOPBACK) -> Callable[[], bool]:
    """A readiness probe for ``redis-server``: it answers PING (it accepts connections while still loading)."""

    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    return probe


# ------------------------------------------------------------------------------------------------------ children


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ChildProcess:
    """One child, its stdout and stderr in ``log_path``, in a session of its own: a Ctrl-C in the terminal reaches
    only the parent, which then stops its children itself (and a SIGKILL reaches the child's whole group)."""

    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, args: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
              cwd: Path | None = None, append: bool = False, die_with_parent: bool = False) -> ChildProcess:
        """Start ``args``; ``env`` replaces the environment when given; ``die_with_parent``: the kernel sends the
        child SIGTERM if this process dies (PR_SET_PDEATHSIG), so none is left behind."""
        with log_path.open("ab" if append else "wb") as log:
            popen = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                     env=None if env is None else dict(env), start_new_session=True,
                                     preexec_fn=_die_with_parent if die_with_parent else None)
        return cls(name, list(args), log_path, popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log()[-chars:]

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.popen.pid)

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float, *, interval_s: float = 0.05,
                   cancelled: Callable[[], bool] | None = None) -> bool:
        """Poll ``ready`` until it says yes (True); ChildFailed, with the log's tail, if the child exits or takes
        longer than ``timeout_s``. False when ``cancelled`` says to give up (a Ctrl-C being handled)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if cancelled is not None and cancelled():
                return False
            if self.popen.poll() is not None:
                raise ChildFailed(f"the {self.name} exited with status {self.popen.returncode} during start-up "
                                  f"(log {self.log_path}):\n{self.log_tail()}")
            if ready():
                return True
            if time.monotonic() > deadline:
                raise ChildFailed(f"the {self.name} was not ready after {timeout_s:.0f}s (log {self.log_path}):\n"
                                  f"{self.log_tail()}")
            time.sleep(interval_s)

    def terminate(self) -> None:
        """SIGTERM, if still running (the start of a graceful stop: see :meth:`stop`)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL to the child's whole process group after ``grace_s``; the exit status."""
        self.terminate()
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        return self.popen.returncode
