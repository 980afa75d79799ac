"""MLflow tracking against a real ``mlflow server`` (sqlite backend, loopback) and the default sqlite file.

The server is a separate process started once per module; tests talk to it over HTTP exactly as
a cluster job would. The same calls are checked against ``sqlite:///mlflow.db`` in a temp working
directory (the default when neither config nor ``MLFLOW_TRACKING_URI`` names a server).
"""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from jobs import _tracking
from tmr_core.modeling import PretrainedModule


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a sqlite store and proxied artifacts; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@dataclass
class TinyConfig:
    width: int = 3


class TinyModel(PretrainedModule):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig):
        super().__init__(config)
        self.linear = torch.nn.Linear(config.width, 2)


@pytest.fixture(params=["server", "default_sqlite"])
def tracking_uri(request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if request.param == "server":
        return request.getfixturevalue("mlflow_server")
    uri = _tracking.resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri


def test_run_id_is_reused_for_the_same_run_folder(tracking_uri, tmp_path):
    params = {"optim": {"lr": 0.001}, "task": "ner"}
    first = _tracking.start_or_resume_run(tracking_uri, "tmr-test", "ner/x/full", params, {"k": "v"}, str(tmp_path / "a"))
    again = _tracking.start_or_resume_run(tracking_uri, "tmr-test", "ner/x/full", params, {}, str(tmp_path / "a"))
    other = _tracking.start_or_resume_run(tracking_uri, "tmr-test", "ner/x/full", params, {}, str(tmp_path / "b"))
    assert first == again != other
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=tracking_uri).get_run(first)
    assert run.data.params["optim.lr"] == "0.001" and run.data.tags["tmr.resumed"] == "true"
    _tracking.log_metrics(tracking_uri, first, {"valid_f1": 0.5, "note": "skipped"}, step=2)
    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(first, "valid_f1")
    assert [(m.step, m.value) for m in history] == [(2, 0.5)]


