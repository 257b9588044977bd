"""The plot's pure part (which figures per path) and that it draws a PNG; no server, no wrk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtests import plot
from loadtests.plot import HALF_LOAD, SATURATION, PathFigures


def _wrk(target: str, rps: float, p50: float, round_no: int = 1) -> dict[str, Any]:
    return {"round": round_no, "target": target, "requests_per_s": rps,
            "latency_ms": {"p50": p50, "p90": p50 * 1.5, "p95": p50 * 2, "p99": p50 * 3}}


def _fixed(target: str, p50: float) -> dict[str, Any]:
    return {"run": 1, "target": target, "answered_per_s": 1000.0,
            "latency_ms": {"p50": p50, "p90": p50 * 2, "p99": p50 * 4}}  # an older run: no p95


DOCS: dict[str, Any] = {
    "gateway": {"saturation": [_wrk("direct", 6000.0, 4.0), _wrk("gateway", 3000.0, 8.0),
                               _wrk("gateway", 2000.0, 12.0, 2), _wrk("direct", 5000.0, 5.0, 2)],
                "half_load": {"runs": [_fixed("direct", 2.0), _fixed("gateway", 4.0), _fixed("gateway", 6.0)]}},
    "serving": {"runs": {"batched": {"rows_per_s": 2300.0, "latency_ms": {"p50": 24.0, "p95": 47.0, "p99": 58.0}},
                         "unbatched": {"rows_per_s": 420.0, "latency_ms": {"p50": 141.0, "p95": 184.0, "p99": 251.0}}},
                "raw": {"best_rows_per_s": 5000.0}},
    "cache": {"settings": {"labels": {"l1_hit": "L1 hit"}}, "saturation": [_wrk("l1_hit", 12000.0, 2.0)]},
    "old": {"suite": "old", "title": "a suite in no known shape"},
}


def test_each_path_gets_the_median_of_its_runs_in_suite_order() -> None:
    figures = plot.path_figures(DOCS, ("serving", "gateway", "cache"))
    assert [(f.label, f.load) for f in figures] == [
        ("serving: batched", SATURATION), ("serving: unbatched", SATURATION), ("gateway: direct", SATURATION),
        ("gateway: gateway", SATURATION), ("cache: L1 hit", SATURATION),
        ("gateway: direct", HALF_LOAD), ("gateway: gateway", HALF_LOAD)]
    gateway = figures[3]
    assert gateway.requests_per_s == 2500.0
    assert gateway.latency_ms == {"p50": 10.0, "p95": 20.0, "p99": 30.0}
    assert figures[0].requests_per_s == 2300.0 and figures[0].latency_ms["p95"] == 47.0
    half = figures[-1]
    assert half.requests_per_s is None  # a fixed rate is not a throughput
    assert half.latency_ms == {"p50": 5.0, "p95": None, "p99": 20.0}


def test_nothing_to_plot_from_documents_without_runs() -> None:
    assert plot.path_figures({"old": DOCS["old"]}, ("serving",)) == []


@pytest.mark.parametrize("loads", [(SATURATION, HALF_LOAD), (SATURATION,), (HALF_LOAD,)])
def test_the_plot_is_a_png(tmp_path: Path, loads: tuple[str, ...]) -> None:
    figures = [f for f in plot.path_figures(DOCS, ("serving", "gateway", "cache")) if f.load in loads]
    figures.append(PathFigures("shadow", "no answers", loads[0], None, {"p50": None, "p95": None, "p99": None}))
    path = tmp_path / "benchmarks.png"
    plot.plot_figures(figures, path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
