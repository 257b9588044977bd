"""ONNX Runtime sessions: provider choice, CPU thread sizing, IO binding on CUDA.

``auto`` takes CUDA (TensorRT is left to explicit configuration) when the installed runtime offers it, else
the CPU. CPU sessions turn intra-op spinning off by default — a spinning pool burns the cores the event loop
and the HTTP parser need (``spin_wait`` turns it on, for cores nothing else wants) — and size their threads to
the cores this process may actually use (affinity and the cgroup CPU quota, so a Kubernetes CPU limit is
respected). On CUDA, runs go through IO binding so outputs are allocated on the device and copied back once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

try:
    import onnxruntime as ort
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("ONNX Runtime is not installed: pip install 'bluegreen[cpu]' (or '[gpu]' on GPU nodes)") from exc

Device = Literal["auto", "cpu", "cuda"]

ORT_TO_DATATYPE = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}


def available_cpus() -> int:
    """Cores this process may use: CPU affinity, capped by a cgroup v2 CPU quota when one is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def resolve_providers(device: Device) -> list[str]:
    offered = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in offered
    if device == "cuda":
        if not has_cuda:
            raise RuntimeError(f"--device cuda: this onnxruntime offers only {offered}; install onnxruntime-gpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Session:
    """One ONNX Runtime session; :meth:`run` is synchronous and is called off the event loop."""

    def __init__(self, path: Path, device: Device = "auto", threads: int = 0, spin_wait: bool = False) -> None:
        providers = resolve_providers(device)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = threads or available_cpus()
        opts.inter_op_num_threads = 1
        spin = "1" if spin_wait else "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers: list[str] = list(self._session.get_providers())
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.threads = opts.intra_op_num_threads
        self.spin_wait = spin_wait
        self.output_names = [o.name for o in self._session.get_outputs()]

    def io_specs(self) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
        """(name, V2 datatype, shape with -1 for dynamic dims) of every input and output."""
        def spec(arg: Any) -> tuple[str, str, list[int]]:
            if arg.type not in ORT_TO_DATATYPE:
                raise RuntimeError(f"tensor {arg.name!r} has an unsupported type {arg.type}")
            return arg.name, ORT_TO_DATATYPE[arg.type], [d if isinstance(d, int) else -1 for d in arg.shape]
        return ([spec(a) for a in self._session.get_inputs()], [spec(a) for a in self._session.get_outputs()])

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.on_cuda:
            binding = self._session.io_binding()
            for name, arr in inputs.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(arr))
            for name in self.output_names:
                binding.bind_output(name, "cuda")
            self._session.run_with_iobinding(binding)
            return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))
        results = self._session.run(self.output_names, inputs)
        return dict(zip(self.output_names, results, strict=True))
