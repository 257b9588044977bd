"""serving/process.py: the one helper that starts, waits for, stops and measures child processes, on real
children (short Python programs)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from serving.process import (
    ChildFailed,
    ChildProcess,
    children_of,
    free_port,
    free_ports,
    port_taken,
    process_alive,
    wait_for,
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_exits_during_start_up_fails_at_once_with_its_log_tail(tmp_path: Path) -> None:
    child = ChildProcess.start("doomed", python("import sys; print('cannot bind 1234'); sys.exit(3)"),
                               tmp_path / "doomed.log")
    started = time.monotonic()
    with pytest.raises(ChildFailed, match=r"(?s)the doomed exited with status 3.*cannot bind 1234"):
        child.wait_ready(lambda: False, 60)
    assert time.monotonic() - started < 30  # noticed when it died, not at the timeout


def test_a_child_not_ready_in_time_fails_naming_the_wait_and_is_still_stoppable(tmp_path: Path) -> None:
    child = ChildProcess.start("sleeper", python("import time; print('starting', flush=True); time.sleep(60)"),
                               tmp_path / "sleeper.log")
    try:
        child.wait_ready(lambda: "starting" in child.log(), 30)
        with pytest.raises(ChildFailed, match=r"(?s)not ready after 1s.*starting"):
            child.wait_ready(lambda: False, 1.0)
    finally:
        assert child.stop(5) == -signal.SIGTERM
    assert not child.alive()


def test_wait_ready_returns_when_ready_and_gives_up_when_cancelled(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    child = ChildProcess.start("writer", python(f"import time, pathlib; pathlib.Path({str(marker)!r}).touch(); "
                                                "time.sleep(60)"), tmp_path / "writer.log")
    try:
        assert child.wait_ready(marker.exists, 30) is True
        assert child.wait_ready(lambda: False, 30, cancelled=lambda: True) is False
        used = child.cpu_s()
        assert used is not None and used >= 0
    finally:
        child.stop(5)


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed', flush=True); "
            "time.sleep(60)")
    child = ChildProcess.start("stubborn", python(code), tmp_path / "stubborn.log")
    child.wait_ready(lambda: "armed" in child.log(), 30)
    started = time.monotonic()
    assert child.stop(0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_the_environment_given_replaces_this_one_and_the_log_appends_when_asked(tmp_path: Path) -> None:
    log = tmp_path / "env.log"
    log.write_text("earlier run\n")
    child = ChildProcess.start("env", python("import os; print(sorted(k for k in os.environ if k.startswith('BG_')))"),
                               log, env={"BG_ONLY": "1", "PATH": os.environ.get("PATH", "")}, append=True)
    assert child.popen.wait(30) == 0
    assert child.log() == "earlier run\n['BG_ONLY']\n"


def test_ports_free_taken_and_distinct() -> None:
    assert len(set(free_ports(5))) == 5
    port = free_port()
    assert port_taken("127.0.0.1", port) is None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        assert port_taken("127.0.0.1", port) is not None


def test_children_of_and_alive(tmp_path: Path) -> None:
    child = ChildProcess.start("sleeper", python("import time; time.sleep(60)"), tmp_path / "c.log")
    try:
        assert child.pid in children_of(os.getpid())
        assert process_alive(child.pid)
    finally:
        child.stop(5)
    assert not process_alive(child.pid)


def test_wait_for_returns_the_value_or_times_out() -> None:
    values = iter([0, None, 7])
    assert wait_for(lambda: next(values), 10, interval_s=0.01) == 7
    with pytest.raises(TimeoutError, match="the impossible"):
        wait_for(lambda: False, 0.05, interval_s=0.01, what="the impossible")
