"""Reproducible builds of the bundled models into a Triton-style repository.

Layout written (one folder per model version)::

    <repo>/<name>/<version>/model.onnx      the graph (ONNX, opset 17, IR 9)
    <repo>/<name>/<version>/metadata.json   inputs/outputs, data set, held-out accuracy, sha256, recipe digest
    <repo>/<name>/<version>/holdout.npz     the held-out split the accuracy was measured on: ``input`` rows,
                                            their ``label`` and a ``group`` each (see :func:`ink_groups`)

Nothing is downloaded: ``digits`` trains on scikit-learn's bundled digits data set and ``wide`` is a
seeded random MLP. Every build is deterministic (fixed seeds, fixed split), and a build whose recipe digest
and file hash match what is on disk is skipped, so ``build-models`` is idempotent and cheap to re-run.

The graphs are written by hand with ``onnx.helper`` from the trained weights (Gemm/Relu/Softmax/ArgMax):
inputs take raw 0-16 pixel intensities (the 1/16 scaling is part of the graph), so clients send what the
data set holds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.repository import DEFAULT_REPOSITORY

log = logging.getLogger(__name__)

BUILD_FORMAT = 2  # bump when the layout or the graph construction changes: forces rebuilds
OPSET = 17
IR_VERSION = 9  # loadable by every onnxruntime >= 1.17
SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.25

Layer = tuple[np.ndarray, np.ndarray]  # (weight [out, in], bias [out])


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str
    description: str
    spec: dict[str, Any]
    build: Callable[[Recipe], tuple[bytes, dict[str, Any], dict[str, np.ndarray] | None]]

    def digest(self) -> str:
        blob = json.dumps({"format": BUILD_FORMAT, "name": self.name, "version": self.version, **self.spec},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------------------------- graphs


def _mlp_graph(name: str, layers: list[Layer], n_in: int, *, input_scale: float | None,
               classifier: bool) -> bytes:
    """An MLP as ONNX: Gemm+Relu per hidden layer; classifier heads add Softmax and ArgMax outputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits: list[Any] = []
    nodes: list[Any] = []
    x = "input"
    if input_scale is not None:
        inits.append(numpy_helper.from_array(np.array(input_scale, dtype=np.float32), "input_scale"))
        nodes.append(helper.make_node("Mul", [x, "input_scale"], ["scaled"]))
        x = "scaled"
    for i, (w, b) in enumerate(layers):
        last = i == len(layers) - 1
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"b{i}"))
        out = "logits" if last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"a{i}"]))
            out = f"a{i}"
        x = out
    n_out = layers[-1][0].shape[0]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])]
    if classifier:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
        nodes.append(helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0))
        outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
                   helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", n_out])]
    else:
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, producer_name="bluegreen.models.build",
                              opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


# --------------------------------------------------------------------------------------------- digits

DIGITS_IO = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
    "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
}


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=HOLDOUT_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return x_tr, x_te, y_tr, y_te


#: The holdout's ``group`` array: how much ink a digit is written with, in terciles of the *training* rows' total
#: pixel intensity (so the cut points do not depend on the evaluation set). The digits data set records no writer
#: or demographic, so stroke weight is the subgroup a reader can name that a model may plausibly serve unequally
#: (faint pens, bold markers); the validation gate's bias check compares accuracy across these groups.
INK_GROUPS = ("light", "medium", "heavy")


