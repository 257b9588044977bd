"""Notifications against a real HTTP receiver on loopback: what each audit entry becomes, the CloudEvents and Slack
bodies, signatures a receiver can verify, retries with backoff, refusals, the bounded queue, a sink that never
answers, and — on a real redis-server — one sender among replicas, resuming where the last one stopped."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.auth import Principal
from gateway.notify import CURSOR, Notifier, event_type, headline, shown_url, sink_names
from gateway.release import Release, SplitBody
from gateway.settings import NotificationSink, RoutingFile
from gateway.state import AuditEntry, MemoryStateStore, StateStore
from gateway.state_redis import RedisStateStore
from serving.process import free_port
from tests.gateway.support import routing_doc
from tests.procs import start_redis

M = "digits"
SECRET = "s3cret-for-tests"
OPS = Principal("alice", frozenset({"operator"}))


@dataclass
class Receiver:
    """A webhook receiver: records every request; ``answer`` says what to reply (a status, or None to hang)."""

    port: int = 0
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answer: Callable[[int], int | None] = lambda n: 200
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.got.append(({k.lower(): v for k, v in request.headers.items()}, body))
        self.arrived.set()
        status = self.answer(len(self.got))
        if status is None:
            await asyncio.sleep(3600)
        return web.Response(status=status or 200, text="ok")

    def events(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for _, body in self.got]

    async def wait_for(self, count: int, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.got) < count:
            assert time.monotonic() < deadline, f"{len(self.got)} of {count} deliveries arrived"
            await asyncio.sleep(0.02)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(port=free_port())
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", rec.port)
    await site.start()
    yield rec
    await runner.cleanup()


def sink(url: str, **kw: Any) -> NotificationSink:
    return NotificationSink(url=url, secret_env="HOOK_SECRET", **kw)


def release(store: StateStore | None = None) -> Release:
    return Release(store or MemoryStateStore.from_routing(RoutingFile.model_validate(routing_doc())))


def notifier(store: StateStore, *sinks: NotificationSink, **kw: Any) -> Notifier:
    kw.setdefault("poll_s", 0.02)
    kw.setdefault("backoff_s", 0.01)
    return Notifier(store, list(sinks), env={"HOOK_SECRET": SECRET}, **kw)


async def set_split(r: Release, green: int) -> None:
    await r.set_split(M, SplitBody(blue=100 - green, green=green), actor=OPS, if_revision=None)


def verified(headers: dict[str, str], body: bytes) -> bool:
    """What a receiver does: recompute the HMAC over "<timestamp>.<body>" and compare in constant time."""
    ts = headers["x-bluegreen-timestamp"]
    want = "sha256=" + hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, headers["x-bluegreen-signature"]) and abs(time.time() - int(ts)) < 300


# ---------------------------------------------------------------------------------------------- what is sent


def entry(action: str, result: str | None = None, **kw: Any) -> AuditEntry:
    rollout = {"result": result, "candidate": "green", "weight": 25, "stage": 2, "stages": 3} if result else None
    return AuditEntry(1000.0, "controller", action, M, {}, {}, "why", rollout=rollout, id="1-0", **kw)


@pytest.mark.parametrize(("action", "result", "kind"), [
    ("canary_start", "start", "bluegreen.rollout.started"),
    ("canary_start_forced", "start", "bluegreen.rollout.started"),
    ("canary_advance", "advance", "bluegreen.rollout.advanced"),
    ("canary_promote", "promote", "bluegreen.rollout.advanced"),
    ("canary_approve", "advance", "bluegreen.rollout.advanced"),
    ("canary_approve", "approve", None),
    ("canary_pause", "pause", "bluegreen.rollout.paused"),
    ("canary_resume", "resume", "bluegreen.rollout.resumed"),
    ("canary_promoted", "promoted", "bluegreen.rollout.promoted"),
    ("canary_rollback", "rollback", "bluegreen.rollout.rolled_back"),
    ("canary_abort", "abort", "bluegreen.rollout.rolled_back"),
    ("set_weights", None, "bluegreen.weights.changed"),
    ("set_color_forced", None, "bluegreen.color.repointed"),
    ("breaker_opened", None, "bluegreen.breaker.opened"),
    ("breaker_closed", None, "bluegreen.breaker.closed"),
    ("canary_start_refused", None, "bluegreen.validation.refused"),
    ("signal_received", None, "bluegreen.signal.received"),
    ("freeze_set", None, "bluegreen.freeze.set"),
    ("freeze_lifted", None, "bluegreen.freeze.lifted"),
    ("set_shadow", None, None),
])
def test_each_audit_entry_maps_to_its_event(action: str, result: str | None, kind: str | None) -> None:
    assert event_type(entry(action, result)) == kind


def test_sinks_are_named_and_their_secrets_stay_out_of_sight() -> None:
    sinks = [NotificationSink(url="https://hooks.example/a"), NotificationSink(url="https://hooks.example/b"),
             NotificationSink(url="http://x.test/", name="ops")]
    assert sink_names(sinks) == ["hooks.example", "hooks.example-2", "ops"]
    assert shown_url("https://user:pw@hooks.slack.com/services/T0/B0/XXXX?x=1") == "https://hooks.slack.com/…"
    with pytest.raises(ValueError, match="HOOK_SECRET, which is not set"):
        Notifier(MemoryStateStore({}), [sink("http://127.0.0.1:9/")], env={})


@pytest.mark.parametrize(("doc", "error"), [
    ({"url": "ftp://x/"}, "http"), ({"url": "http://x/", "events": ["bluegreen.nope"]}, "unknown event type"),
    ({"url": "http://x/", "format": "teams"}, "format"), ({"url": "http://x/", "secret_env": "bad name"}, "pattern"),
    ({"url": "http://x/", "events": []}, "at least one"),
])
def test_a_bad_sink_stops_the_routing_file(doc: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        RoutingFile.model_validate({**routing_doc(), "notifications": [doc]})
    with pytest.raises(ValueError, match="same name"):
        RoutingFile.model_validate({**routing_doc(), "notifications": [{"url": "http://a/", "name": "x"},
                                                                        {"url": "http://b/", "name": "x"}]})


def test_the_slack_line_says_what_happened() -> None:
    line = headline(entry("canary_rollback", "rollback"), "bluegreen.rollout.rolled_back")
    assert line == "[bluegreen] digits: green rolled back to 0% (by controller): why"


# ---------------------------------------------------------------------------------------------- delivery


async def test_a_change_arrives_as_a_signed_cloudevent_with_the_audit_id(receiver: Receiver) -> None:
    r = release()
    n = notifier(r.store, sink(receiver.url))
    await n.start()
    try:
        await set_split(r, 10)
        await receiver.wait_for(1)
    finally:
        await n.stop()
    headers, body = receiver.got[0]
    event = orjson.loads(body)
    audit = (await r.store.read_audit(1))[0]
    assert headers["content-type"].startswith("application/cloudevents+json")
    assert verified(headers, body)
    assert event["specversion"] == "1.0" and event["type"] == "bluegreen.weights.changed"
    assert event["id"] == audit.id == headers["x-bluegreen-event-id"] and event["subject"] == M
    assert event["data"]["changed"] == {"from": {"weights": {"blue": 100, "green": 0}},
                                        "to": {"weights": {"blue": 90, "green": 10}}}
    assert event["data"]["by"] == "alice" and event["data"]["roles"] == ["operator"]
    assert not verified({**headers, "x-bluegreen-timestamp": str(int(headers["x-bluegreen-timestamp"]) + 1)}, body)
    status = await n.status()
    assert status["deliveries"][0]["outcome"] == "delivered" and status["deliveries"][0]["event_id"] == audit.id
    assert status["sinks"][0]["url"] == f"http://127.0.0.1:{receiver.port}/…" and status["sinks"][0]["signed"]


async def test_nothing_from_before_the_start_is_replayed_and_filters_apply(receiver: Receiver) -> None:
    r = release()
    await set_split(r, 10)  # before the notifier started: history, not news
    n = notifier(r.store, NotificationSink(url=receiver.url, format="slack", events=("bluegreen.rollout.*",)),
                 sink(receiver.url, events=("bluegreen.weights.changed",)))
    await n.start()
    try:
        await set_split(r, 20)
        await receiver.wait_for(1)
        await asyncio.sleep(0.2)  # a second delivery (to the rollout-only sink) would have come by now
    finally:
        await n.stop()
    assert len(receiver.got) == 1 and receiver.events()[0]["data"]["changed"]["to"]["weights"]["green"] == 20


async def test_failures_are_retried_with_backoff_until_delivered_in_order(receiver: Receiver) -> None:
    receiver.answer = lambda n: 503 if n <= 3 else 200
    r = release()
    n = notifier(r.store, sink(receiver.url))
    await n.start()
    try:
        for green in (10, 20, 30):
            await set_split(r, green)
        await receiver.wait_for(6)
    finally:
        await n.stop()
    ids = [e["id"] for e in receiver.events()]
    assert ids[:4] == [ids[0]] * 4, "the first event is retried (three 503s) before the next is sent"
    assert [e["data"]["changed"]["to"]["weights"]["green"] for e in receiver.events()[3:]] == [10, 20, 30]
    assert all(verified(h, b) for h, b in receiver.got)
    stamps = {h["x-bluegreen-timestamp"] for h, _ in receiver.got[:4]}
    assert stamps and all(orjson.loads(b)["id"] == ids[0] for _, b in receiver.got[:4])
    first = (await n.status())["deliveries"][-1]
    assert first["outcome"] == "delivered" and first["attempts"] == 4


async def test_a_refusal_is_not_retried_and_a_dead_sink_is_given_up(receiver: Receiver) -> None:
    receiver.answer = lambda n: 400
    r = release()
    dead = free_port()
    n = notifier(r.store, sink(receiver.url), sink(f"http://127.0.0.1:{dead}/", retry_for_s=0.3))
    await n.start()
    try:
        await set_split(r, 10)
        deadline = time.monotonic() + 5
        while len((await n.status())["deliveries"]) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        await n.stop()
    by_sink = {d["sink"]: d for d in (await n.status())["deliveries"]}
    assert by_sink["127.0.0.1"]["outcome"] == "failed" and by_sink["127.0.0.1"]["attempts"] == 1
    assert by_sink["127.0.0.1"]["status"] == 400 and len(receiver.got) == 1
    assert by_sink["127.0.0.1-2"]["outcome"] == "failed" and by_sink["127.0.0.1-2"]["attempts"] > 1
    assert "gave up" in by_sink["127.0.0.1-2"]["error"]


async def test_a_sink_that_never_answers_holds_only_its_own_queue(receiver: Receiver) -> None:
    """Writes (the controller's and operators') go on at full speed while a sink hangs; once it has made no progress
    for its timeout_s it is stuck: its queue stays bounded, what overflows is counted as dropped, and another sink
    still gets everything."""
    hung = Receiver(port=free_port(), answer=lambda n: None)
    app = web.Application()
    app.router.add_post("/hook", hung.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", hung.port).start()
    r = release()
    n = notifier(r.store, sink(hung.url, timeout_s=1), sink(receiver.url), queue_size=5)
    await n.start()
    try:
        started = time.perf_counter()
        for i in range(20):
            await set_split(r, i + 1)
            await asyncio.sleep(0.005)
        writes_s = time.perf_counter() - started
        await receiver.wait_for(20)
    finally:
        await n.stop()
        await runner.cleanup()
    assert writes_s < 2.0  # 20 writes; each is a dict update and an audit append, whatever the sinks do
    deliveries = (await n.status(500))["deliveries"]
    dropped = [d for d in deliveries if d["outcome"] == "dropped"]
    assert len(dropped) >= 20 - 5 - 1 and all(d["sink"] == "127.0.0.1" for d in dropped)
    assert len(hung.got) >= 1 and len({orjson.loads(b)["id"] for _, b in hung.got}) == 1, \
        "the hung sink got the first event (and its retries) and nothing else while it hung"


async def test_a_backlog_waits_for_a_healthy_sink_instead_of_dropping(receiver: Receiver) -> None:
    """30 events at once against a queue of 5: the reader waits while the sink makes progress (a backlog after a
    fail-over is delivered in order, not dropped)."""
    r = release()
    n = notifier(r.store, sink(receiver.url), queue_size=5)
    await n.start()
    try:
        for i in range(30):  # the memory store never yields: all 30 are in the stream before the reader runs
            await set_split(r, i + 1)
        await receiver.wait_for(30)
    finally:
        await n.stop()
    assert [e["data"]["changed"]["to"]["weights"]["green"] for e in receiver.events()] == list(range(1, 31))
    assert {d["outcome"] for d in (await n.status(500))["deliveries"]} == {"delivered"}


async def test_a_bug_costs_one_event_never_the_sink(receiver: Receiver) -> None:
    """An entry that cannot be encoded (a bug) is recorded as failed; the sink goes on with the next one."""
    r = release()
    n = notifier(r.store, sink(receiver.url))
    await n.start()
    try:
        await r.store.append_audit(AuditEntry(time.time(), "x", "freeze_set", M, {}, {}, evidence={1, 2}))
        await set_split(r, 10)
        await receiver.wait_for(1)
    finally:
        await n.stop()
    assert receiver.events()[0]["type"] == "bluegreen.weights.changed"
    outcomes = [(d["type"], d["outcome"]) for d in (await n.status())["deliveries"]]
    assert outcomes == [("bluegreen.weights.changed", "delivered"), ("bluegreen.freeze.set", "failed")]


# ---------------------------------------------------------------------------------------------- replicas


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    proc, port = start_redis(tmp_path)
    yield f"redis://127.0.0.1:{port}/0"
    proc.stop()


async def test_one_sender_among_replicas_and_the_next_resumes_where_it_stopped(redis_url: str,
                                                                               receiver: Receiver) -> None:
    routing = RoutingFile.model_validate(routing_doc())
    stores = [RedisStateStore(redis_url, routing, replica=f"r{i}") for i in (1, 2)]
    for s in stores:
        await s.start()
    leader = {"r1": True, "r2": False}
    notifiers = [notifier(s, sink(receiver.url), is_leader=lambda name=s.replica: leader[name], redis=s.redis)
                 for s in stores]
    try:
        for n in notifiers:
            await n.start()
        r1, r2 = release(stores[0]), release(stores[1])
        await set_split(r1, 10)
        await set_split(r2, 20)  # written through the other replica: still sent once, by the leader
        await receiver.wait_for(2)
        delivered = receiver.events()[-1]["id"]
        deadline = time.monotonic() + 5
        while (await stores[0].redis.get(CURSOR) or b"").decode() != delivered:  # the holder records its progress
            assert time.monotonic() < deadline, "the cursor never reached the last delivered event"
            await asyncio.sleep(0.01)
        leader.update(r1=False)  # the lease lapses; the stream goes on while nobody sends
        deadline = time.monotonic() + 5
        while (await notifiers[0].status())["sending"]:
            assert time.monotonic() < deadline, "r1 went on sending without the lease"
            await asyncio.sleep(0.01)
        await set_split(r2, 30)
        await asyncio.sleep(0.2)
        assert len(receiver.got) == 2
        leader.update(r2=True)  # the next holder resumes at the shared cursor
        await receiver.wait_for(3)
        await asyncio.sleep(0.2)
        cursor = (await stores[0].redis.get(CURSOR)).decode()
        shared = await notifiers[0].recent()  # the delivery log is shared: any replica lists the holder's records
    finally:
        for n in notifiers:
            await n.stop()
        for s in stores:
            await s.aclose()
    ids = [e["id"] for e in receiver.events()]
    assert len(ids) == len(set(ids)) == 3, "every event once"
    assert [e["data"]["changed"]["to"]["weights"]["green"] for e in receiver.events()] == [10, 20, 30]
    assert cursor == ids[-1]
    assert sorted(d["event_id"] for d in shared) == sorted(ids)


async def test_a_lost_cursor_starts_after_the_newest_entry_and_never_replays(redis_url: str,
                                                                             receiver: Receiver) -> None:
    store = RedisStateStore(redis_url, RoutingFile.model_validate(routing_doc()), replica="r1")
    await store.start()
    leader = {"on": False}
    n = notifier(store, sink(receiver.url), is_leader=lambda: leader["on"], redis=store.redis)
    try:
        await n.start()
        r = release(store)
        await set_split(r, 10)  # while nobody holds the lease: the cursor stays before these two
        await set_split(r, 20)
        await store.redis.delete(CURSOR)  # evicted, or deleted by hand
        leader["on"] = True
        deadline = time.monotonic() + 5
        while not (await n.status())["sending"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await set_split(r, 30)
        await receiver.wait_for(1)
        await asyncio.sleep(0.2)  # the two older ones, if replayed, would have come by now
    finally:
        await n.stop()
        await store.aclose()
    assert [e["data"]["changed"]["to"]["weights"]["green"] for e in receiver.events()] == [30]
