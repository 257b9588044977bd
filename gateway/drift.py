"""Input drift per color: each color's live inputs against the model's reference data, feature by feature.

Why per color: the release plan compares blue and green on latency, errors and accuracy, but a candidate can look
worse (or better) only because it is *fed* differently — sticky routing keys that send it a biased population, a
client release that talks only to the new version. Comparing each color's inputs with the data the model was
validated on (the holdout ``bluegreen build-models`` ships beside each version, ``<repo>/<model>/<version>/
holdout.npz``) tells those apart from a worse model.

The measure is the population stability index per feature::

    PSI = sum over bins of (live share - reference share) * ln(live share / reference share)

over quantile bins cut on the reference (``bins`` cuts, merged where the reference's values repeat, so a pixel
that is always 0 has two bins: 0 and above), with half a row added to every bin on both sides so an empty bin is
finite. Customary reading: below 0.1 stable, 0.1-0.25 moderate, above 0.25 a shift worth acting on (the default
threshold). With n live rows, pure sampling noise gives about (bins - 1) / n per feature, so nothing is reported
before ``min_rows``. A color's figure, ``bluegreen_input_drift{model, color}``, is its largest feature's PSI over
a rolling ``window_s`` (twelve slots); ``GET /admin/v1/models/{m}/drift`` lists the top features.

Cost: the request path makes one counter step per answered request of a model with a reference (a
``sample_percent`` share is selected) and a ``put_nowait`` of the body's reference for the selected ones; a
reader task parses and bins them off the request path. A full queue skips samples (drift is a statistic: a
skipped sample loses nothing but precision). Features are the reference array's columns, the request's input of
the same name (``input`` for the bundled models) flattened per row, named ``input[<column>]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gateway.payload_log import tensors
from gateway.settings import DriftSettings
from gateway.telemetry import Telemetry

log = logging.getLogger(__name__)

__all__ = ["DriftMonitor", "Reference", "psi"]

_STRIDE = 37
_SMOOTHING = 0.5  # rows added to every bin, live and reference alike
SLOTS = 12
TOP = 5


@dataclass(frozen=True)
class Reference:
    """A version's reference data, reduced to what drift needs: per feature, the bin cuts and the share of
    reference rows in each bin (padded to a common width; ``used`` marks each feature's real bins)."""

    input_name: str
    path: Path
    edges: np.ndarray  # [features, bins - 1], +inf where a feature has fewer cuts
    expected: np.ndarray  # [features, bins] smoothed shares (0 in unused bins)
    used: np.ndarray  # [features, bins] bool
    rows: int

    @classmethod
    def from_array(cls, data: np.ndarray, bins: int, path: Path, input_name: str = "input") -> Reference:
        x = np.asarray(data, dtype=np.float64).reshape(len(data), -1)
        features = x.shape[1]
        edges = np.full((features, bins - 1), np.inf)
        for f in range(features):
            cuts = np.unique(np.quantile(x[:, f], np.arange(1, bins) / bins))
            edges[f, :len(cuts)] = cuts
        used = np.zeros((features, bins), dtype=bool)
        used[:, 0] = True
        used[:, 1:] = np.isfinite(edges)
        counts = bin_counts(x, edges, bins)
        return cls(input_name, path, edges, shares(counts, used, len(x)), used, len(x))

    @classmethod
    def load(cls, path: Path, bins: int, input_name: str = "input") -> Reference | None:
        """The reference in a holdout file, or None (no file, no such array, or not numeric)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                array = np.asarray(data[input_name])
        except (OSError, KeyError, ValueError):
            return None
        if array.ndim < 2 or array.dtype.kind not in "iuf" or len(array) < 2:
            return None
        return cls.from_array(array, bins, path, input_name)

    @property
    def features(self) -> int:
        return int(self.edges.shape[0])

    def feature_name(self, f: int) -> str:
        return f"{self.input_name}[{f}]"


def bin_counts(x: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    """[features, bins] row counts: a value's bin is how many of its feature's cuts lie strictly below it."""
    index = (x[:, :, None] > edges[None, :, :]).sum(axis=2)  # [rows, features]
    flat = index + np.arange(x.shape[1])[None, :] * bins
    return np.bincount(flat.ravel(), minlength=x.shape[1] * bins).reshape(x.shape[1], bins)


def shares(counts: np.ndarray, used: np.ndarray, rows: int) -> np.ndarray:
    smoothed = (counts + _SMOOTHING) * used
    result: np.ndarray = smoothed / (rows + _SMOOTHING * used.sum(axis=1, keepdims=True))
    return result


def psi(live: np.ndarray, expected: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Per feature PSI of live shares against expected ones, over each feature's real bins."""
    safe_live = np.where(used, live, 1.0)
    safe_expected = np.where(used, expected, 1.0)
    result: np.ndarray = ((safe_live - safe_expected) * np.log(safe_live / safe_expected)).sum(axis=1)
    return result


@dataclass
class ColorWindow:
    """One color's binned live rows in time slots; a new version starts it afresh."""

    version: str
    slots: deque[tuple[int, np.ndarray, int]] = field(default_factory=deque)  # (slot number, counts, rows)

    def add(self, slot: int, counts: np.ndarray, rows: int, keep: int) -> None:
        if self.slots and self.slots[-1][0] == slot:
            _, total, n = self.slots[-1]
            self.slots[-1] = (slot, total + counts, n + rows)
        else:
            self.slots.append((slot, counts, rows))
        self.expire(slot, keep)

    def expire(self, slot: int, keep: int) -> None:
        while self.slots and self.slots[0][0] <= slot - keep:
            self.slots.popleft()

    def totals(self) -> tuple[np.ndarray | None, int]:
        if not self.slots:
            return None, 0
        counts = sum((c for _, c, _ in self.slots), start=np.zeros_like(self.slots[0][1]))
        return counts, sum(n for _, _, n in self.slots)


@dataclass(slots=True)
class _Sample:
    model: str
    color: str
    version: str
    body: bytes
    header_length: str | None


class DriftMonitor:
    """Samples answered requests (request path), bins their inputs (reader task), reports PSI per color."""

    def __init__(self, settings: DriftSettings, repo: Path | None, telemetry: Telemetry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.repo = repo
        self.enabled = repo is not None and settings.sample_percent > 0
        self._clock = clock
        self._slot_s = settings.window_s / SLOTS
        self._references: dict[tuple[str, str], Reference | None] = {}
        self._windows: dict[tuple[str, str], ColorWindow] = {}
        self._counters: dict[str, itertools.count[int]] = {}
        self._queue: asyncio.Queue[_Sample] = asyncio.Queue(settings.queue_size)
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()  # windows change on the reader's thread and are read on the loop
        self.skipped = 0
        if telemetry is not None:
            telemetry.gauge("bluegreen_input_drift", "Largest per-feature population stability index of a color's "
                            "live inputs against the model's reference data, over the drift window (absent before "
                            "min_rows rows).", ("model", "color"), self._gauge)

    # ------------------------------------------------------------------ request path

    def offer(self, model: str, color: str, version: str, body: bytes, header_length: str | None) -> None:
        """Queue this answered request's body if the sample share selects it (the caller checked ``enabled``)."""
        if self._references.get((model, version), True) is None:
            return  # this version has no reference: nothing to compare with
        counter = self._counters.get(model)
        if counter is None:
            counter = self._counters[model] = itertools.count()
        if (next(counter) * _STRIDE) % 100 >= self.settings.sample_percent:
            return
        try:
            self._queue.put_nowait(_Sample(model, color, version, body, header_length))
        except asyncio.QueueFull:
            self.skipped += 1

    # ------------------------------------------------------------------ the reader

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="input-drift")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < 256 and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await asyncio.to_thread(self.add_samples, batch)
            except Exception:  # one bad round must not end drift for the process
                log.exception("input drift: a batch of samples could not be read")

    def add_samples(self, batch: list[_Sample]) -> None:
        """Parse a batch of sampled bodies and bin their rows, one binning per (model, color, version)."""
        groups: dict[tuple[str, str, str], list[np.ndarray]] = {}
        for s in batch:
            ref = self.reference(s.model, s.version)
            rows = None if ref is None else self._rows(s, ref)
            if rows is not None:
                groups.setdefault((s.model, s.color, s.version), []).append(rows)
        for (model, color, version), parts in groups.items():
            self.add_rows(model, color, version, np.concatenate(parts))

    def _rows(self, s: _Sample, ref: Reference) -> np.ndarray | None:
        try:
            found = tensors(s.body, None if s.header_length is None else int(s.header_length), "inputs")
            tensor = next(t for t in found if t.get("name") == ref.input_name)
            shape = [int(d) for d in tensor["shape"]]
            x = np.asarray(tensor["data"], dtype=np.float64).reshape(shape[0], -1)
        except (StopIteration, KeyError, TypeError, ValueError, IndexError):
            return None
        return x if x.shape[1] == ref.features else None

    def reference(self, model: str, version: str) -> Reference | None:
        """The version's reference (loaded once; None when it has none)."""
        key = (model, version)
        if key not in self._references:
            ref = None
            if self.repo is not None:
                ref = Reference.load(self.repo / model / version / "holdout.npz", self.settings.bins)
            self._references[key] = ref
        return self._references[key]

    def add_rows(self, model: str, color: str, version: str, rows: np.ndarray) -> None:
        """Bin live rows into the color's window (a color re-pointed to another version starts afresh)."""
        ref = self.reference(model, version)
        if ref is None:
            return
        counts = bin_counts(rows, ref.edges, ref.expected.shape[1])
        with self._lock:
            window = self._windows.get((model, color))
            if window is None or window.version != version:
                window = self._windows[(model, color)] = ColorWindow(version)
            window.add(int(self._clock() // self._slot_s), counts, len(rows), SLOTS)

    # ------------------------------------------------------------------ read side

    def scores(self, model: str, color: str) -> tuple[np.ndarray | None, int, Reference | None, str | None]:
        """(PSI per feature or None before ``min_rows``, rows in the window, the reference, the version)."""
        with self._lock:
            window = self._windows.get((model, color))
            if window is None:
                return None, 0, None, None
            window.expire(int(self._clock() // self._slot_s), SLOTS)
            counts, rows = window.totals()
        ref = self.reference(model, window.version)
        if counts is None or ref is None or rows < self.settings.min_rows:
            return None, rows, ref, window.version
        return psi(shares(counts, ref.used, rows), ref.expected, ref.used), rows, ref, window.version

    def report(self, model: str, colors: Iterator[str] | tuple[str, ...]) -> dict[str, Any]:
        """What ``GET /admin/v1/models/{m}/drift`` shows: per color, its figure and top features."""
        out: dict[str, Any] = {"model": model, "measure": "psi", "threshold": self.settings.threshold,
                               "window_s": self.settings.window_s, "min_rows": self.settings.min_rows,
                               "sample_percent": self.settings.sample_percent if self.enabled else 0, "colors": {}}
        for color in colors:
            values, rows, ref, version = self.scores(model, color)
            doc: dict[str, Any] = {"version": version, "rows": rows, "drift": None, "drifting": False, "top": [],
                                   "reference": None if ref is None else str(ref.path)}
            if values is not None and ref is not None:
                order = np.argsort(-values)[:TOP]
                doc["drift"] = round(float(values.max()), 4)
                doc["drifting"] = bool(values.max() > self.settings.threshold)
                doc["top"] = [{"feature": ref.feature_name(int(f)), "psi": round(float(values[f]), 4)} for f in order]
            out["colors"][color] = doc
        return out

    def _gauge(self) -> Iterator[tuple[tuple[str, ...], float]]:
        for model, color in list(self._windows):
            values = self.scores(model, color)[0]
            if values is not None:
                yield (model, color), float(values.max())
