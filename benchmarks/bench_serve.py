"""Load benchmark of the TMR Serve app on loopback: hop overhead against echo floors, throughput, batching gain.

    python -m benchmarks.bench_serve                       # tiny models, a few minutes on 2 cores
    python -m benchmarks.bench_serve --size paper          # paper-size random-init models (real FLOPs)
    python -m benchmarks.bench_serve --size paper --device cuda   # on a GPU
    python -m benchmarks.bench_serve --smoke-test          # a handful of requests per arm
    python -m benchmarks.bench_serve --ner-model outputs/demo/extractor/ner/full/model --mde-model outputs/demo/mde/model

Everything is measured in one run, on one Serve instance that holds four applications at once:

- ``unbatched`` and ``batched``: the real app (configs/serve.tiny.yaml's deployments, NER only)
  with ``max_batch_size`` 1 and ``--clients``: proxy → ingress → NERModel; the BackTranslator
  has ``min_replicas: 0`` and fast mode never wakes it;
- ``echo-one-hop``: the new shape with no-op work, proxy → ingress → one echo model call
  carrying what the real call carries (tokens and image bytes in, an answer of the same fields
  out): the floor that Serve and this machine put under the app;
- ``echo-three-rounds``: the old shape as the baseline (the graph before issue 19: round 1 the
  length check, phrases and MDE in parallel, round 2 the grounder, round 3 the extractor, each a
  no-op deployment carrying the real call's payload). The old real deployments are gone; their
  echo graph is the old shape's overhead (its model work is zero).

1. One client, one request at a time, in interleaved rounds (every arm takes its turn each
   round, so a change in the machine's load hits every arm alike): ``in_process`` (the same
   NERModel class built in this process, called through the same ingress ``Pipeline`` code, no
   Serve, no HTTP, no batching) and the four apps. Overhead = served p50 − in-process p50
   (unbatched, so no replica waits for batch mates). Goals: ≤ 1.3× the one-hop echo floor, and
   ≤ half of the old shape's (the three-round echo).
2. ``--clients`` concurrent clients on the batched and the unbatched app, alternating, against
   the in-process batched pipeline at the same batch size (``TMRModel.predict_many`` on batches of
   ``--clients`` prepared rows): served / in-process throughput (goal ≥ 0.8× with paper-size
   compute), batched / unbatched beside it.

Torch threads: the served model replicas get the driver's ``torch.get_num_threads()`` (as
``OMP_NUM_THREADS``; ``--torch-threads`` sets it), so both sides compute with as many threads. Machine facts (cores, torch
threads, load average at start and end) are printed beside every ratio. Without trained
checkpoints it builds untrained ones (:func:`make_untrained_checkpoints`): serving cost does not
depend on the weights' values. Prints a table and writes JSON (``--output``).
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
SIZES = ("tiny", "paper")
GOALS = {"overhead_vs_echo_floor": 1.3, "overhead_vs_old_shape": 0.5, "served_vs_in_process_throughput": 0.8}
ROUND = 5  # requests per arm per round of the interleaved latency measurement


def machine_facts() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": list(os.getloadavg())}


def models_of_size(size: str) -> dict[str, str]:
    """The five backbones at ``size`` (``tmr_core.tiny_models``): tiny, or the paper's
    architectures with random weights."""
    from tmr_core import tiny_models

    if size not in SIZES:
        raise ValueError(f"--size: expected one of {SIZES}, got {size!r}")
    return tiny_models.ensure_models(size)


def make_untrained_checkpoints(root: str | Path, models: dict[str, str], size: str = "tiny") -> dict[str, str]:
    """Untrained NER, RE and MDE checkpoints on the given backbones, saved as ``from_pretrained`` folders.

    Args:
        root: where the ``ner``, ``re`` and ``mde`` folders go.
        models: :func:`models_of_size`'s (or ``ensure_tiny_models()``'s) paths.
        size: ``paper`` uses the paper configs' heads (8) and MDE projection (128).
    """
    import torch

    from tmr_core.extractor import TMRConfig, TMRExtractor
    from tmr_core.mde import MultimodalDivergenceEstimator

    heads, projection = (2, 16) if size == "tiny" else (8, 128)
    root = Path(root)
    paths = {}
    for task, labels in (("ner", ()), ("re", RE_LABELS)):
        torch.manual_seed(0)
        model = TMRExtractor.build(TMRConfig(
            task=task, labels=labels, text_encoder=models["text_encoder"], image_encoder=models["image_encoder"],
            num_heads=heads, dropout=0.0,
        ))
        paths[task] = str(root / task)
        model.save_pretrained(paths[task])
    torch.manual_seed(0)
    mde = MultimodalDivergenceEstimator.from_backbone(models["mde_backbone"], projection_dim=projection)
    paths["mde"] = str(root / "mde")
    mde.save_pretrained(paths["mde"])
    return paths


def tiny_app_args(checkpoints: dict[str, str], tiny: dict[str, str], cache_dir: str | Path, **overrides: Any) -> dict:
    """``AppArgs`` for the given models, on absolute paths (replicas may run in another directory)."""
    args = {
        "ner_model": checkpoints["ner"],
        "re_model": checkpoints["re"],
        "mde_model": checkpoints["mde"],
        "grounder_model": tiny["detector"],
        "phrase_parser": "tiny",
        "generation": {"model": tiny["text_to_image"], "scheduler": "EulerDiscreteScheduler", "steps": 2,
                       "guidance_scale": 1.0, "height": 32, "width": 32},
        # these args are laid over configs/serve.tiny.yaml's: {} clears its RE back-translator (the demo's
        # folder), so both tasks share the tiny untrained one above
        "back_translation_task_models": {},
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


# ----------------------------------------------------------------------------- the echo apps


def _decoded(body: dict) -> tuple[list[str], bytes]:
    """What an echo ingress does with a body before its calls: the tokens and the image bytes."""
    return body["text"].split(), base64.b64decode(body.get("image") or "")


def echo_one_hop_app(args: dict):
    """The new shape with no-op work: ingress → one model call carrying the real call's request
    (tokens, image bytes, mode, sample id) and answering the real answer's fields."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class EchoModel:
        async def predict(self, request: dict) -> dict:
            return {"entities": [], "phrases": request["tokens"][:2], "divergence": [1 / 3] * 3,
                    "back_translation": {"uri": None, "error": None, "cached": False},
                    "timing": dict.fromkeys(("back_translation", "phrases", "grounding", "divergence", "extract"), 0.0)}

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class EchoIngress:
        def __init__(self, model):
            self.model = model

        @api.post("/v1/ner")
        async def ner_request(self, body: dict) -> dict:
            tokens, image = _decoded(body)
            await self.model.predict.remote({"tokens": tokens, "image": image, "mode": "fast", "sample_id": None})
            return {"tokens": tokens, "entities": []}

    return EchoIngress.bind(EchoModel.bind())


