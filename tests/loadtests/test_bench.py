"""The benchmark runner's pure parts: wrk's script and output, the JSON → markdown report, suite selection.

No wrk and no server run here: a benchmark is not a timed test (STYLE.md, 12).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtests.bench import base, report, runner, servers, steps, suites, wrk
from loadtests.bench.suites import cache, gateway, shadow, telemetry
from loadtests.bench.suites import serving as serving_suite


def ratio_json(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """A ratio as the suites' JSON documents hold it (the renderers read those, as written to disk)."""
    return base.Ratio(*args, **kwargs).as_json()

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
    script = wrk.wrk_lua_script('{"inputs":[]}')
    assert 'wrk.method = "POST"' in script
    assert 'wrk.headers["Content-Type"] = "application/json"' in script
    assert 'wrk.body = [=[{"inputs":[]}]=]' in script
    assert "done = function(summary, latency, requests)" in script
    assert f"{wrk.WRK_MARKER} " in script
    assert "e.status" in script  # non-2xx answers are reported


def test_lua_long_string_level_grows_past_any_closing_bracket_in_the_body() -> None:
    script = wrk.wrk_lua_script("a]=]b]==]c")
    assert "wrk.body = [===[a]=]b]==]c]===]" in script


def test_parse_wrk_output() -> None:
    r = wrk.parse_wrk_output(WRK_STDOUT)
    assert r.requests == 12453
    assert r.duration_s == pytest.approx(5.02)
    assert r.requests_per_s == pytest.approx(12453 / 5.02)
    assert r.non_2xx == 7
    assert r.socket_errors == 3  # read + timeout
    assert r.latency_ms["p50"] == pytest.approx(24.5)
    assert r.latency_ms["p99"] == pytest.approx(47.9)
    assert r.latency_ms["p99.9"] == pytest.approx(59.0)
    doc = r.as_json()  # what the suites' JSON documents hold: the keys they always had
    assert (doc["requests"], doc["non_2xx"], doc["socket_errors"]) == (12453, 7, 3)
    assert doc["requests_per_s"] == pytest.approx(12453 / 5.02)


def test_parse_wrk_output_without_the_marker_line_is_an_error() -> None:
    with pytest.raises(ValueError, match=wrk.WRK_MARKER):
        wrk.parse_wrk_output("Running 5s test @ http://127.0.0.1:1/\n")


def test_v2_body_carries_one_fp32_row() -> None:
    doc = json.loads(wrk.v2_json_body("input", [0.5] * 512))
    assert doc == {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 512], "data": [0.5] * 512}]}


def _run(rows_per_s: float, p50: float, *, flagged: bool = False) -> dict[str, Any]:
    return {"rows_per_s": rows_per_s, "requests": int(rows_per_s * 10), "non_2xx": 3 if flagged else 0,
            "socket_errors": 0, "flagged": flagged, "provider": "CPUExecutionProvider",
            "latency_ms": {"p50": p50, "p95": p50 * 1.5, "p99": p50 * 2}, "wrk_cores": 0.25, "server_cores": 1.6,
            "server_batches": {"rows": 100, "runs": 4, "mean_rows_per_run": 25.0}}


def serving_doc(*, flagged: bool = False) -> dict[str, Any]:
    runs = {"digits batched, JSON": _run(9000.0, 3.0), "digits unbatched, JSON": _run(5000.0, 6.0),
            "wide batched, JSON": _run(3000.0, 20.0, flagged=flagged), "wide unbatched, JSON": _run(600.0, 100.0)}
    runs["digits batched, JSON"]["server_cpu_us_per_request"] = 80.0
    runs["digits batched, JSON"]["cpu_pressure"] = 0.25
    return {
        "suite": "serving",
        "title": "Serving: the model server vs raw ONNX Runtime",
        "command": "bluegreen bench serving --duration 10",
        "date": "2025-01-02T03:04:05+00:00",
        "machine": {"cpu_model": "Test CPU 9000", "cpu_count": 2, "usable_cpus": 2, "onnxruntime": "1.99.0",
                    "onnxruntime_providers": ["CPUExecutionProvider"], "python": "3.11.7", "os": "Linux 6"},
        "settings": {"model": "wide:1", "rows_per_request": 1, "connections": 64, "wrk_threads": 2,
                     "digits_connections": 32, "digits_wrk_threads": 1, "duration_s": 10, "warmup_s": 2},
        "runs": runs,
        "raw": {"providers": ["CPUExecutionProvider"], "threads": 2, "seconds_per_batch": 2.0, "best_batch": 64,
                "best_spin_wait": True, "best_rows_per_s": 4500.0,
                "by_batch": [{"batch": 16, "spin_wait": False, "runs": 1200, "rows_per_s": 600.0, "ms_per_run": 1.67},
                             {"batch": 64, "spin_wait": True, "runs": 140, "rows_per_s": 4500.0,
                              "ms_per_run": 14.2}]},
        "ratios": [ratio_json("batched / unbatched rows/s", 5.0, 3.0, 4.0),
                   ratio_json("batched / raw ONNX Runtime (batch 64) rows/s", 3000 / 4500, 0.6),
                   ratio_json("digits batched, server CPU per request", 80.0, 100.0, 60.0, at_most=True,
                                unit=" µs")],
        "ok": not flagged,
        "notes": [serving_suite.SHARED_CORES_NOTE],
    }


def test_serving_section_has_the_date_machine_command_throughput_latency_ratios_and_cpu() -> None:
    md = report.render_markdown({"serving": serving_doc()})
    assert md.startswith("# Benchmarks\n")
    assert "## Serving: the model server vs raw ONNX Runtime" in md
    assert "2025-01-02T03:04:05+00:00" in md and "Test CPU 9000" in md
    assert "`bluegreen bench serving --duration 10`" in md
    assert "| wide batched, JSON | CPUExecutionProvider | 3,000 | 20.0 | 40.0 |" in md
    assert "| digits batched, JSON | CPUExecutionProvider | 9,000 | 3.0 | 6.0 |" in md
    assert "| 80 | 25.0 | 25% |" in md  # CPU µs per request, rows per run, CPU pressure
    assert "| batched / unbatched rows/s | 5.00x | ≥ 3x (stretch 4x) | met, stretch met |" in md
    assert "| batched / raw ONNX Runtime (batch 64) rows/s | 0.67x | ≥ 0.6x | met |" in md
    assert "| digits batched, server CPU per request | 80.00 µs | ≤ 100 µs (stretch 60 µs) | met |" in md
    assert "| 64 | on | 4,500 | 14.20 |" in md  # raw ONNX Runtime by batch and spin-wait
    assert "0.25 cores" in md  # the load generator's CPU
    assert "share its cores" in md
    assert "flagged" not in md


