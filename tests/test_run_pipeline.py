"""jobs.run_pipeline: stage order, skipping up-to-date stages, resuming after a crash, forced reruns,
rows per split kept from stage to stage."""

import dataclasses
import json
import os
import re

import pytest

from jobs import run_pipeline
from jobs._config import ConfigError, load_config_file, parse_config


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
    # the trained back-translator and grounder are what the stages generate and ground with
    def arg(stage_id, flag):
        argv = by_id[stage_id].argv
        return argv[argv.index(flag) + 1]

    for task in ("ner", "re"):  # a back-translator per task, trained on that task's pairs
        trainer = by_id[f"finetune_text_to_image.{task}"]
        assert arg(f"generate_back_translations.{task}", "--generation.model") == trainer.output + "/model"
        assert trainer.id in by_id[f"generate_back_translations.{task}"].needs
        assert json.loads(arg(trainer.id, "--data.datasets")) == [by_id[f"prepare_dataset.{task}"].output]
        assert arg(trainer.id, "--tracking.register_as") == f"tmr-t2i-{task}"
    assert arg("finetune_text_to_image.re", "--config") == "configs/finetune_text_to_image.re.tiny.yaml"
    assert arg("finetune_text_to_image.ner", "--config") == "configs/finetune_text_to_image.tiny.yaml"
    # or one shared by both tasks, on the pairs of back_translator_tasks
    shared = {s.id: s for s in run_pipeline.plan(dataclasses.replace(cfg, back_translators="shared",
                                                                     back_translator_tasks=["ner"]))}
    assert not any(i.startswith("finetune_text_to_image.") for i in shared)
    for task in ("ner", "re"):
        argv = shared[f"generate_back_translations.{task}"].argv
        assert argv[argv.index("--generation.model") + 1] == shared["finetune_text_to_image"].output + "/model"
    argv = shared["finetune_text_to_image"].argv
    assert json.loads(argv[argv.index("--data.datasets") + 1]) == [by_id["prepare_dataset.ner"].output]
    assert arg("ground_phrases.ner", "--detector.model") == by_id["finetune_grounder"].output + "/model"
    assert "finetune_grounder" in by_id["ground_phrases.re"].needs
    assert ids.index("probe_mechanisms") < ids.index("finetune_extractor.ner.full")
    # real data has no boxes: no grounder training, and the configs' back-translator unless asked
    real = dataclasses.replace(cfg, source="twitter2017", data_dir="d", mde_corpus="m", tasks=["ner"])
    real_ids = [s.id for s in run_pipeline.plan(real)]
    assert "finetune_grounder" not in real_ids and not any(i.startswith("finetune_text_to_image") for i in real_ids)
    # a config variant without a file of its own runs the job's config
    assert run_pipeline._job_config(dataclasses.replace(cfg, configs="default"), "finetune_text_to_image", "re") \
        == "configs/finetune_text_to_image.yaml"
    assert "probe_mechanisms" not in real_ids
    with pytest.raises(ConfigError, match="train_grounder"):
        run_pipeline.check_config(dataclasses.replace(real, train_grounder=True))


def test_real_dataset_needs_its_files():
    with pytest.raises(ConfigError) as err:
        run_pipeline.main(["--config", "configs/pipeline.tiny.yaml", "--source", "mnre", "--tasks", "[ner]"])
    message = str(err.value)
    assert "--data_dir" in message and "--mde_corpus" in message and "--tasks [re]" in message


