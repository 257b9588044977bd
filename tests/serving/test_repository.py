"""serving/repository.py: model references and version resolution in a Triton-style folder tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.repository import ModelRef, Repository


@pytest.mark.parametrize(("text", "ref"), [
    ("digits", ModelRef("digits")),
    ("digits:2", ModelRef("digits", "2")),
])
def test_model_ref_parses_and_prints_back(text: str, ref: ModelRef) -> None:
    assert ModelRef.parse(text) == ref
    assert str(ref) == text


@pytest.mark.parametrize("text", ["", ":2", "digits:"])
def test_model_ref_refuses_empty_parts(text: str) -> None:
    with pytest.raises(ValueError, match="expected NAME or NAME:VERSION"):
        ModelRef.parse(text)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    for version in ("1", "2", "10"):
        (tmp_path / "m" / version).mkdir(parents=True)
        (tmp_path / "m" / version / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "m" / "3").mkdir()  # no model.onnx: not a version
    (tmp_path / "m" / "2" / "metadata.json").write_text('{"accuracy": 0.9}')
    return Repository(tmp_path)


def test_versions_sort_numerically_and_need_a_model_file(repo: Repository) -> None:
    assert repo.versions("m") == ["1", "2", "10"]
    assert repo.versions("missing") == []


def test_resolve_takes_the_newest_version_by_default(repo: Repository) -> None:
    assert repo.resolve(ModelRef("m")) == ("m", "10", repo.root / "m" / "10")
    assert repo.resolve(ModelRef("m", "2")) == ("m", "2", repo.root / "m" / "2")


def test_resolve_names_what_is_missing(repo: Repository) -> None:
    with pytest.raises(FileNotFoundError, match=r"model 'nope' not found .*bluegreen build-models"):
        repo.resolve(ModelRef("nope"))
    with pytest.raises(FileNotFoundError, match=r"model 'm' has no version '3' .*\(versions: 1, 2, 10\)"):
        repo.resolve(ModelRef("m", "3"))


def test_metadata_is_empty_when_absent_or_unreadable(repo: Repository) -> None:
    assert Repository.metadata(repo.root / "m" / "2") == {"accuracy": 0.9}
    assert Repository.metadata(repo.root / "m" / "1") == {}
    (repo.root / "m" / "1" / "metadata.json").write_text("{broken")
    assert Repository.metadata(repo.root / "m" / "1") == {}


def test_the_bundled_repository_resolves_digits(model_repo: Path) -> None:
    repo = Repository(Path(model_repo))
    assert repo.versions("digits") == ["1", "2", "3"]
    assert repo.resolve(ModelRef.parse("digits"))[1] == "3"
    assert Repository.metadata(repo.root / "digits" / "2")["inputs"][0]["name"] == "input"
