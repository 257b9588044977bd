"""TLS end to end on loopback: a model server on HTTPS, the gateway verifying it against a private CA and serving
both listeners on TLS 1.3 only, mutual TLS on the admin listener, and Triton's own HTTP client over TLS.

The CA and certificates are throwaway ones from ``trustme``; nothing leaves loopback.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from tests.procs import ADMIN_TOKEN, BLUEGREEN, ROOT, Proc, free_port, routing, wait_until

ROW = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
       0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
INFER = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path
    client_cert: Path  # PEM holding the client's key and certificate chain

    def context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            ctx.load_cert_chain(self.client_cert)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("operator@bluegreen.test")
    paths = Pki(ca, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem")
    ca.cert_pem.write_to_path(str(paths.ca_file))
    server.cert_chain_pems[0].write_to_path(str(paths.cert_file))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(paths.cert_file), append=True)
    server.private_key_pem.write_to_path(str(paths.key_file))
    client.private_key_and_cert_chain_pem.write_to_path(str(paths.client_cert))
    return paths


def https_ok(url: str, ctx: ssl.SSLContext) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return httpx.get(url, verify=ctx, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False
    return probe


@dataclass
class Stack:
    data: str
    admin: str
    data_port: int
    admin_port: int


@pytest.fixture(scope="module")
def stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("tls")
    port = free_port()
    server = Proc([*BLUEGREEN, "serve-model", "--host", "127.0.0.1", "--port", str(port), "--model", "digits:1",
                   "--tls-cert", str(pki.cert_file), "--tls-key", str(pki.key_file)], d / "serve.log")
    procs = [server]
    try:
        backend = f"https://127.0.0.1:{port}"
        wait_until(https_ok(f"{backend}/v2/health/ready", pki.context()), 60, what="the model server on HTTPS")
        config = d / "routing.json"
        config.write_text(json.dumps(routing([backend], [backend])))
        data_port, admin_port = free_port(), free_port()
        gateway = Proc([*BLUEGREEN, "gateway", "--config", str(config)], d / "gateway.log", {
            "BLUEGREEN_DATA__PORT": str(data_port), "BLUEGREEN_ADMIN__PORT": str(admin_port),
            "BLUEGREEN_ADMIN_TOKEN": ADMIN_TOKEN, "BLUEGREEN_UPSTREAM__CA_FILE": str(pki.ca_file),
            "BLUEGREEN_TLS__CERT_FILE": str(pki.cert_file), "BLUEGREEN_TLS__KEY_FILE": str(pki.key_file),
            "BLUEGREEN_TLS__MIN_VERSION": "1.3", "BLUEGREEN_ADMIN__CLIENT_CA_FILE": str(pki.ca_file)})
        procs.append(gateway)
        data = f"https://127.0.0.1:{data_port}"
        wait_until(https_ok(f"{data}/v2/health/ready", pki.context()), 30, what="the gateway on HTTPS")
        yield Stack(data, f"https://127.0.0.1:{admin_port}", data_port, admin_port)
    finally:
        for p in reversed(procs):
            p.stop()


def test_answers_over_tls_13_through_a_verified_https_backend(stack: Stack, pki: Pki) -> None:
    with httpx.Client(verify=pki.context()) as client:
        r = client.post(f"{stack.data}/v2/models/digits/infer", json=INFER)
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"] == [0]
        stream = r.extensions["network_stream"]
        assert stream.get_extra_info("ssl_object").version() == "TLSv1.3"


TRITON = """
import ssl, sys
import numpy as np
import tritonclient.http as triton

ca, port = sys.argv[1], sys.argv[2]
client = triton.InferenceServerClient(f"127.0.0.1:{port}", ssl=True,
                                      ssl_context_factory=lambda: ssl.create_default_context(cafile=ca))
