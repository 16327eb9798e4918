"""Readers: a raw caption dataset on disk -> :class:`Record` s (no images read yet).

Formats:

* Karpathy split files (``dataset_coco.json``, ``dataset_flickr8k.json``,
  ``dataset_flickr30k.json``): ``{"images": [{"filename", "filepath"?, "split", "sentences":
  [{"raw", "tokens"}], "cocoid"?, "imgid"?}]}``. COCO's ``restval`` goes to train.
* COCO caption files (``captions_*.json``): ``{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}``, one split, optionally limited by a split list (one image id or
  file name per line); an image-info file (``image_info_test2014.json``, no annotations) gives
  images without captions, for the COCO test server.
* nocaps (``nocap_val_4500_captions.json``, ``nocap_test_image_info.json``): COCO format with a
  ``domain`` per image (in-domain, near-domain, out-domain); test has no captions.

Default locations follow the seed README's ``DATA_ROOT`` layout (:data:`DEFAULT_LAYOUT`). Files
and image folders may be local or URIs (``s3://...``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hericap.data import storage

__all__ = [
    "DEFAULT_LAYOUT",
    "KARPATHY_DATASETS",
    "READERS",
    "Record",
    "SplitSource",
    "read_coco_captions",
    "read_karpathy",
    "read_nocaps",
    "read_splits",
]

logger = logging.getLogger(__name__)


@dataclass
class Record:
    """One image of a dataset: where its file is, its split and captions, and source fields."""

    image_id: str
    split: str
    path: str
    captions: list[str]
    file_name: str
    extra: dict[str, str] = field(default_factory=dict)


# Where each dataset lives under DATA_ROOT (the seed README's layout).
DEFAULT_LAYOUT: dict[str, dict[str, str]] = {
    "coco": {"annotations": "COCO2014/annotations/dataset_coco.json", "images": "COCO2014"},
    "flickr8k": {"annotations": "flickr8K/dataset_flickr8k.json", "images": "flickr8K/images"},
    "flickr30k": {"annotations": "flickr30K/dataset_flickr30k.json", "images": "flickr30K/images"},
    "nocaps": {"annotations": "nocap/nocap_val_4500_captions.json", "images": "nocap/val"},
    "coco_captions": {
        "annotations": "COCO2014/annotations/captions_val2014.json",
        "images": "COCO2014/val2014",
    },
}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _load_json(path: str | Path) -> dict:
    """An annotation file (a local path or a URI)."""
    try:
        return json.loads(storage.read_text(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"annotation file not found: {path}") from e


def read_karpathy(annotations: str | Path, images: str | Path, source: str) -> list[Record]:
    """Records of a Karpathy split file; images under ``images/<filepath>/<filename>`` (COCO)
    or ``images/<filename>`` (Flickr)."""
    body = _load_json(annotations)
    entries = body.get("images")
    if not isinstance(entries, list) or any(
        not {"filename", "split", "sentences"} <= set(e) for e in entries[:1]
    ):
        raise ValueError(
            f"{annotations} is not a Karpathy split file (want images with filename, split, "
            "sentences)"
        )
    records = []
    for entry in body["images"]:
        split = KARPATHY_SPLITS.get(entry.get("split", ""))
        if split is None:
            raise ValueError(f"{annotations}: unknown split {entry.get('split')!r} in {entry}")
        rel = "/".join(p for p in (entry.get("filepath", ""), entry["filename"]) if p)
        image_id = str(entry.get("cocoid", Path(entry["filename"]).stem))
        extra = {"karpathy_split": entry["split"]}
        if "imgid" in entry:
            extra["imgid"] = str(entry["imgid"])
        records.append(
            Record(
                image_id=image_id,
                split=split,
                path=storage.join(images, rel),
                captions=[s.get("raw", " ".join(s.get("tokens", []))) for s in entry["sentences"]],
                file_name=str(rel),
                extra=extra,
            )
        )
    logger.info("%s: %d images in %s", source, len(records), annotations)
    return records


def _coco_records(
    body: dict, images: str | Path, split: str, keep: set[str] | None, extra_keys: tuple[str, ...]
) -> list[Record]:
    captions: dict[str, list[str]] = defaultdict(list)
    for ann in body.get("annotations", []):
        captions[str(ann["image_id"])].append(ann["caption"])
    records = []
    for im in body["images"]:
        image_id = str(im["id"])
        if keep is not None and image_id not in keep and im["file_name"] not in keep:
            continue
        records.append(
            Record(
                image_id=image_id,
                split=split,
                path=storage.join(images, im["file_name"]),
                captions=captions.get(image_id, []),
                file_name=im["file_name"],
                extra={k: str(im[k]) for k in extra_keys if k in im},
            )
        )
    return records


def read_coco_captions(
    annotations: str | Path,
    images: str | Path,
    split: str = "val",
    split_list: str | Path | None = None,
) -> list[Record]:
    """Records of a COCO caption file, all in ``split`` (or those named in ``split_list``). An
    image-info file without annotations (``image_info_test2014.json``) gives records without
    captions: captioned for the COCO test server, never scored."""
    body = _load_json(annotations)
    if "images" not in body:
        raise ValueError(f"{annotations} is not a COCO caption file (needs images, annotations)")
    keep = None
    if split_list:
        lines = storage.read_text(split_list).splitlines()
        keep = {line.strip() for line in lines if line.strip()}
    records = _coco_records(body, images, split, keep, extra_keys=("coco_url",))
    logger.info("coco captions: %d images (%s) in %s", len(records), split, annotations)
    return records


def read_nocaps(annotations: str | Path, images: str | Path, split: str = "val") -> list[Record]:
    """Records of a nocaps file; each keeps its ``domain`` (test: no captions)."""
    body = _load_json(annotations)
    records = _coco_records(body, images, split, None, extra_keys=("domain", "open_images_id"))
    logger.info("nocaps: %d images (%s) in %s", len(records), split, annotations)
    return records


def _karpathy(source: str) -> Callable[..., list[Record]]:
    def read(annotations: str | Path, images: str | Path, **_: object) -> list[Record]:
        return read_karpathy(annotations, images, source)

    return read


# name -> reader(annotations=..., images=..., split=..., split_list=...)
READERS: dict[str, Callable[..., list[Record]]] = {
    "coco": _karpathy("coco"),
    "flickr8k": _karpathy("flickr8k"),
    "flickr30k": _karpathy("flickr30k"),
    "nocaps": lambda annotations, images, split="val", **_: read_nocaps(annotations, images, split),
    "coco_captions": lambda annotations, images, split="val", split_list=None, **_: (
        read_coco_captions(annotations, images, split, split_list)
    ),
}


# Datasets whose one annotation file holds every split (train / val / test).
KARPATHY_DATASETS = ("coco", "flickr8k", "flickr30k")


@dataclass
class SplitSource:
    """One split of a dataset built from several files: its annotation file, image folder and
    optional split list (image ids or file names to keep)."""

    split: str
    annotations: str
    images: str
    split_list: str | None = None


def read_splits(dataset: str, sources: list[SplitSource]) -> list[Record]:
    """The records of several single-split files (``coco_captions``, ``nocaps``) as one
    dataset.

    Raises:
        ValueError: the reader holds its own splits (Karpathy files), a split is named twice, or
            an image lands in two splits.
    """
    if dataset in KARPATHY_DATASETS:
        raise ValueError(
            f"{dataset}: a Karpathy split file holds its own splits; give --annotations FILE, "
            "not --split NAME=FILE"
        )
    names = [s.split for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"a split is named twice: {names}")
    records: list[Record] = []
    seen: dict[str, str] = {}
    overlap: list[tuple[str, str, str]] = []
    for source in sources:
        for r in READERS[dataset](
            annotations=source.annotations,
            images=source.images,
            split=source.split,
            split_list=source.split_list,
        ):
            if r.image_id in seen:
                overlap.append((r.image_id, seen[r.image_id], r.split))
            seen[r.image_id] = r.split
            records.append(r)
    if overlap:
        raise ValueError(
            f"{len(overlap)} image(s) are in two splits, e.g. (image id, split, split) "
            f"{overlap[:5]}: give split lists that do not overlap (--split-list SPLIT=FILE)"
        )
    return records
