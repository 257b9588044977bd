"""What the data plane holds for one color of one model while it runs: its backends (each with its breaker), its
recent latency window and its cumulative request and error counts.

The data plane owns one :class:`ColorRuntime` per (model, color) for its whole life; a color re-pointed at other
backends keeps its object (the pool updates its membership in place) and its counts. Everything that reads the
request path's numbers — the controller's metrics sources, the admin status, the Prometheus gauges, the shadow
sender — reads these objects through ``DataPlane.runtime`` / ``DataPlane.runtimes`` instead of reaching into
the plane's internals, so the request path can change how it keeps them without touching its readers.

The request path updates ``requests`` and ``errors`` directly (one attribute each, no method call): they are
incremented for every upstream attempt and a call per attempt would be measurable at saturation.
"""

from __future__ import annotations

from gateway.settings import Color
from gateway.upstream import Backend, ColorPool
from gateway.windows import Snapshot, Window

__all__ = ["ColorRuntime"]


class ColorRuntime:
    """One (model, color): backends with their breakers, the latency window, cumulative attempts and errors.

    ``requests`` and ``errors`` count upstream attempts answered (or failed) by this color since the process
    started — the canary's counts; a shadow copy or a cancelled attempt is not one."""

    __slots__ = ("color", "errors", "model", "pool", "requests", "window")

    def __init__(self, model: str, color: Color, pool: ColorPool, window: Window) -> None:
        self.model = model
        self.color: Color = color
        self.pool = pool
        self.window = window
        self.requests = 0
        self.errors = 0

    @property
    def backends(self) -> list[Backend]:
        return self.pool.backends

    def record(self, latency_s: float, ok: bool) -> None:
        """One attempt's outcome: into the window and the cumulative counts. The request path does the same
        inline (``Forwarder._settle``); this is for everything else that records an attempt (tests, tools)."""
        self.window.record(latency_s, ok)
        self.requests += 1
        self.errors += not ok

    def snapshot(self, span_s: float | None = None) -> Snapshot:
        """The window over the last ``span_s`` seconds (default: all of it)."""
        return self.window.snapshot(span_s)

    def breakers_open(self) -> bool:
        """Every backend's breaker is open: the color cannot take a request now (True for a color without any
        backend, which cannot either)."""
        return all(b.breaker.state == "open" for b in self.pool.backends)

    def backends_json(self) -> list[dict[str, object]]:
        return [b.as_json() for b in self.pool.backends]
