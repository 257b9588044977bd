"""``bluegreen bench locust``: its statistics per request kind and per user class from locust's JSON stats, its
section of the report, and that it runs only when named (and without wrk). The run itself is the bench's job
(``bluegreen bench locust``); tests/integration/test_locust.py keeps one short smoke run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtests.bench import base, report, runner, suites
from loadtests.bench.suites import locust


def entry(name: str, times: dict[str, int], failures: int = 0) -> dict[str, Any]:
    """One entry of locust's ``--json-file`` stats: its response-time histogram (ms as text -> count)."""
    return {"name": name, "method": "POST", "num_requests": sum(times.values()), "num_failures": failures,
            "response_times": times}


def test_percentiles_are_nearest_rank_over_the_merged_histograms(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps([
        entry("infer json fresh", {"10": 90, "50": 10}),
        entry("feedback", {"5": 100}, failures=2),
        entry("admin split put", {"30": 19, "300": 1}),
    ]))
    names, classes, overall = locust.read_stats(stats, run_s=10.0)
    by_name = {s.name: s for s in names}
    fresh = by_name["infer json fresh"]
    assert (fresh.user_class, fresh.requests, fresh.requests_per_s) == ("PredictionClient", 100, 10.0)
    assert (fresh.p50_ms, fresh.p95_ms, fresh.p99_ms) == (10.0, 50.0, 50.0)
    assert by_name["admin split put"].user_class == "Operator" and by_name["admin split put"].p95_ms == 30.0
    assert by_name["admin split put"].p99_ms == 300.0
    per_class = {s.name: s for s in classes}
    assert (per_class["PredictionClient"].requests, per_class["PredictionClient"].failures) == (200, 2)
    assert (per_class["PredictionClient"].p50_ms, per_class["PredictionClient"].p95_ms) == (5.0, 10.0)  # rank 190
    assert (per_class["Operator"].requests, per_class["Operator"].requests_per_s) == (20, 2.0)
    assert (overall.requests, overall.failures, overall.p99_ms) == (220, 2, 50.0)


def test_no_request_means_no_latency(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps([entry("feedback", {})]))
    _, _, overall = locust.read_stats(stats, run_s=5.0)
    assert (overall.requests, overall.p50_ms, overall.p99_ms) == (0, None, None)


def locust_doc(failures: int = 0) -> dict[str, Any]:
    stats = {"name": "all", "user_class": "all", "requests": 900, "failures": failures, "requests_per_s": 90.0,
             "p50_ms": 12.0, "p95_ms": 40.0, "p99_ms": 80.0}
    run = {"label": "green killed", "run_s": 10, "users": 10, "spawn_rate": 5, "operator": False,
           "green_killed_at_s": 4.2, "exit_status": 1 if failures else 0, "locust_cores": 0.6,
           "requests": [{**stats, "name": "infer json fresh", "user_class": "PredictionClient"}],
           "user_classes": [{**stats, "name": "PredictionClient", "user_class": "PredictionClient"}],
           "overall": stats, "failures": [{"Name": "infer json fresh", "Error": "HTTP 502", "Occurrences": "3"}]
           if failures else [], "flagged": bool(failures)}
    return {"suite": "locust", "title": "Locust: the realistic user mix against bluegreen up",
            "command": "bluegreen bench locust --duration 10", "date": "2025-01-02T03:04:05+00:00",
            "machine": {"cpu_model": "Test CPU 9000", "cpu_count": 2},
            "settings": {"users": 10, "spawn_rate": 5, "run_s": 10, "models": ["digits:1", "digits:2"],
                         "green_answers_before_kill": 100, "operator_wait_s": "1,3"},
            "runs": [run], "ratios": [base.Ratio("failed requests, green killed (% of 900)", 100 * failures / 900,
                                                 0.0, at_most=True, unit="%").as_json()],
            "ok": not failures, "notes": [locust.LOCUST_NOTE]}


def test_locust_section_shows_each_user_class_its_percentiles_and_failures() -> None:
    md = report.render_markdown({"locust": locust_doc()})
    assert "## Locust: the realistic user mix against bluegreen up" in md
    assert "### green killed" in md and "green killed at 4.2 s" in md
    assert "| PredictionClient | 900 | 90 | 12.0 | 40.0 | 80.0 | 0 |" in md
    assert "| infer json fresh | PredictionClient | 900 | 90 | 12.0 | 40.0 | 80.0 | 0 |" in md
    assert "| failed requests, green killed (% of 900) | 0.00% | ≤ 0% | met |" in md
    flagged = report.render_markdown({"locust": locust_doc(failures=3)})
    assert "### green killed ⚠" in flagged and "HTTP 502 (3)" in flagged and "**This run was flagged**" in flagged


def test_locust_runs_only_when_named_and_needs_no_wrk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "locust" in suites.SUITES and "locust" not in suites.SUITE_ORDER
    ran: list[str] = []

    def fake(ctx: base.SuiteContext) -> base.SuiteResult:
        ran.append("locust")
        return base.SuiteResult("locust", "Locust", "bluegreen bench locust", {}, [], True, [])

    monkeypatch.setattr(runner, "SUITES", {**suites.SUITES, "locust": base.Suite(
        "locust", fake, report.render_generic_section, by_default=False, needs_wrk=False)})
    monkeypatch.setattr(runner, "describe_machine", lambda: {"cpu_model": "Test CPU 9000", "cpu_count": 2})
    monkeypatch.setattr(runner.shutil, "which", lambda exe: None)  # no wrk on this machine
    assert runner.main(["locust"], duration_s=1.0, out_dir=tmp_path, repo=tmp_path) == 0
    assert ran == ["locust"] and (tmp_path / "bench-locust.json").exists()
    assert runner.main([], duration_s=1.0, out_dir=tmp_path, repo=tmp_path) == 2  # the wrk suites need wrk


def test_the_terminal_summary_of_a_locust_run_lists_its_figures() -> None:
    lines = report.summary_lines(locust_doc(failures=3))
    assert lines == ["  ABOVE failed requests, green killed (% of 900): 0.33% (≤ 0%)"]
