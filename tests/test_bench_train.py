"""benchmarks.bench_train: the arms share their step count; the smoke run goes through every code path.

The smoke run uses Ray Train's local mode on the session's Ray cluster (a worker group costs
~30 s here); ``make bench`` times real workers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks import bench_train


def test_size_picks_the_defaults():
    paper = bench_train.parse_args([])
    assert (paper.size, paper.batch_size, paper.num_heads, paper.two_workers) == ("paper", 4, 8, False)
    smoke = bench_train.parse_args(["--smoke-test"])
    assert (smoke.size, smoke.batch_size, smoke.two_workers) == ("tiny", 16, True)
    mine = bench_train.parse_args(["--size", "tiny", "--batch-size", "3", "--no-two-workers"])
    assert (mine.batch_size, mine.two_workers) == (3, False)


def test_plain_batches_stop_after_the_steps_or_the_seconds():
    chunks = bench_train.cycle([{"id": 1}, {"id": 2}, {"id": 3}], 2)
    batches = list(bench_train.plain_batches(chunks, len, steps=3, seconds=None))
    assert batches == [{"batch": 2}] * 4  # the warm-up, then 3 timed steps
    slow = bench_train.plain_batches(bench_train.cycle([{}], 1), lambda rows: time.sleep(0.05) or 1, None, 0.12)
    assert 2 <= len(list(slow)) <= 5  # the clock starts after the warm-up batch


def test_rows_carry_every_column_the_extractor_reads(tmp_path):
    rows = bench_train.write_rows(str(tmp_path), 3)
    for row in rows:
        assert len(row["tokens"]) == len(row["tags"]) and len(row["regions"]) == 3
        assert Path(row["image_uri"]).is_file() and Path(row["back_translation_uri"]).is_file()
        assert abs(sum(row["divergence"]) - 1) < 1e-6


@pytest.mark.usefixtures("ray_local")
def test_smoke_run_times_both_arms_on_the_same_steps(tmp_path, repo_root, tiny_models, capsys, monkeypatch):
    monkeypatch.chdir(repo_root)
    output = tmp_path / "train.json"
    models_dir = str(Path(tiny_models["text_encoder"]).parent)
    argv = ["--smoke-test", "--local-mode", "--rows", "4", "--batch-size", "2", "--models-dir", models_dir,
            "--output", str(output)]
    assert bench_train.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["size"] == "tiny" and report["text_encoder"] == tiny_models["text_encoder"]
    assert report["plain"]["steps"] == report["ray_1_worker"]["steps"] == report["steps"] == 3
    assert report["ray_1_worker"]["local_mode"] is True and report["ray_2_workers"] is None
    assert report["ratio_ray1_vs_plain_train"] > 0 and report["machine_before"]["cpus"] >= 1
    out = capsys.readouterr().out
    assert "ratio Ray-1 / plain" in out and "load" in out and "cores" in out
