"""pyproject.toml: current metadata forms, so an install prints no setuptools deprecation warning."""

import shutil
import warnings
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

REPO = Path(__file__).resolve().parents[1]


def apply_pyproject(folder: Path) -> Distribution:
    """What setuptools does with the file at install time, with every warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return apply_configuration(Distribution(), str(folder / "pyproject.toml"))


def test_license_is_an_spdx_expression_with_its_file(monkeypatch):
    monkeypatch.chdir(REPO)  # license-files are globs relative to the project folder
    dist = apply_pyproject(REPO)
    assert dist.metadata.license_expression == "Apache-2.0"
    assert dist.metadata.license_files == ["LICENSE"]
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_the_deprecated_license_table_would_be_caught(tmp_path, monkeypatch):
    # The check above can fail: the form PEP 639 deprecated raises under the same settings.
    text = (REPO / "pyproject.toml").read_text()
    old = text.replace('license = "Apache-2.0"', 'license = {text = "Apache-2.0"}').replace(
        'license-files = ["LICENSE"]\n', ""
    )
    assert old != text
    (tmp_path / "pyproject.toml").write_text(old)
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Warning, match="license"):
        apply_pyproject(tmp_path)