def test_serving_binary_body_is_exact_in_the_wrk_script() -> None:
    body, length = wrk.v2_binary_body("input", [0.5, -1.0, 2.0])
    header = json.loads(body[:length])
    assert header["inputs"][0]["parameters"] == {"binary_data_size": 12}
    assert header["parameters"] == {"binary_data_output": True}
    assert body[length:] == np.asarray([0.5, -1.0, 2.0], dtype="<f4").tobytes()
    script = wrk.wrk_lua_binary_script(body, length)
    assert f'wrk.headers[ [=[Inference-Header-Content-Length]=] ] = [=[{length}]=]' in script
    assert "wrk.body = \"" + "".join(f"\\{b}" for b in body) + "\"" in script


def test_a_flagged_run_is_marked_and_a_missed_target_says_so() -> None:
    doc = serving_doc(flagged=True)
    doc["ratios"][1] = ratio_json("batched / raw", 0.5, 0.6)
    md = report.render_markdown({"serving": doc})
    assert "| wide batched, JSON ⚠ |" in md
    assert "**This run was flagged**" in md
    assert "| batched / raw | 0.50x | ≥ 0.6x | **below target** |" in md


def test_each_suite_keeps_its_own_section(tmp_path: Path) -> None:
    (tmp_path / "bench-gateway.json").write_text(json.dumps(gateway_doc()))
    report.write_results(tmp_path, serving_doc())
    md = (tmp_path / "benchmarks.md").read_text()
    assert md.index("## Serving") < md.index("## Gateway vs direct")  # fixed suite order, not file order
    assert "`bluegreen bench gateway --duration 10`" in md
    assert json.loads((tmp_path / "bench-serving.json").read_text())["ratios"][0]["value"] == 5.0
    report.write_results(tmp_path, gateway_doc(median=0.6))  # rerunning one suite leaves the other's section alone
    again = (tmp_path / "benchmarks.md").read_text()
    assert again.split("## Serving")[1].split("## Gateway")[0] == md.split("## Serving")[1].split("## Gateway")[0]
    assert "| 0.60x |" in again
    # the summary at the top follows: the gateway's new ratio, the serving suite's old ones
    summary = again.split("## Summary")[1].split("## Serving")[0]
    assert "| gateway | gateway / direct requests/s (median of 3 rounds) | 0.60x |" in summary
    assert "| serving | batched / unbatched rows/s | 5.00x |" in summary
    # and the plot, drawn from both suites' JSON, is referenced from the report
    assert (tmp_path / report.PLOT_NAME).read_bytes().startswith(b"\x89PNG")
    assert f"]({report.PLOT_NAME})" in again


def test_a_section_in_an_older_shape_falls_back_to_the_generic_one() -> None:
    old = {"suite": "gateway", "title": "Gateway vs direct", "date": "2025-01-01T00:00:00+00:00",
           "command": "bluegreen bench gateway", "machine": {}}
    md = report.render_markdown({"serving": serving_doc(), "gateway": old})
    assert "## Serving" in md and "## Gateway vs direct" in md
    assert "`bluegreen bench gateway`" in md
    assert "rerun the suite to refresh it" in md


def test_unknown_suite_is_refused(tmp_path: Path) -> None:
    assert runner.main(["nope"], duration_s=1.0, out_dir=tmp_path, repo=tmp_path) == 2
    assert list(tmp_path.iterdir()) == []


def test_suite_table_names_every_cli_choice() -> None:
    from gateway.cli import build_parser

    assert suites.SUITE_ORDER == ("serving", "gateway", "cache", "telemetry", "shadow")
    assert set(suites.SUITE_ORDER) <= set(suites.SUITES)
    assert suites.SUITES["serving"].run is serving_suite.run
    assert suites.SUITES["gateway"].run is gateway.run
    assert suites.SUITES["cache"].run is cache.run
    assert suites.SUITES["telemetry"].run is telemetry.run
    assert suites.SUITES["shadow"].run is shadow.run
    assert set(suites.SECTIONS) == set(suites.SUITES) | {"serving-cuda"}  # serving --device cuda: its own section
    assert build_parser().parse_args(["bench"]).suites == []  # none named: every suite
    assert build_parser().parse_args(["bench", "nope"]).suites == ["nope"]  # refused by the runner (exit 2)
    assert build_parser().parse_args(["bench", "shadow", "cache"]).suites == ["shadow", "cache"]
    assert build_parser().parse_args(["bench"]).device == "auto"
    args = build_parser().parse_args(["bench", "serving", "--device", "cuda"])
    assert (args.suites, args.device) == (["serving"], "cuda")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--device", "tpu"])


def test_bluegreen_bench_serving_device_cuda_reaches_the_suite(tmp_path: Path) -> None:
    """The real command: without CUDA the serving suite says so plainly and writes nothing; with CUDA the
    option reaches the suite (what the flag parses to is checked above, the run itself is the bench's job)."""
    import subprocess
    import sys

    offered, _ = serving_suite.cuda_offered()
    if offered:  # a CUDA machine: running the whole suite here would take minutes
        assert build_parser_device(["bench", "serving", "--device", "cuda"]) == "cuda"
        return
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "bench", "serving", "--device", "cuda",
                           "--duration", "1", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "skipped: CUDAExecutionProvider not offered" in done.stdout
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def build_parser_device(argv: list[str]) -> str:
    from gateway.cli import build_parser

    device: str = build_parser().parse_args(argv).device
    return device


