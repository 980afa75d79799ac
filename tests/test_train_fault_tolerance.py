"""A real Ray Train run loses its worker process mid-run and finishes from its last checkpoint.

The training worker (rank 0 of a 1-worker TorchTrainer on the shared local cluster) writes its pid
to a file at each start; the test waits for the first checkpoint, kills that process with SIGKILL
from outside, and checks that Ray Train (``FailureConfig(max_failures)``) restarted the worker
group from the checkpoint: the step counter continues, MLflow still holds exactly one run (with
every epoch logged once per step), and resubmitting the finished job with the same run name and
storage path restores it instead of starting over.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from tests.test_train_jobs import shared_stage_tables


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def test_killed_worker_resumes_from_checkpoint_into_the_same_mlflow_run(
    ray_local, tiny_models, tiny_benchmark, tmp_path_factory, tmp_path, repo_root, monkeypatch
):
    from mlflow import MlflowClient

    from jobs import finetune_extractor

    monkeypatch.chdir(repo_root)
    tables = shared_stage_tables(tiny_benchmark, "ner", tmp_path_factory)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pid_file = tmp_path / "worker.pid"
    folder = tmp_path / "ray" / "ft-run"
    args = [
        "--config", "configs/finetune_extractor.tiny.yaml", "--ablation", "text_only",
        "--data.dataset", str(tables), "--data.ground_truth", "null", "--model.text_encoder", tiny_models["text_encoder"],
        "--model.image_encoder", tiny_models["image_encoder"], "--output", str(tmp_path / "out"),
        "--ray.num_workers", "1", "--ray.cpus_per_worker", "1", "--ray.max_failures", "1",
        "--ray.storage_path", str(tmp_path / "ray"), "--ray.name", "ft-run",
        "--tracking.tracking_uri", tracking_uri, "--tracking.register_as", "null",
        "--optim.batch_size", "4", "--debug.max_steps_per_epoch", "2", "--debug.max_eval_rows", "8",
        # 2 x 0.75 s of sleep per epoch: the window in which the test sees epoch 1's checkpoint and
        # kills the worker while epoch 2 is still running.
        "--debug.step_delay_s", "0.75", "--debug.worker_pid_file", str(pid_file),
    ]
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["code"] = finetune_extractor.main([*args, "--optim.epochs", "2"])
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = error

    driver = threading.Thread(target=run, daemon=True)
    driver.start()
    wait_for(lambda: (folder / "checkpoint_epoch_0001" / "train_state.json").is_file() or not driver.is_alive(),
             240, "the first checkpoint")
    assert driver.is_alive(), f"the run ended before the kill: {outcome}"
    first_pid = int(pid_file.read_text().split()[0])
    os.kill(first_pid, signal.SIGKILL)
    driver.join(timeout=300)
    assert not driver.is_alive(), "the run did not finish after the worker was killed"
    assert outcome.get("code") == 0, outcome

    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2 and pids[1] != first_pid, "Ray Train should have started a new worker process"
    state = json.loads((folder / "checkpoint_epoch_0002" / "train_state.json").read_text())
    assert state["attempts"] == 2
    assert (state["epoch"], state["global_step"]) == (2, 4), "the step counter continues, it does not restart"
    assert [h["epoch"] for h in state["history"]] == [1, 2]

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tmr-ner").experiment_id])
    assert len(runs) == 1, "no duplicate MLflow run after a restart"
    assert runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(runs[0].info.run_id, "valid_f1")}
    assert steps == {1, 2}

    # Resubmitting the finished job (same name + storage path) restores it: one more epoch only.
    assert finetune_extractor.main([*args, "--optim.epochs", "3"]) == 0
    state = json.loads((folder / "checkpoint_epoch_0003" / "train_state.json").read_text())
    assert (state["epoch"], state["global_step"], state["attempts"]) == (3, 6, 3)
    assert len(client.search_runs([client.get_experiment_by_name("tmr-ner").experiment_id])) == 1
