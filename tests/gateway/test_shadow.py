"""gateway/shadow.py: which requests are copied to the other color, how agreement is counted, and what is
dropped or failed — with a real data plane and real loopback servers (``upstream_stub.py``).

Blue's server answers label 1 and green's label 2 unless a test sets them equal, so agreement is decided by the
test, not by chance.
"""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest

from gateway.shadow import Shadow, ShadowCounts, compare
from gateway.state import ModelState
from tests.gateway.test_dataplane import MODEL, Rig, body, rig

HEADERS = {"content-type": "application/json"}


def v2(**outputs: list[float] | list[int]) -> bytes:
    return orjson.dumps({"outputs": [{"name": n, "datatype": "FP32", "shape": [len(d)], "data": d}
                                     for n, d in outputs.items()]})


async def settled(shadow: Shadow) -> None:
    """Every copy sent has been answered and counted."""
    for _ in range(10):
        if not shadow.tasks:
            return
        await asyncio.wait(list(shadow.tasks), timeout=5)
    raise AssertionError("shadow copies still out")


def with_share(r: Rig, percent: int) -> ModelState:
    return dataclasses.replace(r.plane.store.get(MODEL), shadow_percent=percent)


# ------------------------------------------------------------------ compare


def test_the_label_decides_when_both_answers_have_one() -> None:
    agree, diff = compare(v2(label=[3], p=[0.1]), v2(label=[3], p=[0.9]), 1e-4)  # type: ignore[misc]
    assert agree is True and diff == pytest.approx(0.8)  # the floats differ, the labels decide
    assert compare(v2(label=[3]), v2(label=[4]), 1e-4) == (False, 0.0)


def test_floating_outputs_agree_within_the_tolerance() -> None:
    assert compare(v2(y=[1.0, 2.0]), v2(y=[1.00005, 2.0]), 1e-4)[0] is True  # type: ignore[index]
    agree, diff = compare(v2(y=[1.0, 2.0]), v2(y=[1.0, 2.5]), 1e-4)  # type: ignore[misc]
    assert (agree, diff) == (False, 0.5)
    assert compare(v2(y=[1.0]), v2(y=[1.0, 2.0]), 1e-4) == (False, float("inf"))  # shapes differ


@pytest.mark.parametrize("other", [b"not json", b'{"error": "x"}', b'{"outputs": []}', b'{"outputs": [{}]}'])
def test_an_answer_without_comparable_outputs_is_incomparable(other: bytes) -> None:
    assert compare(v2(y=[1.0]), other, 1e-4) is None
    assert compare(other, v2(y=[1.0]), 1e-4) is None


# ------------------------------------------------------------------ sampling and accounting


async def test_the_share_selects_exactly_that_many_requests_interleaved() -> None:
    async with rig() as r:
        state = with_share(r, 20)
        agreeing = r.green.answer(None)  # what green will answer: every compared copy agrees
        for i in range(100):
            r.plane.shadow.maybe_copy(state, "blue", body(i), HEADERS, agreeing)
            if i == 9:
                await settled(r.plane.shadow)
                assert r.green.calls == 2  # interleaved: not the first 20 in a row
        await settled(r.plane.shadow)
        assert r.green.calls == 20 and r.blue.calls == 0
        assert r.green.paths[0] == "/v2/models/digits/versions/2/infer"  # the other color's own version
        assert r.plane.shadow.counts(MODEL) == (20, 20)
        assert r.plane.shadow.agreement(MODEL) == (1.0, 20)


async def test_no_share_no_copy_and_no_counts() -> None:
    async with rig() as r:
        for i in range(10):
            r.plane.shadow.maybe_copy(with_share(r, 0), "blue", body(i), HEADERS, b"{}")
        assert not r.plane.shadow.tasks and r.green.calls == 0
        assert r.plane.shadow.agreement(MODEL) == (None, 0) and r.plane.shadow.stats(MODEL) == ShadowCounts()


async def test_served_requests_are_copied_after_the_answer_and_never_enter_the_other_colors_numbers() -> None:
    async with rig(shadow_percent=100) as r:
        replies = [await r.infer(i) for i in range(10)]
        assert {x.color for x in replies} == {"blue"}
        await settled(r.plane.shadow)
        assert r.green.calls == 10
        # Labels differ (1 vs 2): compared, never agreed.
        assert r.plane.shadow.counts(MODEL) == (10, 0) and r.plane.shadow.agreement(MODEL) == (0.0, 10)
        green = r.plane.runtime(MODEL, "green")
        assert (green.requests, green.snapshot().count) == (0, 0)  # evidence, not traffic


async def test_a_cache_hit_sends_no_copy() -> None:
    from tests.gateway.test_dataplane import l1_cache

    async with rig(shadow_percent=100, cache=l1_cache()) as r:
        await r.infer(1)
        hit = await r.infer(1)
        await settled(r.plane.shadow)
        assert hit.cache == "hit" and r.green.calls == 1


async def test_copies_are_dropped_when_the_other_color_is_down_or_too_many_are_out() -> None:
    async with rig() as r:
        state = with_share(r, 100)
        r.plane.shadow.max_in_flight = 0
        r.plane.shadow.maybe_copy(state, "blue", body(), HEADERS, b"{}")
        r.plane.shadow.max_in_flight = 32
        r.plane.runtime(MODEL, "green").backends[0].breaker.force_open()
        r.plane.shadow.maybe_copy(state, "blue", body(), HEADERS, b"{}")
        assert not r.plane.shadow.tasks and r.green.calls == 0
        assert r.plane.shadow.stats(MODEL) == ShadowCounts(dropped=2)


async def test_a_failed_or_incomparable_copy_is_counted_as_failed_not_compared() -> None:
    async with rig() as r:
        state = with_share(r, 100)
        r.green.status = 500
        r.plane.shadow.maybe_copy(state, "blue", body(), HEADERS, r.blue.answer(None))
        await settled(r.plane.shadow)
        r.green.status = 200
        r.plane.shadow.maybe_copy(state, "blue", body(), HEADERS, b"garbage")
        await settled(r.plane.shadow)
        assert r.plane.shadow.stats(MODEL) == ShadowCounts(failed=2)
        assert r.plane.shadow.agreement(MODEL) == (None, 0)


async def test_the_largest_difference_is_kept() -> None:
    async with rig() as r:
        state = with_share(r, 100)
        # Green answers probabilities [0.25, 0.75]; these primaries differ from them by 0.05 and 0.5.
        for primary in (v2(probabilities=[0.3, 0.75]), v2(probabilities=[0.25, 0.25])):
            r.plane.shadow.maybe_copy(state, "blue", body(), HEADERS, primary)
            await settled(r.plane.shadow)
        stats = r.plane.shadow.stats(MODEL)
        assert (stats.compared, stats.agreed) == (2, 0) and stats.max_diff == pytest.approx(0.5)
