"""Breaker transitions as audit entries (and so as notifications), watched from outside the request path.

A breaker changes state inside a request; writing an audit entry there would put a Redis round trip (or a file
write) on that request. Instead every replica polls its own breakers twice a second and appends
``breaker_opened`` / ``breaker_closed`` for each change it sees, off the request path. Half-open is a probe, not
news: the breaker is "open" from the moment it leaves closed until it is closed again, so open → half-open → open
says nothing new, and open → half-open → closed is "closed". The watcher reads the state as last set
(``settled_state``): reading ``state`` would itself move an open breaker to half-open once its open time has
passed. A cycle shorter than the poll (open and closed again within half a second) goes unreported; the breaker
gauge and its counters still show it. Each replica reports its own breakers (they are per replica), named in the
entry.
"""

from __future__ import annotations

import os
import socket
import time

from gateway.dataplane import DataPlane
from gateway.state import AuditEntry, StateStore
from serving.lifecycle import Periodic

__all__ = ["BreakerWatch"]


class BreakerWatch:
    def __init__(self, plane: DataPlane, store: StateStore, *, interval_s: float = 0.5,
                 replica: str | None = None) -> None:
        self.plane = plane
        self.store = store
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"
        self._open: dict[tuple[str, str, str], bool] | None = None
        self._loop = Periodic("breaker-watch", interval_s, self.tick)

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def tick(self) -> None:
        """Compare every backend's breaker with the last round; append one entry per change. A change is
        remembered only once its entry is written, so a failed write (Redis away) is retried next round."""
        now: dict[tuple[str, str, str], bool] = {(rt.model, rt.color, b.url): b.breaker.settled_state != "closed"
               for rt in self.plane.runtimes() for b in rt.backends}
        if self._open is None:
            self._open = {k: False for k in now}  # the start is all closed: a breaker open already is news
        for key, is_open in now.items():
            if self._open.get(key, False) == is_open:
                continue
            model, color, url = key
            word = "opened" if is_open else "closed"
            await self.store.append_audit(AuditEntry(
                time.time(), f"gateway:{self.replica}", f"breaker_{word}", model,
                {"breaker": "closed" if is_open else "open"},
                {"color": color, "backend": url, "breaker": "open" if is_open else "closed", "replica": self.replica},
                f"the breaker of {color} backend {url} {word} on {self.replica}"))
            self._open[key] = is_open
        for key in set(self._open) - set(now):  # a backend discovery removed
            del self._open[key]