def test_no_suite_named_runs_every_suite_in_order_and_writes_one_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ran: list[str] = []

    def fake(name: str) -> base.Suite:
        def suite(ctx: base.SuiteContext) -> base.SuiteResult:
            ran.append(name)
            return base.SuiteResult(name, f"Suite {name}", f"bluegreen bench {name}", {},
                                    [base.Ratio(f"{name} ratio", 1.0, 0.5)], True, [])
        return base.Suite(name, suite, report.render_generic_section)

    monkeypatch.setattr(runner, "SUITES", {name: fake(name) for name in reversed(suites.SUITE_ORDER)})
    monkeypatch.setattr(runner, "describe_machine", lambda: {"cpu_model": "Test CPU 9000", "cpu_count": 2})
    monkeypatch.setattr(runner.shutil, "which", lambda exe: f"/usr/bin/{exe}")
    assert runner.main([], duration_s=1.0, out_dir=tmp_path, repo=tmp_path) == 0
    assert ran == list(suites.SUITE_ORDER)
    md = (tmp_path / "benchmarks.md").read_text()
    summary = md.split("## Summary")[1].split("\n## ")[0]
    for name in suites.SUITE_ORDER:
        assert f"| {name} | {name} ratio | 1.00x | ≥ 0.5x | met | " in summary
        assert f"Test CPU 9000, 2 cores | `bluegreen bench {name}` |" in summary
        assert (tmp_path / f"bench-{name}.json").exists()
    assert "PASS shadow ratio: 1.00x (≥ 0.5x)" in capsys.readouterr().out


def test_without_wrk_nothing_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner.shutil, "which", lambda exe: None)
    assert runner.main([], duration_s=1.0, out_dir=tmp_path, repo=tmp_path) == 2
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- gateway suite

def test_lua_script_sends_extra_headers_without_opening_a_long_string() -> None:
    script = wrk.wrk_lua_script("{}", {"Cache-Control": "no-cache, no-store"})
    assert 'wrk.headers[ [=[Cache-Control]=] ] = [=[no-cache, no-store]=]' in script
    assert "[[" not in script  # "[[" would open a Lua long string: the header line would not parse
    assert "wrk.headers[" not in wrk.wrk_lua_script("{}").replace('wrk.headers["Content-Type"]', "")


def test_wrk_command_line() -> None:
    assert wrk.wrk_command("http://127.0.0.1:1/x", "s.lua", 5, 32) == [
        "wrk", "-t2", "-c32", "-d5s", "--timeout=10s", "--latency", "-s", "s.lua", "http://127.0.0.1:1/x"]


def test_benchmarks_target_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1 only"):
        wrk.run_wrk("http://10.1.2.3:80/", tmp_path / "x.lua", 1)


def test_round_ratios_pair_the_runs_of_each_round() -> None:
    runs = [{"round": 1, "target": "direct", "requests_per_s": 6000.0},
            {"round": 1, "target": "gateway", "requests_per_s": 3000.0},
            {"round": 2, "target": "gateway", "requests_per_s": 3300.0},  # the order within a round does not matter
            {"round": 2, "target": "direct", "requests_per_s": 5500.0},
            {"round": 3, "target": "direct", "requests_per_s": 0.0},
            {"round": 3, "target": "gateway", "requests_per_s": 10.0},
            {"round": 4, "target": "direct", "requests_per_s": 5000.0}]  # no gateway run: no ratio
    rounds = steps.round_ratios(runs)
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0] == {"round": 1, "direct_rps": 6000.0, "gateway_rps": 3000.0, "ratio": 0.5}
    assert rounds[1]["ratio"] == pytest.approx(0.6)
    assert rounds[2]["ratio"] == 0.0


def test_round_ratios_put_nginx_and_the_proxies_cpu_beside_the_gateway() -> None:
    runs = [{"round": 1, "target": "direct", "requests_per_s": 6000.0, "proxy_cpu_us_per_request": None},
            {"round": 1, "target": "gateway", "requests_per_s": 4000.0, "proxy_cpu_us_per_request": 120.0},
            {"round": 1, "target": "nginx", "requests_per_s": 5500.0, "proxy_cpu_us_per_request": 40.0}]
    (row,) = steps.round_ratios(runs)
    assert row["gateway_cpu_us"] == 120.0 and row["nginx_cpu_us"] == 40.0 and row["nginx_rps"] == 5500.0
    assert row["cpu_vs_nginx"] == pytest.approx(3.0)
    assert row["ratio"] == pytest.approx(4000 / 6000)


def test_proxy_cpu_per_request_is_its_cpu_over_the_answered_requests() -> None:
    assert steps.proxy_cpu_us_per_request({"cpu_s": {"proxy": 0.5}, "requests": 5000}) == pytest.approx(100.0)
    assert steps.proxy_cpu_us_per_request({"cpu_s": {"model_server": 0.5}, "requests": 5000}) is None
    assert steps.proxy_cpu_us_per_request({"cpu_s": {"proxy": 0.5}, "requests": 0}) is None


def test_the_nginx_reference_config_proxies_to_the_model_server_with_keepalive(tmp_path: Path) -> None:
    conf = servers.NGINX_CONF.substitute(work=tmp_path, port=1234, host="127.0.0.1", keepalive=64,
                                       upstream="127.0.0.1:8001")
    assert "worker_processes 1;" in conf and "listen 127.0.0.1:1234;" in conf
    assert "server 127.0.0.1:8001; keepalive 64;" in conf
    assert 'proxy_http_version 1.1;' in conf and 'proxy_set_header Connection "";' in conf


def test_added_latency_is_median_gateway_minus_median_direct() -> None:
    runs = [{"target": "direct", "latency_ms": {"p50": 2.0, "p90": 3.0, "p99": 5.0}},
            {"target": "gateway", "latency_ms": {"p50": 3.0, "p90": 6.0, "p99": None}},
            {"target": "gateway", "latency_ms": {"p50": 4.0, "p90": 7.0, "p99": None}},
            {"target": "direct", "latency_ms": {"p50": 2.4, "p90": 3.0, "p99": 9.0}}]
    medians = steps.median_latency_ms(runs)
    assert medians == {"direct": {"p50": pytest.approx(2.2), "p90": 3.0, "p99": 7.0},
                       "gateway": {"p50": 3.5, "p90": 6.5, "p99": None}}
    assert steps.added_latency_ms(medians) == {"p50": pytest.approx(1.3), "p90": 3.5, "p99": None}
    assert steps.added_latency_ms({"direct": medians["direct"]}) == {"p50": None, "p90": None, "p99": None}


def test_server_timing_medians_over_the_runs_that_carry_it() -> None:
    runs = [{"server_timing_ms": {"gateway": {"p50": 0.04, "p99": 0.1, "count": 100},
                                  "upstream": {"p50": 2.0, "p99": 9.0, "count": 100}}},
            {"server_timing_ms": {"gateway": {"p50": 0.06, "p99": 0.3, "count": 50}}},
            {"server_timing_ms": {}}]
    timing = steps.server_timing_medians(runs)
    assert timing["gateway"] == {"p50": pytest.approx(0.05), "p99": pytest.approx(0.2), "count": 150, "runs": 2}
    assert timing["upstream"] == {"p50": 2.0, "p99": 9.0, "count": 100, "runs": 1}
    assert steps.server_timing_medians([]) == {}


