"""Breaker transitions become audit entries (and so notifications) from a watcher off the request path: the data
plane's real breakers, tripped and healed by recorded calls, and a real memory store's audit log."""

from __future__ import annotations

import asyncio

from gateway.breaker_watch import BreakerWatch
from gateway.dataplane import DataPlane
from gateway.settings import BreakerSettings, GatewaySettings, RoutingFile
from gateway.state import MemoryStateStore
from tests.gateway.support import routing_doc

FAST = BreakerSettings(window_size=2, minimum_calls=2, failure_rate_threshold=0.5, open_s=0.05, half_open_probes=1)


async def test_opened_and_closed_are_audited_once_each_with_the_backend_and_replica() -> None:
    store = MemoryStateStore.from_routing(RoutingFile.model_validate(routing_doc()))
    plane = DataPlane(GatewaySettings(breaker=FAST), store)
    watch = BreakerWatch(plane, store, replica="r1")
    backend = plane.runtime("digits", "green").backends[0]
    breaker = backend.breaker

    await watch.tick()
    assert store.audit() == [], "closed breakers at the start are not news"
    for _ in range(2):
        permit = breaker.acquire()
        assert permit is not None
        breaker.record(permit, False, 0.01)
    await watch.tick()
    await watch.tick()  # nothing new: one entry per change, not per round
    [opened] = store.audit()
    assert (opened.action, opened.model, opened.who) == ("breaker_opened", "digits", "gateway:r1")
    assert opened.new == {"color": "green", "backend": backend.url, "breaker": "open", "replica": "r1"}
    assert opened.id is not None

    await asyncio.sleep(0.06)  # open_s passed, no call yet: still open to the watcher, and watching changes nothing
    await watch.tick()
    assert len(store.audit()) == 1 and breaker.settled_state == "open"
    permit = breaker.acquire()  # the next call probes (half-open) and fails: open again, not news
    assert permit is not None and breaker.state == "half_open"
    await watch.tick()
    breaker.record(permit, False, 0.01)
    await watch.tick()
    assert len(store.audit()) == 1

    await asyncio.sleep(0.06)  # a successful probe closes it
    permit = breaker.acquire()
    assert permit is not None
    breaker.record(permit, True, 0.01)
    assert breaker.state == "closed"
    await watch.tick()
    closed, _ = store.audit()
    assert closed.action == "breaker_closed" and closed.new["breaker"] == "closed"
    assert closed.reason == f"the breaker of green backend {backend.url} closed on r1"
