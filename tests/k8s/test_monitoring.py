"""Monitoring in k8s/: the PrometheusRule's groups pass ``promtool check rules`` and fire exactly at the plan's
thresholds under ``promtool test rules``; the Grafana dashboard holds the panels the issue asks for; and every
metric an alert, a recording rule or a panel uses is one the code exports.

That last check runs against the real thing: the dev overlay's gateway, both model servers (their init
container's build first) and Redis started as their manifests say (hosts moved to loopback, free ports, the
headless Services' names resolved through BLUEGREEN_DISCOVERY_FILE to the local model servers), traffic and
feedback sent through the gateway, their ``/metrics`` read, and a real Prometheus loaded with the rules scraping
them: every selector in the rules and panels must match live series, every rule must evaluate cleanly and every
recording rule must produce a series. It ends with the release gate: ``canary start`` refuses a version
without a validation report, and accepts it once the validation ConfigMap's key is laid out by the init
container's script.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.canary import Phase
from gateway.dataplane import _OUTCOMES
from gateway.settings import COLORS
from tests.k8s.support import (
    TARGETS,
    Obj,
    container,
    env,
    init_container,
    named,
    of_kind,
    port,
    render,
    secret_data,
)
from tests.procs import BLUEGREEN, ROOT, Proc, free_port, wait_ready, wait_until

PROMTOOL = "promtool"
# The release plan's alert thresholds (the issue): alert -> (comparison, threshold, severity).
PLAN = {
    "BluegreenLatencyP95High": (">", 0.150, "critical"),
    "BluegreenErrorRateHigh": (">", 0.005, "critical"),
    "BluegreenCacheHitRatioLow": ("<", 0.7, "warning"),
    "BluegreenModelServerQueueDeep": (">", 100.0, "warning"),
    "BluegreenOnlineAccuracyDrop": (">", 0.03, "warning"),
    "BluegreenOutcomeDrop": ("<", 0.9, "warning"),
    "BluegreenCpuUtilizationHigh": (">", 0.8, "warning"),
    "BluegreenMemoryUtilizationHigh": (">", 0.8, "warning"),
    "BluegreenGpuUtilizationHigh": (">", 0.8, "warning"),
    "BluegreenGpuMemoryHigh": (">", 0.8, "warning"),
}
# Label values the code produces (docs/configuration.md "Telemetry"; outcomes from the data plane, phases from
# the canary).
LABEL_VALUES: dict[str, set[str]] = {
    "outcome": {*_OUTCOMES.values(), "cancelled"},
    "result": {"hit", "miss", "stale", "bypass"},
    "phase": {p.value for p in Phase},
    "color": set(COLORS),
}
# Metrics whose label of the same name takes other values: the notifications' outcomes (gateway/notify.py).
METRIC_LABEL_VALUES: dict[str, dict[str, set[str]]] = {
    "bluegreen_notifications_total": {"outcome": {"delivered", "retried", "failed", "dropped"}},
}
# Labels that Prometheus and the ServiceMonitors add to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}


def rule_groups(target: str) -> list[Obj]:
    (rule,) = of_kind(render(target), "PrometheusRule")
    groups: list[Obj] = rule["spec"]["groups"]
    return groups


def rules(target: str = "overlays/prod") -> list[Obj]:
    return [r for g in rule_groups(target) for r in g["rules"]]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    import shutil

    if shutil.which(PROMTOOL) is None:  # never a skip: CI must check the rules
        pytest.fail("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def dashboard(target: str = "overlays/prod") -> Obj:
    cm = named(render(target), "ConfigMap", "bluegreen-dashboard")
    doc: Obj = json.loads(cm["data"]["bluegreen.json"])
    return doc


def panel_queries(dash: Obj) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, and the model variable's label_values query."""
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert m, var["query"]
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def concrete(expr: str) -> str:
    """A panel query with Grafana's variables filled in."""
    return expr.replace("$__rate_interval", "1m").replace("$model", "digits")


_SELECTOR = re.compile(r'"(?:[^"\\]|\\.)*"|([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{(?:[^}"]|"(?:[^"\\]|\\.)*")*\})?')
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def selectors(expr: str) -> list[tuple[str, str]]:
    """The metric selectors of a PromQL expression: (metric name, ``{matchers}`` or ""). Metric names are the
    project's (``bluegreen_*``), the process collector's (``process_*``) and recorded ones (with a colon);
    functions, keywords and labels are neither."""
    found = []
    for m in _SELECTOR.finditer(expr):
        name = m.group(1)
        if name and (name.startswith(("bluegreen_", "process_")) or ":" in name):
            found.append((name, m.group(2) or ""))
    return found


