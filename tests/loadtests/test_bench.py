"""The benchmark runner's pure parts: wrk's script and output, the JSON → markdown report, suite selection.

No wrk and no server run here: a benchmark is not a timed test (STYLE.md, 12).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from loadtests import bench

WRK_STDOUT = """Running 5s test @ http://127.0.0.1:40000/v2/models/wide/infer
  2 threads and 64 connections
  Latency Distribution
     50%   24.50ms
  12453 requests in 5.02s, 3.01MB read
Requests/sec:   2480.68
BLUEGREEN_WRK_RESULT {"duration_us":5020000,"requests":12453,"bytes":3010000,\
"errors":{"connect":0,"read":1,"write":0,"status":7,"timeout":2},\
"latency_us":{"min":900,"mean":25100.5,"stdev":4000.2,"max":61000,\
"p50":24500,"p90":31000,"p95":34800,"p99":47900,"p99.9":59000}}
"""


def test_lua_script_posts_the_body_and_reports_one_marker_line() -> None:
    script = bench.wrk_lua_script('{"inputs":[]}')
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["Content-Type"] = "application/json"' in script
    assert 'wrk.body = [=[{"inputs":[]}]=]' in script
    assert "done = function(summary, latency, requests)" in script
    assert f"{bench.WRK_MARKER} " in script
    assert "e.status" in script  # non-2xx answers are reported


def test_lua_long_string_level_grows_past_any_closing_bracket_in_the_body() -> None:
    script = bench.wrk_lua_script("a]=]b]==]c")
    assert "wrk.body = [===[a]=]b]==]c]===]" in script


def test_parse_wrk_output() -> None:
    r = bench.parse_wrk_output(WRK_STDOUT)
    assert r["requests"] == 12453
    assert r["duration_s"] == pytest.approx(5.02)
    assert r["requests_per_s"] == pytest.approx(12453 / 5.02)
    assert r["non_2xx"] == 7
    assert r["socket_errors"] == 3  # read + timeout
    assert r["latency_ms"]["p50"] == pytest.approx(24.5)
    assert r["latency_ms"]["p99"] == pytest.approx(47.9)
    assert r["latency_ms"]["p99.9"] == pytest.approx(59.0)


def test_parse_wrk_output_without_the_marker_line_is_an_error() -> None:
    with pytest.raises(ValueError, match=bench.WRK_MARKER):
        bench.parse_wrk_output("Running 5s test @ http://127.0.0.1:1/\n")


def test_v2_body_carries_one_fp32_row() -> None:
    doc = json.loads(bench.v2_json_body("input", [0.5] * 512))
    assert doc == {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 512], "data": [0.5] * 512}]}


def test_process_cpu_time_of_this_process() -> None:
    cpu = bench.process_cpu_s(os.getpid())
    assert cpu is not None and cpu >= 0
    assert bench.process_cpu_s(2**22 + 12345) is None  # beyond pid_max: no such process


def _run(rows_per_s: float, p50: float, *, flagged: bool = False) -> dict[str, Any]:
    return {"rows_per_s": rows_per_s, "requests": int(rows_per_s * 10), "non_2xx": 3 if flagged else 0,
            "socket_errors": 0, "flagged": flagged, "provider": "CPUExecutionProvider",
            "latency_ms": {"p50": p50, "p95": p50 * 1.5, "p99": p50 * 2}, "wrk_cores": 0.25, "server_cores": 1.6,
            "server_batches": {"rows": 100, "runs": 4, "mean_rows_per_run": 25.0}}


def serving_doc(*, flagged: bool = False) -> dict[str, Any]:
    return {
        "suite": "serving",
        "title": "Serving: dynamic batching on vs off vs raw ONNX Runtime",
        "command": "bluegreen bench serving --duration 10",
        "date": "2025-01-02T03:04:05+00:00",
        "machine": {"cpu_model": "Test CPU 9000", "cpu_count": 2, "usable_cpus": 2, "onnxruntime": "1.99.0",
                    "onnxruntime_providers": ["CPUExecutionProvider"], "python": "3.11.7", "os": "Linux 6"},
        "settings": {"model": "wide:1", "rows_per_request": 1, "connections": 64, "wrk_threads": 2,
                     "duration_s": 10, "warmup_s": 2, "batched": {"max_batch_size": 64, "max_queue_delay_ms": 2.0},
                     "unbatched": {"max_batch_size": 1}},
        "runs": {"batched": _run(3000.0, 20.0, flagged=flagged), "unbatched": _run(600.0, 100.0)},
        "raw": {"providers": ["CPUExecutionProvider"], "threads": 2, "seconds_per_batch": 2.0, "best_batch": 64,
                "best_rows_per_s": 4500.0,
                "by_batch": [{"batch": 1, "runs": 1200, "rows_per_s": 600.0, "ms_per_run": 1.67},
                             {"batch": 64, "runs": 140, "rows_per_s": 4500.0, "ms_per_run": 14.2}]},
        "ratios": [bench._ratio("batched / unbatched rows/s", 5.0, 3.0, 4.0),
                   bench._ratio("batched / raw ONNX Runtime (batch 64) rows/s", 3000 / 4500, 0.6)],
        "ok": not flagged,
        "notes": [bench.SHARED_CORES_NOTE],
    }


def test_serving_section_has_the_date_machine_command_throughput_latency_ratios_and_cpu() -> None:
    md = bench.render_markdown({"serving": serving_doc()})
    assert md.startswith("# Benchmarks\n")
    assert "## Serving: dynamic batching on vs off vs raw ONNX Runtime" in md
    assert "2025-01-02T03:04:05+00:00" in md and "Test CPU 9000" in md
    assert "`bluegreen bench serving --duration 10`" in md
    assert "| batched | max batch size 64, max queue delay ms 2 | CPUExecutionProvider | 3,000 | 20.0 | 30.0 | " \
           "40.0 |" in md
    assert "| unbatched | max batch size 1 |" in md
    assert "| batched / unbatched rows/s | 5.00x | ≥ 3x (stretch 4x) | met, stretch met |" in md
    assert "| batched / raw ONNX Runtime (batch 64) rows/s | 0.67x | ≥ 0.6x | met |" in md
    assert "0.25 cores" in md  # the load generator's CPU
    assert "share its cores" in md
    assert "flagged" not in md


def test_a_flagged_run_is_marked_and_a_missed_target_says_so() -> None:
    doc = serving_doc(flagged=True)
    doc["ratios"][1] = bench._ratio("batched / raw", 0.5, 0.6)
    md = bench.render_markdown({"serving": doc})
    assert "| batched ⚠ |" in md
    assert "**This run was flagged**" in md
    assert "| batched / raw | 0.50x | ≥ 0.6x | **below target** |" in md


def test_each_suite_keeps_its_own_section(tmp_path: Path) -> None:
    other = {"suite": "gateway", "title": "Gateway vs direct", "date": "2025-01-01T00:00:00+00:00",
             "command": "bluegreen bench gateway", "machine": {}}
    (tmp_path / "bench-gateway.json").write_text(json.dumps(other))
    bench.write_results(tmp_path, serving_doc())
    md = (tmp_path / "benchmarks.md").read_text()
    assert md.index("## Serving") < md.index("## Gateway vs direct")  # fixed suite order, not file order
    assert "`bluegreen bench gateway`" in md
    assert json.loads((tmp_path / "bench-serving.json").read_text())["ratios"][0]["value"] == 5.0


def test_only_unimplemented_suites_asked_is_a_failure_without_output(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    planned = [s for s in bench.PLANNED_SUITES if s not in bench.SUITES]
    assert planned, "every planned suite is implemented: this test has nothing left to check"
    assert bench.main(planned[:1], duration_s=1.0, out_dir=tmp_path, repo=tmp_path) == 2
    assert "not implemented yet" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_unknown_suite_is_refused(tmp_path: Path) -> None:
    assert bench.main(["nope"], duration_s=1.0, out_dir=tmp_path, repo=tmp_path) == 2


def test_suite_table_names_every_cli_choice() -> None:
    assert set(bench.SUITES) | set(bench.PLANNED_SUITES) == set(bench.SUITE_ORDER)
    assert bench.SUITES["serving"] is bench.run_serving
