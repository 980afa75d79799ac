"""benchmarks.bench_back_translation end to end (smoke size): every arm runs on one row and the
cached rerun generates nothing. It runs in this process on the session's local Ray cluster."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("ray_local")


def test_smoke_run_times_every_arm(tmp_path, repo_root, tiny_models, capsys, monkeypatch):
    from pathlib import Path

    from benchmarks import bench_back_translation

    monkeypatch.chdir(repo_root)
    output = tmp_path / "bt.json"
    argv = ["--smoke-test", "--steps", "1", "--models-dir", str(Path(tiny_models["text_to_image"]).parent),
            "--output", str(output)]
    assert bench_back_translation.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["size"] == "tiny" and report["model"] == tiny_models["text_to_image"] and report["rows"] == 1
    assert report["job"]["summary"]["generated"] == 1 and report["cached_rerun"]["summary"]["cached"] == 1
    assert report["throughput_ratio_job_vs_plain"] > 0 and report["goals"]["throughput_ratio_min"] == 0.90
    assert report["machine_before"]["cpus"] >= 1 and len(report["machine_after"]["load_avg"]) == 3
    out = capsys.readouterr().out
    assert "Ray Data job" in out and "cores" in out and "load" in out
