"""The Kubernetes manifests (k8s/): every kustomization renders with ``kubectl kustomize``, every object is valid
against the Kubernetes 1.28 and latest schemas (offline, kubernetes-validate), and the manifests agree with the
code they deploy — probe paths answer on the real apps, ports and environment variables are the settings'
(names derived from the pydantic models), the routing ConfigMap is a valid routing file whose backends are the
colors' headless Services, the colors' Deployments serve the versions it names, the init containers produce
what the main containers read, Redis starts with the rendered configuration, and the network policies admit
exactly the paths the design names.

Prometheus rules and the dashboard are in test_monitoring.py; the Dockerfiles in test_images.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jsonschema
import kubernetes_validate
import orjson
import pytest
import yaml
from pydantic import BaseModel

from gateway.app import Gateway
from gateway.cli import build_parser
from gateway.release import validation_report
from gateway.settings import COLORS, GatewaySettings, RoutingFile
from models.build import build_all
from serving.app import ModelServer, create_app
from serving.settings import ServingSettings
from tests.k8s.support import (
    BASE,
    OVERLAYS,
    TARGETS,
    Obj,
    all_containers,
    container,
    env,
    init_container,
    named,
    of_kind,
    pod_spec,
    port,
    probe_port,
    render,
    secret_data,
    selects,
    services_of,
    volume_of_mount,
    workloads,
)
from tests.procs import Proc, free_port, wait_until

K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
GATEWAY, BLUE, GREEN, REDIS = "bluegreen-gateway", "bluegreen-model-blue", "bluegreen-model-green", "bluegreen-redis"
MODEL_SERVERS = {"blue": BLUE, "green": GREEN}
PROJECT_IMAGES = ("bluegreen", "bluegreen-model-server", "registry.example.com/bluegreen/")


# ------------------------------------------------------------------------------------------ schemas

# The Prometheus Operator's CRDs are not in the Kubernetes schemas: their structure is checked against these
# schemas instead, which follow monitoring.coreos.com/v1 for the fields the manifests use and refuse any other.
_DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h|d|w|y))+$"}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"},
                                                                 "labels": {"type": "object"}}}
SERVICE_MONITOR = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"}, "metadata": _META,
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"], "properties": {
            "selector": {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
                         "properties": {"matchLabels": {"type": "object",
                                                        "additionalProperties": {"type": "string"}}}},
            "namespaceSelector": {"type": "object"},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port", "path"], "properties": {
                    "port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                    "interval": _DURATION, "scrapeTimeout": _DURATION, "scheme": {"enum": ["http", "https"]},
                    "tlsConfig": {"type": "object", "additionalProperties": False, "properties": {
                        "ca": {"type": "object", "additionalProperties": False, "properties": {
                            "secret": {"type": "object", "additionalProperties": False, "required": ["name", "key"],
                                       "properties": {"name": {"type": "string"}, "key": {"type": "string"}}}}},
                        "serverName": {"type": "string"}}},
                    "relabelings": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["sourceLabels", "targetLabel"],
                        "properties": {"sourceLabels": {"type": "array", "items": {"type": "string"}},
                                       "targetLabel": {"type": "string"}}}}}}}}}}}
_RULE = {"type": "object", "additionalProperties": False, "required": ["expr"],
         "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
         "properties": {"record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                        "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                        "expr": {"type": "string", "minLength": 1}, "for": _DURATION,
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
PROMETHEUS_RULE = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"}, "metadata": _META,
        "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "rules"], "properties": {
                    "name": {"type": "string"}, "interval": _DURATION,
                    "rules": {"type": "array", "minItems": 1, "items": _RULE}}}}}}}}
CRD_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_every_object_is_valid_against_the_kubernetes_schemas(target: str, version: str) -> None:
    objs = render(target)
    assert objs, f"k8s/{target} rendered nothing"
    checked = set()
    for obj in objs:
        where = f"{obj['kind']} {obj['metadata']['name']} in k8s/{target}"
        if obj["kind"] in CRD_SCHEMAS:
            # Not a Kubernetes kind: kubernetes-validate has no schema for it (SchemaNotFoundError); its own
            # schema above checks it instead.
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(obj, version, strict=True)
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
        else:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")
        checked.add(obj["kind"])
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "NetworkPolicy", *CRD_SCHEMAS} <= checked


def test_the_validators_refuse_what_is_wrong() -> None:
    """The schema checks above are not vacuous: a misspelled field, a wrong type and a ServiceMonitor without
    endpoints are refused."""
    deployment = next(o for o in render(BASE) if o["kind"] == "Deployment")
    misspelled = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelled, "1.28.0", strict=True)
    wrong_type = {**deployment, "spec": {**deployment["spec"], "replicas": "three"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, "1.28.0", strict=True)
    monitor = of_kind(render(BASE), "ServiceMonitor")[0]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**monitor, "spec": {"selector": monitor["spec"]["selector"]}}, SERVICE_MONITOR)


def test_the_overlays_hold_what_the_issue_lists() -> None:
    for target in OVERLAYS:
        objs = render(target)
        names = {(o["kind"], o["metadata"]["name"]) for o in objs}
        for expected in [("Deployment", GATEWAY), ("Deployment", BLUE), ("Deployment", GREEN),
                         ("StatefulSet", REDIS), ("Service", GATEWAY), ("Service", "bluegreen-gateway-admin"),
                         ("Service", BLUE), ("Service", GREEN), ("Service", REDIS),
                         ("ServiceMonitor", "bluegreen-gateway"), ("ServiceMonitor", "bluegreen-model-server"),
                         ("PrometheusRule", "bluegreen"), ("ConfigMap", "bluegreen-dashboard")]:
            assert expected in names, f"{expected} missing from k8s/{target}"
        namespaces = of_kind(objs, "Namespace")
        assert len(namespaces) == 1
        assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == \
            {namespaces[0]["metadata"]["name"]}


# ------------------------------------------------------------------------------------------ pods


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_non_root_read_only_with_requests_and_limits(target: str) -> None:
    for w in workloads(render(target)):
        spec, name = pod_spec(w), w["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] != 0, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        # Service links would put <SERVICE>_PORT=tcp://... variables, BLUEGREEN_-prefixed ones among them, into
        # the environment the settings are read from.
        assert spec["enableServiceLinks"] is False, name
        for c in all_containers(w):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, c["name"], kind)
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: untagged {image}"


@pytest.mark.parametrize("target", TARGETS)
def test_project_containers_run_bluegreen_subcommands_the_cli_accepts(target: str) -> None:
    """The images' ENTRYPOINT is ``bluegreen`` (test_images.py): containers of the project's images pass only
    arguments, and those parse with the real command-line parser."""
    parser = build_parser()
    seen = set()
    for w in workloads(render(target)):
        for c in all_containers(w):
            if not c["image"].startswith(PROJECT_IMAGES) or "command" in c:
                continue
            args = parser.parse_args(c["args"])
            seen.add(args.command)
    assert seen == {"gateway", "serve-model", "build-models"}


def test_gateway_probes_and_ports_match_the_code(tmp_path: Path) -> None:
    for target in TARGETS:
        objs = render(target)
        gw = named(objs, "Deployment", GATEWAY)
        c = container(gw, "gateway")
        settings = gateway_settings(c, objs)
        assert port(c, "http") == settings.data.port
        assert port(c, "admin") == settings.admin.port
        assert settings.data.host == settings.admin.host == "0.0.0.0"
        for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
            assert c[probe]["httpGet"]["path"] == path
            assert probe_port(c, c[probe]) == settings.data.port, f"{probe} must be on the data port"
    # ... and those paths answer 200 on the real apps, /metrics too (the ServiceMonitor's path).
    routing = tmp_path / "routing.yaml"
    routing.write_text(named(render(BASE), "ConfigMap", "bluegreen-routing")["data"]["routing.yaml"])
    gateway = Gateway.from_settings(GatewaySettings(config=routing, telemetry=True))

    async def check() -> None:
        for app, path in ((gateway.data_app(), "/v2/health/ready"), (gateway.data_app(), "/v2/health/live"),
                          (gateway.admin_app(), "/metrics")):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
                assert (await client.get(path)).status_code == 200, path

    asyncio.run(check())


def test_model_server_probes_and_ports_match_the_code(tmp_path: Path) -> None:
    for target in TARGETS:
        objs = render(target)
        for color, name in MODEL_SERVERS.items():
            w = named(objs, "Deployment", name)
            c = container(w, "model-server")
            settings = serving_settings(c, objs)
            assert settings.host == "0.0.0.0"
            assert port(c, "http") == settings.port
            assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
            assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
            assert probe_port(c, c["readinessProbe"]) == probe_port(c, c["livenessProbe"]) == settings.port
            (svc,) = services_of(objs, w)
            assert svc["metadata"]["name"] == name and svc["spec"]["clusterIP"] == "None", \
                f"{color} needs a headless Service of its own for pod discovery"
            assert svc["spec"]["ports"][0]["targetPort"] == "http"
    # Live answers at once, ready after the models are loaded; /metrics is the ServiceMonitor's path.
    build_all(tmp_path, only={"digits:1"})
    core = ModelServer(ServingSettings(repo=tmp_path, models=["digits:1"], warmup_runs=1))
    app = create_app(core.settings, core)

    async def check() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ms") as client:
            assert (await client.get("/v2/health/live")).status_code == 200
            assert (await client.get("/v2/health/ready")).status_code == 503
            await core.load_all()
            try:
                assert (await client.get("/v2/health/ready")).status_code == 200
                assert (await client.get("/metrics")).status_code == 200
            finally:
                await core.unload_all()

    asyncio.run(check())


def env_names(model: type[BaseModel], prefix: str) -> set[str]:
    """Every environment variable the settings model reads (nested models with ``__``)."""
    names = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= env_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


@pytest.mark.parametrize("target", TARGETS)
def test_every_bluegreen_variable_the_manifests_set_is_a_setting(target: str) -> None:
    gateway_names = env_names(GatewaySettings, "BLUEGREEN_")
    serving_names = env_names(ServingSettings, "BLUEGREEN_SERVING_")
    assert "BLUEGREEN_DATA__HOST" in gateway_names and "BLUEGREEN_SERVING_DEVICE" in serving_names
    used = 0
    for w in workloads(render(target)):
        for c in all_containers(w):
            names = [e["name"] for e in c.get("env", [])]
            assert len(names) == len(set(names)), f"{c['name']}: a variable set twice: {names}"
            allowed = serving_names if c["name"] == "model-server" else gateway_names
            for n in names:
                if n.startswith("BLUEGREEN_"):
                    used += 1
                    assert n in allowed, f"{w['metadata']['name']}/{c['name']} sets {n}, which no setting reads"
    assert used >= 10


def gateway_settings(c: Obj, objs: tuple[Obj, ...]) -> GatewaySettings:
    """The settings the gateway container would build from its environment."""
    values = env(c, objs) if of_kind(objs, "Secret") else env_without_secrets(c)
    return settings_from_env(GatewaySettings, values)


def serving_settings(c: Obj, objs: tuple[Obj, ...]) -> ServingSettings:
    """The settings ``bluegreen serve-model`` would build: its environment, overridden by its flags."""
    args = build_parser().parse_args(c["args"])
    overrides = {k: v for k, v in {"repo": args.repo, "models": args.model, "host": args.host, "port": args.port,
                                   "device": args.device}.items() if v is not None}
    return settings_from_env(ServingSettings, env(c, objs), **overrides)


def env_without_secrets(c: Obj) -> dict[str, str]:
    """For renders without Secrets (base, prod: created outside git), Secret values are placeholders."""
    fake = {**c, "env": [e if "value" in e else {"name": e["name"], "value": "0123456789abcdef"}
                         for e in c.get("env", [])]}
    return env(fake, ())


def settings_from_env(model: type[Any], values: dict[str, str], **overrides: Any) -> Any:
    saved = {k: v for k, v in os.environ.items() if k.startswith("BLUEGREEN_")}
    try:
        for k in saved:
            del os.environ[k]
        os.environ.update(values)
        return model(**overrides)
    finally:
        for k in values:
            os.environ.pop(k, None)
        os.environ.update(saved)


@pytest.mark.parametrize("target", TARGETS)
def test_gateway_files_and_redis_come_from_the_volumes_and_services_the_manifests_define(target: str) -> None:
    objs = render(target)
    gw = named(objs, "Deployment", GATEWAY)
    c = container(gw, "gateway")
    settings = gateway_settings(c, objs)
    # The routing file is the routing ConfigMap's key, mounted read-only.
    assert settings.config is not None
    volume, key = volume_of_mount(gw, c, str(settings.config))
    assert named(objs, "ConfigMap", "bluegreen-routing")["metadata"]["name"] == volume["configMap"]["name"]
    assert key == "routing.yaml"
    # Admin tokens: a file from the bluegreen-admin-tokens Secret.
    assert settings.admin_tokens_file is not None and settings.admin_token is None and settings.admin_tokens is None
    volume, key = volume_of_mount(gw, c, str(settings.admin_tokens_file))
    assert volume["secret"]["secretName"].startswith("bluegreen-admin-tokens") and key == "tokens.yaml"
    # Redis: the StatefulSet's Service, on its port.
    assert settings.redis_url is not None
    url = urlsplit(settings.redis_url)
    redis_svc = named(objs, "Service", REDIS)
    assert url.scheme == "redis" and url.hostname == redis_svc["metadata"]["name"]
    assert url.port == redis_svc["spec"]["ports"][0]["port"]
    assert selects(redis_svc["spec"]["selector"], named(objs, "StatefulSet", REDIS)["spec"]["template"]["metadata"]
                   ["labels"])
    # Validation reports: the init container writes where BLUEGREEN_VALIDATION_REPO reads.
    init = init_container(gw, "validation-reports")
    assert settings.validation_repo is not None and init["command"][-1] == str(settings.validation_repo)
    volume, _ = volume_of_mount(gw, c, str(settings.validation_repo))
    init_volume, _ = volume_of_mount(gw, init, init["command"][-1])
    assert volume is init_volume and "emptyDir" in volume
    source, _ = volume_of_mount(gw, init, init["command"][-2])
    assert named(objs, "ConfigMap", "bluegreen-validation")["metadata"]["name"] == source["configMap"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_shutdown_drains_within_the_grace_period(target: str) -> None:
    """preStop sleep (endpoints drop the pod) + the process's graceful drain must fit in the grace period, or
    the kubelet kills requests the gateway meant to finish."""
    objs = render(target)
    cases = [(named(objs, "Deployment", GATEWAY), "gateway")] + \
        [(named(objs, "Deployment", n), "model-server") for n in MODEL_SERVERS.values()]
    for w, name in cases:
        c = container(w, name)
        cmd = c["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[0] == "sleep"
        sleep_s = float(cmd[1])
        drain_s = gateway_settings(c, objs).graceful_shutdown_s if name == "gateway" else \
            serving_settings(c, objs).graceful_shutdown_s
        grace = pod_spec(w)["terminationGracePeriodSeconds"]
        assert sleep_s >= 5, "too short for endpoints and load balancers to stop sending"
        assert grace >= sleep_s + drain_s + 5, f"{w['metadata']['name']}: {grace}s < {sleep_s}s + {drain_s}s + 5s"
    # The model servers' sleep outlasts the gateways' re-resolution of the headless Services.
    gw = gateway_settings(container(named(objs, "Deployment", GATEWAY), "gateway"), objs)
    blue = container(named(objs, "Deployment", BLUE), "model-server")
    assert float(blue["lifecycle"]["preStop"]["exec"]["command"][1]) >= 2 * gw.discovery_refresh_s


# ------------------------------------------------------------------------------------------ routing and colors


@pytest.mark.parametrize("target", TARGETS)
def test_routing_configmap_is_a_routing_file_whose_backends_are_the_colors_deployments(target: str) -> None:
    objs = render(target)
    routing = RoutingFile.model_validate(yaml.safe_load(named(objs, "ConfigMap", "bluegreen-routing")["data"]
                                                        ["routing.yaml"]))
    assert set(routing.models) == {"digits"}
    for model, route in routing.models.items():
        for color in COLORS:
            cfg = route.colors[color]
            (backend,) = cfg.backends
            parts = urlsplit(backend.removeprefix("dns+"))
            assert backend.startswith("dns+http://"), "backends use pod discovery"
            svc = named(objs, "Service", parts.hostname or "")
            assert svc["spec"]["clusterIP"] == "None"
            assert parts.port == svc["spec"]["ports"][0]["port"]
            w = named(objs, "Deployment", MODEL_SERVERS[color])
            assert selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
            assert w["spec"]["template"]["metadata"]["labels"]["bluegreen.io/color"] == color
            served = serving_settings(container(w, "model-server"), objs).models
            assert f"{model}:{cfg.version}" in served, f"{color} serves {served}, the routing file says {cfg.version}"


@pytest.mark.parametrize("target", TARGETS)
def test_model_servers_serve_what_their_init_container_built(target: str) -> None:
    objs = render(target)
    for name in MODEL_SERVERS.values():
        w = named(objs, "Deployment", name)
        c, init = container(w, "model-server"), init_container(w, "build-models")
        settings = serving_settings(c, objs)
        built = build_parser().parse_args(init["args"])
        assert built.command == "build-models" and set(built.only) == set(settings.models)
        assert init["image"] == c["image"]
        volume, rest = volume_of_mount(w, c, str(settings.repo))
        init_volume, init_rest = volume_of_mount(w, init, str(built.repo))
        assert volume is init_volume and rest == init_rest == "" and "emptyDir" in volume


@pytest.mark.parametrize("target", TARGETS)
def test_the_two_colors_differ_only_in_color_and_version(target: str) -> None:
    objs = render(target)
    blue, green = (yaml.safe_dump(named(objs, "Deployment", n), sort_keys=True) for n in (BLUE, GREEN))
    version = {c: serving_settings(container(named(objs, "Deployment", n), "model-server"), objs).models[0]
               for c, n in MODEL_SERVERS.items()}
    as_green = blue.replace("bluegreen", "\0").replace("blue", "green").replace("\0", "bluegreen") \
        .replace(version["blue"], version["green"])
    assert as_green == green
    services = [yaml.safe_dump(named(objs, "Service", n), sort_keys=True) for n in (BLUE, GREEN)]
    assert services[0].replace("bluegreen", "\0").replace("blue", "green").replace("\0", "bluegreen") == services[1]


def test_validation_init_container_lays_reports_out_for_the_gate(tmp_path: Path) -> None:
    """The init container's script, run here with sh, turns ConfigMap keys into the layout that
    ``gateway.admin.validation_report`` reads under BLUEGREEN_VALIDATION_REPO."""
    objs = render("overlays/dev")
    init = init_container(named(objs, "Deployment", GATEWAY), "validation-reports")
    cm = named(objs, "ConfigMap", "bluegreen-validation")
    src, dst = tmp_path / "reports", tmp_path / "repo"
    src.mkdir()
    dst.mkdir()
    for key, value in cm["data"].items():
        (src / key).write_text(value)
    (src / "digits--3.json").write_bytes(orjson.dumps({"model": "digits", "version": "3", "passed": True}))
    failed = {"passed": False, "checks": [{"check": "p95", "result": "FAIL"}]}
    (src / "digits--4.json").write_bytes(orjson.dumps(failed))
    script = init["command"]
    assert script[:2] == ["sh", "-c"]
    done = subprocess.run([*script[:4], str(src), str(dst)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert validation_report(dst, "digits", "3") is True
    assert "p95" in str(validation_report(dst, "digits", "4"))
    assert "no report" in str(validation_report(dst, "digits", "2"))
    assert sorted(p.name for p in dst.iterdir()) == ["digits"], "the README key must not become a model"


def test_an_overlay_adds_a_validation_report_and_the_gateway_rolls(tmp_path: Path) -> None:
    """The release step of docs/operations.md: a report added to the bluegreen-validation ConfigMap by an overlay
    (``behavior: merge``) becomes a key the init container lays out, under a new hashed name, so the gateway
    Deployment changes and its pods are replaced with the report in place."""
    from tests.k8s.support import K8S, kubectl

    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "digits--3.json").write_text('{"model": "digits", "version": "3", "passed": true}')
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "dev", tmp_path)],
        "configMapGenerator": [{"name": "bluegreen-validation", "behavior": "merge",
                                "files": ["validation/digits--3.json"]}]}))
    done = subprocess.run([kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    objs = tuple(d for d in yaml.safe_load_all(done.stdout) if d)
    before, after = named(render("overlays/dev"), "ConfigMap", "bluegreen-validation"), \
        named(objs, "ConfigMap", "bluegreen-validation")
    assert set(after["data"]) == {*before["data"], "digits--3.json"}
    assert after["metadata"]["name"] != before["metadata"]["name"]
    volumes = pod_spec(named(objs, "Deployment", GATEWAY))["volumes"]
    assert {"name": "validation-reports", "configMap": {"name": after["metadata"]["name"]}} in volumes


def test_dev_admin_tokens_load_as_named_tokens(tmp_path: Path) -> None:
    objs = render("overlays/dev")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(secret_data(objs, "bluegreen-admin-tokens")["tokens.yaml"])
    named_tokens = GatewaySettings(admin_tokens_file=tokens).tokens()
    assert [(p.name, p.role_list) for p in named_tokens.values()] == [("dev", ["admin"])]


@pytest.mark.parametrize("target", OVERLAYS)
def test_redis_starts_with_the_rendered_configuration(target: str, tmp_path: Path) -> None:
    """redis-server (Debian's, as the tests use) runs the ConfigMap's redis.conf and memory.conf with the
    StatefulSet's arguments: AOF on, volatile-lru, maxmemory below the container limit."""
    import redis

    objs = render(target)
    sts = named(objs, "StatefulSet", REDIS)
    c = container(sts, "redis")
    cm = named(objs, "ConfigMap", "bluegreen-redis-config")
    conf_dir, data = tmp_path / "etc", tmp_path / "data"
    conf_dir.mkdir()
    data.mkdir()
    mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "config")
    data_mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "data")
    for key, text in cm["data"].items():
        (conf_dir / key).write_text(text.replace(mount, str(conf_dir)).replace(f"dir {data_mount}", f"dir {data}"))
    password = "0123456789abcdef"
    args = [a.replace(mount, str(conf_dir)).replace("$(REDIS_PASSWORD)", password) for a in c["args"]]
    p = free_port()
    proc = Proc([*c["command"], *args, "--port", str(p), "--bind", "127.0.0.1"], tmp_path / "redis.log")
    try:
        client = redis.Redis(host="127.0.0.1", port=p, password=password, socket_timeout=2)

        def up() -> bool:
            if proc.popen.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{proc.log()}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(up, 10, what="redis-server")
        config = client.config_get("*")
        assert config["appendonly"] == "yes" and config["maxmemory-policy"] == "volatile-lru"
        assert Path(config["dir"]) == data
        limit = parse_quantity(c["resources"]["limits"]["memory"])
        assert 0 < int(config["maxmemory"]) <= 0.75 * limit, "leave room for the AOF rewrite and buffers"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=p, password="wrong-password", socket_timeout=2).ping()
        client.close()
    finally:
        proc.stop()