def echo_three_rounds_app(args: dict):
    """The old shape with no-op work: round 1 the length check, phrases and MDE in parallel,
    round 2 the grounder, round 3 the extractor — each carrying what the real call carried
    (tokens; the decoded image bytes to the MDE and grounder)."""
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
            tokens, image = _decoded(body)
            await asyncio.gather(self.ner.run.remote(tokens), self.phrases.run.remote(tokens),
                                 self.mde.run.remote(tokens, image))
            await self.grounder.run.remote(image, tokens)
            await self.ner.run.remote(tokens)
            return {"tokens": tokens, "entities": []}

    steps = [Echo.options(name=f"Echo{name}").bind() for name in ("Phrases", "Grounder", "MDE", "NER")]
    return EchoIngress.bind(*steps)


# ----------------------------------------------------------------------------- deployment


def bench_config(args: dict, clients: int, device: str, port: int) -> dict:
    """One Serve config with the four applications (module docstring): the real ones from
    configs/serve.tiny.yaml's deployments, NER only, the model replicas computing with this
    process's torch threads (and a share of the GPU on ``cuda``)."""
    import torch

    from serve.app import load_serve_config

    repo = Path(__file__).resolve().parents[1]
    model_options = {"num_cpus": 0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(torch.get_num_threads())}}}
    if device.startswith("cuda"):
        model_options["num_gpus"] = 0.4  # both real apps' model replicas on one GPU
    applications = []
    for name, batch_size in (("batched", clients), ("unbatched", 1)):
        batching = {"max_batch_size": batch_size, "batch_wait_timeout_s": 0.005 if batch_size > 1 else 0.0}
        config = load_serve_config(
            repo / "configs" / "serve.tiny.yaml",
            {**args, "re_model": None, "device": device, "batching": batching},
            {"NERModel": {"ray_actor_options": model_options, "max_ongoing_requests": 2 * max(clients, 1)},
             "BackTranslator": {"autoscaling_config": {"min_replicas": 0, "max_replicas": 1}}},
        )
        (app,) = config["applications"]
        app["deployments"] = [d for d in app["deployments"] if d["name"] != "REModel"]
        applications.append({**app, "name": f"tmr-{name}", "route_prefix": f"/{name}"})
    for name in ("echo_one_hop", "echo_three_rounds"):
        applications.append({"name": name.replace("_", "-"), "route_prefix": "/" + name.replace("_", "-"),
                             "import_path": f"benchmarks.bench_serve:{name}_app"})
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
            "applications": applications}


