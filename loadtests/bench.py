"""The benchmark runner behind ``bluegreen bench [serving|gateway|cache|telemetry|shadow]`` (none named: all).

How we measure performance: the machines are 2-core and shared, so what counts is **ratios
measured in one run** (absolute times only on a GPU). Every suite therefore starts its own servers on free
loopback ports, drives them with ``wrk`` one at a time (so they never compete for the cores), records the load
generator's CPU beside the throughput, and compares runs made minutes apart on the same machine. Latency at a
given load (rather than at saturation) comes from :mod:`loadtests.fixed_rate`, an open-loop generator.

Suites are functions in :data:`SUITES`, chosen by name. Each returns one JSON document that is written to
``<out>/bench-<suite>.json``; ``<out>/benchmarks.md`` is then regenerated from every ``bench-*.json`` in the
folder — a summary table of every ratio with its target, date, machine and command, the plot
``<out>/benchmarks.png`` (:mod:`loadtests.plot`), then one section per suite (:data:`SECTIONS`) — so rerunning
one suite replaces only its own section and rows.

Exit status: 0 when every suite asked for ran with clean runs (no non-2xx answers, no socket errors, every run
on the path it is named after); 1 when a run was flagged; 2 when a suite could not measure (``wrk`` missing, a
server that would not start). Targets missed are reported (``BELOW``), not turned into a failure: on a shared
machine one noisy run is not a regression.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from loadtests.cpu import children_cpu_s, cpu_pressure_s, process_cpu_s
from serving import machine as serving_machine
from serving.machine import machine_line

if TYPE_CHECKING:
    from serving.runtime import Device

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs"
LOOPBACK = "127.0.0.1"  # the only address a benchmark ever targets

WRK_CONNECTIONS = 64
WRK_THREADS = 2
WRK_TIMEOUT_S = 10  # generous: a slow answer under saturation is latency, not a socket error
WARMUP_S = 2
SERVER_READY_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 20.0

# serving suite
SERVING_MODEL = ("wide", "1")
SERVING_DIGITS = ("digits", "1")
# The server's default device; the raw ONNX Runtime baseline takes the same one, so all runs share a device.
SERVING_DEVICE: Device = "auto"
DIGITS_CONNECTIONS = 32  # wrk -t1 -c32, the load the per-request CPU targets are stated at
DIGITS_WRK_THREADS = 1
RAW_BATCH_SIZES = (16, 32, 64, 128)
RAW_SPIN_WAIT = (False, True)
RAW_SECONDS_PER_BATCH = 2.0
RAW_MAX_RUNS = 100_000  # bounds the loop even if a run were unexpectedly instant
TARGET_DIGITS_BATCHED_CPU_US = 100.0
STRETCH_DIGITS_BATCHED_CPU_US = 60.0
TARGET_DIGITS_UNBATCHED_CPU_US = 120.0
STRETCH_DIGITS_UNBATCHED_CPU_US = 70.0
TARGET_BATCHED_VS_UNBATCHED = 4.0
STRETCH_BATCHED_VS_UNBATCHED = 5.0
TARGET_BATCHED_VS_RAW = 0.6
STRETCH_BATCHED_VS_RAW = 0.75
TARGET_BINARY_VS_RAW = 0.75
STRETCH_BINARY_VS_RAW = 0.9

SHARED_CORES_NOTE = (
    "wrk and the model server run on the same machine and share its cores: the CPU wrk uses (column "
    "\"wrk CPU\") is taken from the server, so absolute rows/s understate a server on dedicated cores. Both "
    "server runs carry the same handicap, which is why the ratios are the figures to quote. Raw ONNX Runtime "
    "runs in-process with no load generator beside it, so batched / raw is a conservative ratio.")

# gateway suite
GATEWAY_MODEL = ("digits", "1")  # blue, at weight 100
GATEWAY_GREEN_VERSION = "2"  # served by the same model server, at weight 0: configured, never called
GATEWAY_CONNECTIONS = 32
#: Order of the wrk runs, one tuple per round: alternating, so drift on the shared machine favours neither side.
GATEWAY_ROUNDS = (("direct", "gateway", "nginx"), ("nginx", "gateway", "direct"), ("direct", "nginx", "gateway"))
#: Sent on every request, both ways: once the gateway has a prediction cache, it must be bypassed here.
GATEWAY_REQUEST_HEADERS = {"Cache-Control": "no-cache, no-store"}
HALF_LOAD_FRACTION = 0.5  # of the gateway's median saturated requests/s, for the fixed-rate latency runs
# ... but at most this: the open-loop generator is Python (~0.35 ms of CPU per request at these rates), and above
# ~1,500 requests/s it, the gateway and the model server overcommit the two cores, so the "half load" runs
# measured the generator's own queueing (p50 of ~1 s at 2,600 requests/s, with 0.9 cores of generator).
HALF_LOAD_MAX_RPS = 1500.0
#: Order of the fixed-rate runs (ABBA): the added latency is median(gateway) − median(direct) per percentile.
HALF_LOAD_ORDER = ("direct", "gateway", "gateway", "direct")
LATENCY_PERCENTILES = ("p50", "p90", "p99")
FIXED_RATE_CONNECTIONS = 64
FIXED_RATE_TIMEOUT_S = 10.0
GENERATOR_LAG_WARN_MS = 5.0
TARGET_GATEWAY_VS_DIRECT = 0.6
STRETCH_GATEWAY_VS_DIRECT = 0.75
TARGET_GATEWAY_CPU_US = 150.0  # at most: the gateway's CPU per proxied request, cache bypassed
STRETCH_GATEWAY_CPU_US = 100.0
TARGET_GATEWAY_VS_NGINX_CPU = 4.5  # at most: gateway CPU per request over nginx's, same run
STRETCH_GATEWAY_VS_NGINX_CPU = 3.0
TARGET_MISS_CPU_US = 170.0  # at most: a real miss (unique inputs, cache on, no Redis)
STRETCH_MISS_CPU_US = 110.0
TARGET_L1_HIT_CPU_US = 80.0
STRETCH_L1_HIT_CPU_US = 50.0
NGINX_KEEPALIVE = 64  # idle keep-alive connections nginx keeps to the model server

GATEWAY_SHARED_CORES_NOTE = (
    "wrk, the gateway and the model server share the machine's cores. Direct, the model server has them to "
    "itself beside wrk; through the gateway, the gateway takes its share (column \"Gateway CPU\") from the "
    "same cores, so gateway / direct measures the gateway's CPU cost per request as much as its latency. "
    "The gateway is idle during the direct runs.")
FIXED_RATE_NOTE = (
    "Half load is sent by `loadtests/fixed_rate.py`, an open-loop generator (asyncio + aiohttp) at a fixed "
    "rate: each request's latency is measured from the moment it was due, so queueing counts (no coordinated "
    "omission, as with wrk2, which Debian does not package). It runs on the same cores as the servers; its CPU "
    "over the measured window is the \"Generator CPU\" column (the whole process, start-up and warm-up "
    "included, is in the JSON), and \"Send lag\" is how late it started requests, its own delay.")

# cache suite
#: ABCD then DCBA: each target's two runs sit symmetrically around the middle of the suite, so a steady drift in
#: what else the shared machine runs cancels out of the mean of the two rounds.
CACHE_ROUNDS = (("direct", "l1_hit", "l2_hit", "miss"), ("miss", "l2_hit", "l1_hit", "direct"))
CACHE_L2_BODIES = 128  # distinct bodies the L2-hit run cycles through, each stored in Redis beforehand
CACHE_L2_L1_ENTRIES = 1  # the L2-hit gateway's L1: one entry, so a lookup of the next body in the cycle goes to Redis
#: Long enough that no entry expires during a long run (expired entries are misses): the TTL is not what is measured.
CACHE_TTL_S = 3600
#: Per cache target: the counter of ``GET /admin/v1/cache`` its lookups must land in, and the least share of all
#: lookups during the measured run that it must hold for the run to count. The L2 run's one-entry L1 still
#: answers when two threads happen to send the same body back to back.
CACHE_EXPECTED_PATH = {"l1_hit": ("l1_hits", 0.99), "l2_hit": ("l2_hits", 0.9), "miss": ("misses", 0.99)}
CACHE_LABELS = {"direct": "direct", "l1_hit": "L1 hit", "l2_hit": "L2 hit", "miss": "miss"}
TARGET_L1_HIT_VS_DIRECT = 1.5
STRETCH_L1_HIT_VS_DIRECT = 2.0

CACHE_NOTE = (
    "Every run shares the machine's cores with wrk, the model server, the gateways and Redis. A hit is answered "
    "by the gateway alone (the model server stays idle: see its rows), so hit / direct compares the gateway's "
    "cache path with the model server's whole request path on the same cores. The L2-hit gateway keeps one "
    "entry in L1 and cycles through distinct bodies stored in Redis beforehand; each L2 hit is also written into "
    "that one-entry L1, as any L2 hit is. A miss carries a body never sent before (its first pixels number it), so "
    "it pays the lookup, the upstream call and the store.")

# telemetry suite
#: Alternating, so drift favours neither side; the ratio quoted is the median of the rounds' on / off.
TELEMETRY_ROUNDS = (("on", "off"), ("off", "on"), ("on", "off"), ("off", "on"))
TARGET_TELEMETRY_ON_VS_OFF = 0.95
TELEMETRY_NOTE = (
    "Two gateways run side by side in front of one model server, identical but for `BLUEGREEN_TELEMETRY=false`; "
    "wrk drives one at a time (the other idles), with the cache bypassed so every request takes the proxy path. "
    "\"On\" is the default deployment: Prometheus series recorded on every request; no OTLP endpoint and no "
    "tracing configured (`OTEL_*` unset), as on this machine by default.")

# shadow suite
SHADOW_PERCENT = 10
SHADOW_BODIES = 64  # held-out digits images, sent in turn: agreement between the two versions is then meaningful
SHADOW_SATURATION_ORDER = ("off", "on")
# ABBA BAAB: four runs each, balanced against drift; the shared machines' noise swung a two-run median by 30%.
SHADOW_HALF_LOAD_ORDER = ("off", "on", "on", "off", "on", "off", "off", "on")
TARGET_SHADOW_P50 = 1.15  # at most: the clients' p50 with shadowing within 15% of the same run without
STRETCH_SHADOW_P50 = 1.05
SHADOW_PERCENTILES = ("p50", "p90", "p95", "p99")
SHADOW_NOTE = (
    "Blue (`digits:1`) and green (`digits:2`) are two model server processes; two gateways route 100% to blue, one "
    f"copying {SHADOW_PERCENT}% of the requests to green (`shadow_percent: {SHADOW_PERCENT}`), one not "
    "(`shadow_percent: 0`). The cache is bypassed (`Cache-Control: no-cache, no-store`): a cache hit sends no "
    "shadow copy. The half-load rate is half of the slower gateway's saturated rate (the shadowed one, as a rule), "
    "so that neither is more than half loaded: near the cores' limit (the Python generator takes about a quarter "
    "of a core per 1,000 requests/s) latency turns on any extra work, and the comparison would measure the knee "
    "rather than shadowing. \"Green rows\" is what the green model server inferred during the run: the shadow "
    "copies.")


# --------------------------------------------------------------------------------------------------------------
# wrk: a Lua script that POSTs one body and prints its summary as one JSON line
# --------------------------------------------------------------------------------------------------------------

WRK_MARKER = "BLUEGREEN_WRK_RESULT"

_WRK_LUA = string.Template(r"""-- generated by loadtests/bench.py
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
$headers
wrk.body = $body
$requests
local function num(x)
  if x ~= x or x == math.huge or x == -math.huge then return 0 end
  return x
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "$marker {\"duration_us\":%.0f,\"requests\":%.0f,\"bytes\":%.0f," ..
    "\"errors\":{\"connect\":%.0f,\"read\":%.0f,\"write\":%.0f,\"status\":%.0f,\"timeout\":%.0f}," ..
    "\"latency_us\":{\"min\":%.0f,\"mean\":%.1f,\"stdev\":%.1f,\"max\":%.0f," ..
    "\"p50\":%.0f,\"p90\":%.0f,\"p95\":%.0f,\"p99\":%.0f,\"p99.9\":%.0f}}\n",
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    num(latency.min), num(latency.mean), num(latency.stdev), num(latency.max),
    num(latency:percentile(50)), num(latency:percentile(90)), num(latency:percentile(95)),
    num(latency:percentile(99)), num(latency:percentile(99.9))))
end
""")


def _lua_string(text: str) -> str:
    """``text`` as a Lua long-bracket literal, its level above any closing bracket inside it."""
    level = "="
    while f"]{level}]" in text:
        level += "="
    return f"[{level}[{text}]{level}]"


#: Gives each wrk thread its index (0, 1, ...) as the global ``bluegreen_thread``, before its ``init`` runs.
_WRK_LUA_THREADS = r"""
local thread_count = 0
setup = function(thread)
  thread:set("bluegreen_thread", thread_count)
  thread_count = thread_count + 1
end
"""

_WRK_LUA_CYCLE = string.Template(_WRK_LUA_THREADS + r"""
local bodies = {
$bodies
}
local requests = {}
local position = 0

