"""The demo page in headless Chromium: type a sentence, upload an image, see the entities.

The page is served by the deployed TMR app (``serve_app``, tests/fixtures/serve_app.py: the
Serve deployment graph shared with test_serve_app.py), whose NER extractor is fitted to the demo
sentence, so the test can expect specific highlights. The page sends the server's token from its
token field and asks for ``full`` mode, so the back-translation is generated for the request.
Browser: Debian's ``chromium`` driven by playwright (never ``playwright install``); the
screenshot goes to .cache/screenshots/ (out of git).
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import requests

from tests.fixtures.serve_app import DEMO_TOKENS

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
EXPECTED = [("PER", "Kevin Durant"), ("ORG", "Golden State Warriors")]


def test_the_demo_page_shows_entities_relation_image_and_scores(serve_app):
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "Debian's chromium is missing: apt-get install -y chromium (make install does it)"
    screenshot = REPO / ".cache" / "screenshots" / "serve-demo.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    image = serve_app["images"] / "photo.png"
    api = requests.post(serve_app["url"] + "/v1/ner", timeout=60, headers={"Authorization": f"Bearer {serve_app['token']}"},
                        json={"text": " ".join(DEMO_TOKENS),
                              "image": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()})
    assert api.status_code == 200, api.text
    assert [(e["type"], e["text"]) for e in api.json()["entities"]] == EXPECTED

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run",
        ])
        try:
            page = browser.new_page()
            page.goto(serve_app["url"] + "/")
            page.fill("#text", " ".join(DEMO_TOKENS))
            page.set_input_files("#image", str(image))
            page.select_option("#mode", "full")
            page.fill("#token", serve_app["token"])
            for field, value in {"#head-start": "0", "#head-end": "2", "#tail-start": "4", "#tail-end": "7"}.items():
                page.fill(field, value)
            page.click("#submit")
            page.wait_for_selector("#sentence mark.ent", timeout=60_000)
            page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')", timeout=60_000)
            assert page.text_content("#status").startswith("done (full mode")
            marks = page.eval_on_selector_all("#sentence mark.ent", "els => els.map(e => [e.dataset.type, e.firstChild.textContent])")
            assert marks == [list(pair) for pair in EXPECTED]
            assert page.eval_on_selector_all("#divergence tr[data-score]", "rows => rows.length") == 3
            assert page.text_content("#relation").startswith("Relation: ")
            page.wait_for_function("document.querySelector('#generated').naturalWidth > 0", timeout=30_000)
            assert page.is_hidden("#error")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 1000
