"""`make demo`: the whole pipeline on tiny models, then the Serve app answering one request.

    python -m jobs.run_demo                      # what `make demo` runs
    python -m jobs.run_demo --serve false        # the pipeline only

Steps: ``jobs.run_pipeline`` with ``configs/pipeline.tiny.yaml`` (local Ray, local files, sqlite
MLflow), then ``configs/serve.tiny.yaml`` deployed on 127.0.0.1 and one ``POST /v1/ner`` with a test
sentence and its image from the benchmark, then the summary and where to look next.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass

from jobs import run_pipeline
from jobs._config import load_config_file, opt, parse_config, print_config, run_main
from tmr_core.errors import TMRError


@dataclass
class Config:
    """Run the tiny pipeline end to end, serve its models and send one request."""

    pipeline_config: str = opt("configs/pipeline.tiny.yaml", "The run_pipeline config to run.")
    serve_config: str = opt("configs/serve.tiny.yaml", "The Serve config deployed after the pipeline.")
    serve: bool = opt(True, "Deploy the Serve app and send one request after the pipeline.")
    port: int = opt(8000, "HTTP port of the Serve app on 127.0.0.1.")
    quiet: bool = opt(True, "One line per stage on the terminal; each stage's full output goes to <workdir>/logs/.")


def first_test_sentence(benchmark_dir: str):
    """The benchmark's first NER test sentence (tokens, gold tags) and its image path."""
    from tmr_core.readers import read_twitter_ner

    sentence = read_twitter_ner(os.path.join(benchmark_dir, "ner", "test.txt"))[0]
    return sentence, os.path.join(benchmark_dir, "images", f"{sentence.image_id}.png")


def gold_entities(tokens: list[str], tags: list[str]) -> list[dict]:
    """The sentence's gold entities as the API names them (text, type, token start and end)."""
    from tmr_core.metrics import chunks

    return [{"text": " ".join(tokens[start:end]), "type": kind, "start": start, "end": end}
            for kind, start, end in chunks(tags)]


def serve_one_request(cfg: Config, text: str, image: str, log: str | None) -> tuple[str, dict]:
    """Deploy the tiny Serve config on a fresh local Ray, POST one fast-mode sentence + image, shut
    down; returns the URL it served at and the response. With ``log``, Ray's and Serve's output go there."""
    import ray

    from jobs.run_pipeline import output_to
    from serve.app import demo_request, deploy_config, load_serve_config

    config = without_idle_back_translator(load_serve_config(cfg.serve_config))
    with output_to(log):  # on a failure it shows the log's last lines
        if ray.is_initialized():  # the pipeline's session; Serve gets a fresh local one on loopback
            ray.shutdown()
        ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
        try:
            url = deploy_config(config, port=cfg.port)
            return url, demo_request(url, image, text)
        finally:
            # the local cluster goes with everything on it: no graceful serve.shutdown() (~5 s on 2 cores)
            ray.shutdown()


def without_idle_back_translator(config: dict) -> dict:
    """The config with no back-translator replica kept warm (``BackTranslator`` and every task's
    own, e.g. ``REBackTranslator``): the demo's one request is fast mode, which never calls them,
    and starting one costs ~10 s of the demo on 2 cores (the page's full mode under ``serve run``
    still gets the config's replicas)."""
    config = copy.deepcopy(config)
    for app in config.get("applications", []):
        for deployment in app.get("deployments", []):
            scaling = deployment.get("autoscaling_config")
            if str(deployment.get("name", "")).endswith("BackTranslator") and scaling:
                scaling.update(min_replicas=0, initial_replicas=0)
    return config


class PortInUseError(TMRError):
    """The Serve port is taken (another demo, a notebook server …)."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on ``host:port`` (Serve's proxy would fail to bind it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def print_response(response: dict, gold: list[dict]) -> None:
    """The prediction beside the sentence's gold entities (the request is a test sentence)."""
    def named(entities: list[dict]) -> str:
        return ", ".join(f"{e['text']} ({e['type']})" for e in entities) or "none"

    predicted = {(e["start"], e["end"], e["type"]) for e in response.get("entities", [])}
    correct = sum((e["start"], e["end"], e["type"]) in predicted for e in gold)
    divergence = response.get("divergence")
    print("\n## Serve response (/v1/ner), scored against the sentence's gold labels\n")
    print(f"predicted:  {named(response.get('entities', []))}")
    print(f"gold:       {named(gold)}   ({correct} of {len(gold)} found, {len(predicted)} predicted)")
    if divergence:
        print("divergence: " + ", ".join(f"{k} {v:.2f}" for k, v in divergence.items()))
    back = response.get("back_translation") or {}
    print(f"back-translation: used={back.get('used')} cached={back.get('cached')} id={back.get('id')}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog="jobs.run_demo")
    pipeline_cfg = load_config_file(run_pipeline.Config, cfg.pipeline_config)
    if cfg.quiet:  # the pipeline's resolved config is in <workdir>/pipeline.config.yaml, each stage's in its output
        pipeline_cfg = dataclasses.replace(pipeline_cfg, stage_logs=True)
    else:
        print_config(cfg, "run_demo")
    stages, ran, total = run_pipeline.execute(pipeline_cfg)
    busy = cfg.serve and port_in_use(cfg.port)
    response = None
    if cfg.serve and not busy:
        sentence, image = first_test_sentence(os.path.join(pipeline_cfg.workdir, "benchmark"))
        text = " ".join(sentence.tokens)
        log = os.path.join(pipeline_cfg.workdir, "logs", "serve.log") if cfg.quiet else None
        started = time.perf_counter()
        url, response = serve_one_request(cfg, text, image, log)
        print(f"=== [serve] {cfg.serve_config} answered POST {url}/v1/ner in {time.perf_counter() - started:.1f} s "
              f"(deploy included){f' · log: {log}' if log else ''}", flush=True)

    run_pipeline.print_summary(pipeline_cfg, stages, ran, total)
    if busy:  # after the summary: the pipeline's work is done and shown
        raise PortInUseError(f"port {cfg.port} on 127.0.0.1 is in use, so the Serve app was not started; "
                             f"free it or choose another: make demo PORT=8001 (python -m jobs.run_demo --port 8001)")
    if response is not None:
        print(f"\nRequest: {text!r} with image {image}")
        print_response(response, gold_entities(sentence.tokens, sentence.tags))
    tracking = pipeline_cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    print("\n## Next\n")
    if cfg.quiet:
        print(f"Logs:       {os.path.join(pipeline_cfg.workdir, 'logs')}/<stage>.log (each stage's full output)")
    print(f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking}   → http://127.0.0.1:5000")
    print(f"Demo page:  .venv/bin/serve run {cfg.serve_config}   → http://127.0.0.1:{cfg.port}/")
    print(f"Tables:     {os.path.join(pipeline_cfg.workdir, 'comparison')}/")
    return 0


if __name__ == "__main__":
    run_main(main)
