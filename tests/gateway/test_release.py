"""gateway/release.py: every release rule, in process, against a real in-memory state store.

Each refusal is checked to change nothing (same revision, no audit entry); each accepted write to leave one audit
entry naming who, what and why. The HTTP tests of the admin API only check authentication, parsing and rendering.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway import canary
from gateway.auth import Principal
from gateway.canary import Phase, Policy, Stage
from gateway.errors import BadRequest, Conflict, PreconditionFailed, ServingError
from gateway.release import ApproveBody, ColorBody, CommandBody, Release, ShadowBody, SplitBody, StartBody
from gateway.settings import RoutingFile
from gateway.state import Freeze, MemoryStateStore, ModelState
from tests.gateway.support import FakeClock, routing_doc

ROOT = Path(__file__).resolve().parents[2]
ALICE = Principal("alice", frozenset({"admin"}))
BOB = Principal("bob", frozenset({"admin"}))
M = "digits"
QUICK = Policy(stages=(Stage(10, 0), Stage(50, 0)), interval_s=1, min_requests=0, detect_error_rate=None,
               detect_slow_share=None)  # no evidence minimum: these tests are about the release core


def release(tmp_path: Path | None = None, *, gate: bool = False, **routing: Any) -> Release:
    doc = routing_doc()
    doc["models"][M].update(routing)
    store = MemoryStateStore.from_routing(RoutingFile.model_validate(doc))
    repo = tmp_path if gate else None
    return Release(store, repo, {M: QUICK}, clock=FakeClock())


def report(repo: Path, version: str, passed: bool) -> None:
    path = repo / M / version / "validation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    checks = [{"check": "accuracy", "result": "PASS" if passed else "FAIL"}]
    path.write_text(json.dumps({"passed": passed, "checks": checks}))


async def refused(r: Release, error: type[ServingError], match: str, call: Any) -> None:
    """``call`` is refused with ``error`` and changes nothing: same revision, no new audit entry."""
    before, audited = r.get(M), len(await r.store.read_audit(10_000))
    with pytest.raises(error, match=match):
        await call
    assert r.get(M) is before and len(await r.store.read_audit(10_000)) == audited


async def last_audit(r: Release) -> dict[str, Any]:
    return (await r.store.read_audit(1))[0].as_json()


async def started(r: Release, actor: Principal = ALICE, **body: Any) -> ModelState:
    return await r.start(M, StartBody(**body), actor=actor)


# ---------------------------------------------------------------------------------------------- manual split


async def test_split_is_written_and_audited() -> None:
    r = release()
    state = await r.set_split(M, SplitBody(blue=70, green=30, reason="drill"), actor=ALICE, if_revision=1)
    assert state.weights == {"blue": 70, "green": 30} and state.revision == 2
    entry = await last_audit(r)
    assert (entry["who"], entry["action"], entry["reason"]) == ("alice", "set_weights", "drill")
    assert entry["old"]["weights"] == {"blue": 100, "green": 0} and entry["new"]["weights"] == {"blue": 70, "green": 30}


async def test_split_on_a_stale_revision_is_refused() -> None:
    r = release()
    await r.set_split(M, SplitBody(blue=90, green=10), actor=ALICE, if_revision=1)
    await refused(r, PreconditionFailed, "revision 2", r.set_split(M, SplitBody(blue=0, green=100), actor=BOB,
                                                                  if_revision=1))


@pytest.mark.parametrize("doc", [{"blue": 60, "green": 60}, {"blue": 100}, {"blue": True, "green": 0},
                                 {"blue": 50.0, "green": 50}, {"blue": 50, "green": 50, "extra": 1}])
def test_split_body_is_checked(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SplitBody.model_validate(doc)


@pytest.mark.parametrize("phase_after", ["progressing", "paused", "promoting"])
async def test_no_manual_split_while_a_rollout_is_active(phase_after: str) -> None:
    r = release()
    await started(r)
    if phase_after == "paused":
        await r.command(M, "pause", CommandBody(), actor=ALICE)
    elif phase_after == "promoting":
        await r.command(M, "promote", CommandBody(), actor=ALICE)
    assert r.get(M).canary.phase == phase_after
    await refused(r, Conflict, f"rollout of 'digits' is {phase_after}",
                  r.set_split(M, SplitBody(blue=50, green=50), actor=BOB, if_revision=None))


async def test_manual_split_is_allowed_again_after_the_rollout_ends() -> None:
    r = release()
    await started(r)
    await r.command(M, "abort", CommandBody(), actor=ALICE)
    state = await r.set_split(M, SplitBody(blue=50, green=50), actor=BOB, if_revision=None)
    assert state.weights == {"blue": 50, "green": 50}


# ---------------------------------------------------------------------------------------------- colors, shadow


async def test_an_idle_color_is_re_pointed() -> None:
    r = release()
    body = ColorBody(version="3", backends=["http://127.0.0.1:8003/"])
    state = await r.set_color(M, "green", body, actor=ALICE, if_revision=None)
    assert state.colors["green"].version == "3" and state.colors["green"].backends == ("http://127.0.0.1:8003",)
    assert (await last_audit(r))["action"] == "set_color"


async def test_a_color_with_traffic_is_re_pointed_only_when_forced() -> None:
    r = release()
    body = ColorBody(version="3", backends=["http://127.0.0.1:8003"])
    await refused(r, Conflict, "blue carries 100%.*with force", r.set_color(M, "blue", body, actor=ALICE,
                                                                            if_revision=None))
    forced = ColorBody(version="3", backends=["http://127.0.0.1:8003"], force=True, reason="hotfix")
    state = await r.set_color(M, "blue", forced, actor=ALICE, if_revision=None)
    assert state.colors["blue"].version == "3"
    entry = await last_audit(r)
    assert (entry["action"], entry["reason"]) == ("set_color_forced", "hotfix")


async def test_shadow_share_is_written_and_audited() -> None:
    r = release()
    state = await r.set_shadow(M, ShadowBody(percent=25), actor=ALICE, if_revision=1)
    assert state.shadow_percent == 25 and (await last_audit(r))["action"] == "set_shadow"
    for bad in ({"percent": 101}, {"percent": True}, {"percent": 5.5}, {}):
        with pytest.raises(ValidationError):
            ShadowBody.model_validate(bad)


# ---------------------------------------------------------------------------------------------- starting


async def test_start_moves_the_color_at_zero_to_the_first_stage_of_the_models_policy() -> None:
    r = release()
    state = await started(r, reason="release 2")
    assert state.canary.phase == Phase.PROGRESSING and state.canary.candidate == "green"
    assert state.weights == {"blue": 90, "green": 10} and state.canary.policy == QUICK
    entry = await last_audit(r)
    assert (entry["who"], entry["action"], entry["reason"]) == ("alice", "canary_start", "release 2")


async def test_start_overrides_apply_on_top_of_the_routing_policy() -> None:
    r = release()
    state = await started(r, policy={"min_requests": 7})
    assert state.canary.policy.min_requests == 7 and state.canary.policy.stages == QUICK.stages
    legacy = release()  # the first API's form: overrides alone, beside the other keys
    state = await legacy.start(M, StartBody.model_validate({"min_requests": 9, "reason": "x"}), actor=ALICE)
    assert state.canary.policy.min_requests == 9


async def test_a_bad_policy_override_names_the_field_and_starts_nothing() -> None:
    r = release()
    await refused(r, BadRequest, r"invalid policy: max_p95: unknown field", started(r, policy={"max_p95": 1}))
    await refused(r, BadRequest, r"stages\.0\.weight", started(r, policy={"stages": [{"weight": 100}]}))


async def test_no_second_start_while_one_is_active() -> None:
    r = release()
    await started(r)
    await refused(r, Conflict, "already progressing", started(r))


async def test_no_start_on_a_color_that_already_carries_everything() -> None:
    r = release()
    await refused(r, Conflict, "blue already carries 100%", started(r, candidate="blue"))


async def gate_refused(r: Release, match: str) -> None:
    """A start the validation gate refuses changes no state but is told: one ``canary_start_refused`` entry
    (the notifications' ``bluegreen.validation.refused``) naming the version and why."""
    before, audited = r.get(M), len(await r.store.read_audit(10_000))
    with pytest.raises(Conflict, match=match):
        await started(r)
    assert r.get(M) is before and len(await r.store.read_audit(10_000)) == audited + 1
    entry = await last_audit(r)
    assert entry["action"] == "canary_start_refused" and entry["who"] == "alice"
    assert entry["new"] == {"candidate": "green", "version": "2"} and "validation gate refused" in entry["reason"]


async def test_the_validation_gate_refuses_unless_forced(tmp_path: Path) -> None:
    r = release(tmp_path, gate=True)
    await gate_refused(r, r"digits:2 has no passing validation report \(no report at .*\).*with force")
    report(tmp_path, "2", passed=False)
    await gate_refused(r, r"did not pass \(failed: accuracy\)")
    state = await started(r, force=True, reason="hotfix")
    assert state.canary.phase == Phase.PROGRESSING
    entry = await last_audit(r)
    assert entry["action"] == "canary_start_forced"
    assert entry["reason"].startswith("forced: the report at") and entry["reason"].endswith("; hotfix")


async def test_a_passing_report_opens_the_gate(tmp_path: Path) -> None:
    r = release(tmp_path, gate=True)
    report(tmp_path, "2", passed=True)
    await started(r)
    assert (await last_audit(r))["action"] == "canary_start"


# ---------------------------------------------------------------------------------------------- operators


async def test_operator_commands_follow_the_phase() -> None:
    r = release()
    await refused(r, Conflict, "cannot pause: no rollout in progress", r.command(M, "pause", CommandBody(),
                                                                                 actor=BOB))
    await started(r)
    state = await r.command(M, "pause", CommandBody(reason="look"), actor=BOB)
    assert state.canary.phase == Phase.PAUSED and state.canary.paused_by == "operator"
    entry = await last_audit(r)
    assert (entry["who"], entry["action"], entry["reason"]) == ("bob", "canary_pause", "look")
    await refused(r, Conflict, "cannot pause: already paused", r.command(M, "pause", CommandBody(), actor=BOB))
    assert (await r.command(M, "resume", CommandBody(), actor=BOB)).canary.phase == Phase.PROGRESSING
    await refused(r, Conflict, "cannot resume: not paused", r.command(M, "resume", CommandBody(), actor=BOB))
    state = await r.command(M, "promote", CommandBody(), actor=BOB)
    assert state.canary.phase == Phase.PROMOTING and state.weights == {"blue": 0, "green": 100}
    state = await r.command(M, "abort", CommandBody(), actor=BOB)
    assert state.canary.phase == Phase.ROLLED_BACK and state.weights == {"blue": 100, "green": 0}


# ---------------------------------------------------------------------------------------------- decisions


async def test_a_decision_is_applied_with_the_weights_it_implies_and_holds_are_not_audited() -> None:
    r = release()
    state = await started(r)
    audited = len(await r.store.read_audit(100))
    held = canary.Status(**{**_fields(state.canary), "last_decision": canary.Decision(1.0, "hold", "waiting")})
    state = await r.apply(state, held, [], fenced=True)
    assert len(await r.store.read_audit(100)) == audited and state.canary.last_decision == held.last_decision
    advanced, actions = canary.advance(QUICK, state.canary, 2.0, {"n": 1}, "stage 1 passed")
    state = await r.apply(state, advanced, actions)
    assert state.weights == {"blue": 50, "green": 50}
    entry = await last_audit(r)
    assert (entry["action"], entry["evidence"]) == ("canary_advance", {"n": 1})


async def test_a_decision_on_stale_state_is_dropped() -> None:
    r = release()
    before = await started(r)
    await r.command(M, "pause", CommandBody(), actor=BOB)
    advanced, actions = canary.advance(QUICK, before.canary, 2.0, {}, "stage 1 passed")
    with pytest.raises(PreconditionFailed):
        await r.apply(before, advanced, actions, fenced=True)
    assert r.get(M).canary.phase == Phase.PAUSED and r.get(M).weights == {"blue": 90, "green": 10}


async def test_after_a_promotion_and_a_manual_split_the_idle_color_is_the_candidate() -> None:
    """The newcomer's stumble: promoted green, then ``weights blue=100`` — blue carries everything, so the next
    release goes to green (the color at 0%), and ``canary start`` works without naming a candidate."""
    r = release()
    state = await started(r)
    state = await r.command(M, "promote", CommandBody(), actor=ALICE)
    promoted, actions = canary.step(QUICK, state.canary, canary.Snapshot(canary.ColorSample(10), canary.ColorSample(),
                                                                         new_candidate_requests=10), 5000.0)
    state = await r.apply(state, promoted, actions)
    assert state.canary.phase == Phase.PROMOTED and (state.stable, state.candidate) == ("green", "blue")
    state = await r.set_split(M, SplitBody(blue=100, green=0), actor=ALICE, if_revision=None)
    assert (state.stable, state.candidate) == ("blue", "green")
    assert state.as_json()["candidate"] == "green"
    state = await started(r)
    assert state.canary.candidate == "green" and state.weights == {"blue": 90, "green": 10}


def _fields(status: canary.Status) -> dict[str, Any]:
    return {f: getattr(status, f) for f in status.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------- start-up


def test_a_misspelled_canary_field_stops_the_gateway_naming_it(tmp_path: Path) -> None:
    doc = routing_doc()
    doc["models"][M]["canary"] = {"max_p95_msec": 120, "stages": [{"weight": 5, "hold_s": 60}]}
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(doc))
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "gateway", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "BLUEGREEN_ADMIN_TOKENS": "a:abcdefghijklmnop"})
    assert done.returncode == 2, done.stderr
    assert "models.digits.canary.max_p95_msec" in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------- roles

