"""Local paths and ``s3://`` URIs behind one small API (pyarrow's filesystems).

A location is a local path or ``s3://bucket/key``. S3 goes through pyarrow's ``S3FileSystem``;
the endpoint is ``endpoint`` when given, else ``$AWS_ENDPOINT_URL`` (the AWS SDKs' standard
variable), else AWS itself. Credentials and region come from the usual AWS sources (environment,
profile). Writes of small files are atomic: local files go through a temporary name and a rename,
and an S3 object appears whole when its upload completes.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = [
    "exists",
    "filesystem",
    "is_s3",
    "join",
    "read_bytes",
    "read_text",
    "write_bytes",
    "write_text",
]


def is_s3(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...`` for a path or an URI."""
    if is_s3(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location, *parts))


@lru_cache(maxsize=8)
def _s3(
    endpoint: str | None,
    region: str | None,
    key: str | None,
    secret: str | None,
    token: str | None,
) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "http"
    if region:
        kwargs["region"] = region
    if key and secret:
        # explicit, so the filesystem carries them when pickled to Ray workers
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    return pafs.S3FileSystem(**kwargs)


def filesystem(location: str | Path, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``location`` and the path within it."""
    if is_s3(location):
        env = os.environ.get
        fs = _s3(
            endpoint or env("AWS_ENDPOINT_URL"),
            env("AWS_DEFAULT_REGION") or env("AWS_REGION"),
            env("AWS_ACCESS_KEY_ID"),
            env("AWS_SECRET_ACCESS_KEY"),
            env("AWS_SESSION_TOKEN"),
        )
        return fs, str(location).removeprefix("s3://")
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def exists(location: str | Path, endpoint: str | None = None) -> bool:
    fs, path = filesystem(location, endpoint)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str | Path, endpoint: str | None = None) -> bytes:
    fs, path = filesystem(location, endpoint)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{location} not found") from e


def read_text(location: str | Path, endpoint: str | None = None) -> str:
    return read_bytes(location, endpoint).decode("utf-8")


def write_bytes(location: str | Path, data: bytes, endpoint: str | None = None) -> None:
    fs, path = filesystem(location, endpoint)
    if is_s3(location):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def write_text(location: str | Path, text: str, endpoint: str | None = None) -> None:
    write_bytes(location, text.encode("utf-8"), endpoint)
