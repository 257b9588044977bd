"""Pod discovery: a backend given as ``dns+http://name:port`` stands for every address the name resolves to.

Behind a Kubernetes headless Service, the name resolves to one address per ready pod. Each address becomes a
backend of its own — its own breaker, its own outstanding count — so least-outstanding balancing and breakers
see pods, not a Service's virtual IP. Names are re-resolved every ``refresh_s``; a pod that disappears is
dropped, a new one is added with a fresh breaker, and the backends that stay keep theirs. A failed lookup keeps
the last known addresses (a DNS hiccup must not empty a color).

Resolvers are swappable: :class:`SystemResolver` (the OS resolver, i.e. cluster DNS) and :class:`FileResolver`
(a JSON file of ``{"name": ["host:port", ...]}``, re-read at every refresh), which tests — and operators
without DNS — control directly.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import orjson

from serving.lifecycle import Periodic

log = logging.getLogger(__name__)

SCHEME = "dns+"

Endpoint = tuple[str, int]


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[Endpoint]: ...


class SystemResolver:
    async def resolve(self, host: str, port: int) -> list[Endpoint]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return sorted({(str(info[4][0]), port) for info in infos})


class FileResolver:
    """``{"name": ["10.0.0.7", "10.0.0.8:8000", ...]}``: entries without a port take the URL's."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def resolve(self, host: str, port: int) -> list[Endpoint]:
        doc = orjson.loads(self.path.read_bytes())
        if host not in doc:
            raise OSError(f"{host} is not in {self.path}")
        found: list[Endpoint] = []
        for entry in doc[host]:
            text = str(entry)
            if text.startswith("["):  # [v6]:port
                addr, _, p = text[1:].partition("]:")
                found.append((addr, int(p) if p else port))
            elif text.count(":") == 1:  # v4:port
                addr, p = text.split(":")
                found.append((addr, int(p)))
            else:  # an address alone (v4 or v6) takes the URL's port
                found.append((text, port))
        return sorted(set(found))


def is_dynamic(url: str) -> bool:
    return url.startswith(SCHEME)


def endpoint_url(scheme: str, endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


class Discovery:
    """Keeps the resolved addresses of every ``dns+`` backend URL; ``on_change`` is called after a refresh
    that changed any of them."""

    def __init__(self, resolver: Resolver, refresh_s: float, on_change: Callable[[], None]) -> None:
        self.resolver = resolver
        self.refresh_s = refresh_s
        self.on_change = on_change
        self.resolved: dict[str, list[str]] = {}
        self._loop: Periodic | None = None

    def expand(self, urls: Iterable[str]) -> list[str]:
        """Configured URLs with each ``dns+`` URL replaced by its current addresses (in order, no repeats)."""
        out: list[str] = []
        for url in urls:
            for u in self.resolved.get(url, []) if is_dynamic(url) else [url]:
                if u not in out:
                    out.append(u)
        return out

    async def refresh(self, urls: Iterable[str]) -> None:
        changed = False
        for url in {u for u in urls if is_dynamic(u)}:
            parts = urlsplit(url[len(SCHEME):])
            if not parts.hostname:
                continue
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                endpoints = await self.resolver.resolve(parts.hostname, port)
            except (OSError, ValueError) as exc:
                log.warning("resolving %s failed, keeping %d known addresses: %s", url,
                            len(self.resolved.get(url, [])), exc)
                continue
            new = [endpoint_url(parts.scheme, e) for e in endpoints]
            if new != self.resolved.get(url):
                log.info("%s -> %s", url, ", ".join(new) or "no addresses")
                self.resolved[url] = new
                changed = True
        if changed:
            self.on_change()

    def start(self, urls: Callable[[], Iterable[str]]) -> None:
        async def refresh() -> None:
            await self.refresh(urls())

        self._loop = Periodic("discovery", self.refresh_s, refresh)
        self._loop.start()

    async def stop(self) -> None:
        if self._loop is not None:
            await self._loop.stop()
