"""jobs.prepare_dataset end to end on the real TMR samples, with tiny images made here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs._config import ConfigError
from jobs.prepare_dataset import main
from tmr_core.errors import DataFormatError
from tmr_core.readers import chunk_entities, read_mnre, read_twitter_ner
from tmr_core.schema import base_schema

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "tmr-data"
NER_FILES = {
    "twitter2015": {"train": "train.txt", "valid": "val.txt", "test": "test.txt"},
    "twitter2017": {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"},
}
MNRE_FILES = {"train": "ours_train.txt", "valid": "ours_val.txt", "test": "ours_test.txt"}


def write_image(path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path, fmt)


def ner_images(dataset: str, image_dir: Path) -> dict[str, list[str]]:
    """One tiny JPEG per IMGID of every split; returns the ids per split."""
    ids = {}
    for split, name in NER_FILES[dataset].items():
        ids[split] = [s.image_id for s in read_twitter_ner(DATA / dataset / name)]
        for image_id in ids[split]:
            write_image(image_dir / f"{image_id}.jpg")
    return ids


def read_split(output: Path | str, split: str, filesystem=None):
    return pq.read_table(f"{output}/{split}.parquet", filesystem=filesystem)


@pytest.fixture(scope="module")
def t17_images(tmp_path_factory):
    image_dir = tmp_path_factory.mktemp("t17_images")
    return image_dir, ner_images("twitter2017", image_dir)


def test_cli_twitter2017_end_to_end(tmp_path, t17_images):
    image_dir, ids = t17_images
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "jobs.prepare_dataset", "--format", "twitter2017",
         "--data_dir", str(DATA / "twitter2017"), "--image_dir", str(image_dir), "--output", str(output)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "resolved config" in result.stdout
    for split in ("train", "valid", "test"):
        table = read_split(output, split)
        assert table.schema.equals(base_schema("ner"))
        rows = table.to_pylist()
        assert [r["id"] for r in rows] == ids[split] == [r["image_id"] for r in rows]
        sentences = read_twitter_ner(DATA / "twitter2017" / NER_FILES["twitter2017"][split])
        assert [r["tokens"] for r in rows] == [s.tokens for s in sentences]
        assert [r["tags"] for r in rows] == [s.tags for s in sentences]
        assert {r["split"] for r in rows} == {split} and {r["task"] for r in rows} == {"ner"}
        assert all(r["image_uri"] == str(image_dir / f"{r['id']}.jpg") for r in rows)
        entities = sum(len(chunk_entities(s.tags)) for s in sentences)
        assert f"  {split}: 200 rows read, 200 written; images missing 0, corrupt 0" in result.stdout
        assert f"entities per type ({entities}):" in result.stdout
    saved = (output / "config.yaml").read_text()
    assert "format: twitter2017" in saved and "task: ner" in saved


def test_twitter2015_other_becomes_misc(tmp_path):
    image_dir = tmp_path / "images"
    ner_images("twitter2015", image_dir)
    output = tmp_path / "out"
    assert main(["--format", "twitter2015", "--data_dir", str(DATA / "twitter2015"),
                 "--image_dir", str(image_dir), "--output", str(output)]) == 0
    tags = {t for split in ("train", "valid", "test") for row in read_split(output, split).to_pylist() for t in row["tags"]}
    assert "B-MISC" in tags and not any("OTHER" in t for t in tags)


def mnre_images(image_dir: Path, layout: str) -> dict[str, list]:
    """Tiny JPEGs for every MNRE image, flat or in TMR's img_org/{train,val,test}/ layout."""
    instances = {}
    for split, name in MNRE_FILES.items():
        instances[split] = read_mnre(DATA / "mnre" / name)
        folder = image_dir / {"train": "train", "valid": "val", "test": "test"}[split] if layout == "tmr" else image_dir
        for inst in instances[split]:
            write_image(folder / inst.image_id)
    return instances


def test_mnre_with_tmr_image_layout(tmp_path, capsys):
    image_dir = tmp_path / "img_org"
    instances = mnre_images(image_dir, layout="tmr")
    output = tmp_path / "out"
    assert main(["--format", "mnre", "--data_dir", str(DATA / "mnre"), "--image_dir", str(image_dir),
                 "--output", str(output)]) == 0
    summary = capsys.readouterr().out
    for split, expected in (("train", 200), ("valid", 200), ("test", 202)):
        table = read_split(output, split)
        assert table.schema.equals(base_schema("re"))
        rows = table.to_pylist()
        assert len(rows) == expected == len({r["id"] for r in rows})
        for row, inst in zip(rows, instances[split], strict=True):
            assert row["id"].startswith(Path(inst.image_id).stem + "-")
            assert row["image_id"] == inst.image_id and row["relation"] == inst.relation
            assert row["head"] == {"name": inst.head.name, "start": inst.head.start, "end": inst.head.end}
            assert row["tail"] == {"name": inst.tail.name, "start": inst.tail.start, "end": inst.tail.end}
            tmr_split = {"train": "train", "valid": "val", "test": "test"}[split]
            assert row["image_uri"] == str(image_dir / tmr_split / inst.image_id)
        assert f"  {split}: {expected} rows read, {expected} written" in summary
    assert "relations per label (200): None 112," in summary  # ours_val sample: 112 of 200 are None


