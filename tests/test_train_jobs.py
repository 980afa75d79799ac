"""The training jobs end to end in Ray Train local mode (``ray.num_workers: 0``) on tiny models.

Each test runs a job through its public ``main(argv)``, then checks what a user relies on:
checkpoint folder names and files, step counters that continue on resume, one MLflow run per
training run, test metrics (micro, per type, ambiguous subset, Table 3 splits), and a registered
model that loads back by ``models:/…@champion`` to identical outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs import _train
from jobs._config import parse_config

# Two steps of four rows per epoch and 12 eval rows (the first 12 test rows hold 2 ambiguous mentions).
FAST = ["--debug.max_steps_per_epoch", "2", "--debug.max_eval_rows", "12", "--optim.batch_size", "4", "--optim.eval_batch_size", "64"]


def make_stage_tables(benchmark: Path, task: str, out: Path) -> Path:
    """prepare_dataset on the benchmark, then stand-in stage columns (one phrase per sentence, the
    whole image as the grounded region, the image itself as back-translation, a flat divergence),
    so the training jobs are tested without running the diffusion/grounding stages."""
    from jobs import prepare_dataset
    from tmr_core.schema import STAGE_FIELDS

    prepared = out / f"prepared-{task}"
    assert prepare_dataset.main(["--format", "synthetic", "--task", task, "--data_dir", str(benchmark),
                                 "--output", str(prepared)]) == 0
    stages = out / f"stages-{task}"
    stages.mkdir(parents=True, exist_ok=True)
    whole = [{"box": [0.0, 0.0, 64.0, 64.0], "score": 1.0, "phrase": "image"}]
    for split in ("train", "valid", "test"):
        table = pq.read_table(prepared / f"{split}.parquet")
        n = table.num_rows
        columns = {
            "phrases": [[{"text": t[0], "start": 0, "end": 1}] for t in table.column("tokens").to_pylist()],
            "back_translation_uri": table.column("image_uri").to_pylist(),
            "back_translation_error": [None] * n,
            "regions": [whole] * n,
            "back_translation_regions": [whole] * n,
            "image_error": [None] * n,
            "divergence": [[0.4, 0.4, 0.2]] * n,
            "back_translation_divergence": [None] * n,
        }
        for fields in STAGE_FIELDS.values():
            for field in fields:
                table = table.append_column(field, pa.array(columns[field.name], type=field.type))
        pq.write_table(table, stages / f"{split}.parquet")
    return stages


_SHARED_TABLES: dict[tuple[str, str], Path] = {}


def shared_stage_tables(benchmark: Path, task: str, tmp_path_factory) -> Path:
    """``make_stage_tables`` once per session and task: the tables are read-only, and a fixture
    imported into another test module would be a second fixture that builds them again."""
    key = (str(benchmark), task)
    if key not in _SHARED_TABLES:
        _SHARED_TABLES[key] = make_stage_tables(benchmark, task, tmp_path_factory.mktemp(f"{task}-tables"))
    return _SHARED_TABLES[key]


@pytest.fixture
def ner_tables(tiny_benchmark, tmp_path_factory) -> Path:
    return shared_stage_tables(tiny_benchmark, "ner", tmp_path_factory)


def extractor_args(tiny_models, tables: Path, benchmark: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config", "configs/finetune_extractor.tiny.yaml",
        "--data.dataset", str(tables), "--data.ground_truth", str(benchmark / "ground_truth.jsonl"),
        "--model.text_encoder", tiny_models["text_encoder"], "--model.image_encoder", tiny_models["image_encoder"],
        "--output", str(tmp_path / "out"), "--ray.storage_path", str(tmp_path / "ray"),
        "--tracking.tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--ray.name", "ner-run",
        "--model.num_regions", "1", *FAST, *extra,
    ]


def mlflow_runs(tracking_uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id]) if found else []


def test_finetune_ner_checkpoints_resumes_and_tracks_one_run(ray_local, tiny_models, tiny_benchmark, ner_tables,
                                                             tmp_path, repo_root, monkeypatch):
    from jobs import finetune_extractor

    monkeypatch.chdir(repo_root)
    args = extractor_args(tiny_models, ner_tables, tiny_benchmark, tmp_path)  # epochs per call: a flag given twice is an error
    assert finetune_extractor.main([*args, "--optim.epochs", "1"]) == 0

    folder = tmp_path / "ray" / "ner-run"
    assert sorted(p.name for p in folder.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0001"]
    last = folder / "checkpoint_epoch_0001"
    assert {p.name for p in last.iterdir()} >= {"model", "optimizer.safetensors", "optimizer.json", "train_state.json"}
    assert (last / "model" / "model.safetensors").is_file() and (last / "model" / "config.json").is_file()
    state = json.loads((last / "train_state.json").read_text())
    assert (state["epoch"], state["global_step"], state["attempts"]) == (1, 2, 1)

    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("test_precision", "test_recall", "test_f1", "test_ambiguous_f1", "test_align_complement_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["test_ambiguous_support"] > 0
    # Scored against the reader's gold of every scored row: the support is the table's entity count.
    from tmr_core.metrics import chunks

    for split in ("valid", "test"):
        rows = pq.read_table(ner_tables / f"{split}.parquet").sort_by("id").slice(0, 12).to_pylist()  # as the job reads
        assert metrics[f"{split}_support"] == sum(len(chunks(r["tags"])) for r in rows), split
        assert metrics[f"{split}_past_max_length"] == 0, split
    assert any(key.startswith("test_") and key.split("_")[1] in ("PER", "LOC", "ORG", "MISC") for key in metrics)

    # Resubmitting with the same run name and storage continues: epoch 2 only, same MLflow run.
    assert finetune_extractor.main([*args, "--optim.epochs", "2"]) == 0
    assert sorted(p.name for p in folder.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    state = json.loads((folder / "checkpoint_epoch_0002" / "train_state.json").read_text())
    assert (state["epoch"], state["global_step"], state["attempts"]) == (2, 4, 2)
    assert [h["epoch"] for h in state["history"]] == [1, 2]

    # The same run name with another config (or another input table) never resumes that run.
    from jobs._config import ConfigError

    with pytest.raises(ConfigError, match=r"ner-run holds a run of another config or input \(optim.lr differ\)"):
        finetune_extractor.main([*args, "--optim.epochs", "2", "--optim.lr", "0.01"])

    client, runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tmr-ner")
    assert len(runs) == 1, "a resumed job must log into its existing MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["tmr.ablation"] == "full" and run.data.tags["mlflow.source.git.commit"]
    assert run.data.params["optim.epochs"] == "1"  # params are the resolved config of the first submission
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "valid_f1")) == [1, 2]

    # --force (what run_pipeline --force [stage] passes): a new run from scratch, not a resume of
    # the finished one (which would only finalise again)
    assert finetune_extractor.main([*args, "--optim.epochs", "2", "--force", "true"]) == 0
    state = json.loads((folder / "checkpoint_epoch_0002" / "train_state.json").read_text())
    assert (state["epoch"], state["global_step"], state["attempts"]) == (2, 4, 1)
    assert len(mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "tmr-ner")[1]) == 2
    assert "test_f1" in run.data.metrics


def test_registered_extractor_loads_by_alias_with_identical_outputs(ray_local, tiny_models, tiny_benchmark,
                                                                    ner_tables, tmp_path, repo_root, monkeypatch):
    from jobs import _tracking, finetune_extractor
    from tmr_core.extractor import TMRExtractor
    from tmr_core.training import move_to_device

    monkeypatch.chdir(repo_root)
    args = extractor_args(tiny_models, ner_tables, tiny_benchmark, tmp_path, "--optim.epochs", "1",
                          "--ablation", "no_back_translation", "--tracking.alias", "champion")
    assert finetune_extractor.main(args) == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    local = _tracking.resolve_model_uri("models:/tmr-ner@champion", str(tmp_path / "download"))
    assert sorted(os.listdir(local)) >= ["config.json", "model.safetensors"]
    registered = TMRExtractor.from_pretrained(local)
    saved = TMRExtractor.from_pretrained(str(tmp_path / "out" / "model"))
    assert registered.config.use_back_translation is False
    rows = pq.read_table(ner_tables / "test.parquet").slice(0, 4).to_pylist()
    batch = move_to_device(saved.collator()(rows), "cpu")
    with torch.no_grad():
        assert torch.equal(registered(batch).logits, saved(batch).logits)
    assert _tracking.resolve_model_uri(str(tmp_path / "x")) == str(tmp_path / "x")  # paths pass through


@pytest.mark.parametrize("loss", ["ce_negative_sampling"])
def test_pretrain_mde_reports_in_and_out_of_domain_scores(ray_local, tiny_models, tiny_benchmark, tmp_path,
                                                          repo_root, monkeypatch, loss):
    from jobs import pretrain_mde

    monkeypatch.chdir(repo_root)
    args = [
        "--config", "configs/pretrain_mde.tiny.yaml", "--loss", loss,
        "--data.corpus", str(tiny_benchmark / "mde"), "--data.max_train_rows", "64",
        "--model.backbone", tiny_models["mde_backbone"], "--output", str(tmp_path / "out"),
        "--ray.storage_path", str(tmp_path / "ray"), "--tracking.tracking_uri", f"sqlite:///{tmp_path / 'm.db'}",
        "--optim.epochs", "2", *FAST,
    ]
    assert pretrain_mde.main(args) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for split in ("test_in_domain", "test_out_of_domain"):
        assert 0.0 <= metrics[f"{split}_macro_f1"] <= 1.0
        assert 0.0 <= metrics[f"{split}_accuracy"] <= 1.0
    assert metrics["global_step"] == 4 and metrics["best_epoch"] in (1, 2)
    _, runs = mlflow_runs(f"sqlite:///{tmp_path / 'm.db'}", "tmr-mde")
    assert len(runs) == 1 and runs[0].data.tags["tmr.loss"] == loss
    assert runs[0].data.metrics["test_out_of_domain_macro_f1"] == pytest.approx(metrics["test_out_of_domain_macro_f1"])


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    from tmr_core.training import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, lr=1e-2)
    scheduler = build_scheduler(optimizer, total_steps=10)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    _train.save_optimizer(str(tmp_path), optimizer, scheduler)
    fresh = build_optimizer(model, lr=1e-2)
    fresh_scheduler = build_scheduler(fresh, total_steps=10)
    _train.load_optimizer(str(tmp_path), fresh, fresh_scheduler)
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(fresh.state_dict()["state"][index][key], value)
    assert fresh_scheduler.last_epoch == 3 and fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_ambiguous_ner_scores_count_only_ambiguous_spans():
    from jobs.finetune_extractor import ambiguous_ner_scores

    rows = [{"id": "a"}, {"id": "b"}]
    truth = {
        "a": {"mentions": [{"start": 0, "end": 1, "type": "PER", "ambiguous": True},
                           {"start": 2, "end": 3, "type": "ORG", "ambiguous": False}]},
        "b": {"mentions": [{"start": 1, "end": 3, "type": "LOC", "ambiguous": True}]},
    }
    pred = [["B-PER", "O", "B-ORG"], ["O", "B-PER", "I-PER"]]  # a: right; b: right span, wrong type
    scores = ambiguous_ner_scores(rows, pred, truth)
    assert scores["support"] == 2
    assert scores["precision"] == pytest.approx(0.5) and scores["recall"] == pytest.approx(0.5)


def test_ray_configs_follow_the_config_section(tmp_path):
    cfg = _train.RayTrainConfig(num_workers=2, cpus_per_worker=0.5, resources_per_worker={"fake_gpu": 1.0},
                                storage_path=str(tmp_path), max_failures=3, checkpoints_to_keep=2)
    scaling = _train.scaling_config(cfg)
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 0.5, "fake_gpu": 1.0}
    run = _train.run_config(cfg, "r", metric="valid_f1")
    assert run.failure_config.max_failures == 3 and run.storage_path == str(tmp_path)
    assert run.checkpoint_config.num_to_keep == 2 and run.checkpoint_config.checkpoint_score_attribute == "valid_f1"
    assert _train.scaling_config(_train.RayTrainConfig(num_workers=0)).num_workers == 0
    with pytest.raises(ValueError, match="ray.num_workers"):
        _train.RayTrainConfig(num_workers=-1)


def test_default_run_name_follows_config_and_input_but_not_epochs_or_storage(tmp_path):
    from jobs import finetune_extractor
    from jobs._config import ConfigError
    from jobs._data import write_success_marker

    tables = tmp_path / "tables"
    (tables / "train").mkdir(parents=True)
    pq.write_table(pa.table({"id": list("abcd")}), tables / "train" / "part-0.parquet")  # a marker vouches for files
    write_success_marker(str(tables), {"train": 4}, "stage-a")

    def name(*argv: str) -> str:
        cfg = parse_config(finetune_extractor.Config, ["--data.dataset", str(tables), *argv])
        return _train.default_run_name(finetune_extractor.run_name(cfg), _train.run_identity(cfg, str(tables)))

    base = name()
    assert base.startswith("ner_") and base == name("--optim.epochs", "9", "--ray.storage_path", "s3://b/x")
    assert len({base, name("--optim.lr", "0.01"), name("--seed", "1"), name("--model.whole_image_region", "false")}) == 4
    write_success_marker(str(tables), {"train": 4}, "stage-b")  # the upstream stage reran
    assert name() != base
    backbone = tmp_path / "text-encoder"
    backbone.mkdir()
    (backbone / "config.json").write_text("{}")
    before = name("--model.text_encoder", str(backbone))
    (backbone / "config.json").write_text('{"hidden_size": 64}')  # rebuilt in place
    assert name("--model.text_encoder", str(backbone)) != before

    cfg = parse_config(finetune_extractor.Config, ["--data.dataset", str(tables)])
    folder = str(tmp_path / "run")
    _train.claim_run_folder(folder, _train.run_identity(cfg, str(tables)))
    _train.claim_run_folder(folder, _train.run_identity(cfg, str(tables)))  # the same run: fine
    other = parse_config(finetune_extractor.Config, ["--data.dataset", str(tables), "--model.dropout", "0.3"])
    with pytest.raises(ConfigError, match=r"model.dropout differ"):
        _train.claim_run_folder(folder, _train.run_identity(other, str(tables)))


class _FakeShard:
    """What ``ShardRows`` uses of a Ray ``DataIterator``: ``iter_batches``, counted."""

    def __init__(self, rows: list[dict]):
        self.table, self.passes = pa.Table.from_pylist(rows), 0

    def iter_batches(self, batch_size: int, batch_format: str, **_shuffle):
        self.passes += 1
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def _epochs(rows, n: int, batch_size: int = 4, **kwargs) -> list[list[int]]:
    from jobs._train import shard_batches

    return [[r["id"] for batch in shard_batches(rows, batch_size, lambda b: b, shuffle_seed=e, **kwargs)
             for r in batch] for e in range(n)]


def test_shard_rows_reads_once_then_replays_every_row_reshuffled_per_epoch():
    from jobs._train import ShardRows

    shard = _FakeShard([{"id": i} for i in range(10)])
    epochs = _epochs(ShardRows(shard, keep_up_to=100), 3)
    assert shard.passes == 1  # read once; every epoch came from memory
    assert all(sorted(ids) == list(range(10)) for ids in epochs)
    assert epochs[1] != epochs[2]  # a new order per epoch seed
    # an epoch cut short still leaves the whole shard in memory (it was read before the first step)
    cut = ShardRows(_FakeShard([{"id": i} for i in range(10)]), keep_up_to=100)
    assert len(_epochs(cut, 1, max_steps=1)[0]) == 4 and len(cut.rows) == 10
    # a shard over the limit streams every epoch, each epoch whole
    big = _FakeShard([{"id": i} for i in range(10)])
    streamed = ShardRows(big, keep_up_to=5)
    assert all(sorted(ids) == list(range(10)) for ids in _epochs(streamed, 2))
    assert big.passes == 2 and streamed.rows is None


def test_shard_rows_trains_in_the_same_order_whatever_order_the_stream_delivers():
    """Ray Data's streaming order depends on the cluster (read tasks, which block finishes first):
    with the same seed, one worker must see the same batches from any stream order, first epoch
    included (a 5-CPU session trained another MDE than a 2-CPU one before this)."""
    from jobs._train import ShardRows

    ids = [f"r{i:02d}" for i in range(23)]
    stream_orders = [ids, ids[::-1], ids[7:] + ids[:7]]
    runs = [_epochs(ShardRows(_FakeShard([{"id": i} for i in order]), keep_up_to=100), 3, batch_size=5)
            for order in stream_orders]
    assert runs[0] == runs[1] == runs[2]
    # rows without an id keep the stream's order (nothing to sort by), still read once
    anonymous = _FakeShard([{"x": i} for i in range(6)])
    rows = ShardRows(anonymous, keep_up_to=100)
    list(_train.shard_batches(rows, 4, lambda b: b))
    assert [r["x"] for r in rows.rows] == list(range(6)) and anonymous.passes == 1


def test_alpha_alignment_probe_scores_the_estimators_argmax_against_the_ground_truth():
    from tmr_core.probes import alpha_alignment_scores

    truth = {"a": {"alignment": "strengthen"}, "b": {"alignment": "complement"}, "c": {"alignment": "weaken"}}
    right = [{"id": "a", "divergence": [0.8, 0.1, 0.1]}, {"id": "b", "divergence": [0.1, 0.8, 0.1]},
             {"id": "c", "divergence": [0.1, 0.1, 0.8]}, {"id": "d", "divergence": None}]
    assert alpha_alignment_scores(right, truth) == {"macro_f1": 1.0, "accuracy": 1.0, "support": 3.0}
    always_weaken = [dict(r, divergence=[0.1, 0.2, 0.7]) for r in right[:3]]
    assert alpha_alignment_scores(always_weaken, truth)["macro_f1"] == pytest.approx(1 / 6)


def test_paths_relative_to_the_driver_reach_the_workers_absolute(tmp_path, monkeypatch):
    """Ray Train's workers start in Ray's working directory, not the driver's: a relative model path
    that loads in local mode must reach them absolute; URIs, hub ids and words stay as they are."""
    import dataclasses

    @dataclasses.dataclass
    class Model:
        base: str = "models/t2i"
        hub: str = "stabilityai/stable-diffusion-2"
        remote: str = "s3://bucket/models/t2i"

    @dataclasses.dataclass
    class Cfg:
        model: Model = dataclasses.field(default_factory=Model)
        datasets: list = dataclasses.field(default_factory=lambda: ["data/ner", "data/missing"])
        task: str = "ner"

    (tmp_path / "models" / "t2i").mkdir(parents=True)
    (tmp_path / "data" / "ner").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    loop = _train.absolute_local_paths({"cfg": Cfg(), "run_folder": "models", "local_mode": False})
    cfg = loop["cfg"]
    assert cfg.model.base == str(tmp_path / "models" / "t2i") and cfg.datasets == [str(tmp_path / "data" / "ner"), "data/missing"]
    assert (cfg.model.hub, cfg.model.remote, cfg.task) == ("stabilityai/stable-diffusion-2", "s3://bucket/models/t2i", "ner")
    assert loop["run_folder"] == "models" and loop["local_mode"] is False  # no separator: a word, not a path
    assert Cfg().model.base == "models/t2i"  # the driver's config is left as it was


def test_local_mode_keeps_only_the_best_and_the_latest_checkpoints(tmp_path):
    """Ray applies ``checkpoints_to_keep`` to its own storage only; in local mode (the tiny configs)
    every epoch's checkpoint stayed: 2.4 GB for the RE back-translator's ~180 short epochs."""
    state = _train.TrainState()
    for epoch, metric in enumerate([0.2, 0.9, 0.5, 0.9, 0.1], start=1):
        state.finish_epoch(metric, steps=1, metrics={})
        superseded = _train.forget_superseded_checkpoints(state, keep=1)
        (tmp_path / _train.checkpoint_name(epoch)).mkdir()
        (tmp_path / _train.checkpoint_name(epoch) / _train.STATE_FILE).write_text(state.to_json())  # as written
        _train.remove_checkpoints(str(tmp_path), superseded)
    # epoch 2 is the best (the earlier of two ties, as finish_epoch picks), epoch 5 the latest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_epoch_0002", "checkpoint_epoch_0005"]
    # the latest checkpoint's state, which a restart resumes from, lists exactly the folders that stay
    resumed = _train.TrainState.from_json((tmp_path / "checkpoint_epoch_0005" / _train.STATE_FILE).read_text())
    assert resumed.best_checkpoint == "checkpoint_epoch_0002"
    assert set(resumed.scores) == {"checkpoint_epoch_0002", "checkpoint_epoch_0005"}


def test_local_mode_removes_checkpoints_a_crash_left_unlisted(tmp_path):
    """A crash between persisting epoch 4's checkpoint and removing epoch 3's, which it superseded,
    left epoch 3 on disk while the state a restart resumes from no longer names it: it stayed for
    good (13 MB per back-translator epoch). The next epoch removes it, and never the best one."""
    folder = tmp_path / "run"

    def finish(state, metric, crash_before_removal=False):
        state.finish_epoch(metric, steps=1, metrics={})
        superseded = _train.forget_superseded_checkpoints(state, keep=1)
        source = tmp_path / "src" / str(state.epoch)
        source.mkdir(parents=True)
        (source / _train.STATE_FILE).write_text(state.to_json())
        if crash_before_removal:
            _train.persist_local_checkpoint(str(source), str(folder), _train.checkpoint_name(state.epoch))
            return superseded
        _train.keep_local_checkpoint(str(source), str(folder), state, superseded, prune=True)
        return superseded

    state = _train.TrainState()
    for metric in (0.5, 0.9, 0.1):
        finish(state, metric)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"]
    assert finish(state, 0.2, crash_before_removal=True) == ["checkpoint_epoch_0003"]
    resumed = _train.TrainState.from_json((folder / "checkpoint_epoch_0004" / _train.STATE_FILE).read_text())
    assert set(resumed.scores) == {"checkpoint_epoch_0002", "checkpoint_epoch_0004"}  # epoch 3 is unlisted
    finish(resumed, 0.3)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_epoch_0002", "checkpoint_epoch_0005"]

    # a state written before `scores` existed lists no checkpoint: its best one still stays
    legacy = _train.TrainState.from_json((folder / "checkpoint_epoch_0005" / _train.STATE_FILE).read_text())
    legacy.scores = {}
    finish(legacy, 0.1)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_epoch_0002", "checkpoint_epoch_0006"]