# ------------------------------------------------------------------------------------------ rules


@pytest.mark.parametrize("target", TARGETS)
def test_alert_rules_pass_promtool_check_rules(target: str, tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule_groups(target)}, sort_keys=False))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_alert_thresholds_and_severities_are_the_plans() -> None:
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert set(PLAN) <= set(alerts)
    for name, (op, threshold, severity) in PLAN.items():
        m = re.search(r"(>|<|>=|<=)\s*([0-9.]+)\s*$", alerts[name]["expr"].strip())
        assert m, f"{name}: the threshold must end the expression"
        assert (m.group(1), float(m.group(2))) == (op, threshold), name
        assert alerts[name]["labels"]["severity"] == severity, name
    # What each threshold is compared with.
    recorded = {r["record"]: r["expr"] for r in rules() if "record" in r}

    def source(alert: str) -> str:
        expr: str = alerts[alert]["expr"]
        for name, text in recorded.items():
            expr = expr.replace(name, f"({text})")
        return expr

    assert "histogram_quantile(0.95" in source("BluegreenLatencyP95High")
    assert "bluegreen_request_duration_seconds_bucket" in source("BluegreenLatencyP95High")
    assert 'bluegreen_requests_total{outcome="error"}' in source("BluegreenErrorRateHigh")
    assert 'bluegreen_cache_requests_total{result="hit"}' in source("BluegreenCacheHitRatioLow")
    assert "bluegreen_serving_queue_depth" in source("BluegreenModelServerQueueDeep")
    assert "bluegreen_online_accuracy_ratio" in source("BluegreenOnlineAccuracyDrop")
    assert "bluegreen_outcome_rate" in source("BluegreenOutcomeDrop")
    for alert in alerts.values():
        assert alert["annotations"]["runbook_url"] == f"docs/operations.md#{alert['alert'].lower()}"


def series(name: str, labels: dict[str, str], values: str) -> Obj:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def counter(per_minute: float) -> str:
    return f"0+{per_minute}x70"


def gauge(value: float) -> str:
    return f"{value}+0x70"


