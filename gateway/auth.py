"""Who is calling the admin API: named bearer tokens, compared in constant time, with failed attempts rationed.

Tokens are compared against every configured token (no early exit on the first match), so timing does not tell
which one matched or how much of one did. An address with ``max_failures`` failed attempts in the last
``window_s`` gets 429 for every admin request until the oldest failure ages out — it cannot keep guessing —
while other addresses, valid tokens or not, are judged on their own. At most 10,000 addresses are tracked (the
oldest forgotten first), so a scan from many addresses costs bounded memory.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from gateway.errors import TooManyRequests, Unauthorized

_TRACKED_ADDRESSES = 10_000


class Authenticator:
    def __init__(self, tokens: dict[str, str], max_failures: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tokens = [(t.encode(), name) for t, name in tokens.items()]
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def authenticate(self, client: str, authorization: str | None) -> str:
        """The token's name, or Unauthorized / TooManyRequests."""
        now = self._clock()
        recent = self._failures.get(client)
        if recent is not None:
            while recent and now - recent[0] >= self.window_s:
                recent.popleft()
            if len(recent) >= self.max_failures:
                raise TooManyRequests(f"too many failed authentications from {client}; try again later",
                                      math.ceil(self.window_s - (now - recent[0])))
        if not self._tokens:
            raise Unauthorized("the admin API is disabled: no admin tokens are configured")
        scheme, _, presented = (authorization or "").partition(" ")
        name: str | None = None
        if scheme.lower() == "bearer" and presented:
            candidate = presented.strip().encode()
            for token, token_name in self._tokens:  # compare with all of them: time does not tell which matched
                if hmac.compare_digest(token, candidate):
                    name = token_name
        if name is None:
            self._fail(client, now)
            raise Unauthorized("missing or invalid bearer token" if presented else "missing bearer token")
        return name

    def _fail(self, client: str, now: float) -> None:
        recent = self._failures.get(client)
        if recent is None:
            recent = self._failures[client] = deque()
            while len(self._failures) > _TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        recent.append(now)
