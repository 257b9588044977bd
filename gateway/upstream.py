"""Backend pools and the one aiohttp client session that talks to them.

A color has one or more backends; each backend has its own breaker and a count of outstanding requests, and
:meth:`ColorPool.pick` takes the admitted backend with the fewest outstanding (least outstanding requests,
as Envoy's LEAST_REQUEST does with full information). aiohttp errors are translated here, and only here,
into :class:`UpstreamFailure`, which says whether the request may have reached the backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from gateway.breaker import Breaker
from gateway.errors import UpstreamFailure
from gateway.settings import BreakerSettings, UpstreamSettings


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    body: bytes
    content_type: str
    header_length: str | None  # Inference-Header-Content-Length of a binary response


class Backend:
    __slots__ = ("breaker", "outstanding", "url")

    def __init__(self, url: str, breaker: Breaker) -> None:
        self.url = url
        self.breaker = breaker
        self.outstanding = 0

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
    """The process-wide client: one connection pool with keep-alive for every backend."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.settings.pool_size, limit_per_host=0,
                                         keepalive_timeout=self.settings.keepalive_s, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=(
            "User-Agent", "Accept-Encoding"), cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> UpstreamResponse:
        assert self._session is not None, "start() first"
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, self.settings.connect_timeout_s))
        try:
            async with self._session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                payload = await resp.read()
                return UpstreamResponse(resp.status, payload, resp.headers.get("content-type", "application/json"),
                                        resp.headers.get("inference-header-content-length"))
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamFailure(f"connect failed: {type(exc).__name__}", sent=False) from None
        except TimeoutError:
            raise UpstreamFailure("deadline exceeded", sent=True) from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(f"{type(exc).__name__}: {exc}"[:200], sent=True) from None

    async def get_json(self, url: str, timeout_s: float) -> object | None:
        """A best-effort GET for metadata and readiness: None on any failure."""
        assert self._session is not None, "start() first"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status != 200:
                    return None
                doc: object = await resp.json(content_type=None)
                return doc
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
