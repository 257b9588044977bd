"""Shared helpers of the gateway unit tests: named tokens, a fake clock, the digits routing and signature."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.types import ASGIApp

from serving.protocol import Signature, TensorSpec

ALICE = "alice-token-0123456789"
BOB = "bob-token-abcdefghijkl"
DIGITS = Signature((TensorSpec("input", "FP32", (-1, 64)),),
                   (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10))))


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def routing_doc() -> dict[str, Any]:
    return {"models": {"digits": {
        "colors": {"blue": {"version": "1", "backends": ["http://127.0.0.1:8001"]},
                   "green": {"version": "2", "backends": ["http://127.0.0.1:8002"]}},
        "weights": {"blue": 100, "green": 0},
    }}}


def client(app: ASGIApp, address: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 40000)),
                             base_url="http://gateway")
