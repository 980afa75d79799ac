"""`make demo`: the whole pipeline on tiny models, then the Serve app answering one request.

    python -m jobs.run_demo                      # what `make demo` runs
    python -m jobs.run_demo --serve false        # the pipeline only

Steps: ``jobs.run_pipeline`` with ``configs/pipeline.tiny.yaml`` (local Ray, local files, sqlite
MLflow), then ``configs/serve.tiny.yaml`` deployed on 127.0.0.1 and one ``POST /v1/ner`` with a test
sentence and its image from the benchmark, then the summary and where to look next.
"""

from __future__ import annotations

import json
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


def first_test_sentence(benchmark_dir: str) -> tuple[str, str]:
    """Text and image path of the benchmark's first NER test sentence."""
    from tmr_core.readers import read_twitter_ner

    sentence = read_twitter_ner(os.path.join(benchmark_dir, "ner", "test.txt"))[0]
    return " ".join(sentence.tokens), os.path.join(benchmark_dir, "images", f"{sentence.image_id}.png")


def serve_one_request(cfg: Config, pipeline_cfg: run_pipeline.Config) -> dict:
    """Deploy the tiny Serve config on a fresh local Ray, POST one sentence + image, shut down."""
    import ray
    from ray import serve

    from serve.app import demo_request, deploy_config, load_serve_config

    text, image = first_test_sentence(os.path.join(pipeline_cfg.workdir, "benchmark"))
    config = load_serve_config(cfg.serve_config)
    if ray.is_initialized():  # the pipeline's session; Serve gets a fresh local one on loopback
        ray.shutdown()
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        url = deploy_config(config, port=cfg.port)
        print(f"\n[run_demo] Serve app up at {url} in {time.perf_counter() - started:.1f} s")
        print(f"[run_demo] POST {url}/v1/ner  text={text!r}  image={image}")
        return demo_request(url, image, text)
    finally:
        serve.shutdown()
        ray.shutdown()


class PortInUseError(TMRError):
    """The Serve port is taken (another demo, a notebook server …)."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something already listens on ``host:port`` (Serve's proxy would fail to bind it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def print_response(response: dict) -> None:
    entities = ", ".join(f"{e['text']} ({e['type']})" for e in response.get("entities", [])) or "none"
    divergence = response.get("divergence")
    print("\n## Serve response (/v1/ner)\n")
    print(f"entities:   {entities}")
    if divergence:
        print("divergence: " + json.dumps(divergence))
    back = response.get("back_translation") or {}
    print(f"back-translation: used={back.get('used')} cached={back.get('cached')} id={back.get('id')}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(Config, argv, prog="jobs.run_demo")
    print_config(cfg, "run_demo")
    pipeline_cfg = load_config_file(run_pipeline.Config, cfg.pipeline_config)
    stages, ran, total = run_pipeline.execute(pipeline_cfg)
    busy = cfg.serve and port_in_use(cfg.port)
    response = serve_one_request(cfg, pipeline_cfg) if cfg.serve and not busy else None

    run_pipeline.print_summary(pipeline_cfg, stages, ran, total)
    if busy:  # after the summary: the pipeline's work is done and shown
        raise PortInUseError(f"port {cfg.port} on 127.0.0.1 is in use, so the Serve app was not started; "
                             f"free it or choose another: make demo PORT=8001 (python -m jobs.run_demo --port 8001)")
    if response is not None:
        print_response(response)
    tracking = pipeline_cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    print("\n## Next\n")
    print(f"MLflow UI:  .venv/bin/mlflow ui --backend-store-uri {tracking}   → http://127.0.0.1:5000")
    print(f"Demo page:  .venv/bin/serve run {cfg.serve_config}   → http://127.0.0.1:{cfg.port}/")
    print(f"Tables:     {os.path.join(pipeline_cfg.workdir, 'comparison')}/")
    return 0


if __name__ == "__main__":
    run_main(main)
