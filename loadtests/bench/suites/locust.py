"""The ``locust`` suite: the realistic user mix of ``loadtests/locustfile.py`` against a ``bluegreen up`` stack the
suite starts — requests/s, p50/p95/p99 and failures per user class and per request kind, with every user class
at work (an operator shifting the weights among the prediction clients), then again while green is killed.

Locust is for scenarios, not throughput: on two shared cores it saturates before the gateway does, so this suite
has no throughput target; what it checks is that the mix is served without a failure, and at what latency. Its
runs last ``--duration`` seconds each (at least :data:`MIN_RUN_S`). It is not run by ``bluegreen bench`` with no
suite named (it takes minutes and measures a scenario, not a ratio): ``bluegreen bench locust``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests.bench import base, servers
from loadtests.bench.base import fmt_cores, fmt_int, fmt_ms
from serving.machine import machine_line
from serving.process import ChildFailed, ChildProcess, children_cpu_s, children_of, free_ports, wait_for

USERS = 10
SPAWN_RATE = 5
MIN_RUN_S = 5
GREEN_ANSWERS_BEFORE_KILL = 100
OPERATOR_WAIT_S = "1,3"  # the operator's think time, min,max: it acts several times in a short run
MODELS = ("digits:1", "digits:2")
#: The user class behind each request name of loadtests/locustfile.py.
USER_CLASSES = {"infer json repeat": "PredictionClient", "infer json fresh": "PredictionClient",
                "infer binary repeat": "PredictionClient", "infer binary fresh": "PredictionClient",
                "feedback": "PredictionClient", "admin split get": "Operator", "admin split put": "Operator",
                "admin stats": "Operator"}
PERCENTILES = (50, 95, 99)
LOCUST_NOTE = (
    "Locust (one process, gevent) shares the two cores with the gateway and both model servers and saturates "
    "before they do: these figures say whether this mix of users is served without failures and at what latency, "
    "at the load locust could generate; throughput ratios come from the wrk suites above.")


@dataclass(frozen=True)
class Stats:
    """Requests of one kind (or one user class, or all): counts, requests/s over the run and latency (ms, from
    locust's response-time histogram, nearest rank)."""

    name: str
    user_class: str
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


def _percentile(histogram: Mapping[float, int], q: float) -> float | None:
    """Nearest-rank percentile of a {response time ms: count} histogram."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, -(-q * total // 100))
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return float(value)
    return float(max(histogram))


def summarize(entries: Sequence[Mapping[str, Any]], name: str, user_class: str, run_s: float) -> Stats:
    """One :class:`Stats` over locust's JSON stats ``entries`` (their histograms merged)."""
    histogram: dict[float, int] = {}
    for e in entries:
        for ms, count in (e.get("response_times") or {}).items():
            histogram[float(ms)] = histogram.get(float(ms), 0) + int(count)
    requests = sum(int(e.get("num_requests", 0)) for e in entries)
    p50, p95, p99 = (_percentile(histogram, q) for q in PERCENTILES)
    return Stats(name, user_class, requests, sum(int(e.get("num_failures", 0)) for e in entries),
                 requests / run_s if run_s > 0 else 0.0, p50, p95, p99)


def read_stats(stats_json: Path, run_s: float) -> tuple[list[Stats], list[Stats], Stats]:
    """Per request name, per user class and overall, from locust's ``--json-file``."""
    entries = [e for e in json.loads(stats_json.read_text()) if isinstance(e, dict)]
    by_name = sorted(entries, key=lambda e: (USER_CLASSES.get(e["name"], "?"), e["name"]))
    names = [summarize([e], e["name"], USER_CLASSES.get(e["name"], "?"), run_s) for e in by_name]
    classes = sorted({s.user_class for s in names})
    per_class = [summarize([e for e in entries if USER_CLASSES.get(e["name"], "?") == c], c, c, run_s)
                 for c in classes]
    return names, per_class, summarize(entries, "all", "all", run_s)


@dataclass
class Stack:
    """``bluegreen up`` on free ports, as the suite started it."""

    up: ChildProcess
    data: str
    admin: str
    token: str
    green_port: int


@contextmanager
def stack(ctx: base.SuiteContext) -> Iterator[Stack]:
    """``bluegreen up`` (blue ``digits:1``, green ``digits:2``) on free loopback ports with a throwaway admin token,
    its state in the scratch folder; stopped (and its children with it) on the way out."""
    data, admin, blue, green = free_ports(4)
    token = secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")} | {"BLUEGREEN_ADMIN_TOKEN": token}
    args = [sys.executable, "-m", "gateway.cli", "up", "--repo", str(ctx.repo), "--state-dir",
            str(ctx.work_dir / f"up-{data}"), "--port", str(data), "--admin-port", str(admin), "--blue-port",
            str(blue), "--green-port", str(green)]
    up = ChildProcess.start("bluegreen up", args, ctx.work_dir / f"up-{data}.log", env=env, cwd=base.ROOT)
    try:
        try:
            up.wait_ready(lambda: "Ctrl-C stops everything" in up.log(), servers.SERVER_READY_TIMEOUT_S, interval_s=0.2)
        except ChildFailed as exc:
            raise base.SuiteError(str(exc)) from None
        yield Stack(up, f"http://{base.LOOPBACK}:{data}", f"http://{base.LOOPBACK}:{admin}", token, green)
    finally:
        up.stop(servers.SERVER_STOP_TIMEOUT_S)


def locust_run(ctx: base.SuiteContext, up: Stack, label: str, run_s: int, *, operator: bool,
               env: Mapping[str, str] | None = None, kill_green_at_s: float | None = None) -> dict[str, Any]:
    """One headless locust run of ``run_s`` against ``up``; with ``operator`` the admin user shifts weights;
    ``kill_green_at_s``: SIGKILL green's model server that long into the run."""
    out = ctx.work_dir / f"locust-{label.replace(' ', '-')}"
    out.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")} | dict(env or {})
    child_env["BLUEGREEN_LOCUST_DATA"] = str(ctx.repo / "digits" / "2" / "holdout.npz")
    if operator:
        child_env |= {"BLUEGREEN_ADMIN_TOKEN": up.token, "BLUEGREEN_ADMIN_URL": up.admin,
                      "BLUEGREEN_LOCUST_OPERATOR_WAIT_S": OPERATOR_WAIT_S}
    args = [sys.executable, "-m", "locust", "-f", str(base.ROOT / "loadtests" / "locustfile.py"), "--headless",
            "-u", str(USERS), "-r", str(SPAWN_RATE), "-t", f"{run_s}s", "--host", up.data, "--csv", str(out / "run"),
            "--json-file", str(out / "stats"), "--only-summary"]
    user0, sys0 = children_cpu_s()
    started = time.monotonic()
    proc = ChildProcess.start("locust", args, out / "locust.log", env=child_env, cwd=base.ROOT)
    killed_at = None
    try:
        if kill_green_at_s is not None:
            # Green dies once it has carried part of the load (or, on a crowded machine, at the latest then).
            green0 = green_answers(up)
            with contextlib.suppress(TimeoutError):
                wait_for(lambda: green_answers(up) >= green0 + GREEN_ANSWERS_BEFORE_KILL, kill_green_at_s,
                         interval_s=0.2, what="green to carry part of the load")
            if kill_green(up) is not None:
                killed_at = time.monotonic() - started
        code = proc.popen.wait(run_s + 120)
    finally:
        proc.stop(servers.SERVER_STOP_TIMEOUT_S)
    wall_s = time.monotonic() - started
    user1, sys1 = children_cpu_s()
    locust_cpu_s = (user1 - user0) + (sys1 - sys0)
    stats_file = out / "stats.json"
    if not stats_file.exists():
        raise base.SuiteError(f"locust wrote no stats (exit status {code}):\n{proc.log_tail()}")
    names, classes, overall = read_stats(stats_file, run_s)
    with (out / "run_failures.csv").open() as f:
        failures = [dict(row) for row in csv.DictReader(f)]
    command = " ".join(a if not a.startswith(str(ctx.work_dir)) else Path(a).name for a in args[2:])
    print(f"  locust {label}: {overall.requests:,} requests, {overall.requests_per_s:,.0f}/s, p50 "
          f"{fmt_ms(overall.p50_ms)} ms, p99 {fmt_ms(overall.p99_ms)} ms, {overall.failures} failures"
          + ("  FLAGGED" if overall.failures or code else ""), flush=True)
    return {"label": label, "run_s": run_s, "users": USERS, "spawn_rate": SPAWN_RATE, "operator": operator,
            "green_killed_at_s": None if killed_at is None else round(killed_at, 1), "exit_status": code,
            "command": "python " + command.replace(str(base.ROOT) + "/", ""), "locust_cpu_s": locust_cpu_s,
            "locust_cores": locust_cpu_s / wall_s if wall_s > 0 else None,
            "requests": [asdict(s) for s in names], "user_classes": [asdict(s) for s in classes],
            "overall": asdict(overall), "failures": failures[:20],
            "flagged": bool(overall.failures or code or overall.requests == 0)}


def green_answers(up: Stack) -> float:
    """The gateway's successful upstream calls to green so far (a counter)."""
    text = httpx.get(f"{up.admin}/metrics", timeout=5.0).text
    return servers.prometheus_value(text, "bluegreen_upstream_duration_seconds_count",
                            {"color": "green", "outcome": "success"}) or 0.0


def kill_green(up: Stack) -> int | None:
    """SIGKILL the green model server ``up`` started; its pid, or None when it was not found."""
    for pid, command in children_of(up.up.pid).items():
        if f"--port {up.green_port}" in command and "serve-model" in command:
            os.kill(pid, signal.SIGKILL)
            return pid
    return None


def run(ctx: base.SuiteContext) -> base.SuiteResult:
    """Two locust runs against one ``bluegreen up``: the full mix with the operator, then (green at 50%, no
    repeated inputs so that every request goes upstream) green killed once it has carried part of the load."""
    import importlib.util

    if importlib.util.find_spec("locust") is None:
        raise base.SuiteError("locust is not installed (pip install -e '.[dev]')")
    base.ensure_models(ctx.repo, MODELS)
    run_s = max(MIN_RUN_S, round(ctx.duration_s))
    with stack(ctx) as up:
        print(f"  bluegreen up: gateway {up.data}, admin {up.admin}; {USERS} users, {run_s}s per run", flush=True)
        mixed = locust_run(ctx, up, "all users", run_s, operator=True)
        resp = httpx.put(f"{up.admin}/admin/v1/models/digits/split", json={"blue": 50, "green": 50}, timeout=10.0,
                         headers={"authorization": f"Bearer {up.token}", "If-Match": "*"})
        if resp.status_code != 200:
            raise base.SuiteError(f"setting the split to 50/50 answered {resp.status_code}: {resp.text[:300]}")
        killed = locust_run(ctx, up, "green killed", run_s, operator=False,
                            env={"BLUEGREEN_LOCUST_REPEAT_SHARE": "0"}, kill_green_at_s=run_s / 2)
        dead_reported = "green exited" in up.up.log()
    runs = [mixed, killed]
    ratios = [base.Ratio(f"failed requests, {r['label']} (% of {r['overall']['requests']:,})",
                         100.0 * r["overall"]["failures"] / max(1, r["overall"]["requests"]), 0.0, at_most=True,
                         unit="%") for r in runs]
    notes = [LOCUST_NOTE]
    if killed["green_killed_at_s"] is None or not dead_reported:
        notes.append("green's model server was not found or its death was not reported by `up`: the second run "
                     "did not measure failover.")
    return base.SuiteResult(
        suite="locust", title="Locust: the realistic user mix against bluegreen up",
        command=base.reproduce("locust", ctx),
        settings={"users": USERS, "spawn_rate": SPAWN_RATE, "run_s": run_s, "models": list(MODELS),
                  "green_answers_before_kill": GREEN_ANSWERS_BEFORE_KILL,
                  "operator_wait_s": OPERATOR_WAIT_S, "user_classes": USER_CLASSES},
        sections={"runs": runs}, ratios=ratios,
        ok=not any(r["flagged"] for r in runs) and killed["green_killed_at_s"] is not None, notes=notes)


def render(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    lines = [
        f"Measured {doc['date']} on {machine_line(doc['machine'])}.",
        "",
        f"Reproduce: `{doc['command']}`. One `bluegreen up` (blue `{s['models'][0]}`, green `{s['models'][1]}`); "
        f"headless locust (`loadtests/locustfile.py`), {s['users']} users spawned at {s['spawn_rate']}/s, "
        f"{s['run_s']} s per run. First run: every user class, the operator shifting the weights "
        f"(think time {s['operator_wait_s']} s). Second run: the split at 50/50, no repeated inputs (every request "
        "goes upstream), green's model server killed once it has answered "
        f"{s.get('green_answers_before_kill', GREEN_ANSWERS_BEFORE_KILL)} requests (at most half way in). Latency "
        "in ms from locust's "
        "response-time histogram (nearest rank); requests/s over the run's length.",
    ]
    for r in doc["runs"]:
        lines += ["", f"### {r['label']}" + (" ⚠" if r.get("flagged") else ""), "",
                  "| User class | Requests | requests/s | p50 ms | p95 ms | p99 ms | Failures |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for c in [*r["user_classes"], r["overall"]]:
            lines.append(_stats_row(c["name"] if c["name"] != "all" else "**all**", c))
        lines += ["", "| Request | User class | Requests | requests/s | p50 ms | p95 ms | p99 ms | Failures |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [_stats_row(f"{e['name']} | {e['user_class']}", e) for e in r["requests"]]
        lines += ["", f"Locust's CPU: {fmt_cores(r.get('locust_cores'))}; exit status {r['exit_status']}"
                  + (f"; green killed at {r['green_killed_at_s']:g} s" if r.get("green_killed_at_s") else "") + "."]
        if r.get("failures"):
            lines += ["", "Failures: " + "; ".join(f"{f.get('Name')}: {f.get('Error')} ({f.get('Occurrences')})"
                                                    for f in r["failures"])]
    lines += ["", "| Figure | Measured | Target | Result |", "|---|---:|---|---|"]
    lines += [base.ratio_row(r) for r in doc["ratios"]]
    return lines + base.closing_lines(doc, "a run had failures, no requests or a non-zero exit (⚠ above), or green "
                                      "could not be killed.")


def _stats_row(label: str, s: Mapping[str, Any]) -> str:
    return (f"| {label} | {s['requests']:,} | {fmt_int(s['requests_per_s'])} | {fmt_ms(s['p50_ms'])} | "
            f"{fmt_ms(s['p95_ms'])} | {fmt_ms(s['p99_ms'])} | {s['failures']:,} |")


SUITE = base.Suite("locust", run, render, by_default=False, needs_wrk=False)
