"""The back-translation cache trusts no file: a cached image that does not decode (truncated, a
half-finished copy) is a miss, regenerated over atomically and counted by the job."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tmr_core.back_translation import BackTranslator, GenerationSettings
from tmr_core.schema import base_schema

TINY_GENERATION = ["--generation.steps", "2", "--generation.height", "32", "--generation.width", "32",
                   "--generation.guidance_scale", "1.0", "--generation.scheduler", "EulerDiscreteScheduler"]
SENTENCES = ["Dell is trending right now", "Happy birthday to Ford !", "Kevin Durant joins the Warriors"]


def truncate(path: str | Path) -> None:
    """Keep the PNG's first bytes: it still opens (the header is there) but does not load."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def decodes(path: str | Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.fixture
def settings(tiny_models) -> GenerationSettings:
    return GenerationSettings(model=tiny_models["text_to_image"], scheduler="EulerDiscreteScheduler", steps=2,
                              guidance_scale=1.0, height=32, width=32)


def test_a_truncated_cached_image_is_a_miss_and_is_regenerated(settings, tmp_path):
    translator = BackTranslator(settings, str(tmp_path))
    first = translator(SENTENCES[:2], [0, 0])
    truncate(first[0].uri)
    assert not decodes(first[0].uri)

    looked_up = translator.look_up(SENTENCES[:2], [0, 0])
    assert looked_up[0] is None  # a miss, not "cached"
    assert looked_up[1] is not None and looked_up[1].cached

    again = translator(SENTENCES[:2], [0, 0])
    assert again[0].uri == first[0].uri and not again[0].cached and again[0].regenerated_corrupt
    assert again[1].cached and not again[1].regenerated_corrupt
    assert decodes(again[0].uri) and not list(tmp_path.rglob("*.tmp-*"))  # replaced atomically
    assert translator(SENTENCES[:1], [0])[0].cached  # and a hit from then on


def test_an_empty_or_non_image_cached_file_is_a_miss(settings, tmp_path):
    translator = BackTranslator(settings, str(tmp_path))
    uri = translator.uri_for(SENTENCES[0], 0)
    Path(uri).parent.mkdir(parents=True)
    for content in (b"", b"<html>502 Bad Gateway</html>"):
        Path(uri).write_bytes(content)
        assert translator.look_up(SENTENCES[:1], [0]) == [None]


def _table(folder: Path) -> None:
    rows = [{"id": f"s{i}", "split": "test", "task": "ner", "tokens": s.split(), "tags": ["O"] * len(s.split()),
             "image_id": f"s{i}", "image_uri": None} for i, s in enumerate(SENTENCES)]
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=base_schema("ner")), folder / "test.parquet")


def test_the_job_regenerates_a_corrupt_cached_image_and_counts_it(ray_local, tiny_models, tmp_path, capsys):
    from jobs import generate_back_translations

    _table(tmp_path / "in")
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--cache_uri", str(tmp_path / "cache"),
            "--splits", "[test]", "--generation.model", tiny_models["text_to_image"], *TINY_GENERATION,
            "--compute.batch_size", "3"]
    assert generate_back_translations.main(args) == 0
    first = {r["id"]: r["back_translation_uri"] for r in pq.read_table(tmp_path / "out" / "test").to_pylist()}
    truncate(first["s1"])

    capsys.readouterr()
    assert generate_back_translations.main([*args, "--force", "true"]) == 0
    out = capsys.readouterr().out
    assert "generated 1 | cached 2 | failed 0 | regenerated corrupt 1" in out, out
    summary = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())["summary"]
    assert summary["regenerated_corrupt"] == 1 and summary["generated"] == 1 and summary["cached"] == 2
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "test").to_pylist()}
    assert rows["s1"]["back_translation_uri"] == first["s1"] and rows["s1"]["back_translation_error"] is None
    assert all(decodes(r["back_translation_uri"]) for r in rows.values())  # what ground_phrases reads next
