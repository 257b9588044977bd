"""serving/batching.py: DynamicBatcher over a real ONNX Runtime session of digits:2 on one worker thread.

Batch composition is made deterministic with a gate: a one-row "plug" request enters the run function and
holds the only worker thread while the test queues everything else, so the batches formed after the gate
opens depend only on the queue, never on timing.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving.batching import DirectRunner, DynamicBatcher, QueueFull, Tensors
from serving.runtime import Session


@pytest.fixture(scope="module")
def session(model_repo: Path) -> Session:
    return Session(Path(model_repo) / "digits" / "2" / "model.onnx", device="cpu", threads=1)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=1)
    yield pool
    pool.shutdown(wait=True)


class Gate:
    """Wraps a run function; the first call blocks (holding the worker thread) until :meth:`open`."""

    def __init__(self, run: Callable[[Tensors], Tensors]) -> None:
        self._run = run
        self._open = threading.Event()
        self.entered = threading.Event()

    def __call__(self, inputs: Tensors) -> Tensors:
        if not self.entered.is_set():
            self.entered.set()
            if not self._open.wait(timeout=30):
                raise TimeoutError("the test never opened the gate")
        return self._run(inputs)

    def open(self) -> None:
        self._open.set()


async def until(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            try:
                what = inspect.getsource(predicate).strip()  # the line that awaited it
            except OSError:
                what = repr(predicate)
            raise AssertionError(f"not met within {within_s} s: {what}")
        await asyncio.sleep(0.001)


def rows(n: int, seed: int) -> Tensors:
    return {"input": np.random.default_rng(seed).integers(0, 17, size=(n, 64)).astype(np.float32)}


def assert_same(got: Tensors, want: Tensors) -> None:
    assert got.keys() == want.keys()
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6)


@pytest.fixture
async def make_batcher(executor: ThreadPoolExecutor) -> AsyncIterator[Callable[..., DynamicBatcher]]:
    made: list[DynamicBatcher] = []

    def make(run: Callable[[Tensors], Tensors], max_batch_size: int = 8, max_queue_delay_s: float = 0.002,
             max_queue_size: int = 1024) -> DynamicBatcher:
        batcher = DynamicBatcher(run, executor, max_batch_size=max_batch_size, max_queue_delay_s=max_queue_delay_s,
                                 max_queue_size=max_queue_size)
        batcher.start()
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        await batcher.stop()


async def plugged(batcher: DynamicBatcher, gate: Gate) -> asyncio.Task[Tensors]:
    """Submit the one-row plug and wait until it holds the worker thread (the queue is then empty)."""
    plug = asyncio.create_task(batcher.submit(rows(1, seed=999), 1))
    await until(gate.entered.is_set)
    assert batcher.queue_depth == 0
    return plug


def greedy(sizes: list[int], limit: int) -> dict[int, int]:
    """The batches the queue forms in order: add requests while they fit, a too-large one alone."""
    counts: dict[int, int] = {}
    current = 0
    for n in sizes:
        if current and current + n > limit:
            counts[current] = counts.get(current, 0) + 1
            current = 0
        current += n
        if current >= limit:
            counts[current] = counts.get(current, 0) + 1
            current = 0
    if current:
        counts[current] = counts.get(current, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------ correctness


async def test_concurrent_mixed_sizes_each_get_exactly_their_rows(session: Session, make_batcher) -> None:  # type: ignore[no-untyped-def]
    batcher = make_batcher(session.run, max_batch_size=8)
    sizes = [int(n) for n in np.random.default_rng(5).integers(1, 8, size=40)]
    inputs = [rows(n, seed=i) for i, n in enumerate(sizes)]

    results = await asyncio.gather(*(batcher.submit(x, len(x["input"])) for x in inputs))

    for x, got in zip(inputs, results, strict=True):
        assert got["label"].shape == (len(x["input"]),) and got["probabilities"].shape == (len(x["input"]), 10)
        assert_same(got, session.run(x))
    stats = batcher.stats
    assert stats.requests == len(sizes) and stats.rows == sum(sizes)
    assert sum(size * count for size, count in stats.sizes.items()) == sum(sizes)
    assert stats.batches == sum(stats.sizes.values()) < len(sizes)  # requests were combined
    assert max(stats.sizes) <= 8


async def test_queued_requests_pack_in_order_up_to_max_batch_size(session: Session, make_batcher) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(session.run)
    batcher = make_batcher(gate, max_batch_size=8)
    plug = await plugged(batcher, gate)
    sizes = [3, 4, 2, 5, 1, 7, 6, 2, 2, 3]
    inputs = [rows(n, seed=10 + i) for i, n in enumerate(sizes)]
    tasks = [asyncio.create_task(batcher.submit(x, n)) for x, n in zip(inputs, sizes, strict=True)]
    await until(lambda: batcher.queue_depth == len(sizes))

    gate.open()
    results = await asyncio.gather(*tasks)

    await plug
    for x, got in zip(inputs, results, strict=True):
        assert_same(got, session.run(x))
    want = greedy(sizes, 8)
    want[1] = want.get(1, 0) + 1  # the plug
    assert batcher.stats.sizes == want
    assert max(batcher.stats.sizes) <= 8


async def test_a_request_larger_than_max_batch_size_runs_alone(session: Session, make_batcher) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(session.run)
    batcher = make_batcher(gate, max_batch_size=4)
    plug = await plugged(batcher, gate)
    inputs = [rows(2, seed=1), rows(9, seed=2), rows(2, seed=3)]
    tasks = [asyncio.create_task(batcher.submit(x, len(x["input"]))) for x in inputs]
    await until(lambda: batcher.queue_depth == 3)

    gate.open()
    results = await asyncio.gather(*tasks)

    await plug
    for x, got in zip(inputs, results, strict=True):
        assert_same(got, session.run(x))
    assert batcher.stats.sizes == {1: 1, 2: 2, 9: 1}


async def test_max_batch_size_one_never_combines(session: Session, make_batcher) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(session.run)
    batcher = make_batcher(gate, max_batch_size=1, max_queue_delay_s=1.0)  # the delay must not apply
    plug = await plugged(batcher, gate)
    inputs = [rows(1, seed=i) for i in range(10)] + [rows(3, seed=10)]
    tasks = [asyncio.create_task(batcher.submit(x, len(x["input"]))) for x in inputs]
    await until(lambda: batcher.queue_depth == len(inputs))

    gate.open()
    results = await asyncio.gather(*tasks)

    await plug
    for x, got in zip(inputs, results, strict=True):
        assert_same(got, session.run(x))
    assert batcher.stats.sizes == {1: 11, 3: 1}
    assert batcher.stats.batches == batcher.stats.requests == 12


async def test_requests_with_different_inner_shapes_are_not_stacked(make_batcher) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(lambda inputs: {"echo": inputs["x"] * 2})
    batcher = make_batcher(gate, max_batch_size=8)
    plug = asyncio.create_task(batcher.submit({"x": np.zeros((1, 2), np.float32)}, 1))
    await until(gate.entered.is_set)
    a, b = np.ones((2, 2), np.float32), np.ones((2, 3), np.float32)
    tasks = [asyncio.create_task(batcher.submit({"x": a}, 2)), asyncio.create_task(batcher.submit({"x": b}, 2))]
    await until(lambda: batcher.queue_depth == 2)

    gate.open()
    got_a, got_b = await asyncio.gather(*tasks)

    await plug
    np.testing.assert_array_equal(got_a["echo"], a * 2)
    np.testing.assert_array_equal(got_b["echo"], b * 2)
    assert batcher.stats.sizes == {1: 1, 2: 2}


# ------------------------------------------------------------------------------------------ back-pressure and failure


async def test_a_full_queue_refuses_at_once(session: Session, make_batcher) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(session.run)
    batcher = make_batcher(gate, max_batch_size=8, max_queue_size=2)
    plug = await plugged(batcher, gate)
    inputs = [rows(1, seed=1), rows(2, seed=2)]
    tasks = [asyncio.create_task(batcher.submit(x, len(x["input"]))) for x in inputs]
    await until(lambda: batcher.queue_depth == 2)

    with pytest.raises(QueueFull, match=r"the queue is full \(2 requests waiting\)"):
        await asyncio.wait_for(batcher.submit(rows(1, seed=3), 1), timeout=1.0)
    assert batcher.stats.rejected == 1
    assert batcher.queue_depth == 2

    gate.open()
    results = await asyncio.gather(*tasks)
    await plug
    for x, got in zip(inputs, results, strict=True):
        assert_same(got, session.run(x))
    assert_same(await batcher.submit(rows(1, seed=4), 1), session.run(rows(1, seed=4)))  # room again


async def test_a_cancelled_waiting_request_is_dropped(session: Session, make_batcher) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(session.run)
    batcher = make_batcher(gate, max_batch_size=8)
    plug = await plugged(batcher, gate)
    inputs = [rows(2, seed=1), rows(3, seed=2), rows(2, seed=3)]
    tasks = [asyncio.create_task(batcher.submit(x, len(x["input"]))) for x in inputs]
    await until(lambda: batcher.queue_depth == 3)

    tasks[1].cancel()
    gate.open()
    first, last = await asyncio.gather(tasks[0], tasks[2])

    await plug
    assert tasks[1].cancelled()
    assert_same(first, session.run(inputs[0]))
    assert_same(last, session.run(inputs[2]))
    assert batcher.stats.sizes == {1: 1, 4: 1}  # the cancelled request's 3 rows never ran
    assert batcher.stats.requests == 3 and batcher.queue_depth == 0


async def test_a_runtime_error_reaches_every_request_of_the_batch(session: Session, make_batcher) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(session.run)
    batcher = make_batcher(gate, max_batch_size=8)
    plug = await plugged(batcher, gate)
    # float64 stacks fine in the batcher but ONNX Runtime refuses it: the real runtime's error, no mock.
    bad = [{"input": rows(n, seed=n)["input"].astype(np.float64)} for n in (1, 2, 3)]
    tasks = [asyncio.create_task(batcher.submit(x, len(x["input"]))) for x in bad]
    await until(lambda: batcher.queue_depth == 3)

    gate.open()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    await plug
    assert all(isinstance(o, Exception) and "tensor(double)" in str(o) for o in outcomes), outcomes
    assert len({id(o) for o in outcomes}) == 1  # one run, one error, delivered to each request
    assert batcher.stats.sizes == {1: 1}  # failed runs are not counted as executions
    # The batcher keeps serving after a failed batch.
    assert_same(await batcher.submit(rows(2, seed=7), 2), session.run(rows(2, seed=7)))


async def test_stop_answers_queued_and_running_requests(session: Session, make_batcher) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(session.run)
    batcher = make_batcher(gate, max_batch_size=8)
    plug = await plugged(batcher, gate)
    queued = asyncio.create_task(batcher.submit(rows(2, seed=1), 2))
    await until(lambda: batcher.queue_depth == 1)

    await batcher.stop()
    gate.open()

    for task in (plug, queued):
        with pytest.raises(QueueFull, match="shutting down"):
            await asyncio.wait_for(task, timeout=5.0)


def test_max_batch_size_must_be_positive(executor: ThreadPoolExecutor) -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        DynamicBatcher(lambda x: x, executor, max_batch_size=0, max_queue_delay_s=0.0, max_queue_size=1)


# ------------------------------------------------------------------------------------------ never waits for nothing


@pytest.mark.parametrize("on_loop", [False, True], ids=["worker-thread", "event-loop"])
async def test_an_idle_batcher_answers_a_lone_request_without_waiting_the_queue_delay(
        session: Session, executor: ThreadPoolExecutor, on_loop: bool) -> None:
    batcher = DynamicBatcher(session.run, None if on_loop else executor, max_batch_size=64, max_queue_delay_s=5.0,
                             max_queue_size=16)
    batcher.start()
    try:
        for seed in range(3):
            started = time.monotonic()
            got = await asyncio.wait_for(batcher.submit(rows(1, seed), 1), timeout=30)
            assert time.monotonic() - started < 1.0  # a 5 s delay: waiting for it would be unmistakable
            assert_same(got, session.run(rows(1, seed)))
    finally:
        await batcher.stop()
    assert batcher.stats.sizes == {1: 3}


async def test_arrivals_during_a_run_go_together_when_it_ends(session: Session, make_batcher) -> None:  # type: ignore[no-untyped-def]
    gate = Gate(session.run)
    batcher = make_batcher(gate, max_batch_size=64, max_queue_delay_s=5.0)
    plug = await plugged(batcher, gate)  # running: everything below arrives during this run
    inputs = [rows(2, seed=i) for i in range(5)]
    tasks = [asyncio.create_task(batcher.submit(x, 2)) for x in inputs]
    await until(lambda: batcher.queue_depth == 5)

    started = time.monotonic()
    gate.open()
    results = await asyncio.gather(*tasks)
    assert time.monotonic() - started < 1.0  # the batch of 10 rows did not wait to fill up to 64

    await plug
    for x, got in zip(inputs, results, strict=True):
        assert_same(got, session.run(x))
    assert batcher.stats.sizes == {1: 1, 10: 1}


async def test_unbatched_runs_are_plain_calls(session: Session, executor: ThreadPoolExecutor) -> None:
    for pool in (None, executor):
        runner = DirectRunner(session.run, pool, max_queue_size=4)
        runner.start()
        inputs = [rows(n, seed=n) for n in (1, 3, 2)]
        results = await asyncio.gather(*(runner.submit(x, len(x["input"])) for x in inputs))
        for x, got in zip(inputs, results, strict=True):
            assert_same(got, session.run(x))
        assert runner.stats.sizes == {1: 1, 3: 1, 2: 1} and runner.queue_depth == 0
        await runner.stop()
        with pytest.raises(QueueFull, match="shutting down"):
            await runner.submit(inputs[0], 1)