def test_cpu_used_between_two_readings() -> None:
    cpu, cores = servers.cpu_used({"gateway": 1.0, "model_server": None, "gone": 2.0},
                                {"gateway": 3.5, "model_server": 4.0}, 5.0)
    assert cpu == {"gateway": 2.5, "model_server": None, "gone": None}
    assert cores == {"gateway": 0.5, "model_server": None, "gone": None}
    assert servers.cpu_used({"a": 1.0}, {"a": 2.0}, 0.0)[1] == {"a": None}


def test_routing_shown_with_placeholder_ports() -> None:
    shown = steps.display_routing({"models": {"digits": {"colors": {"blue": {
        "version": "1", "backends": ["http://127.0.0.1:43123"]}}}}})
    assert shown["models"]["digits"]["colors"]["blue"]["backends"] == ["http://127.0.0.1:<model server port>"]


def _sat(round_no: int, target: str, rps: float, *, flagged: bool = False) -> dict[str, Any]:
    proxy_cores = {"gateway": 0.75, "nginx": 0.25}.get(target)
    cores = {"model_server": 0.7, **({} if proxy_cores is None else {"proxy": proxy_cores})}
    return {"round": round_no, "target": target, "requests_per_s": rps, "requests": int(rps * 10),
            "model_server_rows": int(rps * 10), "non_2xx": 2 if flagged else 0, "socket_errors": 0,
            "flagged": flagged, "latency_ms": {"p50": 5.0, "p99": 30.0}, "wrk_cores": 0.12, "cpu_pressure": 0.4,
            "cores": cores,
            "proxy_cpu_us_per_request": None if proxy_cores is None else proxy_cores * 10 / (rps * 10) * 1e6}


def _half(run: int, target: str, p50: float, p99: float, generator: float) -> dict[str, Any]:
    timing = {"gateway": {"p50": 0.04, "p99": 0.13, "count": 7500}} if target == "gateway" else {}
    return {"run": run, "target": target, "answered_per_s": 1500.0, "non_2xx": 0, "errors": {}, "unfinished": 0,
            "flagged": False, "latency_ms": {"p50": p50, "p90": p50 * 2, "p99": p99, "p99.9": p99 * 2,
                                             "max": p99 * 3},
            "send_lag_ms": {"p99": 1.3}, "server_timing_ms": timing, "cpu_pressure": 0.25,
            "cores": {"generator": generator, "gateway": 0.5 if target == "gateway" else 0.0, "model_server": 0.3}}


def gateway_doc(*, median: float = 0.55, flagged: bool = False) -> dict[str, Any]:
    rounds = [{"round": 1, "direct_rps": 6000.0, "gateway_rps": 3300.0, "ratio": 0.55},
              {"round": 2, "direct_rps": 5000.0, "gateway_rps": 3000.0, "ratio": 0.6, "nginx_rps": 5000.0,
               "gateway_cpu_us": 250.0, "nginx_cpu_us": 50.0, "cpu_vs_nginx": 5.0},
              {"round": 3, "direct_rps": 6000.0, "gateway_rps": 3000.0, "ratio": 0.5}]
    half = [_half(1, "direct", 2.09, 4.66, 0.29), _half(2, "gateway", 3.95, 12.5, 0.41),
            _half(3, "gateway", 4.05, 13.5, 0.43), _half(4, "direct", 2.11, 5.66, 0.3)]
    medians = steps.median_latency_ms(half)
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
                     "round_orders": [["direct", "gateway"], ["gateway", "direct", "nginx"], ["direct", "gateway"]],
                     "nginx": {"workers": 1, "upstream_keepalive": 64},
                     "half_load_fraction": 0.5, "half_load_order": ["direct", "gateway", "gateway", "direct"]},
        "saturation": [_sat(1, "direct", 6000.0), _sat(1, "gateway", 3300.0, flagged=flagged),
                       _sat(2, "gateway", 3000.0), _sat(2, "direct", 5000.0), _sat(2, "nginx", 5000.0),
                       _sat(3, "direct", 6000.0), _sat(3, "gateway", 3000.0)],
        "rounds": rounds,
        "ratios": [ratio_json("gateway / direct requests/s (median of 3 rounds)", median, 0.5, 0.65),
                   ratio_json("gateway CPU per request / nginx CPU per request (median of 1 rounds)", 5.0, 4.5, 3.0,
                                at_most=True)],
        "half_load": {"rate_per_s": 1500.0, "basis_rps": 3000.0, "runs": half, "median_ms": medians,
                      "added_ms": steps.added_latency_ms(medians)},
        "server_timing_ms": steps.server_timing_medians([r for r in half if r["target"] == "gateway"]),
        "ok": not flagged,
        "notes": [gateway.GATEWAY_SHARED_CORES_NOTE, steps.FIXED_RATE_NOTE],
    }


def test_gateway_section_has_runs_rounds_ratio_added_latency_and_cpu() -> None:
    md = report.render_markdown({"gateway": gateway_doc()})
    assert "## Gateway vs direct to the model server" in md
    assert "2025-02-03T04:05:06+00:00" in md and "Test CPU 9000" in md
    assert "Reproduce: `bluegreen bench gateway --duration 10`" in md
    assert "wrk 2 threads x 32 connections" in md
    assert "`Cache-Control: no-cache`" in md
    assert "(direct, gateway; gateway, direct, nginx; direct, gateway)" in md
    assert "through nginx (one worker, keep-alive upstream of 64 connections" in md
    assert "in the order direct, gateway, gateway, direct" in md
    # each run, in the order it ran, with the CPU of wrk, the proxy (its µs per request) and the model server
    assert "| 1 | direct | 6,000 | 5.0 | 30.0 | 60,000 | 60,000 | 0 | 0 | 0.12 cores | - | - | 0.70 cores " \
           "| 40% |" in md
    assert "| 2 | gateway | 3,000 | 5.0 | 30.0 | 30,000 | 30,000 | 0 | 0 | 0.12 cores | 0.75 cores | 250 " \
           "| 0.70 cores | 40% |" in md
    assert "| 2 | nginx | 5,000 | 5.0 | 30.0 | 50,000 | 50,000 | 0 | 0 | 0.12 cores | 0.25 cores | 50 " \
           "| 0.70 cores | 40% |" in md
    assert md.index("| 2 | gateway |") < md.index("| 2 | direct |")
    assert "| 2 | 5,000 | 3,000 | 5,000 | 0.60x | 250 | 50 | 5.00x |" in md
    assert "| 1 | 6,000 | 3,300 | - | 0.55x | - | - | - |" in md
    assert "| 5.00x | ≤ 4.5x (stretch 3x) | **above target** |" in md
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
    below = report.render_markdown({"gateway": gateway_doc(median=0.45)})
    assert "| 0.45x | ≥ 0.5x (stretch 0.65x) | **below target** |" in below
    above = report.render_markdown({"gateway": gateway_doc(median=0.7)})
    assert "| 0.70x | ≥ 0.5x (stretch 0.65x) | met, stretch met |" in above


