"""gateway/router.py: sticky buckets as docs/configuration.md defines them, the exact unkeyed spread, overrides,
versions."""

from __future__ import annotations

import hashlib
import random

import pytest

from gateway.errors import BadRequest, NotFound
from gateway.router import BUCKETS, Router, bucket
from gateway.settings import Color
from gateway.state import ColorState, ModelState


def state(blue: int, green: int, *, candidate: Color | None = None, name: str = "digits") -> ModelState:
    colors = {"blue": ColorState("1", ("http://127.0.0.1:8001",)), "green": ColorState("2", ("http://127.0.0.1:8002",))}
    return ModelState(name, colors, {"blue": blue, "green": green}, candidate)  # type: ignore[arg-type]


def keys(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [f"user-{rng.getrandbits(64):016x}".encode() for _ in range(n)]


def test_bucket_is_blake2b_first_8_bytes_big_endian_mod_10000() -> None:
    for key in [b"", b"a", b"user-42", "ключ".encode(), *keys(500)]:
        digest = hashlib.blake2b(key).digest()
        assert len(digest) == 64  # blake2b's default digest size
        assert bucket(key) == int.from_bytes(digest[:8], byteorder="big") % 10_000
    assert BUCKETS == 10_000


def test_bucket_known_values_do_not_change_across_releases() -> None:
    # Pinned numbers (computed once with hashlib), so that a change of hash, byte order or modulus is caught
    # even if the test's own recomputation changed with it: buckets must be stable across releases.
    assert {k: bucket(k) for k in (b"alice", b"user-1", b"")} == {b"alice": 6466, b"user-1": 7162, b"": 4099}
    buckets = [bucket(k) for k in keys(20_000)]
    assert min(buckets) >= 0 and max(buckets) < 10_000
    # Roughly uniform: every tenth of the range gets 10% ± 1.5% of 20k keys.
    for decile in range(10):
        share = sum(decile * 1000 <= b < (decile + 1) * 1000 for b in buckets) / len(buckets)
        assert abs(share - 0.1) < 0.015


def test_sticky_key_maps_to_the_same_color_every_time() -> None:
    router = Router(allow_color_override=False)
    s = state(80, 20)
    for key in keys(500):
        first = router.choose(s, key=key)
        assert all(router.choose(s, key=key) == first for _ in range(5))
        # ...and a fresh router (another process) agrees.
        assert Router(allow_color_override=False).choose(s, key=key) == first


def test_candidate_owns_the_low_buckets() -> None:
    router = Router(allow_color_override=False)
    s = state(80, 20)  # candidate: green
    assert s.candidate == "green"
    for key in keys(2000):
        assert router.choose(s, key=key) == ("green" if bucket(key) < 2000 else "blue")


def test_keyed_share_follows_the_weight() -> None:
    router = Router(allow_color_override=False)
    chosen = [router.choose(state(80, 20), key=k) for k in keys(5000)]
    assert abs(chosen.count("green") / 5000 - 0.20) < 0.02


@pytest.mark.parametrize("candidate", [None, "blue"])
def test_raising_the_candidate_weight_only_moves_keys_to_it(candidate: Color | None) -> None:
    router = Router(allow_color_override=False)
    ks = keys(5000)
    cand: Color = candidate or "green"
    before_w, after_w = 20, 50
    if cand == "green":
        before, after = state(100 - before_w, before_w), state(100 - after_w, after_w)
    else:
        before = state(before_w, 100 - before_w, candidate="blue")
        after = state(after_w, 100 - after_w, candidate="blue")
    assert before.candidate == after.candidate == cand
    was = {k: router.choose(before, key=k) for k in ks}
    now = {k: router.choose(after, key=k) for k in ks}
    moved_away = [k for k in ks if was[k] == cand and now[k] != cand]
    assert moved_away == []
    moved_to = sum(was[k] != cand and now[k] == cand for k in ks)
    assert 0.25 < moved_to / 5000 < 0.35  # about 30% of all keys joined the candidate


def test_every_step_of_a_rollout_only_moves_keys_to_the_candidate() -> None:
    router = Router(allow_color_override=False)
    ks = keys(3000)
    previous = {k: "blue" for k in ks}
    for green in (0, 5, 25, 50, 100):
        s = state(100 - green, green)
        now = {k: router.choose(s, key=k) for k in ks}
        assert not [k for k in ks if previous[k] == "green" and now[k] == "blue"], f"keys left green at {green}%"
        previous = now
    assert set(previous.values()) == {"green"}


@pytest.mark.parametrize("weight", [1, 5, 20, 25, 37, 50, 63, 99])
def test_unkeyed_spread_is_exact_over_any_100_consecutive_requests(weight: int) -> None:
    router = Router(allow_color_override=False)
    s = state(100 - weight, weight)
    picks = [router.choose(s) == "green" for _ in range(1000)]
    for start in range(len(picks) - 100 + 1):
        assert sum(picks[start:start + 100]) == weight, f"window at {start}"


def test_unkeyed_spread_interleaves_rather_than_bursting() -> None:
    router = Router(allow_color_override=False)
    s = state(50, 50)
    picks = [router.choose(s) for _ in range(100)]
    longest = max(len(run) for run in "".join(p[0] for p in picks).replace("bg", "b g").replace("gb", "g b").split())
    assert longest <= 2


def test_unkeyed_counters_are_per_model() -> None:
    router = Router(allow_color_override=False)
    a, b = state(80, 20, name="a"), state(80, 20, name="b")
    for _ in range(37):
        router.choose(a)
    picks = [router.choose(b) == "green" for _ in range(100)]
    assert sum(picks) == 20


@pytest.mark.parametrize(("blue", "green", "expected"), [(100, 0, "blue"), (0, 100, "green")])
def test_zero_and_hundred_send_everything_to_one_color(blue: int, green: int, expected: str) -> None:
    router = Router(allow_color_override=False)
    s = state(blue, green)
    assert {router.choose(s) for _ in range(300)} == {expected}
    assert {router.choose(s, key=k) for k in keys(2000)} == {expected}


def test_forced_color_refused_unless_allowed() -> None:
    s = state(100, 0)
    with pytest.raises(BadRequest, match="not allowed"):
        Router(allow_color_override=False).choose(s, forced="green")
    router = Router(allow_color_override=True)
    assert router.choose(s, forced="green") == "green"
    assert router.choose(s, forced="blue", key=b"anything") == "blue"
    with pytest.raises(BadRequest, match="blue or green"):
        router.choose(s, forced="red")


def test_versioned_choice_goes_to_the_color_serving_it() -> None:
    router = Router(allow_color_override=False)
    s = state(100, 0)
    assert router.choose(s, version="2") == "green"  # even at 0%
    assert router.choose(s, version="1", key=b"k") == "blue"
    with pytest.raises(NotFound, match="version '3'"):
        router.choose(s, version="3")
