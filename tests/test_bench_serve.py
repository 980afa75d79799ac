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
    assert server_timing("image;dur=0.50, features;dur=16.25,grounding;dur=3") == {
        "image": 0.5, "features": 16.25, "grounding": 3.0}
    assert server_timing("") == {} and server_timing("cache;desc=hit") == {}


def test_smoke_run_measures_every_arm(tmp_path, repo_root):
    output = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_serve", "--smoke-test", "--output", str(output)],
                         cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    results = json.loads(output.read_text())
    for arm in ("in_process", "healthz_1_client", "echo_graph_1_client", "served_1_client_unbatched",
                "served_1_client_batched", "served_16_clients_batched", "served_16_clients_unbatched"):
        assert results[arm]["n"] >= 4 and results[arm]["p50_ms"] > 0, arm
    served = results["served_1_client_unbatched"]
    assert served["num_errors"] == 0 and list(served["step_p50_ms"]) == STEPS
    # the steps timed inside the model deployment happen inside the model call the ingress timed
    inside = sum(ms for name, ms in served["step_p50_ms"].items() if name not in ("image", "model"))
    assert inside <= served["step_p50_ms"]["model"] < served["p95_ms"]
    assert results["overhead_p50_ms"] == served["p50_ms"] - results["in_process"]["p50_ms"]
    assert results["batching_throughput_ratio"] > 0
    assert "an echo graph of the same shape costs" in run.stdout
