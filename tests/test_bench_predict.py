"""benchmarks.bench_predict end to end (smoke size): both arms run on the same rows and agree.

It runs in this process on the session's local Ray cluster (the benchmark starts its own only when
none is connected).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("ray_local")


def test_smoke_run_times_both_arms_with_the_same_predictions(tmp_path, repo_root, capsys, monkeypatch):
    from benchmarks import bench_predict

    monkeypatch.chdir(repo_root)
    output = tmp_path / "predict.json"
    assert bench_predict.main(["--smoke-test", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert report["same_predictions"] is True and report["rows"] == 8
    assert report["plain_loop"]["rows"] == report["predict"]["rows"] == 8
    assert report["throughput_ratio"] > 0 and report["machine_before"]["cpus"] >= 1
    assert "throughput predict / loop" in capsys.readouterr().out
