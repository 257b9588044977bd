"""Who is calling the admin API and what they may do: named bearer tokens with roles, compared in constant time,
with failed attempts rationed.

Roles: ``viewer`` reads everything; ``operator`` also sets the split and the shadow share and pauses, resumes and
aborts rollouts; ``admin`` also re-points colors, starts and promotes rollouts and forces what a rule refuses.
Each includes the ones before it. ``approve:<gate>`` approves one named approval gate of a rollout and nothing
else — ``admin`` does not include it: a gate exists so that someone other than the people who ship signs off.
``signals`` sends outside signals (complaints, incidents) and nothing else, not even reads: the token a support
desk or a paging system holds (``operator`` and above may send them too).

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
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from gateway.errors import Forbidden, TooManyRequests, Unauthorized

_TRACKED_ADDRESSES = 10_000
Level = Literal["viewer", "operator", "admin"]
_RANK: dict[str, int] = {"viewer": 0, "operator": 1, "admin": 2}
Role = Annotated[str, Field(pattern=r"^(viewer|operator|admin|signals|approve:[a-z0-9][a-z0-9_-]{0,62})$")]
"""A role as the tokens file names it."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the token's name (never the token) and its roles."""

    name: str
    roles: frozenset[str]

    def may(self, role: str) -> bool:
        """Holds ``role``: named directly, or (for viewer/operator) through a higher level."""
        if role in self.roles:
            return True
        need = _RANK.get(role)
        return need is not None and any(_RANK.get(r, -1) >= need for r in self.roles)

    def require(self, role: str, doing: str) -> None:
        if not self.may(role):
            raise Forbidden(f"{doing} needs the {role!r} role; {self.name!r} has {', '.join(sorted(self.roles))}")

    def require_any(self, roles: tuple[str, ...], doing: str) -> None:
        """Holds one of ``roles`` (a dedicated role, or the level that includes what it grants)."""
        if not any(self.may(r) for r in roles):
            raise Forbidden(f"{doing} needs one of the roles {', '.join(map(repr, roles))}; {self.name!r} has "
                            f"{', '.join(sorted(self.roles))}")

    @property
    def role_list(self) -> list[str]:
        return sorted(self.roles)


CONTROLLER = Principal("controller", frozenset({"admin"}))
"""The canary controller's own writes."""


class Authenticator:
    def __init__(self, tokens: dict[str, Principal], max_failures: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_failure: Callable[[str], None] = lambda reason: None) -> None:
        self._tokens = [(t.encode(), who) for t, who in tokens.items()]
        self.on_failure = on_failure
        """Told the reason of every refusal (missing, unknown, locked_out): the security metrics count them."""
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def authenticate(self, client: str, authorization: str | None) -> Principal:
        """The token's holder, or Unauthorized / TooManyRequests."""
        now = self._clock()
        recent = self._failures.get(client)
        if recent is not None:
            while recent and now - recent[0] >= self.window_s:
                recent.popleft()
            if len(recent) >= self.max_failures:
                self.on_failure("locked_out")
                raise TooManyRequests(f"too many failed authentications from {client}; try again later",
                                      math.ceil(self.window_s - (now - recent[0])))
        if not self._tokens:
            raise Unauthorized("the admin API is disabled: no admin tokens are configured")
        scheme, _, presented = (authorization or "").partition(" ")
        found: Principal | None = None
        if scheme.lower() == "bearer" and presented:
            candidate = presented.strip().encode()
            for token, who in self._tokens:  # compare with all of them: time does not tell which matched
                if hmac.compare_digest(token, candidate):
                    found = who
        if found is None:
            self.on_failure("unknown" if presented else "missing")
            self._fail(client, now)
            raise Unauthorized("missing or invalid bearer token" if presented else "missing bearer token")
        return found

    def _fail(self, client: str, now: float) -> None:
        recent = self._failures.get(client)
        if recent is None:
            recent = self._failures[client] = deque()
            while len(self._failures) > _TRACKED_ADDRESSES:
                self._failures.popitem(last=False)
        recent.append(now)
