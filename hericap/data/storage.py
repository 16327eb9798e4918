"""Locations: local paths and URIs behind one small API (pyarrow's filesystems).

Everything a user names (shard folders, manifests, vocabularies, checkpoints, Ray Train storage,
sweep folders, the checkpoint a server loads, weight files) is a *location*: a string that is
either a local path or a URI (``s3://bucket/key``, and whatever ``pyarrow.fs`` resolves:
``gs://``, ``hdfs://``, ``file:///...``). A URI is never passed through :class:`~pathlib.Path`;
a local path is made absolute by :func:`resolve` on the machine that names it, so a Ray worker
with another working directory reads the same file.

A plain path names one machine's disk. On a multi-node Ray cluster only a URI names the same data
on every node: ``file:///mnt/shared/x`` says "this path, which every node mounts"
(:func:`is_uri` is True for it).

S3 goes through pyarrow's ``S3FileSystem``; the endpoint is ``endpoint`` when given, else
``$AWS_ENDPOINT_URL`` (the AWS SDKs' standard variable), else AWS itself. Credentials and region
come from ``$AWS_ACCESS_KEY_ID`` / ``$AWS_SECRET_ACCESS_KEY`` / ``$AWS_SESSION_TOKEN`` and
``$AWS_DEFAULT_REGION`` (or ``$AWS_REGION``), else the usual AWS sources (profile, instance role).
Writes of small files are atomic: local files go through a temporary name and a rename, and an
S3 object appears whole when its upload completes. Folders are replaced atomically by
:func:`replace_tree` (the new copy is complete before the old one goes).
"""

from __future__ import annotations

import os
import re
import uuid
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = [
    "basename",
    "check_location",
    "copy_tree",
    "delete_tree",
    "exists",
    "file_type",
    "filesystem",
    "is_dir",
    "is_s3",
    "is_uri",
    "join",
    "listdir",
    "parent",
    "read_bytes",
    "read_text",
    "recover_tree",
    "replace_tree",
    "resolve",
    "write_bytes",
    "write_text",
]

Location = str | os.PathLike

# `scheme://`; a one-letter scheme would be a Windows drive (C:/...), never a URI here
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
# what a URI mangled by Path looks like (`s3:/bucket/key`) or a scheme missing its slashes
_BROKEN_URI = re.compile(r"^(s3|gs|gcs|hdfs|abfs|abfss|file|http|https):(?!//)", re.IGNORECASE)


def is_uri(location: Location) -> bool:
    """Whether ``location`` is a URI (``s3://``, ``file://``, ...) rather than a plain path."""
    return bool(_URI.match(str(location)))


def is_s3(location: Location) -> bool:
    return str(location).startswith("s3://")


def check_location(location: Location, key: str) -> None:
    """Refuse what cannot be a location (empty, or a URI that lost its ``//``, as ``Path``
    leaves ``s3://b/k``); ``key`` names the setting in the message.

    Raises:
        ValueError: the location is malformed.
    """
    text = str(location)
    if not text.strip():
        raise ValueError(f"{key} is empty: give a folder or a URI such as s3://bucket/prefix")
    if _BROKEN_URI.match(text):
        scheme, rest = text.split(":", 1)
        raise ValueError(
            f"{key}={text!r} is not a URI: a URI needs '://' ({scheme}://{rest.lstrip('/')})"
        )


def resolve(location: Location) -> str:
    """A location as a string that means the same on any machine of this one's view: URIs as
    given, local paths absolute (``~`` expanded)."""
    text = str(location)
    if is_uri(text):
        return text
    return str(Path(text).expanduser().resolve())


