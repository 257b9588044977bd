"""The docs stay true: every setting the code accepts is documented, and the README's test command is CI's."""

from __future__ import annotations

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