def ink_groups(rows: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each row's ink group: ``light`` below the reference rows' first tercile of total intensity, ``heavy`` from
    the second up, ``medium`` between."""
    edges = np.quantile(reference.sum(axis=1), [1 / 3, 2 / 3])
    groups: np.ndarray = np.array(INK_GROUPS)[np.searchsorted(edges, rows.sum(axis=1), side="right")]
    return groups


def _accuracy(layers: list[Layer], x: np.ndarray, y: np.ndarray) -> float:
    h = x / 16.0
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return float((h.argmax(axis=1) == y).mean())


def _build_digits(recipe: Recipe) -> tuple[bytes, dict[str, Any], dict[str, np.ndarray]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    spec = recipe.spec
    x_tr, x_te, y_tr, y_te = _digits_split()
    labels = y_tr.copy()
    if spec.get("corrupt_fraction"):
        # The regressed build: a fixed fraction of training rows get a wrong (shifted) label.
        rng = np.random.default_rng(spec["seed"])
        rows = rng.random(len(labels)) < spec["corrupt_fraction"]
        labels[rows] = (labels[rows] + spec["label_shift"]) % 10
    layers: list[Layer]
    if spec["kind"] == "logistic_regression":
        clf = LogisticRegression(C=spec["C"], max_iter=5000)
        clf.fit(x_tr / 16.0, labels)
        layers = [(clf.coef_, clf.intercept_)]
    else:
        mlp = MLPClassifier(hidden_layer_sizes=tuple(spec["hidden"]), alpha=spec["alpha"], max_iter=spec["max_iter"],
                            random_state=spec["seed"])
        mlp.fit(x_tr / 16.0, labels)
        layers = [(w.T, b) for w, b in zip(mlp.coefs_, mlp.intercepts_, strict=True)]
    accuracy = _accuracy(layers, x_te, y_te)
    onnx_bytes = _mlp_graph(f"digits_v{recipe.version}", layers, 64, input_scale=1.0 / 16.0, classifier=True)
    params = sum(w.size + b.size for w, b in layers)
    meta = {
        **DIGITS_IO,
        "dataset": {"name": "sklearn.datasets.load_digits", "holdout_fraction": HOLDOUT_FRACTION,
                    "split_seed": SPLIT_SEED, "train_rows": len(x_tr), "holdout_rows": len(x_te),
                    "group": {"name": "ink", "values": list(INK_GROUPS),
                              "description": "total pixel intensity, in terciles of the training rows"}},
        "accuracy": round(accuracy, 4),
        "parameters": int(params),
    }
    return onnx_bytes, meta, {"input": x_te, "label": y_te, "group": ink_groups(x_te, x_tr)}


def _build_wide(recipe: Recipe) -> tuple[bytes, dict[str, Any], None]:
    spec = recipe.spec
    rng = np.random.default_rng(spec["seed"])
    sizes = spec["sizes"]
    layers: list[Layer] = []
    for n_in, n_out in itertools.pairwise(sizes):
        w = (rng.standard_normal((n_out, n_in), dtype=np.float32) * np.float32(np.sqrt(2.0 / n_in)))
        layers.append((w, np.zeros(n_out, dtype=np.float32)))
    onnx_bytes = _mlp_graph("wide_v1", layers, sizes[0], input_scale=None, classifier=False)
    meta = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, sizes[0]]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, sizes[-1]]}],
        "dataset": None,
        "accuracy": None,
        "parameters": int(sum(w.size + b.size for w, b in layers)),
    }
    return onnx_bytes, meta, None


RECIPES: list[Recipe] = [
    Recipe("digits", "1", "Blue: multinomial logistic regression on 8x8 digits (strongly regularised).",
           {"kind": "logistic_regression", "C": 0.05}, _build_digits),
    Recipe("digits", "2", "Green: MLP 64-128-64-10 on 8x8 digits, genuinely better than version 1.",
           {"kind": "mlp", "hidden": [128, 64], "alpha": 1e-3, "max_iter": 600, "seed": 0}, _build_digits),
    Recipe("digits", "3", "Regressed on purpose: logistic regression trained with 60% of labels shifted by 3.",
           {"kind": "logistic_regression", "C": 0.05, "corrupt_fraction": 0.6, "label_shift": 3, "seed": 0},
           _build_digits),
    Recipe("wide", "1", "Heavy MLP 512-2048-4096-2048-10 with seeded random weights (batching and GPU benchmarks).",
           {"sizes": [512, 2048, 4096, 2048, 10], "seed": 0}, _build_wide),
]


# --------------------------------------------------------------------------------------------- driver


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_current(recipe: Recipe, repo: Path) -> bool:
    folder = repo / recipe.name / recipe.version
    try:
        meta = json.loads((folder / "metadata.json").read_text())
        return bool(meta.get("recipe_digest") == recipe.digest()
                    and meta.get("sha256") == sha256_file(folder / "model.onnx"))
    except (OSError, ValueError):
        return False


def build_one(recipe: Recipe, repo: Path) -> Path:
    folder = repo / recipe.name / recipe.version
    folder.mkdir(parents=True, exist_ok=True)
    onnx_bytes, meta, holdout = recipe.build(recipe)
    tmp = folder / "model.onnx.tmp"
    tmp.write_bytes(onnx_bytes)
    tmp.replace(folder / "model.onnx")
    if holdout is not None:
        with (folder / "holdout.npz").open("wb") as f:
            np.savez_compressed(f, **holdout)  # type: ignore[arg-type]
    meta = {"name": recipe.name, "version": recipe.version, "platform": "onnxruntime_onnx",
            "description": recipe.description, **meta, "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "recipe": recipe.spec, "recipe_digest": recipe.digest()}
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def build_all(repo: Path = DEFAULT_REPOSITORY, *, only: set[str] | None = None, force: bool = False) -> list[str]:
    """Build every bundled model that is missing or stale; return one line per model saying what happened."""
    lines = []
    for recipe in RECIPES:
        ref = f"{recipe.name}:{recipe.version}"
        if only and recipe.name not in only and ref not in only:
            continue
        if not force and is_current(recipe, repo):
            lines.append(f"current  {ref}")
            continue
        folder = build_one(recipe, repo)
        meta = json.loads((folder / "metadata.json").read_text())
        acc = meta["accuracy"]
        lines.append(f"built    {ref}  params={meta['parameters']:,}"
                     + (f"  holdout_accuracy={acc:.4f}" if acc is not None else "") + f"  -> {folder}")
    return lines
