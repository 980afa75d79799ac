"""Local paths and ``s3://`` URIs through one pyarrow filesystem API.

Every job and the server read and write tables, images and checkpoints through these helpers,
so the same config runs on a laptop (local files) and on a cluster (S3 or an S3-compatible
store). S3 credentials come from the standard AWS environment variables; ``endpoint_url``
(or ``AWS_ENDPOINT_URL``) points at an S3-compatible store such as MinIO or moto.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

from tmr_core.errors import TMRError

# pyarrow's S3 errors name the failing AWS operation and error; these parts tell a network
# problem and a credentials problem apart from a genuinely missing bucket or key.
_UNREACHABLE = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't resolve host", "Timeout")
_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden",
           "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "HTTP response code: 403")
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket")


class StorageError(TMRError, OSError):
    """A location that cannot be read or written; the message is one line naming the URI, the
    cause and what to do (jobs print it instead of a traceback)."""


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
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise storage_error(uri, exc, options, "look up") from None


def endpoint_name(options: StorageOptions | None = None) -> str:
    """The S3 endpoint requests go to, as a user would recognise it in an error message."""
    options = options or StorageOptions()
    endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint or f"AWS S3 ({options.region or os.environ.get('AWS_DEFAULT_REGION', 'us-east-1')})"


def storage_error(uri: str, exc: BaseException, options: StorageOptions | None = None,
                  action: str = "write") -> StorageError:
    """One line for a failed read/write of ``uri``: an unreachable endpoint, refused credentials
    and a missing bucket each get their own message (an unreachable endpoint is not a missing
    bucket), with what to check."""
    text = " ".join(str(exc).split())
    if not is_remote(uri):
        reason = getattr(exc, "strerror", None) or text
        return StorageError(f"{uri}: cannot {action} ({reason}); choose a folder this process can {action}")
    where = endpoint_name(options)
    if any(part in text for part in _UNREACHABLE):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {where} ({text}); check --storage.endpoint_url "
                            "(or AWS_ENDPOINT_URL) and that the store is running and reachable")
    if any(part in text for part in _DENIED):
        return StorageError(f"{uri}: access denied at {where} ({text}); check AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY and the bucket's permissions")
    if any(part in text for part in _NO_BUCKET):
        return StorageError(f"{uri}: bucket '{_bucket(uri)}' does not exist at {where}; create it or fix the URI")
    return StorageError(f"{uri}: cannot {action} at {where} ({text})")


def _bucket(uri: str) -> str:
    return urlparse(str(uri)).netloc


def check_writable(uri: str, options: StorageOptions | None = None) -> None:
    """Fail fast, before a job reads its input, when ``uri`` cannot take its outputs: a local
    folder (or the nearest existing folder above it) that is not writable, or an S3 bucket that is
    unreachable, refuses the credentials or does not exist. A probe file is written and removed.

    Raises:
        StorageError: one line naming ``uri``, the cause and what to check.
    """
    if is_remote(uri):
        _check_bucket_writable(uri, options)
    else:
        _check_folder_writable(uri)


def _check_folder_writable(uri: str) -> None:
    _, path = resolve(uri)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise StorageError(f"{uri}: cannot write here, {existing} is a file, not a folder; choose another output")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write to {existing} ({exc.strerror or exc}); "
                           "choose a folder this process can write") from None


def _check_bucket_writable(uri: str, options: StorageOptions | None) -> None:
    fs, path = resolve(uri, options)
    bucket = _bucket(uri)
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as exc:
        raise storage_error(uri, exc, options, "reach") from None
    if not found:
        raise StorageError(f"{uri}: bucket '{bucket}' does not exist at {endpoint_name(options)}; "
                           "create it or fix the URI")
    probe = f"{path}/.tmr-write-check-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as handle:
            handle.write(b"")
        fs.delete_file(probe)
    except OSError as exc:
        raise storage_error(uri, exc, options, "write") from None


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
    try:
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
    except OSError as exc:
        raise storage_error(uri, exc, options, "write") from None


def write_text_atomic(uri: str, text: str, options: StorageOptions | None = None) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"), options)


def makedirs(uri: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve(uri, options)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as exc:
        raise storage_error(uri, exc, options, "create") from None


def remove(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a file or a folder tree; nothing to do when it is absent."""
    fs, path = resolve(uri, options)
    try:
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as exc:
        raise storage_error(uri, exc, options, "delete") from None


def parent(uri: str) -> str:
    """The folder holding a local path or a URI's object."""
    uri = str(uri)
    return posixpath.dirname(uri) if is_remote(uri) else os.path.dirname(os.path.abspath(uri))


def list_files(uri: str, options: StorageOptions | None = None) -> list[str]:
    """The files directly in a folder (local or remote), as URIs of the same kind, sorted; [] when absent."""
    fs, path = resolve(uri, options)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise storage_error(uri, exc, options, "list") from None
    names = sorted(posixpath.basename(info.path) for info in infos if info.type == pafs.FileType.File)
    return [join(uri, name) for name in names]
