"""The docs stay true: every setting the code accepts is documented, and the README's test command is CI's."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pydantic import BaseModel

from gateway.settings import GatewaySettings
from serving.settings import ServingSettings

ROOT = Path(__file__).resolve().parent.parent


def env_names(model: type[BaseModel], prefix: str) -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += env_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.append(f"{prefix}{name.upper()}")
    return names


def test_every_setting_is_in_the_configuration_reference() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    names = env_names(GatewaySettings, "BLUEGREEN_") + env_names(ServingSettings, "BLUEGREEN_SERVING_")
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"undocumented settings: {missing}"


def test_readme_quick_start_is_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("\n", 1)[1].strip() for b in quick.split("```")[1::2]]
    assert len(blocks) == 2 and all("\n" not in b for b in blocks), blocks
    run, test = blocks
    assert run.endswith("bluegreen up")
    assert test in (ROOT / ".ci" / "run").read_text()


PACKAGES = ("gateway", "serving", "models", "loadtests")
MODULE_PATH = re.compile(r"`((?:" + "|".join(PACKAGES) + r")/[\w/]*?(?:\.py|/))`")


def architecture_paths() -> set[str]:
    """Every module path (``gateway/app.py``) or package (``loadtests/bench/``) docs/architecture.md names."""
    return set(MODULE_PATH.findall((ROOT / "docs" / "architecture.md").read_text()))


def code_modules() -> list[str]:
    """Every Python module of the four packages, package ``__init__``s aside (they are named as their folder)."""
    return sorted(str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*.py")
                  if "__pycache__" not in p.parts and p.name != "__init__.py")


def test_every_module_the_architecture_names_exists() -> None:
    named = architecture_paths()
    assert len(named) > 20, named  # the tables are still there and still use whole paths
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_is_named_in_the_architecture() -> None:
    """A module counts as named when its own path is, or a package folder above it is (``loadtests/bench/``)."""
    named = architecture_paths()
    unnamed = [m for m in code_modules()
               if m not in named and not any(m.startswith(p) for p in named if p.endswith("/"))]
    assert not unnamed, f"modules missing from docs/architecture.md's module tables: {unnamed}"


def test_no_file_cites_a_document_outside_the_repository() -> None:
    """The design notes the project started from are not in the repository, so nothing may send a reader there."""
    outside = "DESIGN" + ".md"  # spelled apart so that this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    citing = [f for f in tracked if (ROOT / f).is_file() and outside in (ROOT / f).read_text(errors="replace")]
    assert not citing, f"files citing {outside}: {citing}"
