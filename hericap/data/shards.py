"""The Parquet shard format shared by every dataset, and its manifest.

One row per image: ``image_id``, ``split``, ``image`` (encoded bytes, JPEG as shipped),
``width``, ``height``, ``captions`` (list of strings), ``source`` (dataset name), ``file_name``,
``scene`` (JSON of the true scene for synthetic data, null otherwise) and ``meta`` (JSON of the
source's own fields, e.g. nocaps' ``domain`` or the Karpathy split name; null for synthetic).
Shards are written per split (``<split>-00000.parquet``); ``manifest.json`` lists them with row
counts and SHA-256 checksums, the counts per split, the source, and the vocabulary file built
from train captions. The root may be a folder or an ``s3://`` prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hericap.data import storage

__all__ = [
    "MANIFEST_NAME",
    "SHARD_SCHEMA",
    "VOCAB_NAME",
    "Manifest",
    "ShardWriter",
    "read_manifest",
    "read_rows",
    "write_shard",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
FORMAT_VERSION = 2

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("file_name", pa.string()),
        pa.field("scene", pa.string()),
        pa.field("meta", pa.string()),
    ]
)


def write_shard(
    out: str | Path, name: str, split: str, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write ``rows`` (the shard schema) as shard ``name`` under ``out`` (folder or ``s3://``
    prefix), whole or not at all; returns its manifest entry (file, split, rows, SHA-256)."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), sink)
    blob = sink.getvalue().to_pybytes()
    storage.write_bytes(storage.join(out, name), blob)
    return {
        "file": name,
        "split": split,
        "rows": len(rows),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }


class ShardWriter:
    """Writes rows of one split into shards of at most ``shard_rows`` rows."""

    def __init__(self, out_dir: str | Path, split: str, shard_rows: int = 1000) -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows={shard_rows} must be >= 1")
        self.out_dir = storage.resolve(out_dir)
        self.split = split
        self.shard_rows = shard_rows
        self._rows: list[dict[str, Any]] = []
        self.shards: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        self.shards.append(write_shard(self.out_dir, name, self.split, self._rows))
        self._rows = []

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        return self.shards


@dataclass
class Manifest:
    """What a shard folder holds."""

    root: str  # a location: a folder (absolute) or a URI
    source: str
    shards: list[dict[str, Any]]
    counts: dict[str, int]
    vocab_file: str | None
    info: dict[str, Any]

    def __post_init__(self) -> None:
        self.root = storage.resolve(self.root)

    @property
    def splits(self) -> list[str]:
        """The splits that have shards, in the manifest's order."""
        return list(dict.fromkeys(s["split"] for s in self.shards))

    def files(self, split: str) -> list[str]:
        """Shard locations of one split."""
        files = [storage.join(self.root, s["file"]) for s in self.shards if s["split"] == split]
        if not files:
            raise ValueError(
                f"no shards for split '{split}' in {self.root}; splits present: "
                f"{sorted(self.counts)}"
            )
        return files

    @property
    def vocab_path(self) -> str:
        if not self.vocab_file:
            raise FileNotFoundError(f"{storage.join(self.root, MANIFEST_NAME)} names no vocabulary")
        return storage.join(self.root, self.vocab_file)

    def write(self) -> None:
        body = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "counts": self.counts,
            "shards": self.shards,
            "vocab": self.vocab_file,
            "info": self.info,
        }
        storage.write_text(storage.join(self.root, MANIFEST_NAME), json.dumps(body, indent=1))


def read_manifest(root: str | Path, verify: bool = False) -> Manifest:
    """Read ``manifest.json`` of a shard folder or ``s3://`` prefix; ``verify`` re-checks every
    checksum."""
    root = storage.resolve(root)
    path = storage.join(root, MANIFEST_NAME)
    try:
        body = json.loads(storage.read_text(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} in {root}: prepare the dataset first "
            "(e.g. `hericap prepare synthetic --out DIR`)"
        ) from e
    if body.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has shard format {body.get('format_version')}, this HeriCap reads "
            f"{FORMAT_VERSION}: prepare the dataset again"
        )
    manifest = Manifest(
        root=root,
        source=body["source"],
        shards=body["shards"],
        counts=body["counts"],
        vocab_file=body.get("vocab"),
        info=body.get("info", {}),
    )
    if verify:
        for s in manifest.shards:
            location = storage.join(root, s["file"])
            digest = hashlib.sha256(storage.read_bytes(location)).hexdigest()
            if digest != s["sha256"]:
                raise RuntimeError(f"checksum mismatch for {location}: shard corrupted")
    return manifest


def read_rows(files: Iterable[str | Path], columns: list[str] | None = None) -> list[dict]:
    """All rows of some shards as dicts (small splits, tests and evaluation references)."""
    rows: list[dict] = []
    for f in files:
        fs, path = storage.filesystem(f)
        rows.extend(pq.read_table(path, columns=columns, filesystem=fs).to_pylist())
    return rows