VIEWER = Principal("grafana", frozenset({"viewer"}))
OPERATOR = Principal("ci", frozenset({"operator"}))
SECURITY = Principal("sec-lead", frozenset({"viewer", "approve:security"}))
OWNER = Principal("po", frozenset({"approve:product-owner"}))
BOTH = Principal("both", frozenset({"approve:security", "approve:product-owner"}))
GATED = Policy(stages=(Stage(10, 0), Stage(50, 0, approvals=("security", "product-owner"))), interval_s=1,
               min_requests=0, detect_error_rate=None, detect_slow_share=None)


async def test_a_viewer_writes_nothing() -> None:
    r = release()
    await refused(r, ServingError, "setting the split needs the 'operator' role; 'grafana' has viewer",
                  r.set_split(M, SplitBody(blue=50, green=50), actor=VIEWER, if_revision=None))
    await refused(r, ServingError, "needs the 'operator' role", r.set_shadow(M, ShadowBody(percent=5), actor=VIEWER,
                                                                             if_revision=None))


async def test_an_operator_steers_but_neither_starts_promotes_nor_re_points() -> None:
    r = release()
    await refused(r, ServingError, "starting a rollout needs the 'admin' role", started(r, actor=OPERATOR))
    await refused(r, ServingError, "re-pointing a color needs the 'admin' role",
                  r.set_color(M, "green", ColorBody(version="3", backends=["http://127.0.0.1:8003"]), actor=OPERATOR,
                              if_revision=None))
    await started(r)
    assert (await r.command(M, "pause", CommandBody(), actor=OPERATOR)).canary.phase == Phase.PAUSED
    await refused(r, ServingError, "promote of a rollout needs the 'admin' role",
                  r.command(M, "promote", CommandBody(), actor=OPERATOR))
    assert (await r.command(M, "abort", CommandBody(), actor=OPERATOR)).canary.phase == Phase.ROLLED_BACK
    entry = await last_audit(r)
    assert (entry["who"], entry["roles"], entry["action"]) == ("ci", ["operator"], "canary_abort")


