"""Notifications: every rollout decision and operational event, delivered to webhooks, signed, once.

The source of events is the audit stream (``StateStore.read_audit_after``): every state write is audited with an
increasing id (``<ms>-<seq>``; Redis stream ids with Redis), and the events that are not state writes — a breaker
that opened, a signal, a start the validation gate refused — are appended to it (``append_audit``). So nothing on
the request path or in the controller ever waits for a webhook: they write the audit entry they already wrote, and
a :class:`Notifier` reads the stream behind them.

Once across replicas: only the controller's lease holder reads and sends. Its read position is kept in Redis
(``bluegreen:notify:cursor``) as the last entry every sink has finished with (delivered, given up, or not wanted),
so a new lease holder starts where the old one stopped. Delivery is at least once: the event in flight when a
holder died is sent again by the next, and a 2xx that arrives after ``timeout_s`` is retried; the stable event id
(the audit id) lets a receiver drop the repeat. Before any holder runs, the first replica to start sets the cursor
to the end of the stream, so events from before the first start are not replayed and none after it is missed.

Per sink: a bounded in-memory queue and one worker, so a sink receives its events in order. A full queue stops
the reader (the cursor keeps its place; the next round goes on) while the sink makes progress — a backlog after a
fail-over is delivered, not dropped — but a sink that has finished nothing for longer than its ``timeout_s`` is
stuck, and its overflow is dropped and counted rather than holding every other sink back (so a sink that never
answers holds the others for one ``timeout_s`` at most). A failed attempt (connection error, timeout, 408, 425,
429, 5xx) is retried with exponential backoff and jitter (``Retry-After`` honoured) until ``retry_for_s``; any
other 4xx is the receiver refusing the event (a bad signature, say), recorded as failed without retrying.

Signing: ``x-bluegreen-signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`` and
``x-bluegreen-timestamp`` (Unix seconds), recomputed per attempt, so a receiver can refuse a replayed body by its
age; the body — and with it the event id — is the same on every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from gateway.settings import NotificationSink
from gateway.state import AuditEntry, StateStore, id_key
from serving.lifecycle import Background, Periodic
from serving.metrics import Counters

log = logging.getLogger(__name__)

CURSOR = "bluegreen:notify:cursor"
DELIVERIES = "bluegreen:notify:deliveries"
KEEP_DELIVERIES = 500
SOURCE = "/bluegreen/gateway"

_BY_RESULT = {"start": "bluegreen.rollout.started", "advance": "bluegreen.rollout.advanced",
              "promote": "bluegreen.rollout.advanced", "promoted": "bluegreen.rollout.promoted",
              "rollback": "bluegreen.rollout.rolled_back", "abort": "bluegreen.rollout.rolled_back",
              "pause": "bluegreen.rollout.paused", "resume": "bluegreen.rollout.resumed"}
_BY_ACTION = {"set_weights": "bluegreen.weights.changed", "set_color": "bluegreen.color.repointed",
              "set_color_forced": "bluegreen.color.repointed", "breaker_opened": "bluegreen.breaker.opened",
              "breaker_closed": "bluegreen.breaker.closed", "canary_start_refused": "bluegreen.validation.refused",
              "signal_received": "bluegreen.signal.received", "freeze_set": "bluegreen.freeze.set",
              "freeze_lifted": "bluegreen.freeze.lifted"}


def event_type(entry: AuditEntry) -> str | None:
    """The notification an audit entry stands for (None: nothing to tell, e.g. one approval of several)."""
    found = _BY_ACTION.get(entry.action)
    if found is None and entry.action.startswith("canary_") and entry.rollout:
        found = _BY_RESULT.get(str(entry.rollout.get("result")))
    return found


def event_data(entry: AuditEntry) -> dict[str, Any]:
    return {"model": entry.model, "action": entry.action, "by": entry.who, "roles": entry.roles,
            "reason": entry.reason, "rollout": entry.rollout, "evidence": entry.evidence,
            "changed": {"from": entry.old, "to": entry.new}}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def cloudevent(entry: AuditEntry, kind: str) -> dict[str, Any]:
    """CloudEvents 1.0, structured mode: the audit id is the event id (stable across retries and replicas)."""
    return {"specversion": "1.0", "id": entry.id, "source": SOURCE, "type": kind, "subject": entry.model or "-",
            "time": _iso(entry.time), "datacontenttype": "application/json", "data": event_data(entry)}


def headline(entry: AuditEntry, kind: str) -> str:
    """One line a person reads in a chat channel."""
    r = entry.rollout or {}
    cand = r.get("candidate") or "the candidate"
    why = f": {entry.reason}" if entry.reason else ""
    where = "promoting" if r.get("weight") == 100 else f"stage {r.get('stage')} of {r.get('stages')}"
    text = {
        "bluegreen.rollout.started": f"rollout of {cand} started at {r.get('weight')}%",
        "bluegreen.rollout.advanced": f"{cand} advanced to {r.get('weight')}% ({where})",
        "bluegreen.rollout.paused": f"rollout of {cand} paused",
        "bluegreen.rollout.resumed": f"rollout of {cand} resumed",
        "bluegreen.rollout.promoted": f"{cand} promoted: it is the stable color now",
        "bluegreen.rollout.rolled_back": f"{cand} rolled back to 0%",
        "bluegreen.weights.changed": f"weights set to {(entry.new or {}).get('weights')}",
        "bluegreen.color.repointed": f"color re-pointed: {(entry.new or {}).get('colors')}",
        "bluegreen.breaker.opened": f"breaker opened for {(entry.new or {}).get('backend')}",
        "bluegreen.breaker.closed": f"breaker closed for {(entry.new or {}).get('backend')}",
        "bluegreen.validation.refused": "the validation gate refused a rollout start",
        "bluegreen.signal.received": f"signal received: {(entry.new or {}).get('kind', '')}",
        "bluegreen.freeze.set": "releases frozen",
        "bluegreen.freeze.lifted": "release freeze lifted",
    }.get(kind, kind)
    return f"[bluegreen] {entry.model or 'gateway'}: {text} (by {entry.who}){why}"


def render(sink: NotificationSink, entry: AuditEntry, kind: str) -> tuple[bytes, str]:
    """(body, content type) for one sink's format."""
    if sink.format == "slack":
        return orjson.dumps({"text": headline(entry, kind)}), "application/json"
    return orjson.dumps(cloudevent(entry, kind)), "application/cloudevents+json; charset=utf-8"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` over ``"<timestamp>.<body>"`` (what a receiver recomputes to verify)."""
    return "sha256=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sink_names(sinks: list[NotificationSink]) -> list[str]:
    """Each sink's name: its own, else its URL's host (``-2``, ``-3`` … when hosts repeat)."""
    names: list[str] = []
    for s in sinks:
        base = s.name or (urlsplit(s.url).hostname or "sink").lower()
        name, n = base, 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


def sink_secrets(sinks: list[NotificationSink], env: Mapping[str, str]) -> list[bytes | None]:
    """Each sink's HMAC key from the environment variable it names (None: unsigned). ValueError for a variable
    that is unset or empty: a sink meant to be signed must not go out unsigned (``bluegreen gateway`` exits 2)."""
    keys: list[bytes | None] = []
    for name, s in zip(sink_names(sinks), sinks, strict=True):
        value = env.get(s.secret_env) if s.secret_env else None
        if s.secret_env and not value:
            raise ValueError(f"notifications: sink {name!r} names secret_env {s.secret_env}, which is not set "
                             "(or empty)")
        keys.append(value.encode() if value else None)
    return keys


def shown_url(url: str) -> str:
    """A sink's URL without its path or query, which may carry a secret (a Slack webhook's path does)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"


@dataclass
class Sink:
    name: str
    config: NotificationSink
    secret: bytes | None
    queue: asyncio.Queue[tuple[AuditEntry, str]]
    pending: int = 0
    """Entries queued or in flight."""
    done: str | None = None
    """The last entry this sink finished with, while it has entries pending (where a new holder resumes)."""
    last_error: str | None = None
    task: asyncio.Task[None] | None = None
    progress_at: float = 0.0
    """When the worker last took or finished an entry (monotonic): a full queue with no progress for longer than
    the sink's ``timeout_s`` is a stuck sink."""

    def stuck(self) -> bool:
        return self.queue.full() and time.monotonic() - self.progress_at > self.config.timeout_s


@dataclass
class Notifier:
    """Reads the audit stream behind the writers and delivers to the sinks, on the lease holder only."""

    store: StateStore
    sinks_config: list[NotificationSink]
    is_leader: Callable[[], bool] = lambda: True
    redis: Any = None
    """With Redis: the shared cursor and delivery log (else both live in this process)."""
    counter: Counters | None = None
    poll_s: float = 0.25
    queue_size: int = 1000
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    sinks: list[Sink] = field(init=False)
    _log: deque[dict[str, Any]] = field(init=False, default_factory=lambda: deque(maxlen=KEEP_DELIVERIES))
    _position: str | None = field(init=False, default=None)
    _saved: str | None = field(init=False, default=None)
    _active: bool = field(init=False, default=False)
    _sharing: Background = field(init=False, default_factory=lambda: Background(
        "notifications: delivery record not shared through Redis", logging.WARNING, log))

    def __post_init__(self) -> None:
        names, secrets = sink_names(self.sinks_config), sink_secrets(self.sinks_config, self.env)
        self.sinks = [Sink(name, cfg, secret, asyncio.Queue(self.queue_size))
                      for name, cfg, secret in zip(names, self.sinks_config, secrets, strict=True)]
        self._client = httpx.AsyncClient(follow_redirects=False, headers={"user-agent": "bluegreen-notify"})
        self._loop = Periodic("notifications", self.poll_s, self._round, first_after_s=0.0)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Mark the end of the stream as the place to start, unless a cursor exists (set by an earlier replica or
        holder), then start reading whenever this replica holds the lease. Without sinks: nothing to read."""
        if not self.sinks:
            return
        latest = await self._latest()
        if self.redis is not None:
            await self.redis.set(CURSOR, latest or "0-0", nx=True)
        else:
            self._position = self._saved = latest or "0-0"
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        await self._deactivate()
        await self._sharing.wait(2.0)
        await self._client.aclose()

    async def _latest(self) -> str | None:
        newest = await self.store.read_audit(1)
        return newest[0].id if newest else None

    async def _activate(self) -> None:
        if self.redis is not None:
            raw = await self.redis.get(CURSOR)
            if raw is None:  # deleted or evicted: start at the end, as the first replica did (never replay)
                log.warning("notifications: no cursor in Redis; starting after the newest audit entry")
                raw = await self._latest() or "0-0"
            self._position = self._saved = raw.decode() if isinstance(raw, bytes) else raw
        for sink in self.sinks:
            sink.pending, sink.done, sink.progress_at = 0, None, time.monotonic()
            sink.task = asyncio.get_running_loop().create_task(self._worker(sink), name=f"notify-{sink.name}")
        self._active = True
        log.info("notifications: sending from audit entry %s on", self._position)

    async def _deactivate(self) -> None:
        """Lost the lease (or stopping): drop what is queued; the next holder resumes from the shared cursor."""
        if not self._active:
            return
        self._active = False
        for sink in self.sinks:
            if sink.task is not None:
                sink.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sink.task
                sink.task = None
            while not sink.queue.empty():
                sink.queue.get_nowait()
            sink.pending = 0

    # ------------------------------------------------------------------ reading

    async def _round(self) -> None:
        if not self.is_leader():
            await self._deactivate()
            return
        if not self._active:
            await self._activate()
        for _ in range(20):  # bounded per round: a long backlog is read over several rounds
            entries = await self.store.read_audit_after(self._position, 200)
            taken = 0
            for entry in entries:
                if not self._dispatch(entry):
                    break
                taken += 1
            if taken < 200:
                break
        await self._save_cursor()

    def _dispatch(self, entry: AuditEntry) -> bool:
        """Queue ``entry`` for the sinks that want it; False (nothing done) while a sink that wants it has a full
        queue and is still making progress: the entry is read again next round."""
        assert entry.id is not None
        kind = event_type(entry)
        wanting = [s for s in self.sinks if kind is not None and s.config.wants(kind)]
        if any(s.queue.full() and not s.stuck() for s in wanting):
            return False
        before = self._position
        self._position = entry.id
        assert kind is not None or not wanting
        for sink in wanting:
            if sink.queue.full():  # stuck: its overflow is dropped, the others go on
                self._outcome(sink, entry, str(kind), "dropped", 0, None,
                              f"queue full ({self.queue_size}) and no progress for over {sink.config.timeout_s:g}s")
                continue
            sink.queue.put_nowait((entry, str(kind)))
            if sink.pending == 0:
                sink.done = before
            sink.pending += 1
        return True

    async def _save_cursor(self) -> None:
        """The shared cursor: the earliest place any sink still needs (a new holder resumes there)."""
        marks = [s.done for s in self.sinks if s.pending and s.done is not None] + [self._position]
        cursor = min((m for m in marks if m is not None), key=id_key, default=None)
        if cursor is None or cursor == self._saved:
            return
        if self.redis is not None:
            await self.redis.set(CURSOR, cursor)
        self._saved = cursor

    # ------------------------------------------------------------------ delivering

    async def _worker(self, sink: Sink) -> None:
        while True:
            entry, kind = await sink.queue.get()
            sink.progress_at = time.monotonic()
            try:
                await self._deliver(sink, entry, kind)
            except Exception as exc:  # a bug must cost one event, never the sink (its cursor would stay pinned)
                log.exception("notification %s to %s failed unexpectedly", entry.id, sink.name)
                self._outcome(sink, entry, kind, "failed", 0, None, f"{type(exc).__name__}: {exc}"[:200])
            finally:
                sink.done = entry.id
                sink.pending -= 1
                sink.progress_at = time.monotonic()
            # Record the progress at once, not at the reader's next round: a holder that loses the lease between
            # the two would leave its successor to send this event again.
            try:
                await self._save_cursor()
            except Exception as exc:  # Redis away: the reader's next round saves it
                log.warning("notifications: cursor not saved: %s", exc)

    async def _deliver(self, sink: Sink, entry: AuditEntry, kind: str) -> None:
        body, content_type = render(sink.config, entry, kind)
        deadline = time.monotonic() + sink.config.retry_for_s
        delay = self.backoff_s
        attempt = 0
        while True:
            attempt += 1
            status, error, retry_after = await self._post(sink, body, content_type, entry)
            if status is not None and 200 <= status < 300:
                sink.last_error = None
                self._outcome(sink, entry, kind, "delivered", attempt, status, None)
                return
            sink.last_error = error
            if status is not None and 400 <= status < 500 and status not in (408, 425, 429):
                self._outcome(sink, entry, kind, "failed", attempt, status, error)  # refused: retrying won't help
                return
            wait = max(min(delay, self.max_backoff_s) * (0.5 + random.random() / 2), retry_after or 0.0)
            if time.monotonic() + wait > deadline:
                self._outcome(sink, entry, kind, "failed", attempt, status, f"gave up after {attempt} attempts: "
                                                                             f"{error}")
                return
            self._count(sink, kind, "retried")
            await asyncio.sleep(wait)
            delay *= 2

    async def _post(self, sink: Sink, body: bytes, content_type: str,
                    entry: AuditEntry) -> tuple[int | None, str, float | None]:
        """One attempt: (status or None, what went wrong, Retry-After seconds)."""
        now = int(time.time())
        headers = {"content-type": content_type, "x-bluegreen-event-id": str(entry.id),
                   "x-bluegreen-timestamp": str(now)}
        if sink.secret is not None:
            headers["x-bluegreen-signature"] = sign(sink.secret, now, body)
        try:
            answer = await self._client.post(sink.config.url, content=body, headers=headers,
                                             timeout=sink.config.timeout_s)
        except httpx.TimeoutException:
            return None, f"no answer within {sink.config.timeout_s:g}s", None
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:200], None
        retry_after = None
        with contextlib.suppress(ValueError):
            retry_after = min(60.0, float(answer.headers.get("retry-after", "")))
        return answer.status_code, f"answered {answer.status_code}", retry_after

    # ------------------------------------------------------------------ records

    def _count(self, sink: Sink, kind: str, outcome: str) -> None:
        if self.counter is not None:
            self.counter.inc((sink.name, kind, outcome))

    def _outcome(self, sink: Sink, entry: AuditEntry, kind: str, outcome: str, attempts: int, status: int | None,
                 error: str | None) -> None:
        self._count(sink, kind, outcome)
        record = {"time": round(time.time(), 3), "sink": sink.name, "event_id": entry.id, "type": kind,
                  "model": entry.model, "outcome": outcome, "attempts": attempts, "status": status, "error": error}
        if outcome != "delivered":
            log.warning("notification %s %s to %s: %s", entry.id, outcome, sink.name, error)
        self._log.appendleft(record)
        if self.redis is not None and len(self._sharing) < 100:  # bounded: Redis away must not pile up tasks
            self._sharing.spawn(self._share(record))

    async def _share(self, record: dict[str, Any]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lpush(DELIVERIES, orjson.dumps(record))
            pipe.ltrim(DELIVERIES, 0, KEEP_DELIVERIES - 1)
            await pipe.execute()

    async def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest deliveries, newest first (every replica's view with Redis: the holder's records)."""
        if self.redis is not None:
            with contextlib.suppress(Exception):
                rows = await self.redis.lrange(DELIVERIES, 0, limit - 1)
                return [orjson.loads(r) for r in rows]
        return list(self._log)[:limit]

    async def status(self, limit: int = 100) -> dict[str, Any]:
        """``GET /admin/v1/notifications``: the sinks (URLs without their path) and the latest deliveries."""
        return {"sending": self._active,
                "sinks": [{"name": s.name, "url": shown_url(s.config.url), "format": s.config.format,
                           "events": list(s.config.events), "signed": s.secret is not None,
                           "queued": s.pending if self._active else 0, "last_error": s.last_error}
                          for s in self.sinks],
                "deliveries": await self.recent(limit)}


__all__ = ["Notifier", "cloudevent", "event_type", "headline", "render", "sign", "sink_names"]