def alert_test_inputs() -> list[Obj]:
    s: list[Obj] = []
    # p95: all of "slow" in (0.15, 0.2] -> p95 0.1975; all of "fast" in (0.12, 0.15] -> p95 0.1485.
    for model, bucket in (("slow", "0.2"), ("fast", "0.15")):
        for le in ("0.1", "0.12", "0.15", "0.2", "+Inf"):
            filled = float(le) >= float(bucket) if le != "+Inf" else True
            s.append(series("bluegreen_request_duration_seconds_bucket",
                            {"model": model, "color": "green", "version": "2", "outcome": "success", "cache": "miss",
                             "le": le}, counter(100 if filled else 0)))
    # Errors: 6 in 1006 (0.60%) fires, 4 in 1004 (0.40%) does not; client errors and cancellations do not count.
    for model, errors in (("bad", 6), ("ok", 4)):
        for outcome, n in (("success", 1000), ("error", errors), ("client_error", 50), ("cancelled", 50)):
            s.append(series("bluegreen_requests_total", {"model": model, "color": "green", "version": "2",
                                                         "outcome": outcome, "cache": "miss"}, counter(n)))
    # Cache: 69% fires, 71% does not, bypasses do not count, nothing but misses is 0%.
    for model, counts in (("cold", {"hit": 69, "miss": 31}), ("warm", {"hit": 71, "miss": 29}),
                          ("opted_out", {"hit": 71, "miss": 29, "bypass": 1000}), ("empty", {"miss": 100})):
        for result, n in counts.items():
            s.append(series("bluegreen_cache_requests_total", {"model": model, "color": "blue", "result": result},
                            counter(n)))
    # Queue depth: 101 fires, 100 does not.
    for pod, depth in (("a", 101), ("b", 100)):
        s.append(series("bluegreen_serving_queue_depth", {"model": "digits", "version": "1", "pod": pod,
                                                           "color": "blue"}, gauge(depth)))
    # Online accuracy, per gateway replica (pods a, b): the stable color is the heavier one.
    for model, weights, accuracy in (
            ("digits", {"blue": 75, "green": 25}, {"blue": (0.96, 0.94), "green": (0.91, 0.91)}),  # 4 points: fires
            ("m2", {"blue": 75, "green": 25}, {"blue": (0.95, 0.95), "green": (0.93, 0.93)}),      # 2 points: no
            ("m3", {"blue": 100, "green": 0}, {"blue": (0.95, 0.95), "green": (0.5, 0.5)}),        # no traffic: no
            ("m4", {"blue": 10, "green": 90}, {"blue": (0.90, 0.90), "green": (0.95, 0.95)})):     # blue released
        for color in COLORS:
            for pod, value in zip(("a", "b"), accuracy[color], strict=True):
                s.append(series("bluegreen_split_weight", {"model": model, "color": color, "pod": pod},
                                gauge(weights[color])))
                s.append(series("bluegreen_online_accuracy_ratio", {"model": model, "color": color, "pod": pod},
                                gauge(value)))
    # Outcome rate (conversions), per gateway replica: ratios to the heavier color's 0.85 fires, 0.93 does not.
    for model, weights, rate in (
            ("shop", {"blue": 75, "green": 25}, {"blue": (0.10, 0.10), "green": (0.086, 0.084)}),  # 15% below
            ("shop2", {"blue": 75, "green": 25}, {"blue": (0.10, 0.10), "green": (0.093, 0.093)}),  # 7%: no
            ("shop3", {"blue": 100, "green": 0}, {"blue": (0.10, 0.10), "green": (0.01, 0.01)}),    # no traffic
            ("shop4", {"blue": 10, "green": 90}, {"blue": (0.08, 0.08), "green": (0.10, 0.10)})):   # blue new
        for color in COLORS:
            for pod, value in zip(("a", "b"), rate[color], strict=True):
                s.append(series("bluegreen_split_weight", {"model": model, "color": color, "pod": pod},
                                gauge(weights[color])))
                s.append(series("bluegreen_outcome_rate", {"model": model, "color": color,
                                                           "version": "2" if color == "green" else "1", "pod": pod},
                                gauge(value)))
    for backend, state in (("http://10.0.0.1:8000", 2), ("http://10.0.0.2:8000", 1)):
        s.append(series("bluegreen_breaker_state", {"model": "digits", "color": "green", "backend": backend,
                                                    "pod": "a"}, gauge(state)))
    # Refused credentials, per gateway pod: the data listener jumps from 6/min to 300/min over the last 15
    # minutes (fires); the admin listener refuses 300/min all along (no spike: the hour before was the same);
    # rate limits alone never fire.
    s.append(series("bluegreen_auth_failures_total", {"listener": "data", "reason": "unknown", "pod": "a"},
                    "0+6x45 270+300x25"))
    s.append(series("bluegreen_auth_failures_total", {"listener": "admin", "reason": "missing", "pod": "a"},
                    counter(300)))
    s.append(series("bluegreen_auth_failures_total", {"listener": "data", "reason": "rate_limited", "pod": "b"},
                    "0+0x45 0+6000x25"))
    for model, current in (("digits", "rolled_back"), ("m2", "progressing")):
        for phase in Phase:
            s.append(series("bluegreen_canary_phase", {"model": model, "phase": phase.value, "pod": "a"},
                            gauge(1 if phase.value == current else 0)))
    # Input drift per color (gateway/drift.py): green's inputs 0.3 from the reference fire, blue's 0.2 do not.
    for color, value in (("green", 0.3), ("blue", 0.2)):
        s.append(series("bluegreen_input_drift", {"model": "digits", "color": color, "pod": "a"}, gauge(value)))
    # Notifications: "down" gives 3 events up at minute 51 (fires); "late" drops one at minute 50 in a series that
    # the drop created (fires: increase() alone cannot see a series' first value); "ok" only delivers and retries
    # now, its one failure at minute 11 is older than the window (does not fire).
    for sink, outcome, values in (("down", "failed", "0+0x50 3+0x20"), ("down", "delivered", counter(2)),
                                  ("late", "dropped", "_x50 1+0x20"), ("ok", "delivered", counter(10)),
                                  ("ok", "retried", counter(3)), ("ok", "failed", "0+0x10 1+0x60")):
        s.append(series("bluegreen_notifications_total", {"sink": sink, "event": "bluegreen.rollout.advanced",
                                                          "outcome": outcome, "pod": "a"}, values))
    # The SLO, resource and info alerts' series (imported here: that module imports this one).
    from tests.k8s.test_slo_resource_alerts import inputs

    return s + inputs()


