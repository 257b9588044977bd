"""The measuring steps the gateway-family suites (gateway, cache, telemetry, shadow) share: a saturated wrk run
with every process's CPU around it, a fixed-rate run through :mod:`loadtests.fixed_rate`, the round tables and
medians their ratios come from, the routing file they give the gateway, and the tables their sections share.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench.base import (
    LOOPBACK,
    WARMUP_S,
    SuiteError,
    check_loopback,
    display,
    fmt_cores,
    fmt_int,
    fmt_ms,
    fmt_share,
)
from loadtests.bench.servers import ServerProcess, cpu_readings, cpu_used, model_stats
from loadtests.bench.wrk import WRK_THREADS, run_child, run_wrk, wrk_command
from serving.process import cpu_pressure_s

GATEWAY_MODEL = ("digits", "1")  # blue, at weight 100
GATEWAY_GREEN_VERSION = "2"  # served by the same model server, at weight 0: configured, never called
GATEWAY_CONNECTIONS = 32
#: Sent on every request, both ways: once the gateway has a prediction cache, it must be bypassed here.
GATEWAY_REQUEST_HEADERS = {"Cache-Control": "no-cache, no-store"}
HALF_LOAD_FRACTION = 0.5  # of the gateway's median saturated requests/s, for the fixed-rate latency runs
# ... but at most this: the open-loop generator is Python (~0.35 ms of CPU per request at these rates), and above
# ~1,500 requests/s it, the gateway and the model server overcommit the two cores, so the "half load" runs
# measured the generator's own queueing (p50 of ~1 s at 2,600 requests/s, with 0.9 cores of generator).
HALF_LOAD_MAX_RPS = 1500.0
LATENCY_PERCENTILES = ("p50", "p90", "p99")
FIXED_RATE_CONNECTIONS = 64
FIXED_RATE_TIMEOUT_S = 10.0

FIXED_RATE_NOTE = (
    "Half load is sent by `loadtests/fixed_rate.py`, an open-loop generator (asyncio + aiohttp) at a fixed "
    "rate: each request's latency is measured from the moment it was due, so queueing counts (no coordinated "
    "omission, as with wrk2, which Debian does not package). It runs on the same cores as the servers; its CPU "
    "over the measured window is the \"Generator CPU\" column (the whole process, start-up and warm-up "
    "included, is in the JSON), and \"Send lag\" is how late it started requests, its own delay.")


def saturate(round_no: int, target: str, url: str, script: Path, duration_s: int,
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
    result = run_wrk(url, script, duration_s, GATEWAY_CONNECTIONS).as_json()
    after, stats1, pressure1 = cpu_readings(processes), model_stats(server_url, name, version), cpu_pressure_s()
    if counters is not None:
        counters1 = counters()
        result["counters"] = {k: counters1[k] - v for k, v in counters0.items() if k in counters1}
    result["cpu_s"], result["cores"] = cpu_used(before, after, result["duration_s"])
    result["cpu_pressure"] = cpu_used({"psi": pressure0}, {"psi": pressure1}, result["duration_s"])[1]["psi"]
    result["model_server_rows"] = None if stats0 is None or stats1 is None else stats1[0] - stats0[0]
    result.update(round=round_no, target=target, url=url,
                  wrk_command=" ".join(wrk_command(url, script.name, duration_s, GATEWAY_CONNECTIONS)),
                  warmup=warmup.warmup_json())
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


def median_present(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def median_latency_ms(runs: Sequence[Mapping[str, Any]],
                      percentiles: Sequence[str] = LATENCY_PERCENTILES) -> dict[str, dict[str, float | None]]:
    """Per target, the median over its runs of each percentile of open-loop latency (ms)."""
    targets = dict.fromkeys(str(r["target"]) for r in runs)
    return {t: {q: median_present([r["latency_ms"].get(q) for r in runs if r["target"] == t]) for q in percentiles}
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
        doc[name] = {"p50": median_present([t.get("p50") for t in per_run]),
                     "p99": median_present([t.get("p99") for t in per_run]),
                     "count": float(sum(t.get("count") or 0 for t in per_run)), "runs": float(len(per_run))}
    return doc


def run_fixed_rate(run_no: int, target: str, url: str, body_file: Path, rate_per_s: float, duration_s: int,
                   processes: Mapping[str, ServerProcess], work_dir: Path) -> dict[str, Any]:
    """One run of :mod:`loadtests.fixed_rate` as a child process (its CPU accounted apart from this runner's).

    A ``.jsonl`` body file holds one body per line, sent in turn; any other file is the one body sent."""
    check_loopback(url)
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
        display(a) if not a.startswith(str(work_dir)) else Path(a).name for a in command[3:]))
    # The stats span the whole child, warm-up included: every request it sent must have reached the model server.
    result["model_server_rows"] = None if stats0 is None or stats1 is None else stats1[0] - stats0[0]
    sent = result["warmup_requests"] + result["requests"]
    result["bypassed_model_server"] = result["model_server_rows"] is not None and result["model_server_rows"] < sent
    result["flagged"] = bool(result["non_2xx"] or result["errors"] or result["unfinished"] or not result["answered"]
                             or result["bypassed_model_server"])
    lat, lag = result["latency_ms"], result["send_lag_ms"]
    print(f"  fixed rate {run_no} {target:>7}: {rate_per_s:,.0f} req/s asked, "
          f"{result['answered_per_s']:,.0f} answered/s, p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
          f"send lag p99 {lag['p99']:.2f} ms, generator {fmt_cores(result['cores'].get('generator'))}"
          + ("  FLAGGED" if result["flagged"] else ""), flush=True)
    return result


def display_routing(routing: Mapping[str, Any]) -> dict[str, Any]:
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


def server_command(server: ServerProcess) -> str:
    """A model server's command line as a reader would type it, its port a placeholder."""
    return re.sub(r"--port \d+", "--port <free port>",
                  "bluegreen serve-model " + " ".join(display(a) for a in server.args[4:]))


def log_errors(server: ServerProcess) -> list[str]:
    return [line for line in server.log().splitlines() if " ERROR " in line or "Traceback" in line]


def error_notes(servers: Sequence[ServerProcess]) -> list[str]:
    notes = []
    for server in servers:
        errors = log_errors(server)
        if errors:
            notes.append(f"the {server.name} logged {len(errors)} error line(s), first: `{errors[0][:200]}`")
    return notes


def spread_note(values: Sequence[float], what: str) -> list[str]:
    """A note when ratios measured in several rounds spread over more than 10% of their median."""
    mid = statistics.median(values) if values else 0.0
    if len(values) < 2 or not mid:
        return []
    spread = (max(values) - min(values)) / mid
    if spread <= 0.1:
        return []
    return [f"the rounds' {what} spread over {spread:.0%} of their median ({min(values):.2f} to {max(values):.2f}): "
            "the cores were crowded (see CPU pressure); the median is the figure to quote, and a rerun may differ."]


def post_checked(client: httpx.Client, url: str, body: str, headers: Mapping[str, str] | None = None,
                  cache: str | None = None) -> httpx.Response:
    """POST ``body``; 200 is required, and when ``cache`` is given the gateway's ``x-bluegreen-cache`` too."""
    resp = client.post(url, content=body, headers={"content-type": "application/json", **(headers or {})})
    if resp.status_code != 200:
        raise SuiteError(f"{url} answered {resp.status_code}: {resp.text[:500]}")
    if cache is not None and resp.headers.get("x-bluegreen-cache") != cache:
        raise SuiteError(f"{url} answered with x-bluegreen-cache {resp.headers.get('x-bluegreen-cache')!r}, "
                         f"expected {cache!r}: {dict(resp.headers)}")
    return resp


def saturation_table(runs: Sequence[Mapping[str, Any]], labels: Mapping[str, str] | None = None,
                      extra: Sequence[tuple[str, Callable[[Mapping[str, Any]], str]]] = ()) -> list[str]:
    """wrk runs in the order they ran: throughput, latency, what the model server inferred, errors, CPU."""
    head = ["Round", "Target", "requests/s", "p50 ms", "p95 ms", "p99 ms", "Requests", "Model server rows",
            *(h for h, _ in extra), "Non-2xx", "Socket errors", "wrk CPU", "Gateway CPU", "Gateway CPU µs/request",
            "Model server CPU", "CPU pressure"]
    lines = ["| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    for run in runs:
        lat, cores = run["latency_ms"], run.get("cores", {})
        label = (labels or {}).get(run["target"], run["target"]) + (" ⚠" if run.get("flagged") else "")
        cells = [str(run["round"]), label, fmt_int(run["requests_per_s"]), fmt_ms(lat.get("p50")),
                 fmt_ms(lat.get("p95")), fmt_ms(lat.get("p99")), f"{run['requests']:,}",
                 fmt_int(run.get("model_server_rows")), *(f(run) for _, f in extra), f"{run['non_2xx']:,}",
                 f"{run['socket_errors']:,}", fmt_cores(run.get("wrk_cores")), fmt_cores(cores.get("gateway")),
                 fmt_int(gateway_cpu_us_per_request(run)), fmt_cores(cores.get("model_server")),
                 fmt_share(run.get("cpu_pressure"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def round_table_lines(table: Sequence[Mapping[str, Any]], baseline: str, labels: Mapping[str, str]) -> list[str]:
    """Per round: each target's requests/s, then each ratio to the baseline (extra ratios, e.g. hit / miss, too)."""
    targets = list(dict.fromkeys(t for r in table for t in r["rps"] if t != baseline))
    ratio_names = list(dict.fromkeys(k for r in table for k in r["ratios"]))
    head = ["Round", labels.get(baseline, baseline), *(labels.get(t, t) for t in targets),
            *(k if k not in targets else f"{labels.get(k, k)} / {labels.get(baseline, baseline)}" for k in ratio_names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in table:
        cells = [str(r["round"]), fmt_int(r["rps"].get(baseline)), *(fmt_int(r["rps"].get(t)) for t in targets),
                 *("-" if r["ratios"].get(k) is None else f"{r['ratios'][k]:.2f}x" for k in ratio_names)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def wrk_settings(server_cmd: str, routing: Mapping[str, Any], duration_s: int, round_orders: Sequence[Sequence[str]],
                 *, request_headers: bool = True) -> dict[str, Any]:
    """The settings every gateway-family suite reports: the model and its request, the model server and the
    routing, and the wrk load (``request_headers``: whether the requests carry :data:`GATEWAY_REQUEST_HEADERS`)."""
    name, version = GATEWAY_MODEL
    doc: dict[str, Any] = {"model": f"{name}:{version}", "rows_per_request": 1}
    if request_headers:
        doc["request_headers"] = GATEWAY_REQUEST_HEADERS
    doc.update(server_command=server_cmd, routing=display_routing(routing), connections=GATEWAY_CONNECTIONS,
               wrk_threads=WRK_THREADS, duration_s=duration_s, warmup_s=WARMUP_S,
               round_orders=[list(order) for order in round_orders])
    return doc
