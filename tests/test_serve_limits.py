"""The ingress's limits and input checks on a stub pipeline (no Ray, no models): every input
problem is a 4xx in the documented error body naming the field, never a 500; the body limit holds
for chunked uploads; the token and the HTTP address come from where the operator put them."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image

from serve.ingress import IngressSettings, build_api
from serve.schemas import BackTranslationInfo, NERResponse


class StubPipeline:
    """Answers every request with its tokens: what the ingress checks is all that runs."""

    storage_options = None

    def __init__(self) -> None:
        self.requests = 0

    async def ner_request(self, request, image, timer=None):
        self.requests += 1
        return NERResponse(tokens=request.words(), mode="fast", divergence=None,
                           back_translation=BackTranslationInfo(used=False), phrases=[], entities=[])


@pytest.fixture
def allowed(tmp_path) -> Path:
    folder = tmp_path / "allowed"
    (folder / "a-folder").mkdir(parents=True)
    return folder


@pytest.fixture
def client(allowed) -> tuple[TestClient, StubPipeline]:
    stub = StubPipeline()
    settings = IngressSettings(image_uri_prefixes=[str(allowed)], max_request_bytes=100_000, max_text_chars=500)
    return TestClient(build_api(stub, settings, None), raise_server_exceptions=False), stub


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def the_error(response) -> dict:
    (detail,) = response.json()["detail"]
    assert set(detail) == {"field", "loc", "msg", "type"} and detail["msg"], detail
    return detail


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("case, body, status, field", [
    ("image_uri is a folder", {"text": "a", "image_uri": "ALLOWED/a-folder"}, 422, "image_uri"),
    ("image_uri with a NUL", {"text": "a", "image_uri": "ALLOWED/a\u0000b.png"}, 422, "image_uri"),
    ("image_uri with a 300-character name", {"text": "a", "image_uri": "ALLOWED/" + "x" * 300 + ".png"}, 422,
     "image_uri"),
    ("image_uri of 5000 characters", {"text": "a", "image_uri": "ALLOWED/" + "x/" * 2500}, 422, "image_uri"),
    ("text with a lone surrogate", {"text": "Paris \ud800 today"}, 422, "text"),
    ("a token with a lone surrogate", {"tokens": ["Paris", "\udc00"]}, 422, "tokens"),
    ("text over max_text_chars", {"text": "Paris " + "x" * 600}, 422, "text"),
    ("tokens over max_text_chars", {"tokens": ["Paris"] * 200}, 422, "tokens"),
])
def test_hostile_inputs_are_4xx_naming_the_field(client, allowed, case, body, status, field):
    import json

    client, stub = client
    body = {k: v.replace("ALLOWED", str(allowed)) if isinstance(v, str) else v for k, v in body.items()}
    # json.dumps escapes a lone surrogate as "\ud800", as any client library sends it
    response = client.post("/v1/ner", content=json.dumps(body).encode(), headers=JSON)
    assert response.status_code == status, (case, response.text)
    assert the_error(response)["field"] == field
    assert stub.requests == 0  # refused before any model step


@pytest.mark.parametrize("size, status", [((500, 2), 422), ((4096, 1), 422), ((1, 300), 422), ((300, 30), 200),
                                          ((40, 30), 200)])
def test_images_the_models_cannot_resize_are_refused_naming_image(client, size, status):
    import base64

    client, _ = client
    response = client.post("/v1/ner", json={"text": "a b", "image": base64.b64encode(png(*size)).decode()})
    assert response.status_code == status, response.text
    if status != 200:
        detail = the_error(response)
        assert detail["field"] == "image" and detail["type"] == "bad_aspect_ratio"


def test_framework_errors_use_the_documented_body(client):
    client, _ = client
    not_utf8 = client.post("/v1/ner", content=b'{"text": "a \xff b"}', headers=JSON)
    assert not_utf8.status_code == 400 and the_error(not_utf8)["field"] == "body"
    malformed = client.post("/v1/ner", content=b'{"text": ', headers=JSON)
    assert malformed.status_code == 400 and the_error(malformed)["field"] == "body"
    unknown = client.get("/v1/nothing-here")
    assert unknown.status_code == 404 and the_error(unknown)["field"] == "path"
    wrong_method = client.get("/v1/ner")
    assert wrong_method.status_code == 405 and the_error(wrong_method)["field"] == "method"
    # an unknown field whose name is a lone surrogate: the error body itself must still encode
    odd_key = client.post("/v1/ner", content=b'{"text": "a", "\\ud800": 1}', headers=JSON)
    assert 400 <= odd_key.status_code < 500, odd_key.text


def test_a_chunked_body_over_the_limit_is_413_before_it_is_all_read(client):
    import asyncio

    test_client, stub = client
    app = test_client.app
    pulled = []
    sent: list[dict] = []

    async def receive():  # 1 MB in 10 kB chunks, no Content-Length (chunked transfer encoding)
        pulled.append(1)
        return {"type": "http.request", "body": b"x" * 10_000, "more_body": len(pulled) < 100}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/ner", "raw_path": b"/v1/ner", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")],
             "server": ("test", 80), "client": ("test", 1), "scheme": "http", "root_path": "", "http_version": "1.1"}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert len(pulled) <= 11  # stopped reading right after the limit (100 kB), not after 1 MB
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b'"field":"body"' in body and b'"too_large"' in body and stub.requests == 0
    # through a client too, and under the limit chunked is fine
    over = test_client.post("/v1/ner", content=iter([b"x" * 60_000] * 2), headers=JSON)
    assert over.status_code == 413 and the_error(over)["type"] == "too_large"
    small = test_client.post("/v1/ner", content=iter([b'{"text": ', b'"Paris today"}']), headers=JSON)
    assert small.status_code == 200, small.text


def _ray_serve_records(caplog):
    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)  # Ray's serve logger may not propagate to the root
    return logger


@pytest.mark.parametrize("value, token, warns", [
    ("s3cret\n", "s3cret", None), ("", None, "set but empty"), ("  ", None, "set but empty"), (None, None, "not set"),
])
def test_the_token_comes_from_the_environment_and_an_open_api_is_logged(monkeypatch, caplog, value, token, warns):
    from serve.ingress import api_token

    if value is None:
        monkeypatch.delenv("TMR_TEST_TOKEN_16", raising=False)
    else:
        monkeypatch.setenv("TMR_TEST_TOKEN_16", value)
    logger = _ray_serve_records(caplog)
    try:
        with caplog.at_level(logging.WARNING, logger="ray.serve"):
            assert api_token("TMR_TEST_TOKEN_16") == token
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if warns is None:
        assert not warnings
    else:
        assert any(warns in w and "open" in w and "TMR_TEST_TOKEN_16" in w for w in warnings), warnings


def test_an_empty_token_serves_the_api_open(monkeypatch):
    from serve.ingress import api_token

    monkeypatch.setenv("TMR_TEST_TOKEN_16", "")
    stub = StubPipeline()
    client = TestClient(build_api(stub, IngressSettings(), api_token("TMR_TEST_TOKEN_16")))
    assert client.post("/v1/ner", json={"text": "Paris"}).status_code == 200


def test_main_binds_the_configs_http_options(monkeypatch, tmp_path):
    import ray
    import ray.serve

    import serve.app as app

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "serve.tiny.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.2", "port": 8123}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    calls = []

    def fake_deploy(config, host=None, port=None, **kwargs):
        calls.append((host, port))
        return f"http://{host}:{port}"

    monkeypatch.setattr(app, "deploy_config", fake_deploy)
    monkeypatch.setattr(app, "demo_request", lambda *args, **kwargs: {})
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray.serve, "shutdown", lambda *args, **kwargs: None)
    assert app.main(["--config", str(path)]) == 0
    assert app.main(["--config", str(path), "--port", "9001"]) == 0
    del config["http_options"]
    path.write_text(yaml.safe_dump(config))
    assert app.main(["--config", str(path)]) == 0
    assert calls == [("127.0.0.2", 8123), ("127.0.0.2", 9001), ("127.0.0.1", 8000)]


def test_a_corrupt_cached_back_translation_is_a_404_not_a_broken_png(client, tmp_path):
    test_client, stub = client
    key = "ab" * 32
    good, bad = tmp_path / f"{key}.png", tmp_path / f"{'cd' * 32}.png"
    good.write_bytes(png(8, 8))
    bad.write_bytes(png(8, 8)[:40])  # truncated: opens, does not decode
    stub.back_translation_uri = lambda image_id: str(tmp_path / f"{image_id}.png")
    assert test_client.get(f"/v1/back-translations/{key}").status_code == 200
    response = test_client.get(f"/v1/back-translations/{'cd' * 32}")
    assert response.status_code == 404 and the_error(response)["field"] == "image_id"


def test_docs_pages_load_only_local_assets_that_the_server_answers(allowed):
    """/docs and /redoc work without internet: every script, style and icon they reference is a
    path on this server (no CDN), answered 200 without the token, as the page itself is."""
    import re

    settings = IngressSettings(image_uri_prefixes=[str(allowed)])
    client = TestClient(build_api(StubPipeline(), settings, token="s3cret"))
    for page in ("/docs", "/redoc"):
        response = client.get(page)
        assert response.status_code == 200, page
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']|(?:url|Url)\s*:\s*["']([^"']+)["']""",
                          response.text)
        urls = [a or b for a, b in urls]
        assert urls, f"{page} references no assets: {response.text[:300]}"
        remote = [u for u in urls if "://" in u or u.startswith("//")]
        assert not remote, f"{page} loads from the internet: {remote}"
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and asset.content, (page, url, asset.status_code)
    assert client.get("/openapi.json").json()["paths"]["/v1/ner"]
