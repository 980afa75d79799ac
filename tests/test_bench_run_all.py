"""make bench's runner (size flag, the ratio table) and the GPU check's refusal on a machine without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import run_all


def test_size_defaults_to_paper_and_to_tiny_for_smoke_runs():
    assert run_all.split_args([]) == ("paper", ["--size", "paper"])
    assert run_all.split_args(["--smoke-test"]) == ("tiny", ["--size", "tiny", "--smoke-test"])
    assert run_all.split_args(["--size", "tiny", "--device", "cuda"]) == ("tiny", ["--size", "tiny", "--device", "cuda"])
    with pytest.raises(SystemExit):
        run_all.split_args(["--size", "huge"])


def test_every_benchmark_takes_the_size_flag():
    from benchmarks import bench_back_translation, bench_predict, bench_train

    for module in (bench_train, bench_back_translation, bench_predict):
        assert module.parse_args(["--size", "tiny"]).size == "tiny", module.__name__
    assert bench_back_translation.parse_args([]).height == 128  # paper: SD's UNet at 128 px
    assert bench_back_translation.parse_args(["--smoke-test"]).size == "tiny"


def test_table_lists_each_reports_ratios_goals_and_load(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps({
        "ratio_ray1_vs_plain_train": 1.02, "goal_ratio_max": 1.05, "ray_2_workers": None,
        "machine_before": {"load_avg": [1.5, 1, 1]}, "machine_after": {"load_avg": [2.25, 1, 1]}}))
    (tmp_path / "back_translation.json").write_text(json.dumps({
        "throughput_ratio_job_vs_plain": 0.97, "goals": {"throughput_ratio_min": 0.95}, "smoke_test": False}))
    lines = run_all.table(tmp_path).splitlines()
    assert lines[2] == "| back_translation | throughput_ratio_job_vs_plain | 0.970 | throughput_ratio_min 0.95 |  |"
    assert lines[3] == "| train | ratio_ray1_vs_plain_train | 1.020 | goal_ratio_max 1.05 | 1.50 -> 2.25 |"
    assert len(lines) == 4


def test_gpu_check_stops_at_once_without_cuda(tmp_path, repo_root):
    import torch

    # no CUDA device visible, so the refusal is checked on a GPU machine too
    env = {**os.environ, "PY": sys.executable, "OUT_DIR": str(tmp_path / "gpu"), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=repo_root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 3, run.stdout + run.stderr
    assert "no CUDA GPU here" in run.stderr and "Nothing was run" in run.stderr and torch.__version__ in run.stderr
    assert run.stdout == "" and not (tmp_path / "gpu").exists()
