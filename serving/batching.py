"""How requests reach a model run: dynamic batching (Triton's semantics) or a plain call.

:class:`DynamicBatcher` never waits for nothing. A request that finds a free model instance runs at the next
turn of the event loop — after the requests the loop has already parsed in this turn, so a burst that arrived
together goes together, but never after a timer. While every instance is busy, arrivals queue; when a run ends
the queue is taken in order, up to ``max_batch_size`` rows, and runs at once. Under load batches therefore form
by themselves (their size is what arrived during the previous run), and an idle server answers a lone request
with no added latency. ``max_queue_delay_s`` is only an upper bound: no request waits for a batch to fill longer
than that, and with this scheme none waits for a batch to fill at all. A request larger than
``max_batch_size`` runs alone; requests whose inner shapes or dtypes differ are never stacked.

A run goes to a worker thread (``executor``, one per model instance) unless the model is tiny: then the hop to
a thread (a future, a thread wake-up, the GIL handed back and forth) costs more CPU than the run itself, and the
run is a plain call on the event loop (``executor=None``). :class:`DirectRunner` is the unbatched path
(``max_batch_size`` 1): no queue at all, one call per request.

Both bound what waits: ``max_queue_size`` requests, beyond which a request is refused at once
(:class:`QueueFull`, answered 503 with Retry-After) instead of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

Tensors = dict[str, np.ndarray]
Run = Callable[[Tensors], Tensors]
OnBatch = Callable[[int, float], None]


class QueueFull(Exception):
    pass


SHUTTING_DOWN = "the model is shutting down"


@dataclass(slots=True)
class _Pending:
    inputs: Tensors
    rows: int
    future: asyncio.Future[Tensors]


@dataclass(slots=True)
class BatchStats:
    """Counters for the metrics seam (the telemetry layer reads these)."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    rejected: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch rows -> number of runs
    #: Seconds model instances spent running (failed runs too, but for the unbatched path's worker threads).
    #: Over wall time and ``instances`` it is the busy ratio: how close the server runs to flat out, which the
    #: queue depth shows only once it is too late.
    busy_s: float = 0.0

    def record(self, rows: int, requests: int) -> None:
        self.batches += 1
        self.rows += rows
        self.requests += requests
        self.sizes[rows] = self.sizes.get(rows, 0) + 1


