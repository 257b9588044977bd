"""Outside signals end to end: a real gateway in front of real model servers, driven through the CLI verbs
(``bluegreen signal``, ``bluegreen freeze``) and the admin API. A complaint spike on the candidate rolls a rollout
back at the controller's next analysis; an incident rolls back at once and freezes releases until an admin lifts
the freeze; the audit log shows every step."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.cli import main
from tests.integration.expect import expect
from tests.integration.test_canary import Load
from tests.procs import ADMIN_TOKEN, admin_headers, digits_stack, wait_until

API = "/admin/v1"
# One long stage: nothing but a trigger ends it within the test. Interval 1 s: complaints are judged within ~1 s.
HOLD = {"stages": [{"weight": 20, "hold_s": 600}], "interval_s": 1, "min_requests": 0}


@dataclass
class Stack:
    data: str
    admin: str

    def canary(self, command: str = "", doc: dict | None = None) -> httpx.Response:  # type: ignore[type-arg]
        url = f"{self.admin}{API}/models/digits/canary" + (f"/{command}" if command else "")
        if command:
            return httpx.post(url, json=doc or {}, headers=admin_headers())
        return httpx.get(url, headers=admin_headers())

    def phase(self) -> str:
        return str(expect(self.canary(), 200).json()["phase"])

    def audit(self) -> list[str]:
        entries = expect(httpx.get(f"{self.admin}{API}/audit", headers=admin_headers()), 200).json()["entries"]
        return [e["action"] for e in entries]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[Stack]:
    with digits_stack(tmp_path_factory.mktemp("signals")) as (data, admin, _, _):
        yield Stack(data, admin)


@pytest.fixture(autouse=True)
def operator_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """The CLI's environment, and a known start: no freeze, no rollout in progress."""
    if httpx.get(f"{stack.admin}{API}/freeze", headers=admin_headers()).json()["frozen"]:
        expect(httpx.delete(f"{stack.admin}{API}/freeze", headers=admin_headers()), 200)
    if stack.phase() in ("progressing", "paused", "promoting"):
        expect(stack.canary("abort"), 200)
    monkeypatch.setenv("BLUEGREEN_ADMIN_URL", stack.admin)
    monkeypatch.setenv("BLUEGREEN_ADMIN_TOKEN", ADMIN_TOKEN)
    return stack


def test_a_complaint_spike_on_the_candidate_rolls_the_rollout_back(stack: Stack,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    load = Load(stack.data, workers=2, max_s=30)
    try:
        expect(stack.canary("start", {"force": True, "policy": HOLD}), 200)
        # Judged on the requests each color served in the rollout: wait until an analysis has counted some.
        wait_until(lambda: expect(stack.canary(), 200).json()["complaints"]["stage_candidate"] > 0, 10,
                   interval=0.1, what="an analysis with candidate requests")
        assert main(["signal", "digits", "complaint", "--color", "blue", "--count", "2"]) == 0
        assert main(["signal", "digits", "complaint", "--color", "green", "--count", "40"]) == 0
        out = capsys.readouterr().out
        assert "40 complaint(s) about green counted (candidate green 40, stable 2, unattributed 0)" in out
        wait_until(lambda: stack.phase() != "progressing", 10, interval=0.1, what="the complaint trigger")
    finally:
        load.stop()
    status = expect(stack.canary(), 200).json()
    decision = status["last_decision"]
    assert status["phase"] == "rolled_back" and status["weights"] == {"blue": 100, "green": 0}, decision
    assert decision["result"] == "rollback" and decision["reason"].startswith("complaints: candidate 40 in ")
    figures = decision["evidence"]["complaints"]
    assert (figures["candidate"], figures["stable"], figures["max_complaint_ratio"]) == (40, 2, 2.0)
    assert figures["candidate_requests"] > 0 and figures["stable_requests"] > figures["candidate_requests"]
    assert stack.audit()[:5] == ["canary_rollback", "signal_complaint", "signal_received", "signal_complaint",
                                 "signal_received"]


def test_an_incident_rolls_back_at_once_and_freezes_until_lifted(stack: Stack,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    expect(stack.canary("start", {"force": True, "policy": HOLD}), 200)
    assert main(["signal", "digits", "incident", "--reason", "checkout is down"]) == 0
    assert "releases frozen on digits; rolled back: digits" in capsys.readouterr().out
    status = expect(stack.canary(), 200).json()  # at once: no analysis in between
    assert status["phase"] == "rolled_back" and status["weights"] == {"blue": 100, "green": 0}
    assert status["last_decision"]["reason"] == "incident: checkout is down"

    refused = expect(stack.canary("start", {"force": True, "policy": HOLD}), 409).json()["error"]
    assert refused.startswith("releases are frozen since ") and "checkout is down" in refused
    assert refused.endswith("an admin lifts the freeze with DELETE /admin/v1/freeze")
    assert main(["canary", "digits", "start", "--force"]) == 1
    assert "releases are frozen" in capsys.readouterr().err
    assert main(["freeze"]) == 0
    assert "digits: releases frozen since " in capsys.readouterr().out
    assert main(["status"]) == 0
    assert "releases frozen since " in capsys.readouterr().out
    assert main(["signal", "digits", "incident"]) == 2  # refused before anything is sent
    assert "--reason" in capsys.readouterr().err

    assert main(["freeze", "lift", "--reason", "fixed"]) == 0
    assert "lifted the release freeze on digits" in capsys.readouterr().out
    assert expect(stack.canary("start", {"force": True, "policy": HOLD}), 200).json()["phase"] == "progressing"
    actions = stack.audit()
    assert actions[:2] == ["canary_start", "freeze_lifted"]
    assert actions[2:6] == ["canary_rollback", "freeze_set", "signal_received", "canary_start"]
