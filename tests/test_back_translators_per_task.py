"""A back-translator per task: Serve (``back_translation_task_models``) and jobs.predict
(``back_translation.task_models``) make and look up each task's v' with that task's own
text-to-image model, every other generation setting shared, in one cache folder.

The second model is the tiny pipeline with one weight perturbed: another content hash (another
cache identity) and other pixels. In process, no Ray: Serve's app graph is built but not deployed,
its model classes run as objects (``in_process_pipeline``), predict's actor classes run on a table.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from benchmarks.bench_serve import make_untrained_checkpoints, png_bytes, tiny_app_args

REPO = Path(__file__).resolve().parents[1]
TOKENS = "Kevin Durant joins the Golden State Warriors".split()
OTHER = "Golden State Warriors beat Kevin Durant in Oakland".split()


def perturbed_copy(source: str, target: Path) -> str:
    """``source``'s pipeline with its UNet's output bias shifted: another model for the cache."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    path = target / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["conv_out.bias"] = tensors["conv_out.bias"] + 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    return str(target)


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("per-task-back-translators")
    return {"tiny": tiny_models, "root": root,
            "checkpoints": make_untrained_checkpoints(root / "models", tiny_models),
            "ner_t2i": tiny_models["text_to_image"],
            "re_t2i": perturbed_copy(tiny_models["text_to_image"], root / "t2i-re")}


# ----------------------------------------------------------------------------- Serve


def test_build_app_gives_a_task_its_own_back_translator_deployment_only_for_a_model_of_its_own():
    from pydantic import ValidationError
    from ray.serve._private.build_app import build_app as build_graph

    from serve.app import AppArgs, build_app, deployment_names, load_serve_config

    base = {"ner_model": "ner", "re_model": "re", "generation": {"model": "t2i/ner", "steps": 3, "height": 32}}

    def wiring(**update) -> tuple[dict, dict]:
        """(back-translator deployment -> its generation settings, model deployment -> the one it calls)."""
        args = AppArgs.model_validate({**base, **update})
        graph = {d.name: d for d in build_graph(build_app(args), name="tmr").deployments}
        assert set(graph) == set(deployment_names(args))
        translators = {name: d.init_args[0] for name, d in graph.items() if name.endswith("BackTranslator")}
        calls = {name: d.init_args[2].deployment_name for name, d in graph.items() if name.endswith("Model")}
        return translators, calls

    translators, calls = wiring()
    assert list(translators) == ["BackTranslator"] and translators["BackTranslator"]["model"] == "t2i/ner"
    assert calls == {"NERModel": "BackTranslator", "REModel": "BackTranslator"}

    translators, calls = wiring(back_translation_task_models={"re": "t2i/re"})
    assert calls == {"NERModel": "BackTranslator", "REModel": "REBackTranslator"}
    assert translators["REBackTranslator"] == {**translators["BackTranslator"], "model": "t2i/re"}  # the rest shared
    assert translators["BackTranslator"]["model"] == "t2i/ner" and translators["BackTranslator"]["steps"] == 3

    for same in ({"re": "t2i/ner"}, {}):  # RE's model is the shared one: no deployment of its own
        translators, calls = wiring(back_translation_task_models=same)
        assert list(translators) == ["BackTranslator"] and set(calls.values()) == {"BackTranslator"}
    translators, calls = wiring(re_model=None, back_translation_task_models={"re": "t2i/re"})  # NER only
    assert list(translators) == ["BackTranslator"] and calls == {"NERModel": "BackTranslator"}
    translators, calls = wiring(back_translation_task_models={"ner": "t2i/x", "re": "t2i/x"})  # one model, one deployment
    assert list(translators) == ["NERBackTranslator"]
    assert calls == {"NERModel": "NERBackTranslator", "REModel": "NERBackTranslator"}

    with pytest.raises(ValidationError, match="back_translation_task_models"):
        AppArgs.model_validate({**base, "back_translation_task_models": {"mre": "t2i/re"}})
    # Serve refuses a deployments: entry the app lacks: overriding the demo config's RE model away drops its entry
    demo = load_serve_config(REPO / "configs" / "serve.tiny.yaml")
    shared = load_serve_config(REPO / "configs" / "serve.tiny.yaml", {"back_translation_task_models": {}})
    assert "REBackTranslator" in [d["name"] for d in demo["applications"][0]["deployments"]]
    assert [d["name"] for d in shared["applications"][0]["deployments"]] == \
        ["TMRIngress", "NERModel", "REModel", "BackTranslator"]
    ner_only = load_serve_config(REPO / "configs" / "serve.tiny.yaml", {"re_model": None})  # and RE's model entry
    assert [d["name"] for d in ner_only["applications"][0]["deployments"]] == ["TMRIngress", "NERModel", "BackTranslator"]
    with pytest.raises(ValidationError, match="empty model"):
        AppArgs.model_validate({**base, "back_translation_task_models": {"re": ""}})
    # both tasks with models of their own: no shared BackTranslator at all
    translators, calls = wiring(back_translation_task_models={"ner": "t2i/a", "re": "t2i/b"})
    assert sorted(translators) == ["NERBackTranslator", "REBackTranslator"]
    assert calls == {"NERModel": "NERBackTranslator", "REModel": "REBackTranslator"}


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """Both tasks' model classes in process, RE with its own back-translator, full mode possible."""
    from serve.app import AppArgs, in_process_pipeline

    cache = tmp_path_factory.mktemp("per-task-serve-cache")
    args = tiny_app_args(models["checkpoints"], models["tiny"], cache, auth_token_env=None,
                         back_translation_task_models={"re": models["re_t2i"]})
    return in_process_pipeline(AppArgs.model_validate(args))


