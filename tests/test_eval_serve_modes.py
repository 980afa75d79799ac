"""benchmarks.eval_serve_modes: the served composite model scored on a test split in full and fast mode."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from benchmarks.bench_serve import tiny_app_args
from tests.fixtures.serve_app import DEMO_TAGS, DEMO_TOKENS


def _workdir_with_a_test_split(root, image) -> str:
    """``<workdir>/stages/ner/divergence/test/`` holding the demo sentence twice, as run_pipeline lays it out."""
    folder = root / "stages" / "ner" / "divergence" / "test"
    folder.mkdir(parents=True)
    rows = [{"id": f"row{i}", "tokens": DEMO_TOKENS, "tags": DEMO_TAGS, "image_uri": str(image)} for i in range(2)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-0.parquet")
    return str(root)


def test_full_and_fast_modes_are_scored_and_cold_fast_mode_has_no_back_translation(serve_models, tmp_path):
    from benchmarks import eval_serve_modes

    workdir = _workdir_with_a_test_split(tmp_path / "work", serve_models["images"] / "photo.png")
    args = tiny_app_args(serve_models["checkpoints"], serve_models["tiny"], tmp_path / "cache", auth_token_env=None)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "tmr", "import_path": "serve.app:build_app",
                                                        "args": args}]}))
    output = tmp_path / "modes.json"

    assert eval_serve_modes.main(["--workdir", workdir, "--serve-config", str(config), "--tasks", "ner",
                                  "--output", str(output)]) == 0

    results = {r["arm"]: r for r in json.loads(output.read_text())}
    assert set(results) == {"full", "fast (warm cache)", "fast (cold cache)"}
    # full generated both back-translations into the cache; warm fast mode found them there
    assert results["full"]["with_back_translation"] == results["fast (warm cache)"]["with_back_translation"] == 2
    assert results["fast (cold cache)"]["with_back_translation"] == 0
    # the NER model was fitted to this sentence and image (tests/fixtures/serve_app.py)
    assert results["fast (cold cache)"]["test_f1"] == 1.0
    assert all(0.0 <= r["test_f1"] <= 1.0 for r in results.values())
