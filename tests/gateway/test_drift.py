"""gateway/drift.py: each color's live inputs against the digits holdout that ``build-models`` ships — traffic drawn
from the holdout reads low, a shifted feature reads high on the color that got it and names that feature; the
window forgets, a new version starts afresh, nothing is reported before ``min_rows``. One test goes the whole
way: a real data plane, real loopback servers, the reader task, the gauge and the admin endpoint.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import orjson

from gateway.app import Gateway
from gateway.dataplane import DataPlane, InferRequest
from gateway.drift import DriftMonitor, Reference, psi
from gateway.settings import DriftSettings, GatewaySettings, RoutingFile
from gateway.state import MemoryStateStore
from serving.repository import DEFAULT_REPOSITORY
from tests.gateway.support import ALICE, DIGITS, FakeClock, client
from tests.gateway.test_dataplane import MODEL
from tests.gateway.upstream_stub import stubs

SHIFTED = 27  # a centre pixel the digits use in many shapes: ten bins on the reference


def holdout() -> np.ndarray:
    with np.load(DEFAULT_REPOSITORY / MODEL / "1" / "holdout.npz") as data:
        return np.asarray(data["input"], dtype=np.float64)


def drawn(n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn with replacement from the holdout: the reference population."""
    x = holdout()
    return x[np.random.default_rng(seed).integers(0, len(x), n)]


def shifted(rows: np.ndarray) -> np.ndarray:
    out = rows.copy()
    out[:, SHIFTED] = np.clip(out[:, SHIFTED] + 6, 0, 16)  # a client that brightens one pixel
    return out


def monitor(clock: FakeClock | None = None, **settings: float) -> DriftMonitor:
    return DriftMonitor(DriftSettings(**settings), DEFAULT_REPOSITORY, clock=clock or FakeClock())


def test_holdout_traffic_reads_low_and_a_shifted_feature_high_on_its_color_only() -> None:
    m = monitor()
    m.add_rows(MODEL, "blue", "1", drawn(600, seed=1))
    m.add_rows(MODEL, "green", "2", shifted(drawn(600, seed=2)))
    report = m.report(MODEL, ("blue", "green"))
    blue, green = report["colors"]["blue"], report["colors"]["green"]
    assert blue["rows"] == green["rows"] == 600
    assert blue["drift"] < 0.1 and blue["drifting"] is False  # sampling noise only
    assert green["drift"] > 1.0 and green["drifting"] is True  # far above the 0.25 threshold
    assert green["top"][0]["feature"] == f"input[{SHIFTED}]" and green["top"][0]["psi"] == green["drift"]
    assert all(t["psi"] < 0.1 for t in green["top"][1:])  # the other features did not move
    assert len(green["top"]) == 5 and green["reference"].endswith("digits/2/holdout.npz")


def test_psi_is_zero_for_identical_shares_and_grows_with_the_shift() -> None:
    ref = Reference.from_array(holdout(), 10, Path("holdout.npz"))
    assert np.allclose(psi(ref.expected, ref.expected, ref.used), 0.0)
    m = monitor()
    values = []
    for shift in (0, 2, 4, 8):
        rows = drawn(1000, seed=3)
        rows[:, SHIFTED] = np.clip(rows[:, SHIFTED] + shift, 0, 16)
        m.add_rows(MODEL, "blue", f"v{shift}", rows)  # unknown versions have no reference: ignored
        m.add_rows(MODEL, "green", "1", rows)
        values.append(m.report(MODEL, ("green",))["colors"]["green"]["top"][0]["psi"])
        m._windows.clear()
    assert values == sorted(values) and values[0] < 0.05 < 0.25 < values[1]
    assert m.report(MODEL, ("blue",))["colors"]["blue"]["drift"] is None