def _cache_path(model, tokens: list[str]) -> str:
    """Where ``model``'s look-up finds v' for ``tokens`` (its own model's identity in the key)."""
    from tmr_core.inference import prompts_and_seeds

    (prompt,), (seed,) = prompts_and_seeds([model._row({"tokens": tokens})], model.look_up.seed,
                                           model.look_up.per_sample)
    return model.look_up.translator.uri_for(prompt, seed)


def test_serve_looks_up_and_generates_each_tasks_v_prime_with_its_own_model(served, models):
    from serve.deployments import call
    from tmr_core.back_translation import pipeline_identity

    ner, re = served.ner, served.re
    assert ner.look_up.translator.settings.model_identity == pipeline_identity(models["ner_t2i"])
    assert re.look_up.translator.settings.model_identity == pipeline_identity(models["re_t2i"])
    assert re.look_up.translator.settings.steps == ner.look_up.translator.settings.steps  # the rest shared
    listed = {info["name"]: info["source_uri"] for info in asyncio.run(served.models())}
    assert listed["back_translator"] == models["ner_t2i"] and listed["back_translator_re"] == models["re_t2i"]

    # a full-mode RE miss is made by RE's back-translator, stored under RE's model's key
    request = {"tokens": TOKENS, "image": png_bytes(), "mode": "full",
               "head": {"start": 0, "end": 2}, "tail": {"start": 4, "end": 7}}
    made = asyncio.run(call(re, "predict", request))["back_translation"]
    assert made["uri"] == _cache_path(re, TOKENS) != _cache_path(ner, TOKENS) and made["cached"] is False
    assert not Path(_cache_path(ner, TOKENS)).exists()
    again = asyncio.run(call(re, "predict", {**request, "mode": "fast"}))["back_translation"]
    assert again == {**made, "cached": True}
    # NER's fast look-up does not take RE's image; its full mode makes its own, other pixels
    assert asyncio.run(call(ner, "predict", {"tokens": TOKENS, "image": None, "mode": "fast"}))[
        "back_translation"]["uri"] is None
    own = asyncio.run(call(ner, "predict", {"tokens": TOKENS, "image": None, "mode": "full"}))["back_translation"]
    assert own["uri"] == _cache_path(ner, TOKENS)
    assert Path(own["uri"]).read_bytes() != Path(made["uri"]).read_bytes()


# ----------------------------------------------------------------------------- jobs.predict


def _predict_config(models: dict, cache: Path, *extra: str, mode: str = "full"):
    from jobs import predict
    from jobs._config import parse_config

    checkpoints = models["checkpoints"]
    return parse_config(predict.Config, [
        "--config", "configs/predict.tiny.yaml", "--input", str(models["root"] / "posts.jsonl"),
        "--ner_model", checkpoints["ner"], "--re_model", checkpoints["re"], "--mode", mode,
        "--back_translation.cache_uri", str(cache), "--back_translation.generation.model", models["ner_t2i"],
        "--back_translation.generation.steps", "2", *extra])


def _rows(cfg, posts: list[list[str]]) -> list[dict]:
    from jobs import predict

    records = [{"id": str(i), "tokens": tokens, "_line": 1 + i} for i, tokens in enumerate(posts)]
    return predict.input_rows(cfg, records, str(REPO))


def _expected_uri(cfg, task: str, model: str, tokens: list[str]) -> str:
    """Where ``model``'s image of ``tokens`` is cached with ``task``'s generation settings."""
    from jobs.generate_back_translations import _settings
    from tmr_core.back_translation import BackTranslator, pipeline_identity
    from tmr_core.inference import prompts_and_seeds

    generation = cfg.back_translation.generation_for(task)
    translator = BackTranslator(_settings(generation, pipeline_identity(model)), cfg.back_translation.cache_uri)
    (prompt,), (seed,) = prompts_and_seeds([{"id": "x", "tokens": tokens}], generation.seed,
                                           generation.seed_per_sample)
    return translator.uri_for(prompt, seed)