# ----------------------------------------------------------------------------- measurements


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_s)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered), "p95_ms": 1000 * p95}


def server_timing(header: str) -> dict[str, float]:
    """``{"phrases": 4.1, …}`` from a ``Server-Timing`` header (``name;dur=ms, …``)."""
    timings = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, rest = part.partition(";")
        if rest.startswith("dur="):
            timings[name] = float(rest[4:])
    return timings


def request_body(index: int, image: bytes) -> dict:
    return {"text": SENTENCES[index % len(SENTENCES)], "image": base64.b64encode(image).decode(), "mode": "fast"}


class HttpArm:
    """Sends fast-mode ``/v1/ner`` requests to one app, one at a time, and keeps what they took."""

    def __init__(self, url: str, image: bytes):
        import requests

        self.url, self.image, self.session = f"{url}/v1/ner", image, requests.Session()
        self.latencies: list[float] = []
        self.steps: dict[str, list[float]] = {}

    def send(self, index: int) -> None:
        body = request_body(index, self.image)
        started = time.perf_counter()
        response = self.session.post(self.url, json=body, timeout=300)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"{self.url}: {response.status_code} {response.text[:300]}")
        self.latencies.append(elapsed)
        for name, ms in server_timing(response.headers.get("Server-Timing", "")).items():
            self.steps.setdefault(name, []).append(ms)

    def report(self) -> dict:
        return {**percentiles(self.latencies),
                "step_p50_ms": {name: statistics.median(values) for name, values in self.steps.items()}}


class InProcessArm:
    """The same fast-mode requests through the ingress's ``Pipeline`` over the NER model built in
    this process (``serve.app.in_process_pipeline``): the model cost of one request."""

    def __init__(self, pipeline: Any, image: bytes):
        self.pipeline, self.image, self.latencies = pipeline, image, []
        self.loop = asyncio.new_event_loop()

    def send(self, index: int) -> None:
        from serve.schemas import NERRequest

        request = NERRequest(text=SENTENCES[index % len(SENTENCES)], mode="fast")
        started = time.perf_counter()
        self.loop.run_until_complete(self.pipeline.ner_request(request, self.image))
        self.latencies.append(time.perf_counter() - started)

    def report(self) -> dict:
        return percentiles(self.latencies)


TIME_LIMIT_S = {"tiny": 25.0, "paper": 120.0}  # per measurement (see --time-limit)


