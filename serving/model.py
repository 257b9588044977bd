"""A served model: load → warm up → predict (batched) → unload."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from serving.batching import DynamicBatcher, Tensors
from serving.protocol import DATATYPES, Signature, TensorSpec
from serving.runtime import Device, Session

log = logging.getLogger(__name__)


class Model:
    """One model version. :meth:`load` is blocking (call it off the loop); :meth:`predict` is async."""

    platform = "onnxruntime_onnx"

    def __init__(self, name: str, version: str, folder: Path, *, device: Device = "auto", threads: int = 0,
                 max_batch_size: int = 64, max_queue_delay_ms: float = 2.0, max_queue_size: int = 1024,
                 warmup_runs: int = 3) -> None:
        self.name = name
        self.version = version
        self.folder = folder
        self.metadata: dict[str, Any] = {}
        self._device = device
        self._threads = threads
        self._max_batch_size = max_batch_size
        self._max_queue_delay_ms = max_queue_delay_ms
        self._max_queue_size = max_queue_size
        self._warmup_runs = warmup_runs
        self.session: Session | None = None
        self.signature = Signature((), ())
        self.batcher: DynamicBatcher | None = None
        self.ready = False
        # One worker thread per model: ONNX Runtime parallelises inside a run (intra-op threads); running
        # several batches at once on the same cores would only make each slower.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}-{version}")

    def load(self) -> None:
        started = time.perf_counter()
        self.session = Session(self.folder / "model.onnx", self._device, self._threads)
        ins, outs = self.session.io_specs()
        self.signature = Signature(tuple(TensorSpec(n, d, tuple(s)) for n, d, s in ins),
                                   tuple(TensorSpec(n, d, tuple(s)) for n, d, s in outs))
        for _ in range(self._warmup_runs):
            for rows in {1, self._max_batch_size}:
                self.session.run(self._zeros(rows))
        log.info("loaded %s:%s on %s (%d threads) in %.2fs", self.name, self.version, self.session.providers[0],
                 self.session.threads, time.perf_counter() - started)

    def _zeros(self, rows: int) -> Tensors:
        return {s.name: np.zeros([rows if d == -1 else d for d in s.shape], dtype=DATATYPES[s.datatype])
                for s in self.signature.inputs}

    def start(self, on_batch: Callable[[int, float], None] | None = None) -> None:
        """Start the batcher on the running loop; the model is ready from here on. ``on_batch(rows, seconds)``
        is called after every model run (the metrics seam)."""
        assert self.session is not None, "load() first"
        self.batcher = DynamicBatcher(self.session.run, self._executor, max_batch_size=self._max_batch_size,
                                      max_queue_delay_s=self._max_queue_delay_ms / 1000.0,
                                      max_queue_size=self._max_queue_size, on_batch=on_batch)
        self.batcher.start()
        self.ready = True

    async def predict(self, inputs: Tensors, rows: int) -> Tensors:
        assert self.batcher is not None
        return await self.batcher.submit(inputs, rows)

    async def unload(self) -> None:
        self.ready = False
        if self.batcher is not None:
            await self.batcher.stop()
        self._executor.shutdown(wait=True)
        self.session = None

    def metadata_json(self, versions: list[str]) -> dict[str, Any]:
        return {"name": self.name, "versions": versions, "platform": self.platform,
                "inputs": [s.as_json() for s in self.signature.inputs],
                "outputs": [s.as_json() for s in self.signature.outputs]}
