"""gateway/feedback.py: ground truth for earlier answers, counted per (model, version).

In-process first (the store on its own, then behind the data listener with a real data plane and loopback model
servers), then two replicas' stores sharing a real redis-server: feedback lands on any replica, once.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from gateway.app import DataApp
from gateway.errors import BadRequest
from gateway.feedback import FeedbackStore, predicted_label
from gateway.sources import LocalMetrics
from tests.gateway.support import FakeClock, client
from tests.gateway.test_dataplane import BLUE_LABEL, GREEN_LABEL, MODEL, body, rig
from tests.procs import Proc, start_redis


def answer(label: int | None) -> bytes:
    outputs = [] if label is None else [{"name": "label", "datatype": "INT64", "shape": [1], "data": [label]}]
    return orjson.dumps({"outputs": [*outputs, {"name": "p", "datatype": "FP32", "shape": [1], "data": [0.5]}]})


def test_the_predicted_label_is_the_first_element_of_the_label_output() -> None:
    assert predicted_label(answer(7), None) == 7
    assert predicted_label(answer(None), None) is None
    assert predicted_label(b"garbage", None) is None
    binary = answer(3)
    assert predicted_label(binary + b"\x00\x01tensor bytes", len(binary)) == 3  # a binary answer's JSON part


async def test_labels_are_counted_per_version_and_one_label_per_answer() -> None:
    store = FeedbackStore()
    store.remember(MODEL, "a", "blue", "1", answer(1), None)
    store.remember(MODEL, "b", "blue", "1", answer(1), None)
    store.remember(MODEL, "c", "green", "2", answer(2), None)
    store.remember(MODEL, "d", "green", "2", answer(None), None)
    result = await store.record(MODEL, [{"id": "a", "label": 1}, {"id": "b", "label": 4}, {"id": "c", "label": 2},
                                        {"id": "d", "label": 2}, {"id": "nope", "label": 1}])
    assert result == {"matched": 3, "unknown": 1, "unlabelled": 1}
    assert store.counts(MODEL, "1") == (2, 1) and store.counts(MODEL, "2") == (1, 1)
    assert store.counts("other", "1") == (0, 0)
    # Labelled once: the same id again is unknown, and the counts do not move.
    assert await store.record(MODEL, {"id": "a", "label": 1}) == {"matched": 0, "unknown": 1, "unlabelled": 0}
    assert store.counts(MODEL, "1") == (2, 1)


async def test_answers_are_forgotten_after_the_ttl_and_past_the_bound() -> None:
    clock = FakeClock()
    store = FeedbackStore(max_entries=2, ttl_s=60, clock=clock)
    for rid in ("old", "x", "y"):  # "old" is pushed out by the bound
        store.remember(MODEL, rid, "blue", "1", answer(1), None)
    assert (await store.record(MODEL, {"id": "old", "label": 1}))["unknown"] == 1
    clock.advance(61)
    assert (await store.record(MODEL, [{"id": "x", "label": 1}, {"id": "y", "label": 1}]))["unknown"] == 2
    assert store.counts(MODEL, "1") == (0, 0)


@pytest.mark.parametrize("items", [
    {}, [], "a", 7, None, [{"id": 1, "label": 2}], [{"id": "a", "label": True}], [{"id": "a", "label": 1.0}],
    {"id": "a"}, {"label": 1}, [{"id": "a", "label": 1}, "b"], [{"id": "a", "label": 1}] * 10_001,
])
async def test_malformed_feedback_is_refused_whole_and_counts_nothing(items: Any) -> None:
    store = FeedbackStore()
    store.remember(MODEL, "a", "blue", "1", answer(1), None)
    with pytest.raises(BadRequest) as refused:
        await store.record(MODEL, items)
    assert refused.value.status == 400
    assert store.counts(MODEL, "1") == (0, 0)
    assert await store.record(MODEL, {"id": "a", "label": 1}) == {"matched": 1, "unknown": 0, "unlabelled": 0}


async def test_feedback_through_the_data_listener_reaches_the_controllers_counts() -> None:
    async with rig((50, 50)) as r:
        app = DataApp(r.plane, max_concurrency=8, max_body_bytes=4096)
        async with client(app) as c:
            answered: dict[str, str] = {}
            for i in range(4):  # the client's own ids: the V2 body's "id", or x-request-id
                resp = await c.post(f"/v2/models/{MODEL}/infer", content=body(i, f"body-{i}"))
                answered[f"body-{i}"] = resp.headers["x-bluegreen-color"]
            resp = await c.post(f"/v2/models/{MODEL}/infer", content=body(9), headers={"x-request-id": "header-9"})
            answered["header-9"] = resp.headers["x-bluegreen-color"]
            served = [list(answered.values()).count(c) for c in ("blue", "green")]
            assert min(served) >= 1, answered  # the split sends some to each
            # Everyone says the truth is blue's label: blue's answers were right, green's wrong.
            items = [{"id": rid, "label": BLUE_LABEL} for rid in answered]
            r2 = await c.post(f"/feedback/v1/models/{MODEL}", content=orjson.dumps(items))
            assert r2.status_code == 200 and r2.json() == {"matched": 5, "unknown": 0, "unlabelled": 0}

            for bad, status in ((b"{not json", 400), (b'{"id": "x"}', 400), (b"[]", 400)):
                refused = await c.post(f"/feedback/v1/models/{MODEL}", content=bad)
                assert refused.status_code == status and "error" in refused.json(), refused.text
            assert (await c.post("/feedback/v1/models/nope", content=b'{"id": "x", "label": 1}')).status_code == 404

        source = LocalMetrics(r.plane)
        blue, green = source.counts(MODEL, "blue", "1"), source.counts(MODEL, "green", "2")
        assert GREEN_LABEL != BLUE_LABEL
        assert (blue.feedback, blue.correct, green.feedback, green.correct) == (served[0], served[0], served[1], 0)


# ------------------------------------------------------------------ with Redis: any replica, once


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    proc, port = start_redis(tmp_path)
    yield proc, f"redis://127.0.0.1:{port}/0"
    proc.stop()


@contextlib.asynccontextmanager
async def feedback_replicas(url: str) -> AsyncIterator[tuple[FeedbackStore, FeedbackStore]]:
    """Two replicas' feedback stores, each with its own client of the Redis at ``url``."""
    clients = [Redis.from_url(url, socket_timeout=1.0) for _ in range(2)]
    stores = (FeedbackStore(redis=clients[0]), FeedbackStore(redis=clients[1]))
    yield stores
    for s, c in zip(stores, clients, strict=True):
        await s.close()
        await c.aclose()


