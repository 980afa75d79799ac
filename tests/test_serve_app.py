"""The TMR Serve app on tiny models: configs, deployments through handles, then every HTTP route.

The app is deployed once per session from configs/serve.tiny.yaml (Serve's own config path, as
``serve run`` takes it) on the shared local Ray cluster, HTTP on 127.0.0.1 and a free port, and
shared with test_serve_browser.py (``serve_app`` in tests/fixtures/serve_app.py). The NER
extractor is loaded from an MLflow registry (``models:/tmr-ner@champion``), the others from
checkpoint folders; all are tiny models, which is enough to test the serving path.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import pytest
import requests
import yaml

from benchmarks.bench_serve import png_bytes
from tests.fixtures.serve_app import TOKEN

REPO = Path(__file__).resolve().parents[1]
TEXT = "Kevin Durant joins the Golden State Warriors in Oakland"


# ----------------------------------------------------------------------------- no Ray needed


@pytest.mark.parametrize("name", ["serve.yaml", "serve.tiny.yaml"])
def test_serve_configs_are_valid_serve_configs_with_typed_args(name):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import AppArgs, deployment_names

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "configs" / name).read_text()))
    (app,) = config.applications
    assert app.import_path == "serve.app:build_app"
    args = AppArgs.model_validate(app.args)
    deployments = {d.name: d for d in app.deployments}
    # exactly the app's deployments: Serve refuses an entry naming one the app does not create
    assert set(deployments) == set(deployment_names(args))
    if name == "serve.tiny.yaml":  # the demo's back-translator per task
        assert set(deployments) == {"TMRIngress", "NERModel", "REModel", "BackTranslator", "REBackTranslator"}
        assert args.generation_for("re").model == "outputs/demo/t2i/re/model"
        assert args.generation_for("ner").model == args.generation.model == "outputs/demo/t2i/ner/model"
    else:
        assert set(deployments) == {"TMRIngress", "NERModel", "REModel", "BackTranslator"}
    if name == "serve.yaml":
        assert args.ner_model == "models:/tmr-ner@champion" and args.mde_model == "models:/tmr-mde@champion"
        assert deployments["BackTranslator"].ray_actor_options.num_gpus == 1
        # diffusion scales on its own, from zero: fast mode and cache hits never call it
        assert deployments["BackTranslator"].autoscaling_config["min_replicas"] == 0
        assert deployments["BackTranslator"].autoscaling_config["max_replicas"] > 1
        # a model replica must hold a full batch and the next one
        assert deployments["NERModel"].max_ongoing_requests >= 2 * args.batching.max_batch_size


def test_app_args_reject_unknown_keys_naming_them():
    from pydantic import ValidationError

    from serve.app import AppArgs

    with pytest.raises(ValidationError, match="ner_modle"):
        AppArgs.model_validate({"ner_modle": "x"})


def _asgi(app, path: str, headers: dict[str, str]) -> tuple[int, dict]:
    """One GET through an ASGI app: (status, JSON body)."""
    scope = {"type": "http", "path": path, "method": "GET",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if body else {}


def test_request_guard_checks_the_token_and_turns_failures_into_json():
    from fastapi.responses import JSONResponse

    from serve.ingress import RequestGuard
    from serve.schemas import InputError

    async def route(scope, receive, send):
        if scope["path"] == "/v1/bug":
            raise RuntimeError("a bug")
        if scope["path"] == "/v1/bad":
            raise InputError("text", "too long", 422)
        await JSONResponse({"ok": True})(scope, receive, send)

    guard = RequestGuard(route, token="s3cret", max_request_bytes=100)
    assert _asgi(guard, "/v1/ner", {})[0] == 401
    assert _asgi(guard, "/v1/ner", {"Authorization": "Bearer wrong"})[0] == 401
    assert _asgi(guard, "/healthz", {}) == (200, {"ok": True})  # public
    ok = {"Authorization": "Bearer s3cret"}
    assert _asgi(guard, "/v1/ner", ok) == (200, {"ok": True})
    assert _asgi(guard, "/v1/ner", {**ok, "Content-Length": "101"})[1]["detail"][0]["type"] == "too_large"
    status, body = _asgi(guard, "/v1/bug", ok)
    assert status == 500 and body["detail"][0]["type"] == "internal_error" and "a bug" not in json.dumps(body)
    status, body = _asgi(guard, "/v1/bad", ok)
    assert status == 422 and body["detail"][0]["field"] == "text"


def test_tiny_phrase_parser_keeps_names_and_determiner_phrases():
    from tmr_core.phrases import tiny_noun_phrases

    phrases = tiny_noun_phrases(TEXT.split(), max_len=4)
    spans = {(p["start"], p["end"]) for p in phrases}
    assert {(0, 2), (4, 7), (8, 9), (3, 7)} <= spans
    assert all(p["end"] - p["start"] <= 4 and p["text"] == " ".join(TEXT.split()[p["start"]:p["end"]]) for p in phrases)
    assert tiny_noun_phrases(["rt", "@x", ":", "hello"], 4) == []


def test_phrase_limits_are_per_task_with_the_papers_as_defaults():
    from pydantic import ValidationError

    from serve.app import AppArgs

    assert AppArgs().max_phrase_len == {"ner": 4, "re": 6}
    assert AppArgs(max_phrase_len=5).max_phrase_len == {"ner": 5, "re": 5}  # a config from before: both tasks
    assert AppArgs(max_phrase_len={"re": 3}).max_phrase_len == {"ner": 4, "re": 3}
    for bad, field in ((0, "max_phrase_len.ner"), ({"re": 0}, "max_phrase_len.re"), ({"mre": 6}, "max_phrase_len.mre")):
        with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
            AppArgs(max_phrase_len=bad)


def test_request_schemas_name_the_bad_field():
    from pydantic import ValidationError

    from serve.schemas import NERRequest, RERequest

    assert NERRequest(tokens=["a", "b"]).words() == ["a", "b"]
    for body, field in [({}, "text"), ({"text": "  "}, "text"), ({"text": "a", "tokens": ["a"]}, "tokens"),
                        ({"tokens": ["a b"]}, "tokens"), ({"text": "a", "mode": "slow"}, "mode")]:
        with pytest.raises(ValidationError) as info:
            NERRequest.model_validate(body)
        assert field in str(info.value)
    with pytest.raises(ValidationError, match="outside the text"):
        RERequest.model_validate({"text": "a b c", "head": {"start": 0, "end": 1}, "tail": {"start": 2, "end": 5}})


# ----------------------------------------------------------------------------- the deployed app


@pytest.fixture
def app(serve_app):
    """The session's tiny app (tests/fixtures/serve_app.py): NER from the MLflow registry, a token."""
    return serve_app


