"""The benchmark runner behind ``bluegreen bench [serving|gateway|cache|telemetry]``.

DESIGN.md, "How we measure performance": the machines are 2-core and shared, so what counts is **ratios
measured in one run** (absolute times only on a GPU). Every suite therefore starts its own servers on free
loopback ports, drives them with ``wrk`` one at a time (so they never compete for the cores), records the load
generator's CPU beside the throughput, and compares runs made minutes apart on the same machine. Latency at a
given load (rather than at saturation) comes from :mod:`loadtests.fixed_rate`, an open-loop generator.

Suites are functions in :data:`SUITES`, chosen by name. Each returns one JSON document that is written to
``<out>/bench-<suite>.json``; ``<out>/benchmarks.md`` is then regenerated from every ``bench-*.json`` in the
folder, one section per suite (:data:`SECTIONS`), so rerunning one suite replaces only its own section.

Exit status: 0 when every implemented suite asked for ran with clean runs (no non-2xx answers, no socket
errors); 1 when a run was flagged; 2 when nothing could be measured (only unimplemented suites asked, ``wrk``
missing, a server that would not start). Targets missed are reported (``BELOW``), not turned into a failure:
on a shared machine one noisy run is not a regression.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import json
import os
import platform
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
# The server's default device; the raw ONNX Runtime baseline takes the same one, so all three share a device.
SERVING_DEVICE: Device = "auto"
BATCHED_MAX_BATCH = 64
BATCHED_QUEUE_DELAY_MS = 2.0
RAW_BATCH_SIZES = (1, 8, 16, 32, 64, 128)
RAW_SECONDS_PER_BATCH = 2.0
RAW_MAX_RUNS = 100_000  # bounds the loop even if a run were unexpectedly instant
TARGET_BATCHED_VS_UNBATCHED = 3.0
STRETCH_BATCHED_VS_UNBATCHED = 4.0
TARGET_BATCHED_VS_RAW = 0.6

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
GATEWAY_ROUNDS = (("direct", "gateway"), ("gateway", "direct"), ("direct", "gateway"))
#: Sent on every request, both ways: once the gateway has a prediction cache, it must be bypassed here.
GATEWAY_REQUEST_HEADERS = {"Cache-Control": "no-cache, no-store"}
HALF_LOAD_FRACTION = 0.5  # of the gateway's median saturated requests/s, for the fixed-rate latency runs
#: Order of the fixed-rate runs (ABBA): the added latency is median(gateway) − median(direct) per percentile.
HALF_LOAD_ORDER = ("direct", "gateway", "gateway", "direct")
LATENCY_PERCENTILES = ("p50", "p90", "p99")
FIXED_RATE_CONNECTIONS = 64
FIXED_RATE_TIMEOUT_S = 10.0
GENERATOR_LAG_WARN_MS = 5.0
TARGET_GATEWAY_VS_DIRECT = 0.5  # a bare starlette + aiohttp proxy measured 0.48 on this class of machine
STRETCH_GATEWAY_VS_DIRECT = 0.65

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


# --------------------------------------------------------------------------------------------------------------
# wrk: a Lua script that POSTs one body and prints its summary as one JSON line
# --------------------------------------------------------------------------------------------------------------

WRK_MARKER = "BLUEGREEN_WRK_RESULT"

_WRK_LUA = string.Template(r"""-- generated by loadtests/bench.py
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
$headers
wrk.body = $body

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