assert client.is_server_live()
x = triton.InferInput("input", [1, 64], "FP32")
x.set_data_from_numpy(np.array([[%s]], dtype=np.float32), binary_data=True)
result = client.infer("digits", [x], outputs=[triton.InferRequestedOutput("label", binary_data=True)])
print(result.as_numpy("label").tolist())
"""


def test_tritonclient_gets_answers_over_tls(stack: Stack, pki: Pki) -> None:
    script = TRITON % ",".join(map(str, ROW))
    done = subprocess.run([sys.executable, "-c", script, str(pki.ca_file), str(stack.data_port)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[0]"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_2])
def test_older_tls_versions_are_refused_in_the_handshake(stack: Stack, pki: Pki, version: ssl.TLSVersion) -> None:
    ctx = pki.context()
    with warnings.catch_warnings():  # Python deprecates TLS 1.1 itself: this client is meant to be outdated
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = version
    if version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client even offer TLS 1.1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{stack.data}/v2/health/ready", verify=ctx, timeout=5)


def test_mutual_tls_on_admin_refuses_a_client_without_a_certificate(stack: Stack, pki: Pki) -> None:
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(f"{stack.admin}/admin/v1/models", headers=headers, verify=pki.context(), timeout=5)
    r = httpx.get(f"{stack.admin}/admin/v1/models", headers=headers, verify=pki.context(client_cert=True), timeout=5)
    assert r.status_code == 200 and r.json()["models"][0]["name"] == "digits"
    # The data listener asks for no client certificate.
    assert httpx.get(f"{stack.data}/v2/health/ready", verify=pki.context(), timeout=5).status_code == 200


def test_replicas_reach_redis_over_tls_with_an_acl_user(pki: Pki, tmp_path: Path) -> None:
    """``rediss://user:password@host:port/db`` (redis-py reads ``ssl_ca_certs`` from the query): the state, the
    cache and the rate limits all reach a TLS-only Redis whose default user is off."""
    import redis

    port = free_port()
    server = Proc(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                   "--tls-cert-file", str(pki.cert_file), "--tls-key-file", str(pki.key_file),
                   "--tls-ca-cert-file", str(pki.ca_file), "--tls-auth-clients", "no", "--save", "",
                   "--appendonly", "no", "--user", "default", "off",
                   "--user", "gateway", "on", ">s3cret-acl-password", "~*", "&*", "+@all"], tmp_path / "redis.log")
    gateway = None
    try:
        client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(pki.ca_file),
                             username="gateway", password="s3cret-acl-password")
        wait_until(lambda: _pong(client), 20, what="redis-server on TLS")
        config = tmp_path / "routing.json"
        config.write_text(json.dumps(routing(["http://127.0.0.1:9"], ["http://127.0.0.1:9"])))
        data_port, admin_port = free_port(), free_port()
        url = f"rediss://gateway:s3cret-acl-password@127.0.0.1:{port}/0?ssl_ca_certs={pki.ca_file}"
        gateway = Proc([*BLUEGREEN, "gateway", "--config", str(config)], tmp_path / "gateway.log", {
            "BLUEGREEN_DATA__PORT": str(data_port), "BLUEGREEN_ADMIN__PORT": str(admin_port),
            "BLUEGREEN_ADMIN_TOKEN": ADMIN_TOKEN, "BLUEGREEN_REDIS_URL": url})
        admin = f"http://127.0.0.1:{admin_port}"
        wait_until(lambda: _ok(f"http://127.0.0.1:{data_port}/v2/health/ready"), 30, what="the gateway")
        r = httpx.put(f"{admin}/admin/v1/models/digits/split", json={"blue": 70, "green": 30},
                      headers={"authorization": f"Bearer {ADMIN_TOKEN}", "if-match": "*"}, timeout=5)
        assert r.status_code == 200, r.text
        stored = [k for k in client.scan_iter("bluegreen:*") if b"digits" in k]
        assert stored, "the gateway wrote nothing to Redis"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(pki.ca_file),
                        username="gateway", password="wrong").ping()
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()


def _pong(client: object) -> bool:
    import redis

    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except redis.RedisError:
        return False


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
