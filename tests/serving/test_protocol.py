"""serving/protocol.py: V2 request checks, tensor decoding and response encoding, JSON and binary."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from serving.errors import BadRequest
from serving.protocol import (
    CheckedRequest,
    DataShape,
    RequestedOutput,
    Signature,
    TensorSpec,
    check_request,
    decode_inputs,
    encode_response,
    split_body,
    split_skeleton,
)

# Two inputs of different datatypes, so binary offsets and per-input checks are exercised across tensors.
SIG = Signature(
    inputs=(TensorSpec("pixels", "FP32", (-1, 3)), TensorSpec("mask", "INT32", (-1, 2))),
    outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("scores", "FP32", (-1, 2))),
)
DIGITS = Signature((TensorSpec("input", "FP32", (-1, 64)),), (TensorSpec("label", "INT64", (-1,)),))


def pixels(rows: int, **changes: Any) -> dict[str, Any]:
    return {"name": "pixels", "datatype": "FP32", "shape": [rows, 3],
            "data": [float(i) for i in range(rows * 3)], **changes}


def mask(rows: int, **changes: Any) -> dict[str, Any]:
    return {"name": "mask", "datatype": "INT32", "shape": [rows, 2], "data": list(range(rows * 2)), **changes}


def binary(spec: dict[str, Any], size: int) -> dict[str, Any]:
    out = {k: v for k, v in spec.items() if k != "data"}
    return {**out, "parameters": {"binary_data_size": size}}


def check(header: dict[str, Any], binary_len: int = 0, max_batch_size: int | None = None) -> CheckedRequest:
    return check_request(header, binary_len, SIG, max_batch_size)


def refused(header: dict[str, Any], binary_len: int = 0, max_batch_size: int | None = None) -> str:
    with pytest.raises(BadRequest) as info:
        request = check(header, binary_len, max_batch_size)
        decode_inputs(request, memoryview(bytes(binary_len)))
    assert info.value.status == 400
    return info.value.message


# ------------------------------------------------------------------------------------------ split_body


def test_split_body_without_header_length_is_all_json() -> None:
    header, tail = split_body(b'{"inputs": []}', None)
    assert header == {"inputs": []} and len(tail) == 0


def test_split_body_separates_json_from_binary_tail() -> None:
    head = b'{"id": "x"}'
    header, tail = split_body(head + b"\x00\x01\x02", str(len(head)))
    assert header == {"id": "x"} and bytes(tail) == b"\x00\x01\x02"


@pytest.mark.parametrize(("body", "length", "needle"), [
    (b"{}", "abc", "Inference-Header-Content-Length is not an integer: 'abc'"),
    (b"{}", "3", "Inference-Header-Content-Length 3 is outside the body of 2 bytes"),
    (b"{}", "-1", "outside the body"),
    (b"{nope", None, "malformed JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
])
def test_split_body_refusals_name_the_problem(body: bytes, length: str | None, needle: str) -> None:
    with pytest.raises(BadRequest, match=needle):
        split_body(body, length)


# ------------------------------------------------------------------------------------------ JSON tensors


def test_flat_and_nested_data_decode_to_the_same_arrays() -> None:
    flat = check({"inputs": [pixels(2), mask(2)]})
    nested = check({"inputs": [pixels(2, data=[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]), mask(2, data=[[0, 1], [2, 3]])]})
    a, b = decode_inputs(flat, memoryview(b"")), decode_inputs(nested, memoryview(b""))
    for got in (a, b):
        assert got["pixels"].dtype == np.float32 and got["pixels"].shape == (2, 3)
        assert got["mask"].dtype == np.int32 and got["mask"].shape == (2, 2)
    np.testing.assert_array_equal(a["pixels"], b["pixels"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert flat.batch_size == nested.batch_size == 2


def test_zero_rows_are_a_valid_empty_batch() -> None:
    request = check({"inputs": [pixels(0), mask(0)]})
    arrays = decode_inputs(request, memoryview(b""))
    assert arrays["pixels"].shape == (0, 3) and arrays["mask"].shape == (0, 2)


@pytest.mark.parametrize(("data", "needle"), [
    ([0.0] * 5, "input 'pixels': 5 elements in 'data' do not match shape [2, 3] (6 elements)"),
    ([[0.0] * 3, [0.0] * 2], "5 elements in 'data'"),
    ([[0.0] * 3, [0.0] * 3, [0.0]], "7 elements in 'data'"),
])
def test_element_count_mismatches_are_refused(data: list[Any], needle: str) -> None:
    assert needle in refused({"inputs": [pixels(2, data=data), mask(2)]})


def test_ragged_data_with_the_right_count_is_refused_at_decode() -> None:
    # 4 + 2 elements match shape [2, 3] in number but not in layout.
    message = refused({"inputs": [pixels(2, data=[[0.0] * 4, [0.0] * 2]), mask(2)]})
    assert message.startswith("input 'pixels': data is not valid FP32")


@pytest.mark.parametrize("values", [[1.5, 2], [1.0, 2.0], ["1", 2], [None, 2]])
def test_integer_inputs_refuse_non_integers(values: list[Any]) -> None:
    message = refused({"inputs": [pixels(1), mask(1, data=values)]})
    assert message.startswith("input 'mask': data is not valid INT32")


@pytest.mark.parametrize("values", [[2**31, 0], [0, -(2**31) - 1], [2**64, 0]])
def test_integer_inputs_refuse_values_out_of_range(values: list[int]) -> None:
    message = refused({"inputs": [pixels(1), mask(1, data=values)]})
    assert message.startswith("input 'mask': data is not valid INT32")


def test_integer_inputs_accept_the_full_range() -> None:
    request = check({"inputs": [pixels(2), mask(2, data=[-(2**31), 2**31 - 1, 1, 0])]})
    got = decode_inputs(request, memoryview(b""))["mask"]
    np.testing.assert_array_equal(got, np.array([[-(2**31), 2**31 - 1], [1, 0]], dtype=np.int32))


# ------------------------------------------------------------------------------------------ strict values
# One function for the gateway and the model server: every case below is refused by check_request alone
# (what the gateway calls), before any conversion the model server would do.

def sig_of(datatype: str, width: int = 2) -> Signature:
    return Signature((TensorSpec("x", datatype, (-1, width)),), (TensorSpec("y", "FP32", (-1,)),))


def strict_refusal(datatype: str, data: list[Any], *, rows: int = 1, width: int = 2) -> str:
    header = {"inputs": [{"name": "x", "datatype": datatype, "shape": [rows, width], "data": data}]}
    with pytest.raises(BadRequest) as info:
        check_request(header, 0, sig_of(datatype, width))
    assert info.value.status == 400 and "input 'x'" in info.value.message
    return info.value.message


@pytest.mark.parametrize(("datatype", "data", "needle"), [
    ("FP32", ["1.5", 2.0], "found string where integer or number values are required"),
    ("FP32", [True, 2.0], "found boolean"),
    ("FP32", [False, 0], "found boolean"),
    ("FP32", [{"v": 1}, 2.0], "found object"),
    ("FP32", [None, 2.0], "found null"),
    ("FP32", [[1.0, "2"]], "found string"),
    ("FP32", [[1.0, True]], "found boolean"),
    ("FP32", [[1.0], 2.0], "mixed"),
    ("FP64", ["1e3", 1.0], "found string"),
    ("FP16", [True, 1.0], "found boolean"),
    ("FP32", [1e39, 0.0], "overflows FP32"),
    ("FP32", [[-3.5e38, 0.0]], "overflows FP32"),
    ("FP16", [70000.0, 0.0], "overflows FP16"),
    ("INT8", [128, 0], "outside [-128, 127]"),
    ("INT8", [-129, 0], "outside [-128, 127]"),
    ("UINT8", [256, 0], "outside [0, 255]"),
    ("UINT8", [-1, 0], "outside [0, 255]"),
    ("INT32", [2**31, 0], "outside [-2147483648, 2147483647]"),
    ("INT32", [1.0, 2], "found number where integer values are required"),
    ("INT32", [True, 2], "found boolean"),
    ("INT64", ["7", 2], "found string"),
    ("BOOL", [1, 0], "found integer where boolean values are required"),
    ("BOOL", ["true", False], "found string"),
    ("BOOL", [1.0, True], "found number"),
    ("BYTES", [1, "a"], "found integer where string values are required"),
    ("BYTES", [True, "a"], "found boolean"),
])
def test_strict_element_types_ranges_and_overflow(datatype: str, data: list[Any], needle: str) -> None:
    message = strict_refusal(datatype, data)
    assert f"not valid {datatype}" in message and needle in message, message


@pytest.mark.parametrize(("datatype", "data", "want"), [
    ("FP32", [1, 2.5], np.array([[1.0, 2.5]], np.float32)),  # JSON integers are numbers
    ("FP32", [3.4e38, -3.4e38], np.array([[3.4e38, -3.4e38]], np.float32)),  # the largest finite still fits
    ("FP64", [1e300, -1e-300], np.array([[1e300, -1e-300]], np.float64)),
    ("INT8", [-128, 127], np.array([[-128, 127]], np.int8)),
    ("UINT8", [0, 255], np.array([[0, 255]], np.uint8)),
    ("BOOL", [True, False], np.array([[True, False]])),
])
def test_strict_values_that_fit_are_accepted_and_converted_once(datatype: str, data: list[Any],
                                                               want: np.ndarray) -> None:
    header = {"inputs": [{"name": "x", "datatype": datatype, "shape": [1, 2], "data": data}]}
    request = check_request(header, 0, sig_of(datatype))
    assert request.inputs[0].array is not None
    got = decode_inputs(request, memoryview(b""))["x"]
    assert got is request.inputs[0].array  # the model server reuses the check's array
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_bytes_inputs_take_strings() -> None:
    header = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}]}
    assert check_request(header, 0, sig_of("BYTES")).inputs[0].data == ["a", "b"]


def test_json_cannot_carry_nan_or_infinity() -> None:
    # So NaN/Inf can only reach a model through binary tensors (or an overflow, refused above).
    for text in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        with pytest.raises(BadRequest):
            split_body(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [%s]}]}' % text, None)


def binary_request(datatype: str, values: np.ndarray) -> tuple[dict[str, Any], memoryview]:
    blob = values.tobytes()
    header = {"inputs": [{"name": "x", "datatype": datatype, "shape": list(values.shape),
                          "parameters": {"binary_data_size": len(blob)}}]}
    return header, memoryview(blob)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nan_and_inf_in_binary_tensors_are_refused_unless_allowed(bad: float, dtype: type) -> None:
    values = np.array([[1.0, bad]], dtype=dtype)
    datatype = {np.float16: "FP16", np.float32: "FP32", np.float64: "FP64"}[dtype]
    header, tail = binary_request(datatype, values)
    with pytest.raises(BadRequest, match=r"input 'x': binary .* holds NaN or Inf"):
        check_request(header, tail, sig_of(datatype))
    # Allowed by the caller, or by the model's own signature (what the gateway learns from /config):
    got = check_request(header, tail, sig_of(datatype), allow_non_finite=True).inputs[0].array
    assert got is not None and np.array_equal(got, values, equal_nan=True)
    lenient = Signature(sig_of(datatype).inputs, sig_of(datatype).outputs, allow_non_finite=True)
    assert check_request(header, tail, lenient).inputs[0].array is not None
    # Given only the tail's length, as before, the sizes are checked and the values are not.
    assert check_request(header, len(tail), sig_of(datatype)).inputs[0].array is None


def test_binary_bool_bytes_must_be_0_or_1() -> None:
    header, _ = binary_request("BOOL", np.array([[True, False]]))
    assert check_request(header, memoryview(b"\x01\x00"), sig_of("BOOL")).inputs[0].array is not None
    with pytest.raises(BadRequest, match="bytes other than 0 and 1"):
        check_request(header, memoryview(b"\x01\x02"), sig_of("BOOL"))


def test_batch_limit_from_the_signature_or_the_caller_the_smaller_wins() -> None:
    header = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 2], "data": [0.0] * 6}]}
    limited = Signature(sig_of("FP32").inputs, sig_of("FP32").outputs, max_batch_size=2)
    with pytest.raises(BadRequest, match="batch size 3 exceeds the limit of 2"):
        check_request(header, 0, limited)
    with pytest.raises(BadRequest, match="batch size 3 exceeds the limit of 2"):
        check_request(header, 0, Signature(limited.inputs, limited.outputs, max_batch_size=8), 2)
    with pytest.raises(BadRequest, match="batch size 3 exceeds the limit of 2"):
        check_request(header, 0, limited, 8)
    assert check_request(header, 0, sig_of("FP32"), 3).batch_size == 3


def test_large_inputs_are_checked_in_slices_with_the_same_result() -> None:
    rows = 3000  # 3000 x 64 = 192,000 elements: above CHUNK_ELEMENTS
    values = np.random.default_rng(3).standard_normal((rows, 64)).astype(np.float32)
    for data in (values.ravel().tolist(), values.tolist()):
        header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": data}]}
        got = check_request(header, 0, DIGITS).inputs[0].array
        assert got is not None
        np.testing.assert_array_equal(got, values)
    bad = values.tolist()
    bad[rows - 1][63] = True
    header = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": bad}]}
    with pytest.raises(BadRequest, match="found boolean"):
        check_request(header, 0, DIGITS)
    bad[rows - 1][63] = 1e39
    with pytest.raises(BadRequest, match="overflows FP32"):
        check_request(header, 0, DIGITS)


def test_float_inputs_refuse_non_numbers() -> None:
    assert "not valid FP32" in refused({"inputs": [pixels(1, data=["a", "b", "c"]), mask(1)]})


# ------------------------------------------------------------------------------------------ request checks


@pytest.mark.parametrize(("header", "needle"), [
    ({"inputs": [pixels(1), mask(1)], "id": 7}, "'id' must be a string"),
    ({}, "'inputs' must be a non-empty list"),
    ({"inputs": []}, "'inputs' must be a non-empty list"),
    ({"inputs": ["pixels"]}, "inputs[0] must be an object"),
    ({"inputs": [{"datatype": "FP32"}]}, "inputs[0] has no 'name'"),
    ({"inputs": [pixels(1, name="image"), mask(1)]}, "unknown input 'image'; the model expects 'pixels', 'mask'"),
    ({"inputs": [pixels(1), pixels(1)]}, "input 'pixels' given twice"),
    ({"inputs": [pixels(1)]}, "missing input(s): 'mask'"),
    ({"inputs": [pixels(1, datatype="FP64"), mask(1)]},
     "input 'pixels': datatype 'FP64' does not match the model's FP32"),
    ({"inputs": [pixels(1, shape=[3]), mask(1)]},
     "input 'pixels': rank 1 (shape [3]) does not match the model's rank 2 (shape [-1, 3])"),
    ({"inputs": [pixels(1, shape=[1, 4]), mask(1)]}, "input 'pixels': dimension 1 is 4, the model expects 3"),
    ({"inputs": [pixels(1, shape=[1, -3]), mask(1)]}, "'shape' must be a list of non-negative integers"),
    ({"inputs": [pixels(1, shape=[1.0, 3]), mask(1)]}, "'shape' must be a list of non-negative integers"),
    ({"inputs": [pixels(2), mask(3)]}, "input 'mask': batch size 3 differs from the other inputs' 2"),
    ({"inputs": [pixels(1, data=None), mask(1)]}, "input 'pixels': 'data' must be a list (or use binary_data_size)"),
    ({"inputs": [pixels(1, parameters=[]), mask(1)]}, "input 'pixels': 'parameters' must be an object"),
    ({"inputs": [pixels(1), mask(1)], "outputs": [{"name": "nope"}]}, "unknown output 'nope'; the model has 'label'"),
    ({"inputs": [pixels(1), mask(1)], "outputs": {"name": "label"}}, "'outputs' must be a list"),
    ({"inputs": [pixels(1), mask(1)], "outputs": ["label"]}, "outputs[0] must be an object with a 'name'"),
])
def test_malformed_requests_are_refused_with_the_problem_named(header: dict[str, Any], needle: str) -> None:
    assert needle in refused(header)


def test_batch_limit() -> None:
    assert check({"inputs": [pixels(4), mask(4)]}, max_batch_size=4).batch_size == 4
    assert refused({"inputs": [pixels(5), mask(5)]}, max_batch_size=4) == "batch size 5 exceeds the limit of 4"


# ------------------------------------------------------------------------------------------ binary tensors


def test_binary_offsets_follow_input_order() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = np.array([[1, -2], [3, -4]], dtype=np.int32)
    header = {"inputs": [binary(pixels(2), x.nbytes), binary(mask(2), m.nbytes)]}
    tail = x.tobytes() + m.tobytes()

    request = check(header, len(tail))

    assert [(i.binary_offset, i.binary_size) for i in request.inputs] == [(0, 24), (24, 16)]
    got = decode_inputs(request, memoryview(tail))
    np.testing.assert_array_equal(got["pixels"], x)
    np.testing.assert_array_equal(got["mask"], m)


def test_binary_and_json_inputs_mix() -> None:
    m = np.array([[5, 6]], dtype=np.int32)
    request = check({"inputs": [pixels(1), binary(mask(1), m.nbytes)]}, m.nbytes)
    assert request.inputs[1].binary_offset == 0
    got = decode_inputs(request, memoryview(m.tobytes()))
    np.testing.assert_array_equal(got["pixels"], [[0.0, 1.0, 2.0]])
    np.testing.assert_array_equal(got["mask"], m)


def test_binary_input_refusals_name_the_problem() -> None:
    assert refused({"inputs": [binary(pixels(2), 20), mask(2)]}, 20) == (
        "input 'pixels': binary_data_size 20 does not match shape [2, 3] of FP32 (24 bytes)")
    assert refused({"inputs": [binary(pixels(2), 24), mask(2)]}, 10) == (
        "input 'pixels': binary data runs past the end of the body")
    assert refused({"inputs": [binary(pixels(2), 24), mask(2)]}, 30) == (
        "the body holds 30 bytes of binary data but the inputs declare 24")
    assert refused({"inputs": [pixels(2), mask(2)]}, 4) == (
        "the body holds 4 bytes of binary data but the inputs declare 0")
    assert "has both 'data' and binary_data_size" in refused(
        {"inputs": [{**pixels(2), "parameters": {"binary_data_size": 24}}, mask(2)]}, 24)
    assert "binary_data_size must be a non-negative integer" in refused(
        {"inputs": [binary(pixels(2), -1), mask(2)]})
    assert "binary_data_size must be a non-negative integer" in refused(
        {"inputs": [{**binary(pixels(2), 0), "parameters": {"binary_data_size": "24"}}, mask(2)]}, 24)


# ------------------------------------------------------------------------------------------ outputs


def test_outputs_default_to_json_and_request_level_binary_applies_to_all() -> None:
    base = {"inputs": [pixels(1), mask(1)]}
    assert check(base).outputs is None and check(base).binary_default is False
    on = check({**base, "parameters": {"binary_data_output": True}})
    assert on.binary_default is True and on.outputs is None
    listed = check({**base, "parameters": {"binary_data_output": True}, "outputs": [{"name": "scores"}]})
    assert listed.outputs == (RequestedOutput("scores", True),)


def test_per_output_binary_data_overrides_the_request_default() -> None:
    request = check({"inputs": [pixels(1), mask(1)], "parameters": {"binary_data_output": True},
                     "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "scores"}]})
    assert request.outputs == (RequestedOutput("label", False), RequestedOutput("scores", True))
    request = check({"inputs": [pixels(1), mask(1)],
                     "outputs": [{"name": "label"}, {"name": "scores", "parameters": {"binary_data": True}}]})
    assert request.outputs == (RequestedOutput("label", False), RequestedOutput("scores", True))


LABEL = np.array([1, 0, 1], dtype=np.int64)
SCORES = np.array([[0.25, 0.75], [0.5, 0.5], [0.125, 0.875]], dtype=np.float32)
OUTPUTS = {"label": LABEL, "scores": SCORES}


def encode(header: dict[str, Any]) -> tuple[bytes, int | None]:
    request = check({"inputs": [pixels(3), mask(3)], **header})
    return encode_response("m", "2", request, OUTPUTS, SIG.outputs)


def test_json_response_lists_every_output_in_model_order() -> None:
    body, json_length = encode({})
    assert json_length is None
    doc = orjson.loads(body)
    assert doc == {"model_name": "m", "model_version": "2", "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [3], "data": [1, 0, 1]},
        {"name": "scores", "datatype": "FP32", "shape": [3, 2], "data": [0.25, 0.75, 0.5, 0.5, 0.125, 0.875]}]}


def test_request_id_is_echoed_only_when_given() -> None:
    assert orjson.loads(encode({"id": "req-42"})[0])["id"] == "req-42"
    assert "id" not in orjson.loads(encode({})[0])


def test_only_the_requested_outputs_come_back_in_the_requested_order() -> None:
    doc = orjson.loads(encode({"outputs": [{"name": "scores"}, {"name": "label"}]})[0])
    assert [o["name"] for o in doc["outputs"]] == ["scores", "label"]
    doc = orjson.loads(encode({"outputs": [{"name": "label"}]})[0])
    assert [o["name"] for o in doc["outputs"]] == ["label"]


def test_binary_response_is_json_header_then_raw_bytes_in_output_order() -> None:
    body, json_length = encode({"parameters": {"binary_data_output": True}})
    assert json_length is not None
    doc = orjson.loads(body[:json_length])
    assert [(o["name"], o["datatype"], o["shape"], o["parameters"]) for o in doc["outputs"]] == [
        ("label", "INT64", [3], {"binary_data_size": 24}), ("scores", "FP32", [3, 2], {"binary_data_size": 24})]
    assert all("data" not in o for o in doc["outputs"])
    assert body[json_length:] == LABEL.tobytes() + SCORES.tobytes()


def test_mixed_response_carries_only_binary_outputs_in_the_tail() -> None:
    body, json_length = encode({"id": "mix", "outputs": [
        {"name": "scores", "parameters": {"binary_data": True}}, {"name": "label"}]})
    assert json_length is not None
    doc = orjson.loads(body[:json_length])
    assert doc["id"] == "mix"
    scores, label = doc["outputs"]
    assert scores["parameters"] == {"binary_data_size": SCORES.nbytes} and "data" not in scores
    assert label["data"] == [1, 0, 1]
    tail = body[json_length:]
    np.testing.assert_array_equal(np.frombuffer(tail, dtype="<f4").reshape(3, 2), SCORES)


def test_a_binary_request_round_trips_through_decode_and_encode() -> None:
    """A digits-shaped request: binary in, binary out, the bytes survive unchanged."""
    x = np.random.default_rng(3).integers(0, 17, size=(4, 64)).astype(np.float32)
    head = orjson.dumps({"id": "rt", "inputs": [{"name": "input", "datatype": "FP32", "shape": [4, 64],
                                                 "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "label", "parameters": {"binary_data": True}}]})
    header, tail = split_body(head + x.tobytes(), str(len(head)))
    request = check_request(header, len(tail), DIGITS, 64)
    got = decode_inputs(request, tail)["input"]
    np.testing.assert_array_equal(got, x)
    label = got.sum(axis=1).astype(np.int64)
    body, json_length = encode_response("digits", "1", request, {"label": label}, DIGITS.outputs)
    assert json_length is not None and orjson.loads(body[:json_length])["id"] == "rt"
    np.testing.assert_array_equal(np.frombuffer(body[json_length:], dtype="<i8"), label)


# ---------------------------------------------------------------------------------------------- big JSON bodies


def _skeleton_signature(datatype: str = "FP32") -> Signature:
    return Signature((TensorSpec("x", datatype, (-1, 3)),), (TensorSpec("y", "FP32", (-1,)),), max_batch_size=2)


def test_a_skeleton_counts_flat_numeric_arrays_without_parsing_them() -> None:
    body = (b'{"id": "r", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], '
            b'"data": [1, 2.5, -3e2,\n 4, 5, 6]}]}')
    found = split_skeleton(body)
    assert found is not None
    header, shapes = found
    assert header["id"] == "r" and header["inputs"][0]["data"] == []
    assert shapes == [DataShape(6, False)]
    checked = check_request(header, 0, _skeleton_signature(), data_shapes=shapes)
    assert checked.batch_size == 2 and checked.inputs[0].shape == (2, 3)
    ints = split_skeleton(b'{"inputs":[{"name":"x","datatype":"INT32","shape":[1,3],"data":[1,2,3]}]}')
    assert ints is not None and ints[1] == [DataShape(3, True)]
    assert split_skeleton(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[0,3],"data":[ ]}]}') is not None


@pytest.mark.parametrize("data", [b"[[1,2,3]]", b'["1", 2, 3]', b"[true, 2, 3]", b"[null, 2, 3]", b"[{}, 2, 3]",
                                  b"[1,,2,3]", b"[,1,2]", b"[1,2, ]"])
def test_anything_but_flat_numbers_is_parsed_whole(data: bytes) -> None:
    assert split_skeleton(b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":' + data + b"}]}") is None


@pytest.mark.parametrize(("datatype", "data", "shape", "needle"), [
    ("FP32", b"[1,2,3,4]", b"[1,3]", "4 elements"),
    ("INT32", b"[1,2.5,3]", b"[1,3]", "integers are required"),
    ("BOOL", b"[1,0,1]", b"[1,3]", "found numbers"),
    ("FP32", b"[1,2,3,4,5,6,7,8,9]", b"[3,3]", "exceeds the limit of 2"),
])
def test_a_skeleton_is_refused_like_the_whole_body(datatype: str, data: bytes, shape: bytes, needle: str) -> None:
    body = b'{"inputs":[{"name":"x","datatype":"%s","shape":%s,"data":%s}]}' % (datatype.encode(), shape, data)
    found = split_skeleton(body)
    assert found is not None
    with pytest.raises(BadRequest, match=needle):
        check_request(found[0], 0, _skeleton_signature(datatype), data_shapes=found[1])
    with pytest.raises(BadRequest):  # the whole parse refuses it too
        check_request(orjson.loads(body), 0, _skeleton_signature(datatype))