def test_registered_model_resolves_by_alias_and_loads_identically(tracking_uri, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyModel(TinyConfig())
    model.save_pretrained(str(tmp_path / "model"))
    run_id = _tracking.start_or_resume_run(tracking_uri, "tmr-test", "reg", {}, {}, str(tmp_path / "run"))
    name = f"tmr-test-{abs(hash(str(tmp_path))) % 10**6}"
    first = _tracking.register_model(tracking_uri, run_id, str(tmp_path / "model"), name, "champion")
    torch.manual_seed(1)
    better = TinyModel(TinyConfig())
    better.save_pretrained(str(tmp_path / "better"))
    second = _tracking.register_model(tracking_uri, run_id, str(tmp_path / "better"), name, "champion")
    assert (first, second) == ("1", "2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    local = _tracking.resolve_model_uri(f"models:/{name}@champion", str(tmp_path / "dl"))
    loaded = TinyModel.from_pretrained(local)
    assert torch.equal(loaded.linear.weight, better.linear.weight), "the alias follows the newest version"
    pinned = TinyModel.from_pretrained(_tracking.resolve_model_uri(f"models:/{name}/1", str(tmp_path / "dl1")))
    assert torch.equal(pinned.linear.weight, model.linear.weight)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        os.remove(tmp_path / "model" / "model.safetensors")
        _tracking.register_model(tracking_uri, run_id, str(tmp_path / "model"), name)


def _fake_extractor_run(client, experiment_id, task, ablation, f1, ambiguous, fraction=1.0, seed=0):
    run = client.create_run(experiment_id, tags={"tmr.task": task, "tmr.dataset": "synthetic", "tmr.ablation": ablation,
                                                 "tmr.train_fraction": str(fraction), "tmr.seed": str(seed)})
    client.log_metric(run.info.run_id, "test_f1", f1)
    client.log_metric(run.info.run_id, "test_ambiguous_f1", ambiguous)
    client.set_terminated(run.info.run_id)


def test_compare_runs_builds_tables_plots_and_logs_them(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from jobs import compare_runs

    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri=mlflow_server)
    prefix = f"cmp{abs(hash(str(tmp_path))) % 10**6}-"
    ner = _tracking.ensure_experiment(client, prefix + "ner")
    mde = _tracking.ensure_experiment(client, prefix + "mde")
    _fake_extractor_run(client, ner, "ner", "text_only", 0.10, 0.10)  # superseded by the rerun below
    time.sleep(0.01)  # MLflow start times have millisecond resolution
    _fake_extractor_run(client, ner, "ner", "full", 0.80, 0.70, seed=0)
    _fake_extractor_run(client, ner, "ner", "full", 0.90, 0.80, seed=1)
    _fake_extractor_run(client, ner, "ner", "text_only", 0.60, 0.40)
    _fake_extractor_run(client, ner, "ner", "full", 0.50, 0.30, fraction=0.1)
    _fake_extractor_run(client, ner, "ner", "full", 0.70, 0.50, fraction=0.5)
    for loss, (indomain, outdomain) in {"ce": (0.98, 0.6), "supcon": (0.93, 0.86)}.items():
        run = client.create_run(mde, tags={"tmr.task": "mde", "tmr.loss": loss})
        client.log_metric(run.info.run_id, "test_in_domain_macro_f1", indomain)
        client.log_metric(run.info.run_id, "test_out_of_domain_macro_f1", outdomain)
        client.set_terminated(run.info.run_id)
    running = client.create_run(ner, tags={"tmr.task": "ner", "tmr.ablation": "no_mde"})  # unfinished: ignored
    client.log_metric(running.info.run_id, "test_f1", 0.1)

    out = tmp_path / "cmp"
    assert compare_runs.main(["--output", str(out), "--experiments", f"{prefix}ner,{prefix}mde",
                              "--tracking.tracking_uri", mlflow_server,
                              "--comparison_experiment", prefix + "comparisons"]) == 0
    runs = compare_runs.load_runs(mlflow_server, [prefix + "ner", prefix + "mde"])
    assert len(runs) == 8 and len(compare_runs.latest_per_setting(runs)) == 7
    with open(out / "ablations.csv") as handle:
        rows = {r["ablation"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"full", "text_only"}
    assert float(rows["full"]["f1"]) == pytest.approx(0.85) and rows["full"]["runs"] == "2"
    # sample sd (n − 1) and a t-interval with 1 degree of freedom (12.706 × sd/√2)
    assert float(rows["full"]["f1_sd"]) == pytest.approx(0.0707107, abs=1e-6)
    assert float(rows["full"]["f1_ci_low"]) == pytest.approx(0.85 - 12.7062 * 0.05, abs=1e-3)
    # the difference from full pairs runs by seed: text_only ran seed 0 only
    assert float(rows["text_only"]["delta_ambiguous_f1"]) == pytest.approx(0.40 - 0.70)
    assert rows["text_only"]["delta_ambiguous_f1_n"] == "1"
    with open(out / "low_resource.csv") as handle:
        curve = [(float(r["train_fraction"]), float(r["f1"])) for r in csv.DictReader(handle) if r["ablation"] == "full"]
    assert curve == [(0.1, 0.5), (0.5, 0.7), (1.0, pytest.approx(0.85))]
    assert (out / "low_resource.png").stat().st_size > 1000 and (out / "ablations.png").is_file()
    markdown = (out / "comparison.md").read_text()
    assert "| ner | full | 2 |" in markdown and "85.0 ± 7.1 [21.5, 148.5]" in markdown
    assert "| ner | text_only | 1 |" in markdown and "| -30.0 |" in markdown
    with open(out / "mde_table3.csv") as handle:
        table3 = {r["loss"]: float(r["test_out_of_domain_macro_f1"]) for r in csv.DictReader(handle)}
    assert table3 == {"ce": pytest.approx(0.6), "supcon": pytest.approx(0.86)}
    comparisons = client.search_runs([client.get_experiment_by_name(prefix + "comparisons").experiment_id])
    logged = {a.path for a in client.list_artifacts(comparisons[0].info.run_id, "comparison")}
    assert {"comparison/comparison.md", "comparison/ablations.csv", "comparison/low_resource.png"} <= logged


def test_intervals_use_the_sample_deviation_and_student_t():
    from jobs.compare_runs import estimate, paired_difference

    five = estimate([0.1, 0.2, 0.3, 0.4, 0.5])
    assert five["sd"] == pytest.approx(0.158114, abs=1e-6)  # pstdev would give 0.141421
    assert (five["lo"], five["hi"]) == (pytest.approx(0.103676, abs=1e-5), pytest.approx(0.496324, abs=1e-5))
    one = estimate([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["sd"]) and math.isnan(one["lo"])
    diff = paired_difference({"0": 0.5, "1": 0.6, "2": 0.9}, {"0": 0.4, "1": 0.4, "3": 0.1})
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(0.15)


def test_mde_table3_rows_average_over_seeds():
    from jobs.compare_runs import RunRecord, mde_rows

    runs = [RunRecord(str(i), "tmr-mde", {"tmr.task": "mde", "tmr.loss": loss}, {"test_in_domain_macro_f1": a, "test_out_of_domain_macro_f1": b})
            for i, (loss, a, b) in enumerate([("supcon", 0.9, 0.8), ("supcon", 0.7, 0.6), ("ce", 0.99, 0.5)])]
    rows = mde_rows(runs, ["test_in_domain_macro_f1", "test_out_of_domain_macro_f1"])
    assert [r["loss"] for r in rows] == ["ce", "supcon"]
    assert rows[1]["test_in_domain_macro_f1"] == pytest.approx(0.8) and rows[1]["runs"] == 2


def test_git_commit_and_run_names():
    commit = _tracking.git_commit(Path(__file__).resolve().parents[1])
    assert commit is None or len(commit.split("-")[0]) == 40
    assert _tracking.default_run_name("re", "mnre", "text_only", 0.1, 2) == "re/mnre/text_only/frac0.1/seed2"
    assert _tracking.flatten_params({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": "1", "a.c": "{}", "d": "[1]"}


def test_an_empty_comparison_table_still_has_its_header():
    from jobs.compare_runs import ablation_table, markdown_table

    table = markdown_table([], [("loss", "MDE objective"), ("runs", "runs")], "Table 3")
    assert "| MDE objective | runs |" in table and "(no finished runs)" in table
    assert "| task | ablation |" in ablation_table([])


def test_a_jobs_experiment_in_a_sqlite_store_keeps_its_artifacts_beside_the_database(tmp_path, repo_root):
    # In a fresh process, as run_pipeline's parallel stages run: no test fixture patches MLflow there.
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    script = ("import sys; from mlflow import MlflowClient; from jobs._tracking import ensure_experiment; "
              "client = MlflowClient(sys.argv[1]); "
              "print(client.get_experiment(ensure_experiment(client, 'tmr-ner')).artifact_location)")
    run = subprocess.run([sys.executable, "-c", script, f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"],
                         cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(repo_root)}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (tmp_path / "store" / "mlruns" / "tmr-ner").as_uri()
    assert not (elsewhere / "mlruns").exists()
