"""serving/resources.py and the batcher's busy time: the container limits read from cgroup files (v2 and v1, set
and unset), the process series through a MetricSet, the GPU sampler's series, and busy seconds that add up to
the time the runs took.

The GPU sampler's NVML is NVIDIA's library, which needs a GPU and its driver: here a stand-in with NVML's call
names serves the readings (the sampler's own code is what runs), and tests/k8s/test_monitoring.py checks the
real library end to end — series per device on a machine with a GPU, none on one without.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving import resources
from serving.batching import DirectRunner, DynamicBatcher, Tensors
from serving.metrics import MetricSet


@pytest.fixture
def cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(resources, "CGROUP_ROOT", tmp_path)
    return tmp_path


def test_cgroup_v2_limits(cgroup: Path) -> None:
    (cgroup / "cpu.max").write_text("150000 100000\n")
    (cgroup / "memory.max").write_text("536870912\n")
    assert resources.cpu_limit_cores() == 1.5
    assert resources.memory_limit_bytes() == 536870912


def test_cgroup_v2_without_limits_is_the_machine(cgroup: Path) -> None:
    (cgroup / "cpu.max").write_text("max 100000\n")
    (cgroup / "memory.max").write_text("max\n")
    assert resources.cpu_limit_cores() == len(os.sched_getaffinity(0))
    assert resources.memory_limit_bytes() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_cgroup_v1_limits_and_its_unlimited_value(cgroup: Path) -> None:
    (cgroup / "cpu").mkdir()
    (cgroup / "memory").mkdir()
    (cgroup / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (cgroup / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (cgroup / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert resources.cpu_limit_cores() == 2.0
    assert resources.memory_limit_bytes() == resources.host_memory_bytes()
    (cgroup / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (cgroup / "memory" / "memory.limit_in_bytes").write_text("1073741824\n")
    assert resources.cpu_limit_cores() == resources.host_cpus()
    assert resources.memory_limit_bytes() == 1073741824


def _scrape(metrics: MetricSet) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.prometheus_text().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_process_series_and_limits_through_a_metric_set() -> None:
    metrics = MetricSet("test")
    resources.register_process_metrics(metrics)
    before = _scrape(metrics)
    sum(i * i for i in range(300_000))  # some CPU time
    after = _scrape(metrics)
    assert after["process_cpu_seconds_total"][0][1] >= before["process_cpu_seconds_total"][0][1] > 0
    assert after["process_resident_memory_bytes"][0][1] > 10 * 2**20
    assert 0 < after["process_open_fds"][0][1] < after["process_max_fds"][0][1]
    assert after["bluegreen_cpu_limit_cores"] == [({}, resources.cpu_limit_cores())]
    assert after["bluegreen_memory_limit_bytes"] == [({}, resources.memory_limit_bytes())]


class _Nvml:
    """NVML's calls the sampler makes (NVML's names), answering for two devices; device 1 fails once
    ``fail_1`` is set."""

    def __init__(self) -> None:
        self.fail_1 = False

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if i == 1 and self.fail_1:
            raise RuntimeError("GPU is lost")
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-{h}".encode()

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=40 + 50 * h, memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(used=(h + 1) * 2**30, total=80 * 2**30, free=0)


def test_gpu_series_per_device_and_a_lost_device_drops_out() -> None:
    metrics = MetricSet("test")
    sampler = resources.GpuSampler()
    sampler.register(metrics)
    assert not _scrape(metrics).get("bluegreen_gpu_utilization_ratio")  # nothing read yet: absent, not 0
    nvml = _Nvml()
    sampler._nvml = nvml
    sampler.sample()
    got = _scrape(metrics)
    assert got["bluegreen_gpu_utilization_ratio"] == [({"gpu": "0", "uuid": "GPU-0"}, 0.4),
                                                      ({"gpu": "1", "uuid": "GPU-1"}, 0.9)]
    assert [v for _, v in got["bluegreen_gpu_memory_used_bytes"]] == [2**30, 2 * 2**30]
    assert [v for _, v in got["bluegreen_gpu_memory_total_bytes"]] == [80 * 2**30] * 2
    nvml.fail_1 = True
    sampler.sample()
    assert [labels["gpu"] for labels, _ in _scrape(metrics)["bluegreen_gpu_utilization_ratio"]] == ["0"]


def test_gpu_sampler_reads_the_real_nvml_or_leaves_no_series() -> None:
    """With the real binding: on a machine without NVML (no library, no driver) the thread ends at once and
    there is no series and no error; with a GPU, each device has its series after the first reading."""
    try:
        import pynvml

        pynvml.nvmlInit()
        gpus = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception:  # ImportError or an NVMLError: no NVML on this machine
        gpus = 0
    sampler = resources.GpuSampler(interval_s=0.05)
    metrics = MetricSet("test")
    sampler.register(metrics)
    sampler.start()
    try:
        if gpus:
            deadline = time.monotonic() + 10
            while len(sampler.readings) < gpus and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(_scrape(metrics)["bluegreen_gpu_utilization_ratio"]) == gpus
        else:
            assert sampler._thread is not None
            sampler._thread.join(10)
            assert not sampler._thread.is_alive() and not sampler.available
            assert "bluegreen_gpu_utilization_ratio" not in _scrape(metrics)
    finally:
        sampler.stop()


def _sleepy(seconds: float) -> tuple[list[float], object]:
    ran: list[float] = []

    def run(inputs: Tensors) -> Tensors:
        started = time.perf_counter()
        time.sleep(seconds)
        ran.append(time.perf_counter() - started)
        return {"y": inputs["x"]}

    return ran, run


@pytest.mark.parametrize("kind", ["batched-threads", "batched-loop", "direct-threads", "direct-loop"])
async def test_busy_seconds_add_up_to_the_runs(kind: str) -> None:
    ran, run = _sleepy(0.01)
    with ThreadPoolExecutor(2) as pool:
        executor = pool if kind.endswith("threads") else None
        runner: DynamicBatcher | DirectRunner
        if kind.startswith("batched"):
            runner = DynamicBatcher(run, executor, max_batch_size=1, max_queue_delay_s=0, max_queue_size=100,  # type: ignore[arg-type]
                                    instances=2)
        else:
            runner = DirectRunner(run, executor, max_queue_size=100, instances=2)  # type: ignore[arg-type]
        runner.start()
        x = {"x": np.zeros((1, 2), dtype=np.float32)}
        await asyncio.gather(*(runner.submit(x, 1) for _ in range(8)))
        await runner.stop()
    assert len(ran) == 8
    # Every run's own time, not the time spent waiting for an instance (8 runs of 10 ms on 2 instances: that
    # would add ~120 ms); a little more for the hand-back from a worker thread to the loop.
    assert sum(ran) <= runner.stats.busy_s <= sum(ran) + 0.06