def auth() -> dict:
    return {"Authorization": f"Bearer {TOKEN}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(app, path, body, headers=None, **kwargs):
    return requests.post(app["url"] + path, json=body, headers=headers if headers is not None else auth(),
                         timeout=120, **kwargs)


def test_deployments_through_handles(app):
    """Local-dev pattern: the app is the ingress, one model deployment per task and the
    back-translator; a task's deployment answers a whole request through its handle, and a batch
    of requests gets the answers each gets alone."""
    from ray import serve

    from serve.schemas import InputError
    from tests.fixtures.serve_app import DEPLOYMENTS

    assert set(serve.status().applications["tmr"].deployments) == set(DEPLOYMENTS)
    ner = serve.get_deployment_handle("NERModel", app_name="tmr")
    requests_ = [{"tokens": s.split(), "image": png_bytes(colour=c), "mode": "fast"}
                 for s, c in [(TEXT, (200, 0, 0)), ("John Smith visits Paris", (0, 200, 0)), ("the car", (0, 0, 200))]]
    single = [ner.predict.remote(request).result() for request in requests_]
    assert {"Kevin Durant", "Golden State Warriors"} <= set(single[0]["phrases"])
    assert sum(single[0]["divergence"]) == pytest.approx(1.0, abs=1e-5)

    async def together():
        return await asyncio.gather(*(ner.predict.remote(request) for request in requests_))

    batched = asyncio.run(together())
    for one, many in zip(single, batched, strict=True):
        assert [(e["type"], e["start"], e["end"]) for e in one["entities"]] == \
               [(e["type"], e["start"], e["end"]) for e in many["entities"]]
        for a, b in zip(one["entities"], many["entities"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert one["divergence"] == pytest.approx(many["divergence"], abs=1e-5)
    with pytest.raises(InputError) as info:
        ner.predict.remote({"tokens": ["word"] * 500, "image": None, "mode": "fast"}).result()
    assert info.value.field == "text"


def test_healthz_needs_no_token_and_data_routes_do(app):
    assert requests.get(app["url"] + "/healthz", timeout=30).json() == {"status": "ok"}
    for method, path in [("get", "/v1/models"), ("post", "/v1/ner"), ("post", "/v1/re")]:
        response = getattr(requests, method)(app["url"] + path, json={"text": TEXT}, timeout=30)
        assert response.status_code == 401, path
        assert response.json()["detail"][0]["field"] == "Authorization"
    wrong = requests.get(app["url"] + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401
    assert requests.get(app["url"] + "/", timeout=30).status_code == 200  # the page holds no data
    icon = requests.get(app["url"] + "/favicon.ico", timeout=30)  # every browser asks for it: no 404
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    schema = requests.get(app["url"] + "/openapi.json", timeout=30).json()
    assert {"/v1/ner", "/v1/re", "/healthz", "/v1/models"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_models_lists_names_versions_and_sources(app):
    models = requests.get(app["url"] + "/v1/models", headers=auth(), timeout=30).json()
    by_name = {m["name"]: m for m in models["models"]}
    assert set(by_name) == {"ner", "re", "mde", "grounder", "back_translator", "phrases"}
    assert by_name["ner"]["source_uri"] == "models:/tmr-ner@champion" and by_name["ner"]["version"] == "1"
    assert by_name["re"]["source_uri"] == app["checkpoints"]["re"] and by_name["re"]["version"] is None
    assert models["default_mode"] == "fast"


def test_ner_fast_then_full_then_fast_uses_the_cache(app):
    body = {"text": TEXT, "image": b64(png_bytes()), "sample_id": "twitter17-0001"}
    fast = post(app, "/v1/ner", {**body, "mode": "fast"})
    assert fast.status_code == 200, fast.text
    result = fast.json()
    assert result["tokens"] == TEXT.split() and result["mode"] == "fast"
    assert sum(result["divergence"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["back_translation"]["used"] is False  # nothing cached yet, no generation in fast mode
    for entity in result["entities"]:
        assert entity["type"] in {"PER", "LOC", "ORG", "MISC"} and 0 <= entity["start"] < entity["end"] <= 9
        assert entity["text"] == " ".join(TEXT.split()[entity["start"]:entity["end"]]) and 0 < entity["score"] <= 1

    # every step's milliseconds: the ingress's image check, the model deployment's steps, and the
    # whole model call as the ingress saw it (the steps, the hop and the batch wait)
    timing = {name: float(ms) for name, ms in (part.split(";dur=") for part in fast.headers["Server-Timing"].split(", "))}
    assert list(timing) == ["image", "back_translation", "phrases", "grounding", "divergence", "extract", "model"]
    assert all(ms >= 0 for ms in timing.values())
    inside = sum(ms for name, ms in timing.items() if name not in ("image", "model"))
    assert inside <= timing["model"]

    full = post(app, "/v1/ner", {**body, "mode": "full"}).json()
    assert full["back_translation"]["used"] and not full["back_translation"]["cached"]
    image = requests.get(app["url"] + full["back_translation"]["url"], headers=auth(), timeout=30)
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert list(app["cache"].rglob("*.png"))  # written to the shared content-addressed cache

    again = post(app, "/v1/ner", {**body, "mode": "fast"}).json()
    assert again["back_translation"] == {**full["back_translation"], "cached": True}


def test_ner_with_tokens_and_image_uri_and_without_image(app):
    uri = str(app["images"] / "photo.png")
    with_uri = post(app, "/v1/ner", {"tokens": TEXT.split(), "image_uri": uri})
    assert with_uri.status_code == 200, with_uri.text
    no_image = post(app, "/v1/ner", {"text": TEXT})
    assert no_image.status_code == 200 and no_image.json()["divergence"] is None


def test_re_returns_a_relation_and_probabilities(app):
    body = {"text": TEXT, "image": b64(png_bytes()), "head": {"start": 0, "end": 2}, "tail": {"start": 4, "end": 7}}
    response = post(app, "/v1/re", body)
    assert response.status_code == 200, response.text
    assert "extract;dur=" in response.headers["Server-Timing"]
    result = response.json()
    assert result["relation"] in result["probabilities"]
    assert set(result["probabilities"]) == {"None", "/per/loc/place_of_residence", "/per/org/member_of"}
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["relation"] == max(result["probabilities"], key=result["probabilities"].get)


def test_each_task_parses_phrases_as_its_training_tables_were_made(app):
    """RE's training tables hold phrases of up to 6 words (extract_phrases --max_phrase_len 6, the
    paper's), NER's up to 4; the served RE model parsed with NER's 4, so with stanza a long name
    would have grounded other regions than training saw (the demo's phrases never exceed 4 words)."""
    from tmr_core.phrases import PHRASE_LENGTHS, tiny_noun_phrases

    tokens = "Kevin Durant joined Golden State Warriors Basketball Club today".split()
    expected = {task: [p["text"] for p in tiny_noun_phrases(tokens, PHRASE_LENGTHS[task])] for task in ("ner", "re")}
    assert expected["ner"] != expected["re"]  # a five-word name: cut at 4 for NER only
    pair = {"head": {"start": 0, "end": 2}, "tail": {"start": 3, "end": 8}}
    for task, extra in (("ner", {}), ("re", pair)):
        response = post(app, f"/v1/{task}", {"text": " ".join(tokens), "image": b64(png_bytes()), **extra})
        assert response.status_code == 200, response.text
        assert sorted(response.json()["phrases"]) == sorted(expected[task]), task


def _big_png(side: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, 8), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def _noisy_png(side: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _thin_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (500, 2), (9, 9, 9)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    "missing text": ("/v1/ner", {"image": None}, 422, "text"),
    "empty text": ("/v1/ner", {"text": "   "}, 422, "text"),
    "text and tokens": ("/v1/ner", {"text": "a", "tokens": ["a"]}, 422, "tokens"),
    "text too long": ("/v1/ner", {"text": " ".join(["Paris"] * 300)}, 422, "text"),
    "unknown field": ("/v1/ner", {"text": "a", "colour": "red"}, 422, "colour"),
    "bad mode": ("/v1/ner", {"text": "a", "mode": "slow"}, 422, "mode"),
    "not base64": ("/v1/ner", {"text": "a", "image": "%%%not base64%%%"}, 422, "image"),
    "not an image": ("/v1/ner", {"text": "a", "image": b64(b"hello, I am text")}, 422, "image"),
    "image over the byte limit": ("/v1/ner", {"text": "a", "image": "NOISE"}, 413, "image"),
    "image over the pixel limit": ("/v1/ner", {"text": "a", "image": "WIDE"}, 413, "image"),
    "image_uri outside the prefixes": ("/v1/ner", {"text": "a", "image_uri": "/etc/passwd"}, 403, "image_uri"),
    "image_uri as a URL": ("/v1/ner", {"text": "a", "image_uri": "http://169.254.169.254/x"}, 403, "image_uri"),
    "image_uri not decodable": ("/v1/ner", {"text": "a", "image_uri": "BROKEN"}, 422, "image_uri"),
    "image_uri a folder": ("/v1/ner", {"text": "a", "image_uri": "FOLDER"}, 422, "image_uri"),
    "image_uri with a NUL": ("/v1/ner", {"text": "a", "image_uri": "NUL"}, 422, "image_uri"),
    "image_uri with a 300-character name": ("/v1/ner", {"text": "a", "image_uri": "LONG"}, 422, "image_uri"),
    "text with a lone surrogate": ("/v1/ner", {"text": "Paris \ud800 today"}, 422, "text"),
    "text over max_text_chars": ("/v1/ner", {"text": "Paris " + "x" * 5000}, 422, "text"),
    "image too thin for the models": ("/v1/ner", {"text": "a", "image": "THIN"}, 422, "image"),
    "head outside the text": ("/v1/re", {"text": "a b c", "head": {"start": 2, "end": 4},
                                         "tail": {"start": 0, "end": 1}}, 422, "head"),
    "tail end before start": ("/v1/re", {"text": "a b c", "head": {"start": 0, "end": 1},
                                         "tail": {"start": 2, "end": 1}}, 422, "tail"),
    "missing tail": ("/v1/re", {"text": "a b c", "head": {"start": 0, "end": 1}}, 422, "tail"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_naming_the_field(app, case):
    path, body, status, field = BAD_REQUESTS[case]
    body = dict(body)
    if body.get("image") == "NOISE":
        body["image"] = b64(_noisy_png(300))  # ~270 kB > the 200 kB limit
    if body.get("image") == "WIDE":
        body["image"] = b64(_big_png(600))  # 600 px > the 512 px limit
    if body.get("image") == "THIN":
        body["image"] = b64(_thin_png())  # 500x2 px: decodes, but the MDE cannot resize it
    uris = {"BROKEN": str(app["images"] / "broken.png"), "FOLDER": str(app["images"] / "a-folder"),
            "NUL": str(app["images"] / "photo\x00.png"), "LONG": str(app["images"] / ("x" * 300 + ".png"))}
    if body.get("image_uri") in uris:
        body["image_uri"] = uris[body["image_uri"]]
    response = post(app, path, body)
    assert response.status_code == status, response.text
    (detail,) = response.json()["detail"]
    assert detail["field"] == field, detail
    assert detail["msg"]


def test_malformed_json_and_oversized_bodies_are_4xx_and_the_replicas_survive(app):
    response = requests.post(app["url"] + "/v1/ner", data=b'{"text": "a", ', timeout=30,
                             headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["detail"][0]["field"] == "body"
    huge = requests.post(app["url"] + "/v1/ner", data=b"x" * 2_000_000, timeout=30,
                         headers={**auth(), "Content-Type": "application/json"})
    assert huge.status_code == 413 and huge.json()["detail"][0]["field"] == "body"
    unknown_image = requests.get(app["url"] + "/v1/back-translations/" + "0" * 64, headers=auth(), timeout=30)
    assert unknown_image.status_code == 404
    traversal = requests.get(app["url"] + "/v1/back-translations/..%2F..%2Fetc", headers=auth(), timeout=30)
    assert traversal.status_code in (404, 422)
    # after every bad request above, the same replicas still answer a good one
    ok = post(app, "/v1/ner", {"text": TEXT, "image": b64(png_bytes())})
    assert ok.status_code == 200, ok.text
    assert json.loads(ok.text)["tokens"] == TEXT.split()


def test_a_chunked_body_over_the_limit_is_413(app):
    def chunks():  # no Content-Length: 3 MB against the app's ~1.3 MB limit
        for _ in range(30):
            yield b"x" * 100_000

    response = requests.post(app["url"] + "/v1/ner", data=chunks(), timeout=60,
                             headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    (detail,) = response.json()["detail"]
    assert detail["field"] == "body" and detail["type"] == "too_large"


def test_one_bad_request_does_not_fail_its_batch_mates(app):
    """15 good requests and one with a thin image, at once: the 15 are answered, the bad one is a
    4xx naming its field (the ingress refuses it before it can join a batch)."""
    from concurrent.futures import ThreadPoolExecutor

    good = {"text": TEXT, "image": b64(png_bytes())}
    bodies = [good] * 7 + [{"text": TEXT, "image": b64(_thin_png())}] + [good] * 8
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: post(app, "/v1/ner", body), bodies))
    statuses = [r.status_code for r in responses]
    good_failed = sum(status != 200 for i, status in enumerate(statuses) if i != 7)
    assert good_failed == 0 and statuses[7] == 422, f"{good_failed} of 15 good requests failed: {statuses}"
    assert responses[7].json()["detail"][0]["field"] == "image"


def test_a_failing_item_inside_a_batch_fails_only_its_own_call(app):
    """Past the ingress (straight to the model deployment's handle), a batch that holds an image
    the MDE cannot score answers every good request; the bad request's caller gets the error."""
    from ray import serve

    ner = serve.get_deployment_handle("NERModel", app_name="tmr")
    items = [png_bytes(colour=(i * 30, 0, 0)) for i in range(7)]
    items.insert(3, _thin_png())

    async def together():
        return await asyncio.gather(*(ner.predict.remote({"tokens": TEXT.split(), "image": image, "mode": "fast"})
                                      for image in items), return_exceptions=True)

    results = asyncio.run(together())
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [3], f"{len(set(failed) - {3})} of 7 good items failed: {[repr(r)[:100] for r in results]}"
    assert "divergence" in str(results[3])
    assert all(sum(r["divergence"]) == pytest.approx(1.0, abs=1e-5) for i, r in enumerate(results) if i != 3)


def test_a_corrupt_cached_back_translation_is_a_miss_then_regenerated(app, tiny_models):
    """A truncated file in the cache: fast mode answers without it (not a 500), full mode
    regenerates it, and fast mode then uses the new one."""
    from serve.app import GenerationArgs
    from tmr_core.back_translation import GenerationSettings, cache_key, cache_uri_for

    text = "Maria Sharapova wins the Brisbane final"
    # the app's generation settings (tiny_app_args), hence the server's cache key for the text
    generation = GenerationArgs(model=tiny_models["text_to_image"], scheduler="EulerDiscreteScheduler",
                                steps=2, guidance_scale=1.0, height=32, width=32)
    path = Path(cache_uri_for(str(app["cache"]), cache_key(GenerationSettings(**generation.model_dump()), 0, text)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes()[:50])  # a PNG header and half a chunk: opens, does not load
    body = {"text": text, "image": b64(png_bytes())}

    for _ in range(2):  # every request, not only the first
        fast = post(app, "/v1/ner", {**body, "mode": "fast"})
        assert fast.status_code == 200, fast.text
        assert fast.json()["back_translation"]["used"] is False
    full = post(app, "/v1/ner", {**body, "mode": "full"})
    assert full.status_code == 200, full.text
    assert full.json()["back_translation"]["used"] and not full.json()["back_translation"]["cached"]
    assert full.json()["back_translation"]["id"] == path.stem
    from PIL import Image

    with Image.open(path) as image:
        image.load()
    again = post(app, "/v1/ner", {**body, "mode": "fast"}).json()["back_translation"]
    assert again["used"] and again["cached"]
