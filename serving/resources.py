"""Resource readings for the alerts on utilization (docs/operations.md): process CPU, memory and file
descriptors with the container's limits, for the gateway and the model server; GPU utilization and memory per
device for the model server.

Process figures come from prometheus_client's ``ProcessCollector`` (it reads ``/proc/self``), under its standard
names (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``process_open_fds``,
``process_max_fds``) so that existing dashboards and habits apply; they are rendered through our
:class:`~serving.metrics.MetricSet`, so OTLP carries them too.

The limits they are compared with are read by the process itself from its cgroup (v2 ``cpu.max`` and
``memory.max``, v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` and ``memory.limit_in_bytes``) rather than taken
from kube-state-metrics' ``kube_pod_container_resource_limits``: the figure is the one the kernel enforces
(also after an in-place resize, and outside Kubernetes), it arrives on the same scrape with the same labels as
the usage (no join on pod and container names), and nothing else needs to be installed. Without a limit the
process can use the machine: the limit reported is then the CPUs it may run on and the machine's memory.

GPU figures come from NVML through ``nvidia-ml-py`` (the ``gpu`` extra; the CUDA image installs it), imported
only when the sampler starts. A thread reads every device every few seconds, off the request path, and the
gauges report the last reading. Where the module, the driver or a device is missing the series are absent —
not zero, and no error: a CPU-only machine has no GPU to be 0% busy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import ProcessCollector

from serving.metrics import MetricSet

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: How often the GPU sampler reads NVML. Utilization is NVML's own average over its last sample period
#: (1/6 s to 1 s depending on the device), so a reading every few seconds is a sample, not an average.
GPU_INTERVAL_S = 5.0
#: How long a reading of the cgroup limits is reused (an in-place pod resize shows within this).
LIMITS_MAX_AGE_S = 30.0
_Series = Iterator[tuple[tuple[str, ...], float]]


# ------------------------------------------------------------------------------------------ process


class ProcessReadings:
    """The process collector's samples, read at most once per collection (``max_age_s``): one scrape asks for
    four figures and should not list ``/proc/self/fd`` four times."""

    def __init__(self, max_age_s: float = 0.5) -> None:
        self._collector = ProcessCollector(registry=None)
        self._max_age_s = max_age_s
        self._at = float("-inf")
        self._values: dict[str, float] = {}

    def values(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self._at > self._max_age_s:
            self._values = {s.name: float(s.value) for fam in self._collector.collect() for s in fam.samples}
            self._at = now
        return self._values

    def one(self, name: str) -> _Series:
        value = self.values().get(name)
        if value is not None:  # absent off Linux: the collector yields nothing there
            yield (), value


def _cgroup_file(name: str, controller: str | None) -> Path | None:
    """A cgroup file of this process: under its own cgroup's path when the hierarchy is mounted whole (no cgroup
    namespace), else at the mount's root (a container's view, where the root is its own cgroup)."""
    base = CGROUP_ROOT if controller is None else CGROUP_ROOT / controller
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller is not None and
                                                          controller in controllers.split(",")):
            own = base / path.lstrip("/") / name
            if own.is_file():
                return own
    root = base / name
    return root if root.is_file() else None


def _read(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text().strip()
    except OSError:
        return None


def host_cpus() -> float:
    return float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def host_memory_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cpu_limit_cores() -> float:
    """The CFS quota in cores (v2 ``cpu.max``, else v1), or the CPUs this process may run on."""
    text = _read(_cgroup_file("cpu.max", None))
    if text is not None:
        quota, _, period = text.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
    quota_text = _read(_cgroup_file("cpu.cfs_quota_us", "cpu"))
    period_text = _read(_cgroup_file("cpu.cfs_period_us", "cpu"))
    if quota_text and period_text and int(quota_text) > 0:
        return int(quota_text) / int(period_text)
    return host_cpus()


def memory_limit_bytes() -> float:
    """The cgroup memory limit (v2 ``memory.max``, else v1), or the machine's memory when there is none (v1's
    "no limit" is a huge number, hence the cap)."""
    host = host_memory_bytes()
    for text in (_read(_cgroup_file("memory.max", None)), _read(_cgroup_file("memory.limit_in_bytes", "memory"))):
        if text is not None and text.isdigit():
            return min(float(text), host)
    return host


class _Every:
    """A reading kept for ``max_age_s``: finding and reading the cgroup files costs ~0.7 ms, on the event loop
    that answers /metrics, for a figure that changes only when a pod is resized."""

    def __init__(self, read: Callable[[], float], max_age_s: float = LIMITS_MAX_AGE_S) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._at = float("-inf")
        self._value = 0.0

    def __call__(self) -> _Series:
        now = time.monotonic()
        if now - self._at > self._max_age_s:
            self._value = self._read()
            self._at = now
        yield (), self._value


def register_process_metrics(metrics: MetricSet) -> None:
    """The process collector's figures and the container's limits, as collection-time series of ``metrics``."""
    p = ProcessReadings()
    limit_cpu, limit_memory = _Every(cpu_limit_cores), _Every(memory_limit_bytes)

    metrics.live_counter("process_cpu_seconds", "User and system CPU time of this process, seconds.", (),
                         lambda: p.one("process_cpu_seconds_total"))
    metrics.gauge("process_resident_memory_bytes", "Resident memory of this process (RSS), bytes.", (),
                  lambda: p.one("process_resident_memory_bytes"))
    metrics.gauge("process_open_fds", "Open file descriptors of this process.", (),
                  lambda: p.one("process_open_fds"))
    metrics.gauge("process_max_fds", "The process's limit on open file descriptors.", (),
                  lambda: p.one("process_max_fds"))
    metrics.gauge("bluegreen_cpu_limit_cores", "CPU this process may use: its cgroup's CFS quota in cores, or "
                  "the CPUs it may run on when there is no quota.", (), limit_cpu)
    metrics.gauge("bluegreen_memory_limit_bytes", "Memory this process may use: its cgroup's limit, or the "
                  "machine's memory when there is none.", (), limit_memory)


# ------------------------------------------------------------------------------------------ GPU


class GpuSampler:
    """Per-device utilization and memory from NVML, read by a daemon thread every ``interval_s``.

    ``readings`` maps (index, uuid) to (utilization ratio, memory used, memory total); it is empty — and the
    gauges yield nothing — until a reading succeeds, and stays empty where NVML is missing. A device whose
    reading fails (it fell off the bus, the driver restarted) is dropped until it reads again."""

    def __init__(self, interval_s: float = GPU_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.readings: dict[tuple[str, str], tuple[float, float, float]] = {}
        self.available = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None

    def start(self) -> None:
        """Start the reading thread; it initialises NVML first and ends there, leaving no series, on a machine
        without it (nvmlInit may take a moment: not on the event loop)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + 1)
            self._thread = None
        self.readings = {}

    def _run(self) -> None:
        try:
            import pynvml  # nvidia-ml-py: the `gpu` extra

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            log.info("no GPU metrics: NVML is not available (%s)", exc)
            return
        self._nvml = pynvml
        self.available = True
        try:
            self.sample()
            while not self._stop.wait(self.interval_s):
                self.sample()
        finally:
            self.readings = {}
            try:
                pynvml.nvmlShutdown()
            except Exception as exc:  # the process is ending: say so, go on
                log.debug("nvmlShutdown: %s", exc)

    def sample(self) -> None:
        nvml = self._nvml
        readings: dict[tuple[str, str], tuple[float, float, float]] = {}
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            log.warning("NVML: cannot count devices: %s", exc)
            count = 0
        for i in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                util = nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:
                log.warning("NVML: cannot read device %d: %s", i, exc)
                continue
            readings[(str(i), uuid.decode() if isinstance(uuid, bytes) else str(uuid))] = (
                util.gpu / 100.0, float(mem.used), float(mem.total))
        self.readings = readings  # one assignment: the gauges see one whole reading or the previous one

    def register(self, metrics: MetricSet) -> None:
        def figure(i: int) -> Callable[[], _Series]:
            def read() -> _Series:
                for key, values in list(self.readings.items()):
                    yield key, values[i]
            return read

        labels = ("gpu", "uuid")
        metrics.gauge("bluegreen_gpu_utilization_ratio", "Share of time a kernel ran on the device, as NVML "
                      "last measured it (absent without NVML).", labels, figure(0))
        metrics.gauge("bluegreen_gpu_memory_used_bytes", "Device memory in use, bytes (absent without NVML).",
                      labels, figure(1))
        metrics.gauge("bluegreen_gpu_memory_total_bytes", "Device memory, bytes (absent without NVML).", labels,
                      figure(2))
