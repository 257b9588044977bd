"""The operator verbs (``bluegreen status|weights|shadow|canary|audit``) against a real gateway process in front
of real model servers on loopback. One stack serves the module; every test starts from blue 100 / green 0 with
no rollout in progress. The help texts are checked without a gateway."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from gateway import admin_client as operator
from gateway.cli import build_parser, main
from tests.procs import (
    ADMIN_TOKEN,
    admin_headers,
    digits_stack,
    free_port,
    routing,
    start_gateway,
    wait_until,
)

ROW = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
       0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
BODY = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]})
POLICY = '{"stages":[{"weight":10,"hold_s":1}],"interval_s":1,"min_requests":5}'


@dataclass
class Stack:
    data: str
    admin: str
    backends: tuple[str, str]

    def split(self) -> dict[str, int]:
        r = httpx.get(f"{self.admin}/admin/v1/models/digits/split", headers=admin_headers())
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def put_split(self, blue: int, green: int) -> None:
        r = httpx.put(f"{self.admin}/admin/v1/models/digits/split", json={"blue": blue, "green": green},
                      headers={**admin_headers(), "if-match": "*"})
        assert r.status_code == 200, r.text

    def canary(self) -> dict[str, object]:
        r = httpx.get(f"{self.admin}/admin/v1/models/digits/canary", headers=admin_headers())
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_repo: Path) -> Iterator[Stack]:
    with digits_stack(tmp_path_factory.mktemp("operator")) as (data, admin, blue_url, green_url):
        yield Stack(data, admin, (blue_url, green_url))


@pytest.fixture(autouse=True)
def admin_env(stack: Stack, monkeypatch: pytest.MonkeyPatch, _no_bluegreen_env: None) -> Stack:
    """The operator's environment, and a known starting state: no rollout, blue 100 / green 0."""
    if stack.canary()["phase"] in ("progressing", "paused", "promoting"):
        r = httpx.post(f"{stack.admin}/admin/v1/models/digits/canary/abort",
                       headers={**admin_headers(), "if-match": "*"})
        assert r.status_code == 200, r.text
    stack.put_split(100, 0)
    monkeypatch.setenv("BLUEGREEN_ADMIN_URL", stack.admin)
    monkeypatch.setenv("BLUEGREEN_ADMIN_TOKEN", ADMIN_TOKEN)
    return stack


def client(stack: Stack) -> operator.AdminClient:
    return operator.AdminClient(stack.admin, ADMIN_TOKEN)


