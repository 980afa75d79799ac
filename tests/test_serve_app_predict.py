"""jobs.predict: batch prediction over a file of posts with the same steps as the served app.

Named to run right after test_serve_app.py and every test here holds the deployed app
(``serve_app``), so the session deploys it once for both and the browser test after them: predict's
rows and the app's answers to the same posts must be identical, since both wrap tmr_core.inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from benchmarks.bench_serve import png_bytes
from tests.fixtures.serve_app import DEMO_TOKENS

pytestmark = pytest.mark.usefixtures("ray_local", "serve_app")

GOOD = [
    {"id": "demo", "tokens": DEMO_TOKENS, "image": "photo.png"},
    {"id": "other-image", "tokens": "Kevin Durant met Golden State in Oakland".split(), "image": "blue.png"},
    {"id": "text-only", "tokens": "Golden State Warriors beat Kevin Durant".split()},
]


def write_posts(folder: Path, extra_lines: list[str] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "photo.png").write_bytes(png_bytes())
    (folder / "blue.png").write_bytes(png_bytes(size=(64, 64), colour=(0, 90, 200)))
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    posts = folder / "posts.jsonl"
    posts.write_text("".join(json.dumps(row) + "\n" for row in GOOD) + "".join(line + "\n" for line in extra_lines))
    return posts


BAD_LINES = [
    json.dumps({"id": "no-text", "image": "photo.png"}),                             # line 4
    json.dumps({"id": "broken-image", "text": "Kevin Durant", "image": "broken.png"}),  # line 5
    "{not json",                                                                      # line 6
    json.dumps({"id": "bad-span", "text": "Kevin Durant", "head": {"start": 0, "end": 3},
                "tail": {"start": 6, "end": 12}}),                                   # line 7
]


def predict_args(models: dict, posts: Path, output: Path, *extra: str) -> list[str]:
    checkpoints, tiny = models["checkpoints"], models["tiny"]
    return [
        "--config", "configs/predict.tiny.yaml", "--input", str(posts), "--output", str(output),
        "--ner_model", checkpoints["ner"], "--re_model", checkpoints["re"],
        "--divergence.checkpoint", checkpoints["mde"], "--grounding.detector.model", tiny["detector"],
        "--back_translation.generation.model", tiny["text_to_image"], "--back_translation.generation.steps", "2",
        "--back_translation.task_models", "{}",  # one back-translator for both tasks, as the served app's
        "--back_translation.cache_uri", str(models["root"] / "cache"),
        # two rows per batch, so several parts: what a rerun resumes from
        *(arg for step in ("phrases", "back_translation", "grounding", "divergence", "ner", "re")
          for arg in (f"--{step}.compute.batch_size", "2")),
        *extra,
    ]


def read_predictions(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def predicted(serve_models, tmp_path_factory) -> dict:
    from jobs import predict

    root = tmp_path_factory.mktemp("predict")
    posts = write_posts(root / "posts", BAD_LINES)
    output = root / "out"
    assert predict.main(predict_args(serve_models, posts, output)) == 0
    return {"posts": posts, "output": output, "rows": read_predictions(output), "root": root}


def test_every_input_line_comes_out_once_in_order_with_bad_rows_as_errors_naming_their_line(predicted):
    rows = predicted["rows"]
    assert [r["line"] for r in rows] == list(range(1, 8))
    errors = {r["id"]: r["error"] for r in rows}
    posts = str(predicted["posts"])
    assert all(errors[g["id"]] is None for g in GOOD)
    assert errors["no-text"].startswith(f"{posts}:4: no text")
    assert errors["broken-image"].startswith(f"{posts}:5: grounding: image 'broken.png'")
    assert errors["line-6"].startswith(f"{posts}:6: not valid JSON")
    assert errors["bad-span"].startswith(f"{posts}:7: head: characters [0, 3) do not start and end on token boundaries")
    summary = json.loads((predicted["output"] / "summary.json").read_text())
    assert summary["rows"] == 7 and summary["rows_failed"] == 4 and summary["rows_without_image"] == 1


def test_entities_then_relations_for_every_ordered_pair(predicted):
    by_id = {r["id"]: r for r in predicted["rows"]}
    for good in GOOD:
        row = by_id[good["id"]]
        k = len(row["entities"])
        assert len(row["relations"]) == k * (k - 1)
        pairs = {(r["head"]["start"], r["tail"]["start"]) for r in row["relations"]}
        assert pairs == {(h["start"], t["start"]) for h in row["entities"] for t in row["entities"] if h is not t}
    assert by_id["text-only"]["image_used"] is False and by_id["text-only"]["divergence"] is None
    assert by_id["demo"]["image_used"] is True and len(by_id["demo"]["divergence"]) == 3
    # the fitted demo sentence: its entities as the served app is expected to find them
    assert [(e["text"], e["type"]) for e in by_id["demo"]["entities"]] == [("Kevin Durant", "PER"),
                                                                             ("Golden State Warriors", "ORG")]
    conll = (predicted["output"] / "predictions.conll").read_text()
    assert "# id = demo\nKevin\tB-PER\nDurant\tI-PER\njoins\tO\n" in conll


def test_predict_equals_the_served_app_on_the_same_posts(predicted, serve_app):
    from tests.fixtures.serve_app import TOKEN

    headers = {"Authorization": f"Bearer {TOKEN}"}
    by_id = {r["id"]: r for r in predicted["rows"]}
    folder = predicted["posts"].parent
    for good in GOOD:
        body = {"tokens": good["tokens"], "mode": "fast"}
        if "image" in good:
            body["image_uri"] = str(serve_app["images"] / "photo.png") if good["image"] == "photo.png" else None
            if body["image_uri"] is None:  # outside the app's allowed prefixes: send the bytes
                import base64

                body.pop("image_uri")
                body["image"] = base64.b64encode((folder / good["image"]).read_bytes()).decode()
        served = requests.post(serve_app["url"] + "/v1/ner", json=body, headers=headers, timeout=60).json()
        ours = by_id[good["id"]]
        assert [(e["start"], e["end"], e["type"]) for e in served["entities"]] == \
            [(e["start"], e["end"], e["type"]) for e in ours["entities"]], good["id"]
        for a, b in zip(served["entities"], ours["entities"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
        if ours["divergence"] is None:
            assert served["divergence"] is None
        else:
            assert list(served["divergence"].values()) == pytest.approx(ours["divergence"], abs=1e-5)
        if ours["relations"]:
            head, tail = ours["relations"][0]["head"], ours["relations"][0]["tail"]
            re_body = {**body, "head": {"start": head["start"], "end": head["end"]},
                       "tail": {"start": tail["start"], "end": tail["end"]}}
            served_re = requests.post(serve_app["url"] + "/v1/re", json=re_body, headers=headers, timeout=60).json()
            assert served_re["relation"] == ours["relations"][0]["relation"]
            assert served_re["probabilities"][served_re["relation"]] == pytest.approx(
                ours["relations"][0]["probability"], abs=1e-5)


def test_a_rerun_predicts_only_the_lines_a_crash_left_and_gives_the_same_output(predicted, serve_models, capsys):
    from jobs import predict
    from jobs._config import ConfigError

    output = predicted["output"]
    parts = sorted((output / "parts").glob("part-*.parquet"))
    assert len(parts) > 1  # batch_size 2: several parts
    parts[0].unlink()  # as if the job died before that block was written
    parts[1].write_bytes(b"torn")  # and while writing another
    before = (output / "predictions.jsonl").read_text()
    assert predict.main(predict_args(serve_models, predicted["posts"], output)) == 0
    said = capsys.readouterr().out
    assert "7 rows" in said and "to go" in said and "0 already predicted" not in said
    assert (output / "predictions.jsonl").read_text() == before
    # the parts belong to this input: an edited input is refused, not mixed in
    predicted["posts"].write_text(predicted["posts"].read_text() + json.dumps(GOOD[0] | {"id": "new"}) + "\n")
    with pytest.raises(ConfigError, match="input_files changed"):
        predict.main(predict_args(serve_models, predicted["posts"], output))


def test_csv_and_parquet_inputs_give_the_rows_jsonl_gives(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import predict
    from jobs._config import parse_config

    rows = [{"id": "a", "text": "Kevin Durant in Oakland", "tokens": None, "image": "photo.png"},
            {"id": "b", "text": None, "tokens": json.dumps(["Golden", "State"]), "image": None}]
    (tmp_path / "posts.csv").write_text("id,text,tokens,image\na,Kevin Durant in Oakland,,photo.png\n"
                                        'b,,"[""Golden"", ""State""]",\n')
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "posts.parquet")
    (tmp_path / "posts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = {}
    for suffix in ("jsonl", "csv", "parquet"):
        cfg = parse_config(predict.Config, ["--input", str(tmp_path / f"posts.{suffix}"), "--ner_model", "m"])
        read[suffix] = [{k: r[k] for k in ("id", "tokens", "offsets", "image_uri", "error")}
                        for r in predict.input_rows(cfg, predict.read_records(cfg.input), str(tmp_path))]
    assert read["csv"] == read["jsonl"] == read["parquet"]
    assert read["csv"][0]["tokens"] == ["Kevin", "Durant", "in", "Oakland"] and read["csv"][0]["offsets"][3] == (16, 23)
    assert read["csv"][1]["image_uri"] is None and read["csv"][0]["image_uri"] == str(tmp_path / "photo.png")


def test_a_failed_first_row_keeps_its_batch_mates_predictions(tmp_path):
    from jobs import predict

    def step(rows):
        return [{**row, "entities": [{"type": "PER"}]} for row in rows]

    rows = [{"id": "bad", "line": 1, "error": "in:1: no text"}, {"id": "good", "line": 2, "error": None}]
    table = predict._table(predict._run_isolated(step, rows, "ner", "in"))
    assert table.column("entities").to_pylist() == [None, [{"type": "PER"}]]
    # a UTF-8 byte-order mark (spreadsheet exports) is not a bad first line
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + b'{"id": "a", "text": "x"}\n')
    assert predict.read_records(str(tmp_path / "bom.jsonl"))[0]["id"] == "a"
    (tmp_path / "ids.csv").write_text("id,text\n007,12345\n")
    assert predict.read_records(str(tmp_path / "ids.csv"))[0] | {"_line": 0} == {"id": "007", "text": "12345", "_line": 0}