init = function(args)
  for k, body in ipairs(bodies) do requests[k] = wrk.format(nil, nil, nil, body) end
  -- each thread starts half a cycle after the previous one, so that threads seldom send the same body at once
  position = ((bluegreen_thread or 0) * math.floor(#bodies / 2)) % #bodies
end

request = function()
  position = position % #requests + 1
  return requests[position]
end
""")

_WRK_LUA_UNIQUE = string.Template(_WRK_LUA_THREADS + r"""
local prefix = $prefix
local rest = $rest
local counter = 0

init = function(args)
  -- 2^24 requests per thread, salted with the start second: no body repeats within a run or in a later one
  counter = (os.time() % 65536) * 2^32 + (bluegreen_thread or 0) * 2^24
end

request = function()
  counter = counter + 1
  local n, pixels = counter, {}
  for k = 1, $digits do
    pixels[k] = n % 17
    n = math.floor(n / 17)
  end
  return wrk.format(nil, nil, nil, prefix .. table.concat(pixels, ",") .. rest)
end
""")

#: Pixels (values 0-16, base-17 digits) that number a unique body: 17^13 > 2^49, the largest counter above.
UNIQUE_DIGITS = 13


def _lua_headers(headers: Mapping[str, str] | None) -> str:
    # The spaces matter: "[[" would open a Lua long string.
    return "\n".join(f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in (headers or {}).items())


def wrk_lua_script(body: str, headers: Mapping[str, str] | None = None) -> str:
    """A wrk script that POSTs ``body`` as JSON (with any extra ``headers``) and reports its summary on one
    ``WRK_MARKER`` line."""
    return _WRK_LUA.substitute(headers=_lua_headers(headers), body=_lua_string(body), requests="",
                               marker=WRK_MARKER)


def wrk_lua_cycle_script(bodies: Sequence[str], headers: Mapping[str, str] | None = None) -> str:
    """Like :func:`wrk_lua_script`, but each request carries the next of ``bodies``, in a cycle (the requests
    are formatted once, at start-up, so the load generator's cost per request stays that of a fixed body)."""
    if not bodies:
        raise ValueError("no bodies to cycle through")
    listed = ",\n".join(f"  {_lua_string(b)}" for b in bodies)
    return _WRK_LUA.substitute(headers=_lua_headers(headers), body=_lua_string(bodies[0]),
                               requests=_WRK_LUA_CYCLE.substitute(bodies=listed), marker=WRK_MARKER)


def unique_body_parts(input_name: str, row: Sequence[float]) -> tuple[str, str]:
    """(prefix, rest) of a V2 body carrying ``row``: ``prefix + "d1,d2,...,d13" + rest`` is that body with its
    first :data:`UNIQUE_DIGITS` values replaced by the numbers written between the two."""
    if len(row) <= UNIQUE_DIGITS:
        raise ValueError(f"a row needs more than {UNIQUE_DIGITS} values, got {len(row)}")
    template = v2_json_body(input_name, [0.0] * UNIQUE_DIGITS + list(row[UNIQUE_DIGITS:]))
    opening = '"data":[' + ",".join(["0.0"] * UNIQUE_DIGITS)
    prefix, rest = template.split(opening, 1)
    return prefix + '"data":[', rest


def wrk_lua_unique_script(input_name: str, row: Sequence[float], headers: Mapping[str, str] | None = None) -> str:
    """A wrk script whose every request is a new V2 body: ``row`` with its first :data:`UNIQUE_DIGITS` pixels
    replaced by the base-17 digits of a per-thread counter (values 0-16, like the rest of a digits image), so that
    a cache keyed on the tensors never sees the same request twice."""
    prefix, rest = unique_body_parts(input_name, row)
    return _WRK_LUA.substitute(
        headers=_lua_headers(headers), body=_lua_string(prefix + ",".join(["0"] * UNIQUE_DIGITS) + rest),
        marker=WRK_MARKER, requests=_WRK_LUA_UNIQUE.substitute(prefix=_lua_string(prefix), rest=_lua_string(rest),
                                                               digits=UNIQUE_DIGITS))


def parse_wrk_output(text: str) -> dict[str, Any]:
    """Turn wrk's stdout (with the script's marker line) into throughput, latency (ms) and error counts."""
    for line in reversed(text.splitlines()):
        if line.startswith(WRK_MARKER + " "):
            raw = json.loads(line[len(WRK_MARKER) + 1:])
            break
    else:
        raise ValueError(f"no {WRK_MARKER} line in wrk's output:\n{text[-2000:]}")
    duration_s = raw["duration_us"] / 1e6
    errors = {k: int(v) for k, v in raw["errors"].items()}
    requests = int(raw["requests"])
    socket_errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    return {
        "duration_s": duration_s,
        "requests": requests,
        "requests_per_s": requests / duration_s if duration_s > 0 else 0.0,
        "bytes_read": int(raw["bytes"]),
        "errors": errors,
        "non_2xx": errors["status"],
        "socket_errors": socket_errors,
        "latency_ms": {k: v / 1000.0 for k, v in raw["latency_us"].items()},
    }


def _check_loopback(url: str) -> None:
    if not url.startswith(f"http://{LOOPBACK}:"):
        raise ValueError(f"benchmarks target {LOOPBACK} only, not {url}")


def run_child(command: Sequence[str], timeout_s: float) -> tuple[subprocess.CompletedProcess[str], dict[str, float]]:
    """Run a load generator to completion; also return its CPU time (user, sys, total).

    RUSAGE_CHILDREN counts children that have been waited for; the only child reaped during this call is this one
    (the servers are reaped when they stop, after every run).
    """
    user0, sys0 = children_cpu_s()
    proc = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout_s, check=False, cwd=ROOT)
    user1, sys1 = children_cpu_s()
    return proc, {"user": user1 - user0, "sys": sys1 - sys0, "total": (user1 - user0) + (sys1 - sys0)}


def wrk_command(url: str, script: Path | str, duration_s: int, connections: int) -> list[str]:
    return ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{duration_s}s", f"--timeout={WRK_TIMEOUT_S}s",
            "--latency", "-s", str(script), url]


def run_wrk(url: str, script: Path, duration_s: int, connections: int = WRK_CONNECTIONS) -> dict[str, Any]:
    """Run wrk once against ``url``; the result adds wrk's own CPU time (user + sys of the reaped child)."""
    _check_loopback(url)
    proc, cpu = run_child(wrk_command(url, script, duration_s, connections), duration_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {proc.stderr.strip() or proc.stdout[-2000:]}")
    result = parse_wrk_output(proc.stdout)
    result["connections"] = connections
    result["wrk_cpu_s"] = cpu
    result["wrk_cores"] = cpu["total"] / result["duration_s"] if result["duration_s"] else 0.0
    return result


# --------------------------------------------------------------------------------------------------------------
# processes and the machine
# --------------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """One server child (a model server, the gateway) on loopback ports, its log in a file."""

    name: str
    args: list[str]
    url: str
    log_path: Path
    popen: subprocess.Popen[bytes]
    admin_url: str | None = None  # a gateway's admin listener
    admin_token: str | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def provider(self, model: str) -> tuple[str | None, int | None]:
        """The execution provider and thread count the server logged when it loaded ``model``."""
        m = re.search(rf"loaded {re.escape(model)} on (\S+) \((\d+) threads\)", self.log())
        return (m.group(1), int(m.group(2))) if m else (None, None)

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.popen.pid)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


@contextlib.contextmanager
def server_process(name: str, args: list[str], url: str, log_dir: Path, *, env: Mapping[str, str] | None = None,
                   ready_path: str = "/v2/health/ready") -> Iterator[ServerProcess]:
    """Start ``args`` (a server that will listen at ``url``), wait until ``url + ready_path`` answers 200, and
    always stop it on the way out (Ctrl-C included)."""
    _check_loopback(url)
    log_path = log_dir / f"{name}-{url.rsplit(':', 1)[1]}.log"
    with log_path.open("wb") as log:
        # Its own session: a Ctrl-C in the terminal reaches only this runner, which then stops the server itself.
        popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                 env=None if env is None else dict(env))
    server = ServerProcess(name, args, url, log_path, popen)
    try:
        _wait_ready(server, url + ready_path)
        yield server
    finally:
        server.stop()


def _wait_ready(server: ServerProcess, ready_url: str) -> None:
    with httpx.Client(timeout=2.0) as client:

        def answers_200() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return client.get(ready_url).status_code == 200
            return False

        _wait_until(server, answers_200)


def _wait_until(server: ServerProcess, ready: Callable[[], bool]) -> None:
    """Poll ``ready`` until it says yes; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    while True:
        if server.popen.poll() is not None:
            raise RuntimeError(f"the {server.name} exited with {server.popen.returncode}:\n{server.log()[-3000:]}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {server.name} was not ready after {SERVER_READY_TIMEOUT_S:.0f}s:\n"
                               f"{server.log()[-3000:]}")
        time.sleep(0.1)


@contextlib.contextmanager
def model_server(repo: Path, models: Sequence[str], extra: Sequence[str], log_dir: Path) -> Iterator[ServerProcess]:
    """A ``bluegreen serve-model`` child serving ``models`` on a free loopback port."""
    port = free_port()
    args = [sys.executable, "-m", "gateway.cli", "serve-model", "--repo", str(repo),
            *(arg for m in models for arg in ("--model", m)), "--host", LOOPBACK, "--port", str(port), *extra]
    with server_process("model server", args, f"http://{LOOPBACK}:{port}", log_dir) as server:
        yield server


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (each probe releases its port, so two probes may agree)."""
    ports: list[int] = []
    for _ in range(100 * count):
        port = free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"could not find {count} distinct free ports")


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


NGINX_CONF = string.Template("""# generated by loadtests/bench.py: the reference proxy, one worker, keep-alive upstream
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
    _check_loopback(upstream_url)
    port = free_port()
    conf = log_dir / f"nginx-{port}.conf"
    conf.write_text(NGINX_CONF.substitute(work=log_dir, port=port, host=LOOPBACK, keepalive=NGINX_KEEPALIVE,
                                          upstream=upstream_url.split("://", 1)[1]))
    args = [binary, "-c", str(conf), "-e", str(log_dir / f"nginx-{port}.err")]
    url = f"http://{LOOPBACK}:{port}"
    with server_process("nginx", args, url, log_dir) as server:
        yield NginxProcess(server.name, server.args, server.url, server.log_path, server.popen)


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
    log_path = log_dir / f"redis-{port}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir, start_new_session=True)
    server = ServerProcess("redis-server", args, url, log_path, popen)

    def pong() -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        _wait_until(server, pong)
        yield server
    finally:
        server.stop()


def model_stats(url: str, model: str, version: str | None = None) -> tuple[int, int] | None:
    """(rows inferred, model runs) from the server's Triton-style stats endpoint; None if unavailable."""
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version is not None else "")
    try:
        doc = httpx.get(f"{url}{path}/stats", timeout=5.0).json()
        stats = doc["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


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

@dataclass(frozen=True)
class SuiteContext:
    duration_s: float
    repo: Path
    out_dir: Path
    work_dir: Path  # scratch: wrk scripts, server logs
    machine: dict[str, Any]
    device: Device = "auto"  # the serving suite's device (``--device``); the other suites ignore it


class SuiteError(Exception):
    """A suite could not measure (a server would not start, wrk failed): reported, exit status 2."""


class SuiteSkipped(Exception):
    """A suite that does not apply on this machine (CUDA asked for, not offered): said plainly, nothing written,
    exit status 0."""


def v2_json_body(input_name: str, row: Sequence[float]) -> str:
    """A V2 inference request carrying one FP32 row."""
    doc = {"inputs": [{"name": input_name, "datatype": "FP32", "shape": [1, len(row)], "data": list(row)}]}
    return json.dumps(doc, separators=(",", ":"))


def v2_binary_body(input_name: str, row: Sequence[float]) -> tuple[bytes, int]:
    """A V2 inference request carrying one FP32 row as a binary tensor, asking for binary outputs; returns the
    body and its JSON header's length (the ``Inference-Header-Content-Length`` value)."""
    data = np.asarray(row, dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": input_name, "datatype": "FP32", "shape": [1, len(row)],
                                     "parameters": {"binary_data_size": len(data)}}],
                         "parameters": {"binary_data_output": True}}, separators=(",", ":")).encode()
    return header + data, len(header)


def _lua_bytes(data: bytes) -> str:
    """``data`` as a Lua string literal of decimal escapes: any byte, a NUL or a CR included, arrives intact."""
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def wrk_lua_binary_script(body: bytes, header_length: int) -> str:
    """Like :func:`wrk_lua_script` for a binary-tensor body (raw bytes, with its header length header)."""
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}
    return _WRK_LUA.substitute(headers=_lua_headers(headers), body=_lua_bytes(body), requests="", marker=WRK_MARKER)


def measure_raw(model_path: Path, device: Device, batch_sizes: Sequence[int], seconds: float,
                label: str = "raw onnxruntime", spin_waits: Sequence[bool] = (False,)) -> dict[str, Any]:
    """rows/s of ONNX Runtime in this process, per batch size and spin-wait setting, with the model server's
    session settings otherwise (its thread count; IO binding on CUDA)."""
    from serving.runtime import Session

    rng = np.random.default_rng(0)
    by_batch = []
    providers: list[str] = []
    threads = 0
    for spin in spin_waits:
        session = Session(model_path, device, spin_wait=spin)
        providers, threads = session.providers, session.threads
        inputs, _ = session.io_specs()
        for batch in batch_sizes:
            feed = {name: rng.standard_normal([batch if d == -1 else d for d in shape]).astype(np.float32)
                    for name, _dtype, shape in inputs}
            session.run(feed)  # warm-up: first-run allocations stay out of the timing
            runs = 0
            started = time.perf_counter()
            elapsed = 0.0
            while elapsed < seconds and runs < RAW_MAX_RUNS:
                session.run(feed)
                runs += 1
                elapsed = time.perf_counter() - started
            by_batch.append({"batch": batch, "spin_wait": spin, "runs": runs, "seconds": elapsed,
                             "rows_per_s": batch * runs / elapsed, "ms_per_run": 1000.0 * elapsed / runs})
            print(f"  {label} batch {batch:>4}, spin {'on ' if spin else 'off'}: {batch * runs / elapsed:>10,.0f} "
                  f"rows/s ({1000.0 * elapsed / runs:.2f} ms/run)", flush=True)
        del session
        gc.collect()
    best = max(by_batch, key=lambda r: r["rows_per_s"])
    return {"providers": providers, "threads": threads, "seconds_per_batch": seconds, "by_batch": by_batch,
            "best_batch": best["batch"], "best_spin_wait": best["spin_wait"], "best_rows_per_s": best["rows_per_s"]}


def _measure_server(ctx: SuiteContext, label: str, model: str, extra: list[str], script_text: str,
                    rows_per_request: int, duration_s: int, *, connections: int = WRK_CONNECTIONS,
                    wrk_threads: int = WRK_THREADS) -> dict[str, Any]:
    """One model server, one wrk load: throughput, latency, and the server's CPU per answered request."""
    name = model.split(":")[0]
    script = ctx.work_dir / f"{label}.lua"
    script.write_text(script_text)
    with model_server(ctx.repo, [model], extra, ctx.work_dir) as server:
        provider, threads = server.provider(model)
        url = f"{server.url}/v2/models/{name}/infer"
        print(f"  {label}: server ready on {server.url} ({provider or 'provider not logged'}); "
              f"warm-up {WARMUP_S}s, then {duration_s}s", flush=True)
        command = functools.partial(_serving_wrk_command, threads=wrk_threads)
        warmup = _run_serving_wrk(command(url, script, WARMUP_S, connections))
        stats0, cpu0, pressure0 = model_stats(server.url, name), cpu_readings({"server": server}), cpu_pressure_s()
        result = _run_serving_wrk(command(url, script, duration_s, connections))
        stats1, cpu1, pressure1 = model_stats(server.url, name), cpu_readings({"server": server}), cpu_pressure_s()
    result["connections"] = connections
    result["label"] = label
    result["model"] = model
    result["server_command"] = "bluegreen serve-model " + " ".join(_display(a) for a in server.args[4:])
    result["wrk_command"] = " ".join(command(url, script.name, duration_s, connections))
    result["provider"], result["server_threads"] = provider, threads
    result["rows_per_request"] = rows_per_request
    result["rows_per_s"] = result["requests_per_s"] * rows_per_request
    result["warmup"] = {"requests": warmup["requests"], "non_2xx": warmup["non_2xx"],
                        "socket_errors": warmup["socket_errors"]}
    cpu, cores = cpu_used(cpu0, cpu1, result["duration_s"])
    result["server_cpu_s"], result["server_cores"] = cpu["server"], cores["server"]
    answered = result["requests"] - result["non_2xx"]
    used = cpu["server"]
    result["server_cpu_us_per_request"] = None if used is None or answered <= 0 else 1e6 * used / answered
    result["cpu_pressure"] = (None if pressure0 is None or pressure1 is None or result["duration_s"] <= 0
                              else (pressure1 - pressure0) / result["duration_s"])
    if stats0 is not None and stats1 is not None and stats1[1] > stats0[1]:
        rows, runs = stats1[0] - stats0[0], stats1[1] - stats0[1]
        result["server_batches"] = {"rows": rows, "runs": runs, "mean_rows_per_run": rows / runs}
    else:
        result["server_batches"] = None
    result["flagged"] = result["non_2xx"] > 0 or result["socket_errors"] > 0 or result["requests"] == 0
    return result


def _serving_wrk_command(url: str, script: Path | str, duration_s: int, connections: int, *,
                         threads: int) -> list[str]:
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", f"--timeout={WRK_TIMEOUT_S}s",
            "--latency", "-s", str(script), url]