def test_a_403_is_forbidden() -> None:
    from gateway.errors import Forbidden
    with pytest.raises(Forbidden) as caught:
        VIEWER.require("admin", "x")
    assert caught.value.status == 403


# ---------------------------------------------------------------------------------------------- approval gates


async def waiting_at_gate(r: Release) -> ModelState:
    """Start a GATED rollout and let the controller's step carry it through stage 1 to the gated stage 2's end."""
    state = await started(r, policy=GATED.as_json())
    clean = canary.Snapshot(canary.ColorSample(10), canary.ColorSample(10), new_candidate_requests=10)
    for now in (2000.0, 3000.0):
        new, actions = canary.step(state.canary.policy, state.canary, clean, now)
        state = await r.apply(state, new, actions)
    return state


async def test_a_gated_stage_waits_for_each_named_approval_then_advances() -> None:
    r = release()
    state = await waiting_at_gate(r)
    assert (state.canary.phase, state.canary.paused_by, state.canary.stage) == (Phase.PAUSED, "approval", 2)
    assert state.canary.last_decision is not None
    assert state.canary.last_decision.reason == "stage 2 passed; waiting for approval: security, product-owner"
    assert state.canary.as_json()["waiting_for"] == ["security", "product-owner"]
    await refused(r, Conflict, "a resume cannot stand in for a named approval",
                  r.command(M, "resume", CommandBody(), actor=ALICE))
    await refused(r, Conflict, "stages ahead need named approvals", r.command(M, "promote", CommandBody(), actor=ALICE))
    await refused(r, ServingError, "approving the 'security' gate needs the 'approve:security' role",
                  r.approve(M, ApproveBody(gate="security"), actor=ALICE))  # admin does not imply approve:
    state = await r.approve(M, ApproveBody(gate="security", reason="pen test passed"), actor=SECURITY)
    assert state.canary.phase == Phase.PAUSED and state.canary.pending_gates() == ["product-owner"]
    entry = await last_audit(r)
    assert (entry["who"], entry["action"], entry["reason"]) == ("sec-lead", "canary_approve", "pen test passed")
    await refused(r, Conflict, "'security' was already approved by sec-lead",
                  r.approve(M, ApproveBody(gate="security"), actor=BOTH))
    state = await r.approve(M, ApproveBody(gate="product-owner"), actor=OWNER)
    assert state.canary.phase == Phase.PROMOTING and state.weights == {"blue": 0, "green": 100}
    assert state.canary.approved == ()
    assert state.canary.last_decision is not None and state.canary.last_decision.reason == \
        "stage 2 approved: security by sec-lead, product-owner by po"


