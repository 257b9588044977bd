"""The availability SLO, resource and info alerts of k8s/base/alerts.yaml: their windows, factors and
severities are the plan's, and ``promtool test rules`` shows each one firing on series that breach it and
staying silent on series that do not — including the burn-rate windows: errors that stopped (the short window
clears the alert), a spike too short for the long window, a burn old enough to have left the short window.

Two promtool cases. The first (70 minutes at 1-minute steps) shares its series and its evaluation with
tests/k8s/test_monitoring.py, which imports :func:`inputs` and :data:`EXPECTED`. The second runs 26 hours at
5-minute steps: the slow burn's day-long windows and the traffic alert's hour- and day-earlier comparisons need
that much history.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.k8s.test_monitoring import dashboard, panel_queries, promtool, rule_groups, rules, series

Obj = dict[str, object]
Segments = list[tuple[int, float]]


def counter(*segments: tuple[int, float], absent: int = 0) -> str:
    """A counter in promtool's notation: after ``absent`` missing samples, from 0, ``n`` steps of ``per`` each
    for every segment."""
    parts = [f"_x{absent}"] if absent else []
    value = 0.0
    for i, (n, per) in enumerate(segments):
        if i == 0:
            parts.append(f"{value:g}+{per:g}x{n}")
            value += per * n
        else:
            value += per
            parts.append(f"{value:g}+{per:g}x{n - 1}")
            value += per * (n - 1)
    return " ".join(parts)


def gauge(*segments: tuple[int, float]) -> str:
    """A gauge: ``n`` samples of each value in turn (the last segment gets one more)."""
    parts = [f"{v:g}+0x{n - 1}" for n, v in segments[:-1]]
    n, v = segments[-1]
    return " ".join([*parts, f"{v:g}+0x{n}"])


def requests(model: str, outcome: str, values: str) -> Obj:
    return series("bluegreen_requests_total", {"model": model, "color": "blue", "version": "1", "outcome": outcome,
                                               "cache": "miss"}, values)


def inputs() -> list[Obj]:
    """The 70-minute case (1-minute steps, evaluated at 60 minutes)."""
    s: list[Obj] = []
    # Availability per model, 1,000 answers a minute. Burn rate = error ratio / 0.1%.
    for model, errors in (
            ("fast", counter((70, 20))),                  # burn ~20 everywhere: pages, and the slow burn too
            ("recovered", counter((25, 40), (45, 0))),    # burn 16 over 1 h, but nothing for 35 min: no page
            ("slow", counter((70, 4))),                   # burn 4: a ticket, no page
            ("within", counter((70, 0.5))),               # burn 0.5: nothing
            ("spike", counter((55, 0), (15, 50)))):       # 5 min at burn 48, too short for 1 h and 6 h: no page
        s.append(requests(model, "success", counter((70, 1000))))
        s.append(requests(model, "error", errors))
    # Resources, per process; the limits as the processes export them.
    gib = 2**30
    for pod, cpu_per_min, rss in (("gw-a", 102, 0.88 * gib), ("gw-b", 90, 0.68 * gib)):  # 85% and 75% of 2 cores
        labels = {"job": "gateway", "instance": f"{pod}:8081", "pod": pod}
        s.append(series("process_cpu_seconds_total", labels, counter((70, cpu_per_min))))
        s.append(series("bluegreen_cpu_limit_cores", labels, gauge((70, 2))))
        s.append(series("process_resident_memory_bytes", labels, gauge((70, rss))))
        s.append(series("bluegreen_memory_limit_bytes", labels, gauge((70, gib))))
    # A process of some other job, flat out, with no limit exported: none of our alerts is about it.
    s.append(series("process_cpu_seconds_total", {"job": "other", "instance": "x:9100", "pod": "x"},
                    counter((70, 600))))
    for gpu, util, used in (("0", gauge((70, 0.9)), 70), ("1", gauge((70, 0.7)), 60),
                            ("2", gauge((50, 0.2), (20, 1.0)), 10)):  # 2: busy for 10 min only (the `for`)
        labels = {"job": "model-server", "instance": "ms-a:8000", "pod": "ms-a", "gpu": gpu, "uuid": f"GPU-{gpu}"}
        s.append(series("bluegreen_gpu_utilization_ratio", labels, util))
        s.append(series("bluegreen_gpu_memory_used_bytes", labels, gauge((70, used * gib))))
        s.append(series("bluegreen_gpu_memory_total_bytes", labels, gauge((70, 80 * gib))))
    # Info: m5 promoted 10 minutes ago, m6 long ago; digits/green scaled 2 -> 3 five minutes ago, m2/green
    # 2 -> 1 twenty minutes ago (the notice has ended), digits/blue unchanged.
    for model, since in (("m5", 50), ("m6", 0)):
        promoted = gauge((since, 0), (70 - since, 1)) if since else gauge((70, 1))
        s.append(series("bluegreen_canary_phase", {"model": model, "phase": "promoted", "pod": "a"}, promoted))
    for model, color, values in (("digits", "green", gauge((55, 2), (15, 3))), ("m2", "green", gauge((40, 2), (30, 1))),
                                 ("digits", "blue", gauge((70, 2)))):
        s.append(series("bluegreen_backends", {"model": model, "color": color, "pod": "a"}, values))
    return s


# Models of test_monitoring's series that these alerts see too: "bad" (0.57%) and "ok" (0.38%) burn the budget
# about 4-6 times too fast — a slow burn, short of a page.
EXPECTED = {
    "BluegreenErrorBudgetFastBurn": [{"model": "fast", "severity": "critical"}],
    "BluegreenErrorBudgetSlowBurn": [{"model": m, "severity": "warning"} for m in ("fast", "recovered", "slow",
                                                                                   "bad", "ok")],
    "BluegreenCpuUtilizationHigh": [{"job": "gateway", "instance": "gw-a:8081", "pod": "gw-a", "severity": "warning"}],
    "BluegreenMemoryUtilizationHigh": [{"job": "gateway", "instance": "gw-a:8081", "pod": "gw-a",
                                        "severity": "warning"}],
    "BluegreenGpuUtilizationHigh": [{"job": "model-server", "instance": "ms-a:8000", "pod": "ms-a", "gpu": "0",
                                     "uuid": "GPU-0", "severity": "warning"}],
    "BluegreenGpuMemoryHigh": [{"job": "model-server", "instance": "ms-a:8000", "pod": "ms-a", "gpu": "0",
                                "uuid": "GPU-0", "severity": "warning"}],
    "BluegreenDeploymentCompleted": [{"model": "m5", "severity": "info"}],
    "BluegreenTrafficPatternChange": [],  # no history an hour back yet
    "BluegreenScalingEvent": [{"model": "digits", "color": "green", "severity": "info"}],
}
# Errors above 0.5% over 5 minutes for 5 minutes, per model and color ("spike" is still pending).
EXPECTED_ERROR_RATE = [{"model": "fast", "color": "blue", "severity": "critical"}]


def long_inputs() -> list[Obj]:
    """The 26-hour case (5-minute steps, evaluated at 26 h = step 312; an hour is 12 steps, a day 288)."""
    s: list[Obj] = []
    for model, values in (
            ("steady", counter((320, 600))),                                 # 2 req/s all along
            ("surge", counter((300, 600), (20, 3000))),                      # x5 since 25 h: notifies
            ("daily", counter((12, 600), (24, 3000), (264, 600), (20, 3000))),  # the same hour yesterday: quiet
            ("young", counter((6, 600), (20, 3000), absent=294)),            # x5, no day of history: notifies
            ("drop", counter((300, 3000), (20, 300))),                       # /10: notifies
            ("tiny", counter((300, 3), (20, 30)))):                          # x10 but below 1 req/s: quiet
        s.append(requests(model, "success", values))
    for model, errors in (
            ("old_burn", counter((36, 0), (24, 50), (260, 0))),  # burn 4 over the day, all of it 21-23 h ago
            ("slow_burn", counter((320, 2))),                    # burn 2: the 3-day window's alert
            ("within_long", counter((320, 0.5)))):               # burn 0.5
        s.append(requests(model, "success", counter((320, 1000))))
        s.append(requests(model, "error", errors))
    return s


EXPECTED_LONG = {
    "BluegreenErrorBudgetSlowBurn": [{"model": "slow_burn", "severity": "warning"}],
    "BluegreenTrafficPatternChange": [{"model": m, "severity": "info"} for m in ("surge", "young", "drop")],
}


def bare_rules(tmp_path: Path, interval: str) -> None:
    """The rules without annotations (text for people, which promtool would compare verbatim), every group
    evaluated at the samples' step: a day at 30-second evaluations costs seconds and proves nothing more."""
    groups = rule_groups("overlays/prod")
    bare = [{**g, "interval": interval, "rules": [{k: v for k, v in r.items() if k != "annotations"}
                                                  for r in g["rules"]]} for g in groups]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": bare}, sort_keys=False))


