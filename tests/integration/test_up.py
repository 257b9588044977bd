"""``bluegreen up``: the local stack as a user runs it, with a child killed and the whole stack stopped."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import orjson
import pytest

from tests.procs import ADMIN_TOKEN, BLUEGREEN, Proc, admin_headers, free_port, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")

BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [3.0] * 64}]})


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of the live direct children of ``pid`` (from /proc)."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            if ppid == pid and state != "Z":
                found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_up(tmp_path: Path, ports: dict[str, int]) -> Proc:
    args = [*BLUEGREEN, "up", "--state-dir", str(tmp_path / "state"), "--port", str(ports["data"]),
            "--admin-port", str(ports["admin"]), "--blue-port", str(ports["blue"]), "--green-port", str(ports["green"])]
    log = tmp_path / f"up-{len(list(tmp_path.glob('up-*.log')))}.log"
    proc = Proc(args, log, {"BLUEGREEN_ADMIN_TOKEN": ADMIN_TOKEN})
    wait_until(lambda: "] ready" in proc.log() or proc.popen.poll() is not None, 90, interval=0.1, what="up ready")
    assert proc.popen.poll() is None, proc.log()
    return proc


def test_up_runs_the_stack_survives_a_dead_child_and_stops_everything(tmp_path: Path) -> None:
    ports = {k: free_port() for k in ("data", "admin", "blue", "green")}
    data, admin = f"http://127.0.0.1:{ports['data']}", f"http://127.0.0.1:{ports['admin']}"
    up = start_up(tmp_path, ports)
    try:
        assert ADMIN_TOKEN in up.log()
        r = httpx.post(f"{data}/v2/models/digits/infer", content=BODY)
        assert r.status_code == 200 and r.headers["x-bluegreen-color"] == "blue"
        kids = children_of(up.pid)
        assert len(kids) == 3, kids
        green = next(pid for pid, cmd in kids.items() if f"--port {ports['green']}" in cmd)

        os.kill(green, signal.SIGKILL)
        wait_until(lambda: "green exited" in up.log(), 10, what="up to report the dead child")
        assert up.popen.poll() is None
        assert httpx.post(f"{data}/v2/models/digits/infer", content=BODY).status_code == 200

        r = httpx.put(f"{admin}/admin/v1/models/digits/split", json={"blue": 90, "green": 10}, headers=admin_headers())
        assert r.status_code == 200
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0
        wait_until(lambda: not any(alive(pid) for pid in kids), 15, what="every child to stop")
    finally:
        up.stop()

    # The weights survive a restart (the embedded state file).
    up = start_up(tmp_path, ports)
    try:
        r = httpx.get(f"{admin}/admin/v1/models/digits/split", headers=admin_headers())
        assert r.json() == {"blue": 90, "green": 10}
        kids = children_of(up.pid)
        up.signal(signal.SIGINT)
        assert up.wait(30) == 0
        wait_until(lambda: not any(alive(pid) for pid in kids), 15, what="every child to stop")
    finally:
        up.stop()
