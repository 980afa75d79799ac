"""Load benchmark of the TMR Serve app on loopback: latency, throughput, hop overhead, batching gain.

    python -m benchmarks.bench_serve                       # tiny models, ~2 minutes on 2 cores
    python -m benchmarks.bench_serve --smoke-test          # a handful of requests, seconds after startup
    python -m benchmarks.bench_serve --ner-model outputs/tiny/ner/model --mde-model outputs/tiny/mde/model

Three measurements, each bounded by a request count and a time limit, side by side in one run:

1. in-process: the same deployment classes constructed in this process and called one request at
   a time (no Serve, no HTTP, no batching): the model cost of one fast-mode request;
2. served, 1 client: the same requests through HTTP → ingress → 4 deployments; p50 served minus
   p50 in-process is the overhead of the deployment graph (goal ≤ 10 ms); beside it, the same
   requests through an *echo graph* of the same shape (:func:`echo_graph_app`: ingress + four
   no-op deployments called in the same three rounds with the same payloads), the floor that
   Serve and this machine put under any graph of that shape;
3. served, 16 concurrent clients, with batching (``max_batch_size`` 16) and without (1):
   throughput ratio (goal ≥ 3×).

Without trained checkpoints it builds untrained ones from the tiny backbones
(:func:`make_untrained_checkpoints`): serving cost does not depend on the weights' values.
Prints a table and writes JSON (``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SENTENCES = [
    "Kevin Durant joins the Golden State Warriors in Oakland",
    "John Smith visits Paris with the Google team today",
    "the red car of Barack Obama in New York City",
    "Taylor Swift wins an award at the show in London",
]
RE_LABELS = ("None", "/per/loc/place_of_residence", "/per/org/member_of")


def make_untrained_checkpoints(root: str | Path, tiny: dict[str, str]) -> dict[str, str]:
    """Untrained NER, RE and MDE checkpoints on the tiny backbones, saved as ``from_pretrained`` folders.

    Args:
        root: where the ``ner``, ``re`` and ``mde`` folders go.
        tiny: ``tmr_core.tiny_models.ensure_tiny_models()``'s paths.
    """
    import torch

    from tmr_core.extractor import TMRConfig, TMRExtractor
    from tmr_core.mde import MultimodalDivergenceEstimator

    root = Path(root)
    paths = {}
    for task, labels in (("ner", ()), ("re", RE_LABELS)):
        torch.manual_seed(0)
        model = TMRExtractor.build(TMRConfig(
            task=task, labels=labels, text_encoder=tiny["text_encoder"], image_encoder=tiny["image_encoder"],
            num_heads=2, dropout=0.0,
        ))
        paths[task] = str(root / task)
        model.save_pretrained(paths[task])
    torch.manual_seed(0)
    mde = MultimodalDivergenceEstimator.from_backbone(tiny["mde_backbone"], projection_dim=16)
    paths["mde"] = str(root / "mde")
    mde.save_pretrained(paths["mde"])
    return paths


def tiny_app_args(checkpoints: dict[str, str], tiny: dict[str, str], cache_dir: str | Path, **overrides: Any) -> dict:
    """``AppArgs`` for the tiny models, on absolute paths (replicas may run in another directory)."""
    args = {
        "ner_model": checkpoints["ner"],
        "re_model": checkpoints["re"],
        "mde_model": checkpoints["mde"],
        "grounder_model": tiny["detector"],
        "phrase_parser": "tiny",
        "generation": {"model": tiny["text_to_image"], "scheduler": "EulerDiscreteScheduler", "steps": 2,
                       "guidance_scale": 1.0, "height": 32, "width": 32},
        "back_translation_cache": str(cache_dir),
        "image_uri_prefixes": [],
    }
    args.update(overrides)
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(size: tuple[int, int] = (96, 72), colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    from PIL import Image

    image = Image.new("RGB", size, colour)
    image.paste((250, 250, 250), (10, 10, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- measurements


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_s)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * p95}


def in_process_latencies(args: dict, image: bytes, count: int, time_limit_s: float) -> list[float]:
    """Fast-mode requests on the deployment classes built here, one at a time, no Serve."""
    from serve.app import AppArgs, in_process_pipeline
    from serve.schemas import NERRequest

    # fast mode never calls the back-translator, and the benchmark sends NER requests only
    pipeline = in_process_pipeline(AppArgs.model_validate(args), tasks=("ner",), back_translator=False)

    async def run() -> list[float]:
        latencies: list[float] = []
        for sentence in SENTENCES:  # warm-up, as http_load does
            await pipeline.ner_request(NERRequest(text=sentence, mode="fast"), image)
        deadline = time.perf_counter() + time_limit_s
        for i in range(count):
            started = time.perf_counter()
            await pipeline.ner_request(NERRequest(text=SENTENCES[i % len(SENTENCES)], mode="fast"), image)
            latencies.append(time.perf_counter() - started)
            if time.perf_counter() > deadline:
                break
        return latencies

    return asyncio.run(run())


def http_load(url: str, image: bytes, clients: int, count: int, time_limit_s: float,
              token: str | None = None) -> dict[str, Any]:
    """``clients`` threads send fast-mode ``/v1/ner`` requests until ``count`` or the time limit."""
    import requests

    body_image = base64.b64encode(image).decode()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    latencies: list[float] = []
    steps: dict[str, list[float]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    sent = [0]
    deadline = time.perf_counter() + time_limit_s

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                if sent[0] >= count or time.perf_counter() > deadline:
                    return
                index = sent[0]
                sent[0] += 1
            body = {"text": SENTENCES[index % len(SENTENCES)], "image": body_image, "mode": "fast"}
            started = time.perf_counter()
            response = session.post(f"{url}/v1/ner", json=body, headers=headers, timeout=120)
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code == 200:
                    latencies.append(elapsed)
                    for name, ms in server_timing(response.headers.get("Server-Timing", "")).items():
                        steps.setdefault(name, []).append(ms)
                else:
                    errors.append(f"{response.status_code}: {response.text[:200]}")

    # warm-up: every replica has served a request before the clock starts
    for sentence in SENTENCES:
        requests.post(f"{url}/v1/ner", json={"text": sentence, "image": body_image}, headers=headers, timeout=120)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if not latencies:
        raise RuntimeError(f"{url}/v1/ner: every request failed, e.g. {errors[:2]}")
    step_p50 = {name: statistics.median(values) for name, values in steps.items()}
    return {**percentiles(latencies), "step_p50_ms": step_p50, "clients": clients, "wall_s": wall,
            "throughput_rps": len(latencies) / wall if wall else 0.0, "errors": errors[:5], "num_errors": len(errors)}


def server_timing(header: str) -> dict[str, float]:
    """``{"features": 4.1, …}`` from a ``Server-Timing`` header (``name;dur=ms, …``)."""
    timings = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, rest = part.partition(";")
        if rest.startswith("dur="):
            timings[name] = float(rest[4:])
    return timings


def healthz_latencies(url: str, count: int) -> dict[str, Any]:
    """GET /healthz one at a time: HTTP proxy + ingress, no model hop (the floor under /v1/ner)."""
    import requests

    session = requests.Session()
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        session.get(f"{url}/healthz", timeout=30).raise_for_status()
        latencies.append(time.perf_counter() - started)
    return percentiles(latencies)


def echo_graph_app():
    """The fast-mode ``/v1/ner`` call pattern with no-op steps: round 1 the length check, phrases
    and MDE in parallel, round 2 the grounder, round 3 the extractor — each carrying what the real
    call carries (tokens; the decoded image bytes to the MDE and grounder)."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        async def run(self, *payload: Any) -> int:
            return len(payload)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class EchoIngress:
        def __init__(self, phrases, grounder, mde, ner):
            self.phrases, self.grounder, self.mde, self.ner = phrases, grounder, mde, ner

        @api.post("/v1/ner")
        async def ner_request(self, body: dict) -> dict:
            tokens, image = body["text"].split(), base64.b64decode(body.get("image") or "")
            await asyncio.gather(self.ner.run.remote(tokens), self.phrases.run.remote(tokens),
                                 self.mde.run.remote(tokens, image))
            await self.grounder.run.remote(image, tokens)
            await self.ner.run.remote(tokens)
            return {"entities": []}

    steps = [Echo.options(name=f"Echo{name}").bind() for name in ("Phrases", "Grounder", "MDE", "NER")]
    return EchoIngress.bind(*steps)