EXPECTED_ALERTS = {
    "BluegreenLatencyP95High": [{"model": "slow", "color": "green", "severity": "critical"}],
    "BluegreenErrorRateHigh": [{"model": "bad", "color": "green", "severity": "critical"}],
    "BluegreenCacheHitRatioLow": [{"model": "cold", "severity": "warning"}, {"model": "empty", "severity": "warning"}],
    "BluegreenModelServerQueueDeep": [{"model": "digits", "version": "1", "pod": "a", "color": "blue",
                                       "severity": "warning"}],
    "BluegreenOnlineAccuracyDrop": [{"model": "digits", "color": "green", "severity": "warning"},
                                    {"model": "m4", "color": "blue", "severity": "warning"}],
    "BluegreenBreakerOpen": [{"model": "digits", "color": "green", "backend": "http://10.0.0.1:8000",
                              "severity": "warning"}],
    "BluegreenCanaryRolledBack": [{"model": "digits", "severity": "warning"}],
    "BluegreenOutcomeDrop": [{"model": "shop", "color": "green", "severity": "warning"},
                             {"model": "shop4", "color": "blue", "severity": "warning"}],
    "BluegreenAuthFailureSpike": [{"listener": "data", "severity": "warning"}],
    "BluegreenInputDrift": [{"model": "digits", "color": "green", "severity": "warning"}],
    "BluegreenNotificationsFailing": [{"sink": "down", "severity": "warning"}, {"sink": "late", "severity": "warning"}],
}


