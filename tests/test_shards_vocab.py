"""Shards, manifest and vocabulary round trips; decoding; the prepare CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import decode_image

from hericap.data.prepare import prepare_synthetic
from hericap.data.shards import SHARD_SCHEMA, read_manifest, read_rows
from hericap.data.synthetic import Scene, generate_sample
from hericap.data.text import SPECIAL_TOKENS, Vocabulary, tokenize
from hericap.data.transforms import normalize_images


def test_manifest_counts_and_checksums(tiny_shards):
    m = read_manifest(tiny_shards.root, verify=True)
    assert m.counts == {"train": 256, "val": 32, "test": 32}
    assert sum(s["rows"] for s in m.shards if s["split"] == "train") == 256
    assert len(m.files("train")) == 3  # 100 rows per shard
    assert m.source == "synthetic"


def test_shard_rows_round_trip(tiny_shards):
    files = tiny_shards.files("val")
    assert pq.read_schema(files[0]).equals(SHARD_SCHEMA, check_metadata=False)
    rows = read_rows(files)
    assert len(rows) == 32
    first = rows[0]
    expected = generate_sample(7, "val", 0)
    assert first["image_id"] == expected.image_id
    assert first["image"] == expected.jpeg
    assert first["captions"] == expected.captions
    assert (first["width"], first["height"], first["split"]) == (64, 64, "val")
    assert Scene.from_dict(json.loads(first["scene"])) == expected.scene


def test_prepare_is_byte_identical_for_same_seed(tmp_path):
    a = prepare_synthetic(tmp_path / "a", 20, 4, 4, seed=3, shard_rows=8, progress=False)
    b = prepare_synthetic(tmp_path / "b", 20, 4, 4, seed=3, shard_rows=8, progress=False)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]


def test_corrupted_shard_is_detected(tmp_path):
    m = prepare_synthetic(tmp_path, 10, 2, 2, shard_rows=5, progress=False)
    path = Path(m.root) / m.shards[0]["file"]
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RuntimeError, match="checksum"):
        read_manifest(tmp_path, verify=True)


def test_missing_manifest_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="hericap prepare"):
        read_manifest(tmp_path)


def test_vocab_specials_min_count_and_round_trip(tmp_path, tiny_shards):
    vocab = Vocabulary.load(tiny_shards.vocab_path)
    assert tuple(vocab.itos[:4]) == SPECIAL_TOKENS
    assert (vocab.unk_idx, vocab.pad_idx, vocab.bos_idx, vocab.eos_idx) == (0, 1, 2, 3)
    v = Vocabulary.build(["a red circle", "a red square", "a blue circle"], min_count=2)
    assert v.itos[4:] == ["a", "circle", "red"]  # by count, then alphabetical
    ids = v.encode("A red, BLUE circle!")
    assert ids == [2, v.stoi["a"], v.stoi["red"], v.unk_idx, v.stoi["circle"], 3]
    assert v.decode(ids) == "a red <unk> circle"
    v.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == v
    batch = v.encode_batch(["a red circle", "circle"])
    assert batch.shape == (2, 5) and batch[1, 3:].tolist() == [v.pad_idx, v.pad_idx]


def test_vocab_rejects_bad_files(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"itos": ["a", "b"]}))
    with pytest.raises(ValueError, match="<unk>"):
        Vocabulary.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        Vocabulary.load(tmp_path / "none.json")


def test_tokenize():
    assert tokenize("Two small, RED circles.") == ["two", "small", "red", "circles"]


def test_decode_and_normalize(tiny_shards):
    row = read_rows(tiny_shards.files("test"))[0]
    img = decode_image(row["image"], 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    x = normalize_images(np.stack([img, img]))
    assert tuple(x.shape) == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(b"definitely not a jpeg", 32)


def test_prepare_cli(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hericap.cli",
            "prepare",
            "synthetic",
            "--out",
            str(out),
            "--num-train",
            "12",
            "--num-val",
            "3",
            "--num-test",
            "3",
            "--min-count",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["counts"] == {"train": 12, "val": 3, "test": 3}
    assert (out / "manifest.json").is_file() and (out / "vocab.json").is_file()


def test_cached_synthetic_shards_are_reused_only_when_they_match(tmp_path, monkeypatch):
    from hericap.config import load_config
    from hericap.data import synthetic
    from hericap.data.catalog import ensure_shards

    cfg = load_config(
        [
            "preset=demo",
            f"dataset.shard_dir={tmp_path}",
            "dataset.synthetic_train=8",
            "dataset.synthetic_val=2",
            "dataset.synthetic_test=2",
        ]
    )
    first = ensure_shards(cfg)
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    assert ensure_shards(cfg).shards == first.shards
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    # a changed generator (or size, or seed) must not reuse stale images
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    assert ensure_shards(cfg).info["generator_version"] == synthetic.GENERATOR_VERSION
    bigger = load_config(
        [
            "preset=demo",
            f"dataset.shard_dir={tmp_path}",
            "dataset.synthetic_train=9",
            "dataset.synthetic_val=2",
            "dataset.synthetic_test=2",
        ]
    )
    assert ensure_shards(bigger).counts["train"] == 9


def test_tokenize_is_the_toolkits_ptb_tokenisation():
    # clitics split, hyphenated words kept, punctuation removed: what the metrics compare
    expected = ["a", "man", "'s", "close-up", "is", "n't", "it"]
    assert tokenize("A man's close-up, isn't it?") == expected
