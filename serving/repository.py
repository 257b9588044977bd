"""The model repository on disk, laid out as Triton's: ``<root>/<name>/<version>/model.onnx``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_REPOSITORY", "ModelRef", "Repository"]

#: Where ``bluegreen build-models`` writes the bundled models and every command looks by default. Defined here,
#: in the lowest layer, so that the model server needs nothing from ``models`` (tests/test_layers.py).
DEFAULT_REPOSITORY = Path(__file__).resolve().parent.parent / "models" / "repository"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """``NAME`` or ``NAME:VERSION`` as given on the command line; no version means the newest."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        name, _, version = text.partition(":")
        if not name or (":" in text and not version):
            raise ValueError(f"expected NAME or NAME:VERSION, got {text!r}")
        return cls(name, version or None)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name


class Repository:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if p.is_dir() and (p / "model.onnx").is_file()]
        return sorted(found, key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v))

    def resolve(self, ref: ModelRef) -> tuple[str, str, Path]:
        """(name, version, folder) of a model reference; FileNotFoundError names what is missing."""
        versions = self.versions(ref.name)
        if not versions:
            raise FileNotFoundError(f"model {ref.name!r} not found in {self.root} (run: bluegreen build-models)")
        version = ref.version or versions[-1]
        if version not in versions:
            raise FileNotFoundError(f"model {ref.name!r} has no version {version!r} in {self.root} "
                                    f"(versions: {', '.join(versions)})")
        return ref.name, version, self.root / ref.name / version

    @staticmethod
    def metadata(folder: Path) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads((folder / "metadata.json").read_text())
            return meta
        except (OSError, ValueError):
            return {}
