"""benchmarks.bench_serve end to end (smoke size): every arm runs and the report adds up.

It runs in its own process: the benchmark starts and stops a local Ray cluster of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.bench_serve import server_timing

STEPS = ["image", "back_translation", "phrases", "grounding", "divergence", "extract", "model"]


def test_server_timing_header_parses_to_milliseconds_per_step():
    assert server_timing("image;dur=0.50, phrases;dur=16.25,grounding;dur=3") == {
        "image": 0.5, "phrases": 16.25, "grounding": 3.0}
    assert server_timing("") == {} and server_timing("cache;desc=hit") == {}


def test_smoke_run_measures_every_arm(tmp_path, repo_root):
    output = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_serve", "--smoke-test", "--size", "tiny",
                          "--output", str(output)], cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    results = json.loads(output.read_text())
    for arm in ("in_process", "echo_one_hop", "echo_three_rounds", "served_unbatched", "served_batched"):
        row = results[f"{arm}_1_client"]
        assert row["n"] >= 5 and row["p50_ms"] > 0, arm
    for arm in ("served_16_clients_batched", "served_16_clients_unbatched", "in_process_batched_16"):
        assert results[arm]["n"] >= 16 and results[arm]["throughput_rps"] > 0, arm
        assert results[arm].get("num_errors", 0) == 0, results[arm]
    served = results["served_unbatched_1_client"]
    assert list(served["step_p50_ms"]) == STEPS  # the model deployment's steps reach the client
    r = results["ratios"]
    assert r["overhead_p50_ms"] == served["p50_ms"] - results["in_process_1_client"]["p50_ms"]
    assert r["overhead_vs_echo_floor_ratio"] == r["overhead_p50_ms"] / results["echo_one_hop_1_client"]["p50_ms"]
    assert r["overhead_vs_old_shape_ratio"] == r["overhead_p50_ms"] / results["echo_three_rounds_1_client"]["p50_ms"]
    assert r["served_vs_in_process_throughput_ratio"] > 0 and r["batching_throughput_ratio"] > 0
    # machine facts at start and end, printed beside every ratio
    for when in ("machine_before", "machine_after"):
        assert results[when]["cpus"] >= 1 and results[when]["torch_threads"] >= 1 and len(results[when]["load_avg"]) == 3
    assert run.stdout.count("cores, torch threads") >= 4 and "echo one-hop floor" in run.stdout

