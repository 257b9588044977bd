"""Pod discovery on loopback: one name, several model servers, a resolver the test controls (a JSON file)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import orjson
import pytest

from tests.integration.expect import expect
from tests.procs import admin_headers, routing, start_gateway, start_model_server, wait_until

pytestmark = pytest.mark.usefixtures("model_repo")
BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]})
NO_CACHE = {"cache-control": "no-cache, no-store"}


def blue_backends(admin: str) -> dict[str, str]:
    doc = expect(httpx.get(f"{admin}/admin/v1/models", headers=admin_headers())).json()
    return {b["url"]: b["breaker"] for b in doc["models"][0]["colors"]["blue"]["backends"]}


def test_pods_behind_one_name_come_and_go_and_a_dead_pod_opens_only_its_breaker(tmp_path: Path) -> None:
    pod_a, url_a = start_model_server(tmp_path, ["digits:1"])
    pod_b, url_b = start_model_server(tmp_path, ["digits:1"])
    green, green_url = start_model_server(tmp_path, ["digits:2"])
    hosts = tmp_path / "pods.json"

    def publish(*urls: str) -> None:
        tmp = hosts.with_suffix(".tmp")
        tmp.write_text(json.dumps({"blue.pods.svc": [u.removeprefix("http://") for u in urls]}))
        os.replace(tmp, hosts)

    publish(url_a)
    env = {"BLUEGREEN_DISCOVERY_FILE": str(hosts), "BLUEGREEN_DISCOVERY_REFRESH_S": "0.3",
           "BLUEGREEN_BREAKER__OPEN_S": "60"}
    gw, data, admin = start_gateway(tmp_path, routing(["dns+http://blue.pods.svc:9"], [green_url]), env)
    try:
        assert blue_backends(admin) == {url_a: "closed"}
        publish(url_a, url_b)
        wait_until(lambda: set(blue_backends(admin)) == {url_a, url_b}, 2, what="the new pod")

        with httpx.Client(base_url=data, timeout=10) as c:
            for _ in range(40):
                expect(c.post("/v2/models/digits/infer", content=BODY, headers=NO_CACHE), 200, "two pods")
            pod_a.popen.send_signal(signal.SIGKILL)
            pod_a.wait(5)
            for _ in range(120):  # every request still answered: pod b (or green) takes them
                expect(c.post("/v2/models/digits/infer", content=BODY, headers=NO_CACHE), 200, "pod a killed")
        states = blue_backends(admin)
        assert states == {url_a: "open", url_b: "closed"}, states

        publish(url_b)
        wait_until(lambda: set(blue_backends(admin)) == {url_b}, 2, what="the dead pod to be dropped")
        assert blue_backends(admin)[url_b] == "closed"
    finally:
        gw.stop()
        for p in (pod_a, pod_b, green):
            p.stop()
