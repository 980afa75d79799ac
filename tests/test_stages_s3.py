"""The four stages chained through a real S3 endpoint (moto's server): tables, image cache,
benchmark images and the MDE checkpoint all live in a bucket, read and written via pyarrow."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from tests.test_stage_jobs import (  # noqa: F401  (fixtures)
    TINY_GENERATION,
    mde_checkpoint,
    small_dataset,
    stage_benchmark,
    stage_models,
)
from tmr_core.schema import STAGE_FIELDS


def upload_folder(s3, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())


def test_whole_chain_against_an_s3_endpoint(ray_local, s3_endpoint, s3_bucket, stage_models, stage_benchmark,  # noqa: F811
                                            small_dataset, mde_checkpoint, tmp_path, capsys):  # noqa: F811
    import boto3

    from jobs import extract_phrases, generate_back_translations, ground_phrases, score_divergence

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"s3://{s3_bucket}"
    # the dataset's image_uri values point into the bucket, as on a cluster
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    # a few rows per split: the local test already runs every stage on the whole small dataset;
    # this one is about the bucket (tables, image cache, benchmark images, checkpoint)
    sizes = {"valid": 4, "test": 2}
    for split, n in sizes.items():
        table = pq.read_table(small_dataset / f"{split}.parquet").slice(0, n)
        uris = [f"{bucket}/images/{Path(u).name}" for u in table.column("image_uri").to_pylist()]
        for local, remote in zip(table.column("image_uri").to_pylist(), uris, strict=True):
            s3.put_object(Bucket=s3_bucket, Key=remote.split("/", 3)[3], Body=Path(local).read_bytes())
        table = table.set_column(table.schema.get_field_index("image_uri"), "image_uri", [uris])
        pq.write_table(table, dataset / f"{split}.parquet")
    upload_folder(s3, s3_bucket, dataset, "dataset")
    upload_folder(s3, s3_bucket, Path(mde_checkpoint), "mde")
    store = ["--storage.endpoint_url", s3_endpoint]

    assert extract_phrases.main(["--input", f"{bucket}/dataset", "--output", f"{bucket}/phrases", *store,
                                 "--parser", "trees", "--trees_dir", str(stage_benchmark / "trees" / "ner")]) == 0
    assert generate_back_translations.main([
        "--input", f"{bucket}/phrases", "--output", f"{bucket}/bt", "--cache_uri", f"{bucket}/cache", *store,
        "--generation.model", stage_models["text_to_image"], *TINY_GENERATION, "--compute.batch_size", "6"]) == 0
    assert "generated 6 | cached 0 | failed 0" in capsys.readouterr().out
    assert ground_phrases.main(["--input", f"{bucket}/bt", "--output", f"{bucket}/regions", *store,
                                "--detector.model", stage_models["detector"], "--compute.batch_size", "6"]) == 0
    # the MDE weights come from the bucket; its processor from the ViLT backbone it names
    assert score_divergence.main(["--input", f"{bucket}/regions", "--output", f"{bucket}/divergence", *store,
                                  "--checkpoint", f"{bucket}/mde", "--compute.batch_size", "6"]) == 0

    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for o in page.get("Contents", [])}
    for stage in ("phrases", "bt", "regions", "divergence"):
        assert {f"{stage}/_SUCCESS.json", f"{stage}/config.yaml"} <= keys
        assert any(k.startswith(f"{stage}/valid/") and k.endswith(".parquet") for k in keys)
    cached = sorted(k for k in keys if k.startswith("cache/") and k.endswith(".png"))
    assert len(cached) == 6 and not any(".tmp-" in k for k in keys)

    marker = json.loads(s3.get_object(Bucket=s3_bucket, Key="divergence/_SUCCESS.json")["Body"].read())
    assert marker["rows"] == sizes
    for split, n in sizes.items():
        parts = sorted(k for k in keys if k.startswith(f"divergence/{split}/") and k.endswith(".parquet"))
        tables = [pq.read_table(io.BytesIO(s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read())) for k in parts]
        rows = [row for t in tables for row in t.to_pylist()]
        assert len(rows) == n and len({r["id"] for r in rows}) == n
        for field in (f for fields in STAGE_FIELDS.values() for f in fields):
            assert tables[0].schema.field(field.name).type == field.type
        for row in rows:
            key = row["back_translation_uri"].removeprefix(f"{bucket}/")
            assert key in cached
            Image.open(io.BytesIO(s3.get_object(Bucket=s3_bucket, Key=key)["Body"].read())).verify()
            assert len(row["regions"]) >= 1 and abs(sum(row["divergence"]) - 1) < 1e-5