def test_a_flagged_gateway_run_is_marked() -> None:
    md = report.render_markdown({"gateway": gateway_doc(flagged=True)})
    assert "| 1 | gateway ⚠ |" in md
    assert "**This run was flagged**" in md


def test_gateway_summary_lines() -> None:
    lines = "\n".join(report.summary_lines(gateway_doc()))
    assert "round 2: direct 5,000 req/s, gateway 3,000 req/s, gateway / direct 0.60" in lines
    assert "added p50 +1.90 ms, p99 +7.84 ms" in lines
    assert "PASS gateway / direct requests/s (median of 3 rounds): 0.55x" in lines


# ---------------------------------------------------------------------------------------- cache, telemetry, shadow

def test_cycle_script_formats_every_body_once_and_sends_them_in_turn() -> None:
    script = wrk.wrk_lua_cycle_script(['{"a":1}', '{"b":2}', '{"c":3}'], {"Cache-Control": "no-cache"})
    assert '  [=[{"a":1}]=],\n  [=[{"b":2}]=],\n  [=[{"c":3}]=]\n}' in script
    assert "requests[k] = wrk.format(nil, nil, nil, body)" in script  # formatted in init, not per request
    assert "request = function()" in script and "return requests[position]" in script
    assert 'thread:set("bluegreen_thread", thread_count)' in script  # threads start at different places
    assert "wrk.headers[ [=[Cache-Control]=] ] = [=[no-cache]=]" in script
    assert f"{wrk.WRK_MARKER} " in script
    with pytest.raises(ValueError, match="no bodies"):
        wrk.wrk_lua_cycle_script([])


def test_unique_bodies_number_their_first_pixels_and_keep_the_rest() -> None:
    row = [float(i % 17) for i in range(64)]
    prefix, rest = wrk.unique_body_parts("input", row)
    digits = list(range(wrk.UNIQUE_DIGITS))
    doc = json.loads(prefix + ",".join(str(d) for d in digits) + rest)
    assert doc["inputs"][0]["shape"] == [1, 64]
    assert doc["inputs"][0]["data"] == digits + row[wrk.UNIQUE_DIGITS:]
    script = wrk.wrk_lua_unique_script("input", row)
    assert f"for k = 1, {wrk.UNIQUE_DIGITS} do" in script
    assert "os.time()" in script  # salted per run: a later run never repeats an earlier one's bodies
    # 17^13 distinct numbers cover every counter the script can reach (65536 * 2^32 + threads * 2^24)
    assert 17 ** wrk.UNIQUE_DIGITS > 65536 * 2**32 + 64 * 2**24
    with pytest.raises(ValueError):
        wrk.unique_body_parts("input", [0.0] * wrk.UNIQUE_DIGITS)


def test_prometheus_value_picks_the_sample_with_the_labels_asked() -> None:
    text = "\n".join([
        "# HELP bluegreen_shadow_agreement_ratio Share of shadow copies that agreed.",
        "# TYPE bluegreen_shadow_agreement_ratio gauge",
        'bluegreen_shadow_agreement_ratio{model="wide"} 0.5',
        'bluegreen_shadow_agreement_ratio{model="digits"} 0.890625',
        'bluegreen_request_duration_seconds_count{model="digits",color="blue",cache="bypass"} 1234.0',
        'bluegreen_request_duration_seconds_count{model="digits",color="green",cache="bypass"} 6.0',
        "bluegreen_in_flight_requests 3",
    ])
    assert servers.prometheus_value(text, "bluegreen_shadow_agreement_ratio", {"model": "digits"}) == 0.890625
    assert servers.prometheus_value(text, "bluegreen_request_duration_seconds_count", {"model": "digits"}) == 1234.0
    assert servers.prometheus_value(text, "bluegreen_request_duration_seconds_count", {"color": "green"}) == 6.0
    assert servers.prometheus_value(text, "bluegreen_in_flight_requests") == 3.0
    assert servers.prometheus_value(text, "bluegreen_request_duration_seconds") is None  # only its _count exists
    assert servers.prometheus_value(text, "bluegreen_shadow_agreement_ratio", {"model": "nope"}) is None


@pytest.mark.parametrize(("target", "counters", "ok"), [
    ("l1_hit", {"l1_hits": 1000, "l2_hits": 0, "misses": 0}, True),
    ("l1_hit", {"l1_hits": 980, "l2_hits": 0, "misses": 20}, False),  # 2% went upstream: not an L1-hit run
    ("l2_hit", {"l1_hits": 40, "l2_hits": 960, "misses": 0}, True),  # the one-entry L1 answers a few
    ("l2_hit", {"l1_hits": 1000, "l2_hits": 0, "misses": 0}, False),
    ("miss", {"l1_hits": 0, "l2_hits": 0, "misses": 500, "l2_errors": 3}, True),
    ("miss", {"l1_hits": 500, "l2_hits": 0, "misses": 500}, False),
    ("l1_hit", {"l1_hits": 0, "l2_hits": 0, "misses": 0}, False),  # nothing looked up at all
    ("direct", {}, True),  # no cache on the way
])
def test_cache_runs_must_take_the_path_they_are_named_after(target: str, counters: dict[str, int], ok: bool) -> None:
    assert cache.cache_path_ok(target, counters) is ok


