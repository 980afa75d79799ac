"""The demo page in headless Chromium: a typed sentence with an uploaded image, then every example.

The page is served by the deployed TMR app (``serve_app``, tests/fixtures/serve_app.py: the
Serve deployment graph shared with test_serve_app.py), whose NER extractor is fitted to the demo
sentence, so the first test can expect specific highlights, and whose ``examples_dir`` is the
session's tiny synthetic benchmark, so the second can click each example and compare the gold
labels the page shows with the benchmark's ``ground_truth.jsonl``. The page sends the server's
token from its token field and asks for ``full`` mode, so the back-translation is generated and
both images get grounded regions. Browser: Debian's ``chromium`` driven by playwright (never
``playwright install``); screenshots go to the test's ``tmp_path`` (pytest keeps the last runs'
under its base temp folder), never into the work tree. The last test checks ``GET /v1/examples``
on the ingress's FastAPI app alone: the pick is deterministic, and without examples it says why.
"""

from __future__ import annotations

import base64
import json
import re
import shutil

import pytest
import requests

from tests.fixtures.serve_app import DEMO_TOKENS

CHROMIUM = "/usr/bin/chromium"
EXPECTED = [("PER", "Kevin Durant"), ("ORG", "Golden State Warriors")]
ROUNDED = re.compile(r"^\d\.\d\d$")  # scores and probabilities are shown with two decimals
TIMING = re.compile(r"(\d+ ms|<1 ms)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "Debian's chromium is missing: apt-get install -y chromium (make install does it)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run",
        ])
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, serve_app):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(serve_app["url"] + "/")
    page.fill("#token", serve_app["token"])
    page.select_option("#mode", "full")
    return page


def wait_until_done(page) -> None:
    page.wait_for_function("['done', 'error'].some(s => document.querySelector('#status').textContent.startsWith(s))",
                           timeout=60_000)
    assert page.is_hidden("#error"), page.text_content("#error")


def boxes(page, frame: str) -> list[str]:
    """The phrases of the region boxes drawn on one image."""
    return page.eval_on_selector_all(f"#{frame} .box.region", "els => els.map(e => e.dataset.phrase)")


def check_method_outputs(page) -> None:
    """Phrases, regions on both images, three rounded scores, v' provenance and the server's time."""
    phrases = page.eval_on_selector_all("#phrases li.phrase", "els => els.map(e => e.textContent)")
    assert phrases
    for frame in ("preview-frame", "generated-frame"):
        drawn = boxes(page, frame)
        assert drawn and set(drawn) <= set(phrases), (frame, drawn, phrases)
    scores = page.eval_on_selector_all("#divergence tr[data-score]", "rows => rows.map(r => [r.dataset.score, r.cells[1].textContent])")
    assert [name for name, _ in scores] == ["strengthen", "complement", "weaken"]
    assert all(ROUNDED.match(value) for _, value in scores), scores
    assert abs(sum(float(v) for _, v in scores) - 1) < 0.02
    assert page.get_attribute("#generated-note", "data-source") in ("cache", "generated")
    assert TIMING.search(page.text_content("#timing")), page.text_content("#timing")


def test_the_demo_page_shows_entities_relation_image_and_scores(serve_app, browser, tmp_path):
    image = serve_app["images"] / "photo.png"
    api = requests.post(serve_app["url"] + "/v1/ner", timeout=60, headers={"Authorization": f"Bearer {serve_app['token']}"},
                        json={"text": " ".join(DEMO_TOKENS),
                              "image": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()})
    assert api.status_code == 200, api.text
    assert [(e["type"], e["text"]) for e in api.json()["entities"]] == EXPECTED
    assert api.json()["regions"] and all(len(r["box"]) == 4 for r in api.json()["regions"])

    page = open_page(browser, serve_app)
    page.fill("#text", " ".join(DEMO_TOKENS))
    page.set_input_files("#image", str(image))
    for field, value in {"#head-start": "0", "#head-end": "2", "#tail-start": "4", "#tail-end": "7"}.items():
        page.fill(field, value)
    page.click("#submit")
    wait_until_done(page)
    assert page.text_content("#status").startswith("done (full mode")
    marks = page.eval_on_selector_all("#sentence mark.ent", "els => els.map(e => [e.dataset.type, e.firstChild.textContent])")
    assert marks == [list(pair) for pair in EXPECTED]
    assert page.text_content("#relation").startswith("Relation: ")
    args = page.eval_on_selector_all("#re-sentence mark.arg", "els => els.map(e => e.firstChild.textContent)")
    assert args == ["Kevin Durant", "Golden State Warriors"]
    assert page.is_hidden("#gold") and page.is_hidden("#gold-relation")  # no gold for a typed sentence
    check_method_outputs(page)
    page.screenshot(path=str(tmp_path / "typed-sentence.png"), full_page=True)
    assert (tmp_path / "typed-sentence.png").stat().st_size > 1000


