"""The fixed-rate generator: schedule math, percentiles, server-timing parsing, the report, its command line.

One test drives a tiny in-process server on loopback to check what the generator counts (never how fast).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from aiohttp import web

from loadtests import fixed_rate
from loadtests.fixed_rate import Sample, Schedule


def test_schedule_counts_warmup_and_measured_requests() -> None:
    s = Schedule(rate_per_s=100.0, duration_s=5.0, warmup_s=2.0)
    assert (s.warmup_count, s.measured_count, s.total) == (200, 500, 700)
    assert s.offset_s(0) == 0.0
    assert s.offset_s(200) == pytest.approx(2.0)  # the first measured request is due when the warm-up ends
    assert s.offset_s(699) == pytest.approx(6.99)


def test_schedule_with_a_fractional_rate() -> None:
    s = Schedule(rate_per_s=3.0, duration_s=1.0, warmup_s=0.5)
    assert s.warmup_count == 2  # due at 0 and 0.333 s; the third, at 0.667 s, is measured
    assert s.measured_count == 3
    assert Schedule(rate_per_s=0.1, duration_s=1.0).measured_count == 1  # never an empty window


def test_due_counts_requests_whose_time_has_come() -> None:
    s = Schedule(rate_per_s=100.0, duration_s=1.0)
    assert s.due(-0.5) == 0
    assert s.due(0.0) == 1
    assert s.due(0.0099) == 1
    assert s.due(0.01) == 2
    assert s.due(0.5) == 51
    assert s.due(1e9) == s.total  # never past the end


@pytest.mark.parametrize("rate", [1.0, 7.3, 100.0, 1000.0, 1234.5])
def test_due_and_offset_agree_for_every_request(rate: float) -> None:
    s = Schedule(rate_per_s=rate, duration_s=2.0, warmup_s=0.5)
    for i in range(s.total):
        assert s.due(s.offset_s(i)) == i + 1  # at its own due time, a request (and none after it) is due
        if i:
            assert s.due(s.offset_s(i) - 1e-6) == i


@pytest.mark.parametrize(("rate", "duration", "warmup"),
                         [(0.0, 1.0, 0.0), (-1.0, 1.0, 0.0), (math.inf, 1.0, 0.0), (math.nan, 1.0, 0.0),
                          (10.0, 0.0, 0.0), (10.0, 1.0, -1.0)])
def test_invalid_schedules_are_refused(rate: float, duration: float, warmup: float) -> None:
    with pytest.raises(ValueError):
        Schedule(rate, duration, warmup)


def test_nearest_rank_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert fixed_rate.percentile(values, 50) == 50.0
    assert fixed_rate.percentile(values, 99) == 99.0
    assert fixed_rate.percentile(values, 99.9) == 100.0
    assert fixed_rate.percentile(values, 100) == 100.0
    assert fixed_rate.percentile(values, 0) == 1.0
    ten = [float(v) for v in range(10)]
    assert fixed_rate.percentile(ten, 90) == 8.0  # rank 9 of 10
    assert fixed_rate.percentile(ten, 99) == 9.0  # rank ceil(9.9) = 10: the maximum
    assert fixed_rate.percentile([4.0], 50) == 4.0
    assert fixed_rate.percentile([], 50) is None
    with pytest.raises(ValueError):
        fixed_rate.percentile(values, 101)


def test_distribution_is_in_milliseconds() -> None:
    d = fixed_rate.distribution_ms([0.001, 0.002, 0.003, 0.010])
    assert d["p50"] == pytest.approx(2.0)
    assert d["p99"] == pytest.approx(10.0)
    assert d["max"] == pytest.approx(10.0)
    assert d["mean"] == pytest.approx(4.0)
    assert fixed_rate.distribution_ms([]) == {"p50": None, "p90": None, "p95": None, "p99": None, "p99.9": None,
                                              "mean": None, "max": None}


@pytest.mark.parametrize(("header", "expected"), [
    ("upstream;dur=2.76, gateway;dur=0.04", {"upstream": 2.76, "gateway": 0.04}),
    ("upstream;dur=1,gateway;dur=0.5", {"upstream": 1.0, "gateway": 0.5}),
    ('cache;desc="L1 hit";dur=0.1', {"cache": 0.1}),
    ('db;dur="3.5"', {"db": 3.5}),
    ("miss, app;dur=abc, total;DUR=7", {"total": 7.0}),
    ("", {}),
])
def test_parse_server_timing(header: str, expected: dict[str, float]) -> None:
    assert fixed_rate.parse_server_timing(header) == expected


def _ok(latency_s: float, gateway_ms: float | None = None) -> Sample:
    timing = None if gateway_ms is None else {"gateway": gateway_ms, "upstream": 1.0}
    return Sample(lag_s=0.0005, latency_s=latency_s, service_s=latency_s - 0.0005, status=200, error=None,
                  server_timing=timing)


def test_summary_counts_only_the_measured_window() -> None:
    s = Schedule(rate_per_s=10.0, duration_s=1.0, warmup_s=0.5)  # 5 warm-up, 10 measured
    warmup = [_ok(9.0)] * 5  # slow warm-up answers must not show
    measured: list[Sample | None] = [_ok(0.001 * (i + 1), gateway_ms=0.1 * (i + 1)) for i in range(7)]
    measured.append(Sample(0.0, 0.002, 0.002, 503, None, None))
    measured.append(Sample(0.0, 0.5, 0.5, 0, "ServerDisconnectedError", None))
    measured.append(None)  # never finished
    r = fixed_rate.summarize(s, [*warmup, *measured], window_s=2.0, cpu_s={"generator": 0.5, "gateway": None})
    assert r["requests"] == 10 and r["warmup_requests"] == 5
    assert (r["answered"], r["ok"], r["non_2xx"], r["unfinished"]) == (8, 7, 1, 1)
    assert r["errors"] == {"ServerDisconnectedError": 1}
    assert r["answered_per_s"] == pytest.approx(4.0)
    assert r["latency_ms"]["max"] == pytest.approx(7.0)  # the warm-up's 9 s are not in it
    assert r["latency_ms"]["p50"] == pytest.approx(3.0)  # 4th of 1, 2, 2 (the 503), 3, 4, 5, 6, 7 ms
    assert r["server_timing_ms"]["gateway"]["count"] == 7
    assert r["server_timing_ms"]["gateway"]["p50"] == pytest.approx(0.4)
    assert r["server_timing_ms"]["upstream"]["p99"] == pytest.approx(1.0)
    assert r["cores"] == {"generator": pytest.approx(0.25), "gateway": None}


def test_command_line_refuses_bad_input_before_sending(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = tmp_path / "body.json"
    body.write_text("{}")
    base = ["--duration", "1", "--body-file", str(body), "--out", str(tmp_path / "out.json")]
    assert fixed_rate.main(["http://10.0.0.1:80/", "--rate", "10", *base]) == 2
    assert "127.0.0.1 only" in capsys.readouterr().err
    assert fixed_rate.main(["http://127.0.0.1:9/", "--rate", "0", *base]) == 2
    assert fixed_rate.main(["http://127.0.0.1:9/", "--rate", "10", "--connections", "0", *base]) == 2
    with pytest.raises(SystemExit):
        fixed_rate.main(["http://127.0.0.1:9/", "--rate", "10", "--header", "no colon", *base])
    with pytest.raises(SystemExit):
        fixed_rate.main(["http://127.0.0.1:9/", "--rate", "10", "--cpu-of", "gateway", *base])
    assert not (tmp_path / "out.json").exists()


async def test_drive_sends_every_request_and_reads_server_timing() -> None:
    seen: list[tuple[bytes, str | None]] = []

    async def infer(request: web.Request) -> web.Response:
        seen.append((await request.read(), request.headers.get("Cache-Control")))
        return web.json_response({"ok": True}, headers={"server-timing": "upstream;dur=1.50, gateway;dur=0.25"})

    app = web.Application()
    app.router.add_post("/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        schedule = Schedule(rate_per_s=200.0, duration_s=0.1, warmup_s=0.05)  # 10 warm-up, 20 measured
        report = await fixed_rate.drive(f"http://127.0.0.1:{port}/infer", b'{"x":1}',
                                        {"Content-Type": "application/json", "Cache-Control": "no-store"}, schedule,
                                        connections=4, cpu_of={"me": os.getpid()})
    finally:
        await runner.cleanup()
    assert len(seen) == 30 and set(seen) == {(b'{"x":1}', "no-store")}
    assert (report["requests"], report["answered"], report["ok"], report["unfinished"]) == (20, 20, 20, 0)
    assert report["errors"] == {}
    assert report["server_timing_ms"]["gateway"]["p50"] == pytest.approx(0.25)
    assert report["server_timing_ms"]["gateway"]["count"] == 20
    assert report["cpu_s"]["generator"] is not None and report["cpu_s"]["me"] is not None
    json.dumps(report)  # the report is written as JSON as is


async def test_drive_sends_several_bodies_in_turn() -> None:
    seen: list[bytes] = []

    async def infer(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        schedule = Schedule(rate_per_s=200.0, duration_s=0.06)  # 12 requests, no warm-up
        report = await fixed_rate.drive(f"http://127.0.0.1:{port}/infer", [b"a", b"b", b"c"],
                                        {"Content-Type": "application/json"}, schedule, connections=1)
    finally:
        await runner.cleanup()
    assert report["answered"] == 12
    assert seen == [b"a", b"b", b"c"] * 4  # one connection: the order they were sent in
    with pytest.raises(ValueError, match="no body"):
        await fixed_rate.drive("http://127.0.0.1:9/", [], {}, schedule)


def test_body_lines_file_must_hold_a_body(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = tmp_path / "bodies.jsonl"
    lines.write_text("\n\n")
    out = ["--duration", "1", "--out", str(tmp_path / "out.json")]
    assert fixed_rate.main(["http://127.0.0.1:9/", "--rate", "10", "--body-lines", str(lines), *out]) == 2
    assert "holds no body" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one body or several, not both
        fixed_rate.main(["http://127.0.0.1:9/", "--rate", "10", "--body-lines", str(lines), "--body-file",
                         str(lines), *out])