async def test_one_token_cannot_approve_two_gates() -> None:
    r = release()
    await waiting_at_gate(r)
    await r.approve(M, ApproveBody(gate="security"), actor=BOTH)
    await refused(r, Conflict, "both already approved 'security': each gate needs a different approver",
                  r.approve(M, ApproveBody(gate="product-owner"), actor=BOTH))


async def test_approvals_are_refused_unless_the_rollout_waits_for_that_gate() -> None:
    r = release()
    await refused(r, Conflict, "not waiting for an approval", r.approve(M, ApproveBody(gate="security"),
                                                                        actor=SECURITY))
    await waiting_at_gate(r)
    await refused(r, Conflict, "no pending gate 'legal'", r.approve(M, ApproveBody(gate="legal"),
                                                                    actor=Principal("x", frozenset({"approve:legal"}))))


async def test_a_bad_candidate_rolls_back_while_waiting_and_the_approvals_go_with_it() -> None:
    r = release()
    state = await waiting_at_gate(r)
    state = await r.approve(M, ApproveBody(gate="security"), actor=SECURITY)
    failing = canary.Snapshot(canary.ColorSample(1000, 200), canary.ColorSample(1000), new_candidate_requests=100)
    new, actions = canary.step(state.canary.policy, state.canary, failing, 5000.0)
    state = await r.apply(state, new, actions)
    assert state.canary.phase == Phase.ROLLED_BACK and state.weights == {"blue": 100, "green": 0}
    assert state.canary.approved == () and state.canary.pending_gates() == ["security", "product-owner"]
    await refused(r, Conflict, "not waiting for an approval", r.approve(M, ApproveBody(gate="product-owner"),
                                                                        actor=OWNER))


