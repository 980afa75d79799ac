"""Local paths and ``s3://`` URIs through one pyarrow filesystem API.

Every job and the server read and write tables, images and checkpoints through these helpers,
so the same config runs on a laptop (local files) and on a cluster (S3 or an S3-compatible
store). S3 credentials come from the standard AWS environment variables; ``endpoint_url``
(or ``AWS_ENDPOINT_URL``) points at an S3-compatible store such as MinIO or moto.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass
class StorageOptions:
    """Where S3-style URIs are served; local paths ignore it."""

    endpoint_url: str | None = None
    region: str | None = None


def is_remote(uri: str) -> bool:
    return urlparse(str(uri)).scheme in ("s3", "s3a", "gs")


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Split a URI into a pyarrow filesystem and the path inside it."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme in ("s3", "s3a"):
        options = options or StorageOptions()
        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict = {"region": options.region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
        if endpoint:
            endpoint_parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = endpoint_parsed.netloc or endpoint
            kwargs["scheme"] = endpoint_parsed.scheme or "https"
        return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI."""
    uri = str(uri)
    if is_remote(uri):
        return posixpath.join(uri, *parts)
    return os.path.join(uri, *parts)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    with fs.open_input_file(path) as handle:
        return handle.read()


def write_bytes_atomic(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write a file so readers never see it half-written.

    Local: a temp file in the same directory, then ``os.replace``. S3: a single PUT is already
    atomic (an object appears whole or not at all).
    """
    fs, path = resolve(uri, options)
    fs.create_dir(posixpath.dirname(path) if is_remote(uri) else os.path.dirname(path), recursive=True)
    if is_remote(uri):
        with fs.open_output_stream(path) as handle:
            handle.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(uri: str, text: str, options: StorageOptions | None = None) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"), options)


def makedirs(uri: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve(uri, options)
    fs.create_dir(path, recursive=True)
