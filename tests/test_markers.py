"""Stage markers are never trusted blindly: a killed or failed rerun leaves no "done" marker, a
marker that no longer describes its files is an error naming the folder and what differs, and an
output that cannot be written fails (one line) before any input is read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import _data
from jobs._data import SUCCESS_MARKER
from tmr_core import storage
from tmr_core.errors import TMRError
from tmr_core.schema import base_schema

TREES = {
    "s1": ("(ROOT (S (NP (NNP Taylor) (NNP Swift)) (VP (VBZ wins) (NP (DT the) (NN award)))))",
           ["Taylor", "Swift", "wins", "the", "award"]),
    "s2": ("(ROOT (S (NP (DT the) (NNS streets)) (VP (VBP glow))))", ["the", "streets", "glow"]),
    "s3": ("(ROOT (S (VP (VB Go) (ADVP (RB now)))))", ["Go", "now"]),
}


def _rows(split: str, n: int) -> pa.Table:
    rows = [{"id": f"{split}{i}", "split": split, "task": "ner", "tokens": ["a"], "tags": ["O"],
             "image_id": f"{split}{i}", "image_uri": None} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=base_schema("ner"))


def make_stage_folder(folder: Path, counts: dict[str, int]) -> Path:
    """A finished stage output as write_splits + write_success_marker leave it (no Ray)."""
    for split, n in counts.items():
        (folder / split).mkdir(parents=True)
        pq.write_table(_rows(split, n), folder / split / "part-a.parquet")
    _data.write_success_marker(str(folder), counts, "fp")
    return folder


def make_phrase_input(folder: Path) -> tuple[Path, Path]:
    """prepare_dataset-like valid/test tables of three sentences each, and their Penn trees."""
    (folder / "trees").mkdir(parents=True)
    (folder / "in").mkdir()
    for split in ("valid", "test"):
        (folder / "trees" / f"{split}.txt").write_text("".join(f"{k}\t{t}\n" for k, (t, _) in TREES.items()))
        rows = [{"id": k, "split": split, "task": "ner", "tokens": toks, "tags": ["O"] * len(toks),
                 "image_id": k, "image_uri": None} for k, (_, toks) in TREES.items()]
        pq.write_table(pa.Table.from_pylist(rows, schema=base_schema("ner")), folder / "in" / f"{split}.parquet")
    return folder / "in", folder / "trees"


def phrases_argv(inp: Path, out: Path, trees: Path, max_phrase_len: int = 4) -> list[str]:
    return ["--input", str(inp), "--output", str(out), "--parser", "trees", "--trees_dir", str(trees),
            "--max_phrase_len", str(max_phrase_len), "--compute.batch_size", "2"]


# --------------------------------------------------------------------------- markers vs disk (no Ray)


def test_marker_records_the_part_files_and_their_rows(tmp_path):
    folder = make_stage_folder(tmp_path / "out", {"valid": 3, "test": 2})
    marker = json.loads((folder / SUCCESS_MARKER).read_text())
    assert marker["rows"] == {"valid": 3, "test": 2}
    assert marker["files"] == {"valid": {"valid/part-a.parquet": 3}, "test": {"test/part-a.parquet": 2}}
    assert not (folder / _data.INCOMPLETE_MARKER).exists()
    assert _data.input_identity(str(folder), ["train", "valid", "test"])["rows"] == {"valid": 3, "test": 2}
    assert _data.is_up_to_date(str(folder), "fp")


def test_a_marker_that_does_not_describe_the_files_is_an_error_naming_what_differs(tmp_path, capsys):
    folder = make_stage_folder(tmp_path / "out", {"valid": 3, "test": 2})
    (folder / "test" / "part-a.parquet").unlink()
    pq.write_table(_rows("valid", 1), folder / "valid" / "part-b.parquet")  # e.g. a stray copy
    with pytest.raises(TMRError) as err:
        _data.input_identity(str(folder), ["valid", "test"])  # what a stage's or a training job's fingerprint reads
    message = str(err.value)
    assert str(folder) in message and SUCCESS_MARKER in message
    assert "split 'test': marker says 2 rows, files hold 0" in message
    assert "split 'valid': marker says 3 rows, files hold 4" in message and "valid/part-b.parquet" in message
    assert "test/part-a.parquet" in message and "rerun the stage" in message
    # the stage itself is not up to date: it runs again and says why
    assert not _data.is_up_to_date(str(folder), "fp")
    assert "does not match the files on disk" in capsys.readouterr().out


def test_a_split_left_by_an_older_run_is_not_taken_as_part_of_this_one(tmp_path):
    folder = make_stage_folder(tmp_path / "out", {"valid": 3})
    (folder / "test").mkdir()
    pq.write_table(_rows("test", 2), folder / "test" / "part-old.parquet")
    with pytest.raises(TMRError, match="split 'test' is on disk but not in the marker"):
        _data.input_identity(str(folder), ["valid", "test"])


def test_a_rewrite_retires_the_marker_before_the_first_byte_changes(tmp_path):
    folder = make_stage_folder(tmp_path / "out", {"valid": 3, "test": 2})
    _data.begin_output(str(folder), ["valid", "test"])  # a rerun killed right after emptying the folders
    assert not (folder / SUCCESS_MARKER).exists()
    assert not _data.is_up_to_date(str(folder), "fp")
    with pytest.raises(TMRError, match="did not finish") as err:
        _data.input_identity(str(folder), ["valid", "test"])
    assert str(folder) in str(err.value) and "rerun the stage that writes it" in str(err.value)


def test_a_marker_is_not_written_over_files_that_hold_other_rows(tmp_path):
    folder = tmp_path / "out"
    _data.begin_output(str(folder), ["valid"])
    pq.write_table(_rows("valid", 3), folder / "valid" / "part-a.parquet")
    pq.write_table(_rows("valid", 3), folder / "valid" / "part-dup.parquet")
    with pytest.raises(TMRError, match="counted rows"):
        _data.write_success_marker(str(folder), {"valid": 3}, "fp")
    assert not (folder / SUCCESS_MARKER).exists()


def test_a_training_job_refuses_an_unfinished_stage_folder(tmp_path):
    from jobs import _train

    folder = make_stage_folder(tmp_path / "out", {"train": 2, "valid": 3, "test": 2})
    _data.begin_output(str(folder), ["train", "valid", "test"])

    import dataclasses

    @dataclasses.dataclass
    class TinyCfg:
        seed: int = 0

    with pytest.raises(TMRError, match="did not finish"):
        _train.run_identity(TinyCfg(), str(folder))


# --------------------------------------------------------------------------- a killed or failed rerun (Ray)


def test_a_killed_rerun_leaves_no_stale_marker(ray_local, tmp_path, monkeypatch, capsys):
    from jobs import extract_phrases

    inp, trees = make_phrase_input(tmp_path)
    out = tmp_path / "phrases"
    argv = phrases_argv(inp, out, trees)
    assert extract_phrases.main(argv) == 0
    assert json.loads((out / SUCCESS_MARKER).read_text())["rows"] == {"valid": 3, "test": 3}

    # a rerun with another config, killed once its split folders are emptied
    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(_data, "_make_split_sink", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_phrases.main(phrases_argv(inp, out, trees, max_phrase_len=2))
    monkeypatch.undo()
    capsys.readouterr()
    assert not (out / SUCCESS_MARKER).exists(), "a marker describes the emptied folders"

    # the next stage refuses the emptied folder instead of reading 0 rows
    with pytest.raises(TMRError, match="did not finish") as err:
        extract_phrases.main(phrases_argv(out, tmp_path / "next", trees))
    assert str(out) in str(err.value)
    # the original command is not "up to date": it runs and the rows are back
    assert extract_phrases.main(argv) == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert pq.read_table(out / "valid").num_rows == 3 and pq.read_table(out / "test").num_rows == 3
    assert not (out / _data.INCOMPLETE_MARKER).exists()
    assert extract_phrases.main(phrases_argv(out, tmp_path / "next", trees)) == 0


def test_a_split_that_fails_to_write_leaves_no_output_taken_for_finished(ray_local, tmp_path):
    import ray

    out = make_stage_folder(tmp_path / "out", {"valid": 3, "test": 3})  # a previous, finished run

    def fail_on_test(batch: pa.Table) -> pa.Table:
        if "test" in batch.column("split").to_pylist():
            raise RuntimeError("the test split cannot be computed")
        return batch

    ds = ray.data.from_arrow([_rows("valid", 3), _rows("test", 3)]).map_batches(
        fail_on_test, batch_format="pyarrow", batch_size=None)
    with pytest.raises(Exception, match="cannot be computed"):
        _data.write_splits(ds, str(out), ["valid", "test"], min_rows_per_file=1)
    assert not (out / SUCCESS_MARKER).exists()
    assert not _data.is_up_to_date(str(out), "fp")
    with pytest.raises(TMRError, match="did not finish"):
        _data.input_identity(str(out), ["valid", "test"])


# --------------------------------------------------------------------------- output checked first


def test_an_unwritable_local_output_is_one_line_before_the_input_is_read(tmp_path, monkeypatch, capsys):
    from jobs import extract_phrases, prepare_dataset
    from jobs._config import run_main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # the input does not even exist: the output is what gets reported, as one line, exit code 2
    for job, argv in (
        (extract_phrases, ["--input", str(tmp_path / "missing"), "--output", str(blocker / "out")]),
        (prepare_dataset, ["--format", "synthetic", "--task", "ner", "--data_dir", str(tmp_path / "missing"),
                           "--output", str(blocker / "out")]),
    ):
        monkeypatch.setattr(sys, "argv", ["job", *argv])
        with pytest.raises(SystemExit) as exited:
            run_main(job.main)
        assert exited.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {blocker / 'out'}: cannot write here") and "\n" not in err, err

    with pytest.raises(storage.StorageError, match="is a file, not a folder"):
        storage.check_writable(str(blocker / "out"))
    storage.check_writable(str(tmp_path / "new" / "deeper"))  # a folder still to be made is fine
    assert not (tmp_path / "new").exists()


def test_a_failed_write_is_one_storage_error_naming_the_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(storage.StorageError) as err:
        storage.write_text_atomic(str(blocker / "sub" / "x.json"), "{}")
    assert str(err.value).startswith(f"{blocker / 'sub' / 'x.json'}: cannot write") and "\n" not in str(err.value)


def test_an_output_equal_to_the_input_is_refused(tmp_path):
    with pytest.raises(TMRError, match="is the --input folder"):
        _data.present_splits(str(tmp_path), ["valid"], output=str(tmp_path))


def test_s3_output_checks_tell_unreachable_from_missing_bucket(s3_endpoint, s3_bucket):
    options = storage.StorageOptions(endpoint_url=s3_endpoint)
    storage.check_writable(f"s3://{s3_bucket}/stage/out", options)  # writable; the probe object is removed
    import boto3

    listing = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").list_objects_v2(Bucket=s3_bucket)
    # pyarrow keeps the (empty) output "folder" object; the probe itself is gone
    assert [o["Key"] for o in listing.get("Contents", [])] in ([], ["stage/out/"])
    with pytest.raises(storage.StorageError) as missing:
        storage.check_writable("s3://no-such-bucket-tmr/out", options)
    assert "bucket 'no-such-bucket-tmr' does not exist" in str(missing.value) and s3_endpoint in str(missing.value)

    unreachable = storage.StorageOptions(endpoint_url="http://127.0.0.1:1")
    with pytest.raises(storage.StorageError) as err:
        storage.check_writable(f"s3://{s3_bucket}/out", unreachable)
    message = str(err.value)
    assert "cannot reach the S3 endpoint http://127.0.0.1:1" in message and "does not exist" not in message
    assert "\n" not in message


def test_a_part_file_that_cannot_be_written_is_one_storage_error(ray_local, tmp_path, monkeypatch):
    import ray

    out = tmp_path / "out"
    begin = _data.begin_output

    def begin_then_block_valid(output_uri, splits, options=None):
        begin(output_uri, splits, options)
        (out / "valid").rmdir()
        (out / "valid").write_text("a file where the split folder should be")

    monkeypatch.setattr(_data, "begin_output", begin_then_block_valid)
    ds = ray.data.from_arrow([_rows("valid", 3)])
    with pytest.raises(storage.StorageError) as err:
        _data.write_splits(ds, str(out), ["valid"], min_rows_per_file=1)
    message = str(err.value)
    assert message.startswith(str(out / "valid")) and "cannot write" in message and "\n" not in message
    assert not (out / SUCCESS_MARKER).exists()


def test_prepare_dataset_writes_a_marker_and_a_killed_rerun_retires_it(tiny_benchmark, tmp_path, monkeypatch):
    from jobs import prepare_dataset

    out = tmp_path / "prepared"
    argv = ["--format", "synthetic", "--task", "ner", "--data_dir", str(tiny_benchmark), "--output", str(out)]
    assert prepare_dataset.main(argv) == 0
    marker = json.loads((out / SUCCESS_MARKER).read_text())
    assert marker["rows"] == {"train": 400, "valid": 120, "test": 120}
    assert _data.marker_differences(str(out), marker, ["train", "valid", "test"]) == []

    written = []

    def killed_after_one_split(rows, task, uri, options):
        if written:
            raise KeyboardInterrupt("killed")
        written.append(uri)

    monkeypatch.setattr(prepare_dataset, "write_split", killed_after_one_split)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset.main(argv)
    assert not (out / SUCCESS_MARKER).exists()  # a mix of old and new tables is never vouched for
    with pytest.raises(TMRError, match="rerun"):
        _data.check_marker(str(out), ["train", "valid", "test"])


def test_a_corrected_label_file_changes_prepare_datasets_fingerprint(tiny_benchmark, tmp_path):
    import shutil

    from jobs import prepare_dataset
    from jobs._config import parse_config

    data = tmp_path / "bench"
    shutil.copytree(tiny_benchmark / "ner", data / "ner")
    cfg = parse_config(prepare_dataset.Config, ["--format", "synthetic", "--data_dir", str(data)])
    before = prepare_dataset.input_fingerprint(cfg)
    (data / "ner" / "train.txt").write_text((data / "ner" / "train.txt").read_text() + "\n")
    assert prepare_dataset.input_fingerprint(cfg) != before


def test_a_stage_can_never_drop_a_valid_or_test_row():
    batch = pa.table({"id": ["a", "b", "c"], "split": ["train", "test", "test"], "_drop": [True, False, True]})
    assert _data._kept_rows_of_split(batch, "train").num_rows == 0
    with pytest.raises(ValueError, match="dropped rows of split 'test'"):
        _data._kept_rows_of_split(batch, "test")