def test_slow_burn_and_traffic_change_over_a_day(tmp_path: Path) -> None:
    bare_rules(tmp_path, "5m")
    alerts = [r["alert"] for r in rules() if "alert" in r]
    test = {"rule_files": ["rules.yml"], "evaluation_interval": "5m", "tests": [{
        "interval": "5m", "input_series": long_inputs(),
        "alert_rule_test": [{"eval_time": "26h", "alertname": name,
                             "exp_alerts": [{"exp_labels": labels} for labels in EXPECTED_LONG.get(name, [])]}
                            for name in alerts]}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    done = promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def _alerts() -> dict[str, dict[str, object]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def test_burn_rate_windows_factors_and_severities_are_the_workbooks() -> None:
    """99.9%: budget 0.001; page on 14.4x over 1 h and 5 min or 6x over 6 h and 30 min, ticket on 3x over 1 d
    and 2 h or 1x over 3 d and 6 h; each window's ratio counts 5xx over answered requests."""
    alerts = _alerts()
    pairs = {"BluegreenErrorBudgetFastBurn": ("critical", [("1h", "5m", 14.4), ("6h", "30m", 6)]),
             "BluegreenErrorBudgetSlowBurn": ("warning", [("1d", "2h", 3), ("3d", "6h", 1)])}
    recorded = {r["record"]: str(r["expr"]) for r in rules() if "record" in r}
    for name, (severity, windows) in pairs.items():
        expr = str(alerts[name]["expr"])
        assert alerts[name]["labels"] == {"severity": severity}, name
        found = re.findall(r"model:bluegreen_requests:error_ratio_rate(\w+) > \(([0-9.]+) \* 0\.001\)", expr)
        assert sorted(found) == sorted((w, f"{factor:g}") for long, short, factor in windows for w in (long, short))
        for long, short, _ in windows:
            for w in (long, short):
                text = recorded[f"model:bluegreen_requests:error_ratio_rate{w}"]
                assert f'bluegreen_requests_total{{outcome="error"}}[{w}]' in text
                assert f'bluegreen_requests_total{{outcome!="cancelled"}}[{w}]' in text
    assert "1 - 0.999" in recorded["model:bluegreen_slo_error_budget:remaining_ratio_30d"]


def test_resource_and_info_alerts_have_the_plans_thresholds_and_severities() -> None:
    alerts = _alerts()
    for name in ("BluegreenCpuUtilizationHigh", "BluegreenMemoryUtilizationHigh", "BluegreenGpuUtilizationHigh",
                 "BluegreenGpuMemoryHigh"):
        assert str(alerts[name]["expr"]).strip().endswith("> 0.8"), name
        assert alerts[name]["labels"] == {"severity": "warning"}, name
    for name in ("BluegreenDeploymentCompleted", "BluegreenTrafficPatternChange", "BluegreenScalingEvent"):
        assert alerts[name]["labels"] == {"severity": "info"}, name
    recorded = {r["record"]: str(r["expr"]) for r in rules() if "record" in r}
    assert "bluegreen_cpu_limit_cores" in recorded["instance:bluegreen_cpu:utilization_ratio_5m"]
    assert "bluegreen_memory_limit_bytes" in recorded["instance:bluegreen_memory:utilization_ratio"]
    traffic = str(alerts["BluegreenTrafficPatternChange"]["expr"])
    assert "> 3" in traffic and "< 1 / 3" in traffic and "offset 1d" in traffic


def test_dashboard_shows_budget_left_burn_rate_and_resources() -> None:
    queries = [q for title, q in panel_queries(dashboard()) if not title.startswith("variable")]
    text = "\n".join(queries)
    assert "model:bluegreen_slo_error_budget:remaining_ratio_30d" in text
    burn = [re.search(r"error_ratio_rate(\w+)\{", q) for q in queries if q.endswith("/ 0.001")]
    assert {m.group(1) for m in burn if m} == {"5m", "1h", "6h", "1d", "3d"}
    for used in ("instance:bluegreen_cpu:utilization_ratio_5m", "instance:bluegreen_memory:utilization_ratio",
                 "instance_gpu:bluegreen_gpu_utilization_ratio:avg10m",
                 "instance_gpu:bluegreen_gpu_memory:utilization_ratio",
                 "instance_model_version:bluegreen_serving_busy:ratio_5m", "process_open_fds", "bluegreen_backends"):
        assert used in text, used
