"""The servers a suite starts (model servers, gateways, nginx, Redis) as children on free loopback ports, and
what the suites read from them: the model server's stats, the gateway's cache counters and Prometheus series,
Redis's command counts, each process's CPU time.

Every server is a :class:`serving.process.ChildProcess`, started through ``bluegreen`` itself (``serve-model``,
``gateway``) so that what is measured is what a user runs, and always stopped on the way out.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import string
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench.base import LOOPBACK, ROOT, SuiteError, check_loopback
from serving import machine as serving_machine
from serving.process import ChildProcess, free_port, free_ports, http_ok, process_cpu_s, redis_pong

SERVER_READY_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 20.0
NGINX_KEEPALIVE = 64  # idle keep-alive connections nginx keeps to the model server


@dataclass
class ServerProcess(ChildProcess):
    """One server child (a model server, the gateway, nginx, Redis) on loopback ports, its log in a file."""

    url: str = ""
    admin_url: str | None = None  # a gateway's admin listener
    admin_token: str | None = None

    def provider(self, model: str) -> tuple[str | None, int | None]:
        """The execution provider and thread count the server logged when it loaded ``model``."""
        m = re.search(rf"loaded {re.escape(model)} on (\S+) \((\d+) threads\)", self.log())
        return (m.group(1), int(m.group(2))) if m else (None, None)


@contextlib.contextmanager
def server_process(name: str, args: list[str], url: str, log_dir: Path, *, env: Mapping[str, str] | None = None,
                   ready: Callable[[], bool] | None = None, log_name: str | None = None,
                   cls: type[ServerProcess] = ServerProcess) -> Iterator[ServerProcess]:
    """Start ``args`` (a server that will listen at ``url``), wait until it is ``ready`` (by default
    ``url + /v2/health/ready`` answers 200), and always stop it on the way out (Ctrl-C included)."""
    if url.startswith("http"):
        check_loopback(url)
    log_path = log_dir / (log_name or f"{name}-{url.rsplit(':', 1)[1].split('/')[0]}.log")
    child = ChildProcess.start(name, args, log_path, env=env, cwd=ROOT)
    server = cls(child.name, child.args, child.log_path, child.popen, url=url)
    try:
        server.wait_ready(ready or http_ok(url + "/v2/health/ready", 2.0), SERVER_READY_TIMEOUT_S, interval_s=0.1)
        yield server
    finally:
        server.stop(SERVER_STOP_TIMEOUT_S)


@contextlib.contextmanager
def model_server(repo: Path, models: Sequence[str], extra: Sequence[str], log_dir: Path) -> Iterator[ServerProcess]:
    """A ``bluegreen serve-model`` child serving ``models`` on a free loopback port."""
    port = free_port()
    args = [sys.executable, "-m", "gateway.cli", "serve-model", "--repo", str(repo),
            *(arg for m in models for arg in ("--model", m)), "--host", LOOPBACK, "--port", str(port), *extra]
    with server_process("model server", args, f"http://{LOOPBACK}:{port}", log_dir) as server:
        yield server


@contextlib.contextmanager
def gateway_server(routing: Mapping[str, Any], log_dir: Path, settings: Mapping[str, str] | None = None,
                   name: str = "gateway") -> Iterator[ServerProcess]:
    """A ``bluegreen gateway`` child routing as ``routing`` says (the routing file's shape), on free ports.

    The child gets this environment without any ``BLUEGREEN_*`` variable, then only its ports, a throwaway
    admin token and the ``settings`` given here (``{"BLUEGREEN_TELEMETRY": "false"}``): a developer's own
    settings (a Redis URL, a state file) must not change what is measured.
    """
    data_port, admin_port = free_ports(2)
    config = log_dir / f"routing-{data_port}.json"
    config.write_text(json.dumps(routing, indent=2))
    token = secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
    env.update({"BLUEGREEN_DATA__HOST": LOOPBACK, "BLUEGREEN_DATA__PORT": str(data_port),
                "BLUEGREEN_ADMIN__HOST": LOOPBACK, "BLUEGREEN_ADMIN__PORT": str(admin_port),
                "BLUEGREEN_ADMIN_TOKEN": token})
    unknown = [k for k in settings or {} if not k.startswith("BLUEGREEN_")]
    if unknown:
        raise ValueError(f"gateway settings are BLUEGREEN_* variables, not {unknown}")
    env.update(settings or {})
    args = [sys.executable, "-m", "gateway.cli", "gateway", "--config", str(config)]
    with server_process(name, args, f"http://{LOOPBACK}:{data_port}", log_dir, env=env) as server:
        server.admin_url, server.admin_token = f"http://{LOOPBACK}:{admin_port}", token
        yield server


NGINX_CONF = string.Template("""# generated by loadtests/bench: the reference proxy, one worker, keep-alive upstream
worker_processes 1;
daemon off;
pid $work/nginx-$port.pid;
error_log $work/nginx-$port.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx-$port-body;
    proxy_temp_path $work/nginx-$port-proxy;
    upstream model_server { server $upstream; keepalive $keepalive; }
    server {
        listen $host:$port;
        location / {
            proxy_pass http://model_server;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
""")


@dataclass
class NginxProcess(ServerProcess):
    """nginx as the reference proxy: its CPU is its one worker's (the master only supervises)."""

    def cpu_s(self) -> float | None:
        try:
            children = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text().split()
        except OSError:
            return None
        readings = [process_cpu_s(int(pid)) for pid in children]
        return None if not readings or None in readings else sum(r for r in readings if r is not None)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


@contextlib.contextmanager
def nginx_proxy(upstream_url: str, log_dir: Path) -> Iterator[NginxProcess]:
    """Debian's nginx with one worker in front of ``upstream_url`` (loopback), keep-alive to it, on a free port."""
    binary = nginx_binary()
    if binary is None:
        raise SuiteError("nginx is not installed")
    check_loopback(upstream_url)
    port = free_port()
    conf = log_dir / f"nginx-{port}.conf"
    conf.write_text(NGINX_CONF.substitute(work=log_dir, port=port, host=LOOPBACK, keepalive=NGINX_KEEPALIVE,
                                          upstream=upstream_url.split("://", 1)[1]))
    args = [binary, "-c", str(conf), "-e", str(log_dir / f"nginx-{port}.err")]
    url = f"http://{LOOPBACK}:{port}"
    with server_process("nginx", args, url, log_dir, cls=NginxProcess) as server:
        assert isinstance(server, NginxProcess)
        yield server


def admin_get(gateway: ServerProcess, path: str) -> httpx.Response:
    """GET ``path`` on a gateway's admin listener with its token (``/metrics`` needs none, and ignores it)."""
    if gateway.admin_url is None:
        raise ValueError(f"the {gateway.name} has no admin listener")
    resp = httpx.get(gateway.admin_url + path, headers={"authorization": f"Bearer {gateway.admin_token}"},
                     timeout=5.0)
    resp.raise_for_status()
    return resp


#: The counters of ``GET /admin/v1/cache`` that say which way each lookup went.
CACHE_PATHS = ("l1_hits", "l2_hits", "misses")


def cache_counters(gateway: ServerProcess) -> dict[str, int]:
    """The gateway's prediction-cache counters (``GET /admin/v1/cache``: hits, misses, Redis errors...), without
    its gauges (entries and bytes held); empty when its cache is off."""
    doc = admin_get(gateway, "/admin/v1/cache").json()
    return {k: int(v) for k, v in doc.items()
            if isinstance(v, int) and not isinstance(v, bool) and k not in ("l1_entries", "l1_bytes")}


def prometheus_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The value of the first sample of ``name`` whose labels include ``labels`` in Prometheus text; None if none.

    Enough of the exposition format for the gateway's own ``/metrics``: label values without escaped quotes."""
    wanted = labels or {}
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        m = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})?\s+(\S+)(?:\s+\S+)?", line.strip())
        if m is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(found.get(k) == v for k, v in wanted.items()):
            try:
                return float(m.group(2))
            except ValueError:
                return None
    return None


def redis_commands(redis: ServerProcess) -> dict[str, int]:
    """Calls per command since ``redis`` started (``INFO commandstats``), as ``redis_<command>`` counters."""
    import redis as redis_client

    client = redis_client.Redis.from_url(redis.url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {"redis_" + name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


@contextlib.contextmanager
def redis_server(log_dir: Path) -> Iterator[ServerProcess]:
    """A private ``redis-server`` on a free loopback port, nothing persisted, always stopped on the way out."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SuiteError("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    port = free_port()
    url = f"redis://{LOOPBACK}:{port}/0"
    args = [exe, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no", "--dir", str(log_dir)]
    with server_process("redis-server", args, url, log_dir, ready=redis_pong(port),
                        log_name=f"redis-{port}.log") as server:
        yield server


def model_stats(url: str, model: str, version: str | None = None) -> tuple[int, int] | None:
    """(rows inferred, model runs) from the server's Triton-style stats endpoint; None if unavailable."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "")
    try:
        doc = httpx.get(f"{url}{path}/stats", timeout=5.0).json()
        stats = doc["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


def cpu_readings(processes: Mapping[str, ServerProcess]) -> dict[str, float | None]:
    return {name: p.cpu_s() for name, p in processes.items()}


def cpu_used(before: Mapping[str, float | None], after: Mapping[str, float | None],
             seconds: float) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Per process, the CPU seconds between two readings and the cores that makes over ``seconds``."""
    cpu: dict[str, float | None] = {}
    cores: dict[str, float | None] = {}
    for name, b in before.items():
        a = after.get(name)
        cpu[name] = None if a is None or b is None else a - b
        used = cpu[name]
        cores[name] = None if used is None or seconds <= 0 else used / seconds
    return cpu, cores


def describe_machine() -> dict[str, Any]:
    """The machine (serving/machine.py) and the wrk that drove the runs."""
    return {**serving_machine.describe_machine(), "wrk": _wrk_version()}


def _wrk_version() -> str | None:
    if not shutil.which("wrk"):
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10, check=False)
        first = (out.stdout or out.stderr).splitlines()
        if first:
            return first[0].split(" Copyright")[0].strip()
    return None


# --------------------------------------------------------------------------------------------------------------
# suites
# --------------------------------------------------------------------------------------------------------------

