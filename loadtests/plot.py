"""``docs/benchmarks.png``: throughput and p50/p95/p99 latency per path, drawn from the suites' JSON documents.

A *path* is one way a request can go in one suite ("gateway, L1 hit", "telemetry off", "batched"): its figures are
the median over that suite's runs of it. Saturated runs (wrk) give throughput and latency under full load; the
fixed-rate runs give latency at half load, drawn apart because the two are not comparable.

:func:`path_figures` is pure (tested); :func:`plot_figures` imports matplotlib (a dev dependency) when it draws,
through its object API (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SATURATION = "saturation"
HALF_LOAD = "half load"
PERCENTILES = ("p50", "p95", "p99")


@dataclass(frozen=True)
class PathFigures:
    """One path of one suite under one load: requests/s (None at a fixed rate) and latency percentiles in ms."""

    suite: str
    path: str
    load: str  # SATURATION or HALF_LOAD
    requests_per_s: float | None
    latency_ms: Mapping[str, float | None]

    @property
    def label(self) -> str:
        return f"{self.suite}: {self.path}"


def _median(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return statistics.median(present) if present else None


def _by_target(runs: Sequence[Mapping[str, Any]], suite: str, load: str, labels: Mapping[str, str],
               rate_key: str | None) -> list[PathFigures]:
    targets = list(dict.fromkeys(str(r.get("target")) for r in runs))
    figures = []
    for target in targets:
        mine = [r for r in runs if str(r.get("target")) == target]
        rate = None if rate_key is None else _median([r.get(rate_key) for r in mine])
        latency = {q: _median([(r.get("latency_ms") or {}).get(q) for r in mine]) for q in PERCENTILES}
        figures.append(PathFigures(suite, labels.get(target, target), load, rate, latency))
    return figures


def path_figures(docs: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> list[PathFigures]:
    """Every path of every suite in ``docs`` (suites in ``order`` first), saturated runs before fixed-rate ones.

    Reads what the runner writes: ``runs`` (a mapping label -> wrk run, the serving suite), ``saturation`` (a list
    of wrk runs, each with a ``target``) and ``half_load.runs`` (fixed-rate runs). Anything else is skipped."""
    suites = [s for s in order if s in docs] + sorted(s for s in docs if s not in order)
    saturated: list[PathFigures] = []
    fixed: list[PathFigures] = []
    for suite in suites:
        doc = docs[suite]
        settings = doc.get("settings")
        labels = settings.get("labels", {}) if isinstance(settings, Mapping) else {}
        runs = doc.get("runs")
        if isinstance(runs, Mapping):
            # One run per label; each request carries rows_per_request rows, so rows/s is the throughput.
            listed = [{**run, "target": label} for label, run in runs.items() if isinstance(run, Mapping)]
            saturated += _by_target(listed, suite, SATURATION, labels, "rows_per_s")
        if isinstance(doc.get("saturation"), list):
            saturated += _by_target(doc["saturation"], suite, SATURATION, labels, "requests_per_s")
        half = doc.get("half_load")
        if isinstance(half, Mapping) and isinstance(half.get("runs"), list):
            fixed += _by_target(half["runs"], suite, HALF_LOAD, labels, None)
    return saturated + fixed


def _latency_bars(ax: Any, figures: Sequence[PathFigures], title: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    height = 0.8 / len(PERCENTILES)
    positive = False
    for i, q in enumerate(PERCENTILES):
        values = [f.latency_ms.get(q) for f in figures]
        positive = positive or any(v is not None and v > 0 for v in values)
        ax.barh([y + (i - 1) * height for y in range(len(figures))],
                [float("nan") if v is None else v for v in values], height=height, label=q)
    ax.set_yticks(range(len(figures)), [f.label for f in figures])
    if positive:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1, 2, 5, 10, 20, 50 ms...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency, ms (log scale)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.invert_yaxis()


def plot_figures(figures: Sequence[PathFigures], path: Path) -> None:
    """Draw throughput at saturation, latency at saturation and latency at half load per path into ``path``."""
    from matplotlib.figure import Figure

    saturated = [f for f in figures if f.load == SATURATION]
    fixed = [f for f in figures if f.load == HALF_LOAD]
    rows = [n for n in (len(saturated), len(fixed)) if n]
    fig = Figure(figsize=(15, 1.5 + 0.45 * sum(rows) + 1.2 * len(rows)), layout="constrained")
    grid = fig.add_gridspec(len(rows), 2, height_ratios=rows)
    fig.suptitle("bluegreen bench: throughput and latency per path (one shared machine: compare within a suite)")
    row = 0
    if saturated:
        ax_rps = fig.add_subplot(grid[row, 0])
        rates = [f.requests_per_s or 0.0 for f in saturated]
        suites = list(dict.fromkeys(f.suite for f in saturated))  # one color per suite: compare within a color
        colors = [f"C{suites.index(f.suite) % 10}" for f in saturated]
        bars = ax_rps.barh(range(len(saturated)), rates, color=colors)
        ax_rps.bar_label(bars, labels=[f"{r:,.0f}" for r in rates], padding=3, fontsize=8)
        ax_rps.set_yticks(range(len(saturated)), [f.label for f in saturated])
        ax_rps.set_xlabel("requests/s at saturation (rows/s for serving)")
        ax_rps.set_title("Throughput at saturation (wrk)")
        ax_rps.grid(axis="x", alpha=0.3)
        ax_rps.invert_yaxis()
        ax_rps.margins(x=0.15)
        _latency_bars(fig.add_subplot(grid[row, 1]), saturated, "Latency at saturation (wrk)")
        row += 1
    if fixed:
        _latency_bars(fig.add_subplot(grid[row, :]), fixed, "Latency at half load (fixed rate, from due time)")
    fig.savefig(path, dpi=100)