def test_redis_calls_per_request_over_the_runs_that_counted_them() -> None:
    runs = [{"requests": 1000, "counters": {"l2_hits": 1000, "redis_get": 1000, "redis_set": 1000, "redis_ping": 0}},
            {"requests": 3000, "counters": {"l2_hits": 3000, "redis_get": 3000, "redis_set": 3000,
                                            "redis_evalsha": 2}},
            {"requests": 5000, "counters": {"l1_hits": 5000}}]  # no Redis counted: left out
    assert cache.redis_calls_per_request(runs) == {"get": 1.0, "set": 1.0, "evalsha": 0.0005}
    assert cache.redis_calls_per_request(runs[2:]) == {}


def test_cache_path_shares() -> None:
    assert cache.cache_path_shares({"l1_hits": 1, "l2_hits": 3, "misses": 0, "stale": 9}) == {
        "l1_hits": 0.25, "l2_hits": 0.75, "misses": 0.0}
    assert cache.cache_path_shares({}) == {"l1_hits": 0.0, "l2_hits": 0.0, "misses": 0.0}


def test_round_table_takes_every_target_over_the_baseline() -> None:
    runs = [{"round": 1, "target": "direct", "requests_per_s": 6000.0},
            {"round": 1, "target": "l1_hit", "requests_per_s": 12000.0},
            {"round": 1, "target": "miss", "requests_per_s": 3000.0},
            {"round": 2, "target": "miss", "requests_per_s": 3600.0},
            {"round": 2, "target": "l1_hit", "requests_per_s": 9000.0},
            {"round": 2, "target": "direct", "requests_per_s": 6000.0},
            {"round": 3, "target": "l1_hit", "requests_per_s": 1.0}]  # no baseline: no row
    table = steps.round_table(runs, "direct")
    assert [r["round"] for r in table] == [1, 2]
    assert table[0]["ratios"] == {"l1_hit": 2.0, "miss": 0.5}
    assert table[1]["rps"] == {"miss": 3600.0, "l1_hit": 9000.0, "direct": 6000.0}
    assert steps.median_round_ratio(table, "l1_hit") == pytest.approx(1.75)
    assert steps.median_round_ratio(table, "miss") == pytest.approx(0.55)
    with pytest.raises(base.SuiteError):
        steps.median_round_ratio(table, "l2_hit")
    zero = steps.round_table([{"round": 1, "target": "off", "requests_per_s": 0.0},
                              {"round": 1, "target": "on", "requests_per_s": 5.0}], "off")
    assert zero[0]["ratios"] == {"on": 0.0}


def test_ratios_at_most_and_without_target() -> None:
    within = ratio_json("p50 with / without", 1.04, 1.1, at_most=True)
    above = ratio_json("p50 with / without", 1.3, 1.1, at_most=True)
    info = ratio_json("miss / direct", 0.57, None)
    share = ratio_json("agreement", 0.890625, None, unit="")
    assert (within["met"], above["met"], info["met"], info["stretch_met"]) == (True, False, None, None)
    assert base.ratio_row(within) == "| p50 with / without | 1.04x | ≤ 1.1x | met |"
    assert base.ratio_row(above) == "| p50 with / without | 1.30x | ≤ 1.1x | **above target** |"
    assert base.ratio_row(info) == "| miss / direct | 0.57x | reported, no target | - |"
    assert base.ratio_row(share) == "| agreement | 0.89 | reported, no target | - |"
    lines = "\n".join(report.summary_lines({"ratios": [within, above, info]}))
    assert "PASS p50 with / without: 1.04x (≤ 1.1x)" in lines
    assert "ABOVE p50 with / without: 1.30x (≤ 1.1x)" in lines
    assert "INFO miss / direct: 0.57x (reported, no target)" in lines


def test_gateway_cpu_per_request() -> None:
    assert steps.gateway_cpu_us_per_request({"cpu_s": {"gateway": 0.5}, "requests": 5000}) == pytest.approx(100.0)
    assert steps.gateway_cpu_us_per_request({"cpu_s": {"model_server": 0.5}, "requests": 5000}) is None
    assert steps.gateway_cpu_us_per_request({"cpu_s": {"gateway": 0.5}, "requests": 0}) is None


def test_spread_note_only_when_rounds_disagree() -> None:
    assert steps.spread_note([1.0, 1.05, 0.98], "on / off") == []
    note = steps.spread_note([0.87, 1.02, 1.24, 0.92], "on / off")
    assert len(note) == 1 and "on / off spread over 38%" in note[0] and "(0.87 to 1.24)" in note[0]


def test_routing_files_the_suites_write_are_valid_for_the_gateway() -> None:
    from gateway.settings import RoutingFile

    plain = RoutingFile.model_validate(steps.digits_routing(("1", "http://127.0.0.1:1"), ("2", "http://127.0.0.1:1")))
    shadowed = RoutingFile.model_validate(steps.digits_routing(("1", "http://127.0.0.1:1"), ("2", "http://127.0.0.1:2"),
                                                               shadow.SHADOW_PERCENT))
    assert plain.models["digits"].weights == {"blue": 100, "green": 0}
    assert plain.models["digits"].shadow_percent == 0
    assert shadowed.models["digits"].shadow_percent == 10
    assert shadowed.models["digits"].colors["green"].backends == ["http://127.0.0.1:2"]


def test_gateway_settings_are_bluegreen_variables_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="BLUEGREEN_"), \
            servers.gateway_server(steps.digits_routing(("1", "http://127.0.0.1:1"), ("2", "http://127.0.0.1:1")),
                                 tmp_path, {"PATH": "/nowhere"}):
        pass


MACHINE = {"cpu_model": "Test CPU 9000", "cpu_count": 2, "usable_cpus": 2, "onnxruntime": "1.99.0",
           "onnxruntime_providers": ["CPUExecutionProvider"], "python": "3.11.7", "os": "Linux 6"}


def _cache_run(round_no: int, target: str, rps: float, shares: tuple[float, float, float] | None,
               *, flagged: bool = False) -> dict[str, Any]:
    run = _sat(round_no, target, rps, flagged=flagged)
    run["latency_ms"]["p95"] = 9.0
    run["cpu_s"] = {"gateway": 0.8 if target != "direct" else None, "model_server": 0.5}
    run["cores"] = {"model_server": 0.5} if target == "direct" else {"gateway": 0.8, "model_server": 0.1}
    if target == "l2_hit":
        run["cores"]["redis"] = 0.11
    if shares is not None:
        run["path_share"] = dict(zip(servers.CACHE_PATHS, shares, strict=True))
    return run


