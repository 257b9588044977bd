"""Open Inference Protocol (KServe V2) tensors: JSON and the binary tensor extension.

A request body is a JSON header, optionally followed by raw tensor bytes; ``Inference-Header-Content-Length``
says where the JSON ends. Parsing happens in two steps so that the gateway can stop after the first:

1. :func:`split_body` + :func:`check_request` — parse the JSON header once and check it against the model's
   declared inputs (names, datatypes, rank, fixed dimensions, element counts, binary sizes, batch limit).
   No tensor data is converted here.
2. :func:`decode_inputs` — turn the checked inputs into numpy arrays (the model server only).

Responses are encoded by :func:`encode_response`, in JSON or binary per output as the request asked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from serving.errors import BadRequest

HEADER_LENGTH = "inference-header-content-length"

#: V2 datatype name -> numpy dtype (little-endian, as the binary extension specifies).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
NUMPY_TO_DATATYPE = {dt: name for name, dt in DATATYPES.items()}
_INTEGER_TYPES = {name for name, dt in DATATYPES.items() if dt.kind in "iu"}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared model input or output; -1 marks a dynamic dimension (the batch dimension first)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class Signature:
    """A model's declared inputs and outputs, with the name lookups the request check needs precomputed."""

    __slots__ = ("_inputs_by_name", "_output_names", "inputs", "outputs")

    def __init__(self, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self._inputs_by_name = {s.name: s for s in inputs}
        self._output_names = frozenset(s.name for s in outputs)

    def input(self, name: str) -> TensorSpec | None:
        return self._inputs_by_name.get(name)

    def has_output(self, name: str) -> bool:
        return name in self._output_names


@dataclass(frozen=True, slots=True)
class CheckedInput:
    spec: TensorSpec
    shape: tuple[int, ...]
    data: Any  # the JSON "data" list, or None for binary
    binary_offset: int
    binary_size: int


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    id: str | None
    inputs: tuple[CheckedInput, ...]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output, in the default encoding
    binary_default: bool
    batch_size: int


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """Parse the JSON header of a V2 request body; return it and the binary tail (possibly empty)."""
    view = memoryview(body)
    if header_length is None:
        json_part, tail = view, view[len(view):]
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length is not an integer: {header_length[:40]!r}") from None
        if not 0 <= n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        json_part, tail = view[:n], view[n:]
    try:
        header = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadRequest("the request body must be a JSON object")
    return header, tail


def _count_elements(data: Any, depth: int = 0) -> int:
    """Number of scalars in a flat or nested JSON list (nesting bounded by the tensor rank check)."""
    if depth > 32:
        raise BadRequest("tensor data is nested too deeply")
    if data and isinstance(data[0], list):
        return sum(_count_elements(d, depth + 1) if isinstance(d, list) else 1 for d in data)
    return len(data)


def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return params


def check_request(header: Mapping[str, Any], binary_len: int, signature: Signature,
                  max_batch_size: int | None) -> CheckedRequest:
    """Check a parsed request header against a model signature without converting tensor data."""
    req_id = header.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise BadRequest("'id' must be a string")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    checked: list[CheckedInput] = []
    seen: set[str] = set()
    offset = 0
    batch: int | None = None
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise BadRequest(f"inputs[{i}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str):
            raise BadRequest(f"inputs[{i}] has no 'name'")
        spec = signature.input(name)
        if spec is None:
            expected = ", ".join(repr(s.name) for s in signature.inputs)
            raise BadRequest(f"unknown input {name!r}; the model expects {expected}")
        if name in seen:
            raise BadRequest(f"input {name!r} given twice")
        seen.add(name)
        datatype = raw.get("datatype")
        if datatype != spec.datatype:
            raise BadRequest(f"input {name!r}: datatype {datatype!r} does not match the model's {spec.datatype}")
        shape = raw.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise BadRequest(f"input {name!r}: 'shape' must be a list of non-negative integers")
        if len(shape) != len(spec.shape):
            raise BadRequest(f"input {name!r}: rank {len(shape)} (shape {shape}) does not match the model's "
                             f"rank {len(spec.shape)} (shape {list(spec.shape)})")
        for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
            if want != -1 and got != want:
                raise BadRequest(f"input {name!r}: dimension {axis} is {got}, the model expects {want} "
                                 f"(shape {list(spec.shape)})")
        if shape:
            if batch is not None and shape[0] != batch:
                raise BadRequest(f"input {name!r}: batch size {shape[0]} differs from the other inputs' {batch}")
            batch = shape[0]
        count = math.prod(shape)
        params = _parameters(raw, f"input {name!r}")
        binary_size = params.get("binary_data_size")
        if binary_size is not None:
            if type(binary_size) is not int or binary_size < 0:
                raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
            if "data" in raw:
                raise BadRequest(f"input {name!r}: has both 'data' and binary_data_size")
            want_size = count * DATATYPES[spec.datatype].itemsize
            if binary_size != want_size:
                raise BadRequest(f"input {name!r}: binary_data_size {binary_size} does not match shape {shape} "
                                 f"of {spec.datatype} ({want_size} bytes)")
            if offset + binary_size > binary_len:
                raise BadRequest(f"input {name!r}: binary data runs past the end of the body")
            checked.append(CheckedInput(spec, tuple(shape), None, offset, binary_size))
            offset += binary_size
        else:
            data = raw.get("data")
            if not isinstance(data, list):
                raise BadRequest(f"input {name!r}: 'data' must be a list (or use binary_data_size)")
            n = _count_elements(data)
            if n != count:
                raise BadRequest(f"input {name!r}: {n} elements in 'data' do not match shape {shape} "
                                 f"({count} elements)")
            checked.append(CheckedInput(spec, tuple(shape), data, 0, 0))
    missing = [s.name for s in signature.inputs if s.name not in seen]
    if missing:
        raise BadRequest(f"missing input(s): {', '.join(map(repr, missing))}")
    if offset != binary_len:
        raise BadRequest(f"the body holds {binary_len} bytes of binary data but the inputs declare {offset}")
    batch_size = batch if batch is not None else 1
    if max_batch_size is not None and batch_size > max_batch_size:
        raise BadRequest(f"batch size {batch_size} exceeds the limit of {max_batch_size}")

    params = _parameters(header, "request")
    binary_default = bool(params.get("binary_data_output", False))
    outputs: tuple[RequestedOutput, ...] | None = None
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise BadRequest("'outputs' must be a list")
        outs = []
        for i, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise BadRequest(f"outputs[{i}] must be an object with a 'name'")
            if not signature.has_output(raw["name"]):
                expected = ", ".join(repr(s.name) for s in signature.outputs)
                raise BadRequest(f"unknown output {raw['name']!r}; the model has {expected}")
            out_params = _parameters(raw, f"output {raw['name']!r}")
            outs.append(RequestedOutput(raw["name"], bool(out_params.get("binary_data", binary_default))))
        outputs = tuple(outs)
    return CheckedRequest(req_id, tuple(checked), outputs, binary_default, batch_size)


def decode_inputs(request: CheckedRequest, binary: memoryview) -> dict[str, np.ndarray]:
    """Convert checked inputs to numpy arrays of the declared dtype and shape."""
    arrays: dict[str, np.ndarray] = {}
    for item in request.inputs:
        dtype = DATATYPES[item.spec.datatype]
        if item.data is None:
            chunk = binary[item.binary_offset:item.binary_offset + item.binary_size]
            arr = np.frombuffer(chunk, dtype=dtype).reshape(item.shape)
        else:
            try:
                if item.spec.datatype in _INTEGER_TYPES:
                    raw = np.asarray(item.data)
                    if raw.size and raw.dtype.kind not in "iub":
                        raise ValueError(f"values of kind {raw.dtype.kind!r}")
                    if raw.size and raw.dtype.kind in "iu":  # astype would wrap out-of-range values silently
                        info = np.iinfo(dtype)
                        if int(raw.min()) < info.min or int(raw.max()) > info.max:
                            raise ValueError(f"values outside [{info.min}, {info.max}]")
                    arr = raw.astype(dtype, copy=False)
                else:
                    arr = np.asarray(item.data, dtype=dtype)
                arr = arr.reshape(item.shape)
            except (ValueError, TypeError, OverflowError) as exc:
                raise BadRequest(f"input {item.spec.name!r}: data is not valid {item.spec.datatype}: {exc}") from None
        arrays[item.spec.name] = arr
    return arrays


def encode_response(model_name: str, model_version: str, request: CheckedRequest,
                    outputs: Mapping[str, np.ndarray], output_specs: Sequence[TensorSpec]) -> tuple[bytes, int | None]:
    """Encode an inference response; return the body and, when binary outputs follow, the JSON length."""
    wanted = request.outputs or tuple(RequestedOutput(s.name, request.binary_default) for s in output_specs)
    json_outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in wanted:
        arr = outputs[out.name]
        entry: dict[str, Any] = {"name": out.name, "datatype": NUMPY_TO_DATATYPE[arr.dtype], "shape": list(arr.shape)}
        if out.binary:
            blob = np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = np.ascontiguousarray(arr).ravel()
        json_outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": json_outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
