"""Assertions on HTTP answers that say why they fail.

A failed ``assert r.status_code == 200`` shows only ``503 != 200``: not which request it was, which color or
cache answered, nor the body, where the gateway says which limit, deadline or upstream refused. A flaky
failure then cannot be explained after the fact. These helpers fail with the request, the status, the headers
that explain a routing decision, and the body."""

from __future__ import annotations

from collections.abc import Iterable

import httpx

# Headers that say who answered and why: the color, the cache's verdict, a degraded path, a wait hint.
_EXPLAINING = ("x-bluegreen-color", "x-bluegreen-cache", "x-bluegreen-degraded", "retry-after", "content-type")
_BODY_CHARS = 2000  # enough for any error document; a prediction body is cut (it says nothing about a failure)


def describe(resp: httpx.Response) -> str:
    """One answer as text: ``POST http://… -> 503 (x-bluegreen-color: green)`` and its body on the next line."""
    try:
        request = f"{resp.request.method} {resp.request.url}"
    except RuntimeError:  # a response built without a request
        request = "(no request)"
    headers = ", ".join(f"{h}: {resp.headers[h]}" for h in _EXPLAINING if h in resp.headers)
    try:
        body = resp.text
    except httpx.ResponseNotRead:  # a streamed answer the test has not read
        body = "(body not read)"
    if len(body) > _BODY_CHARS:
        body = body[:_BODY_CHARS] + f"… ({len(body)} characters)"
    return f"{request} -> {resp.status_code} ({headers})\n  body: {body}"


def expect(resp: httpx.Response, status: int | tuple[int, ...] = 200, what: str = "") -> httpx.Response:
    """Fail unless ``resp`` has ``status`` (or one of them), with the request, headers and body in the message;
    return ``resp`` so a call can be written inline: ``doc = expect(c.get(url)).json()``."""
    wanted = status if isinstance(status, tuple) else (status,)
    if resp.status_code not in wanted:
        prefix = f"{what}: " if what else ""
        raise AssertionError(f"{prefix}expected {' or '.join(map(str, wanted))}, got {describe(resp)}")
    return resp


def expect_all(responses: Iterable[httpx.Response], status: int | tuple[int, ...] = 200, what: str = "") -> None:
    """Fail unless every answer has ``status``: how many did not, and the first few of them in full."""
    wanted = status if isinstance(status, tuple) else (status,)
    answers = list(responses)
    wrong = [r for r in answers if r.status_code not in wanted]
    if wrong:
        prefix = f"{what}: " if what else ""
        shown = "\n".join(describe(r) for r in wrong[:5])
        raise AssertionError(f"{prefix}{len(wrong)} of {len(answers)} answers were not "
                             f"{' or '.join(map(str, wanted))}; the first of them:\n{shown}")