def interleaved(arms: dict[str, Any], count: int, time_limit_s: float) -> None:
    """Every arm sends ``ROUND`` requests in turn, round after round, up to ``count`` requests per
    arm or the time limit; the first round warms every arm up and is not kept."""
    for arm in arms.values():
        for index in range(len(SENTENCES)):
            arm.send(index)
        arm.latencies.clear()
        getattr(arm, "steps", {}).clear()
    deadline = time.perf_counter() + time_limit_s
    index = 0
    while index < count and time.perf_counter() < deadline:
        for arm in arms.values():
            for offset in range(ROUND):
                arm.send(index + offset)
        index += ROUND


def http_load(url: str, image: bytes, clients: int, count: int, time_limit_s: float) -> dict[str, Any]:
    """``clients`` threads send fast-mode ``/v1/ner`` requests until ``count`` or the time limit."""
    import requests

    latencies: list[float] = []
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
            started = time.perf_counter()
            response = session.post(f"{url}/v1/ner", json=request_body(index, image), timeout=300)
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code == 200:
                    latencies.append(elapsed)
                else:
                    errors.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if not latencies:
        raise RuntimeError(f"{url}/v1/ner: every request failed, e.g. {errors[:2]}")
    return {**percentiles(latencies), "clients": clients, "wall_s": wall,
            "throughput_rps": len(latencies) / wall if wall else 0.0, "errors": errors[:5], "num_errors": len(errors)}


def alternating_loads(urls: dict[str, str], image: bytes, clients: int, count: int, time_limit_s: float,
                      parts: int = 2) -> dict[str, dict]:
    """:func:`http_load` on each URL in ``parts`` alternating turns (A B A B), so the arms share
    the machine's changes in load; the turns' requests and wall times are added up."""
    turns: dict[str, list[dict]] = {name: [] for name in urls}
    for _ in range(parts):
        for name, url in urls.items():
            turns[name].append(http_load(url, image, clients, max(count // parts, clients), time_limit_s / parts))
    merged = {}
    for name, results in turns.items():
        n, wall = sum(r["n"] for r in results), sum(r["wall_s"] for r in results)
        merged[name] = {"n": n, "clients": clients, "wall_s": wall, "throughput_rps": n / wall if wall else 0.0,
                        "p50_ms": statistics.median(r["p50_ms"] for r in results),
                        "p95_ms": max(r["p95_ms"] for r in results),
                        "num_errors": sum(r["num_errors"] for r in results),
                        "errors": [e for r in results for e in r["errors"]][:5]}
    return merged


def in_process_batched(model: Any, image: bytes, batch_size: int, count: int, time_limit_s: float) -> dict[str, Any]:
    """Requests per second of the NER model built here on batches of ``batch_size``: each request
    prepared (length check, cache look-up) as ``predict`` does, then ``predict_many`` on the batch."""
    loop = asyncio.new_event_loop()

    def batch(start: int) -> None:
        requests_ = [{"tokens": SENTENCES[(start + i) % len(SENTENCES)].split(), "image": image, "mode": "fast"}
                     for i in range(batch_size)]
        rows = [loop.run_until_complete(model.prepare(request))[0] for request in requests_]
        answers = model.predict_many(rows)
        failed = [a for a in answers if isinstance(a, Exception)]
        if failed:
            raise RuntimeError(f"in-process batch failed: {failed[0]!r}")

    batch(0)  # warm-up
    done, deadline, started = 0, time.perf_counter() + time_limit_s, time.perf_counter()
    while done < count and time.perf_counter() < deadline:
        batch(done)
        done += batch_size
    wall = time.perf_counter() - started
    return {"n": done, "batch_size": batch_size, "wall_s": wall, "throughput_rps": done / wall}


# ----------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke-test", action="store_true", help="A few requests per measurement.")
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="Backbones: tiny, or the paper's architectures with random weights (real FLOPs).")
    parser.add_argument("--device", default="cpu", help="Where the models run: cpu or cuda.")
    parser.add_argument("--requests", type=int, default=200, help="Most requests per arm and measurement.")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="Most seconds per measurement; default per size: tiny 25, paper 120 (a paper-size batch "
                             "of 16 takes ~11 s on 2 CPU cores: 25 s held ~2 batches per arm, mostly start and tail).")
    parser.add_argument("--clients", type=int, default=16,
                        help="Concurrent clients, the batched app's max_batch_size and the in-process batch size.")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="Torch threads here and in the served model replicas (default: torch's, one per core). "
                             "On a machine shared with other work, 1 avoids threads waiting on each other.")
    parser.add_argument("--ner-model", default=None, help="NER checkpoint (default: untrained, on --size backbones).")
    parser.add_argument("--mde-model", default=None, help="MDE checkpoint (default: untrained, on --size backbones).")
    parser.add_argument("--output", default="outputs/bench/serve.json", help="Where the JSON results go.")
    options = parser.parse_args(argv)
    if options.smoke_test:
        options.requests, options.time_limit = 2 * ROUND, 10.0
    elif options.time_limit is None:
        options.time_limit = TIME_LIMIT_S[options.size]
    return options