def test_alerts_fire_at_the_thresholds_and_not_below(tmp_path: Path) -> None:
    """``promtool test rules`` over synthetic series on both sides of every threshold. The annotations are
    left out of the copy under test (they are text for people; promtool would compare them verbatim)."""
    groups = rule_groups("overlays/prod")
    bare = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in groups]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": bare}, sort_keys=False))
    from tests.k8s.test_slo_resource_alerts import EXPECTED, EXPECTED_ERROR_RATE

    expected = {**EXPECTED_ALERTS, **EXPECTED}
    expected["BluegreenErrorRateHigh"] = expected["BluegreenErrorRateHigh"] + EXPECTED_ERROR_RATE
    alerts = [r["alert"] for r in rules() if "alert" in r]
    assert set(alerts) == set(expected)
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": alert_test_inputs(),
            "alert_rule_test": [{"eval_time": "60m", "alertname": name,
                                 "exp_alerts": [{"exp_labels": labels} for labels in expected[name]]}
                                for name in alerts],
        }],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    done = promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_has_latency_per_color_split_breakers_and_canary() -> None:
    cm = named(render("overlays/prod"), "ConfigMap", "bluegreen-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["name"] == "bluegreen-dashboard", "a fixed name: an update replaces the dashboard"
    dash = dashboard()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"]
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    assert [v["name"] for v in dash["templating"]["list"]] == ["datasource", "model"]
    queries = panel_queries(dash)
    latency = [q for _, q in queries if "bluegreen_request_duration_seconds_bucket" in q]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(q.startswith(f"histogram_quantile({quantile}, sum by (color, le)") for q in latency), quantile
    for metric in ("bluegreen_split_weight", "bluegreen_breaker_state", "bluegreen_canary_stage",
                   "bluegreen_canary_phase"):
        assert any(metric in q for _, q in queries if not _.startswith("variable")), metric


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel query (variables filled in) as the expression of a recording rule."""
    queries = panel_queries(dashboard())
    group = {"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": concrete(q)}
                                            for i, (_, q) in enumerate(queries)]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [group]}))
    done = promtool("check", "rules", str(tmp_path / "dashboard.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_runbook_section() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for r in rules():
        if "alert" in r:
            assert r["alert"].lower() in headings, f"docs/operations.md has no section {r['alert']}"


# ------------------------------------------------------------------------------------------ the live stack


@dataclass
class Stack:
    data: str
    admin: str
    models: dict[str, str]
    token: str
    validation_reports: Path
    validation_repo: Path
    init_script: list[str]
    prometheus: str
    #: One connection to Prometheus for the hundreds of queries the tests make (a client per query costs ~0.1 s).
    prometheus_client: httpx.Client | None = None

    def headers(self) -> dict[str, str]:
        """The token, and ``If-Match: *``: these writes race no one (without If-Match the gateway says 428)."""
        return {"authorization": f"Bearer {self.token}", "if-match": "*"}


def _manifest_env(c: Obj, objs: tuple[Obj, ...], **changes: str) -> dict[str, str]:
    values = env(c, objs)
    for k, v in changes.items():
        assert k in values or k == "BLUEGREEN_DISCOVERY_FILE", f"the manifest does not set {k}"
        values[k] = v
    return values


def _start_redis(objs: tuple[Obj, ...], tmp: Path) -> tuple[Proc, int]:
    c = container(named(objs, "StatefulSet", "bluegreen-redis"), "redis")
    cm = named(objs, "ConfigMap", "bluegreen-redis-config")
    etc, data = tmp / "redis-etc", tmp / "redis-data"
    etc.mkdir()
    data.mkdir()
    for key, text in cm["data"].items():
        (etc / key).write_text(text.replace("/etc/redis", str(etc)).replace("dir /data", f"dir {data}"))
    values = env(c, objs)
    args = [a.replace("/etc/redis", str(etc)).replace("$(REDIS_PASSWORD)", values["REDIS_PASSWORD"]) for a in c["args"]]
    p = free_port()
    proc = Proc([*c["command"], *args, "--port", str(p), "--bind", "127.0.0.1"], tmp / "redis.log")

    def up() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(proc.log())
        try:
            with redis.Redis(host="127.0.0.1", port=p, password=values["REDIS_PASSWORD"], socket_timeout=1) as r:
                return bool(r.ping())
        except redis.RedisError:
            return False

    wait_until(up, 10, what="redis-server")
    return proc, p


def _start_model_server(objs: tuple[Obj, ...], name: str, tmp: Path) -> tuple[Proc, str]:
    """The init container's command, then the main container's, with the emptyDir at a local folder."""
    w = named(objs, "Deployment", name)
    c, init = container(w, "model-server"), init_container(w, "build-models")
    repo = tmp / f"{name}-models"
    build = [a.replace("/models", str(repo)) for a in init["args"]]
    done = subprocess.run([*BLUEGREEN, *build], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    p = free_port()
    values = _manifest_env(c, objs, BLUEGREEN_SERVING_HOST="127.0.0.1", BLUEGREEN_SERVING_PORT=str(p),
                           BLUEGREEN_SERVING_REPO=str(repo))
    assert port(c, "http") == 8000
    proc = Proc([*BLUEGREEN, *c["args"]], tmp / f"{name}.log", values)
    url = f"http://127.0.0.1:{p}"
    wait_ready(proc, f"{url}/v2/health/ready")
    return proc, url


def _prometheus(tmp: Path, rule_groups_: list[Obj], admin: str, models: dict[str, str]) -> tuple[Proc, str]:
    import shutil

    exe = shutil.which("prometheus")
    if exe is None:  # never a skip
        pytest.fail("prometheus is not installed (Debian package prometheus)")
    fast = [{**g, "interval": "1s"} for g in rule_groups_]
    (tmp / "rules.yml").write_text(yaml.safe_dump({"groups": fast}, sort_keys=False))
    # The model servers' targets carry the color as the ServiceMonitor's relabeling puts it.
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(tmp / "rules.yml")],
              "scrape_configs": [
                  {"job_name": "gateway", "static_configs": [{"targets": [urlsplit(admin).netloc],
                                                              "labels": {"pod": "gateway-0"}}]},
                  {"job_name": "model-server", "static_configs": [
                      {"targets": [urlsplit(url).netloc], "labels": {"color": color, "pod": f"{color}-0"}}
                      for color, url in models.items()]}]}
    (tmp / "prometheus.yml").write_text(json.dumps(config))
    p = free_port()
    proc = Proc([exe, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{p}", "--log.level=warn"], tmp / "prometheus.log")
    url = f"http://127.0.0.1:{p}"
    wait_ready(proc, f"{url}/-/ready", timeout=30)
    return proc, url


def _traffic(stack: Stack, rounds: int) -> None:
    """Predictions (new inputs: misses; repeated ones: hits), feedback (a label and an outcome) for each, and a
    few requests whose deadline cannot be met (server-side errors), all through the gateway's data port; and one
    admin request with a wrong token (a refused credential for the security alert's counter)."""
    refused = httpx.get(f"{stack.admin}/admin/v1/models/digits/split", timeout=10,
                        headers={"authorization": "Bearer not-a-token-of-this-gateway"})
    assert refused.status_code == 401, refused.text
    with httpx.Client(base_url=stack.data, timeout=10) as client:
        for i in range(rounds):
            row = [float((i * 7 + j) % 17) for j in range(64)]
            for repeat in range(2):
                rid = f"r{i}-{repeat}-{time.monotonic_ns()}"
                body = {"id": rid, "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row}]}
                r = client.post("/v2/models/digits/infer", content=orjson.dumps(body),
                                headers={"x-bluegreen-key": rid})
                assert r.status_code == 200, r.text
                f = client.post("/feedback/v1/models/digits", content=orjson.dumps(
                    {"id": rid, "label": i % 10, "outcome": i % 2}))  # a label and a conversion
                assert f.status_code == 200, f.text
        for _ in range(2):
            r = client.post("/v2/models/digits/infer", content=orjson.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [3.0] * 64}]}),
                headers={"x-bluegreen-timeout-ms": "0.001", "cache-control": "no-cache, no-store"})
            assert r.status_code >= 500, r.text


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    objs = render("overlays/dev")
    tmp = tmp_path_factory.mktemp("k8s-dev")
    procs: list[Proc] = []
    clients: list[httpx.Client] = []
    try:
        redis_proc, redis_port = _start_redis(objs, tmp)
        procs.append(redis_proc)
        models = {}
        for color in COLORS:
            proc, url = _start_model_server(objs, f"bluegreen-model-{color}", tmp)
            procs.append(proc)
            models[color] = url
        gw = named(objs, "Deployment", "bluegreen-gateway")
        c, init = container(gw, "gateway"), init_container(gw, "validation-reports")
        # The gateway's files: the routing ConfigMap (shadow traffic turned on in this copy, so that every gauge
        # has a series), the tokens Secret, and the validation reports laid out by the init container's script.
        routing = yaml.safe_load(named(objs, "ConfigMap", "bluegreen-routing")["data"]["routing.yaml"])
        routing["models"]["digits"]["shadow_percent"] = 100
        # A notification sink where nothing listens, given up at once: the split set below is its failed event.
        routing["notifications"] = [{"url": f"http://127.0.0.1:{free_port()}/hook", "name": "nowhere",
                                     "retry_for_s": 0.1}]
        (tmp / "routing.yaml").write_text(yaml.safe_dump(routing))
        (tmp / "tokens.yaml").write_text(secret_data(objs, "bluegreen-admin-tokens")["tokens.yaml"])
        reports, repo = tmp / "validation-reports", tmp / "validation"
        reports.mkdir()
        repo.mkdir()
        for key, value in named(objs, "ConfigMap", "bluegreen-validation")["data"].items():
            (reports / key).write_text(value)
        script = init["command"][:4]
        done = subprocess.run([*script, str(reports), str(repo)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        # Cluster DNS for the headless Services: each name resolves to its color's (one) model server.
        dns = {urlsplit(b.removeprefix("dns+")).hostname: [urlsplit(models[color]).netloc]
               for color in COLORS for b in routing["models"]["digits"]["colors"][color]["backends"]}
        (tmp / "dns.json").write_text(json.dumps(dns))
        values = env(c, objs)
        redis_url = urlsplit(values["BLUEGREEN_REDIS_URL"])
        assert (redis_url.hostname, redis_url.port) == ("bluegreen-redis", 6379)
        local_redis = urlunsplit(redis_url._replace(netloc=f":{redis_url.password}@127.0.0.1:{redis_port}"))
        data_port, admin_port = free_port(), free_port()
        gw_env = _manifest_env(
            c, objs, BLUEGREEN_CONFIG=str(tmp / "routing.yaml"), BLUEGREEN_DATA__HOST="127.0.0.1",
            BLUEGREEN_DATA__PORT=str(data_port), BLUEGREEN_ADMIN__HOST="127.0.0.1",
            BLUEGREEN_ADMIN__PORT=str(admin_port), BLUEGREEN_ADMIN_TOKENS_FILE=str(tmp / "tokens.yaml"),
            BLUEGREEN_REDIS_URL=local_redis, BLUEGREEN_VALIDATION_REPO=str(repo),
            BLUEGREEN_DISCOVERY_FILE=str(tmp / "dns.json"))
        # Input drift against the blue server's built holdouts, every request sampled, reported from 10 rows: the
        # manifests give the gateway no model repository, so this copy points it at one (the drift gauge is live).
        gw_env.update(BLUEGREEN_DRIFT__REFERENCE_REPO=str(tmp / "bluegreen-model-blue-models"),
                      BLUEGREEN_DRIFT__SAMPLE_PERCENT="100", BLUEGREEN_DRIFT__MIN_ROWS="10")
        gateway = Proc([*BLUEGREEN, *c["args"]], tmp / "gateway.log", gw_env)
        procs.append(gateway)
        data, admin = f"http://127.0.0.1:{data_port}", f"http://127.0.0.1:{admin_port}"
        wait_ready(gateway, f"{data}/v2/health/ready", timeout=30)
        token = yaml.safe_load((tmp / "tokens.yaml").read_text())["dev"]
        stack = Stack(data, admin, models, token, reports, repo, script, "")
        # Both colors carry traffic (the operator's way: the admin API with the ETag), so both get feedback.
        with httpx.Client(base_url=admin, headers=stack.headers(), timeout=10) as client:
            split = client.get("/admin/v1/models/digits/split")
            r = client.put("/admin/v1/models/digits/split", json={"blue": 50, "green": 50},
                           headers={"if-match": split.headers["etag"]})
            assert r.status_code == 200, r.text
        wait_until(lambda: httpx.get(f"{data}/v2/models/digits/ready", timeout=5).status_code == 200, 30,
                   what="the gateway to reach both colors")
        _traffic(stack, 30)
        prom, prom_url = _prometheus(tmp, rule_groups("overlays/dev"), admin, models)
        procs.append(prom)
        stack.prometheus = prom_url
        stack.prometheus_client = httpx.Client(base_url=prom_url, timeout=10)
        clients.append(stack.prometheus_client)
        _traffic(stack, 15)  # counters move while Prometheus scrapes, so rates are not all zero
        yield stack
    finally:
        for client in clients:
            client.close()
        for proc in reversed(procs):
            proc.stop()


def _scrape(url: str) -> dict[str, set[str]]:
    """Sample name -> label names, from a real /metrics exposition."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(family.name, set())
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def _all_queries() -> list[tuple[str, str]]:
    return [(r.get("alert") or r["record"], r["expr"]) for r in rules("overlays/dev")] + \
        [(title, concrete(q)) for title, q in panel_queries(dashboard("overlays/dev"))]


def test_every_metric_the_rules_and_dashboard_use_is_exported(stack: Stack) -> None:
    exported = _scrape(stack.admin)
    serving = _scrape(stack.models["blue"])
    assert "bluegreen_serving_queue_depth" in serving and "bluegreen_request_duration_seconds_bucket" in exported
    labels = {**{k: v | TARGET_LABELS for k, v in exported.items()},
              **{k: v | TARGET_LABELS | {"color"} for k, v in serving.items()}}
    recorded = {r["record"] for r in rules("overlays/dev") if "record" in r}
    used = set()
    for where, expr in _all_queries():
        for name, matchers in selectors(expr):
            used.add(name)
            if ":" in name:
                assert name in recorded, f"{where}: {name} is recorded by no rule"
                continue
            assert name in labels, f"{where}: {name} is not exported by the gateway or the model server"
            for label, op, value in _MATCHER.findall(matchers):
                assert label in labels[name], f"{where}: {name} has no label {label!r}"
                known = METRIC_LABEL_VALUES.get(name, {}).get(label) or LABEL_VALUES.get(label)
                if known is not None:
                    wanted = set(value.split("|")) if "~" in op else {value}
                    assert wanted <= known, f"{where}: {label}{op}{value!r} matches no value"
    for metric in ("bluegreen_request_duration_seconds_bucket", "bluegreen_requests_total",
                   "bluegreen_cache_requests_total", "bluegreen_breaker_state", "bluegreen_split_weight",
                   "bluegreen_canary_stage", "bluegreen_canary_phase", "bluegreen_online_accuracy_ratio",
                   "bluegreen_serving_queue_depth", "process_cpu_seconds_total", "process_resident_memory_bytes",
                   "process_open_fds", "bluegreen_cpu_limit_cores", "bluegreen_memory_limit_bytes",
                   "bluegreen_gpu_utilization_ratio", "bluegreen_gpu_memory_used_bytes",
                   "bluegreen_serving_busy_seconds_total", "bluegreen_backends", "bluegreen_notifications_total"):
        assert metric in used, f"nothing uses {metric}"


def _query(stack: Stack, expr: str) -> list[Obj]:
    assert stack.prometheus_client is not None
    r = stack.prometheus_client.get("/api/v1/query", params={"query": expr})
    assert r.status_code == 200 and r.json()["status"] == "success", f"{expr}: {r.text}"
    result: list[Obj] = r.json()["data"]["result"]
    return result


def gpus_here() -> int:
    """GPUs NVML sees on this machine: 0 without the binding, the driver or a device."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError or an NVMLError: no NVML here
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def _needs_gpu(expr: str) -> bool:
    return any("gpu" in name for name, _ in selectors(expr))


def _needs_history(expr: str) -> bool:
    """Rules that compare with an hour or a day earlier: a Prometheus started for the test has no such past."""
    return re.search(r"offset \d+[hd]", expr) is not None


def test_rules_and_panels_select_live_series_in_a_real_prometheus(stack: Stack) -> None:
    """Every selector in the rules and panels matches series a real Prometheus scraped from the running stack,
    every rule evaluates without error, and every recording rule has produced a series — except, on a machine
    without a GPU, those of GPU metrics (absent there, by design), and those that need an hour of history."""
    gpu = gpus_here() > 0
    historic = {r["record"] for r in rules("overlays/dev") if "record" in r and _needs_history(r["expr"])}
    recorded = [r["record"] for r in rules("overlays/dev") if "record" in r and r["record"] not in historic
                and (gpu or not _needs_gpu(r["expr"]))]
    wait_until(lambda: all(_query(stack, name) for name in recorded), 60, interval=0.5,
               what="every recording rule to produce a series")
    missing, seen = [], set()
    for where, expr in _all_queries():
        _query(stack, expr)  # valid against the live server
        for name, matchers in selectors(expr):
            if name in historic or (_needs_gpu(name) and not gpu) or (name, matchers) in seen:
                continue
            seen.add((name, matchers))
            if not _query(stack, f"count(last_over_time({name}{matchers}[10m]))"):
                missing.append(f"{where}: {name}{matchers}")
    assert not missing, f"selectors that match no live series: {missing}"
    groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
    assert not unhealthy
    assert sum(len(g["rules"]) for g in groups) == len(rules("overlays/dev"))
    # The alert inputs are live too: a p95 per color, and an accuracy per color with the stable one's.
    assert {s["metric"]["color"] for s in _query(stack, "model_color:bluegreen_request_duration_seconds:p95_5m")} == \
        set(COLORS)
    assert _query(stack, "model:bluegreen_online_accuracy_ratio:stable")


def test_canary_start_is_gated_by_the_validation_configmap(stack: Stack) -> None:
    """BLUEGREEN_VALIDATION_REPO as the manifests wire it: no report for green's version, no canary; a
    passing report added as a ConfigMap key and laid out by the init container's script, and it starts."""
    with httpx.Client(base_url=stack.admin, headers=stack.headers(), timeout=10) as client:
        refused = client.post("/admin/v1/models/digits/canary/start", json={"candidate": "green"})
        assert refused.status_code == 409 and "validation" in refused.text, refused.text
        (stack.validation_reports / "digits--2.json").write_bytes(orjson.dumps(
            {"model": "digits", "version": "2", "passed": True, "checks": []}))
        done = subprocess.run([*stack.init_script, str(stack.validation_reports), str(stack.validation_repo)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        started = client.post("/admin/v1/models/digits/canary/start", json={"candidate": "green"})
        assert started.status_code == 200, started.text
        assert client.get("/admin/v1/models/digits/canary").json()["phase"] == "progressing"


def test_process_batcher_and_backend_series_are_scraped_and_gpu_ones_only_with_a_gpu(stack: Stack) -> None:
    """Prometheus holds each process's CPU, memory and file descriptors with its limits, the batcher's busy
    time, and the gateway's backends per color; GPU series exist exactly when this machine has a GPU — none on
    a CPU-only one, whose model servers are scraped without error all the same."""
    for job in ("gateway", "model-server"):
        for metric in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                       "bluegreen_cpu_limit_cores", "bluegreen_memory_limit_bytes"):
            found = _query(stack, f'{metric}{{job="{job}"}}')
            assert found and all(float(s["value"][1]) > 0 for s in found), (job, metric)
    limits = _query(stack, 'instance:bluegreen_memory:utilization_ratio{job="model-server"}')
    assert limits and all(0 < float(s["value"][1]) < 1 for s in limits)
    busy = _query(stack, "bluegreen_serving_busy_seconds_total")
    assert {s["metric"]["color"] for s in busy} == set(COLORS) and all(float(s["value"][1]) > 0 for s in busy)
    assert {(s["metric"]["color"], s["value"][1]) for s in _query(stack, 'bluegreen_backends{model="digits"}')} == \
        {(c, "1") for c in COLORS}
    assert {s["value"][1] for s in _query(stack, "up")} == {"1"}
    gpus = gpus_here()
    for metric in ("bluegreen_gpu_utilization_ratio", "bluegreen_gpu_memory_used_bytes"):
        per_server = {s["metric"]["color"] for s in _query(stack, metric)}
        assert per_server == (set(COLORS) if gpus else set()), metric
    for color, url in stack.models.items():
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert ("bluegreen_gpu_utilization_ratio{" in text) == bool(gpus), color
