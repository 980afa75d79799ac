"""The TMR Serve application: a typed app builder, the ``import_path`` of configs/serve*.yaml.

    serve run configs/serve.tiny.yaml                      # local, tiny models
    serve deploy configs/serve.yaml                        # a running cluster (or a RayService's serveConfigV2)
    serve run serve.app:build_app ner_model=outputs/ner/best mode=full   # args on the command line

``build_app(AppArgs)`` binds the ingress to one model deployment per task, ``NERModel`` and
``REModel``, each running the whole composite model for a batch of requests in its own process,
and to the back-translator they call for a full-mode cache miss (see :mod:`serve.deployments`):
``BackTranslator`` for ``generation.model``, and ``REBackTranslator`` (``NERBackTranslator``) when
``back_translation_task_models`` gives that task a model of its own.
A request's hot path is proxy → ingress → model. Resources, replicas and autoscaling of each
deployment are set in the config file's ``deployments:`` section, by deployment name.

``python -m serve.app --config configs/serve.tiny.yaml`` deploys a config on a local cluster, HTTP
on the host and port of the config's ``http_options`` (127.0.0.1:8000 when it names none), sends
one request and prints the response (what ``make demo`` ends with).
"""


import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from ray.serve import Application

from serve.deployments import BackTranslator, TMRModel
from serve.ingress import IngressSettings, TMRIngress
from tmr_core.phrases import PHRASE_LENGTHS


class GenerationArgs(BaseModel):
    """The text-to-image settings; keep them equal to the back-translation job's so the cache is shared."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("stabilityai/stable-diffusion-2-1-base", description="diffusers pipeline name or folder.")
    revision: str | None = Field(None, description="Hub revision.")
    scheduler: str | None = Field(None, description="diffusers scheduler class; null keeps the pipeline's.")
    steps: int = Field(50, ge=1, description="Denoising steps.")
    guidance_scale: float = Field(7.5, description="Classifier-free guidance scale.")
    height: int = Field(512, description="Image height in pixels (multiple of 8).")
    width: int = Field(512, description="Image width in pixels (multiple of 8).")
    dtype: str = Field("float32", description="float32 | float16 | bfloat16.")
    device: str = Field("cpu", description="cpu | cuda.")


class BatchingArgs(BaseModel):
    """``@serve.batch`` settings of the model deployments (NERModel, REModel, BackTranslator)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(
        8, ge=1, description="Most requests one batch takes (each model step runs once per batch); 1: no batching.")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")