def measure(options: argparse.Namespace, args: dict, image: bytes) -> dict[str, Any]:
    """Every arm of the module docstring, in one Ray cluster started and stopped here."""
    import ray
    from ray import serve

    from serve.app import AppArgs, deploy_config, in_process_pipeline

    results: dict[str, Any] = {}
    # fast mode never calls the back-translator, and the benchmark sends NER requests only
    pipeline = in_process_pipeline(AppArgs.model_validate({**args, "device": options.device}), tasks=("ner",),
                                   back_translator=False)
    # address="local": a fresh loopback cluster even when another one runs on this machine
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        port = free_port()
        deploy_config(bench_config(args, options.clients, options.device, port), timeout_s=600)
        url = f"http://127.0.0.1:{port}"
        arms = {"in_process": InProcessArm(pipeline, image),
                **{name: HttpArm(f"{url}/{route}", image) for name, route in (
                    ("echo_one_hop", "echo-one-hop"), ("echo_three_rounds", "echo-three-rounds"),
                    ("served_unbatched", "unbatched"), ("served_batched", "batched"))}}
        interleaved(arms, options.requests, options.time_limit)
        results.update({f"{name}_1_client": arm.report() for name, arm in arms.items()})
        loads = alternating_loads({"batched": f"{url}/batched", "unbatched": f"{url}/unbatched"}, image,
                                  options.clients, options.requests * 2, options.time_limit)
        for name, load in loads.items():
            results[f"served_{options.clients}_clients_{name}"] = load
    finally:
        serve.shutdown()
        ray.shutdown()
    results[f"in_process_batched_{options.clients}"] = in_process_batched(
        pipeline.ner, image, options.clients, options.requests * 2, options.time_limit)
    return results


def ratios(results: dict[str, Any], clients: int) -> dict[str, float]:
    """The overheads and ratios the goals are about (module docstring)."""
    in_process = results["in_process_1_client"]["p50_ms"]
    overhead = results["served_unbatched_1_client"]["p50_ms"] - in_process
    floor = results["echo_one_hop_1_client"]["p50_ms"]
    old_shape = results["echo_three_rounds_1_client"]["p50_ms"]
    batched = results[f"served_{clients}_clients_batched"]["throughput_rps"]
    unbatched = results[f"served_{clients}_clients_unbatched"]["throughput_rps"]
    in_process_rps = results[f"in_process_batched_{clients}"]["throughput_rps"]
    return {
        "overhead_p50_ms": overhead,
        "overhead_p50_ms_batched": results["served_batched_1_client"]["p50_ms"] - in_process,
        "echo_one_hop_floor_p50_ms": floor,
        "echo_three_rounds_p50_ms": old_shape,
        "overhead_vs_echo_floor_ratio": overhead / floor,
        "overhead_vs_old_shape_ratio": overhead / old_shape,
        "served_vs_in_process_throughput_ratio": batched / in_process_rps,
        "batching_throughput_ratio": batched / unbatched if unbatched else float("nan"),
    }