def wrk_lua_script(body: str, headers: Mapping[str, str] | None = None) -> str:
    """A wrk script that POSTs ``body`` as JSON (with any extra ``headers``) and reports its summary on one
    ``WRK_MARKER`` line."""
    # The spaces matter: "[[" would open a Lua long string.
    extra = "\n".join(f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in (headers or {}).items())
    return _WRK_LUA.substitute(headers=extra, body=_lua_string(body), marker=WRK_MARKER)


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
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    with httpx.Client(timeout=2.0) as client:
        while True:
            if server.popen.poll() is not None:
                raise RuntimeError(f"the {server.name} exited with {server.popen.returncode}:\n{server.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(ready_url).status_code == 200:
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
def gateway_server(routing: Mapping[str, Any], log_dir: Path) -> Iterator[ServerProcess]:
    """A ``bluegreen gateway`` child routing as ``routing`` says (the routing file's shape), on free ports.

    The child gets this environment without any ``BLUEGREEN_*`` variable, then only its ports and a throwaway
    admin token: a developer's own settings (a Redis URL, a state file) must not change what is measured.
    """
    data_port, admin_port = free_ports(2)
    config = log_dir / f"routing-{data_port}.json"
    config.write_text(json.dumps(routing, indent=2))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
    env.update({"BLUEGREEN_DATA__HOST": LOOPBACK, "BLUEGREEN_DATA__PORT": str(data_port),
                "BLUEGREEN_ADMIN__HOST": LOOPBACK, "BLUEGREEN_ADMIN__PORT": str(admin_port),
                "BLUEGREEN_ADMIN_TOKEN": secrets.token_urlsafe(24)})
    args = [sys.executable, "-m", "gateway.cli", "gateway", "--config", str(config)]
    with server_process("gateway", args, f"http://{LOOPBACK}:{data_port}", log_dir, env=env) as server:
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


def describe_machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, ONNX Runtime and its providers, GPU if any."""
    import onnxruntime as ort

    from serving.runtime import available_cpus

    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        mem_gib = round(kib / 2**20, 1)
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=False).stdout
            gpus = [line.strip() for line in out.splitlines() if line.strip()]
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False)
        if rev.returncode == 0:
            commit = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": available_cpus(),
        "memory_gib": mem_gib,
        "gpus": gpus,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "wrk": _wrk_version(),
        "commit": commit,
        # The machines are shared: a high load average before the run says the figures are noisier than usual.
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


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


class SuiteError(Exception):
    """A suite could not measure (a server would not start, wrk failed): reported, exit status 2."""


def v2_json_body(input_name: str, row: Sequence[float]) -> str:
    """A V2 inference request carrying one FP32 row."""
    doc = {"inputs": [{"name": input_name, "datatype": "FP32", "shape": [1, len(row)], "data": list(row)}]}
    return json.dumps(doc, separators=(",", ":"))


def measure_raw(model_path: Path, device: Device, batch_sizes: Sequence[int], seconds: float,
                label: str = "raw onnxruntime") -> dict[str, Any]:
    """rows/s of ONNX Runtime in this process, per batch size, with the model server's session settings."""
    from serving.runtime import Session

    session = Session(model_path, device)
    inputs, _ = session.io_specs()
    rng = np.random.default_rng(0)
    by_batch = []
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
        by_batch.append({"batch": batch, "runs": runs, "seconds": elapsed, "rows_per_s": batch * runs / elapsed,
                         "ms_per_run": 1000.0 * elapsed / runs})
        print(f"  {label} batch {batch:>4}: {batch * runs / elapsed:>10,.0f} rows/s "
              f"({1000.0 * elapsed / runs:.2f} ms/run)", flush=True)
    best = max(by_batch, key=lambda r: r["rows_per_s"])
    result = {"providers": session.providers, "threads": session.threads, "seconds_per_batch": seconds,
              "by_batch": by_batch, "best_batch": best["batch"], "best_rows_per_s": best["rows_per_s"]}
    del session
    gc.collect()
    return result


def _measure_server(ctx: SuiteContext, label: str, model: str, extra: list[str], body: str,
                    rows_per_request: int, duration_s: int) -> dict[str, Any]:
    name = model.split(":")[0]
    script = ctx.work_dir / f"{label}.lua"
    script.write_text(wrk_lua_script(body))
    with model_server(ctx.repo, [model], extra, ctx.work_dir) as server:
        provider, threads = server.provider(model)
        url = f"{server.url}/v2/models/{name}/infer"
        print(f"  {label}: server ready on {server.url} ({provider or 'provider not logged'}); "
              f"warm-up {WARMUP_S}s, then {duration_s}s", flush=True)
        warmup = run_wrk(url, script, WARMUP_S)
        stats0, cpu0 = model_stats(server.url, name), cpu_readings({"server": server})
        result = run_wrk(url, script, duration_s)
        stats1, cpu1 = model_stats(server.url, name), cpu_readings({"server": server})
    result["label"] = label
    result["server_command"] = "bluegreen serve-model " + " ".join(_display(a) for a in server.args[4:])
    result["wrk_command"] = " ".join(wrk_command(url, script.name, duration_s, WRK_CONNECTIONS))
    result["provider"], result["server_threads"] = provider, threads
    result["rows_per_request"] = rows_per_request
    result["rows_per_s"] = result["requests_per_s"] * rows_per_request
    result["warmup"] = {"requests": warmup["requests"], "non_2xx": warmup["non_2xx"],
                        "socket_errors": warmup["socket_errors"]}
    cpu, cores = cpu_used(cpu0, cpu1, result["duration_s"])
    result["server_cpu_s"], result["server_cores"] = cpu["server"], cores["server"]
    if stats0 is not None and stats1 is not None and stats1[1] > stats0[1]:
        rows, runs = stats1[0] - stats0[0], stats1[1] - stats0[1]
        result["server_batches"] = {"rows": rows, "runs": runs, "mean_rows_per_run": rows / runs}
    else:
        result["server_batches"] = None
    result["flagged"] = result["non_2xx"] > 0 or result["socket_errors"] > 0 or result["requests"] == 0
    return result


def _display(arg: str) -> str:
    """A command-line argument as a reader would type it: paths inside the project made relative."""
    path = Path(arg)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else arg


def _reproduce(suite: str, ctx: SuiteContext) -> str:
    from models.build import DEFAULT_REPOSITORY

    command = f"bluegreen bench {suite} --duration {ctx.duration_s:g}"
    if ctx.repo.resolve() != Path(DEFAULT_REPOSITORY).resolve():
        command += f" --repo {_display(str(ctx.repo))}"
    return command


def _ratio(name: str, value: float, target: float, stretch: float | None = None) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target, "stretch": stretch, "met": value >= target,
            "stretch_met": None if stretch is None else value >= stretch}


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


