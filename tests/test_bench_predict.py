"""benchmarks.bench_predict end to end (smoke size): both arms run on the same rows and agree.

It runs in its own process: the benchmark starts and stops a local Ray cluster of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_smoke_run_times_both_arms_with_the_same_predictions(tmp_path, repo_root):
    output = tmp_path / "predict.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_predict", "--smoke-test", "--output", str(output)],
                         cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["same_predictions"] is True and report["rows"] == 8
    assert report["plain_loop"]["rows"] == report["predict"]["rows"] == 8
    assert report["throughput_ratio"] > 0 and report["machine_before"]["cpus"] >= 1
    assert "throughput predict / loop" in run.stdout
