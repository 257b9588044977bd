"""The release plan's validation gate behind ``bluegreen validate``: may this model version take traffic?

It lives beside :mod:`models.build` because it judges what the build wrote, in the same place: it reads a
version's ``metadata.json`` (signature) and ``holdout.npz`` (evaluation set) and writes its verdict beside
them, ``<repo>/<name>/<version>/validation.json`` and ``validation.md``. The gateway's ``canary start`` reads
that JSON (``gateway.admin.validation_report``: top-level ``"passed"``, ``"checks"`` with ``"check"`` and
``"result"``) and refuses a candidate version without a passing report.

The checks, each ``PASS``, ``FAIL`` or ``N/A`` (not applicable, or not measurable here; it never fails the gate
and never counts as a pass either)::

    accuracy      the held-out split scored by the server over HTTP, batched           >= 0.85
                    (macro precision, recall and F1 reported beside it, not judged)
    latency_p95   single-row requests, closed loop (asyncio + aiohttp) at a stated     <= 100 ms
    throughput      concurrency, after a warm-up                                       >= 1,000 requests/s
    peak_memory   VmHWM of the server process this command started                     <= 8 GB
    bias          largest accuracy gap between the evaluation set's ``group`` values   <= 0.1
                    (N/A without a ``group`` array; FAIL then with ``--require-bias``)
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
import re
import shlex
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson

from loadtests import closed_loop, hostile
from loadtests.closed_loop import ClosedLoopResult
from models.validation_report import render_markdown, report_lines
from models.validation_types import (
    Check,
    EvalSet,
    Result,
    Signature,
    Target,
    ValidationError,
    predicted_classes,
    v2_body,
)
from serving.machine import describe_machine, machine_line
from serving.process import LOOPBACK, ChildFailed, ChildProcess, free_port, http_ok, process_alive
from serving.repository import DEFAULT_REPOSITORY

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


def macro_scores(predictions: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Precision, recall and F1 per class and their unweighted (macro) means over the classes in the labels:
    accuracy alone hides a model that sacrifices a rare class. A class never predicted has precision 0 (the
    convention scikit-learn's ``zero_division=0`` follows), so the macro figures cannot flatter such a model."""
    per: dict[str, dict[str, float]] = {}
    for cls in sorted(np.unique(labels).tolist()):
        tp = int(((predictions == cls) & (labels == cls)).sum())
        predicted, actual = int((predictions == cls).sum()), int((labels == cls).sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per[str(cls)] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    n = len(per)
    return {"precision_macro": sum(c["precision"] for c in per.values()) / n,
            "recall_macro": sum(c["recall"] for c in per.values()) / n,
            "f1_macro": sum(c["f1"] for c in per.values()) / n, "per_class": per}


def accuracy_check(predictions: np.ndarray, evalset: EvalSet) -> Check:
    correct = int((predictions == evalset.labels).sum())
    n = len(evalset.labels)
    acc = correct / n
    scores = macro_scores(predictions, evalset.labels)
    return Check("accuracy", "PASS" if acc >= MIN_ACCURACY else "FAIL",
                 f"{acc:.4f} ({correct}/{n} held-out rows; needs >= {MIN_ACCURACY}); macro precision "
                 f"{scores['precision_macro']:.4f}, recall {scores['recall_macro']:.4f}, F1 {scores['f1_macro']:.4f}",
                 acc, f">= {MIN_ACCURACY}", {"correct": correct, "rows": n, "evaluation_set": str(evalset.path),
                                             **scores})


def group_accuracy(predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, dict[str, float]]:
    """Per group (as text, sorted): rows and accuracy."""
    per: dict[str, dict[str, float]] = {}
    for g in sorted(np.unique(groups).tolist(), key=str):
        mask = groups == g
        n = int(mask.sum())
        per[str(g)] = {"rows": n, "accuracy": float((predictions[mask] == labels[mask]).sum()) / n}
    return per


def bias_check(predictions: np.ndarray, evalset: EvalSet, *, require: bool = False) -> Check:
    """The largest accuracy gap between groups; N/A (never PASS) when the evaluation set has no groups, which
    fails the gate only when the bias check is ``require``d (``--require-bias``): a release plan that insists on
    a fairness figure must not pass a version nobody could measure."""
    unmeasured: Result = "FAIL" if require else "N/A"
    needs = " (--require-bias: a missing bias figure fails)" if require else ""
    if evalset.groups is None:
        return Check("bias", unmeasured, f"not applicable: the evaluation set ({evalset.path.name}) has no 'group' "
                     f"array{needs}", None, f"<= {MAX_BIAS_GAP}", {"reason": "no group array", "required": require})
    per = group_accuracy(predictions, evalset.labels, evalset.groups)
    if len(per) < 2:
        return Check("bias", unmeasured, f"not applicable: the evaluation set has {len(per)} group{needs}", None,
                     f"<= {MAX_BIAS_GAP}", {"groups": per, "reason": "fewer than two groups", "required": require})
    best = max(per, key=lambda g: per[g]["accuracy"])
    worst = min(per, key=lambda g: per[g]["accuracy"])
    gap = per[best]["accuracy"] - per[worst]["accuracy"]
    figure = (f"gap {gap:.4f} between {best!r} ({per[best]['accuracy']:.4f}, {per[best]['rows']} rows) and "
              f"{worst!r} ({per[worst]['accuracy']:.4f}, {per[worst]['rows']} rows) over {len(per)} groups; "
              f"needs <= {MAX_BIAS_GAP}")
    return Check("bias", "PASS" if gap <= MAX_BIAS_GAP else "FAIL", figure, gap, f"<= {MAX_BIAS_GAP}",
                 {"groups": per})


# --------------------------------------------------------------------------------------------- load


#: The load run's result (the closed-loop driver's; the name the checks and their tests know it by).
LoadResult = ClosedLoopResult


def measure_load(target: Target, sig: Signature, evalset: EvalSet, concurrency: int, duration_s: float,
                 warmup_s: float = WARMUP_S) -> LoadResult:
    """Closed-loop single-row load, run here in this process (its CPU is reported as the generator's)."""
    bodies = [v2_body(sig, evalset.inputs[i:i + 1]) for i in range(min(len(evalset.inputs), 1024))]
    return closed_loop.run(target.infer_url, bodies, concurrency, duration_s, warmup_s, server_pid=target.pid,
                           timeout_s=REQUEST_TIMEOUT_S)


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
    status, answer = oversized_post(target, OVERSIZED_BYTES)
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
        health["process_alive"] = process_alive(target.pid)
    healthy = health.get("ready") == 200 and health.get("good_inference") == 200 and "error" not in health \
        and health.get("process_alive", True)
    refused = sum(c["ok"] for c in cases)
    wrong = [f"{c['case']} -> {c['status'] or 'no answer'}" for c in cases if not c["ok"]]
    figure = f"{refused}/{len(cases)} bad requests answered 4xx" + (f" (not: {'; '.join(wrong)})" if wrong else "")
    figure += "; healthy after (ready, good inference)" if healthy else f"; NOT healthy after: {health}"
    return Check("security", "PASS" if not wrong and healthy else "FAIL", figure, float(refused),
                 f"{len(cases)}/{len(cases)} answered 4xx, healthy after", {"cases": cases, "health_after": health})


# --------------------------------------------------------------------------------------------- processes, machine


def oversized_post(target: Target, size: int) -> tuple[int | None, str]:
    """POST a JSON-looking body of ``size`` bytes over a raw socket, reading while it is sent: a refusal of an
    oversized body comes before the body is read, and an HTTP client that insists on sending it all would see a
    reset instead of the answer. (status, the start of the answer) or (None, why)."""
    parts = urlsplit(target.url)
    host, port = parts.hostname or LOOPBACK, parts.port or 80
    head = hostile.request_head("POST", urlsplit(target.infer_url).path, [
        ("Content-Type", "application/json"), ("Content-Length", str(size)), ("Connection", "close")])
    opening = b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ['
    body = opening + b"0," * ((size - len(opening) - 5) // 2) + b"0]}]}"
    sender = hostile.raw(head + body.ljust(size))
    outcome = asyncio.run(hostile.connection(host, port, "oversized", sender, hostile.Clock(), REQUEST_TIMEOUT_S,
                                             loopback_only=False))
    if outcome.error is not None:
        return None, outcome.error
    if outcome.status is None:
        return None, "no HTTP answer"
    return outcome.status, outcome.body[:200].decode(errors="replace")


@contextlib.contextmanager
def served(repo: Path, name: str, version: str, device: str, log_dir: Path) -> Iterator[Target]:
    """``bluegreen serve-model`` for one version on a free loopback port, stopped on the way out."""
    port = free_port()
    args = [sys.executable, "-m", "gateway.cli", "serve-model", "--repo", str(repo), "--model", f"{name}:{version}",
            "--host", LOOPBACK, "--port", str(port), "--device", device]
    url = f"http://{LOOPBACK}:{port}"
    child = ChildProcess.start(f"model server for {name}:{version}", args,
                               log_dir / f"serve-{name}-{version}-{port}.log")
    try:
        try:
            child.wait_ready(http_ok(f"{url}/v2/health/ready", 2.0), SERVER_READY_TIMEOUT_S, interval_s=0.1)
        except ChildFailed as exc:
            raise ValidationError(str(exc)) from None
        m = re.search(r"loaded \S+ on (\S+) \((\d+) threads\)", child.log())
        yield Target(name, version, url, child.pid, f"{m.group(1)}, {m.group(2)} threads" if m else None)
    finally:
        child.stop(SERVER_STOP_TIMEOUT_S)


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
    require_bias: bool = False
    """A missing or single-group ``group`` array fails the bias check instead of leaving it N/A."""


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


def run_checks(target: Target, sig: Signature, evalset: EvalSet, concurrency: int, duration_s: float,
               require_bias: bool = False) -> list[Check]:
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
            checks = [accuracy_check(predictions, evalset), bias_check(predictions, evalset, require=require_bias)]
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


def _run_for(ref: tuple[str, str], opts: Options, sig: Signature, evalset: EvalSet,
             log_dir: Path) -> tuple[list[Check], Target]:
    name, version = ref
    if opts.url is not None:
        target = Target(name, version, opts.url.rstrip("/"))
        return run_checks(target, sig, evalset, opts.concurrency, opts.duration_s, opts.require_bias), target
    with served(opts.repo, name, version, opts.device, log_dir) as target:
        return run_checks(target, sig, evalset, opts.concurrency, opts.duration_s, opts.require_bias), target


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