async def test_an_abort_cancels_pending_approvals() -> None:
    r = release()
    await waiting_at_gate(r)
    await r.approve(M, ApproveBody(gate="security"), actor=SECURITY)
    state = await r.command(M, "abort", CommandBody(), actor=OPERATOR)
    assert state.canary.approved == ()


def test_gate_names_are_checked() -> None:
    for bad in ({"gate": "Security Team"}, {"gate": ""}, {}):
        with pytest.raises(ValidationError):
            ApproveBody.model_validate(bad)
    with pytest.raises(ValueError, match="a gate is named twice"):
        Policy.from_json({"stages": [{"weight": 5, "approvals": ["security", "security"]}]})


async def test_a_forced_promote_waives_the_evidence_minimum_and_is_audited_as_forced(tmp_path: Path) -> None:
    """Only ``promote`` with ``force`` skips the wait for evidence at 100%; a resume cannot."""
    r = release(tmp_path)
    strict = Policy(stages=(Stage(10, 0),), interval_s=1)  # the power-derived minimum: 1,441 requests
    state = await started(r, policy=strict.as_json())
    await refused(r, Conflict, "force applies to promote only", r.command(M, "pause", CommandBody(force=True),
                                                                          actor=ALICE))
    state = await r.command(M, "promote", CommandBody(force=True, reason="hotfix"), actor=ALICE)
    entry = await last_audit(r)
    assert entry["action"] == "canary_promote_forced" and state.canary.forced
    few = canary.Snapshot(canary.ColorSample(10, timed=10), canary.ColorSample(), new_candidate_requests=10)
    promoted, actions = canary.step(state.canary.policy, state.canary, few, 5000.0)
    assert promoted.phase == Phase.PROMOTED and actions == [canary.Promoted("blue")]


