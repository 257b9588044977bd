"""The release plan's validation gate behind ``bluegreen validate``: may this model version take traffic?

It lives beside :mod:`models.build` because it judges what the build wrote, in the same place: it reads a
version's ``metadata.json`` (signature) and ``holdout.npz`` (evaluation set) and writes its verdict beside
them, ``<repo>/<name>/<version>/validation.json`` and ``validation.md``. The gateway's ``canary start`` reads
that JSON (``gateway.admin.validation_report``: top-level ``"passed"``, ``"checks"`` with ``"check"`` and
``"result"``) and refuses a candidate version without a passing report.

The checks, each ``PASS``, ``FAIL`` or ``N/A`` (not applicable, or not measurable here; it never fails the gate
and never counts as a pass either)::

    accuracy      the held-out split scored by the server over HTTP, batched           >= 0.85
    latency_p95   single-row requests, closed loop (asyncio + aiohttp) at a stated     <= 100 ms
    throughput      concurrency, after a warm-up                                       >= 1,000 requests/s
    peak_memory   VmHWM of the server process this command started                     <= 8 GB
    bias          largest accuracy gap between the evaluation set's ``group`` values   <= 0.1
    security      the bad-input suite answered 4xx, then the server still healthy

The thresholds are the release plan's and absolute by nature (docs/benchmarks.md), so
the report names the machine, the concurrency and the load generator's own CPU: on a shared 2-core machine
the load generator takes cores from the server it measures.

The server is started here (``bluegreen serve-model`` on a free loopback port, stopped afterwards) unless
``--url`` names a running one; then the peak memory is N/A, as this command cannot see that process. With a
baseline, the baseline version is put through the same checks on its own server, after the candidate's is
stopped (so the two never share the cores), on the candidate's evaluation set; only the candidate's results
decide the verdict, the baseline's are shown beside them with the differences.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import re
import resource
import select
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson

from models.build import DEFAULT_REPOSITORY
from serving.machine import describe_machine, machine_line

Result = Literal["PASS", "FAIL", "N/A"]

# The release plan's thresholds.
MIN_ACCURACY = 0.85
MAX_P95_MS = 100.0
MIN_THROUGHPUT_RPS = 1000.0
MAX_PEAK_MEMORY_BYTES = 8 * 10**9  # 8 GB
MAX_BIAS_GAP = 0.1

DEFAULT_CONCURRENCY = 32
DEFAULT_DURATION_S = 5.0
WARMUP_S = 1.0
EVAL_BATCH_ROWS = 64  # rows per accuracy request: well under the server's per-request row limit
REQUEST_TIMEOUT_S = 10.0
SERVER_READY_TIMEOUT_S = 120.0
SERVER_STOP_TIMEOUT_S = 20.0
#: Twice the model server's and the gateway's default body limit (16 MiB): refused, whatever the target.
OVERSIZED_BYTES = 32 * 1024 * 1024
CHECK_ORDER = ("accuracy", "latency_p95", "throughput", "peak_memory", "bias", "security")


class ValidationError(Exception):
    """The gate could not run (unknown model, server that would not start): exit status 2, no report."""


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Signature:
    """The one input a single-input model takes and the output the predicted class comes from."""

    input_name: str
    input_datatype: str
    input_shape: tuple[int, ...]
    output_name: str
    output_is_label: bool  # True: the output holds class ids; False: scores, the class is their argmax

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Signature:
        inputs, outputs = meta.get("inputs") or [], meta.get("outputs") or []
        if len(inputs) != 1 or not outputs:
            raise ValidationError("the gate scores single-input models with at least one output; metadata.json "
                                  f"declares {len(inputs)} inputs and {len(outputs)} outputs")
        label = next((o for o in outputs if o.get("name") == "label"), None)
        out = label or outputs[0]
        return cls(str(inputs[0]["name"]), str(inputs[0]["datatype"]), tuple(int(d) for d in inputs[0]["shape"]),
                   str(out["name"]), label is not None)


@dataclass(frozen=True)
class EvalSet:
    """The held-out split: ``input`` rows, their ``label`` and, where the data set has one, a ``group`` each."""

    path: Path
    inputs: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None

    @classmethod
    def load(cls, path: Path) -> EvalSet:
        try:
            with np.load(path, allow_pickle=False) as data:
                inputs = np.asarray(data["input"], dtype=np.float32)
                labels = np.asarray(data["label"]).astype(np.int64)
                groups = np.asarray(data["group"]) if "group" in data.files else None
        except (OSError, KeyError, ValueError) as exc:
            raise ValidationError(f"cannot read the evaluation set {path}: {exc}") from None
        if inputs.ndim != 2 or len(inputs) != len(labels) or len(labels) == 0:
            raise ValidationError(f"{path}: expected 'input' [n, features] and 'label' [n] with n > 0, got "
                                  f"{inputs.shape} and {labels.shape}")
        if groups is not None and groups.shape != labels.shape:
            raise ValidationError(f"{path}: 'group' has shape {groups.shape}, 'label' {labels.shape}")
        return cls(path, inputs, labels, groups)


@dataclass
class Check:
    """One line of the gate: ``figure`` is what a person reads, ``value`` the number compared (if any)."""

    check: str
    result: Result
    figure: str
    value: float | None = None
    threshold: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None  # the baseline's result, figure, value and the difference

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"check": self.check, "result": self.result, "figure": self.figure,
                               "value": self.value, "threshold": self.threshold, "details": self.details}
        if self.baseline is not None:
            doc["baseline"] = self.baseline
        return doc


@dataclass
class Target:
    """A model version behind a V2 server: one this command started (``pid`` known) or one at ``--url``."""

    name: str
    version: str
    url: str
    pid: int | None = None
    device: str | None = None  # the execution provider the server logged, when this command started it

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.name}/versions/{self.version}/infer"

    def label(self) -> str:
        return f"{self.name}:{self.version}"


# --------------------------------------------------------------------------------------------- requests


def v2_body(sig: Signature, rows: np.ndarray, request_id: str | None = None) -> bytes:
    """A JSON V2 request for ``rows``, asking only for the output the class is read from."""
    doc: dict[str, Any] = {"inputs": [{"name": sig.input_name, "datatype": sig.input_datatype,
                                       "shape": [int(rows.shape[0]), *rows.shape[1:]], "data": rows.ravel().tolist()}],
                           "outputs": [{"name": sig.output_name}]}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


def predicted_classes(sig: Signature, response: dict[str, Any], rows: int) -> np.ndarray:
    out = next((o for o in response.get("outputs", ()) if o.get("name") == sig.output_name), None)
    if out is None:
        raise ValueError(f"the response has no output {sig.output_name!r}")
    data = np.asarray(out["data"])
    if sig.output_is_label:
        return data.reshape(rows).astype(np.int64)
    return np.asarray(data.reshape(rows, -1).argmax(axis=1), dtype=np.int64)


def score(client: httpx.Client, target: Target, sig: Signature, evalset: EvalSet) -> np.ndarray:
    """The server's predicted class for every row of the evaluation set, ``EVAL_BATCH_ROWS`` rows a request."""
    predictions: list[np.ndarray] = []
    for start in range(0, len(evalset.inputs), EVAL_BATCH_ROWS):
        rows = evalset.inputs[start:start + EVAL_BATCH_ROWS]
        r = client.post(target.infer_url, content=v2_body(sig, rows), headers={"content-type": "application/json"})
        if r.status_code != 200:
            raise ValueError(f"{target.label()} answered {r.status_code} to an evaluation batch: {r.text[:300]}")
        predictions.append(predicted_classes(sig, r.json(), len(rows)))
    return np.concatenate(predictions)