class AppArgs(BaseModel):
    """Everything ``build_app`` needs; the ``args:`` of configs/serve*.yaml."""

    model_config = ConfigDict(extra="forbid")

    ner_model: str = Field("models:/tmr-ner@champion", description="NER extractor: MLflow model URI, folder or s3://.")
    re_model: str | None = Field("models:/tmr-re@champion", description="RE extractor; null serves NER only.")
    mde_model: str = Field("models:/tmr-mde@champion", description="Divergence estimator (MDE).")
    mde_max_length: int = Field(40, ge=1, description="Word pieces per caption for the MDE (ViLT: 40).")
    grounder_model: str = Field("google/owlv2-base-patch16-ensemble", description="Detector: hub name, folder or models:/tmr-grounder@champion.")
    grounder_top_k: int = Field(3, ge=1, description="Regions per image (3 in the paper).")
    grounder_threshold: float = Field(0.0, description="Detector score threshold.")
    phrase_parser: Literal["stanza", "tiny"] = Field(
        "stanza", description="stanza constituency parser (needs its English models) or the offline tiny heuristic."
    )
    stanza_dir: str | None = Field(None, description="stanza models folder; null: stanza's default.")
    max_phrase_len: dict[Literal["ner", "re"], PositiveInt] = Field(
        default_factory=lambda: dict(PHRASE_LENGTHS),
        description="Longest noun phrase, in words, per task ({ner: 4, re: 6}: the paper's, which the training "
        "tables' extract_phrases and jobs.predict use); a task left out gets the paper's, one number applies "
        "to both tasks.")
    generation: GenerationArgs = Field(default_factory=GenerationArgs)
    back_translation_task_models: dict[Literal["ner", "re"], str] = Field(
        default_factory=dict,
        description="A back-translator per task (e.g. jobs.run_pipeline --back_translators per_task), overriding "
        "generation.model for that task: folder, s3:// or models:/tmr-t2i-re@champion; tasks not named use "
        "generation.model. Every other generation setting is shared; each task's images are cached under its "
        "own model's content hash, in the same back_translation_cache.")
    back_translation_cache: str = Field(
        ".cache/back_translations", description="Content-addressed image cache shared with generate_back_translations."
    )
    base_seed: int = Field(0, description="Back-translation seed (as in the batch job's generation.seed).")
    seed_per_sample: bool = Field(
        False, description="Per-sample seeds from the request's sample_id (as generation.seed_per_sample in the batch job)."
    )
    mode: Literal["fast", "full"] = Field(
        "fast", description="Default per request: full generates the back-translation, fast only looks it up."
    )
    batching: BatchingArgs = Field(default_factory=BatchingArgs)
    device: str = Field("cpu", description="Where NERModel/REModel run their models: extractor, MDE, grounder (cpu | cuda).")
    image_uri_prefixes: list[str] = Field(
        default_factory=list, description="Storage prefixes image_uri may read from (folders or s3://bucket/prefix)."
    )
    max_image_bytes: int = Field(10_000_000, ge=1, description="Largest accepted image file.")
    max_image_side: int = Field(4096, ge=1, description="Largest accepted image width or height, in pixels.")
    max_image_aspect: float = Field(
        10.0, ge=1, description="Largest accepted ratio of an image's long side to its short side (ViLT fails near 20)."
    )
    max_text_chars: int = Field(
        4000, ge=1, description="Longest accepted text, in characters (besides the model's word-piece limit)."
    )
    auth_token_env: str | None = Field(
        "TMR_SERVE_TOKEN",
        description="Env var holding the bearer token; unset or empty: no token needed (the server logs a warning).",
    )
    storage_endpoint_url: str | None = Field(None, description="S3-compatible endpoint for s3:// URIs.")
    storage_region: str | None = Field(None, description="S3 region.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI for models:/ URIs; null: $MLFLOW_TRACKING_URI.")
    examples_dir: str | None = Field(
        None, description="A synthetic benchmark folder (make_synthetic_benchmark's output) whose test items the "
        "demo page offers as examples (GET /v1/examples); null: no examples.")

    @field_validator("back_translation_task_models")
    @classmethod
    def _models_named(cls, models: dict[str, str]) -> dict[str, str]:
        empty = sorted(task for task, model in models.items() if not model)
        if empty:
            raise ValueError(f"back_translation_task_models: an empty model for {empty}; leave the task out to use "
                             "generation.model")
        return models

    @field_validator("max_phrase_len", mode="before")
    @classmethod
    def _phrase_length_per_task(cls, lengths: Any) -> Any:
        # one number (the configs before per-task limits) applies to both tasks; a task left out of
        # a mapping gets the paper's, so the validated args show every limit the models parse with
        if isinstance(lengths, dict):
            return {**PHRASE_LENGTHS, **lengths}
        return dict.fromkeys(PHRASE_LENGTHS, lengths)

    def generation_for(self, task: str) -> GenerationArgs:
        """The generation settings ``task``'s v' is made and looked up with: ``generation`` with its
        model replaced by ``back_translation_task_models[task]`` when one is given."""
        model = self.back_translation_task_models.get(task)
        if model is None or model == self.generation.model:
            return self.generation
        return self.generation.model_copy(update={"model": model})


TASKS = ("ner", "re")
DEFAULT_BACK_TRANSLATOR = "BackTranslator"


def back_translator_names(args: AppArgs, tasks: tuple[str, ...] = TASKS) -> dict[str, str]:
    """The back-translator deployment each served task calls, one per distinct model:
    ``BackTranslator`` for ``generation.model``, ``<TASK>BackTranslator`` (e.g. ``REBackTranslator``)
    for a task's own model (two tasks overridden with one model share the first task's)."""
    by_model: dict[str, str] = {}
    names = {}
    for task in tasks:
        if getattr(args, f"{task}_model") is None:
            continue
        model = args.generation_for(task).model
        if model not in by_model:
            by_model[model] = DEFAULT_BACK_TRANSLATOR if model == args.generation.model else f"{task.upper()}BackTranslator"
        names[task] = by_model[model]
    return names


