"""Backend pools and the one upstream client that talks to them.

A color has one or more backends; each backend has its own breaker and a count of outstanding requests, and
:meth:`ColorPool.pick` takes the admitted backend with the fewest outstanding (least outstanding requests,
as Envoy's LEAST_REQUEST does with full information). The client (``http_client.py``) raises only
:class:`UpstreamFailure`, which says whether the request may have reached the backend.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from gateway.breaker import Breaker
from gateway.errors import UpstreamFailure
from gateway.http_client import ClientLimits, Endpoint, HttpClient, UpstreamResponse
from gateway.settings import BreakerSettings, UpstreamSettings
from serving.tls import client_context

__all__ = ["Backend", "ColorPool", "Upstream", "UpstreamResponse"]


class Backend:
    __slots__ = ("breaker", "endpoint", "outstanding", "url")

    def __init__(self, url: str, breaker: Breaker) -> None:
        self.url = url
        self.breaker = breaker
        self.outstanding = 0
        self.endpoint: Endpoint | None = None  # its connection pool, looked up once

    def as_json(self) -> dict[str, object]:
        return {"url": self.url, "breaker": self.breaker.state, "outstanding": self.outstanding}


class ColorPool:
    """The backends of one color of one model."""

    def __init__(self, urls: list[str], breaker_settings: BreakerSettings) -> None:
        self.breaker_settings = breaker_settings
        self.backends = [Backend(u, Breaker(breaker_settings)) for u in urls]
        self._turn = 0

    def update(self, urls: list[str]) -> None:
        """New membership (a re-pointed color, pods come and go); backends that stay keep their breakers."""
        if [b.url for b in self.backends] == urls:
            return
        kept = {b.url: b for b in self.backends}
        self.backends = [kept.get(u) or Backend(u, Breaker(self.breaker_settings)) for u in urls]

    def pick(self) -> tuple[Backend, int] | None:
        """The least-loaded backend whose breaker admits a call, with its permit; None when all refuse."""
        if len(self.backends) == 1:
            b = self.backends[0]
            permit = b.breaker.acquire()
            return None if permit is None else (b, permit)
        # Ties (idle backends, sequential clients) go round robin: always taking the first would leave the
        # others without traffic, so a dead pod among them would never be called and never open its breaker.
        n = len(self.backends)
        start = self._turn = (self._turn + 1) % n
        for i in sorted(range(n), key=lambda i: (self.backends[i].outstanding, (i - start) % n)):
            b = self.backends[i]
            permit = b.breaker.acquire()
            if permit is not None:
                return b, permit
        return None

    def any_admitting(self) -> bool:
        return any(b.breaker.state != "open" for b in self.backends)


class Upstream:
    """The process-wide upstream client: a pool of keep-alive connections per backend (``http_client.py``)."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.client: HttpClient | None = None

    async def start(self) -> None:
        s = self.settings
        self.client = HttpClient(ClientLimits(pool_size=s.pool_size, keepalive_s=s.keepalive_s,
                                              connect_timeout_s=s.connect_timeout_s,
                                              max_body_bytes=s.max_response_bytes),
                                 client_context(s.ca_file) if s.ca_file is not None else None)
        self.client.start()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def endpoint(self, base_url: str) -> Endpoint:
        assert self.client is not None, "start() first"
        return self.client.endpoint(base_url)

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> UpstreamResponse:
        """POST to a full URL (the shadow copies and tests; the request path builds its bytes itself)."""
        base, target = _split_url(url)
        head = b"POST %s HTTP/1.1\r\n%s" % (target, b"".join(
            b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()))
        return await self.endpoint(base).request(head, body, timeout_s)

    async def get_json(self, url: str, timeout_s: float) -> object | None:
        """A best-effort GET for metadata and readiness: None on any failure."""
        base, target = _split_url(url)
        try:
            resp = await self.endpoint(base).request(b"GET %s HTTP/1.1\r\n" % target, b"", timeout_s)
        except UpstreamFailure:
            return None
        if resp.status != 200:
            return None
        try:
            doc: object = orjson.loads(resp.body)
        except orjson.JSONDecodeError:
            return None
        return doc

    def stats(self) -> dict[str, dict[str, int]]:
        return {} if self.client is None else self.client.stats()


def _split_url(url: str) -> tuple[str, bytes]:
    """``http://host:port/path?q`` → (``http://host:port``, ``b"/path?q"``)."""
    scheme, sep, rest = url.partition("://")
    host, _, path = rest.partition("/")
    return f"{scheme}{sep}{host}", ("/" + path).encode("utf-8")
