"""The gateway suite's variants: the ABBA helpers, the sink that never answers, the notification runs' report.

No wrk and no gateway run here: a benchmark is not a timed test.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests.bench import report, servers, steps, variants
from loadtests.bench.suites import gateway
from tests.loadtests.test_bench import gateway_doc


def _run(n: int, target: str, rps: float, cpu: float, p99: float, **extra: Any) -> dict[str, Any]:
    return {"round": n, "target": target, "requests_per_s": rps, "latency_ms": {"p50": 5.0, "p99": p99},
            "non_2xx": 0, "flagged": False, "proxy_cpu_us_per_request": cpu, **extra}


def notify_doc() -> dict[str, Any]:
    runs = [_run(1, "gateway", 3000.0, 200.0, 30.0, admin_writes=140, admin_writes_per_s=19.9),
            _run(2, "notify", 2990.0, 203.0, 31.0, admin_writes=139, admin_writes_per_s=19.8,
                 notifications={"dropped": 238}),
            _run(3, "notify", 2970.0, 205.0, 33.0, admin_writes=140, admin_writes_per_s=19.9,
                 notifications={"dropped": 378}),
            _run(4, "gateway", 2960.0, 210.0, 32.0, admin_writes=141, admin_writes_per_s=20.0)]
    return {"runs": runs, "queue_size": 1000, "prefill_writes": 1100, "after_prefill": {"dropped": 99},
            "final": {"dropped": 378}, "receiver_connections": 2, "write_interval_s": 0.05, "timeout_s": 5.0}


def test_the_hung_receiver_accepts_never_answers_and_closes_what_it_holds() -> None:
    with variants.hung_receiver() as receiver:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(receiver.url, json={"a": 1}, timeout=httpx.Timeout(0.3))
        assert receiver.accepted == 1
        port = int(receiver.url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
        pass  # closed at the end: nothing listens any more


def test_variant_runs_enter_around_each_run_and_keep_what_it_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    seen: list[tuple[str, str]] = []

    def saturate(n: int, target: str, url: str, script: Path, duration_s: int, processes: Any) -> dict[str, Any]:
        seen.append((target, url))
        return {"round": n, "target": target, "requests": 1000, "cpu_s": {"proxy": 0.2}}

    @contextlib.contextmanager
    def around(proxy: servers.ServerProcess) -> Any:
        extra: dict[str, Any] = {}
        yield extra
        extra["proxy_name"] = proxy.name

    monkeypatch.setattr(steps, "saturate", saturate)
    plain = servers.ServerProcess("gateway", [], Path("g.log"), None, url="http://127.0.0.1:1")  # type: ignore[arg-type]
    other = servers.ServerProcess("gateway-notify", [], Path("n.log"), None, url="http://127.0.0.1:2")  # type: ignore[arg-type]
    runs = variants.variant_runs(variants.NOTIFY_ORDER, plain, plain, other, "http://127.0.0.1:1/v2/x",
                                 Path("a.lua"), Path("a.lua"), 5, around=around)
    assert [r["proxy_name"] for r in runs] == ["gateway", "gateway-notify", "gateway-notify", "gateway"]
    assert seen[1] == ("notify", "http://127.0.0.1:2/v2/x")
    assert runs[0]["proxy_cpu_us_per_request"] == pytest.approx(200.0)


def test_notification_counts_sum_the_outcomes_over_sinks_and_events(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "\n".join(["# TYPE bluegreen_notifications_total counter",
                      'bluegreen_notifications_total{event="bluegreen.weights.changed",outcome="dropped",sink="a"} 7.0',
                      'bluegreen_notifications_total{event="bluegreen.breaker.opened",outcome="dropped",sink="a"} 2.0',
                      'bluegreen_notifications_total{event="bluegreen.weights.changed",outcome="retried",sink="a"} 1.0',
                      "bluegreen_in_flight_requests 3"])
    monkeypatch.setattr(servers, "admin_get", lambda proxy, path: httpx.Response(200, text=text))
    assert variants.notification_counts(None) == {"dropped": 9, "retried": 1}  # type: ignore[arg-type]


def test_notify_summary_compares_the_difference_with_the_plain_runs_spread() -> None:
    s = variants.notify_summary(notify_doc()["runs"])
    assert s["requests_per_s"] == {"plain": 2980.0, "notify": 2980.0, "difference": 0.0, "plain_spread": 40.0,
                                   "within_noise": True}
    assert s["cpu_us_per_request"]["difference"] == pytest.approx(-1.0)
    assert s["p99_ms"]["difference"] == pytest.approx(1.0) and s["p99_ms"]["plain_spread"] == 2.0
    wide = variants.notify_summary([_run(1, "gateway", 3000.0, 200.0, 30.0), _run(2, "notify", 2000.0, 300.0, 90.0),
                                    _run(3, "gateway", 3010.0, 201.0, 31.0)])
    assert not wide["requests_per_s"]["within_noise"] and not wide["cpu_us_per_request"]["within_noise"]
    ratios = variants.notify_ratios(notify_doc())
    assert ratios[0].value == pytest.approx(1.0) and ratios[1].value == pytest.approx(-1.0)
    assert variants.notify_ratios(None) == []


def test_gateway_section_shows_the_notification_runs_and_the_drops() -> None:
    md = report.render_markdown({"gateway": {**gateway_doc(), "notifications": notify_doc()}})
    assert "Notifications: the same gateway with and without one CloudEvents webhook sink" in md
    assert "| Run | Target | requests/s | p50 ms | p99 ms | Non-2xx | Proxy CPU µs/request | Admin writes/s " \
           "| Dropped |" in md
    assert "| 2 | notify | 2,990 | 5.0 | 31.0 | 0 | 203 | 19.8 | 238 |" in md
    assert "| 1 | gateway | 3,000 | 5.0 | 30.0 | 0 | 200 | 19.9 | - |" in md
    assert "| requests/s | 2,980 | 2,980 | +0.0 | 40.0 | unchanged beyond noise |" in md
    assert "| p99 ms | 31.0 | 32.0 | +1.0 | 2.0 | unchanged beyond noise |" in md
    assert "counters at the end: dropped 378 (after the writes before the runs: dropped 99)" in md
    assert "accepted 2 connection(s) and answered none" in md


def test_older_gateway_json_without_the_notification_runs_still_renders() -> None:
    md = report.render_markdown({"gateway": gateway_doc()})
    assert "## Gateway vs direct to the model server" in md and "Notifications:" not in md
    assert gateway.SUITE.render is gateway.render