def test_nothing_is_reported_before_min_rows_and_the_window_forgets() -> None:
    clock = FakeClock()
    m = monitor(clock, min_rows=300, window_s=120)
    m.add_rows(MODEL, "green", "2", shifted(drawn(299)))
    assert m.report(MODEL, ("green",))["colors"]["green"]["drift"] is None
    assert list(m._gauge()) == []  # absent, not zero
    m.add_rows(MODEL, "green", "2", shifted(drawn(1)))
    assert [(labels, v > 1) for labels, v in m._gauge()] == [((MODEL, "green"), True)]
    clock.advance(60)
    m.add_rows(MODEL, "green", "2", drawn(300, seed=4))  # the client is fixed
    assert m.report(MODEL, ("green",))["colors"]["green"]["rows"] == 600
    clock.advance(61)  # the shifted rows are more than a window old
    report = m.report(MODEL, ("green",))["colors"]["green"]
    assert report["rows"] == 300 and report["drift"] < 0.1
    m.add_rows(MODEL, "green", "1", drawn(10))  # green re-pointed to another version: a new window
    assert m.report(MODEL, ("green",))["colors"]["green"] | {"reference": None} == {
        "version": "1", "rows": 10, "drift": None, "drifting": False, "top": [], "reference": None}


async def test_through_the_data_plane_the_gauge_and_the_admin_endpoint(gateway: Gateway) -> None:
    async with stubs(1, 2) as (blue, green):
        routing = RoutingFile.model_validate({"models": {MODEL: {
            "colors": {"blue": {"version": "1", "backends": [blue.url]},
                       "green": {"version": "2", "backends": [green.url]}},
            "weights": {"blue": 50, "green": 50}}}})
        settings = GatewaySettings(cache={"enabled": False}, validation_repo=DEFAULT_REPOSITORY,
                                   drift=DriftSettings(sample_percent=100, min_rows=200))
        plane = DataPlane(settings, MemoryStateStore.from_routing(routing))
        for version in ("1", "2"):
            plane.signatures[(MODEL, version)] = DIGITS
        await plane.start()
        try:
            rows = drawn(250, seed=5)
            for version, batch in (("1", rows), ("2", shifted(rows))):
                for i in range(0, 250, 5):  # five rows a request, pinned to the version's color
                    chunk = batch[i:i + 5]
                    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 64],
                                       "data": chunk.ravel().tolist()}]}
                    reply = await plane.infer(InferRequest(MODEL, orjson.dumps(doc), version=version))
                    assert reply.status == 200
            for _ in range(500):  # bounded: the reader task bins the samples on its thread
                if all(plane.drift.scores(MODEL, c)[1] == 250 for c in ("blue", "green")):
                    break
                await asyncio.sleep(0.01)
            text = plane.telemetry.prometheus_text().decode()
            gauge = {line.split('color="')[1].split('"')[0]: float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("bluegreen_input_drift{")}
            assert gauge["blue"] < 0.2 and gauge["green"] > 1.0  # 250 rows: noise stays well under 0.25
            gateway.plane = plane
            async with client(gateway.admin_app()) as admin:
                r = await admin.get("/admin/v1/models/digits/drift", headers={"authorization": f"Bearer {ALICE}"})
                assert r.status_code == 200, r.text
                doc = r.json()
                assert (doc["measure"], doc["threshold"], doc["sample_percent"]) == ("psi", 0.25, 100)
                assert doc["colors"]["green"]["top"][0]["feature"] == f"input[{SHIFTED}]"
                assert doc["colors"]["green"]["drifting"] and not doc["colors"]["blue"]["drifting"]
                assert (await admin.get("/admin/v1/models/digits/drift")).status_code == 401
        finally:
            await plane.close()


def test_without_a_reference_repository_drift_is_off_and_costs_nothing() -> None:
    m = DriftMonitor(DriftSettings(), None)
    assert m.enabled is False
    m.add_rows(MODEL, "blue", "1", drawn(500))
    assert m.report(MODEL, ("blue",))["colors"]["blue"]["drift"] is None
    assert m.report(MODEL, ("blue",))["sample_percent"] == 0
