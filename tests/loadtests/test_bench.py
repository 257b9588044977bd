"""The benchmark runner's pure parts: wrk's script and output, the JSON → markdown report, suite selection.

No wrk and no server run here: a benchmark is not a timed test (STYLE.md, 12).
"""

from __future__ import annotations

import json
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
    (tmp_path / "bench-gateway.json").write_text(json.dumps(gateway_doc()))
    bench.write_results(tmp_path, serving_doc())
    md = (tmp_path / "benchmarks.md").read_text()
    assert md.index("## Serving") < md.index("## Gateway vs direct")  # fixed suite order, not file order
    assert "`bluegreen bench gateway --duration 10`" in md
    assert json.loads((tmp_path / "bench-serving.json").read_text())["ratios"][0]["value"] == 5.0
    bench.write_results(tmp_path, gateway_doc(median=0.6))  # rerunning one suite leaves the other's section alone
    again = (tmp_path / "benchmarks.md").read_text()
    assert again.split("## Gateway")[0] == md.split("## Gateway")[0]
    assert "| 0.60x |" in again


def test_a_section_in_an_older_shape_falls_back_to_the_generic_one() -> None:
    old = {"suite": "gateway", "title": "Gateway vs direct", "date": "2025-01-01T00:00:00+00:00",
           "command": "bluegreen bench gateway", "machine": {}}
    md = bench.render_markdown({"serving": serving_doc(), "gateway": old})
    assert "## Serving" in md and "## Gateway vs direct" in md
    assert "`bluegreen bench gateway`" in md
    assert "rerun the suite to refresh it" in md


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
    assert not set(bench.SUITES) & set(bench.PLANNED_SUITES)
    assert bench.SUITES["serving"] is bench.run_serving
    assert bench.SUITES["gateway"] is bench.run_gateway
    assert set(bench.SECTIONS) == set(bench.SUITES)


# ---------------------------------------------------------------------------------------------------- gateway suite

def test_lua_script_sends_extra_headers_without_opening_a_long_string() -> None:
    script = bench.wrk_lua_script("{}", {"Cache-Control": "no-cache, no-store"})
    assert 'wrk.headers[ [=[Cache-Control]=] ] = [=[no-cache, no-store]=]' in script
    assert "[[" not in script  # "[[" would open a Lua long string: the header line would not parse
    assert "wrk.headers[" not in bench.wrk_lua_script("{}").replace('wrk.headers["Content-Type"]', "")


def test_wrk_command_line() -> None:
    assert bench.wrk_command("http://127.0.0.1:1/x", "s.lua", 5, 32) == [
        "wrk", "-t2", "-c32", "-d5s", "--timeout=10s", "--latency", "-s", "s.lua", "http://127.0.0.1:1/x"]


def test_benchmarks_target_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1 only"):
        bench.run_wrk("http://10.1.2.3:80/", tmp_path / "x.lua", 1)


def test_round_ratios_pair_the_runs_of_each_round() -> None:
    runs = [{"round": 1, "target": "direct", "requests_per_s": 6000.0},
            {"round": 1, "target": "gateway", "requests_per_s": 3000.0},
            {"round": 2, "target": "gateway", "requests_per_s": 3300.0},  # the order within a round does not matter
            {"round": 2, "target": "direct", "requests_per_s": 5500.0},
            {"round": 3, "target": "direct", "requests_per_s": 0.0},
            {"round": 3, "target": "gateway", "requests_per_s": 10.0},
            {"round": 4, "target": "direct", "requests_per_s": 5000.0}]  # no gateway run: no ratio
    rounds = bench.round_ratios(runs)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0] == {"round": 1, "direct_rps": 6000.0, "gateway_rps": 3000.0, "ratio": 0.5}
    assert rounds[1]["ratio"] == pytest.approx(0.6)
    assert rounds[2]["ratio"] == 0.0


def test_added_latency_is_median_gateway_minus_median_direct() -> None:
    runs = [{"target": "direct", "latency_ms": {"p50": 2.0, "p90": 3.0, "p99": 5.0}},
            {"target": "gateway", "latency_ms": {"p50": 3.0, "p90": 6.0, "p99": None}},
            {"target": "gateway", "latency_ms": {"p50": 4.0, "p90": 7.0, "p99": None}},
            {"target": "direct", "latency_ms": {"p50": 2.4, "p90": 3.0, "p99": 9.0}}]
    medians = bench.median_latency_ms(runs)
    assert medians == {"direct": {"p50": pytest.approx(2.2), "p90": 3.0, "p99": 7.0},
                       "gateway": {"p50": 3.5, "p90": 6.5, "p99": None}}
    assert bench.added_latency_ms(medians) == {"p50": pytest.approx(1.3), "p90": 3.5, "p99": None}
    assert bench.added_latency_ms({"direct": medians["direct"]}) == {"p50": None, "p90": None, "p99": None}


