"""gateway/inputs.py: the model's limits learned from a real model server's /config, tightened by routing."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from gateway.inputs import OFF_LOOP_BYTES, learn_signature, parse_and_check_off_loop, signature_from_docs
from gateway.settings import ModelRoute
from serving.errors import BadRequest
from tests.procs import start_model_server

COLORS = {"blue": {"version": "1", "backends": ["http://127.0.0.1:1"]},
          "green": {"version": "2", "backends": ["http://127.0.0.1:2"]}}


async def test_limits_come_from_the_model_server_and_the_routing_file(tmp_path: Path, model_repo: Path) -> None:
    proc, url = start_model_server(tmp_path, ["digits:1"], env={"BLUEGREEN_SERVING_MAX_REQUEST_ROWS": "32"})
    try:
        async with httpx.AsyncClient() as client:
            async def get_json(u: str, timeout_s: float) -> object | None:
                r = await client.get(u, timeout=timeout_s)
                return r.json() if r.status_code == 200 else None

            learned = await learn_signature(get_json, url, "digits", "1", None)
            assert learned is not None and learned.max_batch_size == 32 and not learned.allow_non_finite
            assert [s.name for s in learned.inputs] == ["input"]
            route = ModelRoute.model_validate({"colors": COLORS, "max_batch_size": 8, "allow_non_finite": True})
            tightened = await learn_signature(get_json, url, "digits", "1", route)
            assert tightened is not None and tightened.max_batch_size == 8 and tightened.allow_non_finite
            looser = ModelRoute.model_validate({"colors": COLORS, "max_batch_size": 1000})
            kept = await learn_signature(get_json, url, "digits", "1", looser)
            assert kept is not None and kept.max_batch_size == 32  # the routing file can only lower it
            assert await learn_signature(get_json, url, "nope", "1", None) is None
    finally:
        assert proc.stop() == 0


def test_routing_keys_are_strict() -> None:
    with pytest.raises(ValueError):
        ModelRoute.model_validate({"colors": COLORS, "allow_non_finite": "yes"})
    with pytest.raises(ValueError):
        ModelRoute.model_validate({"colors": COLORS, "max_batch_size": 0})


def test_an_older_server_without_config_leaves_the_limits_unknown() -> None:
    meta = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]}
    sig = signature_from_docs(meta, None, None)
    assert sig is not None and sig.max_batch_size is None and sig.allow_non_finite is False
    assert signature_from_docs({"inputs": "x"}, None, None) is None


async def test_a_big_body_is_checked_off_the_loop_with_the_same_verdict() -> None:
    meta = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}]}
    sig = signature_from_docs(meta, {"max_batch_size": 100000}, None)
    assert sig is not None
    rows = np.random.default_rng(0).standard_normal((4000, 64)).round(6).tolist()
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [4000, 64], "data": rows}]})
    assert len(body) > OFF_LOOP_BYTES
    _, checked = await parse_and_check_off_loop(body, None, sig)
    assert checked is not None and checked.batch_size == 4000
    rows[-1][-1] = "1"
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [4000, 64], "data": rows}]})
    with pytest.raises(BadRequest, match="found string"):
        await parse_and_check_off_loop(body, None, sig)
