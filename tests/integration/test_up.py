"""``bluegreen up``: the local stack as a user runs it, with a child killed and the whole stack stopped; its admin
token kept across runs; a port already taken refused before anything says "ready"."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import orjson
import pytest

from serving.process import children_of as children_of
from serving.process import port_taken
from serving.process import process_alive as alive
from tests.procs import ADMIN_TOKEN, BLUEGREEN, ROOT, Proc, free_port, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")

BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [3.0] * 64}]})


def up_args(tmp_path: Path, ports: dict[str, int]) -> list[str]:
    return [*BLUEGREEN, "up", "--state-dir", str(tmp_path / "state"), "--port", str(ports["data"]),
            "--admin-port", str(ports["admin"]), "--blue-port", str(ports["blue"]), "--green-port", str(ports["green"])]


def start_up(tmp_path: Path, ports: dict[str, int], env: dict[str, str] | None = None) -> Proc:
    """``up`` once it says ready (by default with the tests' admin token in its environment), its ``export`` line
    for the admin URL printed."""
    log = tmp_path / f"up-{len(list(tmp_path.glob('up-*.log')))}.log"
    proc = Proc(up_args(tmp_path, ports), log, {"BLUEGREEN_ADMIN_TOKEN": ADMIN_TOKEN} if env is None else env)
    wait_until(lambda: "Ctrl-C stops everything" in proc.log() or proc.popen.poll() is not None, 90, interval=0.1,
               what="up ready")
    assert proc.popen.poll() is None, proc.log()
    assert f"export BLUEGREEN_ADMIN_URL=http://127.0.0.1:{ports['admin']}\n" in proc.log()
    return proc


def exported_token(proc: Proc) -> str:
    """The token of ``up``'s ``export BLUEGREEN_ADMIN_TOKEN=`` line."""
    match = re.search(r"^export BLUEGREEN_ADMIN_TOKEN=(\S+)$", proc.log(), re.MULTILINE)
    assert match, proc.log()
    return match.group(1)


def test_up_runs_the_stack_survives_a_dead_child_and_stops_everything(tmp_path: Path) -> None:
    ports = {k: free_port() for k in ("data", "admin", "blue", "green")}
    data, admin = f"http://127.0.0.1:{ports['data']}", f"http://127.0.0.1:{ports['admin']}"
    up = start_up(tmp_path, ports, env={"BLUEGREEN_ADMIN_TOKEN": ""})  # no token given: up keeps its own
    token = exported_token(up)
    headers = {"authorization": f"Bearer {token}"}
    token_file = tmp_path / "state" / "admin-token"
    assert token_file.read_text().strip() == token and token_file.stat().st_mode & 0o777 == 0o600
    try:
        r = httpx.post(f"{data}/v2/models/digits/infer", content=BODY)
        assert r.status_code == 200 and r.headers["x-bluegreen-color"] == "blue"
        kids = children_of(up.pid)
        assert len(kids) == 3, kids
        green = next(pid for pid, cmd in kids.items() if f"--port {ports['green']}" in cmd)

        os.kill(green, signal.SIGKILL)
        wait_until(lambda: "green exited" in up.log(), 10, what="up to report the dead child")
        assert up.popen.poll() is None
        assert httpx.post(f"{data}/v2/models/digits/infer", content=BODY).status_code == 200

        r = httpx.put(f"{admin}/admin/v1/models/digits/split", json={"blue": 90, "green": 10},
                      headers={**headers, "If-Match": "*"})
        assert r.status_code == 200
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0
        wait_until(lambda: not any(alive(pid) for pid in kids), 15, what="every child to stop")
    finally:
        up.stop()

    # The weights survive a restart (the embedded state file), and so does the admin token (the state directory):
    # one exported in another terminal keeps working.
    up = start_up(tmp_path, ports, env={"BLUEGREEN_ADMIN_TOKEN": ""})
    assert exported_token(up) == token
    try:
        r = httpx.get(f"{admin}/admin/v1/models/digits/split", headers=headers)
        assert r.json() == {"blue": 90, "green": 10}
        kids = children_of(up.pid)
        up.signal(signal.SIGINT)
        assert up.wait(30) == 0
        wait_until(lambda: not any(alive(pid) for pid in kids), 15, what="every child to stop")
    finally:
        up.stop()


def test_up_on_a_taken_port_fails_fast_naming_it_before_saying_ready(tmp_path: Path) -> None:
    ports = {k: free_port() for k in ("data", "admin", "blue", "green")}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", ports["admin"]))
        squatter.listen(1)
        started = time.monotonic()
        done = subprocess.run(up_args(tmp_path, ports), capture_output=True, text=True, timeout=60, cwd=ROOT,
                              check=False)
        elapsed = time.monotonic() - started
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert f"port {ports['admin']}" in done.stderr and "--admin-port" in done.stderr, out
    assert "] ready" not in out and "export" not in out and "token" not in out, out
    assert elapsed < 30, f"took {elapsed:.1f}s to refuse a taken port"
    assert not (tmp_path / "state" / "logs").exists()  # no child was started


def test_up_reports_a_child_that_exits_while_starting_with_its_log_and_stops_the_rest(tmp_path: Path) -> None:
    ports = {k: free_port() for k in ("data", "admin", "blue", "green")}
    env = {**os.environ, "BLUEGREEN_ADMIN_TOKEN": ADMIN_TOKEN, "BLUEGREEN_TELEMETRY": "not-a-boolean"}
    done = subprocess.run(up_args(tmp_path, ports), capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
                          check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "the gateway exited with status" in done.stderr and "during start-up" in done.stderr, out
    assert "telemetry" in done.stderr.lower(), out  # the tail of its log says why
    assert "] ready" not in out and "export" not in out, out
    # The model servers that had started were stopped on the way out: their ports are free again.
    assert port_taken("127.0.0.1", ports["blue"]) is None and port_taken("127.0.0.1", ports["green"]) is None