def test_rerun_gives_identical_tables(tmp_path, t17_images):
    image_dir, _ = t17_images
    args = ["--format", "twitter2017", "--data_dir", str(DATA / "twitter2017"), "--image_dir", str(image_dir),
            "--splits", "test"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 0
    assert main(args + ["--output", str(tmp_path / "b")]) == 0
    assert read_split(tmp_path / "a", "test").equals(read_split(tmp_path / "b", "test"))
    assert not (tmp_path / "a" / "train.parquet").exists()


def t17_test_images(tmp_path):
    """A readable JPEG for every sentence of twitter2017/test.txt, and the sentences."""
    image_dir = tmp_path / "images"
    sentences = read_twitter_ner(DATA / "twitter2017" / "test.txt")
    for s in sentences:
        write_image(image_dir / f"{s.image_id}.jpg")
    return image_dir, sentences


@pytest.fixture
def t17_test_with_gaps(tmp_path):
    """Images for twitter2017/test.txt with two missing and one corrupt."""
    image_dir, sentences = t17_test_images(tmp_path)
    missing = [sentences[3], sentences[10]]
    for s in missing:
        (image_dir / f"{s.image_id}.jpg").unlink()
    corrupt = sentences[5]
    (image_dir / f"{corrupt.image_id}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return image_dir, sentences, missing, corrupt


def run_policy(image_dir: Path, output: Path, policy: str) -> int:
    return main(["--format", "twitter2017", "--data_dir", str(DATA / "twitter2017"), "--image_dir", str(image_dir),
                 "--output", str(output), "--splits", "test", "--on_missing_image", policy])


def test_missing_image_policy_error(tmp_path, t17_test_with_gaps):
    image_dir, _, missing, _ = t17_test_with_gaps
    with pytest.raises(DataFormatError) as info:
        run_policy(image_dir, tmp_path / "out", "error")
    message = str(info.value)
    assert message.startswith(f"{DATA / 'twitter2017' / 'test.txt'}:{missing[0].line}: no image at ")
    assert "2 sample(s) of split 'test' have a missing image and 1 a corrupt one" in message
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_image_policy_skip_drops_training_rows_only(tmp_path, t17_test_with_gaps, capsys):
    # valid and test are never thinned (scores stay comparable with the paper's): skip keeps them
    # as keep does, with a null image_uri; only training rows are dropped
    image_dir, sentences, missing, corrupt = t17_test_with_gaps
    assert run_policy(image_dir, tmp_path / "out", "skip") == 0
    rows = read_split(tmp_path / "out", "test").to_pylist()
    assert [r["id"] for r in rows] == [s.image_id for s in sentences]
    assert {r["id"] for r in rows if r["image_uri"] is None} == {s.image_id for s in missing} | {corrupt.image_id}
    assert "test: 200 rows read, 200 written; images missing 2, corrupt 1" in capsys.readouterr().out

    from tmr_core.readers import rows_for_split

    train = read_twitter_ner(DATA / "twitter2017" / "train.txt")
    for s in train[1:]:
        write_image(image_dir / f"{s.image_id}.jpg")
    kept, stats = rows_for_split("twitter2017", "ner", str(DATA / "twitter2017"), str(image_dir), "train", "skip")
    assert [r["id"] for r in kept] == [s.image_id for s in train[1:]] and stats.images_missing == 1


def test_missing_image_policy_keep(tmp_path, t17_test_with_gaps, capsys):
    image_dir, sentences, missing, corrupt = t17_test_with_gaps
    assert run_policy(image_dir, tmp_path / "out", "keep") == 0
    rows = read_split(tmp_path / "out", "test").to_pylist()
    assert len(rows) == 200
    nulls = {r["id"] for r in rows if r["image_uri"] is None}
    assert nulls == {s.image_id for s in missing} | {corrupt.image_id}
    assert "test: 200 rows read, 200 written; images missing 2, corrupt 1" in capsys.readouterr().out


def synthetic_layout(root: Path) -> None:
    """The benchmark's layout, built from a few real sample lines: ner/, re/, images/*.png."""
    for split, name in NER_FILES["twitter2017"].items():
        blocks = (DATA / "twitter2017" / name).read_text(encoding="utf-8").split("\n\n")[:3]
        blocks = [b.replace("IMGID:", f"IMGID:syn_{split}_") for b in blocks]
        (root / "ner").mkdir(parents=True, exist_ok=True)
        (root / "ner" / f"{split}.txt").write_text("\n\n".join(blocks) + "\n\n", encoding="utf-8")
        for s in read_twitter_ner(root / "ner" / f"{split}.txt"):
            write_image(root / "images" / f"{s.image_id}.png", "PNG")
    (root / "re").mkdir()
    (root / "re" / "ours_rel2id.json").write_bytes((DATA / "mnre" / "ours_rel2id.json").read_bytes())
    for name in MNRE_FILES.values():
        lines = (DATA / "mnre" / name).read_text(encoding="utf-8").splitlines(keepends=True)[:4]
        (root / "re" / name).write_text("".join(lines), encoding="utf-8")
        for inst in read_mnre(root / "re" / name):
            write_image(root / "images" / inst.image_id, "PNG")


@pytest.mark.parametrize("task", ["ner", "re"])
def test_synthetic_layout(tmp_path, task):
    synthetic_layout(tmp_path / "bench")
    output = tmp_path / "out"
    assert main(["--format", "synthetic", "--task", task, "--data_dir", str(tmp_path / "bench"),
                 "--output", str(output)]) == 0
    rows = read_split(output, "train").to_pylist()
    assert {r["task"] for r in rows} == {task}
    if task == "ner":
        assert [r["id"] for r in rows][0] == "syn_train_" + read_twitter_ner(DATA / "twitter2017" / "train.txt")[0].image_id
        assert all(r["image_uri"] == str(tmp_path / "bench" / "images" / f"{r['id']}.png") for r in rows)
    else:
        assert len(rows) == 4
        assert all(r["image_uri"] == str(tmp_path / "bench" / "images" / r["image_id"]) for r in rows)


def test_config_conflicts_are_rejected_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        main(["--format", "synthetic", "--splits", "[]", "--output", str(tmp_path)])
    assert "--task" in str(info.value) and "--splits" in str(info.value)
    with pytest.raises(ConfigError, match=r"--task re: --format twitter2015 is a ner dataset"):
        main(["--format", "twitter2015", "--task", "re", "--image_dir", "x"])
    with pytest.raises(ConfigError, match=r"--image_dir: --format mnre needs"):
        main(["--format", "mnre"])


def test_writes_to_s3(tmp_path, t17_images, s3_endpoint, s3_bucket):
    image_dir, ids = t17_images
    output = f"s3://{s3_bucket}/tmr/twitter2017"
    assert main(["--format", "twitter2017", "--data_dir", str(DATA / "twitter2017"), "--image_dir", str(image_dir),
                 "--output", output, "--storage.endpoint_url", s3_endpoint]) == 0
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http", region="us-east-1")
    listed = {info.base_name for info in fs.get_file_info(pafs.FileSelector(f"{s3_bucket}/tmr/twitter2017"))}
    assert listed == {"train.parquet", "valid.parquet", "test.parquet", "config.yaml", "_SUCCESS.json"}
    for split in ("train", "valid", "test"):
        table = pq.read_table(f"{s3_bucket}/tmr/twitter2017/{split}.parquet", filesystem=fs)
        assert table.schema.equals(base_schema("ner"))
        assert table.column("id").to_pylist() == ids[split]
    with fs.open_input_stream(f"{s3_bucket}/tmr/twitter2017/config.yaml") as handle:
        assert f"endpoint_url: {s3_endpoint}" in handle.read().decode()


# --------------------------------------------------------------------------- hostile and broken data


def write_truncated_jpeg(path: Path) -> None:
    """A JPEG cut in half: PIL's verify() accepts it, decoding it fails ("image file is truncated")."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def t17_test_with_truncated(tmp_path):
    image_dir, sentences = t17_test_images(tmp_path)
    truncated = sentences[7]
    write_truncated_jpeg(image_dir / f"{truncated.image_id}.jpg")
    with Image.open(image_dir / f"{truncated.image_id}.jpg") as image:
        image.verify()  # the case at hand: a header check alone lets it through
    return image_dir, truncated


def test_truncated_jpeg_meets_the_policy_here(tmp_path, t17_test_with_truncated, capsys):
    image_dir, truncated = t17_test_with_truncated
    with pytest.raises(DataFormatError) as info:
        run_policy(image_dir, tmp_path / "out", "error")
    assert str(info.value).startswith(f"{DATA / 'twitter2017' / 'test.txt'}:{truncated.line}: ")
    assert "is not a readable image (image file is truncated" in str(info.value)
    assert "0 sample(s) of split 'test' have a missing image and 1 a corrupt one" in str(info.value)
    assert run_policy(image_dir, tmp_path / "kept", "keep") == 0
    rows = read_split(tmp_path / "kept", "test").to_pylist()
    assert [r["id"] for r in rows if r["image_uri"] is None] == [truncated.image_id]
    assert "test: 200 rows read, 200 written; images missing 0, corrupt 1" in capsys.readouterr().out


def small_ner_dataset(root: Path, image_dir: Path, blocks_per_split: int = 3) -> dict[str, list[str]]:
    """train/valid/test.txt from the first real Twitter-2017 blocks of each split, with images."""
    root.mkdir(parents=True, exist_ok=True)
    blocks = {}
    for split, name in NER_FILES["twitter2017"].items():
        blocks[split] = (DATA / "twitter2017" / name).read_text(encoding="utf-8").split("\n\n")[:blocks_per_split]
        (root / name).write_text("\n\n".join(blocks[split]) + "\n\n", encoding="utf-8")
        for s in read_twitter_ner(root / name):
            write_image(image_dir / f"{s.image_id}.jpg")
    return blocks


def run_small(root: Path, image_dir: Path, output: Path, *extra: str) -> int:
    return main(["--format", "twitter2017", "--data_dir", str(root), "--image_dir", str(image_dir),
                 "--output", str(output), *extra])


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_split_file_is_an_error_naming_it(tmp_path, content):
    root, images = tmp_path / "t17", tmp_path / "images"
    small_ner_dataset(root, images)
    (root / "valid.txt").write_text(content)
    with pytest.raises(DataFormatError) as info:
        run_small(root, images, tmp_path / "out")
    assert str(info.value).startswith(f"{root / 'valid.txt'}: holds no samples; expected the valid split's IMGID blocks")
    assert not (tmp_path / "out" / "train.parquet").exists()


@pytest.mark.parametrize("image_id", ["../outside", "sub/../../outside", "/tmp/outside"])
def test_ner_image_id_outside_image_dir_is_refused_with_path_line(tmp_path, image_id):
    root, images = tmp_path / "t17", tmp_path / "images"
    small_ner_dataset(root, images)
    write_image(images.parent / "outside.jpg")  # it exists: only the name's escape is wrong
    text = (root / "test.txt").read_text(encoding="utf-8")
    second = text.split("\n\n")[1].split("\n")[0]  # "IMGID:<id>" of the second block
    (root / "test.txt").write_text(text.replace(second, f"IMGID:{image_id}"), encoding="utf-8")
    line = text.split("\n").index(second) + 1
    with pytest.raises(DataFormatError) as info:
        run_small(root, images, tmp_path / "out", "--on_missing_image", "keep")
    assert str(info.value).startswith(
        f"{root / 'test.txt'}:{line}: image '{image_id}' resolves outside --image_dir {images}; expected a file name inside it"
    )


def test_mnre_image_name_outside_image_dir_is_refused_with_path_line(tmp_path):
    root, images = tmp_path / "mnre", tmp_path / "img_org"
    root.mkdir()
    (root / "ours_rel2id.json").write_bytes((DATA / "mnre" / "ours_rel2id.json").read_bytes())
    lines = (DATA / "mnre" / "ours_test.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:3]
    name = read_mnre(DATA / "mnre" / "ours_test.txt")[2].image_id
    lines[2] = lines[2].replace(repr(name), repr("../../" + name))
    (root / "ours_test.txt").write_text("".join(lines), encoding="utf-8")
    for inst in read_mnre(root / "ours_test.txt"):
        write_image(images / "test" / inst.image_id)
    with pytest.raises(DataFormatError) as info:
        main(["--format", "mnre", "--data_dir", str(root), "--image_dir", str(images), "--splits", "test",
              "--output", str(tmp_path / "out")])
    assert str(info.value).startswith(f"{root / 'ours_test.txt'}:3: image '../../{name}' resolves outside --image_dir")


def test_same_sample_in_two_splits_is_an_error_unless_allowed(tmp_path, capsys):
    root, images = tmp_path / "t17", tmp_path / "images"
    blocks = small_ner_dataset(root, images)
    leaked = blocks["test"][:2]
    (root / "train.txt").write_text("\n\n".join(blocks["train"] + leaked) + "\n\n", encoding="utf-8")
    ids = sorted(block.split("\n")[0].removeprefix("IMGID:") for block in leaked)
    with pytest.raises(DataFormatError) as info:
        run_small(root, images, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"{root / 'test.txt'}: 2 sample id(s) in both 'train' ({root / 'train.txt'}) and "
                              f"'test' ({root / 'test.txt'}), e.g. '{ids[0]}', '{ids[1]}'")
    assert "--allow_cross_split_duplicates true" in message
    assert not (tmp_path / "out").exists()

    assert run_small(root, images, tmp_path / "out", "--allow_cross_split_duplicates", "true") == 0
    assert "warning: 2 sample id(s) in both 'train'" in capsys.readouterr().out
    assert set(ids) <= set(read_split(tmp_path / "out", "train").column("id").to_pylist())