def join(location: Location, *parts: str) -> str:
    """``location/part/...`` for a path or a URI."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def basename(location: Location) -> str:
    """The last component (``s3://b/runs/best`` -> ``best``)."""
    text = str(location).rstrip("/")
    return text.rsplit("/", 1)[-1] if is_uri(text) else Path(text).name


def parent(location: Location) -> str:
    """The location one level up (``s3://b/runs/best`` -> ``s3://b/runs``)."""
    text = str(location).rstrip("/")
    if is_uri(text):
        head, _, _ = text.rpartition("/")
        return head if not head.endswith(":/") else text
    return str(Path(text).parent)


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


def filesystem(location: Location, endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``location`` and the path within it (local: absolute)."""
    text = str(location)
    if is_s3(text):
        env = os.environ.get
        fs = _s3(
            endpoint or env("AWS_ENDPOINT_URL"),
            env("AWS_DEFAULT_REGION") or env("AWS_REGION"),
            env("AWS_ACCESS_KEY_ID"),
            env("AWS_SECRET_ACCESS_KEY"),
            env("AWS_SESSION_TOKEN"),
        )
        return fs, text.removeprefix("s3://").rstrip("/")
    if is_uri(text):
        try:
            return pafs.FileSystem.from_uri(text)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for unknown schemes
            raise ValueError(f"{text}: pyarrow cannot open this URI ({e})") from e
    return pafs.LocalFileSystem(), resolve(text)


def _at(location: Location, fs: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """``filesystem(location)``, or ``(fs, location)`` when a filesystem is given: the
    location is then a path within it (a filesystem that travelled to another process keeps
    its endpoint and credentials; the environment there may lack them)."""
    return (fs, str(location)) if fs is not None else filesystem(location)


def _type(location: Location, fs: pafs.FileSystem | None = None) -> pafs.FileType:
    fs, path = _at(location, fs)
    return fs.get_file_info(path).type


def exists(location: Location, fs: pafs.FileSystem | None = None) -> bool:
    return _type(location, fs) != pafs.FileType.NotFound


def file_type(location: Location) -> str:
    """``"file"``, ``"dir"`` or ``"missing"``."""
    kind = _type(location)
    if kind == pafs.FileType.NotFound:
        return "missing"
    return "dir" if kind == pafs.FileType.Directory else "file"


def is_dir(location: Location, fs: pafs.FileSystem | None = None) -> bool:
    """A folder (an S3 prefix holding objects counts)."""
    return _type(location, fs) == pafs.FileType.Directory


def listdir(location: Location) -> list[str]:
    """Names of the entries directly under a folder (empty when it does not exist)."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos)


def read_bytes(location: Location, endpoint: str | None = None) -> bytes:
    fs, path = filesystem(location, endpoint)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{location} not found") from e


def read_text(location: Location, endpoint: str | None = None) -> str:
    return read_bytes(location, endpoint).decode("utf-8")


def write_bytes(
    location: Location,
    data: bytes,
    endpoint: str | None = None,
    fs: pafs.FileSystem | None = None,
) -> None:
    if fs is None:
        fs, path = filesystem(location, endpoint)
    else:
        path = str(location)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


def write_text(
    location: Location, text: str, endpoint: str | None = None, fs: pafs.FileSystem | None = None
) -> None:
    write_bytes(location, text.encode("utf-8"), endpoint, fs=fs)


def delete_tree(location: Location, fs: pafs.FileSystem | None = None) -> None:
    """Delete a folder (or file) and everything under it; nothing when it does not exist."""
    fs, path = _at(location, fs)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind != pafs.FileType.NotFound:
        fs.delete_file(path)


def copy_tree(
    source: Location,
    destination: Location,
    source_fs: pafs.FileSystem | None = None,
    fs: pafs.FileSystem | None = None,
) -> None:
    """Copy the files under folder ``source`` into ``destination`` (created as needed).

    ``source_fs`` / ``fs``: ``source`` / ``destination`` is a path within this filesystem (a
    Ray checkpoint's, a run storage's), not a location.
    """
    source_fs, source = _at(source, source_fs)
    dest_fs, dest = _at(destination, fs)
    dest_fs.create_dir(dest, recursive=True)
    pafs.copy_files(source, dest, source_filesystem=source_fs, destination_filesystem=dest_fs)


# Folder replacement: the new copy goes to `<dst>.incoming`; once it is complete, the marker
# `<dst>.replacing` says so; then the old folder goes and the new one takes its name; then the
# marker goes. A process that dies at any point leaves either the old folder whole, or the
# marker and the complete new copy, from which recover_tree finishes the swap.
_INCOMING, _MARKER, _OLD = ".incoming", ".replacing", ".old"


def _swap_in(fs: pafs.FileSystem, dest: str) -> None:
    """Put ``<dest>.incoming`` (complete) in place of ``dest`` (a path within ``fs``)."""
    incoming = dest + _INCOMING
    if exists(incoming, fs):
        if isinstance(fs, pafs.LocalFileSystem):
            if exists(dest, fs):
                delete_tree(dest + _OLD, fs)
                fs.move(dest, dest + _OLD)  # renames: the name is without a folder for an instant
            fs.move(incoming, dest)
        else:  # object stores have no folder rename: copy server-side, then drop the staging copy
            delete_tree(dest, fs)
            copy_tree(incoming, dest, source_fs=fs, fs=fs)
            delete_tree(incoming, fs)
    delete_tree(dest + _OLD, fs)
    delete_tree(dest + _MARKER, fs)


def recover_tree(destination: Location, fs: pafs.FileSystem | None = None) -> None:
    """Finish a :func:`replace_tree` of ``destination`` that a dead process left half done
    (the marker is there: the new copy is complete), or drop an incomplete new copy."""
    fs, dest = _at(resolve(destination) if fs is None else destination, fs)
    if exists(dest + _MARKER, fs):
        _swap_in(fs, dest)
    else:
        delete_tree(dest + _INCOMING, fs)


def replace_tree(
    source: Location,
    destination: Location,
    source_fs: pafs.FileSystem | None = None,
    fs: pafs.FileSystem | None = None,
) -> None:
    """Make ``destination`` a copy of folder ``source``; the previous ``destination`` (if any)
    is removed only once the new copy is complete, locally and on object stores.

    ``source_fs`` / ``fs``: as for :func:`copy_tree`.
    """
    fs, dest = _at(resolve(destination) if fs is None else destination, fs)
    recover_tree(dest, fs)
    copy_tree(source, dest + _INCOMING, source_fs=source_fs, fs=fs)
    write_text(dest + _MARKER, "the new copy in .incoming is complete\n", fs=fs)
    _swap_in(fs, dest)