def test_status_shows_both_colors(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    stack.put_split(50, 50)
    for _ in range(20):
        r = httpx.post(f"{stack.data}/v2/models/digits/infer", content=BODY,
                       headers={"content-type": "application/json", "cache-control": "no-cache, no-store"})
        assert r.status_code == 200, r.text

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "digits  weights blue 50% / green 50%" in out
    assert "canary idle" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("  blue", "  green"))}
    assert set(rows) == {"blue", "green"}
    assert rows["blue"][1:3] == ["1", "50%"] and rows["green"][1:3] == ["2", "50%"]
    assert rows["blue"][-1] == rows["green"][-1] == "closed"
    served = [int(rows[c][-2]) for c in ("blue", "green")]
    assert sum(served) == 20 and min(served) > 0  # both colors answered: their latency columns are figures
    assert all(rows[c][3] != "-" and rows[c][6] == "0.00%" for c in ("blue", "green"))

    assert main(["status", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in doc["models"]] == ["digits"]
    assert doc["stats"][0]["colors"]["green"]["version"] == "2"


def test_watch_redraws_until_ctrl_c(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    with client(stack) as c:
        assert operator.watch(c, 0.5, sleep=sleep, tty=True) == 0
        out = capsys.readouterr().out
        assert sleeps == [0.5] * 3
        assert out.count("\x1b[H\x1b[2J") == 3 and out.count("digits  weights") == 3

        sleeps.clear()
        assert operator.watch(c, 0.5, sleep=sleep, tty=False, as_json=True) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "\x1b" not in "".join(lines) and len(lines) == 3
        assert all(json.loads(line)["models"][0]["name"] == "digits" for line in lines)

    # capsys's stdout is not a terminal: the CLI's watch prints frames without clearing the screen
    with operator.AdminClient(f"http://127.0.0.1:{free_port()}", ADMIN_TOKEN) as down:
        sleeps.clear()
        assert operator.watch(down, 1, sleep=sleep, tty=False) == 0  # a gateway that is down is shown, not fatal
        assert capsys.readouterr().out.count("error: cannot connect to the admin API") == 3


def test_weights_change_the_split(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "digits", "green=20", "--reason", "operator test"]) == 0
    assert capsys.readouterr().out.strip() == "digits: weights blue 80% / green 20% (were blue 100% / green 0%)"
    assert stack.split() == {"blue": 80, "green": 20}

    assert main(["weights", "digits", "blue=70", "green=30"]) == 0
    assert stack.split() == {"blue": 70, "green": 30}


@pytest.mark.parametrize(("specs", "message"), [
    (["green=120"], "green's weight must be 0-100"),
    (["blue=60", "green=30"], "must sum to 100"),
    (["red=10"], "expected blue=N or green=N"),
    (["green=ten"], "must be an integer"),
])
def test_bad_weights_are_refused_before_anything_is_sent(stack: Stack, capsys: pytest.CaptureFixture[str],
                                                         specs: list[str], message: str) -> None:
    assert main(["weights", "digits", *specs]) == 2
    assert message in capsys.readouterr().err
    assert stack.split() == {"blue": 100, "green": 0}


def test_stale_etag_is_reported_not_retried(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    with client(stack) as c:
        _, etag = c.split("digits")
        stack.put_split(60, 40)  # another operator, between our read and our write

        with pytest.raises(operator.StaleWeights) as caught:
            operator.put_weights(c, "digits", {"blue": 90, "green": 10}, etag)
        assert caught.value.current == {"blue": 60, "green": 40}
        assert stack.split() == {"blue": 60, "green": 40}  # nothing was written

    def put_with_old_etag(c: operator.AdminClient) -> int:
        operator.put_weights(c, "digits", {"blue": 90, "green": 10}, etag)
        return 0

    assert operator.run(stack.admin, None, put_with_old_etag) == 1
    err = capsys.readouterr().err
    assert "changed since they were read; nothing was written; they are now blue 60% / green 40%" in err
    assert stack.split() == {"blue": 60, "green": 40}


def test_canary_start_pause_resume_abort(stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(POLICY)
    assert main(["canary", "digits", "start", "--force", "--policy", f"@{policy_file}", "--reason", "drill"]) == 0
    out = capsys.readouterr().out
    assert "digits: canary progressing, candidate green, stage 1/1" in out
    assert "weights blue 90% / green 10%" in out
    assert "last decision" in out and "start" in out

    assert main(["canary", "digits", "pause"]) == 0
    assert "canary paused" in capsys.readouterr().out
    # while a rollout is active the weights are the controller's: the server's 409 reaches the operator
    assert main(["weights", "digits", "green=50"]) == 1
    assert "a canary rollout of 'digits' is paused" in capsys.readouterr().err
    assert main(["canary", "digits", "resume"]) == 0
    assert "canary progressing" in capsys.readouterr().out

    assert main(["canary", "digits", "abort", "--reason", "drill over", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["phase"] == "rolled_back" and doc["weights"] == {"blue": 100, "green": 0}
    assert doc["last_decision"]["result"] == "abort"
    assert stack.canary()["phase"] == "rolled_back"

    assert main(["canary", "digits", "pause"]) == 1  # nothing to pause: the server says why
    assert "cannot pause: no rollout in progress (phase rolled_back)" in capsys.readouterr().err

    assert main(["audit", "--limit", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[1:4] for line in lines] == [["admin", f"canary_{a}", "digits"]
                                                         for a in ("abort", "resume", "pause", "start")]
    assert '"drill over"' in lines[0] and '"drill"' in lines[3]
    assert "weights blue=90 green=10 → blue=100 green=0" in lines[0]


def test_canary_options_only_go_with_start(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["canary", "digits", "pause", "--force"]) == 2
    assert "--force only goes with `canary MODEL start` or `canary MODEL promote`" in capsys.readouterr().err
    assert main(["canary", "digits", "promote", "--policy", POLICY]) == 2
    assert "--policy only go with `canary MODEL start`" in capsys.readouterr().err
    assert main(["canary", "digits", "start", "--policy", "{not json"]) == 2
    assert "--policy is not valid JSON" in capsys.readouterr().err
    assert main(["canary", "digits", "start", "--force", "--policy", '{"stages": []}']) == 1
    assert "invalid policy: stages: at least one stage is needed" in capsys.readouterr().err
    assert stack.canary()["phase"] != "progressing"


def test_canary_promote_with_force(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    """``promote --force`` reaches the API as ``force``: the 100% stage waives its evidence minimum, audited."""
    assert main(["canary", "digits", "start", "--force", "--policy", POLICY]) == 0
    capsys.readouterr()
    assert main(["canary", "digits", "promote", "--force", "--reason", "hotfix", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["weights"] == {"blue": 0, "green": 100}, doc
    assert doc["last_decision"]["result"] == "promote" and "forced" in doc["last_decision"]["reason"], doc
    assert main(["audit", "--limit", "5", "--model", "digits"]) == 0
    assert "  canary_promote_forced  digits  \"hotfix\"" in capsys.readouterr().out


def test_audit_lists_changes_newest_first(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", "digits", "green=5", "--reason", "audit test"]) == 0
    capsys.readouterr()

    assert main(["audit", "--limit", "1", "--model", "digits"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    time_iso, who, action, model, reason, change = line.split("  ")
    assert (who, action, model, reason) == ("admin", "set_weights", "digits", '"audit test"')
    assert time_iso.endswith("Z") and "weights blue=100 green=0 → blue=95 green=5" in change

    assert main(["audit", "--limit", "2", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    assert len(entries) == 2 and entries[0]["reason"] == "audit test" and entries[0]["who"] == "admin"
    assert entries[0]["time"] >= entries[1]["time"]

    assert main(["audit", "--model", "nosuch"]) == 0
    assert capsys.readouterr().out.strip() == "no audit entries for 'nosuch'"


def test_missing_token_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("BLUEGREEN_ADMIN_TOKEN")
    for argv in (["status"], ["weights", "digits", "green=10"], ["canary", "digits", "pause"], ["audit"]):
        assert main(argv) == 2
        assert "no admin token: set BLUEGREEN_ADMIN_TOKEN or pass --token-file" in capsys.readouterr().err

    empty = tmp_path / "token"
    empty.write_text("\n")
    assert main(["audit", "--token-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    token = tmp_path / "token2"
    token.write_text(ADMIN_TOKEN + "\n")
    assert main(["audit", "--limit", "1", "--token-file", str(token)]) == 0


def test_wrong_token_and_unknown_model_show_the_servers_error(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["weights", "nosuch", "green=10"]) == 1
    assert "error: unknown model 'nosuch'; configured: digits (HTTP 404)" in capsys.readouterr().err
    monkeypatch.setenv("BLUEGREEN_ADMIN_TOKEN", "not-the-token-0123456789")
    assert main(["status"]) == 1
    assert "error: missing or invalid bearer token (HTTP 401)" in capsys.readouterr().err


def test_unreachable_admin_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--admin-url", url]) == 1
    err = capsys.readouterr().err
    assert f"cannot connect to the admin API at {url}" in err and "is the gateway running?" in err
    assert "Traceback" not in err


def test_shadow_shows_and_sets_the_share(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        assert main(["shadow", "digits"]) == 0
        assert capsys.readouterr().out.strip() == "digits: shadow 0% (no copies compared yet)"
        assert main(["shadow", "digits", "10", "--reason", "compare"]) == 0
        assert capsys.readouterr().out.strip() == "digits: shadow 10% (was 0%; no copies compared yet)"
        assert main(["shadow", "digits", "150"]) == 2
        assert "must be 0-100" in capsys.readouterr().err
        assert main(["shadow", "digits"]) == 0
        assert "shadow 10%" in capsys.readouterr().out
    finally:
        assert main(["shadow", "digits", "0"]) == 0


def test_weights_without_a_value_shows_the_split(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    stack.put_split(75, 25)
    assert main(["weights", "digits"]) == 0
    assert capsys.readouterr().out.strip() == "digits: weights blue 75% / green 25%"
    assert stack.split() == {"blue": 75, "green": 25}
    assert main(["weights", "digits", "--reason", "nothing to change"]) == 2  # a reason without a change
    assert "--reason goes with a change" in capsys.readouterr().err


def test_canary_without_a_command_shows_the_rollout(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["canary", "digits"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digits: canary ") and "weights blue 100% / green 0%" in out
    assert main(["canary", "digits", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "digits" and doc["phase"] == stack.canary()["phase"]
    assert main(["canary", "digits", "--force"]) == 2  # a start option without a command: nothing is sent
    assert "--force go with a command" in capsys.readouterr().err


def test_the_validation_gate_refusal_names_the_cli_flag(stack: Stack, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A gateway with the gate on (an empty validation repository: no version has a report) refuses the start;
    the server's words name its JSON body key, the CLI's name ``--force``."""
    gw, _, admin = start_gateway(tmp_path, routing([stack.backends[0]], [stack.backends[1]]),
                                 {"BLUEGREEN_VALIDATION_REPO": str(tmp_path / "no-reports")})
    try:
        assert main(["canary", "digits", "start", "--admin-url", admin]) == 1
        err = capsys.readouterr().err
        assert "no passing validation report" in err and "--force" in err, err
        assert '"force"' not in err and " force " not in err.replace("--force", ""), err
        assert main(["canary", "digits", "start", "--force", "--admin-url", admin, "--policy", POLICY]) == 0
        assert "canary progressing, candidate green" in capsys.readouterr().out
    finally:
        gw.stop()


def test_after_429_the_cli_says_how_long_to_wait(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Its own gateway (one failed authentication locks the address out for 30 s), so the module's stays open."""
    gw, _, admin = start_gateway(tmp_path, routing([stack.backends[0]], [stack.backends[1]]),
                                 {"BLUEGREEN_AUTH_MAX_FAILURES": "1", "BLUEGREEN_AUTH_WINDOW_S": "30"})
    try:
        monkeypatch.setenv("BLUEGREEN_ADMIN_TOKEN", "not-the-token-0123456789")
        assert main(["status", "--admin-url", admin]) == 1
        assert "(HTTP 401)" in capsys.readouterr().err
        monkeypatch.setenv("BLUEGREEN_ADMIN_TOKEN", ADMIN_TOKEN)  # even the right token waits now
        assert main(["weights", "digits", "--admin-url", admin]) == 1
        err = capsys.readouterr().err.strip()
        assert "(HTTP 429)" in err, err
        wait = int(err.rsplit("wait ", 1)[1].split(" s before trying again")[0])
        assert 1 <= wait <= 30, err
    finally:
        gw.stop()


def test_help_is_plain_text() -> None:
    """``bluegreen --help`` and every sub-command's help: no reStructuredText markup, and each says what it does."""
    parser = build_parser()
    texts = {"bluegreen": parser.format_help()}
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # argparse has no API
    for name, sub in subs.choices.items():
        texts[name] = sub.format_help()
    assert set(texts) >= {"bluegreen", "status", "weights", "shadow", "canary", "audit", "up", "validate"}
    for name, text in texts.items():
        assert "``" not in text and "`" not in text, (name, text)
        assert len(text.split("\n\n")) >= 3, (name, text)  # usage, a description, the arguments


def test_canary_approve_sends_the_gate(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A stage with a named gate waits after its hold; ``canary MODEL approve --gate G`` with a token holding
    ``approve:G`` (and ``viewer``: the CLI reads the rollout's ETag first) lets it go on. Its own gateway, for the
    approver's token."""
    approver = "security-team-token-0123456789"
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"admin: {ADMIN_TOKEN}\nsec: {{token: {approver}, roles: [viewer, 'approve:security']}}\n")
    gw, data, admin = start_gateway(tmp_path, routing([stack.backends[0]], [stack.backends[1]]),
                                    {"BLUEGREEN_ADMIN_TOKENS_FILE": str(tokens)})
    try:
        assert main(["canary", "digits", "approve", "--admin-url", admin]) == 2  # nothing sent without a gate
        assert "approve needs --gate NAME" in capsys.readouterr().err
        gated = '{"stages": [{"weight": 50, "hold_s": 0, "approvals": ["security"]}], "interval_s": 0.2, ' \
                '"min_requests": 5, "detect_error_rate": null, "detect_slow_share": null}'
        assert main(["canary", "digits", "start", "--force", "--policy", gated, "--admin-url", admin]) == 0
        capsys.readouterr()

        def waiting() -> bool:
            for _ in range(10):  # fresh answers, so that the candidate serves its share
                r = httpx.post(f"{data}/v2/models/digits/infer", content=BODY,
                               headers={"content-type": "application/json", "cache-control": "no-cache"})
                assert r.status_code == 200, r.text
            r = httpx.get(f"{admin}/admin/v1/models/digits/canary", headers=admin_headers())
            assert r.status_code == 200 and r.json()["phase"] in ("progressing", "paused"), r.text
            return r.json()["waiting_for"] == ["security"]

        wait_until(waiting, 20, interval=0.1, what="the stage to wait for the security gate")
        assert main(["canary", "digits", "--admin-url", admin]) == 0
        assert "waiting for approval: security" in capsys.readouterr().out
        assert main(["canary", "digits", "approve", "--gate", "security", "--admin-url", admin]) == 1
        assert "approve:security" in capsys.readouterr().err  # the admin token does not stand in for the gate

        monkeypatch.setenv("BLUEGREEN_ADMIN_TOKEN", approver)
        assert main(["canary", "digits", "approve", "--gate", "security", "--admin-url", admin, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["phase"] == "promoting" and doc["weights"] == {"blue": 0, "green": 100}, doc
        assert doc["last_decision"]["result"] == "promote" and "security by sec" in doc["last_decision"]["reason"]
    finally:
        gw.stop()


def test_a_bad_routing_file_is_one_line_per_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``bluegreen gateway`` refuses a misspelled canary field before binding anything, naming the field in one
    line, without pydantic's input echo and documentation links."""
    doc = routing(["http://127.0.0.1:1"], ["http://127.0.0.1:2"])
    doc["models"]["digits"]["canary"] = {"intervall_s": 2, "min_requests": "many"}
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(doc))
    assert main(["gateway", "--config", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: routing file {path}: ")
    assert "models.digits.canary.intervall_s: unknown field" in line
    assert "models.digits.canary.min_requests" in line and "many" not in line and "http" not in line


def test_a_sink_whose_secret_is_not_set_stops_the_gateway(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A sink meant to be signed must not go out unsigned: its secret's variable unset stops ``bluegreen gateway``
    before anything is bound (exit 2), naming the sink and the variable."""
    doc = {**routing(["http://127.0.0.1:1"], ["http://127.0.0.1:2"]),
           "notifications": [{"url": "https://hooks.example/T0/SECRETPATH", "secret_env": "HOOK_SECRET_UNSET"}]}
    path = tmp_path / "routing.json"
    path.write_text(json.dumps(doc))
    monkeypatch.delenv("HOOK_SECRET_UNSET", raising=False)
    assert main(["gateway", "--config", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == ("error: notifications: sink 'hooks.example' names secret_env HOOK_SECRET_UNSET, which is not "
                    "set (or empty)")
