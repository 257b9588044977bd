"""gateway/admin.py: the admin API in-process — tokens, the 429 rule, ETags, validation, audit, colors.

Every refused request is checked to have changed nothing: the model's revision and the audit log stay as
they were.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.admin import ADMIN_BODY_LIMIT, create_admin_app
from gateway.app import Gateway
from gateway.auth import Authenticator, Principal
from gateway.errors import TooManyRequests, Unauthorized
from tests.gateway.support import ALICE, BOB, FakeClock, client

API = "/admin/v1"
SPLIT = f"{API}/models/digits/split"


def auth(token: str = ALICE) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def write(token: str = ALICE) -> dict[str, str]:
    """A write that is not about the ETag: explicitly unconditional (without If-Match it would be 428)."""
    return {**auth(token), "if-match": "*"}


@pytest.fixture
async def admin(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with client(gateway.admin_app()) as c:
        yield c


def unchanged(gateway: Gateway) -> tuple[int, dict[str, int], int]:
    state = gateway.store.get("digits")
    return state.revision, dict(state.weights), len(gateway.store.audit_log)


# ---------------------------------------------------------------- authentication


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong-token-wrong-token"},
                                     {"authorization": f"Basic {ALICE}"}, {"authorization": "Bearer"},
                                     {"authorization": f"Bearer {ALICE}x"}, {"authorization": f"Bearer {ALICE[:-1]}"}])
async def test_missing_or_wrong_token_is_401(admin: httpx.AsyncClient, headers: dict[str, str]) -> None:
    r = await admin.get(f"{API}/models", headers=headers)
    assert r.status_code == 401
    assert set(r.json()) == {"error"} and "bearer token" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_every_admin_route_needs_a_token(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    before = unchanged(gateway)
    for method, path in [("GET", f"{API}/models"), ("GET", SPLIT), ("PUT", SPLIT), ("GET", f"{API}/audit"),
                         ("PUT", f"{API}/models/digits/colors/green"), ("GET", f"{API}/models/digits/stats"),
                         ("GET", f"{API}/models/unknown/split")]:
        r = await admin.request(method, path, json={"blue": 0, "green": 100})
        assert r.status_code == 401, (method, path)
    assert unchanged(gateway) == before


async def test_valid_tokens_are_served(admin: httpx.AsyncClient) -> None:
    for token in (ALICE, BOB):
        r = await admin.get(f"{API}/models", headers=auth(token))
        assert r.status_code == 200
    r = await admin.get(f"{API}/models", headers={"authorization": f"bearer  {BOB} "})
    assert r.status_code == 200  # scheme case and surrounding blanks do not matter


async def test_guessing_from_one_address_gets_429_while_others_are_served(gateway: Gateway, clock: FakeClock) -> None:
    app = gateway.admin_app()
    async with client(app, "10.0.0.66") as attacker, client(app, "10.0.0.7") as operator:
        for i in range(10):
            r = await attacker.get(f"{API}/models", headers=auth(f"guess-{i:020d}"))
            assert r.status_code == 401, i
        # The 11th attempt is refused before the token is looked at — a valid token included.
        for headers in (auth(f"guess-{99:020d}"), auth(ALICE), {}):
            r = await attacker.get(f"{API}/models", headers=headers)
            assert r.status_code == 429
            assert r.headers["retry-after"] == "60" and "error" in r.json()
        # Other addresses are judged on their own.
        assert (await operator.get(f"{API}/models", headers=auth(ALICE))).status_code == 200
        assert (await operator.get(f"{API}/models")).status_code == 401
        clock.advance(45)
        r = await attacker.get(SPLIT, headers=auth(ALICE))
        assert r.status_code == 429 and r.headers["retry-after"] == "15"
        clock.advance(15)  # the minute has passed
        assert (await attacker.get(SPLIT, headers=auth(ALICE))).status_code == 200


async def test_nine_failures_do_not_lock_out_and_old_failures_age_out(gateway: Gateway, clock: FakeClock) -> None:
    async with client(gateway.admin_app(), "10.0.0.66") as c:
        for _ in range(9):
            assert (await c.get(SPLIT)).status_code == 401
            clock.advance(10)  # failures spread over 90 s: never 10 within one minute
        assert (await c.get(SPLIT, headers=auth(BOB))).status_code == 200
        assert (await c.get(SPLIT)).status_code == 401
        assert (await c.get(SPLIT, headers=auth(BOB))).status_code == 200


def test_authenticator_direct() -> None:
    clock = FakeClock()
    authn = Authenticator({ALICE: "alice", BOB: "bob"}, max_failures=2, window_s=5, clock=clock)
    assert authn.authenticate("a", f"Bearer {BOB}") == "bob"
    for _ in range(2):
        with pytest.raises(Unauthorized):
            authn.authenticate("a", "Bearer nope")
    with pytest.raises(TooManyRequests):
        authn.authenticate("a", f"Bearer {ALICE}")
    assert authn.authenticate("b", f"Bearer {ALICE}") == "alice"
    clock.advance(5)
    assert authn.authenticate("a", f"Bearer {ALICE}") == "alice"
    disabled = Authenticator({}, 10, 60, clock)
    assert not disabled.enabled
    with pytest.raises(Unauthorized, match="disabled"):
        disabled.authenticate("a", f"Bearer {ALICE}")


# ---------------------------------------------------------------- split


async def test_get_split_has_an_etag(admin: httpx.AsyncClient) -> None:
    r = await admin.get(SPLIT, headers=auth())
    assert r.status_code == 200
    assert r.json() == {"blue": 100, "green": 0}
    assert r.headers["etag"] == '"1"'


async def test_put_split_with_if_match(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    etag = (await admin.get(SPLIT, headers=auth())).headers["etag"]
    r = await admin.put(SPLIT, json={"blue": 80, "green": 20, "reason": "first canary step"},
                        headers={**auth(BOB), "if-match": etag})
    assert r.status_code == 200
    assert r.json() == {"blue": 80, "green": 20} and r.headers["etag"] == '"2"'
    assert gateway.store.get("digits").weights == {"blue": 80, "green": 20}
    r = await admin.get(SPLIT, headers=auth())
    assert r.json() == {"blue": 80, "green": 20} and r.headers["etag"] == '"2"'


async def test_stale_if_match_is_412_and_changes_nothing(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    stale = (await admin.get(SPLIT, headers=auth())).headers["etag"]
    await admin.put(SPLIT, json={"blue": 90, "green": 10}, headers={**auth(), "if-match": stale})
    before = unchanged(gateway)
    for tag in (stale, '"999"', "garbage", 'W/"1"'):
        r = await admin.put(SPLIT, json={"blue": 0, "green": 100}, headers={**auth(), "if-match": tag})
        assert r.status_code == 412, tag
        assert "error" in r.json()
    assert unchanged(gateway) == before
    assert gateway.store.get("digits").weights == {"blue": 90, "green": 10}
    r = await admin.put(SPLIT, json={"blue": 0, "green": 100}, headers={**auth(), "if-match": 'W/"2"'})
    assert r.status_code == 200  # a weak tag of the current revision matches


INVALID_SPLITS: list[tuple[str, bytes]] = [
    ("sum is not 100", b'{"blue": 60, "green": 50}'),
    ("sum under 100", b'{"blue": 10, "green": 10}'),
    ("negative", b'{"blue": 110, "green": -10}'),
    ("101", b'{"blue": 101, "green": -1}'),
    ("101 alone", b'{"blue": 101, "green": 0}'),
    ("non-integer", b'{"blue": 50.5, "green": 49.5}'),
    ("integral float", b'{"blue": 50.0, "green": 50}'),
    ("string", b'{"blue": "50", "green": "50"}'),
    ("boolean", b'{"blue": true, "green": 99}'),
    ("null", b'{"blue": null, "green": 100}'),
    ("extra color", b'{"blue": 50, "green": 50, "red": 0}'),
    ("missing color", b'{"blue": 100}'),
    ("empty object", b"{}"),
    ("malformed JSON", b'{"blue": 50, "green": 50'),
    ("not JSON", b"blue=50&green=50"),
    ("empty body", b""),
    ("array", b"[50, 50]"),
    ("number", b"100"),
    ("reason not text", b'{"blue": 50, "green": 50, "reason": 7}'),
]


@pytest.mark.parametrize(("case", "body"), INVALID_SPLITS, ids=[c for c, _ in INVALID_SPLITS])
async def test_invalid_weights_are_400_and_change_nothing(admin: httpx.AsyncClient, gateway: Gateway, case: str,
                                                         body: bytes) -> None:
    before = unchanged(gateway)
    r = await admin.put(SPLIT, content=body, headers={**auth(), "if-match": '"1"', "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    assert unchanged(gateway) == before


async def test_50_concurrent_puts_with_the_same_etag_exactly_one_wins(admin: httpx.AsyncClient,
                                                                      gateway: Gateway) -> None:
    etag = (await admin.get(SPLIT, headers=auth())).headers["etag"]

    async def put(i: int) -> httpx.Response:
        green = i + 1
        return await admin.put(SPLIT, json={"blue": 100 - green, "green": green},
                               headers={**auth(ALICE if i % 2 else BOB), "if-match": etag})

    responses = await asyncio.gather(*(put(i) for i in range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [412] * 49
    winner = next(r for r in responses if r.status_code == 200)
    assert gateway.store.get("digits").weights == winner.json()
    assert gateway.store.get("digits").revision == 2
    assert [e.action for e in gateway.store.audit()] == ["set_weights"]


async def test_the_audit_names_the_token_that_acted(admin: httpx.AsyncClient) -> None:
    await admin.put(SPLIT, json={"blue": 95, "green": 5, "reason": "canary"}, headers={**auth(BOB), "if-match": '"1"'})
    await admin.put(SPLIT, json={"blue": 75, "green": 25}, headers={**auth(ALICE), "if-match": '"2"'})
    r = await admin.get(f"{API}/audit", headers=auth())
    assert r.status_code == 200
    newest, oldest = r.json()["entries"]
    assert (newest["who"], newest["action"], newest["model"]) == ("alice", "set_weights", "digits")
    assert (oldest["who"], oldest["reason"]) == ("bob", "canary")
    assert oldest["old"] == {"weights": {"blue": 100, "green": 0}}
    assert oldest["new"] == {"weights": {"blue": 95, "green": 5}}
    assert isinstance(newest["time"], float) and newest["time_iso"].endswith("Z")
    assert len((await admin.get(f"{API}/audit?limit=1", headers=auth())).json()["entries"]) == 1
    for bad in ("0", "x", "10001"):
        assert (await admin.get(f"{API}/audit?limit={bad}", headers=auth())).status_code == 400


# ---------------------------------------------------------------- colors


COLOR3 = {"version": "3", "backends": ["http://127.0.0.1:9003", "http://127.0.0.1:9004/"]}


async def test_put_color_points_an_idle_color_at_a_new_deployment(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    r = await admin.put(f"{API}/models/digits/colors/green", json={**COLOR3, "reason": "release 3"}, headers=write(BOB))
    assert r.status_code == 200
    doc = r.json()
    assert doc["colors"]["green"]["version"] == "3"
    assert [b["url"] for b in doc["colors"]["green"]["backends"]] == ["http://127.0.0.1:9003", "http://127.0.0.1:9004"]
    assert {b["breaker"] for b in doc["colors"]["green"]["backends"]} == {"closed"}
    assert r.headers["etag"] == '"2"'
    entry = gateway.store.audit()[0]
    assert (entry.who, entry.action, entry.reason) == ("bob", "set_color", "release 3")
    assert entry.new["colors"]["green"]["version"] == "3"
    # The data plane now has a pool for the new backends.
    assert [b.url for b in gateway.plane.runtime("digits", "green").backends] == [
        "http://127.0.0.1:9003", "http://127.0.0.1:9004"]


async def test_put_color_carrying_traffic_needs_force(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    before = unchanged(gateway)
    r = await admin.put(f"{API}/models/digits/colors/blue", json=COLOR3, headers=write())
    assert r.status_code == 409 and "force" in r.json()["error"]
    r = await admin.put(f"{API}/models/digits/colors/blue", json={**COLOR3, "force": False}, headers=write())
    assert r.status_code == 409
    assert unchanged(gateway) == before
    r = await admin.put(f"{API}/models/digits/colors/blue", json={**COLOR3, "force": True}, headers=write())
    assert r.status_code == 200
    entry = gateway.store.audit()[0]
    assert (entry.who, entry.action) == ("alice", "set_color_forced")
    assert gateway.store.get("digits").colors["blue"].version == "3"


async def test_put_color_with_a_stale_if_match_is_412(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    await admin.put(SPLIT, json={"blue": 100, "green": 0}, headers=write())
    before = unchanged(gateway)
    r = await admin.put(f"{API}/models/digits/colors/green", json=COLOR3, headers={**auth(), "if-match": '"1"'})
    assert r.status_code == 412
    assert unchanged(gateway) == before


async def test_put_color_rechecks_traffic_at_the_moment_of_the_write(admin: httpx.AsyncClient,
                                                                     gateway: Gateway) -> None:
    """A weight change that lands while a color request's body is still arriving must not be overridden:
    the 409 rule is judged on the state the write applies to, not the state seen before the body was read."""
    reading, release = asyncio.Event(), asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"version": "3", '
        reading.set()  # the handler has seen green at 0% and is reading the rest of the body
        await release.wait()
        yield b'"backends": ["http://127.0.0.1:9003"]}'

    put_color = asyncio.ensure_future(
        admin.put(f"{API}/models/digits/colors/green", content=slow_body(), headers=write()))
    await reading.wait()
    r = await admin.put(SPLIT, json={"blue": 50, "green": 50}, headers=write(BOB))
    assert r.status_code == 200
    release.set()
    r = await put_color
    assert r.status_code == 409, r.text
    state = gateway.store.get("digits")
    assert state.colors["green"].version == "2" and state.weights == {"blue": 50, "green": 50}


INVALID_COLORS: list[tuple[str, Any]] = [
    ("no version", {"backends": ["http://127.0.0.1:9003"]}),
    ("no backends", {"version": "3"}),
    ("empty backends", {"version": "3", "backends": []}),
    ("not a URL", {"version": "3", "backends": ["127.0.0.1:9003"]}),
    ("ftp URL", {"version": "3", "backends": ["ftp://127.0.0.1:9003"]}),
    ("backends not a list", {"version": "3", "backends": "http://127.0.0.1:9003"}),
    ("empty version", {"version": "", "backends": ["http://127.0.0.1:9003"]}),
    ("extra field", {**COLOR3, "weight": 5}),
    ("force not a bool", {**COLOR3, "force": "yes"}),
    ("array", [COLOR3]),
]


@pytest.mark.parametrize(("case", "body"), INVALID_COLORS, ids=[c for c, _ in INVALID_COLORS])
async def test_put_color_invalid_body_is_400(admin: httpx.AsyncClient, gateway: Gateway, case: str, body: Any) -> None:
    before = unchanged(gateway)
    r = await admin.put(f"{API}/models/digits/colors/green", json=body, headers=write())
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    assert unchanged(gateway) == before


async def test_put_color_malformed_json_is_400(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    before = unchanged(gateway)
    r = await admin.put(f"{API}/models/digits/colors/green", content=b'{"version": ', headers=write())
    assert r.status_code == 400
    assert unchanged(gateway) == before


# ---------------------------------------------------------------- reads, unknowns, limits


async def test_models_listing_shows_routing_and_breakers(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    gateway.plane.runtime("digits", "green").backends[0].breaker.force_open()
    r = await admin.get(f"{API}/models", headers=auth())
    assert r.status_code == 200
    (model,) = r.json()["models"]
    assert model["name"] == "digits" and model["weights"] == {"blue": 100, "green": 0}
    assert (model["candidate"], model["stable"], model["etag"]) == ("green", "blue", '"1"')
    assert model["colors"]["blue"]["backends"] == [{"url": "http://127.0.0.1:8001", "breaker": "closed",
                                                    "outstanding": 0}]
    assert model["colors"]["green"]["backends"][0]["breaker"] == "open"
    assert model["canary"]["phase"] == "idle" and model["canary"]["candidate"] == "green"


async def test_stats(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    gateway.plane.runtime("digits", "blue").window.record(0.010, True)
    gateway.plane.runtime("digits", "blue").window.record(0.020, False)
    r = await admin.get(f"{API}/models/digits/stats", headers=auth())
    assert r.status_code == 200
    colors = r.json()["colors"]
    assert colors["blue"]["count"] == 2 and colors["blue"]["error_rate"] == 0.5 and colors["blue"]["weight"] == 100
    assert colors["green"]["count"] == 0 and colors["green"]["p50_ms"] is None


@pytest.mark.parametrize(("method", "path"), [("GET", f"{API}/models/nope/split"), ("PUT", f"{API}/models/nope/split"),
                                              ("PUT", f"{API}/models/nope/colors/green"),
                                              ("GET", f"{API}/models/nope/stats"),
                                              ("PUT", f"{API}/models/digits/colors/red")])
async def test_unknown_model_or_color_is_404(admin: httpx.AsyncClient, gateway: Gateway, method: str,
                                             path: str) -> None:
    before = unchanged(gateway)
    r = await admin.request(method, path, json={"blue": 0, "green": 100, **COLOR3}, headers=auth())
    assert r.status_code == 404
    assert set(r.json()) == {"error"}
    assert unchanged(gateway) == before


async def test_unknown_route_and_wrong_method_answer_json(admin: httpx.AsyncClient) -> None:
    r = await admin.get(f"{API}/nothing", headers=auth())
    assert r.status_code == 404 and r.json() == {"error": f"no route for GET {API}/nothing"}
    r = await admin.delete(SPLIT, headers=auth())
    assert r.status_code == 405 and set(r.json()) == {"error"}


async def test_oversized_admin_body_is_413_and_changes_nothing(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    before = unchanged(gateway)
    big = b'{"blue": 100, "green": 0, "reason": "' + b"x" * ADMIN_BODY_LIMIT + b'"}'
    r = await admin.put(SPLIT, content=big, headers=write())  # declared length
    assert r.status_code == 413 and set(r.json()) == {"error"}

    async def chunked() -> AsyncIterator[bytes]:  # no length: counted while streaming
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = await admin.put(SPLIT, content=chunked(), headers=write())
    assert r.status_code == 413 and set(r.json()) == {"error"}
    assert unchanged(gateway) == before


# ---------------------------------------------------------------- shadow traffic

SHADOW = f"{API}/models/digits/shadow"


async def test_shadow_share_is_read_and_set_with_etag_and_audit(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    r = await admin.get(SHADOW, headers=auth())
    assert r.status_code == 200
    assert r.json() == {"percent": 0, "agreement": None, "compared": 0}
    etag = r.headers["etag"]
    r = await admin.put(SHADOW, json={"percent": 10, "reason": "compare v2"}, headers={**auth(BOB), "if-match": etag})
    assert r.status_code == 200, r.text
    assert r.json() == {"percent": 10} and r.headers["etag"] != etag
    assert gateway.store.get("digits").shadow_percent == 10
    entry = gateway.store.audit_log[-1]
    assert (entry.who, entry.action, entry.old, entry.new, entry.reason) == (
        "bob", "set_shadow", {"shadow_percent": 0}, {"shadow_percent": 10}, "compare v2")
    before = unchanged(gateway)
    r = await admin.put(SHADOW, json={"percent": 20}, headers={**auth(), "if-match": etag})  # the old ETag
    assert r.status_code == 412
    assert unchanged(gateway) == before and gateway.store.get("digits").shadow_percent == 10


@pytest.mark.parametrize("body", [{"percent": 101}, {"percent": -1}, {"percent": 12.5}, {"percent": "10"},
                                  {"percent": True}, {}, {"percent": 10, "colour": "green"}])
async def test_invalid_shadow_share_is_400_and_changes_nothing(admin: httpx.AsyncClient, gateway: Gateway,
                                                               body: dict[str, Any]) -> None:
    before = unchanged(gateway)
    r = await admin.put(SHADOW, json=body, headers=write())
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    assert unchanged(gateway) == before and gateway.store.get("digits").shadow_percent == 0


# ---------------------------------------------------------------- roles and If-Match (the core judges; HTTP renders)

VIEWER_T, OPERATOR_T, SECURITY_T = "grafana-token-0123456789", "ci-token-0123456789ab", "sec-token-0123456789abc"


@pytest.fixture
async def roles_admin(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    tokens = {VIEWER_T: Principal("grafana", frozenset({"viewer"})),
              OPERATOR_T: Principal("ci", frozenset({"operator"})),
              SECURITY_T: Principal("sec-lead", frozenset({"approve:security"}))}
    app = create_admin_app(gateway.release, gateway.plane, Authenticator(tokens, 10, 60))
    async with client(app) as c:
        yield c


async def test_a_viewer_reads_but_its_put_is_403_and_changes_nothing(roles_admin: httpx.AsyncClient,
                                                                      gateway: Gateway) -> None:
    assert (await roles_admin.get(f"{API}/models", headers=auth(VIEWER_T))).status_code == 200
    before = unchanged(gateway)
    r = await roles_admin.put(SPLIT, json={"blue": 50, "green": 50}, headers=write(VIEWER_T))
    assert r.status_code == 403 and "needs the 'operator' role" in r.json()["error"], r.text
    assert unchanged(gateway) == before


async def test_a_token_without_viewer_cannot_read(roles_admin: httpx.AsyncClient) -> None:
    r = await roles_admin.get(f"{API}/models", headers=auth(SECURITY_T))
    assert r.status_code == 403 and "'viewer' role" in r.json()["error"]


async def test_an_operator_pauses_but_cannot_promote_and_the_audit_names_its_roles(
        roles_admin: httpx.AsyncClient, admin: httpx.AsyncClient) -> None:
    started = await admin.post(f"{API}/models/digits/canary/start", json={}, headers=write())
    assert started.status_code == 200, started.text
    r = await roles_admin.post(f"{API}/models/digits/canary/pause", headers=write(OPERATOR_T))
    assert r.status_code == 200 and r.json()["phase"] == "paused", r.text
    r = await roles_admin.post(f"{API}/models/digits/canary/promote", headers=write(OPERATOR_T))
    assert r.status_code == 403 and "'admin' role" in r.json()["error"]
    entry = (await admin.get(f"{API}/audit?limit=1", headers=auth())).json()["entries"][0]
    assert (entry["who"], entry["roles"], entry["action"]) == ("ci", ["operator"], "canary_pause")


async def test_50_concurrent_writes_without_if_match_are_428_and_change_nothing(admin: httpx.AsyncClient,
                                                                                 gateway: Gateway) -> None:
    before = unchanged(gateway)
    rs = await asyncio.gather(*(admin.put(SPLIT, json={"blue": i, "green": 100 - i}, headers=auth())
                                for i in range(50)))
    assert [r.status_code for r in rs] == [428] * 50
    assert all("If-Match" in r.json()["error"] for r in rs)
    assert unchanged(gateway) == before


async def test_if_match_can_be_made_optional(gateway: Gateway) -> None:
    async with client(create_admin_app(gateway.release, gateway.plane, gateway.auth, require_if_match=False)) as c:
        r = await c.put(SPLIT, json={"blue": 90, "green": 10}, headers=auth())
    assert r.status_code == 200 and gateway.store.get("digits").weights == {"blue": 90, "green": 10}


async def test_canary_commands_honour_if_match(admin: httpx.AsyncClient, gateway: Gateway) -> None:
    r = await admin.post(f"{API}/models/digits/canary/start", json={}, headers={**auth(), "if-match": '"7"'})
    assert r.status_code == 412 and gateway.store.get("digits").canary.phase == "idle"
    etag = (await admin.get(f"{API}/models/digits/canary", headers=auth())).headers["etag"]
    r = await admin.post(f"{API}/models/digits/canary/start", json={}, headers={**auth(), "if-match": etag})
    assert r.status_code == 200 and r.json()["phase"] == "progressing"


async def test_approve_parses_the_gate_and_renders_the_refusal(roles_admin: httpx.AsyncClient) -> None:
    r = await roles_admin.post(f"{API}/models/digits/canary/approve", json={"gate": "Security!"},
                               headers=write(SECURITY_T))
    assert r.status_code == 400 and r.json()["error"].startswith("invalid body: gate:")
    r = await roles_admin.post(f"{API}/models/digits/canary/approve", json={"gate": "security"},
                               headers=write(SECURITY_T))
    assert r.status_code == 409 and "not waiting for an approval" in r.json()["error"]
