"""Real-dataset readers and `prepare`: bad input on purpose, resuming, Ray, S3 (moto server),
and the real Flickr8k / COCO files when HERICAP_REALDATA is set."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import decode_image
from PIL import Image

from hericap.data.prepare import prepare_records
from hericap.data.readers import read_coco_captions, read_karpathy, read_nocaps
from hericap.data.shards import read_manifest, read_rows
from hericap.data.text import Vocabulary


def _jpeg(colour=(200, 30, 30), size=(40, 30), mode="RGB", fmt="JPEG", exif=None) -> bytes:
    im = Image.new("RGB", size, colour)
    im.paste((0, 0, 255), (0, 0, size[0] // 2, size[1] // 4))  # a blue block at the top left
    if mode != "RGB":
        im = im.convert(mode)
    out = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    im.save(out, format=fmt, **kwargs)
    return out.getvalue()


def _rgba_png() -> bytes:
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent red
    im.paste((0, 255, 0, 255), (0, 0, 10, 20))  # opaque green left half
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return _jpeg(size=(40, 20), exif=exif.tobytes())


def _flickr_folder(root: Path) -> Path:
    """A Karpathy-format Flickr folder with every kind of bad and odd record."""
    images = root / "images"
    images.mkdir(parents=True)
    files = {
        "good.jpg": _jpeg(),
        "good2.jpg": _jpeg((10, 200, 10)),
        "empty.jpg": b"",
        "truncated.jpg": _jpeg()[:200],
        "noise.jpg": bytes(range(256)) * 4,
        "gray.jpg": _jpeg(mode="L"),
        "cmyk.jpg": _jpeg(mode="CMYK"),
        "alpha.png": _rgba_png(),
        "rotated.jpg": _rotated_jpeg(),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    (images / "folder.jpg").mkdir()  # a directory where a file should be

    def entry(name, split="train", sentences=("a red square", "a blue block on red")):
        return {
            "filename": name,
            "split": split,
            "sentences": [{"raw": s, "tokens": s.split()} for s in sentences],
        }

    body = {
        "images": [
            entry("good.jpg", sentences=("a red square", "  ", "a blue block")),
            entry("good2.jpg", split="val"),
            entry("missing.jpg"),
            entry("empty.jpg"),
            entry("truncated.jpg"),
            entry("noise.jpg"),
            entry("folder.jpg"),
            entry("gray.jpg", split="test"),
            entry("cmyk.jpg"),
            entry("alpha.png"),
            entry("rotated.jpg"),
            entry("blank-captions.jpg", sentences=("", " \t")),
        ],
        "dataset": "flickr8k",
    }
    (images / "blank-captions.jpg").write_bytes(_jpeg())
    path = root / "dataset_flickr8k.json"
    path.write_text(json.dumps(body))
    return path


def test_bad_input_is_skipped_and_reported_odd_images_are_normalised(tmp_path):
    ann = _flickr_folder(tmp_path / "flickr8K")
    records = read_karpathy(ann, tmp_path / "flickr8K" / "images", "flickr8k")
    out = tmp_path / "shards"
    m = prepare_records(records, out, "flickr8k", shard_rows=4, min_count=1, progress=False)
    report = json.loads((out / "report.json").read_text())
    reasons = {s["file"]: s["reason"] for s in report["skipped"] if "caption_index" not in s}
    assert reasons["missing.jpg"] == "missing image file"
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["truncated.jpg"].startswith("unreadable or truncated image")
    assert reasons["noise.jpg"].startswith("unreadable or truncated image")
    assert reasons["folder.jpg"] == "not a regular file"
    assert reasons["blank-captions.jpg"] == "no non-empty captions"
    blank = [s for s in report["skipped"] if "caption_index" in s]
    assert {(s["file"], s["caption_index"]) for s in blank} == {
        ("good.jpg", 1),
        ("blank-captions.jpg", 0),
        ("blank-captions.jpg", 1),
    }
    assert m.counts == {"train": 4, "val": 1, "test": 1}
    assert report["skipped_by_reason"]["missing image file"] == 1
    changes = {n["file"]: n["change"] for n in report["normalised_records"]}
    assert changes["gray.jpg"] == "L -> RGB" and changes["cmyk.jpg"] == "CMYK -> RGB"
    assert "PNG -> JPEG" in changes["alpha.png"] and "EXIF orientation 6" in changes["rotated.jpg"]

    rows = {r["file_name"]: r for r in read_rows(m.files("train")) + read_rows(m.files("test"))}
    assert rows["good.jpg"]["captions"] == ["a red square", "a blue block"]
    assert rows["good.jpg"]["image"] == (tmp_path / "flickr8K/images/good.jpg").read_bytes()
    for name in ("gray.jpg", "cmyk.jpg", "alpha.png", "rotated.jpg"):
        with Image.open(io.BytesIO(rows[name]["image"])) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (20, 40)
    alpha = decode_image(rows["alpha.png"]["image"], 20)
    assert alpha[10, 15].tolist() == pytest.approx([255, 255, 255], abs=3)  # white, not red
    assert alpha[10, 2, 1] > 200  # the opaque green stays
    assert json.loads(rows["good.jpg"]["meta"]) == {"karpathy_split": "train"}
    assert read_manifest(out, verify=True).counts == m.counts
    assert "red" in Vocabulary.load(out / "vocab.json").stoi


def test_an_interrupted_prepare_resumes_without_rewriting_finished_shards(tmp_path):
    ann = _flickr_folder(tmp_path / "flickr8K")
    records = read_karpathy(ann, tmp_path / "flickr8K" / "images", "flickr8k")
    out = tmp_path / "shards"
    first = prepare_records(records, out, "flickr8k", shard_rows=3, min_count=1, progress=False)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    # interrupt: the last train shard never completed
    (out / "_progress" / "train-00002.parquet.json").unlink()
    (out / "train-00002.parquet").unlink()
    ran = []

    def run(fn, plans):
        ran.extend(p.name for p in plans)
        return [fn(p) for p in plans]

    again = prepare_records(
        records, out, "flickr8k", shard_rows=3, min_count=1, progress=False, run=run
    )
    assert ran == ["train-00002.parquet"]
    assert again.counts == first.counts and again.shards == first.shards
    for name, mtime in finished.items():
        if name != "train-00002.parquet":
            assert (out / name).stat().st_mtime_ns == mtime


def test_coco_and_nocaps_readers(tmp_path):
    body = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "domain": "in-domain", "open_images_id": "x1"},
            {"id": 2, "file_name": "b.jpg", "domain": "out-domain", "open_images_id": "x2"},
        ],
        "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 1, "caption": "cat"}],
    }
    path = tmp_path / "nocap_val.json"
    path.write_text(json.dumps(body))
    nocaps = read_nocaps(path, tmp_path / "val")
    assert [r.extra["domain"] for r in nocaps] == ["in-domain", "out-domain"]
    assert nocaps[0].captions == ["a cat", "cat"] and nocaps[1].captions == []
    keep = tmp_path / "split.txt"
    keep.write_text("b.jpg\n")
    coco = read_coco_captions(path, tmp_path, split="test", split_list=keep)
    assert [(r.image_id, r.split) for r in coco] == [("2", "test")]
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(
        json.dumps(
            {
                "images": [
                    {
                        "filepath": "val2014",
                        "filename": "c.jpg",
                        "split": "restval",
                        "cocoid": 9,
                        "sentences": [{"raw": "x", "tokens": ["x"]}],
                    },
                ]
            }
        )
    )
    (rec,) = read_karpathy(karpathy, tmp_path / "COCO2014", "coco")
    assert rec.split == "train" and rec.image_id == "9"
    assert rec.path == str(tmp_path / "COCO2014" / "val2014" / "c.jpg")
    with pytest.raises(ValueError, match="Karpathy"):
        read_karpathy(path, tmp_path, "coco")  # a COCO-format file is not a split file


@pytest.mark.ray
def test_prepare_runs_its_shards_as_ray_tasks(ray_cluster, tmp_path):
    from hericap.runtime.datasets import run_on_ray

    ann = _flickr_folder(tmp_path / "flickr8K")
    records = read_karpathy(ann, tmp_path / "flickr8K" / "images", "flickr8k")
    m = prepare_records(
        records,
        tmp_path / "out",
        "flickr8k",
        shard_rows=2,
        min_count=1,
        progress=False,
        run=lambda fn, plans: run_on_ray(fn, plans, num_cpus=0.5),
    )
    assert m.counts == {"train": 4, "val": 1, "test": 1} and len(m.shards) >= 4


# ---- S3 through a real moto server on 127.0.0.1 --------------------------------------------


def test_prepare_writes_shards_manifest_and_vocab_to_s3(moto_server, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="captions")
    ann = _flickr_folder(tmp_path / "flickr8K")
    records = read_karpathy(ann, tmp_path / "flickr8K" / "images", "flickr8k")
    uri = "s3://captions/flickr8k/v1"
    m = prepare_records(records, uri, "flickr8k", shard_rows=4, min_count=1, progress=False)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="captions")["Contents"]}
    assert {
        "flickr8k/v1/manifest.json",
        "flickr8k/v1/report.json",
        "flickr8k/v1/vocab.json",
        "flickr8k/v1/train-00000.parquet",
    } <= keys
    back = read_manifest(uri, verify=True)
    assert back.counts == m.counts == {"train": 4, "val": 1, "test": 1}
    rows = read_rows(back.files("train"), columns=["file_name", "captions"])
    assert {r["file_name"] for r in rows} == {"good.jpg", "cmyk.jpg", "alpha.png", "rotated.jpg"}
    assert "red" in Vocabulary.load(back.vocab_path).stoi
    body = s3.get_object(Bucket="captions", Key="flickr8k/v1/report.json")["Body"].read()
    assert json.loads(body)["skipped_by_reason"]["missing image file"] == 1
    # resuming against S3 rewrites nothing
    again = prepare_records(
        records,
        uri,
        "flickr8k",
        shard_rows=4,
        min_count=1,
        progress=False,
        run=lambda fn, plans: [fn(p) for p in plans] if not plans else pytest.fail("reran"),
    )
    assert again.shards == m.shards


@pytest.mark.ray
def test_ray_data_streams_shards_from_s3(moto_server, ray_cluster, tmp_path):
    import boto3

    from hericap.runtime.datasets import shard_dataset

    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="stream")
    ann = _flickr_folder(tmp_path / "flickr8K")
    records = read_karpathy(ann, tmp_path / "flickr8K" / "images", "flickr8k")
    m = prepare_records(records, "s3://stream/f8k", "flickr8k", shard_rows=2, progress=False)
    ds = shard_dataset(m.files("train"), resize=16)
    batches = list(ds.iter_batches(batch_size=10, batch_format="numpy"))
    images = np.concatenate([b["image"] for b in batches])
    assert images.shape == (4, 16, 16, 3)


# ---- the real files ------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_flickr8k_becomes_shards_with_the_missing_photos_reported(realdata, tmp_path):
    ann = realdata / "flickr8k" / "dataset_flickr8k.json"
    records = read_karpathy(ann, realdata / "flickr8k" / "images", "flickr8k")
    assert len(records) == 8000
    assert {r.split for r in records} == {"train", "val", "test"}
    m = prepare_records(records, tmp_path / "f8k", "flickr8k", shard_rows=1000, progress=False)
    photos = len(list((realdata / "flickr8k" / "images").glob("*.jpg")))
    assert photos == 39 and sum(m.counts.values()) == 39
    report = json.loads((tmp_path / "f8k" / "report.json").read_text())
    assert report["skipped_by_reason"] == {"missing image file": 8000 - 39}
    sample = json.loads((realdata / "flickr8k" / "sample_captions.json").read_text())
    rows = read_rows([f for s in m.counts for f in m.files(s)])
    assert len(rows) == 39
    by_file = {r["file_name"]: r for r in rows}
    images = sample["images"] if isinstance(sample, dict) else sample
    assert images and all(
        Path(i.get("file_name", i.get("filename", ""))).name in by_file for i in images
    )
    shutil.rmtree(tmp_path / "f8k")


@pytest.mark.realdata
def test_real_coco_val2017_caption_file_parses(realdata, tmp_path):
    records = read_coco_captions(realdata / "coco" / "captions_val2017.json", tmp_path, "val")
    assert len(records) == 5000
    assert sum(len(r.captions) for r in records) == 25_014
    assert all(r.captions for r in records)


# ---- several COCO-format caption files as one dataset ---------------------------------------


def _coco_files(root: Path) -> dict[str, Path]:
    """captions_train.json (3 images) and captions_val.json (4 images, to be split into val and
    test by two lists), images in train/ and val/. 'zebra' is a word of val/test captions only."""
    out = {}
    for split, ids in (("train", (1, 2, 3)), ("val", (10, 11, 12, 13))):
        folder = root / split
        folder.mkdir(parents=True)
        images, annotations = [], []
        for i in ids:
            (folder / f"{i:012d}.jpg").write_bytes(_jpeg((20 * i % 255, 40, 90)))
            images.append({"id": i, "file_name": f"{i:012d}.jpg"})
            words = "a red square" if split == "train" else "a zebra"
            annotations += [{"image_id": i, "caption": f"{words} {n}"} for n in range(2)]
        out[split] = root / f"captions_{split}.json"
        out[split].write_text(json.dumps({"images": images, "annotations": annotations}))
    (root / "val.txt").write_text("10\n11\n")
    (root / "test.txt").write_text("000000000012.jpg\n13\n")
    return out


@pytest.mark.ray
def test_one_prepare_call_builds_train_val_test_from_several_caption_files(
    ray_cluster, tmp_path, capsys
):
    from hericap.cli import main

    files = _coco_files(tmp_path / "raw")
    out = tmp_path / "coco"
    argv = ["prepare", "coco_captions", "--out", str(out), "--min-count", "1"]
    argv += ["--split", f"train={files['train']}", "--images", f"train={tmp_path / 'raw/train'}"]
    for split in ("val", "test"):
        argv += [
            "--split",
            f"{split}={files['val']}",
            "--images",
            f"{split}={tmp_path / 'raw/val'}",
        ]
        argv += ["--split-list", f"{split}={tmp_path / 'raw' / f'{split}.txt'}"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["counts"] == {"train": 3, "val": 2, "test": 2}
    m = read_manifest(out, verify=True)
    assert m.splits == ["train", "val", "test"] and m.vocab_file == "vocab.json"
    ids = {s: sorted(r["image_id"] for r in read_rows(m.files(s))) for s in m.splits}
    assert ids == {"train": ["1", "2", "3"], "val": ["10", "11"], "test": ["12", "13"]}
    vocab = Vocabulary.load(m.vocab_path)
    assert "red" in vocab.stoi and "zebra" not in vocab.stoi  # from the train split only
    # the same image in two splits is an error, not a leak
    (tmp_path / "raw" / "test.txt").write_text("10\n")
    assert main([*argv[:4], "--out", str(tmp_path / "again"), *argv[6:]]) == 2


def test_adding_a_split_keeps_the_others_and_preparing_over_them_is_refused(moto_server, tmp_path):
    """In S3: a dataset of train + val, then test added (--add): one manifest with all three,
    the vocabulary of the train split kept; preparing test alone over it without --add would
    drop train and val, and is refused with nothing changed."""
    import boto3

    from hericap.data.readers import SplitSource, read_splits

    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="multi")
    files = _coco_files(tmp_path / "raw")
    raw = tmp_path / "raw"
    uri = "s3://multi/coco"
    first = read_splits(
        "coco_captions",
        [
            SplitSource("train", str(files["train"]), str(raw / "train")),
            SplitSource("val", str(files["val"]), str(raw / "val"), str(raw / "val.txt")),
        ],
    )
    before = prepare_records(first, uri, "coco_captions", min_count=1, progress=False)
    test = read_splits(
        "coco_captions",
        [SplitSource("test", str(files["val"]), str(raw / "val"), str(raw / "test.txt"))],
    )
    with pytest.raises(FileExistsError, match=r"would drop \['train', 'val'\].*--add"):
        prepare_records(test, uri, "coco_captions", min_count=1, progress=False)
    assert read_manifest(uri).counts == before.counts == {"train": 3, "val": 2}
    added = prepare_records(test, uri, "coco_captions", min_count=1, progress=False, add=True)
    back = read_manifest(uri, verify=True)
    assert back.counts == added.counts == {"train": 3, "val": 2, "test": 2}
    assert back.shards[:2] == before.shards  # the first splits' shards, untouched
    assert Vocabulary.load(back.vocab_path) == Vocabulary.load(before.vocab_path)
    with pytest.raises(FileExistsError, match=r"already holds split\(s\) \['test'\]"):
        prepare_records(test, uri, "coco_captions", min_count=1, progress=False, add=True)


def test_training_on_a_seed_dataset_without_shards_prepares_them_from_dataset_root(tmp_path):
    """dataset.root is what the seed read its raw files from (DATA_ROOT): a run on flickr8k whose
    shards are missing prepares them from there, in the seed's layout."""
    from hericap.config import load_config
    from hericap.data.catalog import ensure_shards

    _flickr_folder(tmp_path / "data" / "flickr8K")
    cfg = load_config(
        [
            "preset=demo",
            "dataset.name=flickr8k",
            f"dataset.root={tmp_path / 'data'}",
            f"dataset.shard_dir={tmp_path / 'shards'}",
            "dataset.vocab_min_count=1",
        ]
    )
    m = ensure_shards(cfg)
    assert m.counts == {"train": 4, "val": 1, "test": 1} and m.source == "flickr8k"
    assert read_manifest(tmp_path / "shards").counts == m.counts
    cfg.dataset.root = str(tmp_path / "nowhere")
    cfg.dataset.shard_dir = str(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"dataset_flickr8k\.json under dataset.root"):
        ensure_shards(cfg)


def test_raw_files_in_s3_become_shards_in_s3(moto_server, tmp_path):
    """Nothing local: the annotation file and the images are read from a bucket, the shards go
    to one; the same skips and normalisations as from a folder."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="raw")
    ann = _flickr_folder(tmp_path / "flickr8K")
    for path in sorted(p for p in (tmp_path / "flickr8K").rglob("*") if p.is_file()):
        s3.put_object(
            Bucket="raw",
            Key=f"f8k/{path.relative_to(tmp_path / 'flickr8K')}",
            Body=path.read_bytes(),
        )
    records = read_karpathy(f"s3://raw/f8k/{ann.name}", "s3://raw/f8k/images", "flickr8k")
    assert records[0].path == "s3://raw/f8k/images/good.jpg"
    m = prepare_records(records, "s3://raw/shards", "flickr8k", min_count=1, progress=False)
    assert m.counts == {"train": 4, "val": 1, "test": 1}
    report = json.loads(s3.get_object(Bucket="raw", Key="shards/report.json")["Body"].read())
    reasons = {s["file"]: s["reason"] for s in report["skipped"] if "caption_index" not in s}
    assert reasons["missing.jpg"] == "missing image file"
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