def deployment_names(args: AppArgs) -> list[str]:
    """Every deployment ``build_app(args)`` creates, the names a config's ``deployments:`` may set
    options for (Serve refuses to deploy a config naming a deployment the app does not have)."""
    models = [f"{task.upper()}Model" for task in TASKS if getattr(args, f"{task}_model") is not None]
    return ["TMRIngress", *models, *dict.fromkeys(back_translator_names(args).values())]


def _back_translator_options(args: AppArgs) -> dict:
    return {"batching": args.batching.model_dump(), "tracking_uri": args.tracking_uri,
            "storage": {"endpoint_url": args.storage_endpoint_url, "region": args.storage_region}}


def _ingress_settings(args: AppArgs) -> IngressSettings:
    return IngressSettings(
        default_mode=args.mode,
        image_uri_prefixes=args.image_uri_prefixes,
        max_image_bytes=args.max_image_bytes,
        max_image_side=args.max_image_side,
        max_image_aspect=args.max_image_aspect,
        max_text_chars=args.max_text_chars,
        # base64 grows 4/3; leave room for the text and the JSON around it
        max_request_bytes=args.max_image_bytes * 4 // 3 + 1_000_000,
        auth_token_env=args.auth_token_env,
        cache_uri=args.back_translation_cache,
        storage_endpoint_url=args.storage_endpoint_url,
        storage_region=args.storage_region,
        examples_dir=args.examples_dir,
    )


def build_app(args: AppArgs) -> Application:
    """The TMR application: the ingress bound to one model deployment per task (``NERModel``,
    ``REModel``), each bound to its task's back-translator for full-mode cache misses: one
    deployment per distinct model (:func:`back_translator_names`), so the tasks share
    ``BackTranslator`` unless ``back_translation_task_models`` gives one its own (``REBackTranslator``).

    Serve reads the annotation to build ``AppArgs`` from the config's ``args`` (so this module
    does not use ``from __future__ import annotations``, which would make it a string).
    """
    names = back_translator_names(args)
    translators = {}
    for task, name in names.items():
        if name not in translators:
            translators[name] = BackTranslator.options(name=name).bind(
                args.generation_for(task).model_dump(), args.back_translation_cache, **_back_translator_options(args))
    models = {task: TMRModel.options(name=f"{task.upper()}Model").bind(task, args.model_dump(), translators[name])
              for task, name in names.items()}
    return TMRIngress.bind(models["ner"], models.get("re"), settings=_ingress_settings(args).model_dump())


def in_process_pipeline(args: AppArgs, cache_uri: str | None = None, tasks: tuple[str, ...] = TASKS,
                        back_translator: bool = True) -> Any:
    """The ingress's :class:`serve.ingress.Pipeline` over model objects built in this process (no
    Serve, no HTTP, no batching: each request is a batch of one): what benchmarks compare the
    served app with, and how eval_serve_modes scores it.

    Args:
        cache_uri: another back-translation cache than the app's (e.g. an empty one).
        tasks: build only these tasks' models (the others are ``None``).
        back_translator: build the diffusion pipelines for full mode, one per distinct model the
            tasks use, as :func:`build_app` (fast mode never needs them).
    """
    from serve.ingress import Pipeline

    if cache_uri is not None:
        args = args.model_copy(update={"back_translation_cache": cache_uri})
    names = back_translator_names(args, tasks)
    generators: dict[str, Any] = {}
    if back_translator:
        options = {**_back_translator_options(args), "batching": None}
        for task, name in names.items():
            if name not in generators:
                generators[name] = BackTranslator.func_or_class(
                    args.generation_for(task).model_dump(), args.back_translation_cache, **options)
    models = {task: TMRModel.func_or_class(task, args.model_dump(), generators.get(name), batched=False)
              for task, name in names.items()}
    return Pipeline(models.get("ner"), models.get("re"), settings=_ingress_settings(args))


# ----------------------------------------------------------------------------- local runs