def deploy(args: dict, port: int, max_batch_size: int) -> str:
    from serve.app import deploy_config, load_serve_config

    repo = Path(__file__).resolve().parents[1]
    batching = {"max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.005 if max_batch_size > 1 else 0.0}
    config = load_serve_config(repo / "configs" / "serve.tiny.yaml", {**args, "batching": batching})
    return deploy_config(config, port=port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke-test", action="store_true", help="A few requests per measurement.")
    parser.add_argument("--requests", type=int, default=200, help="Most requests per measurement.")
    parser.add_argument("--time-limit", type=float, default=25.0, help="Most seconds per measurement.")
    parser.add_argument("--clients", type=int, default=16, help="Concurrent clients for the batching comparison.")
    parser.add_argument("--ner-model", default=None, help="NER checkpoint (default: untrained tiny).")
    parser.add_argument("--mde-model", default=None, help="MDE checkpoint (default: untrained tiny).")
    parser.add_argument("--output", default="outputs/bench/serve.json", help="Where the JSON results go.")
    options = parser.parse_args(argv)
    if options.smoke_test:
        options.requests, options.time_limit = 4, 10.0

    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    import ray
    from ray import serve

    from tmr_core.tiny_models import ensure_tiny_models

    tiny = ensure_tiny_models()
    work = Path(tempfile.mkdtemp(prefix="tmr-bench-serve-"))
    checkpoints = make_untrained_checkpoints(work / "models", tiny)
    checkpoints["ner"] = options.ner_model or checkpoints["ner"]
    checkpoints["mde"] = options.mde_model or checkpoints["mde"]
    args = tiny_app_args(checkpoints, tiny, work / "cache", auth_token_env=None)
    image = png_bytes()

    results: dict[str, Any] = {"smoke_test": options.smoke_test, "requests": options.requests,
                               "time_limit_s": options.time_limit}
    results["in_process"] = percentiles(in_process_latencies(args, image, options.requests, options.time_limit))
    # address="local": a fresh loopback cluster even when another one runs on this machine
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": (echo_port := free_port())})
        serve.run(echo_graph_app(), name="echo", route_prefix="/")
        results["echo_graph_1_client"] = http_load(f"http://127.0.0.1:{echo_port}", image, 1, options.requests,
                                                   options.time_limit)
        serve.shutdown()
        for name, batch_size in (("batched", 16), ("unbatched", 1)):
            url = deploy(args, free_port(), batch_size)
            if name == "unbatched":
                results["healthz_1_client"] = healthz_latencies(url, options.requests)
            results[f"served_1_client_{name}"] = http_load(url, image, 1, options.requests, options.time_limit)
            results[f"served_{options.clients}_clients_{name}"] = http_load(
                url, image, options.clients, options.requests * 2, options.time_limit
            )
            serve.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()

    # the graph's own cost: unbatched, so no replica waits for batch mates (batching trades up to
    # batch_wait_timeout_s per batched hop for throughput; that cost is reported apart)
    results["overhead_p50_ms"] = results["served_1_client_unbatched"]["p50_ms"] - results["in_process"]["p50_ms"]
    results["echo_graph_floor_p50_ms"] = results["echo_graph_1_client"]["p50_ms"]
    results["overhead_p50_ms_batched"] = results["served_1_client_batched"]["p50_ms"] - results["in_process"]["p50_ms"]
    batched = results[f"served_{options.clients}_clients_batched"]["throughput_rps"]
    unbatched = results[f"served_{options.clients}_clients_unbatched"]["throughput_rps"]
    results["batching_throughput_ratio"] = batched / unbatched if unbatched else float("nan")

    print(f"{'measurement':<34}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'req/s':>10}")
    for key in ("in_process", "healthz_1_client", "echo_graph_1_client", "served_1_client_unbatched", "served_1_client_batched", f"served_{options.clients}_clients_batched",
                f"served_{options.clients}_clients_unbatched"):
        row = results[key]
        print(f"{key:<34}{row['n']:>6}{row['p50_ms']:>10.1f}{row['p95_ms']:>10.1f}{row.get('throughput_rps', 0):>10.1f}")
    print(f"deployment-graph overhead, p50: {results['overhead_p50_ms']:.1f} ms (goal ≤ 10 ms); with batching "
          f"(up to {0.005 * 1000:.0f} ms batch wait per batched hop): {results['overhead_p50_ms_batched']:.1f} ms; "
          f"an echo graph of the same shape costs {results['echo_graph_floor_p50_ms']:.1f} ms here")
    steps = results["served_1_client_unbatched"]["step_p50_ms"]
    if steps:
        inside = " + ".join(f"{name} {ms:.1f}" for name, ms in steps.items())
        print(f"inside the ingress, 1 client unbatched, p50 ms: {inside} = {sum(steps.values()):.1f}; "
              f"the rest of {results['served_1_client_unbatched']['p50_ms']:.1f} is HTTP, the proxy and the ingress route")
    print(f"batched / unbatched throughput at {options.clients} clients: {results['batching_throughput_ratio']:.2f}x "
          "(goal ≥ 3x)")
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
