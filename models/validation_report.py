"""What ``bluegreen validate`` prints and writes beside its ``validation.json``: one line per check on the
terminal, and ``validation.md`` (the checks, the load run, the bad-input suite, accuracy per group) rendered from
the report document. Apart from :mod:`models.validation` so that the gate reads as checks and verdicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from serving.machine import machine_line

if TYPE_CHECKING:
    from models.validation_types import Check


def _fmt(check: str, x: float | None, sign: str = "") -> str:
    """A check's figure in its unit; ``sign="+"`` for a difference."""
    if x is None:
        return "n/a"
    if check == "latency_p95":
        return f"{x:{sign}.1f} ms"
    if check == "throughput":
        return f"{x:{sign},.0f} requests/s"
    if check == "peak_memory":
        return f"{x / 2**20:{sign},.0f} MiB"
    if check == "security":
        return f"{x:{sign}.0f} refused"
    return f"{x:{sign}.4f}"


def report_lines(checks: Sequence[Check]) -> list[str]:
    lines = []
    for c in checks:
        line = f"{c.result} {c.check}: {c.figure}"
        if c.baseline is not None:
            line += (f" | baseline {c.baseline['model']}: {c.baseline['result']} "
                     f"{_fmt(c.check, c.baseline['value'])}, difference "
                     f"{_fmt(c.check, c.baseline['difference'], '+')}")
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
            row += f" {b.get('result', '')} {b.get('figure', '')} | {_fmt(c['check'], b.get('difference'), '+')} |"
        out.append(row.replace("\n", " "))
    load = next(c for c in checks if c["check"] == "latency_p95")["details"]
    out += ["", "## Load", "",
            f"Closed loop, asyncio + aiohttp in the validating process: {load['concurrency']} concurrent single-row "
            f"requests for {load['duration_s']:g} s after a {doc['target']['warmup_s']:g} s warm-up, on the same "
            "machine as the server (they share its cores).", "",
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
