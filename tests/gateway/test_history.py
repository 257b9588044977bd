"""gateway/history.py and the console's routes (gateway/console) in-process: the points, the hour they keep, the
thresholds they carry, every replica's numbers merged through a real Redis, and who may read them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.admin import create_admin_app
from gateway.app import Gateway
from gateway.auth import Authenticator, Principal
from gateway.dataplane import DataPlane
from gateway.history import History
from gateway.release import Release, StartBody
from gateway.settings import COLORS, GatewaySettings, RoutingFile
from gateway.sources import LocalMetrics, MergedMetrics, MetricsPublisher
from gateway.state_redis import RedisStateStore
from tests.gateway.support import ALICE, FakeClock, client, routing_doc
from tests.procs import start_redis

MODEL = "digits"
VIEWER = "viewer-token-0123456789"
APPROVER = "approver-token-0123456789"


def history(gateway: Gateway, clock: FakeClock, interval_s: float = 10.0) -> History:
    return History(gateway.release, LocalMetrics(gateway.plane), interval_s=interval_s, clock=clock)


async def test_a_point_holds_each_colors_window_and_the_routing(gateway: Gateway, clock: FakeClock) -> None:
    blue, green = gateway.plane.runtime(MODEL, "blue"), gateway.plane.runtime(MODEL, "green")
    for i in range(100):
        blue.record(0.010 if i < 90 else 0.050, True)
    for i in range(20):
        green.record(0.020, i % 4 != 0)
    h = history(gateway, clock)
    await h.sample()
    doc = await h.document(MODEL)
    [point] = doc["points"]
    assert point["t"] == clock.now and point["weights"] == {"blue": 100, "green": 0}
    assert (point["phase"], point["stage"]) == ("idle", 0)
    b, g = point["blue"], point["green"]
    assert (b["count"], b["errors"], b["error_rate"]) == (100, 0, 0.0)
    assert b["p50_ms"] == pytest.approx(10, rel=0.01) and b["p95_ms"] == pytest.approx(50, rel=0.01)
    assert (g["count"], g["errors"], g["error_rate"]) == (20, 5, 0.25)
    assert g["version"] == "2" and g["accuracy"] is None and g["feedback"] == 0
    # The window /stats reads, so the newest point and /stats agree.
    stats = blue.snapshot().as_json()
    assert (b["p95_ms"], b["rps"]) == (stats["p95_ms"], stats["rps"])
    assert doc["now"]["blue"] == b and doc["window_s"] == 60.0


async def test_an_hour_is_kept_and_since_returns_only_newer_points(gateway: Gateway, clock: FakeClock) -> None:
    h = history(gateway, clock, interval_s=600.0)  # six points make the hour
    times = []
    for _ in range(8):
        await h.sample()
        times.append(clock.now)
        clock.advance(600)
    doc = await h.document(MODEL)
    assert [p["t"] for p in doc["points"]] == times[2:]
    newer = await h.document(MODEL, since=times[5])
    assert [p["t"] for p in newer["points"]] == times[6:]


async def test_thresholds_are_the_running_rollouts_else_the_routing_files(gateway: Gateway,
                                                                          clock: FakeClock) -> None:
    release = gateway.release
    release.policies[MODEL] = release.policy_for(MODEL, {"max_p95_ms": 80.0})
    h = history(gateway, clock)
    assert h.thresholds(MODEL)["max_p95_ms"] == 80.0
    admin = Principal("alice", frozenset({"admin"}))
    await release.start(MODEL, StartBody(policy={"max_p95_ms": 30.0, "max_error_rate": 0.002}), actor=admin)
    thresholds = (await h.document(MODEL))["thresholds"]
    assert (thresholds["max_p95_ms"], thresholds["max_error_rate"]) == (30.0, 0.002)
    await h.sample()
    point = (await h.document(MODEL))["points"][-1]
    assert point["phase"] == "progressing" and point["stage"] == 1 and point["weights"]["green"] == 5


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    proc, port = start_redis(tmp_path)
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


async def test_with_redis_the_points_are_every_replicas_numbers_merged(redis_url: str) -> None:
    stores = [RedisStateStore(redis_url, RoutingFile.model_validate(routing_doc()), refresh_s=3600, replica=r)
              for r in ("a", "b")]
    for s in stores:
        await s.start()
    try:
        planes = [DataPlane(GatewaySettings(), s) for s in stores]
        for plane, n in zip(planes, (30, 70), strict=True):
            for i in range(n):
                plane.runtime(MODEL, "blue").record(0.010, i % 10 != 0)
        for store, plane in zip(stores, planes, strict=True):
            await MetricsPublisher(store, plane).publish()
        # Replica b keeps the history; it sees a's requests as well as its own.
        h = History(Release(stores[1]), MergedMetrics(stores[1], planes[1]), interval_s=10.0)
        await h.sample()
        [point] = (await h.document(MODEL))["points"]
        assert (point["blue"]["count"], point["blue"]["errors"]) == (100, 10)
        assert point["blue"]["p50_ms"] == pytest.approx(10, rel=0.01)
        assert point["green"]["count"] == 0 and point["green"]["p95_ms"] is None
    finally:
        for s in stores:
            await s.aclose()


# ---------------------------------------------------------------- the console's routes


@pytest.fixture
async def admin(gateway: Gateway, clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    """Alice is admin; a viewer token and a token that may only approve the security gate."""
    tokens = {ALICE: Principal("alice", frozenset({"admin"})), VIEWER: Principal("vic", frozenset({"viewer"})),
              APPROVER: Principal("sec", frozenset({"approve:security"}))}
    auth = Authenticator(tokens, 10, 60.0, clock)
    app = create_admin_app(gateway.release, gateway.plane, auth, history=history(gateway, clock))
    async with client(app) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_whoami_names_the_caller_and_roles_without_needing_viewer(admin: httpx.AsyncClient) -> None:
    for token, doc in ((ALICE, {"name": "alice", "roles": ["admin"]}),
                       (APPROVER, {"name": "sec", "roles": ["approve:security"]})):
        r = await admin.get("/admin/v1/whoami", headers=bearer(token))
        assert (r.status_code, r.json()) == (200, doc)
    r = await admin.get("/admin/v1/whoami", headers=bearer("not-a-token-at-all-0000"))
    assert r.status_code == 401 and r.json() == {"error": "missing or invalid bearer token"}


async def test_history_and_policy_need_the_viewer_role(admin: httpx.AsyncClient) -> None:
    for path in (f"/admin/v1/models/{MODEL}/history", f"/admin/v1/models/{MODEL}/policy"):
        assert (await admin.get(path, headers=bearer(VIEWER))).status_code == 200
        r = await admin.get(path, headers=bearer(APPROVER))
        assert r.status_code == 403 and "'viewer' role" in r.json()["error"]
        assert (await admin.get(path)).status_code == 401
    doc = (await admin.get(f"/admin/v1/models/{MODEL}/history", headers=bearer(VIEWER))).json()
    assert set(doc) == {"model", "interval_s", "span_s", "window_s", "thresholds", "points", "now"}
    assert set(doc["now"]) >= {"t", "weights", "phase", "stage", "shadow", *COLORS}
    r = await admin.get(f"/admin/v1/models/{MODEL}/history?since=yesterday", headers=bearer(VIEWER))
    assert r.status_code == 400 and "since" in r.json()["error"]
    assert (await admin.get("/admin/v1/models/nope/history", headers=bearer(VIEWER))).status_code == 404
    policy = (await admin.get(f"/admin/v1/models/{MODEL}/policy", headers=bearer(VIEWER))).json()
    assert [s["weight"] for s in policy["stages"]] == [5, 25, 50]  # the release plan: no overrides in routing


async def test_the_page_is_served_with_a_policy_that_allows_only_this_origin(admin: httpx.AsyncClient) -> None:
    r = await admin.get("/ui")
    assert r.status_code == 308 and r.headers["location"] == "/ui/"
    page = await admin.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for asset in ("api.js", "charts.js", "controls.js", "console.js", "console.css"):
        assert f"/ui/{asset}" in page.text
        r = await admin.get(f"/ui/{asset}")
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
        text = r.text.replace("http://www.w3.org/2000/svg", "")  # SVG's namespace is a name, never fetched
        assert "http://" not in text and "https://" not in text and "//cdn" not in text  # nothing from elsewhere
    assert (await admin.get("/ui/missing.js")).status_code == 404
