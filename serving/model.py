"""A served model: load → warm up → predict (batched or not) → unload."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from serving.batching import DirectRunner, DynamicBatcher, Runner, Tensors
from serving.protocol import DATATYPES, Signature, TensorSpec
from serving.runtime import Device, Session

log = logging.getLogger(__name__)


class Model:
    """One model version. :meth:`load` is blocking (call it off the loop); :meth:`predict` is async."""

    platform = "onnxruntime_onnx"

    def __init__(self, name: str, version: str, folder: Path, *, device: Device = "auto", threads: int = 0,
                 max_batch_size: int = 64, max_queue_delay_ms: float = 2.0, max_queue_size: int = 1024,
                 warmup_runs: int = 3, instances: int = 1, spin_wait: bool = False,
                 inline_run_max_us: float = 0.0) -> None:
        self.name = name
        self.version = version
        self.folder = folder
        self.metadata: dict[str, Any] = {}
        self._device = device
        self._threads = threads
        self._spin_wait = spin_wait
        self._max_batch_size = max_batch_size
        self._max_queue_delay_ms = max_queue_delay_ms
        self._max_queue_size = max_queue_size
        self._warmup_runs = warmup_runs
        self._instances = instances
        self._inline_run_max_us = inline_run_max_us
        self.session: Session | None = None
        self.signature = Signature((), ())
        self.batcher: Runner | None = None
        self.ready = False
        self.run_us: float | None = None  # median warm-up run at the largest batch, decides inline vs thread
        self.inline = False
        # One worker thread per instance: ONNX Runtime parallelises inside a run (intra-op threads); running
        # more batches at once than instances on the same cores would only make each slower.
        self._executor: ThreadPoolExecutor | None = None

    def load(self) -> None:
        started = time.perf_counter()
        self.session = Session(self.folder / "model.onnx", self._device, self._threads, self._spin_wait)
        ins, outs = self.session.io_specs()
        self.signature = Signature(tuple(TensorSpec(n, d, tuple(s)) for n, d, s in ins),
                                   tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outs))
        timings: list[float] = []
        largest = self._zeros(self._max_batch_size)
        for _ in range(self._warmup_runs):
            self.session.run(self._zeros(1))
            t0 = time.perf_counter()
            self.session.run(largest)
            timings.append(time.perf_counter() - t0)
        if timings:
            self.run_us = statistics.median(timings) * 1e6
        # A run that takes less than the hop to a worker thread costs (measured: docs/architecture.md) is a
        # plain call on the event loop; the loop is then busy for at most that long per batch.
        self.inline = self.run_us is not None and self.run_us <= self._inline_run_max_us
        if not self.inline:
            self._executor = ThreadPoolExecutor(max_workers=self._instances,
                                                thread_name_prefix=f"infer-{self.name}-{self.version}")
        where = "on the event loop" if self.inline else f"on {self._instances} worker thread(s)"
        run = f"{self.run_us:.0f} us" if self.run_us is not None else "not measured"
        log.info("loaded %s:%s on %s (%d threads) in %.2fs; batch %d runs in %s, %s", self.name, self.version,
                 self.session.providers[0], self.session.threads, time.perf_counter() - started,
                 self._max_batch_size, run, where)

    def _zeros(self, rows: int) -> Tensors:
        return {s.name: np.zeros([rows if d == -1 else d for d in s.shape], dtype=DATATYPES[s.datatype])
                for s in self.signature.inputs}

    def start(self, on_batch: Callable[[int, float], None] | None = None) -> None:
        """Start the batcher on the running loop; the model is ready from here on. ``on_batch(rows, seconds)``
        is called after every model run (the metrics seam)."""
        assert self.session is not None, "load() first"
        if self._max_batch_size == 1:
            self.batcher = DirectRunner(self.session.run, self._executor, max_queue_size=self._max_queue_size,
                                        instances=self._instances, on_batch=on_batch)
        else:
            self.batcher = DynamicBatcher(self.session.run, self._executor, max_batch_size=self._max_batch_size,
                                          max_queue_delay_s=self._max_queue_delay_ms / 1000.0,
                                          max_queue_size=self._max_queue_size, instances=self._instances,
                                          on_batch=on_batch)
        self.batcher.start()
        self.ready = True

    async def predict(self, inputs: Tensors, rows: int) -> Tensors:
        assert self.batcher is not None
        return await self.batcher.submit(inputs, rows)

    async def unload(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self.session = None

    def metadata_json(self, versions: list[str]) -> dict[str, Any]:
        return {"name": self.name, "versions": versions, "platform": self.platform,
                "inputs": [s.as_json() for s in self.signature.inputs],
                "outputs": [s.as_json() for s in self.signature.outputs]}
