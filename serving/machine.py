"""What a measurement ran on, for benchmark and validation reports: CPU, cores, memory, GPUs, ONNX Runtime and
the providers it offers, Python, the commit, and the load average when the run began (the machines are shared:
a high load average says the figures are noisier than usual)."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from serving.runtime import available_cpus

ROOT = Path(__file__).resolve().parent.parent


def describe_machine() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        memory_gib = round(kib / 2**20, 1)
    ort_version, providers = None, []
    with contextlib.suppress(ImportError):
        import onnxruntime as ort

        ort_version, providers = ort.__version__, list(ort.get_available_providers())
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "usable_cpus": available_cpus(),
        "memory_gib": memory_gib,
        "gpus": _gpus(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "hostname": platform.node(),
        "onnxruntime": ort_version,
        "onnxruntime_providers": providers,
        "commit": _commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(m: dict[str, Any]) -> str:
    """One line for a report: ``CPU, N cores (M usable); 24 GiB RAM; no GPU; onnxruntime ...``."""
    parts = [f"{m.get('cpu_model', 'unknown CPU')}, {m.get('cpu_count')} cores ({m.get('usable_cpus')} usable)"]
    if m.get("memory_gib"):
        parts.append(f"{m['memory_gib']} GiB RAM")
    parts.append("GPU: " + "; ".join(m["gpus"]) if m.get("gpus") else "no GPU")
    parts.append(f"onnxruntime {m.get('onnxruntime')} (providers offered: "
                 f"{', '.join(m.get('onnxruntime_providers') or [])})")
    if m.get("wrk"):
        parts.append(str(m["wrk"]))
    parts.append(f"Python {m.get('python')}, {m.get('os')}")
    if m.get("commit"):
        parts.append(f"commit `{m['commit']}`")
    if m.get("load_average_at_start"):
        parts.append("load average at start " + " / ".join(f"{x:g}" for x in m["load_average_at_start"]))
    return "; ".join(parts)


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]
    return []


def _commit() -> str | None:
    """The checkout's short commit, ``+dirty`` when tracked files differ from it; None outside a git checkout."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return None
