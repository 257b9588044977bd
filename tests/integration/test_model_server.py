"""``bluegreen serve-model`` as a real process on loopback, driven by tritonclient (a real V2 client) and httpx."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton

from tests.integration.expect import describe, expect, expect_all
from tests.procs import Proc, start_model_server, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")


@pytest.fixture(scope="module")
def server_proc(tmp_path_factory: pytest.TempPathFactory, model_repo: Path):  # type: ignore[no-untyped-def]
    proc, url = start_model_server(
        tmp_path_factory.mktemp("serve"), ["digits:1", "digits:2", "wide:1"],
        extra=["--max-batch-size", "16", "--max-queue-delay-ms", "20"],
        env={"BLUEGREEN_SERVING_MAX_BODY_BYTES": str(1 << 20), "BLUEGREEN_SERVING_MAX_REQUEST_ROWS": "256"})
    yield proc, url
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def server(server_proc: tuple[Proc, str]) -> str:
    return server_proc[1]


@pytest.fixture(scope="module")
def client(server: str):  # type: ignore[no-untyped-def]
    c = triton.InferenceServerClient(url=server.removeprefix("http://"))
    yield c
    c.close()


def reference(model_repo: Path, name: str, version: str, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(model_repo / name / version / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input": x}), strict=True))


def digits_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, size=(n, 64)).astype(np.float32)


def healthy(url: str) -> None:
    expect(httpx.get(f"{url}/v2/health/ready"), 200)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    expect(httpx.post(f"{url}/v2/models/digits/infer", json=body), 200)


# ------------------------------------------------------------------------------------------ tritonclient


def test_health_and_metadata_with_tritonclient(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits", "1") and client.is_model_ready("digits", "2")
    meta = client.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("digits", "2")
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]} == {
        "label": ("INT64", [-1]), "probabilities": ("FP32", [-1, 10])}
    wide = client.get_model_metadata("wide")
    assert wide["inputs"][0]["shape"] == [-1, 512] and wide["outputs"][0]["name"] == "logits"


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_inference_matches_onnxruntime(client: triton.InferenceServerClient, model_repo: Path,
                                       binary_in: bool, binary_out: bool) -> None:
    x = digits_rows(5, seed=int(binary_in) * 2 + int(binary_out))
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outs = [triton.InferRequestedOutput("label", binary_data=binary_out),
            triton.InferRequestedOutput("probabilities", binary_data=binary_out)]
    for version in ("1", "2"):
        result = client.infer("digits", [inp], model_version=version, outputs=outs, request_id=f"req-{version}")
        want = reference(model_repo, "digits", version, x)
        assert result.get_response()["id"] == f"req-{version}"
        assert result.get_response()["model_version"] == version
        np.testing.assert_array_equal(result.as_numpy("label"), want["label"])
        np.testing.assert_allclose(result.as_numpy("probabilities"), want["probabilities"], rtol=1e-5, atol=1e-6)


def test_default_outputs_and_wide_model(client: triton.InferenceServerClient, model_repo: Path) -> None:
    x = np.random.default_rng(7).standard_normal((3, 512)).astype(np.float32)
    inp = triton.InferInput("input", [3, 512], "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer("wide", [inp])  # no outputs named: every output comes back
    np.testing.assert_allclose(result.as_numpy("logits"), reference(model_repo, "wide", "1", x)["logits"],
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ batching


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length (what the server always sends) from a blocking socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (line.partition(b":") for line in lines[1:])
                  if k.strip().lower() == b"content-length")
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, body[:length]


def test_concurrent_mixed_batches_each_get_their_own_rows(server_proc: tuple[Proc, str], model_repo: Path) -> None:
    """60 requests of 1-7 rows that really arrive together. A client that sends one request at a time (httpx's
    pool) cannot test batching any more: the server answers each before the next is written, and an idle batcher
    runs a lone request at once by design. Here every connection is open and accepted first, the server is
    stopped (SIGSTOP) while all 60 complete requests are written into its sockets, then continued: it finds them
    all readable at once, as under a real burst, on any machine load."""
    proc, server = server_proc
    rng = np.random.default_rng(11)
    sizes = [int(s) for s in rng.integers(1, 8, size=60)]
    inputs = [digits_rows(n, seed=100 + i) for i, n in enumerate(sizes)]
    host, port = server.removeprefix("http://").split(":")
    path = "/v2/models/digits/versions/2"
    before = httpx.get(f"{server}{path}/stats").json()["model_stats"][0]
    requests = []
    for i, x in enumerate(inputs):
        body = orjson.dumps({"id": str(i), "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                                        "data": x.ravel().tolist()}]})
        requests.append(b"POST %s/infer HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), len(body), body))
    socks = [socket.create_connection((host, int(port)), timeout=30) for _ in inputs]
    try:
        for sock in socks:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        expect(httpx.get(f"{server}/v2/health/live"), 200)  # answered after the 60 were accepted
        proc.signal(signal.SIGSTOP)
        try:
            for sock, request in zip(socks, requests, strict=True):
                sock.sendall(request)  # ~1 KB each: the kernel buffers them while the server is stopped
        finally:
            proc.signal(signal.SIGCONT)
        answers = [_read_response(sock) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    after = httpx.get(f"{server}{path}/stats").json()["model_stats"][0]
    for i, (x, (status, payload)) in enumerate(zip(inputs, answers, strict=True)):
        assert status == 200, payload
        res = orjson.loads(payload)
        assert res["id"] == str(i)
        out = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in res["outputs"]}
        want = reference(model_repo, "digits", "2", x)
        assert out["label"].shape == (len(x),)
        np.testing.assert_array_equal(out["label"], want["label"])
        np.testing.assert_allclose(out["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6)
    assert after["inference_count"] - before["inference_count"] == sum(sizes)
    # Arrivals during a run went together: far fewer runs than requests (one per request would mean no batching).
    runs = after["execution_count"] - before["execution_count"]
    assert runs <= len(sizes) // 2, f"{runs} runs for {len(sizes)} requests"
    assert max(b["batch_size"] for b in after["batch_stats"]) <= 16


# ------------------------------------------------------------------------------------------ bad input


GOOD = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}


def _with(**changes: object) -> dict:  # type: ignore[type-arg]
    return {"inputs": [{**GOOD, **changes}]}


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (orjson.dumps({"inputs": []}), 400, "non-empty"),
    (orjson.dumps(_with(name="pixels")), 400, "unknown input 'pixels'"),
    (orjson.dumps(_with(datatype="FP64")), 400, "datatype 'FP64'"),
    (orjson.dumps(_with(datatype="BYTES")), 400, "datatype 'BYTES'"),
    (orjson.dumps(_with(shape=[64])), 400, "rank 1"),
    (orjson.dumps(_with(shape=[1, 32])), 400, "dimension 1 is 32"),
    (orjson.dumps(_with(shape=[2, 64])), 400, "64 elements"),
    (orjson.dumps(_with(data=["a"] * 64)), 400, "not valid FP32"),
    (orjson.dumps(_with(data=[[0.0] * 32, [0.0] * 31 + [[1.0]]])), 400, ""),
    (orjson.dumps(_with(shape=[300, 64], data=[0.0] * 300 * 64)), 400, "batch size 300 exceeds"),
    (orjson.dumps({"inputs": [GOOD], "outputs": [{"name": "nope"}]}), 400, "unknown output 'nope'"),
    (orjson.dumps({"inputs": [GOOD, GOOD]}), 400, "given twice"),
    (orjson.dumps({"inputs": [{**GOOD, "data": None, "parameters": {"binary_data_size": 256}}]}), 400, ""),
])
def test_bad_requests_are_refused_clearly(server: str, body: bytes, status: int, needle: str) -> None:
    r = httpx.post(f"{server}/v2/models/digits/infer", content=body, headers={"content-type": "application/json"})
    expect(r, status)
    assert needle in r.json()["error"]
    healthy(server)


@pytest.mark.parametrize(("data", "needle"), [
    (["0.5"] * 64, "found string"),
    ([True] + [0.0] * 63, "found boolean"),
    ([{"v": 1}] + [0.0] * 63, "found object"),
    ([[0.0] * 63 + ["1"]], "found string"),
    ([1e39] + [0.0] * 63, "overflows FP32"),
])
@pytest.mark.exclusive
def test_strict_values_are_refused_before_any_run(server: str, data: list, needle: str) -> None:  # type: ignore[type-arg]
    before = httpx.get(f"{server}/v2/models/digits/versions/2/stats").json()["model_stats"][0]["execution_count"]
    started = time.monotonic()
    r = httpx.post(f"{server}/v2/models/digits/versions/2/infer", json=_with(data=data))
    assert time.monotonic() - started < 1.0
    expect(r, 400)
    assert "input 'input'" in r.json()["error"] and needle in r.json()["error"], describe(r)
    after = httpx.get(f"{server}/v2/models/digits/versions/2/stats").json()["model_stats"][0]["execution_count"]
    assert after == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_binary_tensor_is_refused(server: str, bad: float) -> None:
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "parameters": {"binary_data_size": 256}}]})
    data = np.zeros(64, np.float32)
    data[5] = bad
    r = httpx.post(f"{server}/v2/models/digits/infer", content=header + data.tobytes(),
                   headers={"inference-header-content-length": str(len(header))})
    expect(r, 400)
    assert "NaN or Inf" in r.json()["error"], describe(r)


def test_config_reports_the_row_limit_and_non_finite_setting(server: str) -> None:
    for path in ("/v2/models/digits/config", "/v2/models/digits/versions/1/config"):
        doc = httpx.get(f"{server}{path}").json()
        assert doc["name"] == "digits" and doc["max_batch_size"] == 256  # BLUEGREEN_SERVING_MAX_REQUEST_ROWS
        assert doc["parameters"]["allow_non_finite"] == {"string_value": "false"}
        assert doc["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
        assert doc["dynamic_batching"]["max_batch_rows"] == 16
    expect(httpx.get(f"{server}/v2/models/nope/config"), 404)


def test_allow_non_finite_flag_lets_nan_through(tmp_path: Path) -> None:
    proc, url = start_model_server(tmp_path, ["digits:1"], extra=["--allow-non-finite"])
    try:
        config = httpx.get(f"{url}/v2/models/digits/config").json()
        assert config["parameters"]["allow_non_finite"] == {"string_value": "true"}
        header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                           "parameters": {"binary_data_size": 256}}]})
        data = np.zeros(64, np.float32)
        data[0] = np.nan
        r = httpx.post(f"{url}/v2/models/digits/infer", content=header + data.tobytes(),
                       headers={"inference-header-content-length": str(len(header))})
        expect(r, 200)
    finally:
        assert proc.stop() == 0


def test_binary_length_mismatches(server: str) -> None:
    header = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                       "parameters": {"binary_data_size": 256}}]})
    data = np.zeros(64, np.float32).tobytes()
    url = f"{server}/v2/models/digits/infer"
    hl = {"inference-header-content-length": str(len(header))}
    ok = httpx.post(url, content=header + data, headers=hl)
    expect(ok, 200)
    short = httpx.post(url, content=header + data[:100], headers=hl)
    expect(short, 400)
    assert "past the end" in short.json()["error"], describe(short)
    extra = httpx.post(url, content=header + data + b"xx", headers=hl)
    expect(extra, 400)
    assert "binary data" in extra.json()["error"], describe(extra)
    bad = httpx.post(url, content=header + data, headers={"inference-header-content-length": "99999"})
    expect(bad, 400)
    assert "outside the body" in bad.json()["error"], describe(bad)
    healthy(server)


def test_unknown_model_version_and_route(server: str) -> None:
    r = httpx.post(f"{server}/v2/models/nope/infer", json=_with())
    expect(r, 404)
    assert "unknown model 'nope'" in r.json()["error"], describe(r)
    r = httpx.post(f"{server}/v2/models/digits/versions/9/infer", json=_with())
    expect(r, 404)
    assert "no version '9'" in r.json()["error"], describe(r)
    r = httpx.get(f"{server}/v2/models/digits/versions/9/ready")
    expect(r, 404)
    r = httpx.get(f"{server}/v2/nothing/here")
    expect(r, 404)
    assert "error" in r.json(), describe(r)
    r = httpx.get(f"{server}/v2/models/digits/infer")
    expect(r, 405)
    assert "error" in r.json(), describe(r)
    healthy(server)


def test_oversized_bodies_get_413_declared_or_chunked(server: str) -> None:
    big = b"[" + b"0," * (600 * 1024) + b"0]"  # 1.2 MB > the 1 MiB limit
    r = httpx.post(f"{server}/v2/models/digits/infer", content=big)
    expect(r, 413)
    assert "exceeds" in r.json()["error"], describe(r)

    def chunks():  # no Content-Length: httpx sends Transfer-Encoding: chunked
        for _ in range(40):
            yield b"0" * 65536

    r = httpx.post(f"{server}/v2/models/digits/infer", content=chunks())
    expect(r, 413)
    assert "exceeds" in r.json()["error"], describe(r)
    healthy(server)


# ------------------------------------------------------------------------------------------ lifecycle and faults


def test_queue_full_is_503_with_retry_after(tmp_path: Path) -> None:
    proc, url = start_model_server(tmp_path, ["wide:1"], extra=["--max-batch-size", "1", "--max-queue-size", "2"])
    try:
        x = np.zeros((1, 512), np.float32).ravel().tolist()
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 512], "data": x}]}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=200), timeout=30) as c:
                return await asyncio.gather(*(c.post("/v2/models/wide/infer", json=body) for _ in range(150)))

        responses = asyncio.run(burst())
        expect_all(responses, (200, 503), "150 at once on a queue of 2")
        refused = [r for r in responses if r.status_code == 503]
        assert refused, "a queue of 2 must overflow under 150 concurrent requests"
        assert refused[0].headers["retry-after"] == "1" and "queue is full" in refused[0].json()["error"], \
            describe(refused[0])
        assert any(r.status_code == 200 for r in responses)
    finally:
        assert proc.stop() == 0


def test_fault_flags_inject_latency_and_errors(tmp_path: Path) -> None:
    proc, url = start_model_server(tmp_path, ["digits:1"],
                                   extra=["--fault-latency-ms", "150", "--fault-error-rate", "0.5"])
    try:
        codes = []
        started = time.monotonic()
        for _ in range(10):
            r = expect(httpx.post(f"{url}/v2/models/digits/infer", json=_with()), (200, 500))
            codes.append(r.status_code)
            if r.status_code == 500:
                assert "injected fault" in r.json()["error"], describe(r)
        assert time.monotonic() - started >= 10 * 0.15
        assert codes.count(500) == 5, codes  # the injected errors are spread evenly: every other call
        expect(httpx.get(f"{url}/v2/health/ready"), 200)
    finally:
        assert proc.stop() == 0


def test_sigterm_finishes_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    proc, url = start_model_server(tmp_path, ["digits:1"], extra=["--fault-latency-ms", "600"])
    results: list[str] = []  # "200", or what went wrong in full
    lock = threading.Lock()

    def call() -> None:
        try:
            r = httpx.post(f"{url}/v2/models/digits/infer", json=_with(), timeout=10)
            outcome = "200" if r.status_code == 200 else describe(r)
        except httpx.HTTPError as exc:
            outcome = f"client error: {type(exc).__name__}: {exc}"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    wait_until(lambda: httpx.get(f"{url}/v2/models/digits/stats").status_code == 200, 5)
    # A pause, not a condition: the model server shows no count of requests in flight. The 8 requests are
    # sent at once and wait 600 ms inside the injected latency; 0.2 s is ample for all of them to arrive.
    time.sleep(0.2)
    proc.signal(signal.SIGTERM)
    for t in threads:
        t.join(15)
    assert results == ["200"] * 8, results
    assert proc.wait(15) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v2/health/live", timeout=2)
    proc.stop()


def test_unknown_model_on_the_command_line_fails_fast(tmp_path: Path) -> None:
    from tests.procs import BLUEGREEN, Proc, free_port

    proc = Proc([*BLUEGREEN, "serve-model", "--model", "nope:1", "--port", str(free_port())], tmp_path / "x.log")
    assert proc.wait(30) == 2
    assert "not found" in proc.log()
    proc.stop()


def test_an_idle_server_answers_at_once_whatever_the_queue_delay(tmp_path: Path) -> None:
    proc, url = start_model_server(tmp_path, ["digits:1", "wide:1"], extra=["--max-queue-delay-ms", "5000"])
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for model, width in (("digits", 64), ("wide", 512)):  # on the event loop, and on a worker thread
                body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, width], "data": [0.0] * width}]}
                for _ in range(3):
                    started = time.monotonic()
                    r = c.post(f"/v2/models/{model}/infer", json=body)
                    expect(r, 200)
                    assert time.monotonic() - started < 2.0  # waiting for the 5 s delay would be unmistakable
    finally:
        assert proc.stop() == 0
