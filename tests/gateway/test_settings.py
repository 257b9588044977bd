"""gateway/settings.py: the routing file's rules, BLUEGREEN_* environment settings, named admin tokens."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from gateway.auth import Principal
from gateway.policy import Policy
from gateway.settings import BreakerSettings, GatewaySettings, RoutingFile, check_weights, other
from tests.gateway.support import routing_doc


def with_model(**changes: Any) -> dict[str, Any]:
    doc = routing_doc()
    doc["models"]["digits"].update(changes)
    return doc


def test_the_design_example_loads_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text("""
models:
  digits:
    colors:
      blue:  {version: "1", backends: ["http://127.0.0.1:8001"]}
      green: {version: 2, backends: ["http://127.0.0.1:8002/", "https://green.example:8443"]}
    weights: {blue: 95, green: 5}
    shadow_percent: 0
    canary: {max_p95_ms: 120}
""")
    routing = RoutingFile.load(path)
    route = routing.models["digits"]
    assert route.weights == {"blue": 95, "green": 5}
    assert route.colors["green"].version == "2"  # a bare YAML number is a version string
    assert route.colors["green"].backends == ["http://127.0.0.1:8002", "https://green.example:8443"]
    assert route.canary == Policy(max_p95_ms=120) and route.candidate is None
    # The same document as JSON.
    as_json = tmp_path / "routing.json"
    as_json.write_text(json.dumps(yaml.safe_load(path.read_text())))
    assert RoutingFile.load(as_json) == routing
    # ...and through the settings that name it.
    assert GatewaySettings(config=path).routing() == routing


def test_weights_default_to_all_blue() -> None:
    doc = routing_doc()
    del doc["models"]["digits"]["weights"]
    assert RoutingFile.model_validate(doc).models["digits"].weights == {"blue": 100, "green": 0}


@pytest.mark.parametrize("weights", [
    {"blue": 60, "green": 50}, {"blue": 50, "green": 49}, {"blue": 110, "green": -10}, {"blue": 101, "green": -1},
    {"blue": 100}, {"blue": 50, "green": 50, "red": 0}, {"blue": 50.5, "green": 49.5},
    {"blue": True, "green": 99}, {"blue": "50", "green": "50"}, {"blue": 50.0, "green": 50},
])
def test_routing_weights_are_integers_summing_to_100(weights: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RoutingFile.model_validate(with_model(weights=weights))


@pytest.mark.parametrize("colors", [
    {"blue": {"version": "1", "backends": ["http://127.0.0.1:8001"]}},
    {"blue": {"version": "1", "backends": ["http://a"]}, "green": {"version": "2", "backends": ["http://b"]},
     "red": {"version": "3", "backends": ["http://c"]}},
])
def test_both_colors_and_only_those(colors: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RoutingFile.model_validate(with_model(colors=colors))


@pytest.mark.parametrize("backends", [[], ["127.0.0.1:8001"], ["ftp://127.0.0.1"], ["http://" + "a" * 600],
                                      "http://127.0.0.1:8001"])
def test_backends_must_be_http_urls(backends: Any) -> None:
    doc = with_model()
    doc["models"]["digits"]["colors"]["green"]["backends"] = backends
    with pytest.raises(ValidationError):
        RoutingFile.model_validate(doc)


@pytest.mark.parametrize("change", [
    lambda d: d.update(extra=1),
    lambda d: d["models"]["digits"].update(shadow=5),
    lambda d: d["models"]["digits"].update(shadow_percent=101),
    lambda d: d["models"]["digits"]["colors"]["blue"].update(version=""),
    lambda d: d.update(models={}),
])
def test_other_routing_mistakes_are_refused(change: Any) -> None:
    doc = copy.deepcopy(routing_doc())
    change(doc)
    with pytest.raises(ValidationError):
        RoutingFile.model_validate(doc)


def test_check_weights_messages() -> None:
    assert check_weights({"green": 30, "blue": 70}) == {"blue": 70, "green": 30}
    with pytest.raises(ValueError, match="sum to 100, got 110"):
        check_weights({"blue": 60, "green": 50})
    with pytest.raises(ValueError, match="exactly 'blue' and 'green'"):
        check_weights({"blue": 100})
    with pytest.raises(ValueError, match="integer 0-100"):
        check_weights({"blue": False, "green": 100})
    assert other("blue") == "green" and other("green") == "blue"


def test_no_routing_file_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--config"):
        GatewaySettings().routing()


def test_defaults() -> None:
    s = GatewaySettings()
    assert (s.data.host, s.data.port, s.admin.host, s.admin.port) == ("127.0.0.1", 8080, "127.0.0.1", 8081)
    assert s.breaker == BreakerSettings() and s.allow_color_override is False
    assert (s.auth_max_failures, s.auth_window_s) == (10, 60.0)


def test_nested_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BLUEGREEN_BREAKER__OPEN_S", "2")
    monkeypatch.setenv("BLUEGREEN_BREAKER__HALF_OPEN_PROBES", "5")
    monkeypatch.setenv("BLUEGREEN_UPSTREAM__DEADLINE_S", "0.75")
    monkeypatch.setenv("BLUEGREEN_DATA__PORT", "9090")
    monkeypatch.setenv("BLUEGREEN_ALLOW_COLOR_OVERRIDE", "true")
    monkeypatch.setenv("BLUEGREEN_CONFIG", str(tmp_path / "r.yaml"))
    s = GatewaySettings()
    assert s.breaker.open_s == 2.0 and s.breaker.half_open_probes == 5
    assert s.breaker.window_size == BreakerSettings().window_size  # the rest keep their defaults
    assert s.upstream.deadline_s == 0.75 and s.data.port == 9090 and s.data.host == "127.0.0.1"
    assert s.allow_color_override is True and s.config == tmp_path / "r.yaml"


def test_invalid_environment_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLUEGREEN_BREAKER__OPEN_S", "-1")
    with pytest.raises(ValidationError):
        GatewaySettings()
    monkeypatch.setenv("BLUEGREEN_BREAKER__OPEN_S", "1")
    monkeypatch.setenv("BLUEGREEN_BREAKER__NO_SUCH_KNOB", "1")
    with pytest.raises(ValidationError):
        GatewaySettings()


def test_tokens_from_every_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text("carol: carol-token-0123456789\nalice: overridden-by-env-0000\n")
    monkeypatch.setenv("BLUEGREEN_ADMIN_TOKENS", "alice:alice-token-0123456789, bob:bob:token-with-colon")
    monkeypatch.setenv("BLUEGREEN_ADMIN_TOKEN", "single-admin-token-000")
    s = GatewaySettings(admin_tokens_file=tokens_file)
    admin = frozenset({"admin"})  # the first form and the environment's tokens mean admin
    assert s.tokens() == {"carol-token-0123456789": Principal("carol", admin),
                          "alice-token-0123456789": Principal("alice", admin),
                          "bob:token-with-colon": Principal("bob", admin),
                          "single-admin-token-000": Principal("admin", admin)}


def test_tokens_file_with_roles(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text('alice: {token: "alice-token-0123456789", roles: [admin]}\n'
                    'ci: {token: "ci-token-0123456789ab", roles: [operator]}\n'
                    'sec-lead: {token: "sec-token-0123456789abc", roles: [viewer, "approve:security"]}\n')
    tokens = GatewaySettings(admin_tokens_file=path).tokens()
    assert tokens["ci-token-0123456789ab"] == Principal("ci", frozenset({"operator"}))
    assert tokens["sec-token-0123456789abc"] == Principal("sec-lead", frozenset({"viewer", "approve:security"}))


@pytest.mark.parametrize("entry", ['{token: "a-secret-token-0123456789", roles: [root]}',
                                   '{token: "a-secret-token-0123456789", roles: []}',
                                   '{token: "a-secret-token-0123456789", roles: ["approve:Bad Gate"]}',
                                   '{token: "a-secret-token-0123456789", role: [admin]}'])
def test_a_bad_tokens_entry_names_it_without_echoing_the_token(tmp_path: Path, entry: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(f"ci: {entry}\n")
    with pytest.raises(ValueError, match="ci: ") as caught:
        GatewaySettings(admin_tokens_file=path).tokens()
    assert "a-secret-token" not in str(caught.value)


def test_no_tokens_configured() -> None:
    assert GatewaySettings().tokens() == {}


@pytest.mark.parametrize("tokens", ["alice", "alice:", ":alice-token-0123456789", "alice:a-token-0123456789,bob"])
def test_malformed_token_pairs_are_refused(tokens: str) -> None:
    with pytest.raises(ValueError, match="name:token"):
        GatewaySettings(admin_tokens=tokens).tokens()


@pytest.mark.parametrize("kwargs", [{"admin_token": "short"}, {"admin_tokens": "alice:fifteen-chars-x"}])
def test_short_tokens_are_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="shorter than 16"):
        GatewaySettings(**kwargs).tokens()  # type: ignore[arg-type]


def test_tokens_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text("- just-a-token-0123456789\n")
    with pytest.raises(ValueError, match="mapping"):
        GatewaySettings(admin_tokens_file=path).tokens()