def test_your_own_jsonl_data_runs_as_one_task_through_prepare_dataset_jsonl():
    from jobs._config import parse_config

    with pytest.raises(ConfigError, match=r"--tasks \[ner\] or --tasks \[re\]"):
        run_pipeline.main(["--config", "configs/pipeline.tiny.yaml", "--source", "jsonl", "--data_dir", "d",
                           "--mde_corpus", "c"])
    cfg = parse_config(run_pipeline.Config, ["--config", "configs/pipeline.tiny.yaml", "--source", "jsonl",
                                             "--data_dir", "mine", "--mde_corpus", "c", "--tasks", "[re]",
                                             "--train_grounder", "false"])
    run_pipeline.check_config(cfg)
    (prepare,) = [s for s in run_pipeline.plan(cfg) if s.job == "prepare_dataset"]
    assert prepare.argv[prepare.argv.index("--format") + 1] == "jsonl"
    assert prepare.argv[prepare.argv.index("--task") + 1] == "re" and "mine" in prepare.argv
    # no ground truth beside your own data: the tiny extractor config's synthetic one is switched off
    (full,) = [s for s in run_pipeline.plan(cfg) if s.id == "finetune_extractor.re.full"]
    assert full.argv[full.argv.index("--data.ground_truth") + 1] == "null"


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
    # the crashed stage's marker went before it ran: nothing vouches for a half-rewritten output
    assert not (tmp_path / ".pipeline" / "prepare_dataset.ner.json").exists()

    monkeypatch.undo()
    assert run_pipeline.main(_argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "[make_synthetic_benchmark] up to date" in out
    assert "[prepare_dataset.ner] python -m jobs.prepare_dataset" in out
    assert table.stat().st_mtime_ns != first_mtime


def test_each_table_stage_prints_its_rows_per_split(tmp_path, capsys):
    assert run_pipeline.main(_argv(tmp_path)) == 0
    out = capsys.readouterr().out
    line = re.search(r"=== \[prepare_dataset\.ner\] ran in [\d.]+ s · rows train (\d+) \| valid (\d+) \| test (\d+)", out)
    assert line, out
    import pyarrow.parquet as pq

    dataset = tmp_path / "stages" / "ner" / "dataset"
    on_disk = [pq.read_metadata(dataset / f"{split}.parquet").num_rows for split in ("train", "valid", "test")]
    assert [int(n) for n in line.groups()] == on_disk
    marker = json.loads((tmp_path / ".pipeline" / "prepare_dataset.ner.json").read_text())
    assert marker["rows"] == dict(zip(("train", "valid", "test"), on_disk, strict=True))
    # the summary table shows the same counts
    assert "| prepare_dataset.ner | ran | train {} | valid {} | test {} |".format(*on_disk) in out


def test_a_stage_whose_output_lost_files_reruns_instead_of_skipping(tmp_path, capsys):
    assert run_pipeline.main(_argv(tmp_path)) == 0
    capsys.readouterr()
    os.remove(tmp_path / "stages" / "ner" / "dataset" / "valid.parquet")  # the pipeline marker still says done
    assert run_pipeline.main(_argv(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "[prepare_dataset.ner] up to date" not in out
    assert "[prepare_dataset.ner] output changed since it ran" in out and "valid.parquet" in out
    assert (tmp_path / "stages" / "ner" / "dataset" / "valid.parquet").is_file()


def _fake_extract_phrases(drop_split: str):
    """A stand-in extract_phrases main (no Ray): copies its input, minus the first row of
    ``drop_split``, writing a stage folder with a real _SUCCESS.json."""
    import pyarrow.parquet as pq

    from jobs._data import begin_output, parquet_files, write_success_marker

    def main(argv):
        inp, out = argv[argv.index("--input") + 1], argv[argv.index("--output") + 1]
        splits = ["train", "valid", "test"]
        begin_output(out, splits)
        for split in splits:
            table = pq.read_table(os.path.join(inp, f"{split}.parquet"))
            if split == drop_split:
                table = table.slice(1)
            pq.write_table(table, os.path.join(out, split, "part-0.parquet"))
        rows = {split: sum(parquet_files(out, split).values()) for split in splits}
        write_success_marker(out, rows, "fake")
        return 0

    return main


def test_a_stage_that_changes_valid_or_test_counts_stops_the_pipeline(tmp_path, monkeypatch, capsys):
    import jobs.extract_phrases

    argv = [*_argv(tmp_path)[:-1], "extract_phrases.ner"]
    monkeypatch.setattr(jobs.extract_phrases, "main", _fake_extract_phrases("train"))
    assert run_pipeline.main(argv) == 0  # training rows may be dropped
    assert re.search(r"=== \[extract_phrases\.ner\] ran in [\d.]+ s · rows train \d+ \| valid \d+ \| test \d+", capsys.readouterr().out)

    monkeypatch.setattr(jobs.extract_phrases, "main", _fake_extract_phrases("test"))
    with pytest.raises(run_pipeline.RowCountError) as err:
        run_pipeline.main([*argv, "--force", "[extract_phrases.ner]"])
    import pyarrow.parquet as pq

    n_test = pq.read_metadata(tmp_path / "stages" / "ner" / "dataset" / "test.parquet").num_rows
    message = str(err.value)
    assert "extract_phrases.ner" in message and "'test'" in message and "prepare_dataset.ner" in message
    assert f"has {n_test - 1} rows" in message and f"has {n_test};" in message
    # no marker vouches for the stage: the next run runs it again
    assert not (tmp_path / ".pipeline" / "extract_phrases.ner.json").exists()


def test_force_reruns_the_stage_itself(ray_local, tmp_path, capsys):
    argv = [*_argv(tmp_path)[:-1], "extract_phrases.ner"]
    assert run_pipeline.main(argv) == 0
    marker = tmp_path / "stages" / "ner" / "phrases" / "_SUCCESS.json"
    first = json.loads(marker.read_text())["finished_at"]
    capsys.readouterr()

    assert run_pipeline.main([*argv, "--force", "[extract_phrases.ner]"]) == 0
    out = capsys.readouterr().out
    assert "[make_synthetic_benchmark] up to date" in out and "[prepare_dataset.ner] up to date" in out
    assert "extract_phrases " in out and "--force true" in out
    assert "nothing to do" not in out  # the job did not find its own output up to date
    assert json.loads(marker.read_text())["finished_at"] > first
    assert "| extract_phrases.ner | ran |" in out


def test_two_pipelines_from_scratch_with_one_seed_give_the_same_scores(ray_local, tmp_path):
    # Before: score_divergence's α moved by ~1e-7 between runs (ViLT draws a random patch order on
    # every call, from the actor's RNG) and stage tables came back in Ray Data's finishing order;
    # the tiny RE model turned that into F1 points between same-seed pipelines.
    import yaml

    small = tmp_path / "small.yaml"
    with open("configs/pipeline.tiny.yaml") as handle:
        base = yaml.safe_load(handle)
    small.write_text(yaml.safe_dump({
        **base,
        "text_only_baseline": False, "compare": False, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "parallel_stages": 1,  # determinism, not scheduling: no process start per training stage
        "back_translators": "shared", "back_translator_tasks": ["ner"],  # one back-translator stage: ~25 s less
        "job_args": {
            "make_synthetic_benchmark": ["--ner_sizes", "[48, 16, 16]", "--re_sizes", "[32, 12, 12]",
                                         "--mde_sizes", "[96, 16, 16, 16]"],
            "pretrain_mde": ["--optim.epochs", "1", "--optim.head_fit_epochs", "3", "--tracking.register_as", "null"],
            "finetune_extractor": ["--optim.epochs", "2", "--tracking.register_as", "null"],
            "finetune_text_to_image": ["--optim.epochs", "1", "--optim.vae_steps", "5", "--probe.enabled", "false",
                                       "--tracking.register_as", "null"],  # overrides the pipeline's tmr-t2i-<task>
            "finetune_grounder": ["--optim.epochs", "1", "--eval_untrained", "false", "--tracking.register_as", "null"],
        },
    }))
    scores = []
    for run in ("first", "second"):
        workdir = tmp_path / run
        assert run_pipeline.main(["--config", str(small), "--workdir", str(workdir)]) == 0
        metrics = {task: json.loads((workdir / "extractor" / task / "full" / "metrics.json").read_text())
                   for task in ("ner", "re")}
        divergence = {task: _column(workdir / "stages" / task / "divergence" / "test", "divergence") for task in ("ner", "re")}
        scores.append((metrics, divergence))
    (first, first_alpha), (second, second_alpha) = scores
    assert first_alpha == second_alpha
    for task in ("ner", "re"):
        assert first[task]["test_f1"] == second[task]["test_f1"], task
        assert first[task]["valid_support"] > 0 and first[task]["test_support"] > 0


def _column(folder, name):
    import pyarrow.parquet as pq

    table = pq.read_table(folder).sort_by("id")
    return dict(zip(table.column("id").to_pylist(), table.column(name).to_pylist(), strict=True))


def test_job_args_reach_every_stage_of_their_job_but_may_not_repeat_the_pipelines_flags():
    cfg = load_config_file(run_pipeline.Config, "configs/pipeline.tiny.yaml")
    cfg = dataclasses.replace(cfg, job_args={"finetune_extractor": ["--optim.epochs", "2"], "compare_runs": ["--metric", "test_f1"]})
    stages = run_pipeline.plan(cfg)
    run_pipeline.check_job_args(stages, cfg.job_args)
    assert all(s.argv[-2:] == ["--optim.epochs", "2"] for s in stages if s.job == "finetune_extractor")
    assert next(s for s in stages if s.job == "compare_runs").argv[-2:] == ["--metric", "test_f1"]
    # the registry name the pipeline gives each back-translator may be overridden (null: no registration)
    unregistered = dataclasses.replace(cfg, job_args={"finetune_text_to_image": ["--tracking.register_as", "null"]})
    stages = run_pipeline.plan(unregistered)
    run_pipeline.check_job_args(stages, unregistered.job_args)
    for stage in (s for s in stages if s.job == "finetune_text_to_image"):
        assert stage.argv.count("--tracking.register_as") == 1 and stage.argv[-2:] == ["--tracking.register_as", "null"]
    spelled = dataclasses.replace(cfg, job_args={"finetune_text_to_image": ["--tracking.register-as=null"]})
    for stage in (s for s in run_pipeline.plan(spelled) if s.job == "finetune_text_to_image"):
        assert "--tracking.register_as" not in stage.argv and stage.argv[-1] == "--tracking.register-as=null"
    clash = dataclasses.replace(cfg, job_args={"finetune_extractor": ["--output", "elsewhere"]})
    with pytest.raises(ConfigError, match="--output is set by the pipeline"):
        run_pipeline.check_job_args(run_pipeline.plan(clash), clash.job_args)
    for spelling in (["--output=elsewhere"], ["--data.dataset-name", "x"]):  # however the job's parser reads it
        clash = dataclasses.replace(cfg, job_args={"finetune_extractor": spelling})
        with pytest.raises(ConfigError, match="is set by the pipeline"):
            run_pipeline.check_job_args(run_pipeline.plan(clash), clash.job_args)
    # the text-only baseline's null registration is not an extractor override: it would register
    # the text-only model under the full model's name
    renamed = dataclasses.replace(cfg, job_args={"finetune_extractor": ["--tracking.register_as", "tmr-ner"]})
    with pytest.raises(ConfigError, match="--tracking.register_as is set by the pipeline for finetune_extractor.ner.text_only"):
        run_pipeline.check_job_args(run_pipeline.plan(renamed), renamed.job_args)


def test_demo_on_a_busy_port_prints_the_summary_then_one_line_naming_the_port(monkeypatch, capsys):
    import socket

    from jobs import run_demo

    monkeypatch.setattr(run_pipeline, "execute", lambda cfg: ([], {}, 0.0))
    monkeypatch.setattr(run_pipeline, "print_summary", lambda *args: print("## Pipeline summary"))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(run_demo.PortInUseError, match=rf"port {port} on 127.0.0.1 is in use.*make demo PORT="):
            run_demo.main(["--port", str(port)])
    assert "## Pipeline summary" in capsys.readouterr().out


def test_ready_stages_start_together_in_their_own_processes_logs_go_to_files_and_a_failed_one_stops_the_run(
        ray_local, tmp_path, monkeypatch, capfd):
    # Two stages that read nothing stand in for the training stages (same scheduling, seconds to run).
    monkeypatch.setattr(run_pipeline, "BACKGROUND_JOBS", frozenset({"make_tiny_models", "make_synthetic_benchmark"}))
    argv = [*_argv(tmp_path), "--parallel_stages", "2", "--stage_threads", "1", "--stage_logs", "true"]
    assert run_pipeline.main(argv) == 0
    out = capfd.readouterr().out  # the file descriptors: what a terminal would show
    lines = [line for line in out.splitlines() if line.startswith("=== [make_")]
    # both started before either finished was collected
    assert [line.split("]")[1].split()[0] for line in lines[:2]] == ["started", "started"]
    for stage in ("make_tiny_models", "make_synthetic_benchmark"):
        assert (tmp_path / ".pipeline" / f"{stage}.json").is_file()
        assert f"python -m jobs.{stage}" in (tmp_path / "logs" / f"{stage}.log").read_text()
    # the in-process stage's own output went to its log; the terminal has its one line
    assert re.search(r"=== \[prepare_dataset\.ner\] ran in [\d.]+ s · rows train \d+", out)
    assert "[prepare_dataset] synthetic (ner)" in (tmp_path / "logs" / "prepare_dataset.ner.log").read_text()
    assert "[prepare_dataset]" not in out and "resolved config" not in out

    import shutil

    shutil.rmtree(tmp_path / "benchmark")
    (tmp_path / "benchmark").write_text("a file where the benchmark's folder goes")
    with pytest.raises(RuntimeError, match=r"stage make_synthetic_benchmark \(jobs.make_synthetic_benchmark\) exited with code 1"):
        run_pipeline.main([*argv, "--force", "[make_synthetic_benchmark]"])
    captured = capfd.readouterr()
    assert "last lines of" in captured.err and "Error" in captured.err  # the job's own traceback, shown
    assert "rerun the same command to resume" in captured.out
    assert not (tmp_path / ".pipeline" / "make_synthetic_benchmark.json").exists()


def test_the_stages_the_end_waits_on_longest_run_first_and_the_others_yield_the_cpu(tmp_path, monkeypatch):
    """Critical path first: on 2 cores the back-translator (whose chain runs through generation,
    grounding and divergence to the RE extractor) must not share a core evenly with an MDE or an
    extractor that fewer stages wait on."""
    import subprocess
    import sys

    cfg = parse_config(run_pipeline.Config, ["--config", "configs/pipeline.tiny.yaml", "--workdir", str(tmp_path)], prog="t")
    stages = run_pipeline.plan(cfg)
    lengths = run_pipeline.chain_lengths(stages)
    assert lengths["finetune_text_to_image.re"] == lengths["finetune_text_to_image.ner"] > lengths["finetune_grounder"] \
        > lengths["pretrain_mde"] > lengths["finetune_extractor.re.full"] > lengths["compare_runs"] == 1
    # run times break the tie: RE's back-translator trains twice NER's steps (configs/pipeline.tiny.yaml)
    weighted = run_pipeline.chain_lengths(stages, cfg.stage_weights)
    assert weighted["finetune_text_to_image.re"] == lengths["finetune_text_to_image.re"] + 1 \
        > weighted["finetune_text_to_image.ner"] == lengths["finetune_text_to_image.ner"]
    for typo in ("finetune_text_to_imag.re", "finetune_text_to_image.rr"):
        with pytest.raises(ConfigError, match="stage_weights"):
            run_pipeline.check_config(dataclasses.replace(cfg, stage_weights={typo: 2.0}))
    with pytest.raises(ConfigError, match="back_translator_tasks: only for --back_translators shared"):
        run_pipeline.check_config(dataclasses.replace(cfg, back_translator_tasks=["ner"]))
    with pytest.raises(ConfigError, match="stage_weights"):
        run_pipeline.check_config(dataclasses.replace(cfg, stage_weights={"pretrain_mde": 0.0}))
    # the paper config switches to a back-translator per task as its comment says
    paper = load_config_file(run_pipeline.Config, "configs/pipeline.yaml")
    run_pipeline.check_config(dataclasses.replace(paper, back_translators="per_task"))
    # the tiny config's RE weight does not stop a run without RE
    run_pipeline.check_config(dataclasses.replace(cfg, tasks=["ner"]))
    assert "finetune_text_to_image.re" not in run_pipeline.chain_lengths(run_pipeline.plan(dataclasses.replace(cfg, tasks=["ner"])),
                                                                         cfg.stage_weights)
    # ranked against Ray's workers (nice 15 by default), where generation, grounding and divergence run
    niceness = run_pipeline.background_niceness(stages, weighted, run_pipeline.BACKGROUND_JOBS, base=15)
    assert niceness["finetune_text_to_image.re"] == 15 < niceness["finetune_text_to_image.ner"]
    assert niceness["finetune_text_to_image.ner"] < niceness["finetune_grounder"] < niceness["pretrain_mde"] \
        < niceness["finetune_extractor.ner.full"] == 19
    unniced = run_pipeline.background_niceness(stages, weighted, run_pipeline.BACKGROUND_JOBS, base=0)
    assert unniced["finetune_text_to_image.re"] == 0 and unniced["finetune_grounder"] >= 4 and unniced["finetune_extractor.re.full"] < 19
    # every stage that loads a tiny model waits for the stage that builds them (the order is by needs)
    by_id = {s.id: s for s in stages}
    for stage_id in ("finetune_text_to_image.re", "generate_back_translations.re", "ground_phrases.ner", "pretrain_mde",
                     "finetune_extractor.re.text_only"):
        assert "make_tiny_models" in by_id[stage_id].needs
    assert "make_tiny_models" not in by_id["extract_phrases.ner"].needs  # the benchmark's trees, no model

    # the scheduler takes ready stages longest chain first and starts training stages at their niceness
    started = []
    monkeypatch.setattr(run_pipeline, "start_background",
                        lambda stage, argv, log, address, threads, nice=0: started.append((stage.id, nice)))
    scheduler = run_pipeline.Scheduler(dataclasses.replace(cfg, parallel_stages=3), stages)
    scheduler.done = {"make_tiny_models", "make_synthetic_benchmark", "prepare_dataset.ner", "prepare_dataset.re",
                      "extract_phrases.ner", "extract_phrases.re"}
    scheduler.pending = [s for s in stages if s.id not in scheduler.done]
    # the text-only baselines read the phrase tables: ready now, taken last (nothing waits on them)
    assert [s.id for s in scheduler._ready()] == ["finetune_text_to_image.re", "finetune_text_to_image.ner",
                                                  "finetune_grounder", "pretrain_mde",
                                                  "finetune_extractor.ner.text_only", "finetune_extractor.re.text_only"]
    for task in ("ner", "re"):
        text_only = by_id[f"finetune_extractor.{task}.text_only"]
        assert set(text_only.needs) == {f"extract_phrases.{task}", "make_tiny_models"}
        assert text_only.argv[text_only.argv.index("--data.dataset") + 1] == by_id[f"extract_phrases.{task}"].output
    monkeypatch.setattr(run_pipeline, "ray_address", lambda: "local")
    monkeypatch.setattr(run_pipeline, "ray_worker_niceness", lambda: 15)
    monkeypatch.setattr("jobs._tracking.prepare_store", lambda uri: None)
    scheduler._start(by_id["pretrain_mde"])
    assert started == [("pretrain_mde", niceness["pretrain_mde"])]
    first = run_pipeline.Scheduler(dataclasses.replace(cfg, parallel_stages=3), stages)
    assert [s.id for s in first._ready()] == ["make_synthetic_benchmark", "make_tiny_models"]  # 7 stages wait on it, 6
    plain = run_pipeline.Scheduler(dataclasses.replace(cfg, parallel_stages=3, critical_path_first=False), stages)
    assert [s.id for s in plain._ready()] == ["make_tiny_models", "make_synthetic_benchmark"]  # the plan's order
    assert plain._niceness == {}

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        run_pipeline.lower_priority(sleeper.pid, 7)
        assert os.getpriority(os.PRIO_PROCESS, sleeper.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_demo_scores_its_request_against_the_sentences_gold_labels(capsys):
    from jobs import run_demo

    gold = run_demo.gold_entities(["Kevin", "Durant", "joins", "Golden", "State"], ["B-PER", "I-PER", "O", "B-ORG", "I-ORG"])
    assert gold == [{"text": "Kevin Durant", "type": "PER", "start": 0, "end": 2},
                    {"text": "Golden State", "type": "ORG", "start": 3, "end": 5}]
    run_demo.print_response({"entities": [{"text": "Kevin Durant", "type": "PER", "start": 0, "end": 2},
                                          {"text": "Golden", "type": "LOC", "start": 3, "end": 4}],
                             "divergence": {"strengthen": 0.61234, "complement": 0.3, "weaken": 0.08766}}, gold)
    out = capsys.readouterr().out
    assert "gold:       Kevin Durant (PER), Golden State (ORG)   (1 of 2 found, 2 predicted)" in out
    assert "strengthen 0.61, complement 0.30, weaken 0.09" in out


def test_ray_runs_its_workers_nicer_than_the_driver_and_the_pipeline_reads_by_how_much(ray_local):
    # Ray's worker_niceness (15 by default; less only when the driver itself is already niced past 4)
    assert 0 < run_pipeline.ray_worker_niceness() <= 15


def test_the_demos_fast_request_starts_no_back_translator_replica_and_leaves_the_config_as_it_was():
    from jobs import run_demo
    from serve.app import load_serve_config

    config = load_serve_config("configs/serve.tiny.yaml")
    demo = run_demo.without_idle_back_translator(config)

    def deployments(cfg):
        return {d["name"]: d for app in cfg["applications"] for d in app["deployments"]}

    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(demo)  # what Serve itself checks before deploying
    translators = ("BackTranslator", "REBackTranslator")  # the shared one and RE's own
    for name in translators:
        assert deployments(demo)[name]["autoscaling_config"]["min_replicas"] == 0
        assert deployments(config)[name]["autoscaling_config"]["min_replicas"] == 1  # serve run keeps it warm
    assert {k: v for k, v in deployments(demo).items() if k not in translators} == \
        {k: v for k, v in deployments(config).items() if k not in translators}

