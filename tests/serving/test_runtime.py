"""serving/runtime.py: provider choice, CPU sizing and the digits session's declared IO."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serving.runtime import Session, available_cpus, resolve_providers

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cpu_means_cpu_only() -> None:
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]


def test_cuda_is_taken_when_offered_and_refused_clearly_when_not() -> None:
    if HAS_CUDA:
        assert resolve_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        with pytest.raises(RuntimeError, match=r"--device cuda: this onnxruntime offers only .*onnxruntime-gpu"):
            resolve_providers("cuda")


def test_auto_prefers_cuda_and_falls_back_to_cpu() -> None:
    want = ["CUDAExecutionProvider", "CPUExecutionProvider"] if HAS_CUDA else ["CPUExecutionProvider"]
    assert resolve_providers("auto") == want


def test_available_cpus_is_within_the_machine() -> None:
    n = available_cpus()
    assert isinstance(n, int)
    assert 1 <= n <= (os.cpu_count() or 1)
    assert n <= len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def digits(model_repo: Path) -> Session:
    return Session(Path(model_repo) / "digits" / "1" / "model.onnx", device="cpu", threads=1)


def test_digits_io_specs_match_the_design(digits: Session) -> None:
    inputs, outputs = digits.io_specs()
    assert inputs == [("input", "FP32", [-1, 64])]
    assert outputs == [("label", "INT64", [-1]), ("probabilities", "FP32", [-1, 10])]


def test_cpu_session_settings(digits: Session, model_repo: Path) -> None:
    assert digits.providers == ["CPUExecutionProvider"] and not digits.on_cuda
    assert digits.threads == 1
    assert digits.output_names == ["label", "probabilities"]
    sized = Session(Path(model_repo) / "digits" / "1" / "model.onnx", device="cpu")
    assert sized.threads == available_cpus()


def test_run_returns_every_output_by_name(digits: Session) -> None:
    x = np.random.default_rng(1).integers(0, 17, size=(3, 64)).astype(np.float32)
    out = digits.run({"input": x})
    assert list(out) == ["label", "probabilities"]
    assert out["label"].dtype == np.int64 and out["label"].shape == (3,)
    assert out["probabilities"].dtype == np.float32 and out["probabilities"].shape == (3, 10)
    np.testing.assert_array_equal(out["label"], out["probabilities"].argmax(axis=1))