# ---------------------------------------------------------------------------------------------- the release freeze


async def frozen(r: Release) -> ModelState:
    """Freeze the model as it stands, rollout and all, with a real write (an incident's single write rolls the
    rollout back too: this is the state that write rules out, which the release core must still hold)."""
    freeze = Freeze("pager", 900.0, "checkout is down")
    return await r.store.update(M, None, lambda s: dataclasses.replace(s, frozen=freeze), who="pager",
                                action="freeze_set")


async def test_while_frozen_no_canary_write_raises_the_candidates_weight() -> None:
    r = release()
    await started(r)
    state = await frozen(r)
    assert state.canary.phase == Phase.PROGRESSING and state.weights == {"blue": 90, "green": 10}
    why = r"^releases are frozen since .* by pager: checkout is down; .*\(while frozen a rollout may not raise " \
          r"its candidate's weight: green would go from 10% to "
    advanced, actions = canary.advance(QUICK, state.canary, 2.0, {}, "stage 1 passed")
    await refused(r, Conflict, why + "50%", r.apply(state, advanced, actions, fenced=True))  # the controller's
    await refused(r, Conflict, why + "100%", r.command(M, "promote", CommandBody(), actor=ALICE))
    await refused(r, Conflict, why + "100%", r.command(M, "promote", CommandBody(force=True), actor=ALICE))
    # A hold, a pause and a resume move no traffic: they pass.
    held = dataclasses.replace(state.canary, last_decision=canary.Decision(4.0, "hold", "waiting"))
    state = await r.apply(state, held, [], fenced=True)
    assert state.canary.last_decision == held.last_decision
    assert (await r.command(M, "pause", CommandBody(), actor=OPERATOR)).canary.phase == Phase.PAUSED
    state = await r.command(M, "resume", CommandBody(), actor=OPERATOR)
    assert state.canary.phase == Phase.PROGRESSING and state.weights == {"blue": 90, "green": 10}
    assert state.frozen is not None


