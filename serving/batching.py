"""Dynamic batching, Triton-style: combine queued requests into one model run.

One runner task per model takes the oldest waiting request, then keeps adding requests until the batch holds
``max_batch_size`` rows or the oldest request has waited ``max_queue_delay``; the batch runs on a worker
thread (never on the event loop) and each request gets exactly its own rows back. While a batch runs the
next one accumulates, so under load batches form without waiting at all. A request larger than
``max_batch_size`` runs alone. ``max_batch_size=1`` turns batching off: requests run one at a time.

The queue is bounded by ``max_queue_size`` requests; a full queue is refused at once (:class:`QueueFull`,
answered 503 with Retry-After) instead of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

Tensors = dict[str, np.ndarray]


class QueueFull(Exception):
    pass


@dataclass(slots=True)
class _Pending:
    inputs: Tensors
    rows: int
    enqueued: float
    future: asyncio.Future[Tensors]


@dataclass(slots=True)
class BatchStats:
    """Counters for the metrics seam (the telemetry layer reads these)."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    rejected: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch rows -> number of runs


class DynamicBatcher:
    def __init__(self, run: Callable[[Tensors], Tensors], executor: Executor, *, max_batch_size: int,
                 max_queue_delay_s: float, max_queue_size: int,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)
        self.max_queue_size = max_queue_size
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._runner(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(QueueFull("the model is shutting down"))

    async def submit(self, inputs: Tensors, rows: int) -> Tensors:
        if len(self._queue) >= self.max_queue_size:
            self.stats.rejected += 1
            raise QueueFull(f"the queue is full ({self.max_queue_size} requests waiting)")
        future: asyncio.Future[Tensors] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, rows, time.monotonic(), future))
        self._queued_rows += rows
        self._wakeup.set()
        return await future

    async def _runner(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_batch_size > 1 and self._queued_rows < self.max_batch_size:
                deadline = self._queue[0].enqueued + self.max_queue_delay_s
                while self._queued_rows < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            if batch:
                await self._execute(batch)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # the client went away while waiting
                self._queue.popleft()
                self._queued_rows -= head.rows
                continue
            if batch and (rows + head.rows > self.max_batch_size or not _stackable(batch[0].inputs, head.inputs)):
                break
            self._queue.popleft()
            self._queued_rows -= head.rows
            batch.append(head)
            rows += head.rows
            if rows >= self.max_batch_size:
                break
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
        total = sum(p.rows for p in batch)
        started = time.perf_counter()
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, inputs)
        except asyncio.CancelledError:
            # stop() while this batch runs: its requests are off the queue, so only this can answer them.
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(QueueFull("the model is shutting down"))
            raise
        except Exception as exc:  # delivered to every request of the batch
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.rows += total
        self.stats.requests += len(batch)
        self.stats.sizes[total] = self.stats.sizes.get(total, 0) + 1
        if self._on_batch is not None:
            self._on_batch(total, elapsed)
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
            return
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                err = RuntimeError(f"output {name!r} has shape {arr.shape}: not batch-major, cannot split a batch")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                return
        offset = 0
        for p in batch:
            part = {name: arr[offset:offset + p.rows] for name, arr in outputs.items()}
            offset += p.rows
            if not p.future.done():
                p.future.set_result(part)


def _stackable(a: Tensors, b: Tensors) -> bool:
    """Two requests combine when they carry the same inputs with the same non-batch dimensions and dtypes."""
    if a.keys() != b.keys():
        return False
    return all(a[k].shape[1:] == b[k].shape[1:] and a[k].dtype == b[k].dtype for k in a)
