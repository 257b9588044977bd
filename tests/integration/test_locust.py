"""A short headless locust smoke run (``loadtests/locustfile.py``) against ``bluegreen up``.

Locust runs as its own process (it patches the standard library with gevent, which must never happen inside
pytest). This run only shows that the documented command works against the real stack: every kind of
prediction is sent, the operator user reaches the admin API, real requests go upstream, nothing fails, and
the reports are written. The long runs — the same mix for ``--duration`` seconds, then again while green is
killed mid-run — are ``bluegreen bench locust`` (loadtests/bench/suites/locust.py): they measure a scenario and
take longer than the test suite can spend.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.expect import expect
from tests.integration.test_up import start_up
from tests.procs import ADMIN_TOKEN, ROOT, Proc, free_port

pytestmark = pytest.mark.usefixtures("model_repo")

RUN_TIME_S = 5  # 10 users at ~5 requests/s each: ~200 requests, a few seconds of every task
LOCUST_TIMEOUT_S = RUN_TIME_S + 60  # start-up and the final report on a busy 2-core machine
PREDICTIONS = ("infer json repeat", "infer json fresh", "infer binary repeat", "infer binary fresh")
ADMIN = ("admin split get", "admin split put", "admin stats")


class Stack:
    def __init__(self, proc: Proc, ports: dict[str, int]) -> None:
        self.proc, self.ports = proc, ports
        self.data = f"http://127.0.0.1:{ports['data']}"
        self.admin = f"http://127.0.0.1:{ports['admin']}"

    def metric_sum(self, prefix: str, *needles: str) -> float:
        """The sum of the admin listener's ``/metrics`` samples starting with ``prefix`` and holding every needle."""
        text = expect(httpx.get(f"{self.admin}/metrics")).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(prefix) and all(n in line for n in needles))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("up")
    ports = {k: free_port() for k in ("data", "admin", "blue", "green")}
    proc = start_up(tmp, ports)
    try:
        yield Stack(proc, ports)
    finally:
        proc.stop()


def run_locust(stack: Stack, out: Path) -> tuple[dict[str, dict[str, str]], str]:
    """The documented headless run, with the operator user (think time shortened to fit the short run); its
    ``_stats.csv`` rows by name and its log, having checked that it exited 0 and wrote every report."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
    env |= {"BLUEGREEN_ADMIN_TOKEN": ADMIN_TOKEN, "BLUEGREEN_ADMIN_URL": stack.admin,
            "BLUEGREEN_LOCUST_OPERATOR_WAIT_S": "0.1,0.3"}
    args = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless", "-u", "10", "-r", "10",
            "-t", f"{RUN_TIME_S}s", "--host", stack.data, "--csv", str(out / "run"), "--html", str(out / "run.html"),
            "--only-summary"]
    with (out / "locust.log").open("wb") as log:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(LOCUST_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    text = (out / "locust.log").read_text(errors="replace")
    assert code == 0, text[-4000:]
    assert (out / "run.html").stat().st_size > 1000, text[-4000:]
    with (out / "run_failures.csv").open() as f:
        failures = list(csv.DictReader(f))
    assert failures == [], failures  # each row names the request and locust's message (status and body)
    with (out / "run_stats.csv").open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    return rows, text


def test_a_short_headless_run_against_up_sends_every_kind_of_request_and_none_fails(stack: Stack,
                                                                                     tmp_path: Path) -> None:
    upstream_before = stack.metric_sum("bluegreen_upstream_duration_seconds_count{", 'outcome="success"')
    rows, log = run_locust(stack, tmp_path)

    total = rows["Aggregated"]
    assert total["Failure Count"] == "0", log[-4000:]
    assert int(total["Request Count"]) >= 50, (total, log[-4000:])
    assert "99.9%" in total, "the custom percentiles are reported"
    for name in PREDICTIONS:
        assert int(rows.get(name, {}).get("Request Count", 0)) > 0, (name, sorted(rows))
    assert sum(int(rows[n]["Request Count"]) for n in ADMIN if n in rows) > 0, "the operator reached the admin API"

    # Real requests: fresh inputs went upstream to the model servers (repeated ones may come from the cache).
    assert stack.metric_sum("bluegreen_upstream_duration_seconds_count{", 'outcome="success"') > upstream_before
