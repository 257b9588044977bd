"""In-process gateway pieces for the unit tests.

The data plane's upstream session is never started here: a test that would reach a backend fails loudly
(``Upstream`` asserts it was started), which is how the tests prove that refused requests call no backend.
Signatures (normally learned from the backends' metadata) are filled in up front for the same reason.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from gateway.app import Gateway
from gateway.auth import Authenticator
from gateway.controller import Controller
from gateway.dataplane import DataPlane
from gateway.release import Release
from gateway.settings import GatewaySettings, RoutingFile
from gateway.sources import LocalMetrics
from gateway.state import MemoryStateStore
from tests.gateway.support import ALICE, BOB, DIGITS, FakeClock, routing_doc


@pytest.fixture(autouse=True)
def _no_bluegreen_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read BLUEGREEN_* variables: the developer's shell must not leak into the tests."""
    for name in list(os.environ):
        if name.startswith("BLUEGREEN_"):
            monkeypatch.delenv(name)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def gateway(clock: FakeClock) -> AsyncIterator[Gateway]:
    """Alice and Bob hold admin tokens; the authenticator runs on the fake clock. After the test, the signature
    refresh that any state change schedules in the background must have finished without touching a backend."""
    settings = GatewaySettings(admin_tokens=f"alice:{ALICE},bob:{BOB}", max_body_bytes=4096)
    store = MemoryStateStore.from_routing(RoutingFile.model_validate(routing_doc()))
    plane = DataPlane(settings, store)
    for version in ("1", "2", "3"):
        plane.signatures[("digits", version)] = DIGITS
    auth = Authenticator(settings.tokens(), settings.auth_max_failures, settings.auth_window_s, clock)
    release = Release(store)
    yield Gateway(settings, store, plane, auth, plane.telemetry, release, Controller(release, LocalMetrics(plane)))
    task = plane._signature_refresh  # private, but the only handle on that background task
    if task is not None:
        await task  # re-raises what it raised