class DynamicBatcher:
    """Combines queued requests into model runs; ``instances`` runs at most at once (one per worker thread)."""

    def __init__(self, run: Run, executor: Executor | None, *, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int, instances: int = 1, on_batch: OnBatch | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if instances < 1:
            raise ValueError("instances must be >= 1")
        self._run = run
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max(0.0, max_queue_delay_s)  # an upper bound; see the module notes
        self.max_queue_size = max_queue_size
        self.instances = 1 if executor is None else instances  # on the loop, runs are one at a time anyway
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._free = self.instances
        self._kick_scheduled = False
        self._running: list[list[_Pending]] = []
        self._stopped = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = BatchStats()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = False

    async def stop(self) -> None:
        """Refuse what waits and what runs (a run in a thread cannot be interrupted; its answer is dropped)."""
        self._stopped = True
        error = QueueFull(SHUTTING_DOWN)
        for batch in [*self._running, list(self._queue)]:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(error)
        self._queue.clear()
        self._running.clear()

    async def submit(self, inputs: Tensors, rows: int) -> Tensors:
        if self._stopped or self._loop is None:
            raise QueueFull(SHUTTING_DOWN)
        if len(self._queue) >= self.max_queue_size:
            self.stats.rejected += 1
            raise QueueFull(f"the queue is full ({self.max_queue_size} requests waiting)")
        future: asyncio.Future[Tensors] = self._loop.create_future()
        self._queue.append(_Pending(inputs, rows, future))
        if self._free and not self._kick_scheduled:
            # Not now but at the next turn: the requests this turn has already parsed join this batch.
            self._kick_scheduled = True
            self._loop.call_soon(self._kick)
        return await future

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._stopped:
            return
        while self._free and self._queue:
            batch = self._take_batch()
            if not batch:
                return
            if self._executor is None:
                self._run_here(batch)
                if self._queue and not self._kick_scheduled:
                    # One batch per turn on the loop: what arrived while it ran is read before the next one.
                    self._kick_scheduled = True
                    self._loop.call_soon(self._kick)  # type: ignore[union-attr]
                return
            self._free -= 1
            self._running.append(batch)
            inputs, total = _stack(batch)
            started = time.perf_counter()
            job = self._loop.run_in_executor(self._executor, self._run, inputs)  # type: ignore[union-attr]
            job.add_done_callback(functools.partial(self._finished, batch, total, started))

    def _finished(self, batch: list[_Pending], total: int, started: float, job: asyncio.Future[Tensors]) -> None:
        self._free += 1
        if batch in self._running:
            self._running.remove(batch)
        exc = QueueFull(SHUTTING_DOWN) if job.cancelled() else job.exception()
        if exc is None:
            self._deliver(batch, total, started, job.result())
        else:
            self.stats.busy_s += time.perf_counter() - started
            _fail(batch, exc)
        self._kick()  # whatever gathered during the run goes now

    def _run_here(self, batch: list[_Pending]) -> None:
        inputs, total = _stack(batch)
        started = time.perf_counter()
        try:
            outputs = self._run(inputs)
        except Exception as exc:  # delivered to every request of the batch
            self.stats.busy_s += time.perf_counter() - started
            _fail(batch, exc)
            return
        self._deliver(batch, total, started, outputs)

    def _deliver(self, batch: list[_Pending], total: int, started: float, outputs: Tensors) -> None:
        elapsed = time.perf_counter() - started
        self.stats.busy_s += elapsed
        self.stats.record(total, len(batch))
        if self._on_batch is not None:
            self._on_batch(total, elapsed)
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
            return
        for name, arr in outputs.items():
            if arr.ndim == 0 or arr.shape[0] != total:
                _fail(batch, RuntimeError(f"output {name!r} has shape {arr.shape}: not batch-major, cannot split"))
                return
        offset = 0
        for p in batch:
            part = {name: arr[offset:offset + p.rows] for name, arr in outputs.items()}
            offset += p.rows
            if not p.future.done():
                p.future.set_result(part)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        queue = self._queue
        while queue:
            head = queue[0]
            if head.future.done():  # the client went away while waiting
                queue.popleft()
                continue
            if batch and (rows + head.rows > self.max_batch_size or not _stackable(batch[0].inputs, head.inputs)):
                break
            queue.popleft()
            batch.append(head)
            rows += head.rows
            if rows >= self.max_batch_size:
                break
        return batch


class DirectRunner:
    """The unbatched path (``max_batch_size`` 1): every request is one run, a plain call.

    On the loop (``executor=None``) nothing ever waits, so there is no queue; on worker threads, at most
    ``instances`` run and ``max_queue_size`` more wait (in the executor's own queue) before new ones are refused.
    """

    max_batch_size = 1

    def __init__(self, run: Run, executor: Executor | None, *, max_queue_size: int, instances: int = 1,
                 on_batch: OnBatch | None = None) -> None:
        self._run = run
        self._executor = executor
        self.max_queue_size = max_queue_size
        self.instances = 1 if executor is None else instances
        self._on_batch = on_batch
        self._in_flight = 0
        self._stopped = True
        self.stats = BatchStats()

    @property
    def queue_depth(self) -> int:
        return max(0, self._in_flight - self.instances)

    def start(self) -> None:
        self._stopped = False

    async def stop(self) -> None:
        self._stopped = True

    async def submit(self, inputs: Tensors, rows: int) -> Tensors:
        if self._stopped:
            raise QueueFull(SHUTTING_DOWN)
        started = time.perf_counter()
        if self._executor is None:
            try:
                outputs = self._run(inputs)
            finally:
                self.stats.busy_s += time.perf_counter() - started
        else:
            if self._in_flight >= self.max_queue_size + self.instances:
                self.stats.rejected += 1
                raise QueueFull(f"the queue is full ({self.max_queue_size} requests waiting)")
            self._in_flight += 1
            try:
                outputs, ran_s = await asyncio.get_running_loop().run_in_executor(
                    self._executor, _timed, self._run, inputs)
                self.stats.busy_s += ran_s
            finally:
                self._in_flight -= 1
            if self._stopped:
                raise QueueFull(SHUTTING_DOWN)
        self.stats.record(rows, 1)
        if self._on_batch is not None:
            self._on_batch(rows, time.perf_counter() - started)
        return outputs


Runner = DynamicBatcher | DirectRunner


def _stack(batch: list[_Pending]) -> tuple[Tensors, int]:
    if len(batch) == 1:
        return batch[0].inputs, batch[0].rows
    inputs = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
    return inputs, sum(p.rows for p in batch)


def _timed(run: Run, inputs: Tensors) -> tuple[Tensors, float]:
    """A run and its duration in the worker thread, without the wait in the executor's queue (a failed run's time
    is not counted on this path: the exception carries no duration)."""
    started = time.perf_counter()
    outputs = run(inputs)
    return outputs, time.perf_counter() - started


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)


def _stackable(a: Tensors, b: Tensors) -> bool:
    """Two requests combine when they carry the same inputs with the same non-batch dimensions and dtypes."""
    if a.keys() != b.keys():
        return False
    return all(a[k].shape[1:] == b[k].shape[1:] and a[k].dtype == b[k].dtype for k in a)
