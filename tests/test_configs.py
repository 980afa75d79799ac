"""Every YAML under configs/ is validated against what reads it: a job's Config or Ray Serve's schema.

A file ``X[.variant].yaml`` belongs to ``jobs/X.py`` (or ``jobs/run_X.py``: ``pipeline.tiny.yaml``
is read by ``jobs.run_pipeline``); ``serve*.yaml`` is a Ray Serve config. Any other YAML fails,
so nothing under configs/ goes unvalidated.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from jobs._config import load_config_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
JOBS = REPO / "jobs"


def job_module_for(path: Path, jobs_dir: Path = JOBS) -> str | None:
    """The job module that reads a config file, or None when no job matches its name."""
    stem = path.name.split(".")[0]
    for name in (stem, f"run_{stem}"):
        if (jobs_dir / f"{name}.py").is_file():
            return f"jobs.{name}"
    return None


def is_serve_config(path: Path) -> bool:
    return path.name.startswith("serve")


JOB_NAMES = sorted(p.stem for p in JOBS.glob("*.py") if not p.name.startswith("_"))


CONFIG_FILES = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))


def test_configs_folder_is_not_empty():
    assert (CONFIGS / "prepare_dataset.yaml") in CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_file_is_valid(path):
    if is_serve_config(path):
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        return
    module_name = job_module_for(path)
    assert module_name is not None, (
        f"{path.relative_to(REPO)}: no job reads it (expected jobs/{path.name.split('.')[0]}.py or "
        f"jobs/run_{path.name.split('.')[0]}.py, or a serve*.yaml Serve config)"
    )
    module = importlib.import_module(module_name)
    assert hasattr(module, "Config"), f"{module_name} has no Config dataclass to validate {path.name} with"
    load_config_file(module.Config, path)


@pytest.mark.parametrize("name", JOB_NAMES)
def test_every_job_has_a_config_and_a_tiny_config(name):
    # Imported here, not at collection, so one broken job module fails one test, not the file.
    if not hasattr(importlib.import_module(f"jobs.{name}"), "Config"):
        return  # a helper script with no config needs no YAML
    stems = [name] + ([name.removeprefix("run_")] if name.startswith("run_") else [])  # run_pipeline: pipeline.yaml
    for suffix in (".yaml", ".tiny.yaml"):
        assert any((CONFIGS / f"{stem}{suffix}").is_file() for stem in stems), (
            f"configs/{name}{suffix} is missing for jobs/{name}.py")


def test_matching_rules(tmp_path):
    (tmp_path / "prepare_dataset.py").touch()
    (tmp_path / "run_pipeline.py").touch()
    assert job_module_for(Path("prepare_dataset.tiny.yaml"), tmp_path) == "jobs.prepare_dataset"
    assert job_module_for(Path("paper/prepare_dataset.mnre.yaml"), tmp_path) == "jobs.prepare_dataset"
    assert job_module_for(Path("pipeline.tiny.yaml"), tmp_path) == "jobs.run_pipeline"
    assert job_module_for(Path("orphan.yaml"), tmp_path) is None
    assert is_serve_config(Path("serve.tiny.yaml")) and not is_serve_config(Path("pipeline.yaml"))