def run_serving(ctx: SuiteContext) -> dict[str, Any]:
    """Dynamic batching on vs off vs raw ONNX Runtime at its best batch size, on the ``wide`` model.

    Order: raw ONNX Runtime first (only this process busy), then the batched server, then the unbatched one,
    each started, measured and stopped before the next so nothing else competes for the cores.
    """
    name, version = SERVING_MODEL
    model = f"{name}:{version}"
    model_path = ctx.repo / name / version / "model.onnx"
    ensure_models(ctx.repo, [model])
    duration_s = max(1, round(ctx.duration_s))
    row = np.random.default_rng(0).standard_normal(512).round(6).tolist()
    body = v2_json_body("input", row)

    raw = measure_raw(model_path, SERVING_DEVICE, RAW_BATCH_SIZES, RAW_SECONDS_PER_BATCH)
    common = ["--device", SERVING_DEVICE]
    batched = _measure_server(ctx, "batched", model, [*common, "--max-batch-size", str(BATCHED_MAX_BATCH),
                                                     "--max-queue-delay-ms", f"{BATCHED_QUEUE_DELAY_MS:g}"],
                              body, 1, duration_s)
    unbatched = _measure_server(ctx, "unbatched", model, [*common, "--max-batch-size", "1"], body, 1, duration_s)

    # The machine is shared: measure the best batch again now that the servers are done. The ratio takes the
    # higher figure (the conservative choice), and the spread between the two says how noisy the run was.
    recheck = measure_raw(model_path, SERVING_DEVICE, [raw["best_batch"]], RAW_SECONDS_PER_BATCH,
                          label="raw onnxruntime, again")["by_batch"][0]
    raw["recheck_after_servers"] = recheck
    raw["best_rows_per_s_before"] = raw["best_rows_per_s"]
    raw["best_rows_per_s"] = max(raw["best_rows_per_s"], recheck["rows_per_s"])
    spread = abs(recheck["rows_per_s"] - raw["best_rows_per_s_before"]) / raw["best_rows_per_s"]
    raw["spread_before_after"] = spread

    ratios = [
        _ratio("batched / unbatched rows/s", batched["rows_per_s"] / unbatched["rows_per_s"]
               if unbatched["rows_per_s"] else 0.0, TARGET_BATCHED_VS_UNBATCHED, STRETCH_BATCHED_VS_UNBATCHED),
        _ratio(f"batched / raw ONNX Runtime (batch {raw['best_batch']}) rows/s",
               batched["rows_per_s"] / raw["best_rows_per_s"], TARGET_BATCHED_VS_RAW),
    ]
    notes = [SHARED_CORES_NOTE]
    if spread > 0.1:
        notes.append(f"raw ONNX Runtime at batch {raw['best_batch']} differed by {spread:.0%} between the start "
                     f"and the end of this run ({raw['best_rows_per_s_before']:,.0f} vs {recheck['rows_per_s']:,.0f} "
                     "rows/s): something else was using the cores, so treat these ratios as noisy.")
    providers = {batched["provider"], unbatched["provider"], raw["providers"][0]}
    if len(providers - {None}) > 1:
        notes.append(f"the runs did not all use the same execution provider: {sorted(p for p in providers if p)}")
    return {
        "suite": "serving",
        "title": "Serving: dynamic batching on vs off vs raw ONNX Runtime",
        "command": _reproduce("serving", ctx),
        "settings": {
            "model": model, "model_path": _display(str(model_path)),
            "device": SERVING_DEVICE, "rows_per_request": 1, "connections": WRK_CONNECTIONS,
            "wrk_threads": WRK_THREADS, "duration_s": duration_s, "warmup_s": WARMUP_S,
            "batched": {"max_batch_size": BATCHED_MAX_BATCH, "max_queue_delay_ms": BATCHED_QUEUE_DELAY_MS},
            "unbatched": {"max_batch_size": 1},
            "raw_batch_sizes": list(RAW_BATCH_SIZES), "raw_seconds_per_batch": RAW_SECONDS_PER_BATCH,
        },
        "runs": {"batched": batched, "unbatched": unbatched},
        "raw": raw,
        "ratios": ratios,
        "ok": not (batched["flagged"] or unbatched["flagged"]),
        "notes": notes,
    }


