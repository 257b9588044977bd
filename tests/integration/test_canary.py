"""Rollouts end to end with real processes and compressed stages (seconds instead of hours)."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from gateway.admin_text import format_canary
from tests.confirm_receiver import confirm_receiver
from tests.integration.expect import describe, expect, expect_all
from tests.procs import admin_headers, routing, start_gateway, start_model_server, start_redis, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")
INFER = "/v2/models/digits/infer"
NO_CACHE = {"cache-control": "no-cache, no-store"}
FAST = {"stages": [{"weight": 20, "hold_s": 1}, {"weight": 50, "hold_s": 1}], "interval_s": 1,
        "min_requests": 40, "max_no_data_intervals": 30,
        # A drill's evidence minimum: stages long enough to catch 5% errors (153 requests) or half the requests
        # over the latency threshold, at the policy's confidence, 95% of the time.
        "detect_error_rate": 0.05, "detect_slow_share": 0.5}


def body(i: int) -> bytes:
    row = np.random.default_rng(i).integers(0, 17, size=64).astype(float).tolist()
    return orjson.dumps({"id": f"r{i}", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                    "data": row}]})


class Load:
    """Background closed-loop traffic (bounded by ``max_s``) until stopped; keeps every status code, and every
    answer that was not a 200 described in full (:meth:`assert_no_failures` shows them)."""

    def __init__(self, data: str, workers: int = 4, max_s: float = 60.0) -> None:
        self.data = data
        self.codes: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(workers, max_s)), daemon=True)
        self._thread.start()

    async def _run(self, workers: int, max_s: float) -> None:
        end = time.monotonic() + max_s
        async with httpx.AsyncClient(base_url=self.data, timeout=10) as c:
            async def worker(w: int) -> None:
                i = w * 1_000_000
                while not self._stop.is_set() and time.monotonic() < end:
                    try:
                        r = await c.post(INFER, content=body(i), headers=NO_CACHE)
                        self.codes.append(r.status_code)
                        if r.status_code != 200:
                            self.failures.append(describe(r))
                    except httpx.HTTPError as exc:  # only where a test kills this gateway on purpose
                        self.codes.append(-1)
                        self.failures.append(f"POST {INFER}: {type(exc).__name__}: {exc}")
                        await asyncio.sleep(0.05)  # back off from a gateway that is gone
                    i += 1

            await asyncio.gather(*(worker(w) for w in range(workers)))

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(15)
        return self.codes

    def assert_no_failures(self, why: str) -> None:
        assert self.codes, "the background load sent nothing"
        assert not self.failures, (f"{why}: {len(self.failures)} of {len(self.codes)} answers failed; the first:\n"
                                   + "\n".join(self.failures[:5]))


def canary(admin: str, command: str = "", doc: dict | None = None) -> dict:  # type: ignore[type-arg]
    url = f"{admin}/admin/v1/models/digits/canary" + (f"/{command}" if command else "")
    r = httpx.post(url, json=doc or {}, headers=admin_headers()) if command else httpx.get(url, headers=admin_headers())
    return expect(r, 200, f"canary {command or 'status'}").json()  # type: ignore[no-any-return]


def audit(admin: str) -> list[dict]:  # type: ignore[type-arg]
    return expect(httpx.get(f"{admin}/admin/v1/audit", headers=admin_headers())).json()["entries"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def blue(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[str]:
    proc, url = start_model_server(tmp_path_factory.mktemp("blue"), ["digits:1", "digits:3"])
    yield url
    proc.stop()


def test_a_failing_green_is_rolled_back_by_itself(blue: str, tmp_path: Path) -> None:
    green, green_url = start_model_server(tmp_path, ["digits:2"], extra=["--fault-error-rate", "0.05"])
    gw, data, admin = start_gateway(tmp_path, routing([blue], [green_url]))
    load = Load(data)
    try:
        started = canary(admin, "start", {"force": True, "policy": FAST})
        assert started["phase"] == "progressing" and started["candidate"] == "green"
        assert started["weights"] == {"blue": 80, "green": 20}
        wait_until(lambda: canary(admin)["phase"] != "progressing", 20, interval=0.1, what="a decision")
        status = canary(admin)
        assert status["phase"] == "rolled_back", status["last_decision"]
        assert status["weights"] == {"blue": 100, "green": 0}
        decision = status["last_decision"]
        assert decision["result"] == "rollback" and "error rate" in decision["reason"]
        evidence = decision["evidence"]["candidate"]
        assert evidence["requests"] >= FAST["min_requests"] and evidence["errors"] > 0
        # Within two check intervals of reaching the minimum sample: at most ~2 intervals' worth beyond it.
        assert decision["time"] - started["started_at"] < 2 * FAST["interval_s"] + 3
        entry = next(e for e in audit(admin) if e["action"] == "canary_rollback")
        assert entry["who"] == "controller" and entry["evidence"]["candidate"]["errors"] > 0
        assert entry["new"]["weights"] == {"blue": 100, "green": 0}
    finally:
        load.stop()
        gw.stop()
        green.stop()
    load.assert_no_failures("failed green attempts are retried on blue")


@pytest.mark.parametrize("shared", ["embedded", "redis"])
def test_a_candidate_with_5_percent_errors_is_rolled_back_at_the_first_analysis(blue: str, tmp_path: Path,
                                                                                 shared: str) -> None:
    """The first analysis of the stage sees every candidate request since the start (with Redis: every
    replica's published counts) and rolls back; before, it saw none ("no candidate requests") and the rollback
    waited for the second. Every 20th green call fails (5%); 60 requests with 3 errors are already evidence."""
    interval = 4.0
    policy = {"stages": [{"weight": 50, "hold_s": 3600}], "interval_s": interval, "min_requests": 60}
    rproc = None
    env = {}
    if shared == "redis":
        rproc, rport = start_redis(tmp_path)
        env = {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{rport}/0"}
    green, green_url = start_model_server(tmp_path, ["digits:2"], extra=["--fault-error-rate", "0.05"])
    gw, data, admin = start_gateway(tmp_path, routing([blue], [green_url]), env)
    load = Load(data)
    try:
        wait_until(lambda: len(load.codes) >= 20, 20, what="traffic before the start")
        started = canary(admin, "start", {"force": True, "policy": policy})
        wait_until(lambda: canary(admin)["phase"] != "progressing", 4 * interval, interval=0.1,
                   what="a decision")
        status = canary(admin)
        decision = status["last_decision"]
        assert status["phase"] == "rolled_back" and decision["result"] == "rollback", status
        assert "error rate" in decision["reason"]
        evidence = decision["evidence"]["candidate"]
        assert evidence["requests"] >= policy["min_requests"] and evidence["errors"] >= 3
        # The first analysis is due one interval after the start (ticks every 0.25 s); the second one
        # interval later: the rollback came from the first.
        assert interval <= decision["time"] - started["started_at"] < 2 * interval, decision["time"]
        assert status["last_analysis"] == decision["time"]
        entry = next(e for e in audit(admin) if e["action"] == "canary_rollback")
        assert entry["evidence"]["candidate"]["requests"] == evidence["requests"]
    finally:
        load.stop()
        gw.stop()
        green.stop()
        if rproc is not None:
            rproc.stop()
    load.assert_no_failures("failed green attempts are retried on blue")


def test_a_healthy_green_is_promoted_then_a_release_to_blue_works_the_same(blue: str, tmp_path: Path) -> None:
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    gw, data, admin = start_gateway(tmp_path, routing([blue], [green_url]))
    load = Load(data)
    try:
        canary(admin, "start", {"force": True, "policy": FAST})
        wait_until(lambda: canary(admin)["phase"] == "promoted", 30, interval=0.2, what="promotion")
        status = canary(admin)
        assert status["weights"] == {"blue": 0, "green": 100}
        actions = [e["action"] for e in audit(admin)]
        assert actions.index("canary_promoted") < actions.index("canary_promote") < actions.index("canary_advance")

        # The next release goes to the other slot: blue, re-pointed at a new version, is the candidate now.
        expect(httpx.put(f"{admin}/admin/v1/models/digits/colors/blue", json={"version": "3", "backends": [blue]},
                         headers=admin_headers()), 200, "re-point blue")
        started = canary(admin, "start", {"force": True, "policy": {**FAST, "max_accuracy_drop": 0.05,
                                                                      "min_feedback": 30}})
        assert started["candidate"] == "blue" and started["weights"] == {"blue": 20, "green": 80}

        # digits:3 is the regressed build: feedback with the true labels rolls it back on quality.
        x = np.load(Path("models/repository/digits/2/holdout.npz"))
        rows, labels = x["input"], x["label"]

        def send_with_feedback() -> bool:
            with httpx.Client(base_url=data, timeout=10) as c:
                for i in range(40):
                    k = int(time.monotonic_ns() % 1_000_000_000) + i
                    doc = {"id": f"q{k}", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                      "data": rows[k % len(rows)].tolist()}]}
                    expect(c.post(INFER, json=doc, headers=NO_CACHE))
                    label = int(labels[k % len(rows)])
                    expect(c.post("/feedback/v1/models/digits", json={"id": f"q{k}", "label": label}))
            return canary(admin)["phase"] == "rolled_back"

        wait_until(send_with_feedback, 30, interval=0.1, what="a quality rollback")
        status = canary(admin)
        assert status["weights"] == {"blue": 0, "green": 100}
        assert "accuracy" in status["last_decision"]["reason"]
    finally:
        load.stop()
        gw.stop()
        green.stop()
    load.assert_no_failures("through two rollouts")


def test_feedback_gives_online_accuracy_equal_to_an_offline_count(blue: str, tmp_path: Path) -> None:
    gw, data, admin = start_gateway(tmp_path, routing([blue], [blue], versions=("1", "3"), weights=(50, 50)))
    try:
        x = np.load(Path("models/repository/digits/1/holdout.npz"))
        rows, labels = x["input"][:120], x["label"][:120]
        offline: dict[str, list[int]] = {"blue": [0, 0], "green": [0, 0]}
        with httpx.Client(base_url=data, timeout=10) as c:
            for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
                r = c.post(INFER, json={"id": f"f{i}", "inputs": [{"name": "input", "datatype": "FP32",
                                                                   "shape": [1, 64], "data": row.tolist()}]},
                           headers=NO_CACHE)
                expect(r)
                predicted = next(o["data"][0] for o in r.json()["outputs"] if o["name"] == "label")
                color = r.headers["x-bluegreen-color"]
                offline[color][0] += 1
                offline[color][1] += predicted == int(label)
            items = [{"id": f"f{i}", "label": int(label)} for i, label in enumerate(labels)]
            result = expect(c.post("/feedback/v1/models/digits", json=items)).json()
            assert result == {"matched": 120, "unknown": 0, "unlabelled": 0}
            expect(c.post("/feedback/v1/models/digits", json={"id": "nope"}), 400)
            assert expect(c.post("/feedback/v1/models/digits",
                                 json={"id": "never-seen", "label": 1})).json()["unknown"] == 1
        metrics = httpx.get(f"{admin}/metrics").text
        for color, (n, correct) in offline.items():
            line = next(ln for ln in metrics.splitlines()
                        if ln.startswith("bluegreen_online_accuracy_ratio") and f'color="{color}"' in ln)
            assert float(line.rsplit(" ", 1)[1]) == pytest.approx(correct / n)
    finally:
        gw.stop()


def test_shadow_traffic_never_fails_a_client_and_its_agreement_matches_offline(blue: str, tmp_path: Path) -> None:
    doc = routing([blue], [blue], versions=("1", "3"))
    doc["models"]["digits"]["shadow_percent"] = 100
    gw, data, admin = start_gateway(tmp_path, doc)
    try:
        agree = 0
        with httpx.Client(base_url=data, timeout=10) as c:
            for i in range(60):
                r = expect(c.post(INFER, content=body(i), headers=NO_CACHE))
                v3 = expect(httpx.post(f"{blue}/v2/models/digits/versions/3/infer", content=body(i))).json()
                agree += v3["outputs"][0]["data"] == r.json()["outputs"][0]["data"]

        def ratio() -> float | None:
            for line in httpx.get(f"{admin}/metrics").text.splitlines():
                if line.startswith("bluegreen_shadow_agreement_ratio"):
                    return float(line.rsplit(" ", 1)[1])
            return None

        def compared() -> int:
            return int(expect(httpx.get(f"{admin}/admin/v1/models/digits/shadow",
                                        headers=admin_headers())).json()["compared"])

        wait_until(lambda: compared() == 60, 5, what="all 60 shadow copies compared")
        assert ratio() == pytest.approx(agree / 60)
    finally:
        gw.stop()


# ------------------------------------------------------------------------------------------ two replicas


@pytest.mark.exclusive
def test_two_gateways_on_one_redis_share_state_and_one_controller(blue: str, tmp_path: Path) -> None:
    rproc, rport = start_redis(tmp_path)
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    # A 1.5 s controller lease instead of the default 5 s: the survivor takes over that much sooner after the
    # kill, and the takeover (lease lapse, new epoch, the stage resumed once) is the same; renewed every 0.5 s, it
    # is kept unless a replica stalls for 0.7 s, which the exclusive mark keeps this test's machine from doing.
    env = {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{rport}/0", "BLUEGREEN_CONTROLLER_LEASE_TTL_S": "1.5"}
    doc = routing([blue], [green_url])
    a, data_a, admin_a = start_gateway(tmp_path, doc, env, name="a")
    b, data_b, admin_b = start_gateway(tmp_path, doc, env, name="b")
    loads: list[Load] = []
    try:
        expect(httpx.put(f"{admin_a}/admin/v1/models/digits/split", json={"blue": 70, "green": 30},
                         headers=admin_headers()), 200, "set the split on replica a")
        t0 = time.monotonic()
        wait_until(lambda: httpx.get(f"{admin_b}/admin/v1/models/digits/split", headers=admin_headers()).json()
                   == {"blue": 70, "green": 30}, 1.0, interval=0.01, what="replica b to apply the change")
        assert time.monotonic() - t0 < 1.0

        # 50 concurrent writes with one ETag across both replicas: exactly one wins.
        etag = httpx.get(f"{admin_a}/admin/v1/models/digits/split", headers=admin_headers()).headers["etag"]

        async def race() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as c:
                return await asyncio.gather(*(
                    c.put(f"{(admin_a, admin_b)[i % 2]}/admin/v1/models/digits/split",
                          json={"blue": 100 - i, "green": i}, headers={**admin_headers(), "if-match": etag})
                    for i in range(1, 51)))

        results = asyncio.run(race())
        winners = [r for r in results if r.status_code == 200]
        assert len(winners) == 1, [describe(r) for r in winners]
        expect_all((r for r in results if r not in winners), 412, "the losers of an If-Match race")
        final = httpx.get(f"{admin_b}/admin/v1/models/digits/split", headers=admin_headers()).json()
        assert audit(admin_a)[0]["new"]["weights"] == final == winners[0].json()

        # A rollout driven by one controller; kill it mid-rollout and the other carries on from the stage.
        expect(httpx.put(f"{admin_a}/admin/v1/models/digits/split", json={"blue": 100, "green": 0},
                         headers=admin_headers()))
        slow = {**FAST, "stages": [{"weight": 10, "hold_s": 2}, {"weight": 30, "hold_s": 2},
                                   {"weight": 60, "hold_s": 2}]}
        loads = [Load(data_a, 2), Load(data_b, 2)]
        canary(admin_a, "start", {"force": True, "policy": slow})
        wait_until(lambda: canary(admin_b)["stage"] >= 2, 20, interval=0.1, what="stage 2")
        import redis as redis_client

        holder = redis_client.Redis(port=rport).get("bluegreen:leader").decode()
        assert 0 < redis_client.Redis(port=rport).pttl("bluegreen:leader") <= 1500  # the setting reached the lease
        victim, survivor_admin = (a, admin_b) if str(a.pid) in holder else (b, admin_a)
        stage_at_kill = canary(survivor_admin)["stage"]
        victim.signal(signal.SIGKILL)
        victim.wait(5)
        wait_until(lambda: canary(survivor_admin)["phase"] == "promoted", 40, interval=0.2, what="promotion")
        entries = audit(survivor_admin)
        advances = [e for e in entries if e["action"] in ("canary_advance", "canary_promote")]
        stages_seen = [e["new"]["weights"]["green"] for e in reversed(advances)]
        assert stages_seen == sorted(set(stages_seen)), f"a stage was stepped twice: {stages_seen}"
        assert stage_at_kill >= 2
    finally:
        for load in loads:
            load.stop()
        a.stop()
        b.stop()
        green.stop()
        rproc.stop()


def test_up_restarted_mid_rollout_resumes_from_its_state_file(tmp_path: Path) -> None:
    from tests.integration.test_up import start_up
    from tests.procs import free_port

    ports = {k: free_port() for k in ("data", "admin", "blue", "green")}
    admin = f"http://127.0.0.1:{ports['admin']}"
    up = start_up(tmp_path, ports)
    try:
        long = {"stages": [{"weight": 10, "hold_s": 3600}], "interval_s": 1, "min_requests": 5}
        canary(admin, "start", {"force": True, "policy": long})
        before = canary(admin)
        up.signal(signal.SIGTERM)
        assert up.wait(30) == 0
    finally:
        up.stop()
    up = start_up(tmp_path, ports)
    try:
        after = canary(admin)
        assert after["phase"] == "progressing" and after["stage"] == 1
        assert after["started_at"] == before["started_at"] and after["weights"] == {"blue": 90, "green": 10}
        assert canary(admin, "abort")["phase"] == "rolled_back"
    finally:
        up.stop()


def test_feedback_reaches_any_replica_through_redis(blue: str, tmp_path: Path) -> None:
    rproc, rport = start_redis(tmp_path)
    env = {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{rport}/0"}
    doc = routing([blue], [blue])
    a, data_a, _ = start_gateway(tmp_path, doc, env, name="a")
    b, data_b, _ = start_gateway(tmp_path, doc, env, name="b")
    try:
        r = expect(httpx.post(f"{data_a}{INFER}", content=body(5), headers=NO_CACHE))
        predicted = next(o["data"][0] for o in r.json()["outputs"] if o["name"] == "label")
        import redis as redis_client

        wait_until(lambda: redis_client.Redis(port=rport).exists("bluegreen:answer:digits:r5"), 5,
                   what="the answer in Redis")
        result = expect(httpx.post(f"{data_b}/feedback/v1/models/digits", json={"id": "r5", "label": predicted})).json()
        assert result == {"matched": 1, "unknown": 0, "unlabelled": 0}
        again = httpx.post(f"{data_a}/feedback/v1/models/digits", json={"id": "r5", "label": predicted}).json()
        assert again["unknown"] == 1  # one label per answer, wherever it arrives
        # Without a V2 id or a client x-request-id, the gateway's generated id is remembered by the replica
        # that answered only: nothing is written to Redis for anonymous traffic.
        anonymous = orjson.dumps({k: v for k, v in orjson.loads(body(6)).items() if k != "id"})
        r = expect(httpx.post(f"{data_a}{INFER}", content=anonymous, headers=NO_CACHE))
        generated = r.headers["x-request-id"]
        predicted = next(o["data"][0] for o in r.json()["outputs"] if o["name"] == "label")
        # A barrier instead of a pause: a named answer sent after it is written, so a write for the anonymous
        # one (issued first, had there been one) would have landed too.
        expect(httpx.post(f"{data_a}{INFER}", content=body(7), headers=NO_CACHE))
        wait_until(lambda: redis_client.Redis(port=rport).exists("bluegreen:answer:digits:r7"), 5,
                   what="the later named answer in Redis")
        # r5 stays until its outcome (or the TTL): one label and one outcome per answer.
        assert sorted(redis_client.Redis(port=rport).keys("bluegreen:answer:digits:*")) == [
            b"bluegreen:answer:digits:r5", b"bluegreen:answer:digits:r7"]
        item = {"id": generated, "label": predicted}
        assert httpx.post(f"{data_b}/feedback/v1/models/digits", json=item).json()["unknown"] == 1
        assert httpx.post(f"{data_a}/feedback/v1/models/digits", json=item).json()["matched"] == 1
        assert httpx.post(f"{data_a}/feedback/v1/models/digits", json=item).json()["unknown"] == 1
    finally:
        a.stop()
        b.stop()
        rproc.stop()


def test_a_stage_waits_for_its_confirm_gate_and_goes_on_when_it_says_yes(blue: str, tmp_path: Path) -> None:
    """A real receiver on loopback answers 503: the healthy stage is held, the reason shows in the status and the
    CLI's text; switched to 200, the next analysis advances. Only the controller's decisions are sent to it."""
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    gw, data, admin = start_gateway(tmp_path, routing([blue], [green_url]))
    load = Load(data)
    with confirm_receiver(503) as gate:
        try:
            stages = [{**FAST["stages"][0], "confirm_url": gate.url()}, FAST["stages"][1]]  # type: ignore[index]
            canary(admin, "start", {"force": True, "policy": {**FAST, "stages": stages}})
            wait_until(lambda: "confirm gate" in (canary(admin)["last_decision"] or {}).get("reason", ""), 20,
                       interval=0.1, what="a hold at the confirm gate")
            status = canary(admin)
            assert (status["phase"], status["stage"]) == ("progressing", 1)
            assert status["weights"] == {"blue": 80, "green": 20}
            decision = status["last_decision"]
            assert decision["result"] == "hold" and decision["reason"].startswith(
                f"waiting for the confirm gate of stage 1: {gate.url()} answered 503 (stage 1 passed)")
            assert "answered 503" in format_canary({**status, "model": "digits"})  # what `bluegreen canary` prints
            sent = gate.received()[0]
            assert (sent["gate"], sent["model"], sent["candidate"], sent["weight"], sent["next_weight"]) == \
                ("stage-1", "digits", "green", 20, 50)
            assert sent["evidence"]["candidate"]["requests"] >= FAST["min_requests"]

            gate.status = 200
            wait_until(lambda: canary(admin)["stage"] == 2, 10, interval=0.1, what="the advance once the gate says yes")
            status = canary(admin)
            assert status["weights"] == {"blue": 50, "green": 50} and status["last_decision"]["result"] == "advance"
            entry = next(e for e in audit(admin) if e["action"] == "canary_advance")
            assert entry["who"] == "controller" and entry["reason"] == "stage 1 passed"
            assert {b["gate"] for b in gate.received()} == {"stage-1"} and len(gate.received()) >= 2
        finally:
            load.stop()
            gw.stop()
            green.stop()
    load.assert_no_failures("while held at the confirm gate")