def print_report(results: dict[str, Any], clients: int) -> None:
    before, after = results["machine_before"], results["machine_after"]
    machine = (f"[{before['cpus']} cores, torch threads {before['torch_threads']}, "
               f"load {before['load_avg'][0]:.2f} -> {after['load_avg'][0]:.2f} (1-min average, start -> end)]")
    print(f"bench_serve, size {results['size']}, device {results['device']} {machine}")
    print(f"{'measurement':<36}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'req/s':>10}")
    for key, row in results.items():
        if isinstance(row, dict) and "n" in row:
            p50, p95 = (f"{row[k]:>10.1f}" if k in row else f"{'':>10}" for k in ("p50_ms", "p95_ms"))
            print(f"{key:<36}{row['n']:>6}{p50}{p95}{row.get('throughput_rps', 0):>10.1f}")
    r = results["ratios"]
    print(f"fast-mode overhead p50 (HTTP, unbatched, minus in-process): {r['overhead_p50_ms']:.1f} ms "
          f"(with batching, up to 5 ms batch wait: {r['overhead_p50_ms_batched']:.1f} ms)")
    print(f"  / echo one-hop floor {r['echo_one_hop_floor_p50_ms']:.1f} ms = {r['overhead_vs_echo_floor_ratio']:.2f}x "
          f"(goal <= {GOALS['overhead_vs_echo_floor']}) {machine}")
    print(f"  / old shape (three-round echo) {r['echo_three_rounds_p50_ms']:.1f} ms = "
          f"{r['overhead_vs_old_shape_ratio']:.2f}x (goal <= {GOALS['overhead_vs_old_shape']}) {machine}")
    steps = results["served_unbatched_1_client"]["step_p50_ms"]
    if steps:
        inside = " + ".join(f"{name} {ms:.1f}" for name, ms in steps.items() if name not in ("image", "model"))
        print(f"  inside NERModel, p50 ms: {inside}; the model call as the ingress saw it: {steps.get('model', 0):.1f}")
    print(f"served / in-process batched throughput at {clients} clients, batch {clients}: "
          f"{r['served_vs_in_process_throughput_ratio']:.2f}x (goal >= {GOALS['served_vs_in_process_throughput']}); "
          f"batched / unbatched served: {r['batching_throughput_ratio']:.2f}x {machine}")


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    if options.torch_threads:
        import torch

        torch.set_num_threads(options.torch_threads)  # the replicas get the same (bench_config)
    before = machine_facts()
    models = models_of_size(options.size)
    work = Path(tempfile.mkdtemp(prefix="tmr-bench-serve-"))
    checkpoints = make_untrained_checkpoints(work / "models", models, options.size)
    checkpoints["ner"] = options.ner_model or checkpoints["ner"]
    checkpoints["mde"] = options.mde_model or checkpoints["mde"]
    args = tiny_app_args(checkpoints, models, work / "cache", auth_token_env=None)
    results: dict[str, Any] = {"size": options.size, "device": options.device, "smoke_test": options.smoke_test,
                               "requests": options.requests, "time_limit_s": options.time_limit,
                               "clients": options.clients, "machine_before": before,
                               "baseline": "old shape = echo graph of the three-round deployment graph "
                                           "(the old real deployments were removed)"}
    results.update(measure(options, args, png_bytes()))
    results["machine_after"] = machine_facts()
    results["ratios"] = ratios(results, options.clients)
    results["goals"] = {f"{name}_goal": value for name, value in GOALS.items()}
    print_report(results, options.clients)
    Path(options.output).parent.mkdir(parents=True, exist_ok=True)
    Path(options.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
