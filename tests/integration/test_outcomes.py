"""The business metric end to end: real model servers, two real gateways on a real redis-server, simulated clients
that send predictions to one replica and report what each answer led to (a conversion, 0/1) to the other; a
candidate whose answers convert clearly worse is rolled back by the controller on the outcome trigger alone.

What is compressed and why it stays a real test: one 50% stage analysed every second instead of hours-long
stages (the hold is an hour, so the rollout can only end by a rollback: nothing passes by waiting), and a few
hundred outcomes instead of the 28,599 a stage would need before it could *pass* at stable's 30%. The
release plan's confidence (99.995% per look), 5% margin and 100-outcome minimum are kept: stable converting 30%
and the candidate 10% is a drop the bound proves on ~200 candidate outcomes, while 100 alone are not enough —
so the rollback needs the outcomes to flow through the answer records in Redis, every replica's published
counts and the leader's merge, as in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import redis as redis_client

from tests.integration.expect import expect
from tests.procs import admin_headers, routing, start_gateway, start_model_server, start_redis, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")
INFER = "/v2/models/digits/infer"
FEEDBACK = "/feedback/v1/models/digits"
NO_CACHE = {"cache-control": "no-cache, no-store"}
CONVERTS = {"blue": 0.30, "green": 0.10}
"""The simulated clients' behaviour: the share of answers of each color that lead to a conversion."""
POLICY = {"stages": [{"weight": 50, "hold_s": 3600}], "interval_s": 1}


def request(i: int) -> bytes:
    row = np.random.default_rng(i).integers(0, 17, size=64).astype(float).tolist()
    return orjson.dumps({"id": f"o{i}", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                    "data": row}]})


class Clients:
    """Simulated clients: predictions on one replica, each answer's conversion reported on another once its
    answer record is in Redis (feedback may land on any replica, but only after the answer exists)."""

    def __init__(self, data: str, feedback: str, rport: int) -> None:
        self.data, self.feedback = data, feedback
        self.redis = redis_client.Redis(port=rport)
        self.rng = np.random.default_rng(7)
        self.next = 0
        self.sent = {"blue": [0, 0], "green": [0, 0]}  # outcomes and conversions reported, per color

    def batch(self, n: int = 40) -> None:
        first, self.next = self.next, self.next + n

        async def predict() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=self.data, timeout=10) as c:
                return await asyncio.gather(*(c.post(INFER, content=request(i), headers=NO_CACHE)
                                              for i in range(first, first + n)))

        items = []
        for i, r in zip(range(first, first + n), asyncio.run(predict()), strict=True):
            color = expect(r).headers["x-bluegreen-color"]
            converted = int(self.rng.random() < CONVERTS[color])
            items.append({"id": f"o{i}", "outcome": converted})
            self.sent[color][0] += 1
            self.sent[color][1] += converted
        keys = [f"bluegreen:answer:digits:{item['id']}" for item in items]
        wait_until(lambda: self.redis.exists(*keys) == len(keys), 5, interval=0.02, what="the answers in Redis")
        result = expect(httpx.post(f"{self.feedback}{FEEDBACK}", json=items)).json()
        assert result == {"matched": 0, "unknown": 0, "unlabelled": 0, "outcomes": n}, result


def canary(admin: str, command: str = "", doc: dict | None = None) -> dict:  # type: ignore[type-arg]
    url = f"{admin}/admin/v1/models/digits/canary" + (f"/{command}" if command else "")
    r = httpx.post(url, json=doc or {}, headers=admin_headers()) if command else httpx.get(url, headers=admin_headers())
    return expect(r, 200, f"canary {command or 'status'}").json()  # type: ignore[no-any-return]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[str, str, int]]:
    rproc, rport = start_redis(tmp_path)
    blue, blue_url = start_model_server(tmp_path, ["digits:1"])
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    yield blue_url, green_url, rport
    for p in (green, blue, rproc):
        p.stop()


def test_a_candidate_converting_clearly_worse_is_rolled_back_on_the_outcome_evidence(
        servers: tuple[str, str, int], tmp_path: Path) -> None:
    blue_url, green_url, rport = servers
    env = {"BLUEGREEN_REDIS_URL": f"redis://127.0.0.1:{rport}/0"}
    doc = routing([blue_url], [green_url])
    a, data_a, admin_a = start_gateway(tmp_path, doc, env, name="a")
    try:
        b, data_b, admin_b = start_gateway(tmp_path, doc, env, name="b")
    except BaseException:
        a.stop()
        raise
    try:
        clients = Clients(data_a, data_b, rport)
        for _ in range(4):  # the stable version's record before the release: 160 outcomes, all blue
            clients.batch()
        assert clients.sent["green"][0] == 0
        started = canary(admin_a, "start", {"force": True, "policy": POLICY})
        assert started["weights"] == {"blue": 50, "green": 50}

        def decided() -> bool:
            clients.batch()
            return str(canary(admin_b)["phase"]) != "progressing"

        wait_until(decided, 30, interval=0.0, what="a decision on the outcomes")
        status = canary(admin_a)
        decision = status["last_decision"]
        assert status["phase"] == "rolled_back" and decision["result"] == "rollback", decision
        assert status["weights"] == {"blue": 100, "green": 0}
        reason = decision["reason"]
        assert reason.startswith("mean outcome") and "lower by more than 5% of stable's" in reason, reason
        outcome = decision["evidence"]["outcome"]
        cand, stab = outcome["candidate"], outcome["stable"]
        # The merged counts the controller judged: every outcome reported, as far as it had been published.
        assert 100 <= cand["outcomes"] <= clients.sent["green"][0]
        assert 160 <= stab["outcomes"] <= clients.sent["blue"][0]
        assert cand["mean"] < 0.2 < stab["mean"] and outcome["lower_bound"] > 0
        thresholds = decision["evidence"]["thresholds"]
        assert thresholds["max_outcome_drop"] == 0.05 and thresholds["confidence"] == 0.99995
        entry = next(e for e in expect(httpx.get(f"{admin_a}/admin/v1/audit", headers=admin_headers())).json()[
            "entries"] if e["action"] == "canary_rollback")
        assert entry["evidence"]["outcome"]["candidate"]["outcomes"] == cand["outcomes"]
        # The replica that received the outcomes exports each color's current version's conversion rate.
        rates = {line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
                 for line in httpx.get(f"{admin_b}/metrics").text.splitlines()
                 if line.startswith("bluegreen_outcome_rate{")}
        green_n, green_k = clients.sent["green"]
        assert rates['color="green",model="digits",version="2"'] == pytest.approx(green_k / green_n)
        assert set(rates) == {'color="blue",model="digits",version="1"', 'color="green",model="digits",version="2"'}
    finally:
        a.stop()
        b.stop()
