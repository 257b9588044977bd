"""Business outcomes through the feedback endpoint (gateway/feedback.py): one outcome per answer, kept per model
version as count, sum and sum of squares; given with a label or on its own, in one body or later; malformed
bodies refused whole; shared across replicas through a real redis-server, then published and merged for the
controller (gateway/sources.py, gateway/controller.py ``Tally``)."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from gateway.app import DataApp
from gateway.controller import Reading, Tally
from gateway.errors import BadRequest
from gateway.feedback import ANSWER_PREFIX, FeedbackStore
from gateway.sources import Counts, LocalMetrics, MergedMetrics, MetricsPublisher, _plain
from gateway.state_redis import RedisStateStore
from tests.gateway.support import client
from tests.gateway.test_dataplane import MODEL, body, rig
from tests.gateway.test_feedback import answer, feedback_replicas, redis_server
from tests.gateway.test_redis_logic import plane_with, redis_url, replicas

__all__ = ["redis_server", "redis_url", "replicas"]  # fixtures used here


def remembered(*ids: str, version: str = "1", color: str = "blue") -> FeedbackStore:
    store = FeedbackStore()
    for rid in ids:
        store.remember(MODEL, rid, color, version, answer(1), None)
    return store


async def test_outcomes_are_kept_per_version_as_count_sum_and_squares() -> None:
    store = remembered("a", "b", "c")
    store.remember(MODEL, "g", "green", "2", answer(None), None)  # no predicted label: an outcome still counts
    result = await store.record(MODEL, [{"id": "a", "outcome": 1}, {"id": "b", "outcome": 0},
                                        {"id": "c", "outcome": 12.5}, {"id": "g", "outcome": -2},
                                        {"id": "nope", "outcome": 1}])
    assert result == {"matched": 0, "unknown": 1, "unlabelled": 0, "outcomes": 4}
    assert store.outcome_counts(MODEL, "1") == (3, 13.5, 1 + 12.5 ** 2)
    assert store.outcome_counts(MODEL, "2") == (1, -2.0, 4.0)
    assert store.outcome_counts(MODEL, "3") == (0, 0.0, 0.0) and store.counts(MODEL, "1") == (0, 0)
    # One outcome per answer: a second one is unknown and moves nothing.
    assert await store.record(MODEL, {"id": "a", "outcome": 1}) == {
        "matched": 0, "unknown": 1, "unlabelled": 0, "outcomes": 0}
    assert store.outcome_counts(MODEL, "1") == (3, 13.5, 157.25)


async def test_a_label_and_an_outcome_count_once_each_in_one_body_or_two() -> None:
    store = remembered("both", "later")
    assert await store.record(MODEL, {"id": "both", "label": 1, "outcome": 1}) == {
        "matched": 1, "unknown": 0, "unlabelled": 0, "outcomes": 1}
    # The label first (a label-only body answers as it always did), the conversion later.
    assert await store.record(MODEL, {"id": "later", "label": 0}) == {"matched": 1, "unknown": 0, "unlabelled": 0}
    assert await store.record(MODEL, {"id": "later", "outcome": 0}) == {
        "matched": 0, "unknown": 0, "unlabelled": 0, "outcomes": 1}
    # Each kind once: both again are two unknowns.
    assert await store.record(MODEL, {"id": "later", "label": 1, "outcome": 1}) == {
        "matched": 0, "unknown": 2, "unlabelled": 0, "outcomes": 0}
    assert store.counts(MODEL, "1") == (2, 1) and store.outcome_counts(MODEL, "1") == (2, 1.0, 1.0)


@pytest.mark.parametrize("items", [
    {"id": "a", "outcome": True}, {"id": "a", "outcome": "1"}, {"id": "a", "outcome": None},
    {"id": "a", "outcome": math.nan}, {"id": "a", "outcome": math.inf}, {"id": "a", "outcome": -math.inf},
    {"id": "a", "outcome": 1e13}, {"id": "a", "outcome": [1]}, {"id": "a", "label": 1, "outcome": "x"},
    {"id": "a", "label": "1", "outcome": 1}, {"id": 5, "outcome": 1}, {"outcome": 1},
    [{"id": "a", "outcome": 1}, {"id": "b", "outcome": math.nan}],
])
async def test_malformed_outcomes_are_refused_whole_and_count_nothing(items: Any) -> None:
    store = remembered("a", "b")
    with pytest.raises(BadRequest) as refused:
        await store.record(MODEL, items)
    assert refused.value.status == 400 and "outcome" in str(refused.value)
    assert store.outcome_counts(MODEL, "1") == (0, 0.0, 0.0) and store.counts(MODEL, "1") == (0, 0)
    assert (await store.record(MODEL, {"id": "a", "outcome": 1}))["outcomes"] == 1  # still unclaimed


async def test_outcomes_through_the_data_listener_reach_the_controllers_counts() -> None:
    async with rig((50, 50)) as r:
        app = DataApp(r.plane, max_concurrency=8, max_body_bytes=4096)
        async with client(app) as c:
            served: dict[str, str] = {}
            for i in range(6):
                resp = await c.post(f"/v2/models/{MODEL}/infer", content=body(i, f"req-{i}"))
                served[f"req-{i}"] = resp.headers["x-bluegreen-color"]
            # Blue's answers converted, green's did not; revenue per answer alongside.
            items = [{"id": rid, "outcome": 1 if color == "blue" else 0} for rid, color in served.items()]
            resp = await c.post(f"/feedback/v1/models/{MODEL}", content=orjson.dumps(items))
            assert resp.status_code == 200 and resp.json() == {"matched": 0, "unknown": 0, "unlabelled": 0,
                                                               "outcomes": 6}
            for bad in (b'{"id": "req-0", "outcome": NaN}', b'{"id": "req-0", "outcome": 1e999}',
                        b'{"id": "req-0", "outcome": "1"}', b'{"id": "req-0", "outcome": true}',
                        b'[{"id": "req-0", "label": 1}, {"id": "req-1", "outcome": null}]'):
                refused = await c.post(f"/feedback/v1/models/{MODEL}", content=bad)
                assert refused.status_code == 400 and refused.json()["error"], bad
            # The refused list labelled nothing: req-0's label is still open.
            ok = await c.post(f"/feedback/v1/models/{MODEL}", content=b'{"id": "req-0", "label": 3}')
            assert ok.json()["matched"] == 1
        source = LocalMetrics(r.plane)
        blue, green = source.counts(MODEL, "blue", "1"), source.counts(MODEL, "green", "2")
        n_blue = list(served.values()).count("blue")
        assert (blue.outcomes, blue.outcome_sum, green.outcomes, green.outcome_sum) == (n_blue, n_blue, 6 - n_blue, 0)


# ------------------------------------------------------------------ with Redis: any replica, once


@pytest.fixture
async def two_stores(redis_server: Any) -> AsyncIterator[tuple[FeedbackStore, FeedbackStore]]:
    async with feedback_replicas(redis_server[1]) as stores:
        yield stores


async def test_an_outcome_lands_on_another_replica_once_and_apart_from_the_label(
        two_stores: tuple[FeedbackStore, FeedbackStore]) -> None:
    a, b = two_stores
    a.remember(MODEL, "r", "green", "2", answer(2), None)
    await a.close()  # the shared copy is written
    assert await b.record(MODEL, {"id": "r", "label": 2}) == {"matched": 1, "unknown": 0, "unlabelled": 0}
    assert await a.redis.exists(f"{ANSWER_PREFIX}{MODEL}:r") == 1
    # The label did not use the answer up: its outcome lands on the answering replica, then nowhere again.
    assert (await a.record(MODEL, {"id": "r", "outcome": 30.0}))["outcomes"] == 1
    assert await a.redis.exists(f"{ANSWER_PREFIX}{MODEL}:r") == 0  # both kinds in: the answer is deleted
    assert (await b.record(MODEL, {"id": "r", "outcome": 30.0}))["unknown"] == 1
    assert (await a.record(MODEL, {"id": "r", "outcome": 30.0}))["unknown"] == 1
    assert a.outcome_counts(MODEL, "2") == (1, 30.0, 900.0) and b.outcome_counts(MODEL, "2") == (0, 0.0, 0.0)
    assert b.counts(MODEL, "2") == (1, 1)


async def test_with_redis_down_outcomes_land_on_the_replica_that_answered_and_count_once(
        redis_server: Any, two_stores: tuple[FeedbackStore, FeedbackStore]) -> None:
    a, _ = two_stores
    a.remember(MODEL, "r", "blue", "1", answer(1), None)
    a.remember(MODEL, "s", "blue", "1", answer(1), None)
    await a.close()
    assert (await a.record(MODEL, {"id": "s", "outcome": 1}))["outcomes"] == 1  # claimed in Redis
    redis_server[0].stop()
    assert (await a.record(MODEL, [{"id": "r", "outcome": 1}, {"id": "s", "outcome": 1}])) == {
        "matched": 0, "unknown": 1, "unlabelled": 0, "outcomes": 1}  # s was given already: not again
    assert a.outcome_counts(MODEL, "1") == (2, 2.0, 2.0)


async def test_published_outcomes_are_summed_across_replicas_for_the_controller(
        replicas: tuple[RedisStateStore, RedisStateStore]) -> None:
    a, b = replicas
    planes = plane_with(a, [True] * 4, []), plane_with(b, [True] * 6, [])
    for i, (plane, values) in enumerate(zip(planes, ([1, 0, 1], [2.5, 0]), strict=True)):
        for j, v in enumerate(values):
            plane.feedback.remember(MODEL, f"{i}-{j}", "blue", "1", answer(1), None, share=False)
            assert (await plane.feedback.record(MODEL, {"id": f"{i}-{j}", "outcome": v}))["outcomes"] == 1
    for store, plane in zip((a, b), planes, strict=True):
        await MetricsPublisher(store, plane).publish()
    merged = MergedMetrics(a, planes[0])
    await merged.refresh()
    total = merged.counts(MODEL, "blue", "1")
    assert (total.requests, total.outcomes, total.outcome_sum, total.outcome_sq) == (10, 5, 4.5, 8.25)
    assert merged.counts(MODEL, "blue", "0").outcomes == 0  # another version of blue: not this one's
    # The controller's stage tally sums each incarnation's version totals (outcomes arrive late: all of them).
    rows = {"blue": merged.rows(MODEL, "blue", "1", 120.0), "green": merged.rows(MODEL, "green", "2", 120.0)}
    tally = Tally.starting_at((0.0, 0, 0.0), Reading(time.time(), rows))  # type: ignore[arg-type]
    stage = tally.total("blue")
    assert (stage.requests, stage.outcomes, stage.outcome_sum, stage.outcome_sq) == (0, 5, 4.5, 8.25)


@pytest.mark.parametrize("fields", [
    {"outcomes": -1, "outcome_sum": 0.0, "outcome_sq": 0.0}, {"outcomes": 2, "outcome_sum": 1.0},
    {"outcomes": 2, "outcome_sum": 1.0, "outcome_sq": -1.0}, {"outcomes": "x", "outcome_sum": 1, "outcome_sq": 1},
    {"outcomes": 2, "outcome_sum": math.inf, "outcome_sq": 1.0},
])
def test_a_published_row_with_impossible_outcomes_is_not_counted(fields: dict[str, Any]) -> None:
    row = {"requests": 3, "errors": 0, "feedback": 0, "correct": 0, "version": "1", **fields}
    assert _plain(row, 120.0, "1") is None
    assert _plain({**row, "version": "0"}, 120.0, "1") == Counts(3)  # another version's outcomes are not read
    plain = {k: v for k, v in row.items() if not k.startswith("outcome")}  # a replica from before outcomes
    assert _plain(plain, 120.0, "1") == Counts(3)