def test_predict_gives_each_task_the_v_prime_of_its_own_model(models, tmp_path, monkeypatch):
    import pyarrow as pa

    from jobs import predict

    monkeypatch.chdir(REPO)
    cfg = _predict_config(models, tmp_path / "cache", "--back_translation.task_models", f"{{re: {models['re_t2i']}}}")
    step = predict.BackTranslate(cfg)
    assert len(step.steps) == 2
    rows = step(pa.Table.from_pylist(_rows(cfg, [TOKENS, OTHER]))).to_pylist()
    for row, tokens in zip(rows, (TOKENS, OTHER), strict=True):
        assert row["error"] is None
        assert row["back_translation_uri_ner"] == _expected_uri(cfg, "ner", models["ner_t2i"], tokens)
        assert row["back_translation_uri_re"] == _expected_uri(cfg, "re", models["re_t2i"], tokens)
        assert Path(row["back_translation_uri_ner"]).read_bytes() != Path(row["back_translation_uri_re"]).read_bytes()
        for task in ("ner", "re"):  # the steps read the task's v' under the plain names
            assert predict._as_task(row, task)["back_translation_uri"] == row[f"back_translation_uri_{task}"]
        out = predict.output_row(row, cfg.tasks)
        assert out["back_translation_used"] is True and out["back_translation_cached"] is False

    # fast mode: a row whose RE image is gone has no RE v' (and says so), its NER v' stays; the other row is whole
    Path(rows[1]["back_translation_uri_re"]).unlink()
    fast = predict.BackTranslate(_predict_config(models, tmp_path / "cache", "--back_translation.task_models",
                                                 f"{{re: {models['re_t2i']}}}", mode="fast"))
    first, second = fast(pa.Table.from_pylist(_rows(cfg, [TOKENS, OTHER]))).to_pylist()
    assert first["back_translation_uri_re"] == rows[0]["back_translation_uri_re"]
    assert second["back_translation_uri_re"] is None and second["back_translation_uri_ner"]
    assert second["error"] is None
    assert [predict.output_row(r, cfg.tasks)["back_translation_used"] for r in (first, second)] == [True, False]
    assert predict.output_row(first, cfg.tasks)["back_translation_cached"] is True

    # one model for both tasks: made once, the same image in both columns
    shared = predict.BackTranslate(_predict_config(models, tmp_path / "cache", "--back_translation.task_models", "{}"))
    assert len(shared.steps) == 1
    (row,) = shared(pa.Table.from_pylist(_rows(cfg, [TOKENS]))).to_pylist()
    assert row["back_translation_uri_ner"] == row["back_translation_uri_re"] == rows[0]["back_translation_uri_ner"]


def test_a_task_back_translator_failing_on_a_row_fails_that_row_only(models, tmp_path, monkeypatch):
    import pyarrow as pa

    from jobs import predict
    from jobs._config import ConfigError

    monkeypatch.chdir(REPO)
    cfg = _predict_config(models, tmp_path / "cache", "--back_translation.task_models", f"{{re: {models['re_t2i']}}}")
    step = predict.BackTranslate(cfg)
    re_translator = step.steps[models["re_t2i"]].translator
    generate = re_translator.__call__

    def fails_on_oakland(prompts, seeds):  # e.g. RE's pipeline cannot take this sentence
        if any("Oakland" in p for p in prompts):
            raise RuntimeError("RE back-translator failed (simulated)")
        return generate(prompts, seeds)

    step.steps[models["re_t2i"]].translator = fails_on_oakland
    good, bad = step(pa.Table.from_pylist(_rows(cfg, [TOKENS, OTHER]))).to_pylist()
    assert good["error"] is None and good["back_translation_uri_ner"] and good["back_translation_uri_re"]
    assert "back-translation: RE back-translator failed" in bad["error"] and bad["error"].endswith("(simulated)")
    assert bad["error"].startswith(f"{cfg.input}:2: ")

    with pytest.raises(ConfigError, match="--back_translation.task_models.*'mre'"):
        _predict_config(models, tmp_path / "cache", "--back_translation.task_models", "{mre: x}")


def test_the_tiny_configs_give_re_its_own_back_translator():
    import yaml

    from jobs import predict
    from jobs._config import load_config_file

    cfg = load_config_file(predict.Config, REPO / "configs" / "predict.tiny.yaml")
    assert cfg.back_translation.generation_for("ner").model == "outputs/demo/t2i/ner/model"
    assert cfg.back_translation.generation_for("re").model == "outputs/demo/t2i/re/model"
    assert load_config_file(predict.Config, REPO / "configs" / "predict.yaml").back_translation.task_models == {}
    serve_args = yaml.safe_load((REPO / "configs" / "serve.tiny.yaml").read_text())["applications"][0]["args"]
    assert serve_args["back_translation_task_models"] == {"re": cfg.back_translation.task_models["re"]}
    assert serve_args["generation"]["model"] == cfg.back_translation.generation.model
