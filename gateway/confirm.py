"""Confirm gates: the controller asks someone else's system before a rollout leaves a stage (Flagger's
confirm-rollout / confirm-promotion webhooks).

A stage's ``confirm_url`` (and the policy's ``promote_confirm_url``, for the move to 100%) receives a POST with
the rollout's status as JSON; a 2xx answer lets the rollout go on, anything else — another status, no answer
within ``confirm_timeout_s``, a refused connection — holds it, and the controller asks again at the next
interval. Which gates a decision needs (``gates``) is pure, and so is the hold a refusal turns into
(``canary.held_at_gate``): the state machine itself does no I/O, so simulations of it stay free of any.

The call never raises: a gate that cannot be reached is a refusal with the reason, logged. The timeout bounds how
long a model's decision waits for its gate; other models' decisions never wait for it (the controller analyses
each model in a task of its own). The HTTP client is one for the controller's life (:func:`client`): building an
``httpx.AsyncClient`` loads the TLS context, tens of milliseconds of blocking work on the loop that also serves
predictions, so it is not built per ask.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import orjson

from gateway.canary import Policy, Status

log = logging.getLogger(__name__)

USER_AGENT = "bluegreen-gateway confirm-gate"


def gates(policy: Policy, before: Status, after: Status) -> list[tuple[str, str]]:
    """The confirm gates to ask, in order, as (gate, URL), before ``after`` (the step's decision from ``before``) is
    applied: the stage's own when the step leaves it, then the promotion's when it moves to 100%. None for any
    other decision: a rollback above all never waits for anyone."""
    result = after.last_decision.result if after.last_decision else None
    if result not in ("advance", "promote") or not 1 <= before.stage == after.stage - 1 <= len(policy.stages):
        return []
    url, promotion = policy.stages[before.stage - 1].confirm_url, policy.promote_confirm_url
    found = [(f"stage-{before.stage}", url)] if url else []
    return [*found, ("promotion", promotion)] if promotion and result == "promote" else found


def body(model: str, gate: str, before: Status, after: Status) -> dict[str, Any]:
    """What a gate receives: enough to decide without calling back (which model, which candidate, where the
    rollout stands, where the decision would take it, and the decision's reason and evidence)."""
    decision = after.last_decision
    return {"gate": gate, "model": model, "candidate": before.candidate, "phase": before.phase.value,
            "stage": before.stage, "stages": len(before.policy.stages), "weight": before.candidate_weight(),
            "next_weight": after.candidate_weight(), "result": decision.result if decision else None,
            "reason": decision.reason if decision else None, "evidence": decision.evidence if decision else {},
            "time": decision.time if decision else None}


def client() -> httpx.AsyncClient:
    """The client to ask gates with, built once by its owner (the controller) and closed by it. Redirects are not
    followed: a 3xx is a no."""
    return httpx.AsyncClient(follow_redirects=False, headers={"user-agent": USER_AGENT})


async def ask(http: httpx.AsyncClient, url: str, doc: dict[str, Any], timeout_s: float) -> str | None:
    """POST ``doc`` to the gate at ``url`` with ``http`` (from :func:`client`): None when it answers 2xx (go on),
    else why not, in words that end up in the rollout's last decision (``http://... answered 503``)."""
    try:
        # httpx's timeout is per phase (connect, each read...): a gate dripping its answer byte by byte would
        # outlast it, so the whole exchange is bounded too.
        async with asyncio.timeout(timeout_s):
            response = await http.post(url, content=orjson.dumps(doc), timeout=timeout_s,
                                       headers={"content-type": "application/json"})
    except (httpx.TimeoutException, TimeoutError):
        why = f"{url} timed out after {timeout_s:g}s"
    except httpx.ConnectError:
        why = f"{url} refused the connection or could not be reached"
    except Exception as exc:  # a gate's failure of any kind is a "no", never the end of the controller's round
        why = f"{url} failed: {type(exc).__name__}"
    else:
        if 200 <= response.status_code < 300:
            return None
        log.info("confirm gate %s answered %d: the rollout holds", url, response.status_code)
        return f"{url} answered {response.status_code}"
    log.warning("confirm gate: %s; the rollout holds", why)
    return why