def cache_doc(*, wrong_path: bool = False) -> dict[str, Any]:
    runs = [_cache_run(1, "direct", 7000.0, None), _cache_run(1, "l1_hit", 12000.0, (1.0, 0.0, 0.0)),
            _cache_run(1, "l2_hit", 4000.0, (0.02, 0.98, 0.0) if not wrong_path else (1.0, 0.0, 0.0),
                       flagged=wrong_path),
            _cache_run(1, "miss", 3500.0, (0.0, 0.0, 1.0)), _cache_run(2, "miss", 3500.0, (0.0, 0.0, 1.0)),
            _cache_run(2, "l2_hit", 4200.0, (0.0, 1.0, 0.0)), _cache_run(2, "l1_hit", 10000.0, (1.0, 0.0, 0.0)),
            _cache_run(2, "direct", 6000.0, None)]
    table = steps.round_table(runs, "direct")
    return {
        "suite": "cache", "title": "Prediction cache: L1 hit, L2 hit and miss vs direct to the model server",
        "command": "bluegreen bench cache --duration 10", "date": "2025-03-04T05:06:07+00:00", "machine": MACHINE,
        "settings": {"model": "digits:1", "server_command": "bluegreen serve-model --model digits:1 --port <free port>",
                     "connections": 32, "wrk_threads": 2, "duration_s": 10, "warmup_s": 2,
                     "round_orders": [list(o) for o in cache.CACHE_ROUNDS], "l2_bodies": 128,
                     "gateway_settings": {"gateway-l1": {"BLUEGREEN_CACHE__TTL_S": "3600"},
                                          "gateway-l2": {"BLUEGREEN_CACHE__TTL_S": "3600",
                                                         "BLUEGREEN_REDIS_URL": "redis://127.0.0.1:<free port>/0",
                                                         "BLUEGREEN_CACHE__L1_MAX_ENTRIES": "1"}},
                     "expected_paths": {t: {"counter": c, "least_share": s}
                                        for t, (c, s) in cache.CACHE_EXPECTED_PATH.items()},
                     "labels": cache.CACHE_LABELS},
        "prewarm": {"bodies": 128, "redis_cache_keys": 128},
        "redis_calls_per_l2_request": {"get": 1.0, "set": 1.0, "evalsha": 0.001},
        "saturation": runs, "round_table": table,
        "ratios": [ratio_json("L1 hit / direct requests/s (median of 2 rounds)",
                                steps.median_round_ratio(table, "l1_hit"), cache.TARGET_L1_HIT_VS_DIRECT),
                   ratio_json("L2 hit / direct requests/s (median of 2 rounds)",
                                steps.median_round_ratio(table, "l2_hit"), None)],
        "ok": not wrong_path, "notes": [cache.CACHE_NOTE],
    }


def test_cache_section_shows_each_path_its_lookups_and_the_ratios() -> None:
    md = report.render_markdown({"cache": cache_doc()})
    assert "## Prediction cache: L1 hit, L2 hit and miss vs direct to the model server" in md
    assert "Reproduce: `bluegreen bench cache --duration 10`" in md
    assert "`BLUEGREEN_CACHE__L1_MAX_ENTRIES=1`" in md and "`BLUEGREEN_CACHE__TTL_S=3600`" in md
    assert "128 distinct bodies" in md and "128 keys under `bluegreen:cache:`" in md
    assert "in the order direct, L1 hit, L2 hit, miss; miss, L2 hit, L1 hit, direct" in md
    # a run: throughput, latency, model server rows, lookups, Redis CPU, errors, CPU, CPU per request
    assert "| 1 | L2 hit | 4,000 | 5.0 | 9.0 | 30.0 | 40,000 | 40,000 | 2% / 98% / 0% | 0.11 cores | 0 | 0 | " \
           "0.12 cores | 0.80 cores | 20 | 0.10 cores | 40% |" in md
    assert "| 1 | direct | 7,000 | 5.0 | 9.0 | 30.0 | 70,000 | 70,000 | - | - | 0 | 0 | 0.12 cores | - | - | " \
           "0.50 cores | 40% |" in md
    assert "Redis commands per request during the L2-hit runs (`INFO commandstats`): GET 1.00, SET 1.00." in md
    assert "| Round | direct | L1 hit | L2 hit | miss | L1 hit / direct | L2 hit / direct | miss / direct |" in md
    assert "| 1 | 7,000 | 12,000 | 4,000 | 3,500 | 1.71x | 0.57x | 0.50x |" in md
    assert "| L1 hit / direct requests/s (median of 2 rounds) | 1.69x | ≥ 1.5x | met |" in md
    assert "| L2 hit / direct requests/s (median of 2 rounds) | 0.64x | reported, no target | - |" in md
    assert "**This run was flagged**" not in md and "⚠ |" not in md


def test_a_cache_run_on_the_wrong_path_is_marked() -> None:
    md = report.render_markdown({"cache": cache_doc(wrong_path=True)})
    assert "| 1 | L2 hit ⚠ | 4,000 |" in md and "100% / 0% / 0%" in md
    assert "**This run was flagged**" in md
    assert "| cache ⚠ | L1 hit / direct" in md  # the summary says so too


def telemetry_doc() -> dict[str, Any]:
    runs = []
    for n, order in enumerate(telemetry.TELEMETRY_ROUNDS, start=1):
        for target in order:
            run = _sat(n, target, 4000.0 if target == "off" else 3900.0 - 100 * n)
            run["cpu_s"] = {"gateway": 0.9, "model_server": 0.5}
            runs.append(run)
    table = steps.round_table(runs, "off")
    return {
        "suite": "telemetry", "title": "Telemetry on vs off", "command": "bluegreen bench telemetry --duration 10",
        "date": "2025-03-04T05:06:07+00:00", "machine": MACHINE,
        "settings": {"model": "digits:1", "request_headers": {"Cache-Control": "no-cache, no-store"},
                     "server_command": "bluegreen serve-model --port <free port>", "connections": 32,
                     "wrk_threads": 2, "duration_s": 10, "warmup_s": 2,
                     "round_orders": [list(o) for o in telemetry.TELEMETRY_ROUNDS],
                     "labels": {"on": "telemetry on", "off": "telemetry off"}},
        "requests_recorded_in_metrics": {"on": 160000.0, "off": None},
        "saturation": runs, "round_table": table,
        "ratios": [ratio_json("telemetry on / off requests/s (median of 4 rounds)",
                                steps.median_round_ratio(table, "on"), telemetry.TARGET_TELEMETRY_ON_VS_OFF)],
        "ok": True, "notes": [telemetry.TELEMETRY_NOTE],
    }