def test_each_example_shows_its_gold_labels_beside_the_prediction(serve_app, browser, tmp_path):
    benchmark = serve_app["benchmark"]
    truth = {row["id"]: row for row in map(json.loads, (benchmark / "ground_truth.jsonl").read_text().splitlines())}
    relations = json.loads((benchmark / "re" / "ours_rel2id.json").read_text())

    page = open_page(browser, serve_app)
    page.wait_for_selector("#examples .example", timeout=30_000)
    shown = page.eval_on_selector_all("#examples .example", "els => els.map(e => [e.dataset.id, e.dataset.task, e.dataset.alignment])")
    # one test-split item per task and alignment, as ground_truth.jsonl labels it
    assert [(task, alignment) for _, task, alignment in shown] == [
        (task, alignment) for task in ("ner", "re") for alignment in ("strengthen", "complement", "weaken")]
    assert all(truth[sample_id]["split"] == "test" and truth[sample_id]["alignment"] == alignment
               for sample_id, _, alignment in shown)

    for sample_id, task, alignment in shown:
        gold = truth[sample_id]
        page.eval_on_selector("#status", "el => { el.textContent = '' }")  # so "done" is this example's
        page.click(f"#examples .example[data-id='{sample_id}']")
        wait_until_done(page)
        check_method_outputs(page)
        assert page.text_content("#gold-alignment").startswith(f"Gold alignment of this example: {alignment}")
        if task == "ner":
            assert page.is_visible("#gold") and page.is_hidden("#relation-section")
            marks = page.eval_on_selector_all("#gold-sentence mark.ent",
                                              "els => els.map(e => [e.dataset.type, e.firstChild.textContent])")
            assert marks == [[m["type"], m["text"]] for m in gold["mentions"]], sample_id
            assert re.match(r"\d+ of \d+ gold entities found exactly", page.text_content("#gold-score"))
            gold_boxes = [m["box"] for m in gold["mentions"]]
        else:
            assert page.is_hidden("#gold") and page.is_visible("#relation-section")
            args = page.eval_on_selector_all("#re-sentence mark.arg", "els => els.map(e => [e.className, e.firstChild.textContent])")
            assert sorted(args) == [["arg head", gold["head"]], ["arg tail", gold["tail"]]], sample_id
            assert page.text_content("#gold-relation").startswith(f"Gold: {gold['relation']} ")
            rows = page.eval_on_selector_all("#probabilities tbody tr", "rows => rows.map(r => [r.dataset.relation, r.cells[1].textContent])")
            # every label of the served model (the tiny test model has its own label set), probabilities summing to 1
            assert len(rows) >= 2 and len({label for label, _ in rows}) == len(rows)
            assert all(ROUNDED.match(p) for _, p in rows) and abs(sum(float(p) for _, p in rows) - 1) < 0.05
            assert gold["relation"] in relations
            gold_boxes = [gold["head_box"], gold["tail_box"]]
        drawn_gold = page.eval_on_selector_all("#preview-frame .box.gold", "els => els.length")
        assert drawn_gold == sum(box is not None for box in gold_boxes), sample_id  # none for weaken
        page.screenshot(path=str(tmp_path / f"example-{task}-{alignment}.png"), full_page=True)
    assert len(list(tmp_path.glob("example-*.png"))) == 6


# Last in the file: it needs no app, so the app's tests above run back to back on one deployment.
def test_examples_route_serves_one_test_item_per_task_and_alignment_or_says_why_not(tiny_benchmark, tmp_path):
    """``GET /v1/examples`` on the ingress's FastAPI app alone (no Ray, no models): the pick is
    deterministic, and a server without examples answers 404 saying why (the page then shows it)."""
    from starlette.testclient import TestClient

    from serve.ingress import IngressSettings, Pipeline, build_api

    def get(examples_dir):
        settings = IngressSettings(examples_dir=examples_dir, auth_token_env=None)
        with TestClient(build_api(Pipeline(None, None, settings), settings, token=None)) as client:
            assert client.get("/").status_code == 200  # the page itself never depends on examples
            return client.get("/v1/examples")

    from serve.examples import load_examples

    first = get(str(tiny_benchmark))
    load_examples.cache_clear()  # read the files again: the same pick
    again = get(str(tiny_benchmark))
    assert first.status_code == 200 and first.json() == again.json()
    examples = first.json()["examples"]
    assert [(e["task"], e["alignment"]) for e in examples] == [
        (task, alignment) for task in ("ner", "re") for alignment in ("strengthen", "complement", "weaken")]
    for example in examples:
        assert example["image"].startswith("data:image/png;base64,") and example["tokens"] == example["text"].split()
        if example["task"] == "ner":
            assert example["gold"]["entities"]
        else:
            head, tail = example["gold"]["head"], example["gold"]["tail"]
            assert example["tokens"][head["start"]:head["end"]] == head["text"].split() and example["gold"]["relation"]
            assert example["tokens"][tail["start"]:tail["end"]] == tail["text"].split()

    missing = get(str(tmp_path / "nowhere"))
    assert missing.status_code == 404 and "ground_truth.jsonl does not exist" in missing.json()["detail"][0]["msg"]
    none = get(None)
    assert none.status_code == 404 and "examples_dir is null" in none.json()["detail"][0]["msg"]
