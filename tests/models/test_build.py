"""models/build.py: the digits builds land in a Triton-style layout, score as designed, and rebuild reproducibly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.build import INK_GROUPS, _mlp_graph, build_all, sha256_file

VERSIONS = ("1", "2", "3")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    lines = build_all(root, only={"digits"})
    assert [line.split()[:2] for line in lines] == [["built", f"digits:{v}"] for v in VERSIONS]
    return root


def metadata(repo: Path, version: str) -> dict:  # type: ignore[type-arg]
    return json.loads((repo / "digits" / version / "metadata.json").read_text())  # type: ignore[no-any-return]


def score(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (labels,) = sess.run(["label"], {"input": x})
    return float((labels == y).mean())


def test_only_digits_are_built_in_the_triton_layout(repo: Path) -> None:
    assert sorted(p.name for p in repo.iterdir()) == ["digits"]
    for v in VERSIONS:
        folder = repo / "digits" / v
        assert sorted(p.name for p in folder.iterdir()) == ["holdout.npz", "metadata.json", "model.onnx"]
        meta = metadata(repo, v)
        assert (meta["name"], meta["version"], meta["platform"]) == ("digits", v, "onnxruntime_onnx")
        assert meta["sha256"] == sha256_file(folder / "model.onnx")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert meta["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]},
                                   {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
        assert meta["dataset"]["name"] == "sklearn.datasets.load_digits"
        assert 0.0 <= meta["accuracy"] <= 1.0
        with np.load(folder / "holdout.npz") as holdout:
            x, y = holdout["input"], holdout["label"]
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == 64
        assert y.dtype == np.int64 and y.shape == (x.shape[0],)
        assert x.shape[0] == meta["dataset"]["holdout_rows"]
        assert x.min() >= 0 and x.max() <= 16  # raw pixel intensities: the 1/16 scaling is in the graph
        with np.load(folder / "holdout.npz") as holdout:
            groups = holdout["group"]  # loads without pickle: plain text
        assert groups.shape == y.shape and set(groups.tolist()) == set(INK_GROUPS)
        assert meta["dataset"]["group"]["values"] == list(INK_GROUPS)
        ink = {g: x[groups == g].sum(axis=1) for g in INK_GROUPS}
        assert ink["light"].max() <= ink["medium"].min() and ink["medium"].max() <= ink["heavy"].min()
        assert all(100 < len(v) < 200 for v in ink.values())  # terciles of the training rows: about a third each


def test_accuracies_order_blue_green_and_regressed(repo: Path) -> None:
    acc = {v: metadata(repo, v)["accuracy"] for v in VERSIONS}
    assert acc["1"] >= 0.85
    assert acc["2"] >= 0.85
    assert acc["2"] > acc["1"]
    assert acc["3"] < 0.5  # far below the 0.85 bar: a release gate cannot mistake it for noise


@pytest.mark.parametrize("version", VERSIONS)
def test_onnxruntime_reproduces_the_recorded_accuracy(repo: Path, version: str) -> None:
    folder = repo / "digits" / version
    with np.load(folder / "holdout.npz") as holdout:
        measured = score(folder / "model.onnx", holdout["input"], holdout["label"])
    assert round(measured, 4) == metadata(repo, version)["accuracy"]


def test_probabilities_are_a_distribution_and_label_is_their_argmax(repo: Path) -> None:
    x = np.random.default_rng(0).integers(0, 17, size=(32, 64)).astype(np.float32)
    sess = ort.InferenceSession(str(repo / "digits" / "2" / "model.onnx"), providers=["CPUExecutionProvider"])
    labels, probs = sess.run(["label", "probabilities"], {"input": x})
    assert labels.dtype == np.int64 and labels.shape == (32,)
    assert probs.dtype == np.float32 and probs.shape == (32, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))


def test_second_build_is_a_no_op(repo: Path) -> None:
    before = {v: (repo / "digits" / v / "model.onnx").stat().st_mtime_ns for v in VERSIONS}
    assert build_all(repo, only={"digits"}) == [f"current  digits:{v}" for v in VERSIONS]
    assert {v: (repo / "digits" / v / "model.onnx").stat().st_mtime_ns for v in VERSIONS} == before


def test_a_corrupted_model_is_rebuilt_and_the_others_left_alone(repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    model = copy / "digits" / "1" / "model.onnx"
    good = model.read_bytes()
    model.write_bytes(good[:-10] + b"0123456789")

    lines = build_all(copy, only={"digits"})

    assert [line.split()[:2] for line in lines] == [["built", "digits:1"], ["current", "digits:2"],
                                                   ["current", "digits:3"]]
    assert model.read_bytes() == good
    assert build_all(copy, only={"digits:1"}) == ["current  digits:1"]


def test_two_builds_in_different_folders_are_byte_identical(repo: Path, tmp_path: Path) -> None:
    build_all(tmp_path, only={"digits"})
    for v in VERSIONS:
        assert metadata(tmp_path, v)["sha256"] == metadata(repo, v)["sha256"]
        assert metadata(tmp_path, v)["recipe_digest"] == metadata(repo, v)["recipe_digest"]
        model = Path("digits") / v / "model.onnx"
        assert (tmp_path / model).read_bytes() == (repo / model).read_bytes()


@pytest.mark.parametrize("classifier", [False, True])
def test_mlp_graph_computes_what_numpy_computes(classifier: bool) -> None:
    rng = np.random.default_rng(7)
    layers = [(rng.standard_normal((5, 4)).astype(np.float32), rng.standard_normal(5).astype(np.float32)),
              (rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal(3).astype(np.float32))]
    scale = 0.5 if classifier else None
    graph = _mlp_graph("tiny", layers, 4, input_scale=scale, classifier=classifier)
    x = rng.standard_normal((6, 4)).astype(np.float32)

    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}), strict=True))

    h = x * np.float32(scale or 1.0)
    h = np.maximum(h @ layers[0][0].T + layers[0][1], 0) @ layers[1][0].T + layers[1][1]
    if classifier:
        assert list(got) == ["label", "probabilities"]
        np.testing.assert_array_equal(got["label"], h.argmax(axis=1))
        e = np.exp(h - h.max(axis=1, keepdims=True))
        np.testing.assert_allclose(got["probabilities"], e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    else:
        assert list(got) == ["logits"]
        np.testing.assert_allclose(got["logits"], h, rtol=1e-5, atol=1e-5)
