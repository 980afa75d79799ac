"""The demo page in headless Chromium: type a sentence, upload an image, see the entities.

The page and the HTTP API are the ingress's FastAPI app (``serve.ingress.build_api``) served by
uvicorn on 127.0.0.1, with the model steps in process (the Serve deployment graph itself is
tested in test_serve_app.py). The NER model is a tiny extractor fine-tuned here until it tags
the demo sentence, so the test can expect specific highlights. Browser: Debian's ``chromium``
driven by playwright (never ``playwright install``); the screenshot goes to .cache/screenshots/.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests

from benchmarks.bench_serve import free_port, make_untrained_checkpoints, png_bytes, tiny_app_args

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TOKENS = "Kevin Durant joins the Golden State Warriors".split()
TAGS = ["B-PER", "I-PER", "O", "O", "B-ORG", "I-ORG", "I-ORG"]


def fine_tune_ner(model_dir: str, image_path: str, steps: int = 80) -> None:
    """Overfit the tiny NER extractor on the demo sentence (with and without its image) and save it."""
    import torch

    from tmr_core.extractor import TMRExtractor

    torch.manual_seed(0)
    model = TMRExtractor.from_pretrained(model_dir)
    collate = model.collator()
    base = {"tokens": TOKENS, "tags": TAGS, "phrases": [], "regions": [], "back_translation_uri": None,
            "back_translation_regions": [], "divergence": [0.4, 0.4, 0.2]}
    batch = collate([{**base, "image_uri": image_path}, {**base, "image_uri": None}])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert model.predict(batch)[0] == TAGS, "fine-tuning did not fit the demo sentence"
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    """The ingress's FastAPI app on 127.0.0.1 with in-process model steps; yields its URL."""
    import uvicorn

    from serve.app import AppArgs
    from serve.deployments import BackTranslator, DivergenceEstimator, Extractor, Grounder, PhraseParser
    from serve.ingress import IngressSettings, Pipeline, build_api
    from tmr_core.tiny_models import ensure_tiny_models

    root = tmp_path_factory.mktemp("serve-browser")
    image_path = root / "photo.png"
    image_path.write_bytes(png_bytes())
    tiny = ensure_tiny_models(REPO / ".cache" / "tmr-models")
    checkpoints = make_untrained_checkpoints(root / "models", tiny)
    fine_tune_ner(checkpoints["ner"], str(image_path))
    args = AppArgs.model_validate(tiny_app_args(checkpoints, tiny, root / "cache", mode="full"))
    generation = args.generation.model_dump()
    pipeline = Pipeline(
        PhraseParser.func_or_class(parser="tiny"),
        Grounder.func_or_class(args.grounder_model),
        BackTranslator.func_or_class(generation, args.back_translation_cache),
        DivergenceEstimator.func_or_class(args.mde_model),
        Extractor.func_or_class(args.ner_model, "ner"),
        Extractor.func_or_class(args.re_model, "re"),
        IngressSettings(default_mode="full", cache_uri=args.back_translation_cache, generation=generation),
    )
    settings = pipeline.settings
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_api(pipeline, settings, token=None), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield {"url": url, "image": image_path}
    server.should_exit = True
    thread.join(timeout=10)


def test_the_demo_page_shows_entities_relation_image_and_scores(page_server):
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "Debian's chromium is missing: apt-get install -y chromium (make install does it)"
    screenshot = REPO / ".cache" / "screenshots" / "serve-demo.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    api = requests.post(page_server["url"] + "/v1/ner", timeout=60, json={
        "text": " ".join(TOKENS), "image": "data:image/png;base64," + __import__("base64").b64encode(
            page_server["image"].read_bytes()).decode()}).json()
    assert [(e["type"], e["text"]) for e in api["entities"]] == [("PER", "Kevin Durant"), ("ORG", "Golden State Warriors")]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run",
        ])
        try:
            page = browser.new_page()
            page.goto(page_server["url"] + "/")
            page.fill("#text", " ".join(TOKENS))
            page.set_input_files("#image", str(page_server["image"]))
            for field, value in {"#head-start": "0", "#head-end": "2", "#tail-start": "4", "#tail-end": "7"}.items():
                page.fill(field, value)
            page.click("#submit")
            page.wait_for_selector("#sentence mark.ent", timeout=60_000)
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=60_000)
            marks = page.eval_on_selector_all("#sentence mark.ent", "els => els.map(e => [e.dataset.type, e.firstChild.textContent])")
            assert marks == [["PER", "Kevin Durant"], ["ORG", "Golden State Warriors"]]
            assert page.eval_on_selector_all("#divergence tr[data-score]", "rows => rows.length") == 3
            assert page.text_content("#relation").startswith("Relation: ")
            page.wait_for_function("document.querySelector('#generated').naturalWidth > 0", timeout=30_000)
            assert page.is_hidden("#error")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 1000