def test_server_timing_medians_over_the_runs_that_carry_it() -> None:
    runs = [{"server_timing_ms": {"gateway": {"p50": 0.04, "p99": 0.1, "count": 100},
                                  "upstream": {"p50": 2.0, "p99": 9.0, "count": 100}}},
            {"server_timing_ms": {"gateway": {"p50": 0.06, "p99": 0.3, "count": 50}}},
            {"server_timing_ms": {}}]
    timing = bench.server_timing_medians(runs)
    assert timing["gateway"] == {"p50": pytest.approx(0.05), "p99": pytest.approx(0.2), "count": 150, "runs": 2}
    assert timing["upstream"] == {"p50": 2.0, "p99": 9.0, "count": 100, "runs": 1}
    assert bench.server_timing_medians([]) == {}


def test_cpu_used_between_two_readings() -> None:
    cpu, cores = bench.cpu_used({"gateway": 1.0, "model_server": None, "gone": 2.0},
                                {"gateway": 3.5, "model_server": 4.0}, 5.0)
    assert cpu == {"gateway": 2.5, "model_server": None, "gone": None}
    assert cores == {"gateway": 0.5, "model_server": None, "gone": None}
    assert bench.cpu_used({"a": 1.0}, {"a": 2.0}, 0.0)[1] == {"a": None}


def test_routing_shown_with_placeholder_ports() -> None:
    shown = bench._display_routing({"models": {"digits": {"colors": {"blue": {
        "version": "1", "backends": ["http://127.0.0.1:43123"]}}}}})
    assert shown["models"]["digits"]["colors"]["blue"]["backends"] == ["http://127.0.0.1:<model server port>"]


def _sat(round_no: int, target: str, rps: float, *, flagged: bool = False) -> dict[str, Any]:
    gateway_cores = 0.75 if target == "gateway" else 0.0
    return {"round": round_no, "target": target, "requests_per_s": rps, "requests": int(rps * 10),
            "model_server_rows": int(rps * 10), "non_2xx": 2 if flagged else 0, "socket_errors": 0,
            "flagged": flagged, "latency_ms": {"p50": 5.0, "p99": 30.0}, "wrk_cores": 0.12, "cpu_pressure": 0.4,
            "cores": {"gateway": gateway_cores, "model_server": 0.7}}


def _half(run: int, target: str, p50: float, p99: float, generator: float) -> dict[str, Any]:
    timing = {"gateway": {"p50": 0.04, "p99": 0.13, "count": 7500}} if target == "gateway" else {}
    return {"run": run, "target": target, "answered_per_s": 1500.0, "non_2xx": 0, "errors": {}, "unfinished": 0,
            "flagged": False, "latency_ms": {"p50": p50, "p90": p50 * 2, "p99": p99, "p99.9": p99 * 2,
                                             "max": p99 * 3},
            "send_lag_ms": {"p99": 1.3}, "server_timing_ms": timing, "cpu_pressure": 0.25,
            "cores": {"generator": generator, "gateway": 0.5 if target == "gateway" else 0.0, "model_server": 0.3}}


def gateway_doc(*, median: float = 0.55, flagged: bool = False) -> dict[str, Any]:
    rounds = [{"round": 1, "direct_rps": 6000.0, "gateway_rps": 3300.0, "ratio": 0.55},
              {"round": 2, "direct_rps": 5000.0, "gateway_rps": 3000.0, "ratio": 0.6},
              {"round": 3, "direct_rps": 6000.0, "gateway_rps": 3000.0, "ratio": 0.5}]
    half = [_half(1, "direct", 2.09, 4.66, 0.29), _half(2, "gateway", 3.95, 12.5, 0.41),
            _half(3, "gateway", 4.05, 13.5, 0.43), _half(4, "direct", 2.11, 5.66, 0.3)]
    medians = bench.median_latency_ms(half)
    return {
        "suite": "gateway",
        "title": "Gateway vs direct to the model server",
        "command": "bluegreen bench gateway --duration 10",
        "date": "2025-02-03T04:05:06+00:00",
        "machine": {"cpu_model": "Test CPU 9000", "cpu_count": 2, "usable_cpus": 2, "onnxruntime": "1.99.0",
                    "onnxruntime_providers": ["CPUExecutionProvider"], "python": "3.11.7", "os": "Linux 6"},
        "settings": {"model": "digits:1", "rows_per_request": 1, "request_headers": {"Cache-Control": "no-cache"},
                     "server_command": "bluegreen serve-model --model digits:1 --model digits:2 --port <free port>",
                     "connections": 32, "wrk_threads": 2, "duration_s": 10, "warmup_s": 2,
                     "round_orders": [["direct", "gateway"], ["gateway", "direct"], ["direct", "gateway"]],
                     "half_load_fraction": 0.5, "half_load_order": ["direct", "gateway", "gateway", "direct"]},
        "saturation": [_sat(1, "direct", 6000.0), _sat(1, "gateway", 3300.0, flagged=flagged),
                       _sat(2, "gateway", 3000.0), _sat(2, "direct", 5000.0),
                       _sat(3, "direct", 6000.0), _sat(3, "gateway", 3000.0)],
        "rounds": rounds,
        "ratios": [bench._ratio("gateway / direct requests/s (median of 3 rounds)", median, 0.5, 0.65)],
        "half_load": {"rate_per_s": 1500.0, "basis_rps": 3000.0, "runs": half, "median_ms": medians,
                      "added_ms": bench.added_latency_ms(medians)},
        "server_timing_ms": bench.server_timing_medians([r for r in half if r["target"] == "gateway"]),
        "ok": not flagged,
        "notes": [bench.GATEWAY_SHARED_CORES_NOTE, bench.FIXED_RATE_NOTE],
    }