def test_telemetry_section_alternates_rounds_and_quotes_the_median() -> None:
    md = report.render_markdown({"telemetry": telemetry_doc()})
    assert "## Telemetry on vs off" in md
    assert "`BLUEGREEN_TELEMETRY=false`" in md and "`Cache-Control: no-cache, no-store`" in md
    assert "alternated over 4 rounds (on, off; off, on; on, off; off, on)" in md
    assert "on 160,000, off - (none is right for off)" in md
    assert "| 2 | telemetry on | 3,700 |" in md
    assert "| Round | telemetry off | telemetry on | telemetry on / telemetry off |" in md
    assert "| 1 | 4,000 | 3,800 | 0.95x |" in md
    assert "| telemetry on / off requests/s (median of 4 rounds) | 0.91x | ≥ 0.95x | **below target** |" in md
    lines = "\n".join(report.summary_lines(telemetry_doc()))
    assert "round 1: off 4,000 req/s, on 3,800 req/s (0.95x)" in lines


def shadow_doc() -> dict[str, Any]:
    saturation = [_sat(1, "off", 4000.0), _sat(1, "on", 3400.0)]
    saturation[1]["green_rows"] = 4000
    half = [_half(1, "off", 3.0, 6.0, 0.3), _half(2, "on", 3.2, 7.0, 0.3), _half(3, "on", 3.3, 8.0, 0.3),
            _half(4, "off", 3.1, 6.5, 0.3)]
    for run in half:
        run["latency_ms"]["p95"] = run["latency_ms"]["p50"] * 1.5
        run["green_rows"] = 2000 if run["target"] == "on" else 0
        run["shadow_share"] = 0.1 if run["target"] == "on" else None
        run["cores"]["green_server"] = 0.1 if run["target"] == "on" else 0.0
    medians = steps.median_latency_ms(half, shadow.SHADOW_PERCENTILES)
    return {
        "suite": "shadow", "title": "Shadow traffic at 10%: client latency with vs without",
        "command": "bluegreen bench shadow --duration 10", "date": "2025-03-04T05:06:07+00:00", "machine": MACHINE,
        "settings": {"model": "digits:1", "green": "digits:2", "shadow_percent": 10, "bodies": 64,
                     "request_headers": {"Cache-Control": "no-cache, no-store"},
                     "server_commands": {"blue": "bluegreen serve-model --model digits:1 --port <free port>",
                                         "green": "bluegreen serve-model --model digits:2 --port <free port>"},
                     "connections": 32, "wrk_threads": 2, "duration_s": 10, "warmup_s": 2,
                     "saturation_order": ["off", "on"], "half_load_fraction": 0.5,
                     "half_load_order": list(shadow.SHADOW_HALF_LOAD_ORDER),
                     "labels": {"off": "no shadow", "on": "10% shadowed"}},
        "saturation": saturation,
        "half_load": {"rate_per_s": 1700.0, "basis_rps": 3400.0, "runs": half, "median_ms": medians},
        "agreement": {"gateway": 0.890625, "offline": {"compared": 64, "agreed": 57, "ratio": 57 / 64}},
        "ratios": [ratio_json("p50 with / without shadowing at half load (median of 2 runs each)",
                                medians["on"]["p50"] / medians["off"]["p50"], shadow.TARGET_SHADOW_P50, at_most=True),
                   ratio_json("shadow agreement (bluegreen_shadow_agreement_ratio, digits 1 vs 2)", 0.890625, None,
                                unit="")],
        "ok": True, "notes": [shadow.SHADOW_NOTE, steps.FIXED_RATE_NOTE],
    }


def test_shadow_section_has_latency_with_and_without_copies_and_agreement() -> None:
    md = report.render_markdown({"shadow": shadow_doc()})
    assert "## Shadow traffic at 10%: client latency with vs without" in md
    assert "`shadow_percent: 10`" in md and "64 held-out digits images" in md
    assert "in the order no shadow, 10% shadowed, 10% shadowed, no shadow" in md
    assert "| 1 | 10% shadowed | 3,400 |" in md and "| 4,000 | 0 | 0 |" in md  # green rows at saturation
    assert "### Client latency at half load (1,700 requests/s)" in md
    assert "| 2 | 10% shadowed | 1,500 | 3.20 | 6.40 | 4.80 | 7.00 |" in md
    assert "| 2,000 | 10.0% | 0 | 0 | 0.30 cores |" in md
    assert "| no shadow (median of 2 runs) | 3.05 | 6.10 | 4.58 | 6.25 |" in md
    assert "| 10% shadowed (median of 2 runs) | 3.25 | 6.50 | 4.88 | 7.50 |" in md
    assert "`bluegreen_shadow_agreement_ratio` after the runs): 0.891" in md
    assert "57 of 64 agree (0.891)" in md
    assert "| p50 with / without shadowing at half load (median of 2 runs each) | 1.07x | ≤ 1.15x | met |" in md
    assert "| shadow agreement (bluegreen_shadow_agreement_ratio, digits 1 vs 2) | 0.89 | reported, no target | - |" \
        in md
    lines = "\n".join(report.summary_lines(shadow_doc()))
    assert "half load (1,700 req/s): off p50 3.05 ms, p99 6.25 ms (median), on p50 3.25 ms" in lines


def test_summary_lists_every_ratio_of_every_suite_with_date_machine_and_command() -> None:
    docs = {"shadow": shadow_doc(), "cache": cache_doc(), "gateway": gateway_doc(), "serving": serving_doc()}
    md = report.render_markdown(docs, plot="benchmarks.png")
    summary = md.split("## Summary")[1].split("\n## ")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| Suite")]
    assert len(rows) == sum(len(d["ratios"]) for d in docs.values())
    assert [row.split(" | ")[0] for row in rows] == ["| serving"] * 3 + ["| gateway"] * 2 + ["| cache"] * 2 + \
        ["| shadow"] * 2  # the report's suite order
    assert "| cache | L1 hit / direct requests/s (median of 2 rounds) | 1.69x | ≥ 1.5x | met | " \
           "2025-03-04T05:06:07+00:00 | Test CPU 9000, 2 cores | `bluegreen bench cache --duration 10` |" in rows
    assert md.index("## Summary") < md.index("![") < md.index("## Serving")
    assert "(benchmarks.png)" in md
    assert "![" not in report.render_markdown(docs)  # no plot drawn: none referenced
