"""Headless locust (``loadtests/locustfile.py``) against ``bluegreen up``: no failures, and none when green dies.

Locust runs as its own process (it patches the standard library with gevent, which must never happen inside
pytest). Each run lasts 30 s, as the issue asks.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_up import children_of, start_up
from tests.procs import ADMIN_TOKEN, ROOT, Proc, admin_headers, free_port, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")

RUN_TIME_S = 15  # 10 users at ~5 requests/s each: ~700 requests, green past 100 successes within ~4 s
LOCUST_TIMEOUT_S = RUN_TIME_S + 60  # start-up, the ramp and the final report on a busy 2-core machine


class Stack:
    def __init__(self, proc: Proc, ports: dict[str, int]) -> None:
        self.proc, self.ports = proc, ports
        self.data = f"http://127.0.0.1:{ports['data']}"
        self.admin = f"http://127.0.0.1:{ports['admin']}"

    def attempts(self, color: str, outcome: str) -> float:
        """Upstream attempts so far by ``color`` with ``outcome`` (success|error): a counter, never slides."""
        text = httpx.get(f"{self.admin}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("bluegreen_upstream_duration_seconds_count{")
                   and f'color="{color}"' in line and f'outcome="{outcome}"' in line)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("up")
    ports = {k: free_port() for k in ("data", "admin", "blue", "green")}
    proc = start_up(tmp, ports)
    try:
        yield Stack(proc, ports)
    finally:
        proc.stop()


def locust(stack: Stack, out: Path, *, operator: bool,
           extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start the documented headless run; with ``operator`` the admin user shifts weights as it goes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")} | (extra_env or {})
    if operator:
        env |= {"BLUEGREEN_ADMIN_TOKEN": ADMIN_TOKEN, "BLUEGREEN_ADMIN_URL": stack.admin,
                "BLUEGREEN_LOCUST_OPERATOR_WAIT_S": "1,3"}
    args = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless", "-u", "10", "-r", "5",
            "-t", f"{RUN_TIME_S}s", "--host", stack.data, "--csv", str(out / "run"), "--html", str(out / "run.html"),
            "--only-summary"]
    log = (out / "locust.log").open("wb")
    try:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def finish(proc: subprocess.Popen[bytes], out: Path) -> dict[str, dict[str, str]]:
    """Wait for locust; return its ``_stats.csv`` rows by name, having checked that it wrote every report."""
    try:
        code = proc.wait(LOCUST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        raise
    log = (out / "locust.log").read_text(errors="replace")
    assert code == 0, log[-4000:]
    assert (out / "run.html").stat().st_size > 1000
    with (out / "run_failures.csv").open() as f:
        failures = list(csv.DictReader(f))
    assert failures == [], failures
    with (out / "run_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert rows["Aggregated"]["Failure Count"] == "0", log[-4000:]
    assert "99.9%" in rows["Aggregated"], "the custom percentiles are reported"
    return rows


def test_headless_run_against_up_has_no_failures(stack: Stack, tmp_path: Path) -> None:
    rows = finish(locust(stack, tmp_path, operator=True), tmp_path)
    assert int(rows["Aggregated"]["Request Count"]) > 300
    for name in ("infer json repeat", "infer json fresh", "infer binary repeat", "infer binary fresh", "feedback",
                 "admin split get", "admin split put", "admin stats"):
        assert int(rows[name]["Request Count"]) > 0, name

    metrics = httpx.get(f"{stack.admin}/metrics").text
    hits = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("bluegreen_cache_requests_total{") and 'result="hit"' in line)
    assert hits > 0, "repeated inputs are answered from the cache"
    assert "bluegreen_online_accuracy_ratio{" in metrics, "feedback reached the gateway"
    audit = httpx.get(f"{stack.admin}/admin/v1/audit", headers=admin_headers()).json()["entries"]
    actions = [e["action"] for e in audit]
    assert "set_weights" in actions, "the operator shifted the weights"


def test_headless_run_while_green_is_killed_has_no_failures(stack: Stack, tmp_path: Path) -> None:
    r = httpx.put(f"{stack.admin}/admin/v1/models/digits/split", json={"blue": 50, "green": 50},
                  headers=admin_headers())
    assert r.status_code == 200, r.text
    kids = children_of(stack.proc.pid)
    green = next(pid for pid, cmd in kids.items() if f"--port {stack.ports['green']}" in cmd)
    green_before = stack.attempts("green", "success")

    # No operator: green keeps its 50% until it dies. No repeated inputs: every request goes upstream (none
    # is answered from the cache), so green reaches its share early in the run on a slow machine and its
    # death is met by failover, not by cached answers.
    proc = locust(stack, tmp_path, operator=False, extra_env={"BLUEGREEN_LOCUST_REPEAT_SHARE": "0"})
    try:
        wait_until(lambda: stack.attempts("green", "success") >= green_before + 100, RUN_TIME_S / 2,
                   interval=0.2, what="green to carry part of the load")
        os.kill(green, signal.SIGKILL)
        wait_until(lambda: "green exited" in stack.proc.log(), 10, what="up to report the dead green")
        blue_at_kill = stack.attempts("blue", "success")
        rows = finish(proc, tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert int(rows["Aggregated"]["Request Count"]) > 300
    assert stack.attempts("blue", "success") > blue_at_kill + 100, "blue answered after green died"
    assert stack.attempts("green", "error") > 0, "green's failed attempts were counted against green (and retried)"
