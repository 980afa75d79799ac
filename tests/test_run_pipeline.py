"""jobs.run_pipeline: stage order, skipping up-to-date stages, resuming after a crash."""

import dataclasses
import os

import pytest

from jobs import run_pipeline
from jobs._config import ConfigError, load_config_file


def _argv(workdir, *extra):
    return ["--config", "configs/pipeline.tiny.yaml", "--workdir", str(workdir), "--tasks", "[ner]",
            "--stop_after", "prepare_dataset.ner", *extra]


def test_plan_orders_stages_and_wires_outputs_to_inputs():
    cfg = load_config_file(run_pipeline.Config, "configs/pipeline.tiny.yaml")
    stages = run_pipeline.plan(cfg)
    ids = [s.id for s in stages]
    assert ids.index("make_synthetic_benchmark") < ids.index("prepare_dataset.ner") < ids.index("extract_phrases.ner")
    assert ids.index("ground_phrases.re") < ids.index("score_divergence.re") < ids.index("finetune_extractor.re.full")
    assert ids.index("pretrain_mde") < ids.index("score_divergence.ner")
    assert ids[-1] == "compare_runs"
    by_id = {s.id: s for s in stages}
    # every stage reads what the stage it needs wrote
    for stage in stages:
        if "--input" in stage.argv:
            source = stage.argv[stage.argv.index("--input") + 1]
            assert any(by_id[n].output == source for n in stage.needs), stage.id
    assert "--ablation" in by_id["finetune_extractor.ner.text_only"].argv


def test_real_dataset_needs_its_files():
    with pytest.raises(ConfigError) as err:
        run_pipeline.main(["--config", "configs/pipeline.tiny.yaml", "--source", "mnre", "--tasks", "[ner]"])
    message = str(err.value)
    assert "--data_dir" in message and "--mde_corpus" in message and "--tasks [re]" in message


def test_fingerprint_changes_with_arguments_defaults_and_upstream(monkeypatch):
    from jobs import prepare_dataset

    argv = ["--config", "configs/prepare_dataset.tiny.yaml"]
    stage = run_pipeline.Stage("a", "prepare_dataset", [*argv, "--on_missing_image", "skip"], "out")
    other = run_pipeline.Stage("a", "prepare_dataset", [*argv, "--on_missing_image", "keep"], "out")
    child = run_pipeline.Stage("b", "extract_phrases", ["--input", "out"], "out2", needs=["a"])
    assert run_pipeline.stage_fingerprint(stage, {}) != run_pipeline.stage_fingerprint(other, {})
    assert (run_pipeline.stage_fingerprint(child, {"a": "1"}) != run_pipeline.stage_fingerprint(child, {"a": "2"}))
    # the same argv, but a default changed in the code: the stage is no longer up to date
    plain = run_pipeline.Stage("a", "prepare_dataset", ["--data_dir", "outputs/benchmark"], "out")
    before = run_pipeline.stage_fingerprint(plain, {})

    @dataclasses.dataclass
    class NewDefaults(prepare_dataset.Config):
        image_dir: str | None = "elsewhere"

    monkeypatch.setattr(prepare_dataset, "Config", NewDefaults)
    assert run_pipeline.stage_fingerprint(plain, {}) != before
    # a stage whose argv no longer parses fails before anything runs, naming the key
    with pytest.raises(ConfigError, match="no_such_key"):
        run_pipeline.stage_fingerprint(run_pipeline.Stage("a", "prepare_dataset", [*argv, "--no_such_key", "1"], "out"), {})


def test_rerun_skips_and_crash_resumes(tmp_path, monkeypatch, capsys):
    assert run_pipeline.main(_argv(tmp_path)) == 0
    table = tmp_path / "stages" / "ner" / "dataset" / "train.parquet"
    first_mtime = table.stat().st_mtime_ns
    capsys.readouterr()

    # a finished pipeline reruns as "up to date" and rewrites nothing
    assert run_pipeline.main(_argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == 3
    assert table.stat().st_mtime_ns == first_mtime

    # a changed stage argument reruns that stage only; a crash there leaves earlier stages done
    import jobs.prepare_dataset

    def crash(argv):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(jobs.prepare_dataset, "main", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline.main(_argv(tmp_path, "--force", "[prepare_dataset.ner]"))
    assert "rerun the same command to resume" in capsys.readouterr().out
    os.remove(tmp_path / ".pipeline" / "prepare_dataset.ner.json")  # the crashed stage's marker is stale

    monkeypatch.undo()
    assert run_pipeline.main(_argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "[make_synthetic_benchmark] up to date" in out
    assert "[prepare_dataset.ner] python -m jobs.prepare_dataset" in out
    assert table.stat().st_mtime_ns != first_mtime
