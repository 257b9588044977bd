"""Redis killed and restarted empty under a running gateway: its state comes back without a restart, admin
writes and ``canary start`` work again, and the outage costs the log one traceback per loop, not one per round."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.integration.expect import expect
from tests.procs import admin_headers, routing, start_gateway, start_model_server, start_redis, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")
SPLIT = "/admin/v1/models/digits/split"
OUTAGE_S = 4.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("servers")
    blue, blue_url = start_model_server(tmp, ["digits:1"])
    green, green_url = start_model_server(tmp, ["digits:2"])
    yield blue_url, green_url
    blue.stop()
    green.stop()


def test_redis_restarted_empty_the_next_admin_write_succeeds_audited_and_a_canary_starts(
        servers: tuple[str, str], tmp_path: Path) -> None:
    rproc, rport = start_redis(tmp_path)
    gw, data, admin = start_gateway(tmp_path, routing([servers[0]], [servers[1]]),
                                    {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{rport}/0"})
    client = redis.Redis(port=rport)
    try:
        r = expect(httpx.put(f"{admin}{SPLIT}", json={"blue": 90, "green": 10, "reason": "before"},
                             headers=admin_headers()), 200, "the split before the outage")
        etag = r.headers["etag"]
        wait_until(lambda: client.exists("bluegreen:leader"), 10, what="a controller lease")
        log_before = len(gw.log())

        rproc.stop()
        wait_until(lambda: "failed: " in gw.log()[log_before:], 10, what="a logged failure")
        # The outage's length is the scenario, not a wait for a condition: several rounds of every background loop
        # (1 s apart) must fail, and only each loop's first failure shows in the log.
        time.sleep(OUTAGE_S)
        rproc, _ = start_redis(tmp_path, port=rport)
        # restarted empty: nothing persisted (start_redis saves nothing), the state key is gone

        # The next write, with the ETag from before the outage, succeeds on the recovered state.
        r = expect(httpx.put(f"{admin}{SPLIT}", json={"blue": 80, "green": 20, "reason": "after"},
                             headers={**admin_headers(), "if-match": etag}), 200, "the first write after the outage")
        assert r.json() == {"blue": 80, "green": 20}
        entries = expect(httpx.get(f"{admin}/admin/v1/audit", headers=admin_headers())).json()["entries"]
        assert entries[0]["action"] == "set_weights" and entries[0]["reason"] == "after"
        assert entries[0]["new"]["weights"] == {"blue": 80, "green": 20}
        recovered = [e for e in entries if e["action"] == "state_recovered"]
        assert len(recovered) == 1 and recovered[0]["model"] == "digits"
        assert recovered[0]["new"]["weights"] == {"blue": 90, "green": 10}  # the last known state came back
        assert recovered[0]["who"].startswith("gateway:")

        # A rollout starts on the recovered state, and the controller (lease re-taken) drives it.
        expect(httpx.put(f"{admin}{SPLIT}", json={"blue": 100, "green": 0}, headers=admin_headers()))
        r = expect(httpx.post(f"{admin}/admin/v1/models/digits/canary/start", headers=admin_headers(),
                              json={"force": True,
                                    "policy": {"stages": [{"weight": 10, "hold_s": 3600}], "interval_s": 1}}),
                   200, "canary start")
        assert r.json()["phase"] == "progressing" and r.json()["weights"] == {"blue": 90, "green": 10}
        wait_until(lambda: expect(httpx.get(f"{admin}/admin/v1/models/digits/canary", headers=admin_headers()))
                   .json()["last_analysis"] > r.json()["started_at"], 15, interval=0.2, what="an analysis")
        expect(httpx.get(f"{data}/v2/health/ready"))

        # Every background loop failed many rounds in the outage; each logged one traceback for its streak
        # and one line with the count when it recovered.
        wait_until(lambda: "metrics-publisher: background round recovered" in gw.log()[log_before:], 10,
                   what="the recovery lines")
        records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )", gw.log()[log_before:])
        failed = [m.group(1) for r in records if (m := re.search(r" ERROR (.+?) failed: ", r.split("\n")[0]))]
        with_traceback = [r.split("\n")[0] for r in records if "Traceback (most recent call last)" in r]
        rounds = [int(n) for r in records for n in re.findall(r" recovered after (\d+) failures? in ", r)]
        assert len(failed) >= 3, records  # the lease, the publisher and the state refresh at least
        assert len(failed) == len(set(failed)), f"a loop logged its failure twice: {failed}"
        assert len(with_traceback) == len(failed), with_traceback  # one traceback per loop's streak
        assert len(rounds) == len(failed) and sum(rounds) > 2 * len(failed), rounds  # many more failed rounds
        assert len(records) < 40, f"{len(records)} log records for a {OUTAGE_S} s outage"
    finally:
        client.close()
        gw.stop()
        rproc.stop()