def load_serve_config(path: str | Path, app_overrides: dict[str, Any] | None = None,
                      deployment_overrides: dict[str, dict] | None = None) -> dict:
    """A Serve config file as a dict, with ``args`` of the first application and per-deployment
    options overridden (tests point it at their own checkpoints; the demo at its port).

    A model or back-translator entry (``*Model``, ``*BackTranslator``) in ``deployments:`` that the
    resulting args do not create is dropped (e.g. ``--set back_translation_task_models={}`` over
    configs/serve.tiny.yaml's ``REBackTranslator``, or ``--set re_model=null`` and its ``REModel``):
    Serve would refuse to deploy a config naming a deployment the app lacks.
    """
    import yaml

    config = yaml.safe_load(Path(path).read_text())
    app = config["applications"][0]
    app["args"] = {**app.get("args", {}), **(app_overrides or {})}
    by_name = {d["name"]: d for d in app.setdefault("deployments", [])}
    for name, options in (deployment_overrides or {}).items():
        by_name.setdefault(name, {"name": name})
        by_name[name].update(options)
    try:
        created = set(deployment_names(AppArgs.model_validate(app["args"])))
    except ValueError:  # bad args: Serve reports them when it builds the app
        created = None
    app["deployments"] = [d for name, d in by_name.items() if created is None or name in created
                          or not name.endswith(("Model", DEFAULT_BACK_TRANSLATOR))]  # an unknown name stays: Serve names it
    return config


DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def http_address(config: dict, port: int | None = None) -> tuple[str, int]:
    """The host and port a config's ``http_options`` name (``port`` overrides its port);
    127.0.0.1:8000, loopback only, where it names none."""
    http = config.get("http_options") or {}
    return str(http.get("host") or DEFAULT_HOST), int(port if port is not None else http.get("port") or DEFAULT_PORT)


def deploy_config(config: dict, host: str | None = None, port: int | None = None, timeout_s: float = 180.0) -> str:
    """Deploy a Serve config dict on the connected Ray cluster the way ``serve run config.yaml``
    does, wait until every application runs, and return the HTTP base URL.

    HTTP listens on ``host``/``port``, by default those of the config's ``http_options``.

    Uses Serve's own deploy path (``ServeDeploySchema`` + the controller client), so the config
    is checked exactly as ``serve run``/``serve deploy``/a RayService check it.
    """
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    config_host, port = http_address(config, port)
    host = host or config_host
    client = serve_start(http_options={"host": host, "port": port})
    client.deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    names = [app.name for app in schema.applications]
    while True:
        statuses = {name: serve.status().applications.get(name) for name in names}
        states = {name: getattr(s, "status", "MISSING") for name, s in statuses.items()}
        if all(state == "RUNNING" for state in states.values()):
            return f"http://{host}:{port}"
        failed = {n: s.message for n, s in statuses.items() if s is not None and s.status == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"Serve application failed to deploy: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.25)


def demo_request(base_url: str, image_path: str | None, text: str, token: str | None = None) -> dict:
    """POST one sentence (and image) to ``/v1/ner`` and return the JSON response."""
    import requests

    body: dict[str, Any] = {"text": text}
    if image_path:
        body["image"] = base64.b64encode(Path(image_path).read_bytes()).decode()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.post(f"{base_url}/v1/ner", json=body, headers=headers, timeout=120)
    response.raise_for_status()
    return response.json()


def main(argv: list[str] | None = None) -> int:
    """Deploy a config on a local Ray cluster (HTTP where its http_options say), send one request, print the answer."""
    import ray
    from ray import serve

    parser = argparse.ArgumentParser(prog="python -m serve.app", description=main.__doc__)
    parser.add_argument("--config", default="configs/serve.tiny.yaml", help="Serve config file.")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Override app args, e.g. --set ner_model=outputs/ner/best mode=full (values are YAML).")
    parser.add_argument("--port", type=int, default=None,
                        help="HTTP port (default: the config's http_options.port, else 8000).")
    parser.add_argument("--text", default="Kevin Durant joins the Golden State Warriors in Oakland")
    parser.add_argument("--image", default=None, help="Image file to send with the text.")
    parser.add_argument("--keep-running", action="store_true", help="Leave the app up (Ctrl-C stops it).")
    options = parser.parse_args(argv)

    import yaml

    overrides = {}
    for item in options.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    config = load_serve_config(options.config, overrides)
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        host, port = http_address(config, options.port)
        url = deploy_config(config, host=host, port=port)
        print(f"TMR app running at {url} (docs: {url}/docs, demo page: {url}/)")
        import os

        token = os.environ.get(config["applications"][0]["args"].get("auth_token_env") or "", "") or None
        print(json.dumps(demo_request(url, options.image, options.text, token), indent=2))
        if options.keep_running:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