def _saturate(round_no: int, target: str, url: str, script: Path, duration_s: int,
              processes: Mapping[str, ServerProcess]) -> dict[str, Any]:
    """One wrk run at GATEWAY_CONNECTIONS: warm-up, then the measured run with every process's CPU around it.

    The model server's row count around the run says how many requests it inferred: through the gateway that must
    be every request, or something (a cache) answered without it and the run does not measure the proxy path.
    """
    name, version = GATEWAY_MODEL
    server_url = processes["model_server"].url
    warmup = run_wrk(url, script, WARMUP_S, GATEWAY_CONNECTIONS)
    before, stats0, pressure0 = cpu_readings(processes), model_stats(server_url, name, version), cpu_pressure_s()
    result = run_wrk(url, script, duration_s, GATEWAY_CONNECTIONS)
    after, stats1, pressure1 = cpu_readings(processes), model_stats(server_url, name, version), cpu_pressure_s()
    result["cpu_s"], result["cores"] = cpu_used(before, after, result["duration_s"])
    result["cpu_pressure"] = cpu_used({"psi": pressure0}, {"psi": pressure1}, result["duration_s"])[1]["psi"]
    result["model_server_rows"] = None if stats0 is None or stats1 is None else stats1[0] - stats0[0]
    result.update(round=round_no, target=target, url=url,
                  wrk_command=" ".join(wrk_command(url, script.name, duration_s, GATEWAY_CONNECTIONS)),
                  warmup={"requests": warmup["requests"], "non_2xx": warmup["non_2xx"],
                          "socket_errors": warmup["socket_errors"]})
    result["bypassed_model_server"] = (result["model_server_rows"] is not None
                                       and result["model_server_rows"] < 0.99 * result["requests"])
    result["flagged"] = (result["non_2xx"] > 0 or result["socket_errors"] > 0 or result["requests"] == 0
                         or result["bypassed_model_server"])
    print(f"  round {round_no} {target:>7}: {result['requests_per_s']:>8,.0f} req/s, p50 "
          f"{result['latency_ms']['p50']:.1f} ms, p99 {result['latency_ms']['p99']:.1f} ms"
          + ("  FLAGGED" if result["flagged"] else ""), flush=True)
    return result