def test_gateway_section_has_runs_rounds_ratio_added_latency_and_cpu() -> None:
    md = bench.render_markdown({"gateway": gateway_doc()})
    assert "## Gateway vs direct to the model server" in md
    assert "2025-02-03T04:05:06+00:00" in md and "Test CPU 9000" in md
    assert "Reproduce: `bluegreen bench gateway --duration 10`" in md
    assert "wrk 2 threads x 32 connections" in md
    assert "`Cache-Control: no-cache`" in md
    assert "(direct, gateway; gateway, direct; direct, gateway)" in md
    assert "in the order direct, gateway, gateway, direct" in md
    # each run, in the order it ran, with the CPU of wrk, the gateway and the model server
    assert "| 1 | direct | 6,000 | 5.0 | 30.0 | 60,000 | 60,000 | 0 | 0 | 0.12 cores | 0.00 cores | 0.70 cores " \
           "| 40% |" in md
    assert "| 2 | gateway | 3,000 | 5.0 | 30.0 | 30,000 | 30,000 | 0 | 0 | 0.12 cores | 0.75 cores | 0.70 cores " \
           "| 40% |" in md
    assert md.index("| 2 | gateway |") < md.index("| 2 | direct |")
    assert "| 2 | 5,000 | 3,000 | 0.60x |" in md
    assert "| gateway / direct requests/s (median of 3 rounds) | 0.55x | ≥ 0.5x (stretch 0.65x) | met |" in md
    assert "### Added latency at half load (1,500 requests/s)" in md
    assert "| 1 | direct | 1,500 | 2.09 | 4.18 | 4.66 | 9.32 | 13.98 | 1.30 | - | 0 | 0 | 0.29 cores | 0.00 cores | " \
           "0.30 cores | 25% |" in md
    assert "| 3 | gateway | 1,500 | 4.05 | 8.10 | 13.50 | 27.00 | 40.50 | 1.30 | 0.04 / 0.13 | 0 | 0 | 0.43 cores " \
           "| 0.50 cores | 0.30 cores | 25% |" in md
    assert "| direct (median of 2 runs) | 2.10 | 4.20 | 5.16 |" in md
    assert "| gateway (median of 2 runs) | 4.00 | 8.00 | 13.00 |" in md
    assert "| **added by the gateway** | **+1.90** | +3.80 | **+7.84** |" in md
    assert "p50 0.04 ms, p99 0.13 ms" in md and "15,000 answers" in md
    assert "open-loop" in md  # the generator's note, with its CPU
    assert "CPU pressure" in md
    assert "flagged" not in md


def test_gateway_ratio_below_target_or_above_stretch() -> None:
    below = bench.render_markdown({"gateway": gateway_doc(median=0.45)})
    assert "| 0.45x | ≥ 0.5x (stretch 0.65x) | **below target** |" in below
    above = bench.render_markdown({"gateway": gateway_doc(median=0.7)})
    assert "| 0.70x | ≥ 0.5x (stretch 0.65x) | met, stretch met |" in above


def test_a_flagged_gateway_run_is_marked() -> None:
    md = bench.render_markdown({"gateway": gateway_doc(flagged=True)})
    assert "| 1 | gateway ⚠ |" in md
    assert "**This run was flagged**" in md


def test_gateway_summary_lines() -> None:
    lines = "\n".join(bench._summary_lines(gateway_doc()))
    assert "round 2: direct 5,000 req/s, gateway 3,000 req/s, gateway / direct 0.60" in lines
    assert "added p50 +1.90 ms, p99 +7.84 ms" in lines
    assert "PASS gateway / direct requests/s (median of 3 rounds): 0.55x" in lines