# --------------------------------------------------------------------------------------------- accuracy, bias


def accuracy_check(predictions: np.ndarray, evalset: EvalSet) -> Check:
    correct = int((predictions == evalset.labels).sum())
    n = len(evalset.labels)
    acc = correct / n
    return Check("accuracy", "PASS" if acc >= MIN_ACCURACY else "FAIL",
                 f"{acc:.4f} ({correct}/{n} held-out rows; needs >= {MIN_ACCURACY})", acc, f">= {MIN_ACCURACY}",
                 {"correct": correct, "rows": n, "evaluation_set": str(evalset.path)})


def group_accuracy(predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Per group (as text, sorted): rows and accuracy."""
    per: dict[str, dict[str, float]] = {}
    for g in sorted(np.unique(groups).tolist(), key=str):
        mask = groups == g
        n = int(mask.sum())
        per[str(g)] = {"rows": n, "accuracy": float((predictions[mask] == labels[mask]).sum()) / n}
    return per


def bias_check(predictions: np.ndarray, evalset: EvalSet) -> Check:
    """The largest accuracy gap between groups; N/A (never PASS) when the evaluation set has no groups."""
    if evalset.groups is None:
        return Check("bias", "N/A", f"not applicable: the evaluation set ({evalset.path.name}) has no 'group' array",
                     None, f"<= {MAX_BIAS_GAP}", {"reason": "no group array"})
    per = group_accuracy(predictions, evalset.labels, evalset.groups)
    if len(per) < 2:
        return Check("bias", "N/A", f"not applicable: the evaluation set has {len(per)} group", None,
                     f"<= {MAX_BIAS_GAP}", {"groups": per, "reason": "fewer than two groups"})
    best = max(per, key=lambda g: per[g]["accuracy"])
    worst = min(per, key=lambda g: per[g]["accuracy"])
    gap = per[best]["accuracy"] - per[worst]["accuracy"]
    figure = (f"gap {gap:.4f} between {best!r} ({per[best]['accuracy']:.4f}, {per[best]['rows']} rows) and "
              f"{worst!r} ({per[worst]['accuracy']:.4f}, {per[worst]['rows']} rows) over {len(per)} groups; "
              f"needs <= {MAX_BIAS_GAP}")
    return Check("bias", "PASS" if gap <= MAX_BIAS_GAP else "FAIL", figure, gap, f"<= {MAX_BIAS_GAP}",
                 {"groups": per})


# --------------------------------------------------------------------------------------------- load


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending sequence (the value at rank ceil(p/100 * n))."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    ok: int
    errors: dict[str, int]
    latencies_ms: list[float]  # of the OK answers in the measured window, ascending
    generator_cpu_s: float
    server_cpu_s: float | None

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s

    def p(self, q: float) -> float | None:
        return percentile(self.latencies_ms, q) if self.latencies_ms else None


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] brings it; plain asyncio only costs the generator more CPU
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def _closed_loop(url: str, bodies: Sequence[bytes], concurrency: int, warmup_s: float,
                       duration_s: float) -> tuple[int, dict[str, int], list[float]]:
    """``concurrency`` workers, each sending its next request as soon as the last one is answered.

    Only requests sent after the warm-up and answered before the end count; a request is one row.
    """
    import aiohttp

    ok = 0
    errors: dict[str, int] = {}
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    headers = {"content-type": "application/json"}
    clock = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds
    begin = clock() + warmup_s
    end = begin + duration_s

    async def worker(offset: int) -> None:
        nonlocal ok
        i = offset
        while True:
            sent = clock()
            if sent >= end:
                return
            body = bodies[i % len(bodies)]
            i += concurrency
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
                error = None if status == 200 else f"HTTP {status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                error = type(exc).__name__
            done = clock()
            if sent < begin or done > end:
                continue
            if error is None:
                ok += 1
                latencies.append((done - sent) * 1000.0)
            else:
                errors[error] = errors.get(error, 0) + 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    latencies.sort()
    return ok, errors, latencies


def measure_load(target: Target, sig: Signature, evalset: EvalSet, concurrency: int, duration_s: float,
                 warmup_s: float = WARMUP_S) -> LoadResult:
    """Closed-loop single-row load, run here in this process (its CPU is reported as the generator's)."""
    bodies = [v2_body(sig, evalset.inputs[i:i + 1]) for i in range(min(len(evalset.inputs), 1024))]
    cpu0, server0 = _self_cpu_s(), process_cpu_s(target.pid)
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        ok, errors, latencies = runner.run(_closed_loop(target.infer_url, bodies, concurrency, warmup_s, duration_s))
    cpu1, server1 = _self_cpu_s(), process_cpu_s(target.pid)
    server_cpu = server1 - server0 if server0 is not None and server1 is not None else None
    return LoadResult(concurrency, duration_s, ok, errors, latencies, cpu1 - cpu0, server_cpu)


def load_checks(load: LoadResult) -> list[Check]:
    failed = sum(load.errors.values())
    where = f"at concurrency {load.concurrency}, {load.duration_s:g} s"
    details = {"concurrency": load.concurrency, "duration_s": load.duration_s, "ok": load.ok,
               "errors": load.errors, "p50_ms": load.p(50), "p95_ms": load.p(95), "p99_ms": load.p(99),
               "max_ms": load.latencies_ms[-1] if load.latencies_ms else None, "rps": load.rps,
               "generator_cpu_s": load.generator_cpu_s, "server_cpu_s": load.server_cpu_s}
    why_errors = f"; {failed} failed requests ({', '.join(f'{k}: {v}' for k, v in load.errors.items())})" \
        if failed else ""
    p95 = load.p(95)
    if p95 is None:
        latency = Check("latency_p95", "FAIL", f"no request answered {where}{why_errors}", None,
                        f"<= {MAX_P95_MS:g} ms", details)
    else:
        good = p95 <= MAX_P95_MS and not failed
        latency = Check("latency_p95", "PASS" if good else "FAIL",
                        f"{p95:.1f} ms {where} (p50 {load.p(50):.1f} ms, p99 {load.p(99):.1f} ms; needs <= "
                        f"{MAX_P95_MS:g} ms){why_errors}", p95, f"<= {MAX_P95_MS:g} ms", details)
    good = load.rps >= MIN_THROUGHPUT_RPS and not failed
    cpu = f"; load generator CPU {load.generator_cpu_s / load.duration_s:.2f} cores" \
        + (f", server {load.server_cpu_s / load.duration_s:.2f} cores" if load.server_cpu_s is not None else "")
    throughput = Check("throughput", "PASS" if good else "FAIL",
                       f"{load.rps:,.0f} requests/s {where}, single-row requests (needs >= {MIN_THROUGHPUT_RPS:,.0f})"
                       f"{cpu}{why_errors}", load.rps, f">= {MIN_THROUGHPUT_RPS:,.0f} requests/s", details)
    return [latency, throughput]


# --------------------------------------------------------------------------------------------- memory


def peak_memory_bytes(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, from /proc/<pid>/status; None where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_check(target: Target) -> Check:
    threshold = f"<= {MAX_PEAK_MEMORY_BYTES / 1e9:g} GB"
    if target.pid is None:
        return Check("peak_memory", "N/A", f"not measured: the server at {target.url} was not started by this "
                     "command, so its process cannot be read (run without --url to measure it)", None, threshold,
                     {"reason": "--url: no process id"})
    peak = peak_memory_bytes(target.pid)
    if peak is None:
        return Check("peak_memory", "N/A", f"not measured: /proc/{target.pid}/status could not be read", None,
                     threshold, {"reason": "unreadable /proc", "pid": target.pid})
    return Check("peak_memory", "PASS" if peak <= MAX_PEAK_MEMORY_BYTES else "FAIL",
                 f"{peak / 2**20:,.0f} MiB VmHWM of the server process (pid {target.pid}; needs {threshold})",
                 float(peak), threshold, {"pid": target.pid, "vmhwm_bytes": peak})


# --------------------------------------------------------------------------------------------- security


def _raw_post(url: str, path: str, declared_length: int, body_chunks: Iterator[bytes],
              timeout_s: float = REQUEST_TIMEOUT_S) -> tuple[int | None, str]:
    """POST over a bare socket, stopping the upload as soon as the server answers (a refusal of an oversized
    body comes before the body is read, and an HTTP client that insists on sending it all would see a reset
    instead of the answer). Returns (status, the start of the answer) or (None, why)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared_length}\r\nConnection: close\r\n\r\n").encode()
    received = b""
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(head)
        pending = next(body_chunks, b"")
        while time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 0.5)
            if readable:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if b"\r\n\r\n" in received and len(received) > 200:
                    break
                continue
            if writable and pending:
                try:
                    sent = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    pending = b""
                    continue
                pending = pending[sent:] or next(body_chunks, b"")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", received)
    if match is None:
        return None, f"no HTTP answer ({len(received)} bytes received)"
    return int(match.group(1)), received.split(b"\r\n\r\n", 1)[-1][:200].decode(errors="replace")


def _oversized_chunks(total: int) -> Iterator[bytes]:
    """A JSON-looking body of ``total`` bytes, made on the fly (never held in memory whole)."""
    head = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ['
    tail = b"0]}]}"
    yield head
    left = total - len(head) - len(tail)
    block = b"0," * 32768
    while left > 0:
        piece = block[:left]
        left -= len(piece)
        yield piece
    yield tail


def bad_inputs(sig: Signature, row: np.ndarray) -> list[tuple[str, bytes, dict[str, str]]]:
    """(case, body, extra headers) for the suite's requests that must each get a 4xx."""
    good = orjson.loads(v2_body(sig, row[None, :]))
    good_input = good["inputs"][0]

    def with_input(**changes: Any) -> bytes:
        return orjson.dumps({**good, "inputs": [{**good_input, **changes}]})

    features = int(row.size)
    other_type = "INT32" if sig.input_datatype != "INT32" else "FP32"
    return [
        ("malformed JSON", b'{"inputs": [{"name": ', {}),
        ("not a JSON object", b"[1, 2, 3]", {}),
        ("wrong input name", with_input(name=sig.input_name + "_nope"), {}),
        ("wrong datatype", with_input(datatype=other_type), {}),
        ("wrong shape (rank)", with_input(shape=[1, 1, features]), {}),
        ("wrong shape (feature dimension)", with_input(shape=[1, features + 1],
                                                       data=[0.0] * (features + 1)), {}),
        ("wrong element count", with_input(data=good_input["data"][:-1]), {}),
        ("binary header length past the body", v2_body(sig, row[None, :]),
         {"inference-header-content-length": "999999"}),
    ]


def security_check(client: httpx.Client, target: Target, sig: Signature, row: np.ndarray) -> Check:
    """Every bad request answered 4xx; afterwards the server is ready and answers a good inference."""
    cases: list[dict[str, Any]] = []

    def record(case: str, status: int | None, answer: str) -> None:
        cases.append({"case": case, "status": status, "ok": status is not None and 400 <= status < 500,
                      "answer": answer[:200]})

    for case, body, headers in bad_inputs(sig, row):
        try:
            r = client.post(target.infer_url, content=body, headers={"content-type": "application/json", **headers})
            record(case, r.status_code, r.text)
        except httpx.HTTPError as exc:
            record(case, None, f"{type(exc).__name__}: {exc}")
    unknown = f"{target.url}/v2/models/{target.name}-no-such-model/infer"
    try:
        r = client.post(unknown, content=v2_body(sig, row[None, :]), headers={"content-type": "application/json"})
        record("unknown model", r.status_code, r.text)
    except httpx.HTTPError as exc:
        record("unknown model", None, f"{type(exc).__name__}: {exc}")
    path = urlsplit(target.infer_url).path
    try:
        status, answer = _raw_post(target.url, path, OVERSIZED_BYTES, _oversized_chunks(OVERSIZED_BYTES))
    except OSError as exc:
        status, answer = None, f"{type(exc).__name__}: {exc}"
    record(f"oversized body ({OVERSIZED_BYTES // 2**20} MiB)", status, answer)

    health: dict[str, Any] = {}
    try:
        health["ready"] = client.get(f"{target.url}/v2/health/ready").status_code
        r = client.post(target.infer_url, content=v2_body(sig, row[None, :]),
                        headers={"content-type": "application/json"})
        health["good_inference"] = r.status_code
        if r.status_code == 200:
            predicted_classes(sig, r.json(), 1)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        health["error"] = f"{type(exc).__name__}: {exc}"
    if target.pid is not None:
        health["process_alive"] = _alive(target.pid)
    healthy = health.get("ready") == 200 and health.get("good_inference") == 200 and "error" not in health \
        and health.get("process_alive", True)
    refused = sum(c["ok"] for c in cases)
    wrong = [f"{c['case']} -> {c['status'] or 'no answer'}" for c in cases if not c["ok"]]
    figure = f"{refused}/{len(cases)} bad requests answered 4xx" + (f" (not: {'; '.join(wrong)})" if wrong else "")
    figure += "; healthy after (ready, good inference)" if healthy else f"; NOT healthy after: {health}"
    return Check("security", "PASS" if not wrong and healthy else "FAIL", figure, float(refused),
                 f"{len(cases)}/{len(cases)} answered 4xx, healthy after", {"cases": cases, "health_after": health})


# --------------------------------------------------------------------------------------------- processes, machine


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_s(pid: int | None) -> float | None:
    """utime + stime of a live process from /proc/<pid>/stat; None where unknown or unreadable."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(repo: Path, name: str, version: str, device: str, log_dir: Path) -> Iterator[Target]:
    """``bluegreen serve-model`` for one version on a free loopback port, stopped on the way out."""
    port = _free_port()
    args = [sys.executable, "-m", "gateway.cli", "serve-model", "--repo", str(repo), "--model", f"{name}:{version}",
            "--host", "127.0.0.1", "--port", str(port), "--device", device]
    log_path = log_dir / f"serve-{name}-{version}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    raise ValidationError(f"the model server for {name}:{version} exited with {proc.returncode}:\n"
                                          f"{log_path.read_text(errors='replace')[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/v2/health/ready").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise ValidationError(f"the model server for {name}:{version} was not ready after "
                                          f"{SERVER_READY_TIMEOUT_S:.0f}s")
                time.sleep(0.1)
        m = re.search(r"loaded \S+ on (\S+) \((\d+) threads\)", log_path.read_text(errors="replace"))
        yield Target(name, version, url, proc.pid, f"{m.group(1)}, {m.group(2)} threads" if m else None)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# --------------------------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Options:
    model: str
    baseline: str | None = None
    url: str | None = None
    repo: Path = DEFAULT_REPOSITORY
    concurrency: int = DEFAULT_CONCURRENCY
    duration_s: float = DEFAULT_DURATION_S
    device: str = "auto"
    command: str = ""


def parse_ref(text: str) -> tuple[str, str]:
    name, sep, version = text.partition(":")
    if not name or not sep or not version:
        raise ValidationError(f"expected NAME:VERSION, got {text!r}")
    return name, version


def model_folder(repo: Path, name: str, version: str) -> Path:
    folder = repo / name / version
    if not (folder / "metadata.json").is_file():
        raise ValidationError(f"{name}:{version} has no metadata.json in {repo} (run: bluegreen build-models)")
    return folder


def run_checks(target: Target, sig: Signature, evalset: EvalSet, concurrency: int, duration_s: float) -> list[Check]:
    """Every check against one target, in the order the report shows them; memory is read last (the peak)."""
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        ready = client.get(f"{target.url}/v2/models/{target.name}/versions/{target.version}/ready")
        if ready.status_code != 200:
            raise ValidationError(f"{target.label()} is not ready at {target.url} ({ready.status_code}: "
                                  f"{ready.text[:200]})")
        try:
            predictions: np.ndarray | None = score(client, target, sig, evalset)
        except (ValueError, KeyError, TypeError, httpx.HTTPError) as exc:  # a model that cannot answer fails
            predictions, why = None, f"{type(exc).__name__}: {exc}"
        if predictions is not None:
            checks = [accuracy_check(predictions, evalset), bias_check(predictions, evalset)]
        else:
            checks = [Check("accuracy", "FAIL", f"could not score the evaluation set: {why}", None,
                            f">= {MIN_ACCURACY}"),
                      Check("bias", "N/A", "not measured: the evaluation set could not be scored", None,
                            f"<= {MAX_BIAS_GAP}")]
        checks += load_checks(measure_load(target, sig, evalset, concurrency, duration_s))
        checks.append(security_check(client, target, sig, evalset.inputs[0]))
    checks.append(memory_check(target))
    return sorted(checks, key=lambda c: CHECK_ORDER.index(c.check))


def attach_baseline(checks: list[Check], baseline: list[Check], label: str) -> None:
    """Put the baseline's result and figure beside each check, with candidate − baseline where both are numbers."""
    by_name = {c.check: c for c in baseline}
    for c in checks:
        b = by_name.get(c.check)
        if b is None:
            continue
        diff = c.value - b.value if c.value is not None and b.value is not None else None
        c.baseline = {"model": label, "result": b.result, "figure": b.figure, "value": b.value, "difference": diff,
                      "details": b.details}


def _fmt_value(check: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if check == "latency_p95":
        return f"{value:.1f} ms"
    if check == "throughput":
        return f"{value:,.0f} requests/s"
    if check == "peak_memory":
        return f"{value / 2**20:,.0f} MiB"
    if check == "security":
        return f"{value:.0f} refused"
    return f"{value:.4f}"


def _fmt_diff(check: str, diff: float | None) -> str:
    if diff is None:
        return "n/a"
    if check == "latency_p95":
        return f"{diff:+.1f} ms"
    if check == "throughput":
        return f"{diff:+,.0f} requests/s"
    if check == "peak_memory":
        return f"{diff / 2**20:+,.0f} MiB"
    if check == "security":
        return f"{diff:+.0f} refused"
    return f"{diff:+.4f}"


def report_lines(checks: Sequence[Check]) -> list[str]:
    lines = []
    for c in checks:
        line = f"{c.result} {c.check}: {c.figure}"
        if c.baseline is not None:
            line += (f" | baseline {c.baseline['model']}: {c.baseline['result']} "
                     f"{_fmt_value(c.check, c.baseline['value'])}, difference "
                     f"{_fmt_diff(c.check, c.baseline['difference'])}")
        lines.append(line)
    return lines


def render_markdown(doc: dict[str, Any]) -> str:
    checks = doc["checks"]
    with_baseline = doc.get("baseline") is not None
    out = [f"# Validation of {doc['model']}:{doc['version']} — {'PASSED' if doc['passed'] else 'FAILED'}", "",
           f"Run {doc['date']} on {machine_line(doc['machine'])}.", "",
           f"Command: `{doc['command']}`", "",
           f"Target: {doc['target']['url']}" + (f" (server started by this command, {doc['target']['device']})"
                                                 if doc["target"].get("pid") else " (a running server, --url)"),
           "", "N/A means not applicable or not measurable here: it neither fails nor passes the gate.", ""]
    if with_baseline:
        out += [f"Baseline: {doc['baseline']['model']}, measured the same way on its own server after the "
                "candidate's was stopped, on the candidate's evaluation set.", "",
                "| Check | Result | Figure | Threshold | Baseline | Difference |", "|---|---|---|---|---|---|"]
    else:
        out += ["| Check | Result | Figure | Threshold |", "|---|---|---|---|"]
    for c in checks:
        row = f"| {c['check']} | **{c['result']}** | {c['figure']} | {c['threshold']} |"
        if with_baseline:
            b = c.get("baseline") or {}
            row += f" {b.get('result', '')} {b.get('figure', '')} | {_fmt_diff(c['check'], b.get('difference'))} |"
        out.append(row.replace("\n", " "))
    load = next(c for c in checks if c["check"] == "latency_p95")["details"]
    out += ["", "## Load", "",
            f"Closed loop, asyncio + aiohttp in the validating process: {load['concurrency']} concurrent single-row "
            f"requests for {load['duration_s']:g} s after a {WARMUP_S:g} s warm-up, on the same machine as the "
            "server (they share its cores).", "",
            "| Requests OK | Errors | Requests/s | p50 ms | p95 ms | p99 ms | max ms | Generator CPU | Server CPU |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {load['ok']} | {sum(load['errors'].values())} | {load['rps']:,.0f} | {_ms(load['p50_ms'])} | "
            f"{_ms(load['p95_ms'])} | {_ms(load['p99_ms'])} | {_ms(load['max_ms'])} | "
            f"{load['generator_cpu_s']:.2f} s | {_num(load['server_cpu_s'])} s |"]
    security = next(c for c in checks if c["check"] == "security")["details"]
    out += ["", "## Bad-input suite", "", "| Case | Status | Answer |", "|---|---|---|"]
    for case in security["cases"]:
        answer = case["answer"].replace("|", "\\|").replace("\n", " ")
        out.append(f"| {case['case']} | {case['status'] or 'no answer'} | {answer} |")
    out += ["", f"Health after: {security['health_after']}"]
    bias = next(c for c in checks if c["check"] == "bias")["details"]
    if "groups" in bias:
        out += ["", "## Accuracy per group", "", "| Group | Rows | Accuracy |", "|---|---|---|"]
        out += [f"| {g} | {v['rows']} | {v['accuracy']:.4f} |" for g, v in bias["groups"].items()]
    return "\n".join(out) + "\n"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _run_for(ref: tuple[str, str], opts: Options, sig: Signature, evalset: EvalSet,
             log_dir: Path) -> tuple[list[Check], Target]:
    name, version = ref
    if opts.url is not None:
        target = Target(name, version, opts.url.rstrip("/"))
        return run_checks(target, sig, evalset, opts.concurrency, opts.duration_s), target
    with served(opts.repo, name, version, opts.device, log_dir) as target:
        return run_checks(target, sig, evalset, opts.concurrency, opts.duration_s), target


def validate(opts: Options, echo: Any = print) -> dict[str, Any]:
    """Run the gate; write ``validation.json`` and ``validation.md`` beside the model; return the report."""
    if opts.concurrency < 1 or not opts.duration_s > 0:
        raise ValidationError("--concurrency must be >= 1 and --duration > 0")
    if opts.url is not None and (urlsplit(opts.url).scheme != "http" or not urlsplit(opts.url).hostname):
        # Plain HTTP only: the oversized-body case speaks HTTP/1.1 over a bare socket (model servers and the
        # gateway listen in plain HTTP; TLS, where there is any, ends in front of them).
        raise ValidationError(f"--url must be an http:// URL, got {opts.url!r}")
    name, version = parse_ref(opts.model)
    folder = model_folder(opts.repo, name, version)
    sig = Signature.from_metadata(json.loads((folder / "metadata.json").read_text()))
    evalset = EvalSet.load(folder / "holdout.npz")
    base_ref = parse_ref(opts.baseline) if opts.baseline else None
    if base_ref is not None:
        model_folder(opts.repo, *base_ref)
    machine = describe_machine()
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="bluegreen-validate-") as tmp:
        checks, target = _run_for((name, version), opts, sig, evalset, Path(tmp))
        if base_ref is not None:
            baseline, _ = _run_for(base_ref, opts, sig, evalset, Path(tmp))
            attach_baseline(checks, baseline, f"{base_ref[0]}:{base_ref[1]}")
    passed = all(c.result != "FAIL" for c in checks)
    doc: dict[str, Any] = {
        "model": name, "version": version, "passed": passed, "checks": [c.as_json() for c in checks],
        "date": started.isoformat(timespec="seconds"), "command": opts.command, "machine": machine,
        "target": {"url": target.url, "pid": target.pid, "device": target.device, "concurrency": opts.concurrency,
                   "duration_s": opts.duration_s, "warmup_s": WARMUP_S},
        "baseline": {"model": f"{base_ref[0]}:{base_ref[1]}"} if base_ref else None,
        "thresholds": {"accuracy": MIN_ACCURACY, "p95_ms": MAX_P95_MS, "throughput_rps": MIN_THROUGHPUT_RPS,
                       "peak_memory_bytes": MAX_PEAK_MEMORY_BYTES, "bias_gap": MAX_BIAS_GAP},
    }
    for line in report_lines(checks):
        echo(line)
    (folder / "validation.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    (folder / "validation.md").write_text(render_markdown(doc))
    echo(f"{'PASSED' if passed else 'FAILED'}: {name}:{version} on {machine_line(machine)}; "
         f"report {folder / 'validation.json'} and validation.md")
    return doc


def main(opts: Options) -> int:
    """Exit status: 0 every check passed (N/A allowed), 1 a check failed, 2 the gate could not run."""
    try:
        doc = validate(opts)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if doc["passed"] else 1


def command_line(argv: Sequence[str]) -> str:
    return "bluegreen " + shlex.join(argv)