def round_ratios(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per round that has both, the direct and gateway requests/s and gateway / direct."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(int(run["round"]), {})[str(run["target"])] = float(run["requests_per_s"])
    rounds = []
    for n, rps in sorted(by_round.items()):
        if "direct" in rps and "gateway" in rps:
            ratio = rps["gateway"] / rps["direct"] if rps["direct"] > 0 else 0.0
            rounds.append({"round": n, "direct_rps": rps["direct"], "gateway_rps": rps["gateway"], "ratio": ratio})
    return rounds


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_latency_ms(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per target, the median over its runs of each percentile of open-loop latency (ms)."""
    targets = dict.fromkeys(str(r["target"]) for r in runs)
    return {t: {q: _median([r["latency_ms"].get(q) for r in runs if r["target"] == t]) for q in LATENCY_PERCENTILES}
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
    """One run of :mod:`loadtests.fixed_rate` as a child process (its CPU accounted apart from this runner's)."""
    _check_loopback(url)
    out = work_dir / f"fixed-rate-{run_no}-{target}.json"
    header_args = [arg for k, v in GATEWAY_REQUEST_HEADERS.items() for arg in ("--header", f"{k}: {v}")]
    cpu_args = [arg for name, p in processes.items() for arg in ("--cpu-of", f"{name}={p.popen.pid}")]
    command = [sys.executable, "-m", "loadtests.fixed_rate", url, "--rate", f"{rate_per_s:.1f}",
               "--duration", str(duration_s), "--warmup", str(WARMUP_S), "--body-file", str(body_file),
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
    """Gateway vs direct to the model server: throughput at saturation, added latency at half of it.

    One model server (``digits`` 1 and 2, default batching) and one gateway in front of it (blue = version 1 at
    weight 100; green = version 2 on the same server at weight 0, never called) run for the whole suite. wrk
    measures direct and through the gateway in the order of :data:`GATEWAY_ROUNDS` — alternating, so that drift
    in what else the shared machine runs shows up as spread between rounds rather than as a bias to one side —
    and the ratio quoted is the median of the rounds' ratios. Then :mod:`loadtests.fixed_rate` sends
    :data:`HALF_LOAD_FRACTION` of the gateway's median saturated rate to each, in the order of
    :data:`HALF_LOAD_ORDER`, and the added latency is median(gateway) − median(direct) at each percentile.
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

    with model_server(ctx.repo, models, [], ctx.work_dir) as server:
        routing = {"models": {name: {
            "colors": {"blue": {"version": version, "backends": [server.url]},
                       "green": {"version": GATEWAY_GREEN_VERSION, "backends": [server.url]}},
            "weights": {"blue": 100, "green": 0}}}}
        with gateway_server(routing, ctx.work_dir) as gateway:
            urls = {"direct": f"{server.url}/v2/models/{name}/versions/{version}/infer",
                    "gateway": f"{gateway.url}/v2/models/{name}/infer"}
            provenance = _check_answers(urls, body)
            processes = {"gateway": gateway, "model_server": server}
            print(f"  model server {server.url}, gateway {gateway.url}; {len(GATEWAY_ROUNDS)} rounds of wrk at "
                  f"{GATEWAY_CONNECTIONS} connections ({WARMUP_S}s warm-up + {duration_s}s each)", flush=True)
            runs = [_saturate(n, target, urls[target], script, duration_s, processes)
                    for n, order in enumerate(GATEWAY_ROUNDS, start=1) for target in order]
            rounds = round_ratios(runs)
            gateway_rps = statistics.median(r["gateway_rps"] for r in rounds)
            if gateway_rps <= 0:
                raise SuiteError("the gateway answered no request at saturation")
            rate = HALF_LOAD_FRACTION * gateway_rps
            half = [run_fixed_rate(n, target, urls[target], body_file, rate, duration_s, processes, ctx.work_dir)
                    for n, target in enumerate(HALF_LOAD_ORDER, start=1)]
            gateway_log = gateway.log()
        server_command = re.sub(r"--port \d+", "--port <free port>",
                                "bluegreen serve-model " + " ".join(_display(a) for a in server.args[4:]))

    median_ratio = statistics.median(r["ratio"] for r in rounds)
    ratios = [_ratio(f"gateway / direct requests/s (median of {len(rounds)} rounds)", median_ratio,
                     TARGET_GATEWAY_VS_DIRECT, STRETCH_GATEWAY_VS_DIRECT)]
    medians = median_latency_ms(half)
    timing = server_timing_medians([r for r in half if r["target"] == "gateway"])
    notes = [GATEWAY_SHARED_CORES_NOTE, FIXED_RATE_NOTE]
    spread = (max(r["ratio"] for r in rounds) - min(r["ratio"] for r in rounds)) / median_ratio if median_ratio else 0
    if spread > 0.1:
        notes.append(f"the rounds' ratios spread over {spread:.0%} of their median "
                     f"({min(r['ratio'] for r in rounds):.2f} to {max(r['ratio'] for r in rounds):.2f}): the cores "
                     "were crowded (see CPU pressure); the median is the figure to quote, and a rerun may differ.")
    if any(r["bypassed_model_server"] for r in [*runs, *half]):
        notes.append("in a run marked ⚠ the model server inferred fewer rows than the gateway answered: something "
                     "(a cache not bypassed) answered without it, so that run does not measure the proxy path.")
    for doc in half:
        lag = doc["send_lag_ms"].get("p99")
        if lag is not None and lag > GENERATOR_LAG_WARN_MS:
            notes.append(f"in fixed-rate run {doc['run']} ({doc['target']}) the generator started 1% of its requests "
                         f"{lag:.1f} ms or more late (p99 send lag): the cores were crowded, and part of that run's "
                         "tail is the generator's own delay, which it still counts.")
    errors_in_log = [line for line in gateway_log.splitlines() if " ERROR " in line or "Traceback" in line]
    if errors_in_log:
        notes.append(f"the gateway logged {len(errors_in_log)} error line(s), first: `{errors_in_log[0][:200]}`")
    return {
        "suite": "gateway",
        "title": "Gateway vs direct to the model server",
        "command": _reproduce("gateway", ctx),
        "settings": {
            "model": f"{name}:{version}", "rows_per_request": 1, "request_headers": GATEWAY_REQUEST_HEADERS,
            "server_command": server_command, "routing": _display_routing(routing),
            "connections": GATEWAY_CONNECTIONS, "wrk_threads": WRK_THREADS, "duration_s": duration_s,
            "warmup_s": WARMUP_S, "round_orders": [list(order) for order in GATEWAY_ROUNDS],
            "half_load_fraction": HALF_LOAD_FRACTION, "half_load_order": list(HALF_LOAD_ORDER),
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



Suite = Callable[[SuiteContext], dict[str, Any]]

#: Implemented suites, by the name ``bluegreen bench`` takes.
SUITES: dict[str, Suite] = {"serving": run_serving, "gateway": run_gateway}
#: Suites the CLI accepts that are still to be written; asking for one says so instead of inventing numbers.
PLANNED_SUITES = ("cache", "telemetry")


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


def _machine_line(machine: dict[str, Any]) -> str:
    parts = [f"{machine.get('cpu_model', 'unknown CPU')}, {machine.get('cpu_count')} cores "
             f"({machine.get('usable_cpus')} usable)"]
    if machine.get("memory_gib"):
        parts.append(f"{machine['memory_gib']} GiB RAM")
    if machine.get("gpus"):
        parts.append("GPU: " + "; ".join(machine["gpus"]))
    parts.append(f"onnxruntime {machine.get('onnxruntime')} (providers offered: "
                 f"{', '.join(machine.get('onnxruntime_providers') or [])})")
    if machine.get("wrk"):
        parts.append(str(machine["wrk"]))
    parts.append(f"Python {machine.get('python')}, {machine.get('os')}")
    if machine.get("commit"):
        parts.append(f"commit `{machine['commit']}`")
    if machine.get("load_average_at_start"):
        parts.append("load average at start " + " / ".join(f"{x:g}" for x in machine["load_average_at_start"]))
    return "; ".join(parts)


def _ratio_row(r: dict[str, Any]) -> str:
    target = f"≥ {r['target']:g}x"
    if r.get("stretch") is not None:
        target += f" (stretch {r['stretch']:g}x)"
    verdict = "met" if r["met"] else "**below target**"
    if r["met"] and r.get("stretch_met"):
        verdict = "met, stretch met"
    return f"| {r['name']} | {r['value']:.2f}x | {target} | {verdict} |"


def render_serving_section(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    raw = doc["raw"]
    lines = [
        f"Measured {doc['date']} on {_machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}` (model `{s['model']}`, {s['rows_per_request']} row per request, "
        f"wrk {s['wrk_threads']} threads x {s['connections']} connections, {s['warmup_s']} s warm-up then "
        f"{s['duration_s']} s measured per server; servers run one at a time).",
        "",
        "| Run | Settings | Provider | rows/s | p50 ms | p95 ms | p99 ms | Requests | Non-2xx | Socket errors "
        "| wrk CPU | Server CPU | Mean rows per model run |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in doc["runs"].items():
        settings = s.get(label, {})
        desc = ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in settings.items())
        batches = run.get("server_batches")
        lat = run["latency_ms"]
        flag = " ⚠" if run.get("flagged") else ""
        lines.append(
            f"| {label}{flag} | {desc} | {run.get('provider') or '-'} | {_fmt_int(run['rows_per_s'])} | "
            f"{_fmt_ms(lat.get('p50'))} | {_fmt_ms(lat.get('p95'))} | {_fmt_ms(lat.get('p99'))} | "
            f"{run['requests']:,} | {run['non_2xx']:,} | {run['socket_errors']:,} | "
            f"{_fmt_cores(run.get('wrk_cores'))} | {_fmt_cores(run.get('server_cores'))} | "
            f"{'-' if not batches else format(batches['mean_rows_per_run'], '.1f')} |")
    candidates = [r for r in raw["by_batch"] if r["batch"] == raw["best_batch"]]
    if raw.get("recheck_after_servers"):
        candidates.append(raw["recheck_after_servers"])
    best = max(candidates, key=lambda r: float(r["rows_per_s"]))
    lines.append(
        f"| raw ONNX Runtime, best batch | batch {raw['best_batch']}, in-process | {raw['providers'][0]} | "
        f"{_fmt_int(best['rows_per_s'])} | {best['ms_per_run']:.1f} per run | - | - | {best['runs']:,} runs | - "
        f"| - | - | - | {raw['best_batch']} |")
    if raw.get("recheck_after_servers"):
        lines += ["", f"Raw ONNX Runtime at batch {raw['best_batch']} was measured before the servers "
                      f"({_fmt_int(raw.get('best_rows_per_s_before'))} rows/s) and again after them "
                      f"({_fmt_int(raw['recheck_after_servers']['rows_per_s'])} rows/s); the ratio uses the higher."]
    lines += ["", "| Ratio | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [_ratio_row(r) for r in doc["ratios"]]
    lines += ["", f"Raw ONNX Runtime by batch size ({raw['threads']} intra-op threads, "
                  f"{raw['seconds_per_batch']:g} s each):", "",
              "| Batch | rows/s | ms per run |", "|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {_fmt_int(r['rows_per_s'])} | {r['ms_per_run']:.2f} |" for r in raw["by_batch"]]
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
        f"Measured {doc['date']} on {_machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. One model server (`{s['server_command']}`, default batching) and one "
        f"gateway in front of it routing `{s['model']}` as blue at weight 100 (green at 0, never called); "
        f"{s['rows_per_request']} row per request, extra request header {headers}. Saturation: wrk "
        f"{s['wrk_threads']} threads x {s['connections']} connections, {s['warmup_s']} s warm-up then "
        f"{s['duration_s']} s measured per run, direct and through the gateway alternated over "
        f"{len(s['round_orders'])} rounds ({'; '.join(', '.join(o) for o in s['round_orders'])}). Half load: "
        f"{s['half_load_fraction']:.0%} of the gateway's median saturated rate, sent at a fixed rate "
        f"({s['warmup_s']} s warm-up then {s['duration_s']} s measured per run) in the order "
        f"{', '.join(s['half_load_order'])}.",
        "",
        "\"CPU pressure\" is the share of the run during which some task waited for a core (Linux PSI), the "
        "benchmark's own processes included: the higher, the more crowded the cores and the noisier the row.",
        "",
        "### Throughput at saturation",
        "",
        "| Round | Target | requests/s | p50 ms | p99 ms | Requests | Rows the model server inferred | Non-2xx "
        "| Socket errors | wrk CPU | Gateway CPU | Model server CPU | CPU pressure |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in doc["saturation"]:
        lat, cores = run["latency_ms"], run.get("cores", {})
        flag = " ⚠" if run.get("flagged") else ""
        lines.append(
            f"| {run['round']} | {run['target']}{flag} | {_fmt_int(run['requests_per_s'])} | "
            f"{_fmt_ms(lat.get('p50'))} | {_fmt_ms(lat.get('p99'))} | {run['requests']:,} | "
            f"{_fmt_int(run.get('model_server_rows'))} | {run['non_2xx']:,} | {run['socket_errors']:,} | "
            f"{_fmt_cores(run.get('wrk_cores'))} | {_fmt_cores(cores.get('gateway'))} | "
            f"{_fmt_cores(cores.get('model_server'))} | {_fmt_share(run.get('cpu_pressure'))} |")
    lines += ["", "| Round | Direct requests/s | Gateway requests/s | Gateway / direct |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['round']} | {_fmt_int(r['direct_rps'])} | {_fmt_int(r['gateway_rps'])} | {r['ratio']:.2f}x |"
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
    return [f"Measured {doc.get('date', '?')} on {_machine_line(doc.get('machine', {}))}.", "",
            f"Reproduce: `{doc.get('command', 'bluegreen bench ' + str(doc.get('suite')))}`; the figures are in "
            f"`bench-{doc.get('suite')}.json`."]


#: Suite name -> the function that renders its section of benchmarks.md.
SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {"serving": render_serving_section,
                                                               "gateway": render_gateway_section}

SUITE_ORDER = ("serving", "gateway", "cache", "telemetry")


def render_markdown(docs: dict[str, dict[str, Any]]) -> str:
    """The whole benchmarks.md from every suite's JSON document, one section each, in a fixed order."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `bluegreen bench` from the `bench-<suite>.json` files beside this one; each suite owns a",
        "section, and rerunning a suite replaces only its own. Do not edit by hand.",
        "",
        "The machines are small and shared, so the figures to quote are the **ratios measured within one run**;",
        "absolute rows/s and latencies describe that run's machine only (DESIGN.md, \"How we measure performance\").",
    ]
    order = [s for s in SUITE_ORDER if s in docs] + sorted(s for s in docs if s not in SUITE_ORDER)
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


def write_results(out_dir: Path, doc: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{doc['suite']}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / "benchmarks.md").write_text(render_markdown(load_results(out_dir)))
    return path


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------

def _summary_lines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for r in doc.get("rounds", []):
        lines.append(f"  round {r['round']}: direct {r['direct_rps']:,.0f} req/s, gateway {r['gateway_rps']:,.0f} "
                     f"req/s, gateway / direct {r['ratio']:.2f}")
    if "half_load" in doc:
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
        verdict = "PASS" if r["met"] else "BELOW"
        lines.append(f"  {verdict} {r['name']}: {r['value']:.2f}x (target >= {r['target']:g}x"
                     + (f", stretch {r['stretch']:g}x" if r.get("stretch") else "") + ")")
    return lines


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the suites' finally blocks, which stop the servers


def main(suites: list[str], duration_s: float, out_dir: Path | None, repo: Path) -> int:
    """Run the named suites in order; write their JSON and regenerate benchmarks.md after each one."""
    out = out_dir if out_dir is not None else DEFAULT_OUT
    unknown = [s for s in suites if s not in SUITES and s not in PLANNED_SUITES]
    if unknown:
        print(f"error: unknown suite(s) {', '.join(unknown)}; known: {', '.join(SUITE_ORDER)}", file=sys.stderr)
        return 2
    if duration_s <= 0:
        print("error: --duration must be positive", file=sys.stderr)
        return 2
    for name in suites:
        if name not in SUITES:
            print(f"bench {name}: not implemented yet (nothing measured, nothing written)")
    runnable = [s for s in dict.fromkeys(suites) if s in SUITES]
    if not runnable:
        return 2
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
                                   machine=machine)
                started = time.monotonic()
                try:
                    doc = SUITES[name](ctx)
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