def _run_serving_wrk(command: list[str]) -> dict[str, Any]:
    _check_loopback(command[-1])
    duration_s = int(command[3][2:-1])
    proc, cpu = run_child(command, duration_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {proc.stderr.strip() or proc.stdout[-2000:]}")
    result = parse_wrk_output(proc.stdout)
    result["wrk_cpu_s"] = cpu
    result["wrk_cores"] = cpu["total"] / result["duration_s"] if result["duration_s"] else 0.0
    return result


def _display(arg: str) -> str:
    """A command-line argument as a reader would type it: paths inside the project made relative."""
    path = Path(arg)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else arg


def _reproduce(suite: str, ctx: SuiteContext) -> str:
    from models.build import DEFAULT_REPOSITORY

    command = f"bluegreen bench {suite} --duration {ctx.duration_s:g}"
    if ctx.device != "auto":
        command += f" --device {ctx.device}"
    if ctx.repo.resolve() != Path(DEFAULT_REPOSITORY).resolve():
        command += f" --repo {_display(str(ctx.repo))}"
    return command


def _ratio(name: str, value: float, target: float | None, stretch: float | None = None, *,
           at_most: bool = False, unit: str = "x") -> dict[str, Any]:
    """A ratio and its verdict: met when ``value >= target`` (``value <= target`` when ``at_most``); a ratio
    without a target is reported only (``met`` None). ``unit`` follows the figures (``""`` for a share)."""
    def meets(bound: float | None) -> bool | None:
        return None if bound is None else (value <= bound if at_most else value >= bound)

    return {"name": name, "value": value, "target": target, "stretch": stretch, "at_most": at_most, "unit": unit,
            "met": meets(target), "stretch_met": None if target is None else meets(stretch)}


def ensure_models(repo: Path, models: Sequence[str]) -> None:
    """Build the bundled models among ``models`` (``name:version``) that are missing from ``repo``."""
    missing = {m for m in models if not (repo / m.split(":")[0] / m.split(":")[1] / "model.onnx").exists()}
    if missing:
        from models.build import build_all

        print(f"  {', '.join(sorted(missing))} missing from {repo}; building", flush=True)
        for line in build_all(repo, only=missing):
            print(f"  {line}", flush=True)


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


def cuda_offered() -> tuple[bool, list[str]]:
    import onnxruntime as ort

    offered = list(ort.get_available_providers())
    return "CUDAExecutionProvider" in offered, offered


def run_serving(ctx: SuiteContext) -> dict[str, Any]:
    """The model server's cost and throughput against raw ONNX Runtime, all in one run.

    digits (tiny: the server's own cost is the figure) batched and unbatched, JSON, at wrk -t1 -c32: CPU µs
    of the server per answered request. wide (heavy: throughput is the figure) batched and unbatched, JSON and
    binary tensors: rows/s against raw ONNX Runtime's best batch (16-128, spin-wait off and on, the server's
    thread count). "Batched" is the server's default settings; "unbatched" adds ``--max-batch-size 1``.
    Order: raw ONNX Runtime first (only this process busy), then each server started, measured and stopped
    before the next so nothing else competes for the cores, then raw ONNX Runtime's best batch again.
    """
    device: Device = ctx.device
    if device == "cuda":
        offered, providers = cuda_offered()
        if not offered:
            reason = f"skipped: CUDAExecutionProvider not offered (providers: {', '.join(providers)})"
            print(f"  {reason}", flush=True)
            raise SuiteSkipped(reason)
    name, version = SERVING_MODEL
    model = f"{name}:{version}"
    digits = f"{SERVING_DIGITS[0]}:{SERVING_DIGITS[1]}"
    model_path = ctx.repo / name / version / "model.onnx"
    ensure_models(ctx.repo, [model, digits])
    duration_s = max(1, round(ctx.duration_s))
    wide_row = np.random.default_rng(0).standard_normal(512).round(6).tolist()
    digits_row = [float(v) for v in np.random.default_rng(1).integers(0, 17, size=64)]
    wide_json = wrk_lua_script(v2_json_body("input", wide_row))
    wide_binary = wrk_lua_binary_script(*v2_binary_body("input", wide_row))
    digits_json = wrk_lua_script(v2_json_body("input", digits_row))

    raw = measure_raw(model_path, device, RAW_BATCH_SIZES, RAW_SECONDS_PER_BATCH, spin_waits=RAW_SPIN_WAIT)
    common = ["--device", device]
    unbatched = ["--max-batch-size", "1"]
    small = {"connections": DIGITS_CONNECTIONS, "wrk_threads": DIGITS_WRK_THREADS}
    plan: list[tuple[str, str, list[str], str, dict[str, int]]] = [
        ("digits batched, JSON", digits, common, digits_json, small),
        ("digits unbatched, JSON", digits, [*common, *unbatched], digits_json, small),
        ("wide batched, JSON", model, common, wide_json, {}),
        ("wide batched, binary", model, common, wide_binary, {}),
        ("wide unbatched, JSON", model, [*common, *unbatched], wide_json, {}),
        ("wide unbatched, binary", model, [*common, *unbatched], wide_binary, {}),
    ]
    runs: dict[str, dict[str, Any]] = {}
    for label, which, extra, script, load in plan:
        runs[label] = _measure_server(ctx, label.replace(" ", "-").replace(",", ""), which, extra, script, 1,
                                      duration_s, **load)
        runs[label]["settings"] = {"max_batch_size": 1} if unbatched[0] in extra else {"defaults": 1}

    # The machine is shared: measure the best batch again now that the servers are done. The ratio takes the
    # higher figure (the conservative choice), and the spread between the two says how noisy the run was.
    recheck = measure_raw(model_path, device, [raw["best_batch"]], RAW_SECONDS_PER_BATCH,
                          label="raw onnxruntime, again", spin_waits=[raw["best_spin_wait"]])["by_batch"][0]
    raw["recheck_after_servers"] = recheck
    raw["best_rows_per_s_before"] = raw["best_rows_per_s"]
    raw["best_rows_per_s"] = max(raw["best_rows_per_s"], recheck["rows_per_s"])
    spread = abs(recheck["rows_per_s"] - raw["best_rows_per_s_before"]) / raw["best_rows_per_s"]
    raw["spread_before_after"] = spread

    def rows(label: str) -> float:
        return float(runs[label]["rows_per_s"])

    def cpu_us(label: str) -> float:
        value = runs[label]["server_cpu_us_per_request"]
        return float("inf") if value is None else float(value)

    best = f"batch {raw['best_batch']}, spin {'on' if raw['best_spin_wait'] else 'off'}"
    ratios = [
        _ratio("digits batched, server CPU per request", cpu_us("digits batched, JSON"),
               TARGET_DIGITS_BATCHED_CPU_US, STRETCH_DIGITS_BATCHED_CPU_US, at_most=True, unit=" µs"),
        _ratio("digits unbatched, server CPU per request", cpu_us("digits unbatched, JSON"),
               TARGET_DIGITS_UNBATCHED_CPU_US, STRETCH_DIGITS_UNBATCHED_CPU_US, at_most=True, unit=" µs"),
        _ratio(f"wide batched JSON / raw ONNX Runtime ({best}) rows/s", rows("wide batched, JSON") /
               raw["best_rows_per_s"], TARGET_BATCHED_VS_RAW, STRETCH_BATCHED_VS_RAW),
        _ratio(f"wide batched binary / raw ONNX Runtime ({best}) rows/s", rows("wide batched, binary") /
               raw["best_rows_per_s"], TARGET_BINARY_VS_RAW, STRETCH_BINARY_VS_RAW),
        _ratio("wide batched / unbatched rows/s, JSON", rows("wide batched, JSON") / rows("wide unbatched, JSON")
               if rows("wide unbatched, JSON") else 0.0, TARGET_BATCHED_VS_UNBATCHED, STRETCH_BATCHED_VS_UNBATCHED),
        _ratio("wide batched / unbatched rows/s, binary", rows("wide batched, binary") /
               rows("wide unbatched, binary") if rows("wide unbatched, binary") else 0.0, None),
    ]
    notes = [SHARED_CORES_NOTE]
    if spread > 0.1:
        notes.append(f"raw ONNX Runtime at {best} differed by {spread:.0%} between the start and the end of this "
                     f"run ({raw['best_rows_per_s_before']:,.0f} vs {recheck['rows_per_s']:,.0f} rows/s): something "
                     "else was using the cores, so treat these ratios as noisy.")
    pressures = [r["cpu_pressure"] for r in runs.values() if r.get("cpu_pressure") is not None]
    if pressures:
        notes.append(f"CPU pressure (share of time some runnable task waited for a core) during the server runs: "
                     f"{min(pressures):.0%}-{max(pressures):.0%}.")
    used = {r["provider"] for r in runs.values()} | {raw["providers"][0]}
    if len(used - {None}) > 1:
        notes.append(f"the runs did not all use the same execution provider: {sorted(p for p in used if p)}")
    return {
        "suite": "serving" if device != "cuda" else "serving-cuda",
        "title": "Serving: the model server vs raw ONNX Runtime" + (" on CUDA" if device == "cuda" else ""),
        "command": _reproduce("serving", ctx),
        "settings": {
            "model": model, "digits_model": digits, "model_path": _display(str(model_path)),
            "device": device, "rows_per_request": 1, "connections": WRK_CONNECTIONS, "wrk_threads": WRK_THREADS,
            "digits_connections": DIGITS_CONNECTIONS, "digits_wrk_threads": DIGITS_WRK_THREADS,
            "duration_s": duration_s, "warmup_s": WARMUP_S,
            "raw_batch_sizes": list(RAW_BATCH_SIZES), "raw_spin_wait": list(RAW_SPIN_WAIT),
            "raw_seconds_per_batch": RAW_SECONDS_PER_BATCH,
        },
        "runs": runs,
        "raw": raw,
        "ratios": ratios,
        "ok": not any(r["flagged"] for r in runs.values()),
        "notes": notes,
    }


def _saturate(round_no: int, target: str, url: str, script: Path, duration_s: int,
              processes: Mapping[str, ServerProcess], *, expect_upstream: bool = True,
              counters: Callable[[], Mapping[str, int]] | None = None) -> dict[str, Any]:
    """One wrk run at GATEWAY_CONNECTIONS: warm-up, then the measured run with every process's CPU around it.

    The model server's row count around the run says how many requests it inferred: through the gateway that must
    be every request (``expect_upstream``), or something (a cache) answered without it and the run does not measure
    the proxy path. ``counters`` (a gateway's cache counters, say) are read around the measured run too, and their
    differences kept under ``"counters"``, so that the caller can check which path the run took.
    """
    name, version = GATEWAY_MODEL
    server_url = processes["model_server"].url
    warmup = run_wrk(url, script, WARMUP_S, GATEWAY_CONNECTIONS)
    counters0 = counters() if counters is not None else {}
    before, stats0, pressure0 = cpu_readings(processes), model_stats(server_url, name, version), cpu_pressure_s()
    result = run_wrk(url, script, duration_s, GATEWAY_CONNECTIONS)
    after, stats1, pressure1 = cpu_readings(processes), model_stats(server_url, name, version), cpu_pressure_s()
    if counters is not None:
        counters1 = counters()
        result["counters"] = {k: counters1[k] - v for k, v in counters0.items() if k in counters1}
    result["cpu_s"], result["cores"] = cpu_used(before, after, result["duration_s"])
    result["cpu_pressure"] = cpu_used({"psi": pressure0}, {"psi": pressure1}, result["duration_s"])[1]["psi"]
    result["model_server_rows"] = None if stats0 is None or stats1 is None else stats1[0] - stats0[0]
    result.update(round=round_no, target=target, url=url,
                  wrk_command=" ".join(wrk_command(url, script.name, duration_s, GATEWAY_CONNECTIONS)),
                  warmup={"requests": warmup["requests"], "non_2xx": warmup["non_2xx"],
                          "socket_errors": warmup["socket_errors"]})
    result["bypassed_model_server"] = (expect_upstream and result["model_server_rows"] is not None
                                       and result["model_server_rows"] < 0.99 * result["requests"])
    result["flagged"] = (result["non_2xx"] > 0 or result["socket_errors"] > 0 or result["requests"] == 0
                         or result["bypassed_model_server"])
    print(f"  round {round_no} {target:>7}: {result['requests_per_s']:>8,.0f} req/s, p50 "
          f"{result['latency_ms']['p50']:.1f} ms, p99 {result['latency_ms']['p99']:.1f} ms"
          + ("  FLAGGED" if result["flagged"] else ""), flush=True)
    return result


def gateway_cpu_us_per_request(run: Mapping[str, Any]) -> float | None:
    """The gateway's CPU time per answered request over a measured run, in µs: its cost per request, which the
    cores' crowding moves less than its throughput."""
    cpu = (run.get("cpu_s") or {}).get("gateway")
    requests = run.get("requests") or 0
    return None if cpu is None or requests <= 0 else cpu / requests * 1e6


def round_table(runs: Sequence[Mapping[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per round that has a ``baseline`` run: every target's requests/s, and each other target's over the baseline's
    (0 when the baseline answered nothing)."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(int(run["round"]), {})[str(run["target"])] = float(run["requests_per_s"])
    table = []
    for n, rps in sorted(by_round.items()):
        if baseline in rps and len(rps) > 1:
            base = rps[baseline]
            ratios = {t: (v / base if base > 0 else 0.0) for t, v in rps.items() if t != baseline}
            table.append({"round": n, "rps": rps, "ratios": ratios})
    return table


def median_round_ratio(table: Sequence[Mapping[str, Any]], target: str) -> float:
    """The median over the rounds of ``target``'s ratio to the baseline (from :func:`round_table`)."""
    values = [r["ratios"][target] for r in table if target in r["ratios"]]
    if not values:
        raise SuiteError(f"no round measured {target} beside its baseline")
    return float(statistics.median(values))


def proxy_cpu_us_per_request(run: Mapping[str, Any]) -> float | None:
    """A proxy's (the gateway's, nginx's worker's) CPU time per answered request over a measured run, in µs."""
    cpu = (run.get("cpu_s") or {}).get("proxy")
    requests = run.get("requests") or 0
    return None if cpu is None or requests <= 0 else cpu / requests * 1e6


def round_ratios(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per round that has both, the direct and gateway requests/s and gateway / direct; with the proxies' CPU per
    request where measured (``proxy_cpu_us_per_request``), and nginx's beside the gateway's when it ran."""
    cpu = {(int(run["round"]), str(run["target"])): run.get("proxy_cpu_us_per_request") for run in runs}
    rows = []
    for r in round_table(runs, "direct"):
        if "gateway" not in r["ratios"]:
            continue
        row: dict[str, Any] = {"round": r["round"], "direct_rps": r["rps"]["direct"],
                               "gateway_rps": r["rps"]["gateway"], "ratio": r["ratios"]["gateway"]}
        gateway_cpu, nginx_cpu = cpu.get((r["round"], "gateway")), cpu.get((r["round"], "nginx"))
        if gateway_cpu is not None:
            row["gateway_cpu_us"] = gateway_cpu
        if "nginx" in r["rps"]:
            row["nginx_rps"] = r["rps"]["nginx"]
            if nginx_cpu:
                row["nginx_cpu_us"] = nginx_cpu
                if gateway_cpu is not None:
                    row["cpu_vs_nginx"] = gateway_cpu / nginx_cpu
        rows.append(row)
    return rows


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_latency_ms(runs: Sequence[Mapping[str, Any]],
                      percentiles: Sequence[str] = LATENCY_PERCENTILES) -> dict[str, dict[str, float | None]]:
    """Per target, the median over its runs of each percentile of open-loop latency (ms)."""
    targets = dict.fromkeys(str(r["target"]) for r in runs)
    return {t: {q: _median([r["latency_ms"].get(q) for r in runs if r["target"] == t]) for q in percentiles}
            for t in targets}


def added_latency_ms(medians: Mapping[str, Mapping[str, float | None]]) -> dict[str, float | None]:
    """gateway − direct at each percentile both have (from :func:`median_latency_ms`)."""
    added: dict[str, float | None] = {}
    for q in LATENCY_PERCENTILES:
        d, g = medians.get("direct", {}).get(q), medians.get("gateway", {}).get(q)
        added[q] = None if d is None or g is None else g - d
    return added


def server_timing_medians(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per ``server-timing`` metric, the median over the runs that carried it of its p50 and p99, and the count."""
    names = dict.fromkeys(name for r in runs for name in r.get("server_timing_ms", {}))
    doc: dict[str, dict[str, float | None]] = {}
    for name in names:
        per_run = [r["server_timing_ms"][name] for r in runs if name in r.get("server_timing_ms", {})]
        doc[name] = {"p50": _median([t.get("p50") for t in per_run]), "p99": _median([t.get("p99") for t in per_run]),
                     "count": float(sum(t.get("count") or 0 for t in per_run)), "runs": float(len(per_run))}
    return doc


def run_fixed_rate(run_no: int, target: str, url: str, body_file: Path, rate_per_s: float, duration_s: int,
                   processes: Mapping[str, ServerProcess], work_dir: Path) -> dict[str, Any]:
    """One run of :mod:`loadtests.fixed_rate` as a child process (its CPU accounted apart from this runner's).

    A ``.jsonl`` body file holds one body per line, sent in turn; any other file is the one body sent."""
    _check_loopback(url)
    out = work_dir / f"fixed-rate-{run_no}-{target}.json"
    header_args = [arg for k, v in GATEWAY_REQUEST_HEADERS.items() for arg in ("--header", f"{k}: {v}")]
    cpu_args = [arg for name, p in processes.items() for arg in ("--cpu-of", f"{name}={p.popen.pid}")]
    body_option = "--body-lines" if body_file.suffix == ".jsonl" else "--body-file"
    command = [sys.executable, "-m", "loadtests.fixed_rate", url, "--rate", f"{rate_per_s:.1f}",
               "--duration", str(duration_s), "--warmup", str(WARMUP_S), body_option, str(body_file),
               "--connections", str(FIXED_RATE_CONNECTIONS), "--timeout", f"{FIXED_RATE_TIMEOUT_S:g}",
               *header_args, *cpu_args, "--out", str(out)]
    name, version = GATEWAY_MODEL
    stats0 = model_stats(processes["model_server"].url, name, version)
    pressure0, started = cpu_pressure_s(), time.monotonic()
    proc, cpu = run_child(command, WARMUP_S + duration_s + FIXED_RATE_TIMEOUT_S + 60)
    wall_s = time.monotonic() - started
    stats1, pressure1 = model_stats(processes["model_server"].url, name, version), cpu_pressure_s()
    if proc.returncode != 0:
        raise RuntimeError(f"the fixed-rate generator exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["run"], result["target"] = run_no, target
    result["process_cpu_s"] = cpu  # the whole child: start-up and warm-up too
    result["process_wall_s"] = wall_s
    # Over the whole child (the parent cannot see its measured window): start-up and warm-up included.
    result["cpu_pressure"] = cpu_used({"psi": pressure0}, {"psi": pressure1}, wall_s)[1]["psi"]
    result["command"] = ("python -m loadtests.fixed_rate " + " ".join(
        _display(a) if not a.startswith(str(work_dir)) else Path(a).name for a in command[3:]))
    # The stats span the whole child, warm-up included: every request it sent must have reached the model server.
    result["model_server_rows"] = None if stats0 is None or stats1 is None else stats1[0] - stats0[0]
    sent = result["warmup_requests"] + result["requests"]
    result["bypassed_model_server"] = result["model_server_rows"] is not None and result["model_server_rows"] < sent
    result["flagged"] = bool(result["non_2xx"] or result["errors"] or result["unfinished"] or not result["answered"]
                             or result["bypassed_model_server"])
    lat, lag = result["latency_ms"], result["send_lag_ms"]
    print(f"  fixed rate {run_no} {target:>7}: {rate_per_s:,.0f} req/s asked, "
          f"{result['answered_per_s']:,.0f} answered/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
          f"send lag p99 {lag['p99']:.2f} ms, generator {_fmt_cores(result['cores'].get('generator'))}"
          + ("  FLAGGED" if result["flagged"] else ""), flush=True)
    return result


def _check_answers(urls: Mapping[str, str], body: str) -> dict[str, str]:
    """Two requests each way before measuring: all must answer 200, the gateway's from blue with server-timing,
    and its second answer (the same body again) must not come from a cache."""
    headers = {"content-type": "application/json", **GATEWAY_REQUEST_HEADERS}
    with httpx.Client(timeout=10.0) as client:
        answers = [(target, client.post(url, content=body, headers=headers))
                   for _ in range(2) for target, url in urls.items()]
    for target, resp in answers:
        if resp.status_code != 200:
            raise SuiteError(f"{target} ({urls[target]}) answered {resp.status_code}: {resp.text[:500]}")
    gw = [resp.headers for target, resp in answers if target == "gateway"][-1]
    if gw.get("x-bluegreen-color") != "blue" or "server-timing" not in gw:
        raise SuiteError(f"the gateway's answer lacks the expected headers (color blue, server-timing): {dict(gw)}")
    if gw.get("x-bluegreen-cache") in ("hit", "stale"):
        raise SuiteError(f"the gateway answered a repeated request from its cache despite {GATEWAY_REQUEST_HEADERS}")
    return {k: v for k, v in gw.items() if k.startswith("x-bluegreen-") or k == "server-timing"}


def run_gateway(ctx: SuiteContext) -> dict[str, Any]:
    """Gateway vs direct to the model server vs nginx: throughput and CPU per request at saturation, added latency
    at half load.

    One model server (``digits`` 1 and 2, default batching), one gateway in front of it (blue = version 1 at
    weight 100; green = version 2 on the same server at weight 0, never called) and, when Debian's nginx is
    installed, nginx with one worker proxying to the same server with keep-alive (the reference for what a proxy
    hop costs) run for the whole suite. wrk measures each in the order of :data:`GATEWAY_ROUNDS` — alternating,
    so that drift in what else the shared machine runs shows up as spread between rounds rather than as a bias to
    one side — and the ratios quoted are medians of the rounds' ratios. The proxies' CPU per request (process CPU
    time over answered requests; nginx's worker) is the figure that says what the hop costs. Then
    :mod:`loadtests.fixed_rate` sends :data:`HALF_LOAD_FRACTION` of the gateway's median saturated rate to direct
    and the gateway, in the order of :data:`HALF_LOAD_ORDER`, and the added latency is median(gateway) −
    median(direct) at each percentile.
    """
    name, version = GATEWAY_MODEL
    models = [f"{name}:{version}", f"{name}:{GATEWAY_GREEN_VERSION}"]
    ensure_models(ctx.repo, models)
    duration_s = max(1, round(ctx.duration_s))
    row = [float(x) for x in np.random.default_rng(0).integers(0, 17, 64)]  # pixel intensities 0-16
    body = v2_json_body("input", row)
    script = ctx.work_dir / "gateway.lua"
    script.write_text(wrk_lua_script(body, GATEWAY_REQUEST_HEADERS))
    body_file = ctx.work_dir / "gateway-body.json"
    body_file.write_text(body)
    with_nginx = nginx_binary() is not None
    orders = [tuple(t for t in order if with_nginx or t != "nginx") for order in GATEWAY_ROUNDS]

    with model_server(ctx.repo, models, [], ctx.work_dir) as server, contextlib.ExitStack() as stack:
        routing = digits_routing((version, server.url), (GATEWAY_GREEN_VERSION, server.url))
        gateway = stack.enter_context(gateway_server(routing, ctx.work_dir))
        direct_url = f"{server.url}/v2/models/{name}/versions/{version}/infer"
        urls = {"direct": direct_url, "gateway": f"{gateway.url}/v2/models/{name}/infer"}
        proxies: dict[str, ServerProcess] = {"gateway": gateway}
        if with_nginx:
            nginx = stack.enter_context(nginx_proxy(server.url, ctx.work_dir))
            urls["nginx"] = f"{nginx.url}/v2/models/{name}/versions/{version}/infer"
            proxies["nginx"] = nginx
        provenance = _check_answers(urls, body)
        print(f"  model server {server.url}, gateway {gateway.url}"
              + (f", nginx {urls['nginx'].split('/v2')[0]}" if with_nginx else " (nginx not installed)")
              + f"; {len(orders)} rounds of wrk at {GATEWAY_CONNECTIONS} connections ({WARMUP_S}s warm-up + "
              f"{duration_s}s each)", flush=True)
        runs = []
        for n, order in enumerate(orders, start=1):
            for target in order:
                processes = {"model_server": server, **({"proxy": proxies[target]} if target in proxies else {})}
                if target == "gateway":
                    processes["gateway"] = gateway
                run = _saturate(n, target, urls[target], script, duration_s, processes)
                run["proxy_cpu_us_per_request"] = proxy_cpu_us_per_request(run)
                runs.append(run)
        rounds = round_ratios(runs)
        gateway_rps = statistics.median(r["gateway_rps"] for r in rounds)
        if gateway_rps <= 0:
            raise SuiteError("the gateway answered no request at saturation")
        rate = min(HALF_LOAD_FRACTION * gateway_rps, HALF_LOAD_MAX_RPS)
        half_processes = {"gateway": gateway, "model_server": server}
        half = [run_fixed_rate(n, target, urls[target], body_file, rate, duration_s, half_processes, ctx.work_dir)
                for n, target in enumerate(HALF_LOAD_ORDER, start=1)]
        error_notes = _error_notes([gateway])
        server_command = _server_command(server)

    median_ratio = statistics.median(r["ratio"] for r in rounds)
    gateway_cpu = _median([r.get("gateway_cpu_us") for r in rounds])
    ratios = []
    if gateway_cpu is not None:
        ratios.append(_ratio(f"gateway CPU µs per request, cache bypassed (median of {len(rounds)} rounds)",
                             gateway_cpu, TARGET_GATEWAY_CPU_US, STRETCH_GATEWAY_CPU_US, at_most=True, unit=" µs"))
    nginx_ratio = _median([r.get("cpu_vs_nginx") for r in rounds])
    if nginx_ratio is not None:
        ratios.append(_ratio(f"gateway CPU per request / nginx CPU per request (median of {len(rounds)} rounds)",
                             nginx_ratio, TARGET_GATEWAY_VS_NGINX_CPU, STRETCH_GATEWAY_VS_NGINX_CPU, at_most=True))
        nginx_cpu = _median([r.get("nginx_cpu_us") for r in rounds])
        if nginx_cpu is not None:
            ratios.append(_ratio(f"nginx CPU µs per request, one worker (median of {len(rounds)} rounds)",
                                 nginx_cpu, None, unit=" µs"))
    ratios.append(_ratio(f"gateway / direct requests/s (median of {len(rounds)} rounds)", median_ratio,
                         TARGET_GATEWAY_VS_DIRECT, STRETCH_GATEWAY_VS_DIRECT))
    medians = median_latency_ms(half)
    timing = server_timing_medians([r for r in half if r["target"] == "gateway"])
    notes = [GATEWAY_SHARED_CORES_NOTE, FIXED_RATE_NOTE, *_spread_note([r["ratio"] for r in rounds], "ratios")]
    if not with_nginx:
        notes.append("nginx is not installed (Debian's `nginx`), so this run has no reference proxy row.")
    if any(r["bypassed_model_server"] for r in [*runs, *half]):
        notes.append("in a run marked ⚠ the model server inferred fewer rows than the gateway answered: something "
                     "(a cache not bypassed) answered without it, so that run does not measure the proxy path.")
    for doc in half:
        lag = doc["send_lag_ms"].get("p99")
        if lag is not None and lag > GENERATOR_LAG_WARN_MS:
            notes.append(f"in fixed-rate run {doc['run']} ({doc['target']}) the generator started 1% of its requests "
                         f"{lag:.1f} ms or more late (p99 send lag): the cores were crowded, and part of that run's "
                         "tail is the generator's own delay, which it still counts.")
    notes += error_notes
    return {
        "suite": "gateway",
        "title": "Gateway vs direct to the model server",
        "command": _reproduce("gateway", ctx),
        "settings": {
            "model": f"{name}:{version}", "rows_per_request": 1, "request_headers": GATEWAY_REQUEST_HEADERS,
            "server_command": server_command, "routing": _display_routing(routing),
            "connections": GATEWAY_CONNECTIONS, "wrk_threads": WRK_THREADS, "duration_s": duration_s,
            "warmup_s": WARMUP_S, "round_orders": [list(order) for order in orders],
            "nginx": {"workers": 1, "upstream_keepalive": NGINX_KEEPALIVE} if with_nginx else None,
            "half_load_fraction": HALF_LOAD_FRACTION, "half_load_max_rps": HALF_LOAD_MAX_RPS,
            "half_load_order": list(HALF_LOAD_ORDER),
            "fixed_rate_connections": FIXED_RATE_CONNECTIONS,
            "fixed_rate_timeout_s": FIXED_RATE_TIMEOUT_S,
        },
        "gateway_response_headers": provenance,
        "saturation": runs,
        "rounds": rounds,
        "ratios": ratios,
        "half_load": {"rate_per_s": rate, "basis_rps": gateway_rps, "runs": half, "median_ms": medians,
                      "added_ms": added_latency_ms(medians)},
        "server_timing_ms": timing,
        "ok": not (any(r["flagged"] for r in runs) or any(d["flagged"] for d in half)),
        "notes": notes,
    }


def _display_routing(routing: Mapping[str, Any]) -> dict[str, Any]:
    """The routing file as the report shows it: backend ports vary per run, so they read as placeholders."""
    text = re.sub(rf"http://{re.escape(LOOPBACK)}:\d+", "http://127.0.0.1:<model server port>", json.dumps(routing))
    doc: dict[str, Any] = json.loads(text)
    return doc



def digits_routing(blue: tuple[str, str], green: tuple[str, str], shadow_percent: int | None = None) -> dict[str, Any]:
    """The routing file for the benchmarks' model, blue at weight 100: each color as (version, backend URL)."""
    route: dict[str, Any] = {
        "colors": {"blue": {"version": blue[0], "backends": [blue[1]]},
                   "green": {"version": green[0], "backends": [green[1]]}},
        "weights": {"blue": 100, "green": 0}}
    if shadow_percent is not None:
        route["shadow_percent"] = shadow_percent
    return {"models": {GATEWAY_MODEL[0]: route}}


def _server_command(server: ServerProcess) -> str:
    """A model server's command line as a reader would type it, its port a placeholder."""
    return re.sub(r"--port \d+", "--port <free port>",
                  "bluegreen serve-model " + " ".join(_display(a) for a in server.args[4:]))


def _log_errors(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if " ERROR " in line or "Traceback" in line]


def _error_notes(servers: Sequence[ServerProcess]) -> list[str]:
    notes = []
    for server in servers:
        errors = _log_errors(server)
        if errors:
            notes.append(f"the {server.name} logged {len(errors)} error line(s), first: `{errors[0][:200]}`")
    return notes


def _spread_note(values: Sequence[float], what: str) -> list[str]:
    """A note when ratios measured in several rounds spread over more than 10% of their median."""
    mid = statistics.median(values) if values else 0.0
    if len(values) < 2 or not mid:
        return []
    spread = (max(values) - min(values)) / mid
    if spread <= 0.1:
        return []
    return [f"the rounds' {what} spread over {spread:.0%} of their median ({min(values):.2f} to {max(values):.2f}): "
            "the cores were crowded (see CPU pressure); the median is the figure to quote, and a rerun may differ."]


def _post_checked(client: httpx.Client, url: str, body: str, headers: Mapping[str, str] | None = None,
                  cache: str | None = None) -> httpx.Response:
    """POST ``body``; 200 is required, and when ``cache`` is given the gateway's ``x-bluegreen-cache`` too."""
    resp = client.post(url, content=body, headers={"content-type": "application/json", **(headers or {})})
    if resp.status_code != 200:
        raise SuiteError(f"{url} answered {resp.status_code}: {resp.text[:500]}")
    if cache is not None and resp.headers.get("x-bluegreen-cache") != cache:
        raise SuiteError(f"{url} answered with x-bluegreen-cache {resp.headers.get('x-bluegreen-cache')!r}, "
                         f"expected {cache!r}: {dict(resp.headers)}")
    return resp


def cache_path_shares(counters: Mapping[str, int]) -> dict[str, float]:
    """Each lookup path's share of the lookups counted (:data:`CACHE_PATHS`); all 0 when there were none."""
    lookups = sum(counters.get(k, 0) for k in CACHE_PATHS)
    return {k: (counters.get(k, 0) / lookups if lookups else 0.0) for k in CACHE_PATHS}


def cache_path_ok(target: str, counters: Mapping[str, int]) -> bool:
    """Whether a cache run's lookups went the way its target says (:data:`CACHE_EXPECTED_PATH`)."""
    expected = CACHE_EXPECTED_PATH.get(target)
    if expected is None:
        return True
    path, least = expected
    return sum(counters.get(k, 0) for k in CACHE_PATHS) > 0 and cache_path_shares(counters)[path] >= least


def _prewarm_l2(gateway: ServerProcess, redis: ServerProcess, url: str, bodies: Sequence[str]) -> dict[str, Any]:
    """Send each body once through the L2 gateway (misses, written to Redis in the background), wait until Redis
    holds them all, and prove that one comes back as an L2 hit."""
    import redis as redis_client

    with httpx.Client(timeout=10.0) as client:
        for body in bodies:
            _post_checked(client, url, body, cache="miss")
        r = redis_client.Redis.from_url(redis.url)
        try:
            deadline = time.monotonic() + 10.0
            while True:
                keys = sum(1 for _ in r.scan_iter(match="bluegreen:cache:*", count=1000))
                if keys >= len(bodies):
                    break
                if time.monotonic() > deadline:
                    raise SuiteError(f"Redis holds {keys} cache entries after {len(bodies)} distinct bodies were sent")
                time.sleep(0.1)
        finally:
            r.close()
        before = cache_counters(gateway)
        _post_checked(client, url, bodies[0], cache="hit")  # long gone from the one-entry L1
        after = cache_counters(gateway)
    if after.get("l2_hits", 0) - before.get("l2_hits", 0) != 1:
        raise SuiteError(f"a body stored in Redis was not answered as an L2 hit: {before} -> {after}")
    return {"bodies": len(bodies), "redis_cache_keys": keys}


def _cache_and_redis_counters(gateway: ServerProcess, redis: ServerProcess) -> dict[str, int]:
    return {**cache_counters(gateway), **redis_commands(redis)}


def redis_calls_per_request(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Over the runs that counted Redis commands: calls of each command per request answered, largest first."""
    counted = [r for r in runs if any(k.startswith("redis_") for k in r.get("counters", {}))]
    requests = sum(int(r["requests"]) for r in counted)
    totals: dict[str, int] = {}
    for r in counted:
        for k, v in r["counters"].items():
            if k.startswith("redis_") and v:
                totals[k.removeprefix("redis_")] = totals.get(k.removeprefix("redis_"), 0) + int(v)
    if not requests:
        return {}
    return {k: v / requests for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def run_cache(ctx: SuiteContext) -> dict[str, Any]:
    """The prediction cache: L1 hit, L2 hit and miss through the gateway vs direct to the model server.

    One model server (``digits`` 1 and 2), a private ``redis-server`` and two gateways run for the whole suite:
    one with the embedded L1 only (the L1-hit and miss runs), one with a one-entry L1 in front of Redis (the L2-hit
    run). wrk, :data:`GATEWAY_CONNECTIONS` connections, in the order of :data:`CACHE_ROUNDS`. The L1-hit run sends
    one body again and again; the L2-hit run cycles through :data:`CACHE_L2_BODIES` distinct bodies stored in
    Redis beforehand; the miss run sends a body never seen before with every request. Around every gateway run the
    cache counters of ``GET /admin/v1/cache`` say which way its lookups went, and a run that did not take its
    path (:data:`CACHE_EXPECTED_PATH`) is flagged.
    """
    name, version = GATEWAY_MODEL
    models = [f"{name}:{version}", f"{name}:{GATEWAY_GREEN_VERSION}"]
    ensure_models(ctx.repo, models)
    duration_s = max(1, round(ctx.duration_s))
    rng = np.random.default_rng(0)
    row = [float(x) for x in rng.integers(0, 17, 64)]  # pixel intensities 0-16
    body = v2_json_body("input", row)
    l2_bodies = [v2_json_body("input", [float(x) for x in r])
                 for r in np.unique(rng.integers(0, 17, (CACHE_L2_BODIES, 64)), axis=0)]
    scripts = {"direct": wrk_lua_script(body), "l1_hit": wrk_lua_script(body),
               "l2_hit": wrk_lua_cycle_script(l2_bodies), "miss": wrk_lua_unique_script("input", row)}
    paths = {}
    for target, text in scripts.items():
        paths[target] = ctx.work_dir / f"cache-{target}.lua"
        paths[target].write_text(text)
    common = {"BLUEGREEN_CACHE__TTL_S": str(CACHE_TTL_S)}

    with model_server(ctx.repo, models, [], ctx.work_dir) as server, redis_server(ctx.work_dir) as redis:
        routing = digits_routing((version, server.url), (GATEWAY_GREEN_VERSION, server.url))
        l2_settings = {**common, "BLUEGREEN_REDIS_URL": redis.url,
                       "BLUEGREEN_CACHE__L1_MAX_ENTRIES": str(CACHE_L2_L1_ENTRIES)}
        with gateway_server(routing, ctx.work_dir, common, name="gateway-l1") as gw_l1, \
                gateway_server(routing, ctx.work_dir, l2_settings, name="gateway-l2") as gw_l2:
            gateway_url = f"/v2/models/{name}/infer"
            urls = {"direct": f"{server.url}/v2/models/{name}/versions/{version}/infer",
                    "l1_hit": gw_l1.url + gateway_url, "l2_hit": gw_l2.url + gateway_url,
                    "miss": gw_l1.url + gateway_url}
            gateways = {"l1_hit": gw_l1, "l2_hit": gw_l2, "miss": gw_l1}
            processes: dict[str, dict[str, ServerProcess]] = {
                "direct": {"model_server": server}, "l1_hit": {"gateway": gw_l1, "model_server": server},
                "l2_hit": {"gateway": gw_l2, "redis": redis, "model_server": server},
                "miss": {"gateway": gw_l1, "model_server": server}}
            with httpx.Client(timeout=10.0) as client:
                _post_checked(client, urls["direct"], body)
                _post_checked(client, urls["l1_hit"], body)
                provenance = dict(_post_checked(client, urls["l1_hit"], body, cache="hit").headers)
            if admin_get(gw_l2, "/admin/v1/cache").json().get("l2") != "closed":
                raise SuiteError("the L2 gateway's cache has no Redis tier (GET /admin/v1/cache: l2 is not closed)")
            prewarm = _prewarm_l2(gw_l2, redis, urls["l2_hit"], l2_bodies)
            print(f"  model server {server.url}, redis {redis.url}, gateways {gw_l1.url} (L1) and {gw_l2.url} "
                  f"(L1 of {CACHE_L2_L1_ENTRIES} + Redis, {prewarm['redis_cache_keys']} entries stored); "
                  f"{len(CACHE_ROUNDS)} rounds of wrk at {GATEWAY_CONNECTIONS} connections "
                  f"({WARMUP_S}s warm-up + {duration_s}s each)", flush=True)
            runs = []
            for n, order in enumerate(CACHE_ROUNDS, start=1):
                for target in order:
                    gw = gateways.get(target)
                    counters = None if gw is None else functools.partial(cache_counters, gw)
                    if target == "l2_hit":  # and what Redis was asked for meanwhile
                        counters = functools.partial(_cache_and_redis_counters, gw_l2, redis)
                    run = _saturate(n, target, urls[target], paths[target], duration_s, processes[target],
                                    expect_upstream=target in ("direct", "miss"), counters=counters)
                    if gw is not None:
                        run["gateway"] = gw.name
                        run["path_share"] = cache_path_shares(run["counters"])
                        run["wrong_path"] = not cache_path_ok(target, run["counters"])
                        run["flagged"] = run["flagged"] or run["wrong_path"]
                        if run["wrong_path"]:
                            print(f"  round {n} {target}: FLAGGED, its lookups went {run['counters']}", flush=True)
                    runs.append(run)
            final_stats = {"gateway-l1": admin_get(gw_l1, "/admin/v1/cache").json(),
                           "gateway-l2": admin_get(gw_l2, "/admin/v1/cache").json()}
            notes = [CACHE_NOTE, *_error_notes([gw_l1, gw_l2])]
        server_command = _server_command(server)

    table = round_table(runs, "direct")
    for r in table:
        rps = r["rps"]
        if rps.get("miss"):
            r["ratios"]["L1 hit / miss"] = rps.get("l1_hit", 0.0) / rps["miss"]
    n = len(table)
    cpu = {t: _median([gateway_cpu_us_per_request(r) for r in runs if r["target"] == t]) for t in ("l1_hit", "miss")}
    ratios = [
        _ratio(f"L1 hit / direct requests/s (median of {n} rounds)", median_round_ratio(table, "l1_hit"),
               TARGET_L1_HIT_VS_DIRECT, STRETCH_L1_HIT_VS_DIRECT),
        _ratio(f"L2 hit / direct requests/s (median of {n} rounds)", median_round_ratio(table, "l2_hit"), None),
        _ratio(f"miss / direct requests/s (median of {n} rounds)", median_round_ratio(table, "miss"), None),
        _ratio(f"L1 hit / miss requests/s (median of {n} rounds)", median_round_ratio(table, "L1 hit / miss"), None),
    ]
    if cpu["l1_hit"] is not None:
        ratios.append(_ratio(f"gateway CPU µs per request, L1 hit (median of {n} runs)", cpu["l1_hit"],
                             TARGET_L1_HIT_CPU_US, STRETCH_L1_HIT_CPU_US, at_most=True, unit=" µs"))
    if cpu["miss"] is not None:
        ratios.append(_ratio(f"gateway CPU µs per request, real miss: unique inputs, no Redis (median of {n} runs)",
                             cpu["miss"], TARGET_MISS_CPU_US, STRETCH_MISS_CPU_US, at_most=True, unit=" µs"))
    notes += _spread_note([r["ratios"]["l1_hit"] for r in table if "l1_hit" in r["ratios"]], "L1 hit / direct")
    if any(r.get("wrong_path") for r in runs):
        notes.append("a run marked ⚠ did not take the path it is named after (see its lookups): its throughput "
                     "does not measure that path.")
    return {
        "suite": "cache",
        "title": "Prediction cache: L1 hit, L2 hit and miss vs direct to the model server",
        "command": _reproduce("cache", ctx),
        "settings": {
            "model": f"{name}:{version}", "rows_per_request": 1, "server_command": server_command,
            "routing": _display_routing(routing), "connections": GATEWAY_CONNECTIONS, "wrk_threads": WRK_THREADS,
            "duration_s": duration_s, "warmup_s": WARMUP_S, "round_orders": [list(o) for o in CACHE_ROUNDS],
            "l2_bodies": len(l2_bodies), "l2_gateway_l1_max_entries": CACHE_L2_L1_ENTRIES,
            "gateway_settings": {"gateway-l1": common, "gateway-l2": {**l2_settings, "BLUEGREEN_REDIS_URL":
                                                                      "redis://127.0.0.1:<free port>/0"}},
            "expected_paths": {t: {"counter": c, "least_share": s} for t, (c, s) in CACHE_EXPECTED_PATH.items()},
            "labels": CACHE_LABELS,
        },
        "gateway_response_headers": {k: v for k, v in provenance.items()
                                     if k.startswith("x-bluegreen-") or k == "server-timing"},
        "prewarm": prewarm,
        "redis_calls_per_l2_request": redis_calls_per_request([r for r in runs if r["target"] == "l2_hit"]),
        "saturation": runs,
        "round_table": table,
        "ratios": ratios,
        "cache_stats_at_end": final_stats,
        "ok": not any(r["flagged"] for r in runs),
        "notes": notes,
    }


def run_telemetry(ctx: SuiteContext) -> dict[str, Any]:
    """Gateway throughput with telemetry on vs off (``BLUEGREEN_TELEMETRY=false``), the cache bypassed.

    One model server and two gateways in front of it, identical but for telemetry, run for the whole suite; wrk
    drives one at a time in the order of :data:`TELEMETRY_ROUNDS`, and the ratio quoted is the median of the
    rounds' on / off. Afterwards each gateway's ``/metrics`` must show that it recorded (on) or did not (off).
    """
    name, version = GATEWAY_MODEL
    models = [f"{name}:{version}", f"{name}:{GATEWAY_GREEN_VERSION}"]
    ensure_models(ctx.repo, models)
    duration_s = max(1, round(ctx.duration_s))
    row = [float(x) for x in np.random.default_rng(0).integers(0, 17, 64)]
    body = v2_json_body("input", row)
    script = ctx.work_dir / "telemetry.lua"
    script.write_text(wrk_lua_script(body, GATEWAY_REQUEST_HEADERS))
    settings = {"on": {}, "off": {"BLUEGREEN_TELEMETRY": "false"}}

    with model_server(ctx.repo, models, [], ctx.work_dir) as server:
        routing = digits_routing((version, server.url), (GATEWAY_GREEN_VERSION, server.url))
        with gateway_server(routing, ctx.work_dir, settings["on"], name="gateway-telemetry-on") as gw_on, \
                gateway_server(routing, ctx.work_dir, settings["off"], name="gateway-telemetry-off") as gw_off:
            gateways = {"on": gw_on, "off": gw_off}
            urls = {t: f"{gw.url}/v2/models/{name}/infer" for t, gw in gateways.items()}
            with httpx.Client(timeout=10.0) as client:
                for url in urls.values():
                    for _ in range(2):
                        _post_checked(client, url, body, GATEWAY_REQUEST_HEADERS, cache="bypass")
            print(f"  model server {server.url}, gateways {gw_on.url} (telemetry on) and {gw_off.url} (off); "
                  f"{len(TELEMETRY_ROUNDS)} rounds of wrk at {GATEWAY_CONNECTIONS} connections "
                  f"({WARMUP_S}s warm-up + {duration_s}s each)", flush=True)
            runs = [_saturate(n, target, urls[target], script, duration_s,
                              {"gateway": gateways[target], "model_server": server})
                    for n, order in enumerate(TELEMETRY_ROUNDS, start=1) for target in order]
            recorded = {t: prometheus_value(admin_get(gw, "/metrics").text, "bluegreen_request_duration_seconds_count",
                                            {"model": name}) for t, gw in gateways.items()}
            notes = [TELEMETRY_NOTE, *_error_notes([gw_on, gw_off])]
        server_command = _server_command(server)

    table = round_table(runs, "off")
    median_ratio = median_round_ratio(table, "on")
    ratios = [_ratio(f"telemetry on / off requests/s (median of {len(table)} rounds)", median_ratio,
                     TARGET_TELEMETRY_ON_VS_OFF)]
    cpu_ratios = []
    for r in table:
        per_request = {run["target"]: gateway_cpu_us_per_request(run) for run in runs if run["round"] == r["round"]}
        on, off = per_request.get("on"), per_request.get("off")
        if on is not None and off:
            r["gateway_cpu_us_per_request"] = per_request
            cpu_ratios.append(on / off)
    if cpu_ratios:
        ratios.append(_ratio(f"gateway CPU per request, on / off (median of {len(cpu_ratios)} rounds)",
                             statistics.median(cpu_ratios), None))
    notes += _spread_note([r["ratios"]["on"] for r in table if "on" in r["ratios"]], "on / off")
    telemetry_ok = bool(recorded["on"]) and not recorded["off"]
    if not telemetry_ok:
        notes.append(f"the gateways' /metrics do not show telemetry on and off as configured (requests recorded in "
                     f"bluegreen_request_duration_seconds: on {recorded['on']}, off {recorded['off']}): the ratio "
                     "does not measure telemetry's cost.")
    return {
        "suite": "telemetry",
        "title": "Telemetry on vs off",
        "command": _reproduce("telemetry", ctx),
        "settings": {
            "model": f"{name}:{version}", "rows_per_request": 1, "request_headers": GATEWAY_REQUEST_HEADERS,
            "server_command": server_command, "routing": _display_routing(routing),
            "gateway_settings": settings, "connections": GATEWAY_CONNECTIONS, "wrk_threads": WRK_THREADS,
            "duration_s": duration_s, "warmup_s": WARMUP_S, "round_orders": [list(o) for o in TELEMETRY_ROUNDS],
            "labels": {"on": "telemetry on", "off": "telemetry off"},
        },
        "requests_recorded_in_metrics": recorded,
        "saturation": runs,
        "round_table": table,
        "ratios": ratios,
        "ok": telemetry_ok and not any(r["flagged"] for r in runs),
        "notes": notes,
    }


def shadow_bodies(repo: Path, count: int) -> list[str]:
    """V2 bodies of the first ``count`` held-out digits images (the blue version's ``holdout.npz``)."""
    name, version = GATEWAY_MODEL
    with np.load(repo / name / version / "holdout.npz") as holdout:
        rows = holdout["input"][:count]
    return [v2_json_body("input", [float(x) for x in r]) for r in rows]


def offline_agreement(blue_url: str, green_url: str, bodies: Sequence[str]) -> dict[str, Any]:
    """Each body sent once to each color's model server directly, compared by the gateway's own rule."""
    from gateway.shadow import compare

    agreed = compared = 0
    with httpx.Client(timeout=10.0) as client:
        for body in bodies:
            a = _post_checked(client, blue_url, body).content
            b = _post_checked(client, green_url, body).content
            result = compare(a, b, 1e-4)
            if result is not None:
                compared += 1
                agreed += result[0]
    return {"compared": compared, "agreed": agreed, "ratio": agreed / compared if compared else None}


def run_shadow(ctx: SuiteContext) -> dict[str, Any]:
    """Shadow traffic at :data:`SHADOW_PERCENT`%: the clients' latency at half load with and without it.

    Blue and green are two model server processes (``digits`` 1 and 2); two gateways route everything to blue,
    one with ``shadow_percent`` :data:`SHADOW_PERCENT`, one with 0. wrk measures each at saturation (the rate
    basis, and shadowing's cost in throughput); then :mod:`loadtests.fixed_rate` sends half the slower gateway's
    saturated rate to each in the order of :data:`SHADOW_HALF_LOAD_ORDER`, and the figure is
    median(p50 with) / median(p50 without). The requests cycle through held-out digits images, so the
    gateway's ``bluegreen_shadow_agreement_ratio`` means something; it is set beside the same comparison made
    offline, each image sent to both model servers directly.
    """
    name, version = GATEWAY_MODEL
    ensure_models(ctx.repo, [f"{name}:{version}", f"{name}:{GATEWAY_GREEN_VERSION}"])
    duration_s = max(1, round(ctx.duration_s))
    bodies = shadow_bodies(ctx.repo, SHADOW_BODIES)
    script = ctx.work_dir / "shadow.lua"
    script.write_text(wrk_lua_cycle_script(bodies, GATEWAY_REQUEST_HEADERS))
    body_file = ctx.work_dir / "shadow-bodies.jsonl"
    body_file.write_text("\n".join(bodies) + "\n")
    percents = {"off": 0, "on": SHADOW_PERCENT}

    with model_server(ctx.repo, [f"{name}:{version}"], [], ctx.work_dir) as blue, \
            model_server(ctx.repo, [f"{name}:{GATEWAY_GREEN_VERSION}"], [], ctx.work_dir) as green:
        routings = {t: digits_routing((version, blue.url), (GATEWAY_GREEN_VERSION, green.url), pct)
                    for t, pct in percents.items()}
        with gateway_server(routings["off"], ctx.work_dir, name="gateway-shadow-off") as gw_off, \
                gateway_server(routings["on"], ctx.work_dir, name="gateway-shadow-on") as gw_on:
            gateways = {"off": gw_off, "on": gw_on}
            urls = {t: f"{gw.url}/v2/models/{name}/infer" for t, gw in gateways.items()}
            with httpx.Client(timeout=10.0) as client:
                for url in urls.values():
                    resp = _post_checked(client, url, bodies[0], GATEWAY_REQUEST_HEADERS, cache="bypass")
                    if resp.headers.get("x-bluegreen-color") != "blue":
                        raise SuiteError(f"{url} answered from {resp.headers.get('x-bluegreen-color')}, not blue")
            processes = {t: {"gateway": gw, "model_server": blue, "green_server": green} for t, gw in gateways.items()}
            print(f"  blue {blue.url}, green {green.url}, gateways {gw_off.url} (no shadow) and {gw_on.url} "
                  f"({SHADOW_PERCENT}% shadow); wrk at {GATEWAY_CONNECTIONS} connections, then fixed rate", flush=True)

            def green_rows() -> int | None:
                stats = model_stats(green.url, name, GATEWAY_GREEN_VERSION)
                return None if stats is None else stats[0]

            saturation = []
            for target in SHADOW_SATURATION_ORDER:
                rows0 = green_rows()
                run = _saturate(1, target, urls[target], script, duration_s, processes[target])
                rows1 = green_rows()
                run["green_rows"] = None if rows0 is None or rows1 is None else rows1 - rows0  # warm-up included
                saturation.append(run)
            # Half of the slower gateway's rate (the shadowed one, as a rule): both are then at most half loaded.
            basis = min(r["requests_per_s"] for r in saturation)
            if basis <= 0:
                raise SuiteError("the gateway answered no request at saturation")
            rate = min(HALF_LOAD_FRACTION * basis, HALF_LOAD_MAX_RPS)
            half = []
            for n, target in enumerate(SHADOW_HALF_LOAD_ORDER, start=1):
                rows0 = green_rows()
                run = run_fixed_rate(n, target, urls[target], body_file, rate, duration_s, processes[target],
                                     ctx.work_dir)
                rows1 = green_rows()
                run["green_rows"] = None if rows0 is None or rows1 is None else rows1 - rows0  # warm-up included
                half.append(run)
            metrics = admin_get(gw_on, "/metrics").text
            agreement = prometheus_value(metrics, "bluegreen_shadow_agreement_ratio", {"model": name})
            offline = offline_agreement(f"{blue.url}/v2/models/{name}/versions/{version}/infer",
                                        f"{green.url}/v2/models/{name}/versions/{GATEWAY_GREEN_VERSION}/infer", bodies)
            notes = [SHADOW_NOTE, FIXED_RATE_NOTE, *_error_notes([gw_off, gw_on])]
        blue_command, green_command = _server_command(blue), _server_command(green)

    medians = median_latency_ms(half, SHADOW_PERCENTILES)
    p50 = {t: medians.get(t, {}).get("p50") for t in percents}
    p99 = {t: medians.get(t, {}).get("p99") for t in percents}
    if not (p50["on"] and p50["off"]):
        raise SuiteError("a half-load run answered nothing: no latency to compare")
    each = min(sum(1 for r in half if r["target"] == t) for t in percents)
    ratios = [_ratio(f"p50 with / without shadowing at half load (median of {each} runs each)", p50["on"] / p50["off"],
                     TARGET_SHADOW_P50, STRETCH_SHADOW_P50, at_most=True)]
    if p99["on"] and p99["off"]:
        ratios.append(_ratio(f"p99 with / without shadowing at half load (median of {each} runs each)",
                             p99["on"] / p99["off"], None, at_most=True))
    sat = {r["target"]: r["requests_per_s"] for r in saturation}
    if sat.get("off"):
        ratios.append(_ratio("requests/s with / without shadowing at saturation", sat.get("on", 0.0) / sat["off"],
                             None))
    if agreement is not None:
        ratios.append(_ratio("shadow agreement (bluegreen_shadow_agreement_ratio, digits 1 vs 2)", agreement, None,
                             unit=""))
    else:
        notes.append("the gateway's /metrics showed no bluegreen_shadow_agreement_ratio: no shadow copy was compared.")
    shadowed = [r for r in half if r["target"] == "on"]
    for r in shadowed:
        sent = r["warmup_requests"] + r["requests"]
        r["shadow_share"] = None if r.get("green_rows") is None or not sent else r["green_rows"] / sent
    if any(r["green_rows"] for r in half if r["target"] == "off"):
        notes.append("green inferred rows during a run without shadowing: something else called it.")
    return {
        "suite": "shadow",
        "title": f"Shadow traffic at {SHADOW_PERCENT}%: client latency with vs without",
        "command": _reproduce("shadow", ctx),
        "settings": {
            "model": f"{name}:{version}", "green": f"{name}:{GATEWAY_GREEN_VERSION}", "shadow_percent": SHADOW_PERCENT,
            "bodies": len(bodies), "rows_per_request": 1, "request_headers": GATEWAY_REQUEST_HEADERS,
            "server_commands": {"blue": blue_command, "green": green_command},
            "routing": {t: _display_routing(r) for t, r in routings.items()}, "connections": GATEWAY_CONNECTIONS,
            "wrk_threads": WRK_THREADS, "duration_s": duration_s, "warmup_s": WARMUP_S,
            "saturation_order": list(SHADOW_SATURATION_ORDER), "half_load_fraction": HALF_LOAD_FRACTION,
            "half_load_max_rps": HALF_LOAD_MAX_RPS,
            "half_load_order": list(SHADOW_HALF_LOAD_ORDER), "fixed_rate_connections": FIXED_RATE_CONNECTIONS,
            "labels": {"off": "no shadow", "on": f"{SHADOW_PERCENT}% shadowed"},
        },
        "saturation": saturation,
        "half_load": {"rate_per_s": rate, "basis_rps": basis, "runs": half, "median_ms": medians},
        "agreement": {"gateway": agreement, "offline": offline},
        "ratios": ratios,
        "ok": not (any(r["flagged"] for r in saturation) or any(r["flagged"] for r in half)),
        "notes": notes,
    }



Suite = Callable[[SuiteContext], dict[str, Any]]

#: Implemented suites, by the name ``bluegreen bench`` takes.
SUITES: dict[str, Suite] = {"serving": run_serving, "gateway": run_gateway, "cache": run_cache,
                            "telemetry": run_telemetry, "shadow": run_shadow}


# --------------------------------------------------------------------------------------------------------------
# the report: benchmarks.md, one section per bench-<suite>.json
# --------------------------------------------------------------------------------------------------------------

def _fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _fmt_int(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def _fmt_ms2(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _fmt_cores(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} cores"


def _ratio_target(r: Mapping[str, Any]) -> str:
    unit = r.get("unit", "x")
    if r.get("target") is None:
        return "reported, no target"
    target = f"{'≤' if r.get('at_most') else '≥'} {r['target']:g}{unit}"
    if r.get("stretch") is not None:
        target += f" (stretch {r['stretch']:g}{unit})"
    return target


def _ratio_verdict(r: Mapping[str, Any]) -> str:
    if r.get("met") is None:
        return "-"
    if not r["met"]:
        return "**above target**" if r.get("at_most") else "**below target**"
    return "met, stretch met" if r.get("stretch_met") else "met"


def _ratio_row(r: dict[str, Any]) -> str:
    return f"| {r['name']} | {r['value']:.2f}{r.get('unit', 'x')} | {_ratio_target(r)} | {_ratio_verdict(r)} |"


def render_serving_section(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    raw = doc["raw"]
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}` ({s['rows_per_request']} row per request; digits at wrk "
        f"{s.get('digits_wrk_threads', s['wrk_threads'])} thread x {s.get('digits_connections', s['connections'])} "
        f"connections, wide at wrk {s['wrk_threads']} threads x {s['connections']} connections; {s['warmup_s']} s "
        f"warm-up then {s['duration_s']} s measured per server; servers run one at a time). \"Batched\" is the "
        "server's default settings, \"unbatched\" adds `--max-batch-size 1`. Server CPU per request is the model "
        "server process's CPU time (every thread) over the requests it answered.",
        "",
        "| Run | Provider | rows/s | p50 ms | p99 ms | Requests | Non-2xx | Socket errors | wrk CPU | Server CPU "
        "| Server CPU µs/request | Mean rows per model run | CPU pressure |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in doc["runs"].items():
        batches = run.get("server_batches")
        lat = run["latency_ms"]
        flag = " ⚠" if run.get("flagged") else ""
        per_request = run.get("server_cpu_us_per_request")
        lines.append(
            f"| {label}{flag} | {run.get('provider') or '-'} | {_fmt_int(run['rows_per_s'])} | "
            f"{_fmt_ms(lat.get('p50'))} | {_fmt_ms(lat.get('p99'))} | {run['requests']:,} | {run['non_2xx']:,} | "
            f"{run['socket_errors']:,} | {_fmt_cores(run.get('wrk_cores'))} | {_fmt_cores(run.get('server_cores'))} "
            f"| {'-' if per_request is None else format(per_request, '.0f')} | "
            f"{'-' if not batches else format(batches['mean_rows_per_run'], '.1f')} | "
            f"{_fmt_share(run.get('cpu_pressure'))} |")
    candidates = [r for r in raw["by_batch"] if r["batch"] == raw["best_batch"]
                  and r.get("spin_wait") == raw.get("best_spin_wait")]
    if raw.get("recheck_after_servers"):
        candidates.append(raw["recheck_after_servers"])
    best = max(candidates, key=lambda r: float(r["rows_per_s"]))
    spin = "" if raw.get("best_spin_wait") is None else f", spin {'on' if raw['best_spin_wait'] else 'off'}"
    lines.append(
        f"| raw ONNX Runtime, best batch ({raw['best_batch']}{spin}, in-process) | {raw['providers'][0]} | "
        f"{_fmt_int(best['rows_per_s'])} | {best['ms_per_run']:.1f} per run | - | {best['runs']:,} runs | - | - | - "
        f"| - | - | {raw['best_batch']} | - |")
    if raw.get("recheck_after_servers"):
        lines += ["", f"Raw ONNX Runtime's best was measured before the servers "
                      f"({_fmt_int(raw.get('best_rows_per_s_before'))} rows/s) and again after them "
                      f"({_fmt_int(raw['recheck_after_servers']['rows_per_s'])} rows/s); the ratios use the higher."]
    lines += ["", "| Figure | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [_ratio_row(r) for r in doc["ratios"]]
    lines += ["", f"Raw ONNX Runtime (wide) by batch size ({raw['threads']} intra-op threads, "
                  f"{raw['seconds_per_batch']:g} s each):", "",
              "| Batch | Spin-wait | rows/s | ms per run |", "|---:|---|---:|---:|"]
    lines += [f"| {r['batch']} | {'-' if r.get('spin_wait') is None else ('on' if r['spin_wait'] else 'off')} | "
              f"{_fmt_int(r['rows_per_s'])} | {r['ms_per_run']:.2f} |" for r in raw["by_batch"]]
    lines.append("")
    if not doc.get("ok", True):
        lines += ["**This run was flagged**: a run answered non-2xx or had socket errors (⚠ above); its "
                  "throughput is not comparable.", ""]
    if doc.get("notes"):
        lines += ["Notes:", ""] + [f"- {note}" for note in doc["notes"]]
    return lines


def _fmt_added(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def _fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def render_gateway_section(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    half = doc["half_load"]
    headers = ", ".join(f"`{k}: {v}`" for k, v in s.get("request_headers", {}).items()) or "none"
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. One model server (`{s['server_command']}`, default batching) and one "
        f"gateway in front of it routing `{s['model']}` as blue at weight 100 (green at 0, never called); "
        f"{s['rows_per_request']} row per request, extra request header {headers}. Saturation: wrk "
        f"{s['wrk_threads']} threads x {s['connections']} connections, {s['warmup_s']} s warm-up then "
        f"{s['duration_s']} s measured per run, direct, through the gateway"
        + (f" and through nginx (one worker, keep-alive upstream of {s['nginx']['upstream_keepalive']} "
           "connections: the reference for a proxy hop)" if s.get("nginx") else "")
        + f" alternated over {len(s['round_orders'])} rounds ({'; '.join(', '.join(o) for o in s['round_orders'])}). "
        "A proxy's CPU per request is its CPU time over the requests answered in the measured run (nginx: its "
        "worker's). Half load: "
        f"{s['half_load_fraction']:.0%} of the gateway's median saturated rate"
        + (f" (at most {s['half_load_max_rps']:,.0f} requests/s, what the Python open-loop generator sends without "
           "overcommitting the cores)" if s.get("half_load_max_rps") else "") + ", sent at a fixed rate "
        f"({s['warmup_s']} s warm-up then {s['duration_s']} s measured per run) in the order "
        f"{', '.join(s['half_load_order'])}.",
        "",
        "\"CPU pressure\" is the share of the run during which some task waited for a core (Linux PSI), the "
        "benchmark's own processes included: the higher, the more crowded the cores and the noisier the row.",
        "",
        "### Throughput at saturation",
        "",
        "| Round | Target | requests/s | p50 ms | p99 ms | Requests | Rows the model server inferred | Non-2xx "
        "| Socket errors | wrk CPU | Proxy CPU | Proxy CPU µs/request | Model server CPU | CPU pressure |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in doc["saturation"]:
        lat, cores = run["latency_ms"], run.get("cores", {})
        flag = " ⚠" if run.get("flagged") else ""
        lines.append(
            f"| {run['round']} | {run['target']}{flag} | {_fmt_int(run['requests_per_s'])} | "
            f"{_fmt_ms(lat.get('p50'))} | {_fmt_ms(lat.get('p99'))} | {run['requests']:,} | "
            f"{_fmt_int(run.get('model_server_rows'))} | {run['non_2xx']:,} | {run['socket_errors']:,} | "
            f"{_fmt_cores(run.get('wrk_cores'))} | {_fmt_cores(cores.get('proxy', cores.get('gateway')))} | "
            f"{_fmt_int(run.get('proxy_cpu_us_per_request'))} | "
            f"{_fmt_cores(cores.get('model_server'))} | {_fmt_share(run.get('cpu_pressure'))} |")
    lines += ["", "| Round | Direct requests/s | Gateway requests/s | nginx requests/s | Gateway / direct "
              "| Gateway CPU µs/request | nginx CPU µs/request | Gateway / nginx CPU |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['round']} | {_fmt_int(r['direct_rps'])} | {_fmt_int(r['gateway_rps'])} | "
              f"{_fmt_int(r.get('nginx_rps'))} | {r['ratio']:.2f}x | {_fmt_int(r.get('gateway_cpu_us'))} | "
              f"{_fmt_int(r.get('nginx_cpu_us'))} | "
              f"{'-' if r.get('cpu_vs_nginx') is None else format(r['cpu_vs_nginx'], '.2f') + 'x'} |"
              for r in doc["rounds"]]
    lines += ["", "| Ratio | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [_ratio_row(r) for r in doc["ratios"]]
    lines += [
        "",
        f"### Added latency at half load ({_fmt_int(half['rate_per_s'])} requests/s)",
        "",
        "Latency in ms from each request's due time (nearest-rank percentiles of the measured window). "
        "\"Gateway-timed\" is the gateway's own `server-timing` account of its time outside the upstream call.",
        "",
        "| Run | Target | Answered/s | p50 | p90 | p99 | p99.9 | max | Send lag p99 | Gateway-timed p50 / p99 "
        "| Non-2xx | No answer | Generator CPU | Gateway CPU | Model server CPU | CPU pressure |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in half["runs"]:
        lat, cores = run["latency_ms"], run.get("cores", {})
        flag = " ⚠" if run.get("flagged") else ""
        own = run.get("server_timing_ms", {}).get("gateway")
        own_text = f"{_fmt_ms2(own.get('p50'))} / {_fmt_ms2(own.get('p99'))}" if own else "-"
        lines.append(
            f"| {run['run']} | {run['target']}{flag} | {_fmt_int(run['answered_per_s'])} | "
            f"{_fmt_ms2(lat.get('p50'))} | {_fmt_ms2(lat.get('p90'))} | {_fmt_ms2(lat.get('p99'))} | "
            f"{_fmt_ms2(lat.get('p99.9'))} | {_fmt_ms2(lat.get('max'))} | {_fmt_ms2(run['send_lag_ms'].get('p99'))} | "
            f"{own_text} | {run['non_2xx']:,} | {sum(run['errors'].values()) + run.get('unfinished', 0):,} | "
            f"{_fmt_cores(cores.get('generator'))} | {_fmt_cores(cores.get('gateway'))} | "
            f"{_fmt_cores(cores.get('model_server'))} | {_fmt_share(run.get('cpu_pressure'))} |")
    medians, added = half["median_ms"], half["added_ms"]
    lines += ["", "| Latency, ms | p50 | p90 | p99 |", "|---|---:|---:|---:|"]
    for target, m in medians.items():
        runs = sum(1 for r in half["runs"] if r["target"] == target)
        lines.append(f"| {target} (median of {runs} runs) | {_fmt_ms2(m.get('p50'))} | {_fmt_ms2(m.get('p90'))} | "
                     f"{_fmt_ms2(m.get('p99'))} |")
    lines.append(f"| **added by the gateway** | **{_fmt_added(added.get('p50'))}** | {_fmt_added(added.get('p90'))} | "
                 f"**{_fmt_added(added.get('p99'))}** |")
    timing = doc.get("server_timing_ms") or {}
    gw, up = timing.get("gateway"), timing.get("upstream")
    if gw:
        upstream = (f"; the upstream call p50 {_fmt_ms2(up.get('p50'))} ms, p99 {_fmt_ms2(up.get('p99'))} ms"
                    if up else "")
        lines += ["", f"The gateway's own account, from its `server-timing` header on {_fmt_int(gw.get('count'))} "
                      f"answers of the half-load runs through it (median over runs): time in the gateway outside the "
                      f"upstream call p50 {_fmt_ms2(gw.get('p50'))} ms, p99 {_fmt_ms2(gw.get('p99'))} ms{upstream}. "
                      "Its clock starts once the request body has been read and stops before the answer is written, "
                      "so HTTP parsing, the middleware and the event loop's queueing are outside it: the added "
                      "latency above is the figure a client sees."]
    lines.append("")
    if not doc.get("ok", True):
        lines += ["**This run was flagged**: a run answered non-2xx or lost requests (⚠ above); its figures are not "
                  "comparable.", ""]
    if doc.get("notes"):
        lines += ["Notes:", ""] + [f"- {note}" for note in doc["notes"]]
    return lines


def render_generic_section(doc: dict[str, Any]) -> list[str]:
    """For a suite without its own renderer: the date, the machine and the command, so nothing is hidden."""
    return [f"Measured {doc.get('date', '?')} on {machine_line(doc.get('machine', {}))}.", "",
            f"Reproduce: `{doc.get('command', 'bluegreen bench ' + str(doc.get('suite')))}`; the figures are in "
            f"`bench-{doc.get('suite')}.json`."]


def _saturation_table(runs: Sequence[Mapping[str, Any]], labels: Mapping[str, str] | None = None,
                      extra: Sequence[tuple[str, Callable[[Mapping[str, Any]], str]]] = ()) -> list[str]:
    """wrk runs in the order they ran: throughput, latency, what the model server inferred, errors, CPU."""
    head = ["Round", "Target", "requests/s", "p50 ms", "p95 ms", "p99 ms", "Requests", "Model server rows",
            *(h for h, _ in extra), "Non-2xx", "Socket errors", "wrk CPU", "Gateway CPU", "Gateway CPU µs/request",
            "Model server CPU", "CPU pressure"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    for run in runs:
        lat, cores = run["latency_ms"], run.get("cores", {})
        label = (labels or {}).get(run["target"], run["target"]) + (" ⚠" if run.get("flagged") else "")
        cells = [str(run["round"]), label, _fmt_int(run["requests_per_s"]), _fmt_ms(lat.get("p50")),
                 _fmt_ms(lat.get("p95")), _fmt_ms(lat.get("p99")), f"{run['requests']:,}",
                 _fmt_int(run.get("model_server_rows")), *(f(run) for _, f in extra), f"{run['non_2xx']:,}",
                 f"{run['socket_errors']:,}", _fmt_cores(run.get("wrk_cores")), _fmt_cores(cores.get("gateway")),
                 _fmt_int(gateway_cpu_us_per_request(run)), _fmt_cores(cores.get("model_server")),
                 _fmt_share(run.get("cpu_pressure"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _round_table_lines(table: Sequence[Mapping[str, Any]], baseline: str, labels: Mapping[str, str]) -> list[str]:
    """Per round: each target's requests/s, then each ratio to the baseline (extra ratios, e.g. hit / miss, too)."""
    targets = list(dict.fromkeys(t for r in table for t in r["rps"] if t != baseline))
    ratio_names = list(dict.fromkeys(k for r in table for k in r["ratios"]))
    head = ["Round", labels.get(baseline, baseline), *(labels.get(t, t) for t in targets),
            *(k if k not in targets else f"{labels.get(k, k)} / {labels.get(baseline, baseline)}" for k in ratio_names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in table:
        cells = [str(r["round"]), _fmt_int(r["rps"].get(baseline)), *(_fmt_int(r["rps"].get(t)) for t in targets),
                 *("-" if r["ratios"].get(k) is None else f"{r['ratios'][k]:.2f}x" for k in ratio_names)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _closing_lines(doc: Mapping[str, Any]) -> list[str]:
    lines = [""]
    if not doc.get("ok", True):
        lines += ["**This run was flagged**: a run answered non-2xx, lost requests or did not take the path it is "
                  "named after (⚠ above); its figures are not comparable.", ""]
    if doc.get("notes"):
        lines += ["Notes:", ""] + [f"- {note}" for note in doc["notes"]]
    return lines


def _fmt_shares(run: Mapping[str, Any]) -> str:
    share = run.get("path_share")
    if not share:
        return "-"
    return " / ".join(f"{share.get(k, 0.0):.0%}" for k in CACHE_PATHS)


def render_cache_section(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    labels = s.get("labels", CACHE_LABELS)
    l2 = s["gateway_settings"]["gateway-l2"]
    prewarm = doc.get("prewarm", {})
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. Direct: one model server (`{s['server_command']}`, default batching). "
        f"Through the gateway: a private `redis-server` and two gateways routing `{s['model']}` as blue at weight "
        "100: **gateway-l1** (the embedded L1 only) answers the L1-hit and miss runs; **gateway-l2** "
        f"(`BLUEGREEN_REDIS_URL` set, `BLUEGREEN_CACHE__L1_MAX_ENTRIES={l2.get('BLUEGREEN_CACHE__L1_MAX_ENTRIES')}`) "
        "the L2-hit run; both with " + ", ".join(f"`{k}={v}`" for k, v in s["gateway_settings"]["gateway-l1"].items())
        + f". wrk {s['wrk_threads']} threads x {s['connections']} connections, {s['warmup_s']} s warm-up then "
        f"{s['duration_s']} s measured per run, in the order "
        f"{'; '.join(', '.join(labels.get(t, t) for t in o) for o in s['round_orders'])}. L1 hit: one body again "
        f"and again. L2 hit: {s['l2_bodies']} distinct bodies in turn, each sent once beforehand "
        f"({prewarm.get('redis_cache_keys', '?')} keys under `bluegreen:cache:` in Redis, and one checked to come "
        "back as an L2 hit). Miss: every request a body never sent before. No `Cache-Control` header.",
        "",
        "\"Lookups L1 / L2 / miss\" is how the gateway's lookups went during the measured run, from its counters "
        "(`GET /admin/v1/cache`, read before and after): the run is flagged (⚠) when its own path holds less than "
        + ", ".join(f"{v['least_share']:.0%} ({labels.get(t, t)})" for t, v in s["expected_paths"].items())
        + ". \"CPU pressure\" is the share of the run during which some task waited for a core (Linux PSI).",
        "",
        "### Throughput at saturation",
        "",
    ]
    lines += _saturation_table(doc["saturation"], labels, [
        ("Lookups L1 / L2 / miss", _fmt_shares),
        ("Redis CPU", lambda run: _fmt_cores(run.get("cores", {}).get("redis")))])
    redis_calls = doc.get("redis_calls_per_l2_request")
    if redis_calls:
        lines += ["", "Redis commands per request during the L2-hit runs (`INFO commandstats`): "
                  + ", ".join(f"{name.upper()} {calls:.2f}" for name, calls in redis_calls.items() if calls >= 0.01)
                  + "."]
    lines += ["", *_round_table_lines(doc["round_table"], "direct", labels)]
    lines += ["", "| Ratio | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [_ratio_row(r) for r in doc["ratios"]]
    return lines + _closing_lines(doc)


def render_telemetry_section(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    labels = s.get("labels", {"on": "telemetry on", "off": "telemetry off"})
    recorded = doc.get("requests_recorded_in_metrics", {})
    headers = ", ".join(f"`{k}: {v}`" for k, v in s.get("request_headers", {}).items()) or "none"
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. One model server (`{s['server_command']}`) and two gateways in front of it "
        f"routing `{s['model']}` as blue at weight 100, one with telemetry (the default), one with "
        "`BLUEGREEN_TELEMETRY=false`; extra request header " + headers + f". wrk {s['wrk_threads']} threads x "
        f"{s['connections']} connections, {s['warmup_s']} s warm-up then {s['duration_s']} s measured per run, "
        f"alternated over {len(s['round_orders'])} rounds "
        f"({'; '.join(', '.join(o) for o in s['round_orders'])}). Requests counted by each gateway's "
        f"`bluegreen_request_duration_seconds` afterwards: on {_fmt_int(recorded.get('on'))}, "
        f"off {_fmt_int(recorded.get('off'))} (none is right for off).",
        "",
        "### Throughput at saturation",
        "",
    ]
    lines += _saturation_table(doc["saturation"], labels)
    lines += ["", *_round_table_lines(doc["round_table"], "off", labels)]
    lines += ["", "| Ratio | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [_ratio_row(r) for r in doc["ratios"]]
    return lines + _closing_lines(doc)


def render_shadow_section(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    labels = s.get("labels", {"off": "no shadow", "on": f"{s['shadow_percent']}% shadowed"})
    half = doc["half_load"]
    agreement = doc.get("agreement", {})
    offline = agreement.get("offline") or {}
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. Blue: `{s['server_commands']['blue']}`; green: "
        f"`{s['server_commands']['green']}`. Two gateways route `{s['model']}` (blue) at weight 100, one with "
        f"`shadow_percent: {s['shadow_percent']}` (copies to green, `{s['green']}`), one with 0. Requests cycle "
        f"through {s['bodies']} held-out digits images, with the extra request header "
        + (", ".join(f"`{k}: {v}`" for k, v in s.get("request_headers", {}).items()) or "none")
        + f". Saturation: wrk {s['wrk_threads']} threads x {s['connections']} connections, {s['warmup_s']} s warm-up "
        f"then {s['duration_s']} s, in the order {', '.join(labels.get(t, t) for t in s['saturation_order'])}. "
        f"Half load: {s['half_load_fraction']:.0%} of the slower gateway's saturated rate, sent at a fixed rate "
        f"({s['warmup_s']} s warm-up then {s['duration_s']} s measured per run) in the order "
        f"{', '.join(labels.get(t, t) for t in s['half_load_order'])}.",
        "",
        "### Throughput at saturation",
        "",
    ]
    lines += _saturation_table(doc["saturation"], labels, [("Green rows", lambda r: _fmt_int(r.get("green_rows")))])
    lines += [
        "",
        f"### Client latency at half load ({_fmt_int(half['rate_per_s'])} requests/s)",
        "",
        "Latency in ms from each request's due time (nearest-rank percentiles of the measured window). \"Green "
        "rows\" counts the warm-up too; \"Shadowed\" is green rows over every request sent.",
        "",
        "| Run | Target | Answered/s | p50 | p90 | p95 | p99 | p99.9 | max | Send lag p99 | Green rows | Shadowed "
        "| Non-2xx | No answer | Generator CPU | Gateway CPU | Blue CPU | Green CPU | CPU pressure |",
        "|---:|---|" + "---:|" * 17,
    ]
    for run in half["runs"]:
        lat, cores = run["latency_ms"], run.get("cores", {})
        flag = " ⚠" if run.get("flagged") else ""
        share = run.get("shadow_share")
        lines.append(
            f"| {run['run']} | {labels.get(run['target'], run['target'])}{flag} | {_fmt_int(run['answered_per_s'])} | "
            f"{_fmt_ms2(lat.get('p50'))} | {_fmt_ms2(lat.get('p90'))} | {_fmt_ms2(lat.get('p95'))} | "
            f"{_fmt_ms2(lat.get('p99'))} | {_fmt_ms2(lat.get('p99.9'))} | {_fmt_ms2(lat.get('max'))} | "
            f"{_fmt_ms2(run['send_lag_ms'].get('p99'))} | {_fmt_int(run.get('green_rows'))} | "
            f"{'-' if share is None else format(share, '.1%')} | {run['non_2xx']:,} | "
            f"{sum(run['errors'].values()) + run.get('unfinished', 0):,} | {_fmt_cores(cores.get('generator'))} | "
            f"{_fmt_cores(cores.get('gateway'))} | {_fmt_cores(cores.get('model_server'))} | "
            f"{_fmt_cores(cores.get('green_server'))} | {_fmt_share(run.get('cpu_pressure'))} |")
    percentiles = [q for q in ("p50", "p90", "p95", "p99") if any(q in m for m in half["median_ms"].values())]
    lines += ["", "| Latency, ms | " + " | ".join(percentiles) + " |", "|---|" + "---:|" * len(percentiles)]
    for target, m in half["median_ms"].items():
        runs = sum(1 for r in half["runs"] if r["target"] == target)
        lines.append(f"| {labels.get(target, target)} (median of {runs} runs) | "
                     + " | ".join(_fmt_ms2(m.get(q)) for q in percentiles) + " |")
    gw = agreement.get("gateway")
    lines += ["", f"Agreement of the shadow copies with the answers given (the gateway's "
                  f"`bluegreen_shadow_agreement_ratio` after the runs): {'-' if gw is None else format(gw, '.3f')}. "
                  f"Offline, each of the {s['bodies']} images sent once to each model server directly and compared by "
                  f"the same rule: {offline.get('agreed', '-')} of {offline.get('compared', '-')} agree"
                  + ("" if offline.get("ratio") is None else f" ({offline['ratio']:.3f})")
                  + ". The gateway compares the images the 10% selection happened to pick, so the two can differ by "
                    "the mix of images."]
    lines += ["", "| Ratio | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [_ratio_row(r) for r in doc["ratios"]]
    return lines + _closing_lines(doc)


def _machine_short(machine: Mapping[str, Any]) -> str:
    text = f"{machine.get('cpu_model', 'unknown CPU')}, {machine.get('cpu_count')} cores"
    if machine.get("gpus"):
        text += ", GPU: " + "; ".join(machine["gpus"])
    return text


def render_summary(docs: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> list[str]:
    """Every ratio of every suite in one table: its target and verdict, when and where it was measured, and the
    command that measures it again."""
    lines = ["| Suite | Ratio | Measured | Target | Result | Date | Machine | Reproduce |",
             "|---|---|---:|---|---|---|---|---|"]
    for suite in order:
        doc = docs[suite]
        ratios = doc.get("ratios") or []
        for r in ratios:
            try:
                row = (f"| {suite}{'' if doc.get('ok', True) else ' ⚠'} | {r['name']} | "
                       f"{r['value']:.2f}{r.get('unit', 'x')} | {_ratio_target(r)} | {_ratio_verdict(r)} | ")
            except (KeyError, TypeError, ValueError):
                continue
            lines.append(row + f"{doc.get('date', '?')} | {_machine_short(doc.get('machine', {}))} | "
                               f"`{doc.get('command', 'bluegreen bench ' + suite)}` |")
    if len(lines) == 2:
        return []
    flagged = any(not docs[s].get("ok", True) for s in order)
    return [*lines, "", "⚠: the suite flagged a run (see its section); its ratios are not comparable." if flagged
            else "Each suite's section below has its runs, settings and notes."]


#: Suite name -> the function that renders its section of benchmarks.md.
SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "serving": render_serving_section, "serving-cuda": render_serving_section,
    "gateway": render_gateway_section, "cache": render_cache_section,
    "telemetry": render_telemetry_section, "shadow": render_shadow_section}

#: The order of the report's sections, and of the suites ``bluegreen bench`` runs when none is named.
SUITE_ORDER = ("serving", "gateway", "cache", "telemetry", "shadow")
PLOT_NAME = "benchmarks.png"


def render_markdown(docs: dict[str, dict[str, Any]], plot: str | None = None) -> str:
    """The whole benchmarks.md from every suite's JSON document: the summary of every ratio, the plot (the file
    name ``plot``, when one was drawn), then one section per suite, in a fixed order."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bluegreen bench` from the `bench-<suite>.json` files beside this one; each suite owns a",
        "section, and rerunning a suite replaces only its own. Do not edit by hand.",
        "",
        "The machines are small and shared, so the figures to quote are the **ratios measured within one run**;",
        "absolute rows/s and latencies describe that run's machine only.",
        "`bluegreen bench` with no suite named runs them all (" + ", ".join(SUITE_ORDER) + ").",
    ]
    order = [s for s in SUITE_ORDER if s in docs] + sorted(s for s in docs if s not in SUITE_ORDER)
    summary = render_summary(docs, order)
    if summary:
        lines += ["", "## Summary", "", *summary]
    if plot:
        lines += ["", f"![Throughput and p50/p95/p99 latency per path, from the suites below]({plot})", "",
                  "Throughput at saturation and latency per path, from the runs below (the median of a path's runs). "
                  "Absolute figures from one shared machine: compare paths within a suite."]
    for suite in order:
        doc = docs[suite]
        lines += ["", f"## {doc.get('title', suite)}", ""]
        try:
            lines += SECTIONS.get(suite, render_generic_section)(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A JSON file from an older version of the suite: keep the report whole and say so.
            lines += render_generic_section(doc)
            lines += ["", f"(This suite's JSON is not in the shape this runner renders ({type(exc).__name__}: "
                          f"{exc}); rerun the suite to refresh it.)"]
    return "\n".join(lines).rstrip() + "\n"


def load_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(out_dir.glob("bench-*.json")):
        doc = json.loads(path.read_text())
        docs[doc.get("suite", path.stem.removeprefix("bench-"))] = doc
    return docs


def write_plot(docs: Mapping[str, Mapping[str, Any]], path: Path) -> bool:
    """Draw ``path`` from every suite's document; False (and a warning) when matplotlib is not installed."""
    from loadtests.plot import path_figures, plot_figures

    figures = path_figures(docs, SUITE_ORDER)
    if not figures:
        return False
    try:
        plot_figures(figures, path)
    except ImportError:
        print("bench: matplotlib is not installed (pip install -e '.[dev]'): no plot drawn", file=sys.stderr)
        return False
    return True


def write_results(out_dir: Path, doc: dict[str, Any]) -> Path:
    """Write one suite's JSON, then regenerate the plot and benchmarks.md from every suite's JSON in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{doc['suite']}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    docs = load_results(out_dir)
    plotted = write_plot(docs, out_dir / PLOT_NAME)
    (out_dir / "benchmarks.md").write_text(render_markdown(docs, PLOT_NAME if plotted else None))
    return path


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------

def _summary_lines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for r in doc.get("rounds", []):
        lines.append(f"  round {r['round']}: direct {r['direct_rps']:,.0f} req/s, gateway {r['gateway_rps']:,.0f} "
                     f"req/s, gateway / direct {r['ratio']:.2f}")
    for r in doc.get("round_table", []):
        baseline = next(t for t in r["rps"] if t not in r["ratios"])
        lines.append(f"  round {r['round']}: {baseline} {r['rps'][baseline]:,.0f} req/s, " + ", ".join(
            f"{t} {v:,.0f} req/s ({r['ratios'][t]:.2f}x)" for t, v in r["rps"].items() if t != baseline))
    if "half_load" in doc and "added_ms" not in doc["half_load"]:
        half = doc["half_load"]
        lines.append(f"  half load ({half['rate_per_s']:,.0f} req/s): " + ", ".join(
            f"{t} p50 {_fmt_ms2(m.get('p50'))} ms, p99 {_fmt_ms2(m.get('p99'))} ms (median)"
            for t, m in half["median_ms"].items()))
    if "half_load" in doc and "added_ms" in doc["half_load"]:
        half, added = doc["half_load"], doc["half_load"]["added_ms"]
        lines.append(f"  half load ({half['rate_per_s']:,.0f} req/s): added p50 {_fmt_added(added['p50'])} ms, "
                     f"p99 {_fmt_added(added['p99'])} ms (median gateway - median direct); generator "
                     + ", ".join(f"{r['target']} {_fmt_cores(r['cores'].get('generator'))}" for r in half["runs"]))
        gw = (doc.get("server_timing_ms") or {}).get("gateway")
        if gw:
            lines.append(f"  server-timing gateway;dur p50 {_fmt_ms2(gw['p50'])} ms, p99 {_fmt_ms2(gw['p99'])} ms")
    for label, run in doc.get("runs", {}).items():
        lines.append(f"  {label}: {run['rows_per_s']:,.0f} rows/s, p50 {run['latency_ms']['p50']:.1f} ms, "
                     f"p99 {run['latency_ms']['p99']:.1f} ms, non-2xx {run['non_2xx']}, socket errors "
                     f"{run['socket_errors']}, wrk {_fmt_cores(run.get('wrk_cores'))}"
                     + ("  FLAGGED" if run.get("flagged") else ""))
    if "raw" in doc:
        lines.append(f"  raw onnxruntime best: batch {doc['raw']['best_batch']}, "
                     f"{doc['raw']['best_rows_per_s']:,.0f} rows/s")
    for r in doc.get("ratios", []):
        verdict = {None: "INFO", True: "PASS", False: "ABOVE" if r.get("at_most") else "BELOW"}[r.get("met")]
        lines.append(f"  {verdict} {r['name']}: {r['value']:.2f}{r.get('unit', 'x')} ({_ratio_target(r)})")
    return lines


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the suites' finally blocks, which stop the servers


def main(suites: Sequence[str], duration_s: float, out_dir: Path | None, repo: Path, device: Device = "auto") -> int:
    """Run the named suites in order (none named: every suite, in :data:`SUITE_ORDER`); write their JSON and
    regenerate the plot and benchmarks.md after each one."""
    out = out_dir if out_dir is not None else DEFAULT_OUT
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        print(f"error: unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITE_ORDER)}", file=sys.stderr)
        return 2
    if duration_s <= 0:
        print("error: --duration must be positive", file=sys.stderr)
        return 2
    runnable = list(dict.fromkeys(suites)) or [s for s in SUITE_ORDER if s in SUITES]
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main_thread else None
    code = 0
    try:
        with tempfile.TemporaryDirectory(prefix="bluegreen-bench-") as work:
            for name in runnable:
                print(f"bench {name}: starting (measured runs of {duration_s:g}s)", flush=True)
                machine = describe_machine()
                date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                ctx = SuiteContext(duration_s=duration_s, repo=repo.resolve(), out_dir=out, work_dir=Path(work),
                                   machine=machine, device=device)
                started = time.monotonic()
                try:
                    doc = SUITES[name](ctx)
                except SuiteSkipped as exc:
                    print(f"bench {name}: {exc}; nothing written")
                    continue
                except (SuiteError, RuntimeError, ValueError, OSError, subprocess.SubprocessError) as exc:
                    print(f"bench {name}: FAILED, nothing written: {exc}", file=sys.stderr)
                    code = max(code, 2)
                    continue
                doc["date"] = date  # when the suite started measuring
                doc["machine"] = machine
                doc["elapsed_s"] = round(time.monotonic() - started, 1)
                path = write_results(out, doc)
                print(f"bench {name}: done in {doc['elapsed_s']:.0f}s -> {path}, {out / 'benchmarks.md'}")
                for line in _summary_lines(doc):
                    print(line)
                if not doc.get("ok", True):
                    print(f"bench {name}: FLAGGED: a run had non-2xx answers or socket errors", file=sys.stderr)
                    code = max(code, 1)
    except KeyboardInterrupt:
        print("bench: interrupted; the servers it started are stopped, nothing more written", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return code


if __name__ == "__main__":  # python -m loadtests.bench [SUITE...] [--duration S] [--device auto|cpu|cuda]
    import argparse

    from models.build import DEFAULT_REPOSITORY

    cli = argparse.ArgumentParser(prog="python -m loadtests.bench")
    cli.add_argument("suites", nargs="*")
    cli.add_argument("--duration", type=float, default=10.0)
    cli.add_argument("--out", type=Path, default=None)
    cli.add_argument("--repo", type=Path, default=DEFAULT_REPOSITORY)
    cli.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    opts = cli.parse_args()
    sys.exit(main(opts.suites, duration_s=opts.duration, out_dir=opts.out, repo=opts.repo, device=opts.device))
