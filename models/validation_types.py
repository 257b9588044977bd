"""The validation gate's vocabulary: what it reads of a model version (:class:`Signature` from ``metadata.json``,
:class:`EvalSet` from ``holdout.npz``), what it measures (:class:`Target`), what it reports (:class:`Check`), and
the V2 requests and answers it exchanges with the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

Result = Literal["PASS", "FAIL", "N/A"]


class ValidationError(Exception):
    """The gate could not run (unknown model, server that would not start): exit status 2, no report."""


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Signature:
    """The one input a single-input model takes and the output the predicted class comes from."""

    input_name: str
    input_datatype: str
    input_shape: tuple[int, ...]
    output_name: str
    output_is_label: bool  # True: the output holds class ids; False: scores, the class is their argmax

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Signature:
        inputs, outputs = meta.get("inputs") or [], meta.get("outputs") or []
        if len(inputs) != 1 or not outputs:
            raise ValidationError("the gate scores single-input models with at least one output; metadata.json "
                                  f"declares {len(inputs)} inputs and {len(outputs)} outputs")
        label = next((o for o in outputs if o.get("name") == "label"), None)
        out = label or outputs[0]
        return cls(str(inputs[0]["name"]), str(inputs[0]["datatype"]), tuple(int(d) for d in inputs[0]["shape"]),
                   str(out["name"]), label is not None)


@dataclass(frozen=True)
class EvalSet:
    """The held-out split: ``input`` rows, their ``label`` and, where the data set has one, a ``group`` each."""

    path: Path
    inputs: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None

    @classmethod
    def load(cls, path: Path) -> EvalSet:
        try:
            with np.load(path, allow_pickle=False) as data:
                inputs = np.asarray(data["input"], dtype=np.float32)
                labels = np.asarray(data["label"]).astype(np.int64)
                groups = np.asarray(data["group"]) if "group" in data.files else None
        except (OSError, KeyError, ValueError) as exc:
            raise ValidationError(f"cannot read the evaluation set {path}: {exc}") from None
        if inputs.ndim != 2 or len(inputs) != len(labels) or len(labels) == 0:
            raise ValidationError(f"{path}: expected 'input' [n, features] and 'label' [n] with n > 0, got "
                                  f"{inputs.shape} and {labels.shape}")
        if groups is not None and groups.shape != labels.shape:
            raise ValidationError(f"{path}: 'group' has shape {groups.shape}, 'label' {labels.shape}")
        return cls(path, inputs, labels, groups)


@dataclass
class Check:
    """One line of the gate: ``figure`` is what a person reads, ``value`` the number compared (if any)."""

    check: str
    result: Result
    figure: str
    value: float | None = None
    threshold: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] | None = None  # the baseline's result, figure, value and the difference

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"check": self.check, "result": self.result, "figure": self.figure,
                               "value": self.value, "threshold": self.threshold, "details": self.details}
        if self.baseline is not None:
            doc["baseline"] = self.baseline
        return doc


@dataclass
class Target:
    """A model version behind a V2 server: one this command started (``pid`` known) or one at ``--url``."""

    name: str
    version: str
    url: str
    pid: int | None = None
    device: str | None = None  # the execution provider the server logged, when this command started it

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.name}/versions/{self.version}/infer"

    def label(self) -> str:
        return f"{self.name}:{self.version}"


def v2_body(sig: Signature, rows: np.ndarray, request_id: str | None = None) -> bytes:
    """A JSON V2 request for ``rows``, asking only for the output the class is read from."""
    doc: dict[str, Any] = {"inputs": [{"name": sig.input_name, "datatype": sig.input_datatype,
                                       "shape": [int(rows.shape[0]), *rows.shape[1:]], "data": rows.ravel().tolist()}],
                           "outputs": [{"name": sig.output_name}]}
    if request_id is not None:
        doc["id"] = request_id
    return orjson.dumps(doc)


def predicted_classes(sig: Signature, response: dict[str, Any], rows: int) -> np.ndarray:
    out = next((o for o in response.get("outputs", ()) if o.get("name") == sig.output_name), None)
    if out is None:
        raise ValueError(f"the response has no output {sig.output_name!r}")
    data = np.asarray(out["data"])
    if sig.output_is_label:
        return data.reshape(rows).astype(np.int64)
    return np.asarray(data.reshape(rows, -1).argmax(axis=1), dtype=np.int64)