@pytest.fixture
async def replicas(redis_server: tuple[Proc, str]) -> AsyncIterator[tuple[FeedbackStore, FeedbackStore]]:
    async with feedback_replicas(redis_server[1]) as stores:
        yield stores


async def test_feedback_lands_on_another_replica_once(replicas: tuple[FeedbackStore, FeedbackStore]) -> None:
    a, b = replicas
    a.remember(MODEL, "shared", "blue", "1", answer(1), None)
    a.remember(MODEL, "private", "blue", "1", answer(1), None, share=False)  # an id the gateway generated
    await a.close()  # waits for the shared copy's write: feedback comes after the answer
    assert await b.record(MODEL, [{"id": "shared", "label": 1}, {"id": "private", "label": 1}]) == {
        "matched": 1, "unknown": 1, "unlabelled": 0}
    assert b.counts(MODEL, "1") == (1, 1) and a.counts(MODEL, "1") == (0, 0)  # counted where it landed
    # Claimed once across replicas: the answering replica does not count it again.
    assert (await a.record(MODEL, {"id": "shared", "label": 1}))["unknown"] == 1
    assert (await a.record(MODEL, {"id": "private", "label": 0}))["matched"] == 1
    assert a.counts(MODEL, "1") == (1, 0)


async def test_with_redis_down_feedback_still_lands_on_the_replica_that_answered(
        redis_server: tuple[Proc, str], replicas: tuple[FeedbackStore, FeedbackStore]) -> None:
    a, _ = replicas
    a.remember(MODEL, "r", "green", "2", answer(2), None)
    await a.close()  # the shared copy was written
    redis_server[0].stop()
    assert await a.record(MODEL, {"id": "r", "label": 2}) == {"matched": 1, "unknown": 0, "unlabelled": 0}
    assert a.counts(MODEL, "2") == (1, 1)