def parse_quantity(text: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert m, text
    return float(m.group(1)) * units.get(m.group(2), 1)


# ------------------------------------------------------------------------------------------ network policies


@dataclass(frozen=True)
class Peer:
    name: str
    namespace: str
    labels: dict[str, str]

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def _peer_matches(rule_peer: Obj, peer: Peer, policy_ns: str) -> bool:
    if "ipBlock" in rule_peer:
        return False
    ns_sel = rule_peer.get("namespaceSelector")
    if ns_sel is None and peer.namespace != policy_ns:
        return False
    if ns_sel is not None and not selects(ns_sel.get("matchLabels", {}), peer.namespace_labels):
        return False
    return selects(rule_peer.get("podSelector", {}).get("matchLabels", {}), peer.labels)


def _port_matches(rule: Obj, number: int) -> bool:
    return "ports" not in rule or any(p.get("port") == number for p in rule["ports"])


def admitted(policies: list[Obj], src: Peer, dst: Peer, number: int) -> bool:
    """Whether these NetworkPolicies let a TCP connection from ``src`` to ``dst`` on ``number`` through (the
    Kubernetes semantics, for the selector kinds the manifests use: matchLabels, no ipBlock)."""
    def side(direction: str, subject: Peer, other: Peer) -> bool:
        applying = [p for p in policies if p["metadata"]["namespace"] == subject.namespace
                    and direction in p["spec"]["policyTypes"]
                    and selects(p["spec"]["podSelector"].get("matchLabels", {}), subject.labels)]
        if not applying:
            return True  # not isolated in this direction
        key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for p in applying:
            for rule in p["spec"].get(key) or []:
                if not _port_matches(rule, number):
                    continue
                if peers not in rule or any(_peer_matches(r, other, p["metadata"]["namespace"]) for r in rule[peers]):
                    return True
        return False

    return side("Egress", src, dst) and side("Ingress", dst, src)


@pytest.mark.parametrize("target", OVERLAYS)
def test_network_policies_admit_exactly_the_designed_paths(target: str) -> None:
    objs = render(target)
    policies = of_kind(objs, "NetworkPolicy")
    ns = policies[0]["metadata"]["namespace"]

    def pod(name: str, kind: str = "Deployment") -> Peer:
        return Peer(name, ns, named(objs, kind, name)["spec"]["template"]["metadata"]["labels"])

    gateway, blue, green, redis = pod(GATEWAY), pod(BLUE), pod(GREEN), pod(REDIS, "StatefulSet")
    gw_c = container(named(objs, "Deployment", GATEWAY), "gateway")
    data, admin = port(gw_c, "http"), port(gw_c, "admin")
    model = port(container(named(objs, "Deployment", BLUE), "model-server"), "http")
    redis_port = port(container(named(objs, "StatefulSet", REDIS), "redis"), "redis")
    client = Peer("client app", "shop", {"app": "shop"})
    neighbour = Peer("other pod in the namespace", ns, {"app": "debug"})
    prometheus = Peer("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
    dns = Peer("cluster DNS", "kube-system", {"k8s-app": "kube-dns"})
    internet = Peer("elsewhere", "elsewhere", {})

    expected = [
        (client, gateway, data, True), (client, gateway, admin, False), (client, blue, model, False),
        (client, redis, redis_port, False), (neighbour, gateway, data, True), (neighbour, redis, redis_port, False),
        (neighbour, green, model, False),
        (prometheus, gateway, admin, True), (prometheus, blue, model, True), (prometheus, green, model, True),
        (prometheus, redis, redis_port, False),
        (gateway, blue, model, True), (gateway, green, model, True), (gateway, redis, redis_port, True),
        (gateway, dns, 53, True), (gateway, internet, 443, False),
        (blue, redis, redis_port, False), (blue, green, model, False), (blue, internet, 443, False),
        (redis, internet, 443, False), (redis, gateway, admin, False),
    ]
    wrong = [f"{s.name} -> {d.name}:{n} expected {'admitted' if want else 'refused'}"
             for s, d, n, want in expected if admitted(policies, s, d, n) != want]
    assert not wrong, f"paths admitted or refused against the design (expected shown): {wrong}"


# ------------------------------------------------------------------------------------------ overlays


def test_dev_is_small_single_replica_cpu_without_budgets_or_autoscaling() -> None:
    dev, base = render("overlays/dev"), render(BASE)
    assert not of_kind(dev, "PodDisruptionBudget") and not of_kind(dev, "HorizontalPodAutoscaler")
    for w in workloads(dev):
        assert w["spec"]["replicas"] == 1, w["metadata"]["name"]
        base_w = named(base, w["kind"], w["metadata"]["name"])
        for c in pod_spec(w)["containers"]:
            base_c = container(base_w, c["name"])
            assert parse_quantity(c["resources"]["limits"]["memory"]) < \
                parse_quantity(base_c["resources"]["limits"]["memory"]), (w["metadata"]["name"], c["name"])
    for name in MODEL_SERVERS.values():
        w = named(dev, "Deployment", name)
        assert serving_settings(container(w, "model-server"), dev).device == "cpu"
        assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in all_containers(w))
        # The CPU model server is the gateway's image.
        assert container(w, "model-server")["image"] == container(named(dev, "Deployment", GATEWAY),
                                                                  "gateway")["image"]


def test_prod_runs_gpu_model_servers_in_three_zones_with_autoscaling_and_budgets() -> None:
    prod = render("overlays/prod")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h for h in of_kind(prod, "HorizontalPodAutoscaler")}
    assert set(hpas) == {GATEWAY, BLUE, GREEN}
    assert hpas[GATEWAY]["spec"]["minReplicas"] >= 6 and hpas[GATEWAY]["spec"]["maxReplicas"] >= 24
    for name in (GATEWAY, BLUE, GREEN):
        spec = hpas[name]["spec"]
        assert spec["minReplicas"] % 3 == 0, "whole zones: a multiple of three"
        assert spec["minReplicas"] < spec["maxReplicas"]
        assert spec["metrics"][0]["resource"]["name"] == "cpu"
        w = named(prod, "Deployment", name)
        assert "replicas" not in w["spec"], f"{name}: the autoscaler owns the replica count"
        spread = pod_spec(w)["topologySpreadConstraints"]
        zone = [t for t in spread if t["topologyKey"] == "topology.kubernetes.io/zone"]
        assert len(zone) == 1 and zone[0]["whenUnsatisfiable"] == "DoNotSchedule"
        assert selects(zone[0]["labelSelector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
        keys = [t["topologyKey"] for t in pod_spec(w)["topologySpreadConstraints"]]
        assert len(keys) == len(set(keys)), f"{name}: two constraints on one topology key"
    # Both colors can carry all the traffic: the same range.
    assert {(hpas[n]["spec"]["minReplicas"], hpas[n]["spec"]["maxReplicas"]) for n in (BLUE, GREEN)} == \
        {(hpas[BLUE]["spec"]["minReplicas"], hpas[BLUE]["spec"]["maxReplicas"])}
    budgets = of_kind(prod, "PodDisruptionBudget")
    for name in (GATEWAY, BLUE, GREEN):
        labels = named(prod, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(matching) == 1 and matching[0]["spec"]["maxUnavailable"] == 1, name
    assert not [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"],
                                              named(prod, "StatefulSet", REDIS)["spec"]["template"]["metadata"]
                                              ["labels"])], "a budget on the single Redis would block every drain"
    for name in MODEL_SERVERS.values():
        w = named(prod, "Deployment", name)
        c = container(w, "model-server")
        assert serving_settings(c, prod).device == "cuda"
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
        assert pod_spec(w)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(w)["tolerations"]
        assert "model-server-cuda" in c["image"] and init_container(w, "build-models")["image"] == c["image"]
    gw = named(prod, "Deployment", GATEWAY)
    assert "nvidia.com/gpu" not in container(gw, "gateway")["resources"]["limits"]
    assert "nodeSelector" not in pod_spec(gw)
    # Secrets are created outside git in production.
    assert not of_kind(prod, "Secret")


def test_prod_serves_tls_13_on_both_gateway_listeners_from_a_secret() -> None:
    prod = render("overlays/prod")
    gw = named(prod, "Deployment", GATEWAY)
    c = container(gw, "gateway")
    settings = gateway_settings(c, prod)
    assert settings.tls.min_version == "1.3"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(gw)["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "bluegreen-gateway-tls" and mounts["tls"]["readOnly"]
    assert str(settings.tls.cert_file).startswith(mounts["tls"]["mountPath"] + "/")
    assert str(settings.tls.key_file).startswith(mounts["tls"]["mountPath"] + "/")
    assert c["readinessProbe"]["httpGet"]["scheme"] == c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    (monitor,) = [m for m in of_kind(prod, "ServiceMonitor") if m["metadata"]["name"] == "bluegreen-gateway"]
    assert monitor["spec"]["endpoints"][0]["scheme"] == "https"
    # Development stays on plain HTTP: no certificate to manage on a laptop.
    dev = render("overlays/dev")
    assert gateway_settings(container(named(dev, "Deployment", GATEWAY), "gateway"), dev).tls.cert_file is None