async def test_while_frozen_a_start_is_refused_by_the_write_itself() -> None:
    """Not only by ``start``'s look at the state it read: the write applying a start refuses too."""
    r = release()
    state = await frozen(r)
    await refused(r, Conflict, "releases are frozen", r.start(M, StartBody(force=True), actor=ALICE))
    status, actions = canary.start(QUICK, "green", 3.0)
    await refused(r, Conflict, "green would go from 0% to 10%", r.apply(state, status, actions, actor=ALICE))


@pytest.mark.parametrize("how", ["abort", "rollback"])
async def test_while_frozen_an_abort_or_a_rollback_still_passes(how: str) -> None:
    r = release()
    await started(r)
    state = await frozen(r)
    if how == "abort":
        state = await r.command(M, "abort", CommandBody(reason="incident"), actor=OPERATOR)
    else:
        failing = canary.Snapshot(canary.ColorSample(1000, 200), canary.ColorSample(1000),
                                  new_candidate_requests=100)
        new, actions = canary.step(state.canary.policy, state.canary, failing, 5000.0)
        state = await r.apply(state, new, actions, fenced=True)
    assert state.canary.phase == Phase.ROLLED_BACK and state.weights == {"blue": 100, "green": 0}
    assert state.frozen is not None and (await last_audit(r))["action"] == f"canary_{how}"


async def test_while_frozen_neither_an_approval_nor_a_resume_advances_past_a_gate() -> None:
    r = release()
    await waiting_at_gate(r)
    await r.approve(M, ApproveBody(gate="security"), actor=SECURITY)
    await frozen(r)
    await refused(r, Conflict, "green would go from 50% to 100%",
                  r.approve(M, ApproveBody(gate="product-owner"), actor=OWNER))
    assert r.get(M).canary.pending_gates() == ["product-owner"]
    r = release()
    bare = Policy(stages=(Stage(10, 0), Stage(50, 0, approve=True)), interval_s=1, min_requests=0,
                  detect_error_rate=None, detect_slow_share=None)  # a gate without names: a resume approves it
    state = await started(r, policy=bare.as_json())
    clean = canary.Snapshot(canary.ColorSample(10), canary.ColorSample(10), new_candidate_requests=10)
    for now in (2000.0, 3000.0):
        new, actions = canary.step(state.canary.policy, state.canary, clean, now)
        state = await r.apply(state, new, actions)
    assert (state.canary.phase, state.canary.paused_by, state.weights["green"]) == (Phase.PAUSED, "approval", 50)
    await frozen(r)
    await refused(r, Conflict, "green would go from 50% to 100%", r.command(M, "resume", CommandBody(), actor=ALICE))


async def test_while_frozen_a_color_carrying_traffic_is_not_re_pointed_even_forced() -> None:
    r = release()
    await r.set_split(M, SplitBody(blue=90, green=10), actor=ALICE, if_revision=None)
    await frozen(r)
    body = ColorBody(version="9", backends=["http://127.0.0.1:9009"], force=True)
    for color in ("blue", "green"):
        await refused(r, Conflict, rf"^releases are frozen since .*\(while frozen a color carrying traffic is not "
                      rf"re-pointed, even with force: {color} carries", r.set_color(M, color, body, actor=ALICE,
                                                                                     if_revision=None))
    await r.set_split(M, SplitBody(blue=100, green=0), actor=ALICE, if_revision=None)  # back to stable: allowed
    for force in (False, True):  # the idle color is how a fix is deployed
        state = await r.set_color(M, "green", ColorBody(version=f"fix{force}", backends=["http://127.0.0.1:9009"],
                                                        force=force), actor=ALICE, if_revision=None)
        assert state.colors["green"].version == f"fix{force}" and state.frozen is not None
    await refused(r, Conflict, "blue carries 100%", r.set_color(M, "blue", body, actor=ALICE, if_revision=None))
