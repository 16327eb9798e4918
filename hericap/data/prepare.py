"""Turn a dataset into Parquet shards plus a manifest, a vocabulary and a skip report.

Real datasets: a reader (:mod:`hericap.data.readers`) lists the records; :func:`plan_shards`
cuts them into shards of ``shard_rows`` per split; :func:`build_shard` reads, checks and
normalises one shard's images and writes it with a completion marker; :func:`prepare_records`
runs the shards through a ``run`` function (on Ray from the CLI, serially here), skips shards
whose marker exists (an interrupted run resumes without rewriting finished shards), then writes
``vocab.json``, ``report.json`` (every skipped record with its reason) and ``manifest.json``.
Outputs go to a folder or an ``s3://`` prefix. Nothing here imports Ray.
"""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hericap.data import storage, synthetic
from hericap.data.readers import Record
from hericap.data.shards import VOCAB_NAME, Manifest, ShardWriter, read_manifest, write_shard
from hericap.data.text import Vocabulary
from hericap.data.transforms import validate_image_bytes

__all__ = [
    "PREPARERS",
    "REPORT_NAME",
    "ShardPlan",
    "build_shard",
    "plan_shards",
    "prepare_records",
    "prepare_synthetic",
]

REPORT_NAME = "report.json"
PROGRESS_DIR = "_progress"
SPLIT_ORDER = ("train", "val", "test")

logger = logging.getLogger(__name__)


def _refuse_other_dataset(out: str) -> None:
    """A prepared real dataset at ``out`` is never replaced by the synthetic one."""
    try:
        previous = read_manifest(out)
    except (FileNotFoundError, ValueError):  # nothing there, or an older synthetic format
        return
    if previous.source != "synthetic":
        raise FileExistsError(
            f"{out} holds the prepared dataset '{previous.source}' (splits {previous.splits}): "
            "generating the synthetic one there would replace it; choose another folder"
        )


def prepare_synthetic(
    out_dir: str | Path,
    num_train: int = 6000,
    num_val: int = 250,
    num_test: int = 500,
    seed: int = 0,
    image_size: int = 64,
    min_count: int = 5,
    shard_rows: int = 1000,
    progress: bool = True,
) -> Manifest:
    """Generate the synthetic dataset into shards.

    Args:
        out_dir: folder or URI for shards, ``manifest.json`` and ``vocab.json``.
        num_train: train images; ``num_val``/``num_test`` likewise.
        seed: dataset seed; the same seed gives byte-identical shards.
        image_size: square image side in pixels.
        min_count: vocabulary keeps train words seen at least this often.
        shard_rows: rows per Parquet shard.
        progress: show a progress bar.

    Returns:
        The manifest written.
    """
    out = storage.resolve(out_dir)
    _refuse_other_dataset(out)
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    shards: list[dict] = []
    train_captions: list[str] = []
    total = sum(sizes.values())
    with tqdm(total=total, desc="synthetic", unit="img", disable=not progress) as bar:
        for split, n in sizes.items():
            writer = ShardWriter(out, split, shard_rows=shard_rows)
            for s in synthetic.iter_split(seed, split, n, image_size=image_size):
                writer.add(
                    {
                        "image_id": s.image_id,
                        "split": split,
                        "image": s.jpeg,
                        "width": s.width,
                        "height": s.height,
                        "captions": s.captions,
                        "source": "synthetic",
                        "file_name": None,
                        "scene": json.dumps(s.scene.to_dict()),
                        "meta": None,
                    }
                )
                if split == "train":
                    train_captions.extend(s.captions)
                bar.update(1)
            shards.extend(writer.close())
    vocab = Vocabulary.build(train_captions, min_count=min_count)
    vocab.save(storage.join(out, VOCAB_NAME))
    manifest = Manifest(
        root=out,
        source="synthetic",
        shards=shards,
        counts={k: v for k, v in sizes.items() if v},
        vocab_file=VOCAB_NAME,
        info={
            "seed": seed,
            "image_size": image_size,
            "vocab_min_count": min_count,
            "vocab_size": len(vocab),
            "generator_version": synthetic.GENERATOR_VERSION,
        },
    )
    manifest.write()
    logger.info("wrote %d synthetic images to %s (vocabulary: %d words)", total, out, len(vocab))
    return manifest


PREPARERS: dict[str, Callable[..., Manifest]] = {"synthetic": prepare_synthetic}


@dataclass
class ShardPlan:
    """One shard to write: its file name, split and records."""

    name: str
    split: str
    records: list[Record]


def plan_shards(records: Iterable[Record], shard_rows: int) -> list[ShardPlan]:
    """Cut records into shards of at most ``shard_rows`` per split, in a stable order (the same
    records always give the same shard names: what makes resuming safe)."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows={shard_rows} must be >= 1")
    by_split: dict[str, list[Record]] = {}
    for r in records:
        by_split.setdefault(r.split, []).append(r)
    order = [s for s in SPLIT_ORDER if s in by_split] + sorted(set(by_split) - set(SPLIT_ORDER))
    plans = []
    for split in order:
        rows = by_split[split]
        for i in range(0, len(rows), shard_rows):
            name = f"{split}-{i // shard_rows:05d}.parquet"
            plans.append(ShardPlan(name, split, rows[i : i + shard_rows]))
    return plans


def _read_image_file(path: str) -> bytes:
    """An image file's bytes (a local path or a URI); a reason when it cannot be read."""
    try:
        kind = storage.file_type(path)
    except OSError as e:
        raise ValueError(f"unreadable file: {e}") from e
    if kind == "missing":
        raise ValueError("missing image file")
    if kind != "file":
        raise ValueError("not a regular file")
    try:
        return storage.read_bytes(path)
    except OSError as e:
        raise ValueError(f"unreadable file: {getattr(e, 'strerror', None) or e}") from e


def build_shard(plan: ShardPlan, out: str, source: str) -> dict[str, Any]:
    """Read, check and normalise a shard's images, write the shard and its completion marker.

    Per record: empty or whitespace captions are dropped (each one reported); a record whose
    captions were all empty is skipped (records without captions, like nocaps test, are kept);
    a missing, zero-byte, truncated or unreadable image skips the record with the reason.
    Grayscale, CMYK, alpha and EXIF-rotated images are stored as upright RGB JPEGs (reported as
    normalised). Returns the marker: the shard entry (None when every record was skipped), the
    skipped and normalised lists and the kept train captions.
    """
    rows, skipped, normalised = [], [], []
    for r in plan.records:
        where = {"image_id": r.image_id, "split": r.split, "file": r.file_name}
        captions = [c.strip() for c in r.captions]
        for i, c in enumerate(captions):
            if not c:
                skipped.append(
                    where | {"caption_index": i, "reason": "empty or whitespace caption"}
                )
        kept_captions = [c for c in captions if c]
        if captions and not kept_captions:
            skipped.append(where | {"reason": "no non-empty captions"})
            continue
        try:
            data, width, height, change = validate_image_bytes(_read_image_file(r.path))
        except ValueError as e:
            skipped.append(where | {"reason": str(e)})
            continue
        if change:
            normalised.append(where | {"change": change})
        rows.append(
            {
                "image_id": r.image_id,
                "split": r.split,
                "image": data,
                "width": width,
                "height": height,
                "captions": kept_captions,
                "source": source,
                "file_name": r.file_name,
                "scene": None,
                "meta": json.dumps(r.extra) if r.extra else None,
            }
        )
    shard = write_shard(out, plan.name, plan.split, rows) if rows else None
    marker = {
        "shard": shard,
        "records": len(plan.records),
        "skipped": skipped,
        "normalised": normalised,
        "train_captions": [c for row in rows if row["split"] == "train" for c in row["captions"]],
    }
    storage.write_text(storage.join(out, PROGRESS_DIR, plan.name + ".json"), json.dumps(marker))
    return marker


def _build_named(plan: ShardPlan, out: str, source: str) -> dict[str, Any]:
    return build_shard(plan, out, source) | {"name": plan.name}


def _serial(fn: Callable[[ShardPlan], dict], plans: list[ShardPlan]) -> Iterator[dict]:
    for plan in plans:
        yield fn(plan)


def _previous_dataset(out: str, splits: list[str], add: bool) -> Manifest | None:
    """The dataset already at ``out`` whose other splits this run keeps (``add``), or None.

    Raises:
        FileExistsError: ``out`` holds other splits and ``add`` is off (they would be dropped),
            or ``add`` names a split it already holds.
    """
    try:
        previous = read_manifest(out)
    except FileNotFoundError:
        return None
    others = [s for s in previous.splits if s not in splits]
    if not add:
        if others:
            raise FileExistsError(
                f"{out} already holds a prepared dataset with splits {previous.splits}; "
                f"preparing {splits} alone would drop {others}: add them with --add "
                "(prepare_records(add=True)), or write to another --out"
            )
        return None  # the same splits again: finished shards are reused, nothing is lost
    again = [s for s in splits if s in previous.splits]
    if again:
        raise FileExistsError(
            f"{out} already holds split(s) {again} (splits {previous.splits}); --add adds new "
            "splits only: prepare into another --out to rebuild one"
        )
    return previous


def _pending_plans(plans: list[ShardPlan], out: str) -> tuple[dict[str, dict], list[ShardPlan]]:
    """(markers of the shards already written, plans still to build)."""
    markers: dict[str, dict] = {}
    pending = []
    for plan in plans:
        try:
            marker = json.loads(
                storage.read_text(storage.join(out, PROGRESS_DIR, plan.name + ".json"))
            )
        except FileNotFoundError:
            pending.append(plan)
            continue
        shard = marker["shard"]
        if shard is None or storage.exists(storage.join(out, shard["file"])):
            markers[plan.name] = marker
        else:
            pending.append(plan)
    if markers:
        logger.info("resuming: %d of %d shards already written", len(markers), len(plans))
    return markers, pending


def _merged_report(
    out: str, source: str, n_records: int, markers: list[dict], previous: Manifest | None
) -> dict[str, Any]:
    """This run's skip report, after the previous one's when splits are added."""
    skipped = [s for m in markers for s in m["skipped"]]
    normalised = [n for m in markers for n in m["normalised"]]
    if previous is not None:
        try:
            before = json.loads(storage.read_text(storage.join(out, REPORT_NAME)))
        except FileNotFoundError:
            before = {}
        n_records += before.get("records", 0)
        skipped = before.get("skipped", []) + skipped
        normalised = before.get("normalised_records", []) + normalised
    return {
        "source": source,
        "records": n_records,
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "normalised": len(normalised),
        "skipped": skipped,
        "normalised_records": normalised,
    }


def _vocabulary_file(
    out: str, markers: list[dict], previous: Manifest | None, min_count: int
) -> str | None:
    """``vocab.json`` from the train captions written now; else the kept dataset's own."""
    train_captions = [c for m in markers for c in m["train_captions"]]
    if train_captions:
        Vocabulary.build(train_captions, min_count=min_count).save(storage.join(out, VOCAB_NAME))
        return VOCAB_NAME
    return previous.vocab_file if previous is not None else None


def _build_shards(
    plans: list[ShardPlan],
    out: str,
    source: str,
    run: Callable[[Callable[[ShardPlan], dict], list[ShardPlan]], Iterable[dict]],
    progress: bool,
) -> list[dict]:
    """Build the shards whose completion marker is missing (through ``run``); returns every
    plan's marker, in plan order."""
    markers, pending = _pending_plans(plans, out)
    with tqdm(
        total=len(plans),
        initial=len(markers),
        desc=f"prepare {source}",
        unit="shard",
        disable=not progress,
    ) as bar:
        for marker in run(functools.partial(_build_named, out=out, source=source), pending):
            markers[marker["name"]] = marker
            bar.update(1)
    return [markers[p.name] for p in plans]


def prepare_records(
    records: list[Record],
    out: str | Path,
    source: str,
    shard_rows: int = 1000,
    min_count: int = 5,
    info: dict[str, Any] | None = None,
    run: Callable[[Callable[[ShardPlan], dict], list[ShardPlan]], Iterable[dict]] = _serial,
    progress: bool = True,
    add: bool = False,
) -> Manifest:
    """Write ``records`` (one or several splits) as shards under ``out`` (folder or URI), with
    one manifest, a vocabulary from the train split and a skip report.

    Args:
        records: from a reader (or several: one per split).
        out: output folder or URI.
        source: dataset name recorded in the shards and manifest.
        shard_rows: records per shard (the target shard size).
        min_count: vocabulary keeps train words seen at least this often.
        info: extra manifest fields (where the data came from).
        run: runs ``fn`` over the pending shard plans and yields their markers in any order
            (the CLI passes a Ray runner; the default runs them here, one after another).
        progress: show a progress bar.
        add: add these splits to the dataset already at ``out``, keeping its other splits (and
            its vocabulary, unless a train split is added).

    Returns:
        The manifest written. Shards whose completion marker exists are not rebuilt.

    Raises:
        FileExistsError: ``out`` holds other splits and ``add`` is off, or ``add`` names a
            split it already holds.
    """
    out = storage.resolve(out)
    plans = plan_shards(records, shard_rows)
    splits = list(dict.fromkeys(p.split for p in plans))
    previous = _previous_dataset(out, splits, add)
    ordered = _build_shards(plans, out, source, run, progress)
    shards = (previous.shards if previous else []) + [m["shard"] for m in ordered if m["shard"]]
    counts: Counter[str] = Counter()
    for s in shards:
        counts[s["split"]] += s["rows"]
    vocab_file = _vocabulary_file(out, ordered, previous, min_count)
    report = _merged_report(out, source, len(records), ordered, previous)
    report["kept"] = dict(counts)
    storage.write_text(storage.join(out, REPORT_NAME), json.dumps(report, indent=1))
    if previous is not None and previous.source != source:
        source = f"{previous.source}+{source}"
    manifest = Manifest(
        root=out,
        source=source,
        shards=shards,
        counts=dict(counts),
        vocab_file=vocab_file,
        info=(previous.info if previous else {})
        | (info or {})
        | {"vocab_min_count": min_count, "skipped": report["skipped_by_reason"]}
        | {"report": REPORT_NAME},
    )
    manifest.write()
    logger.info(
        "%s: %d records -> %s kept; skipped %s; %d normalised; report %s",
        source,
        len(records),
        dict(counts),
        report["skipped_by_reason"],
        report["normalised"],
        storage.join(out, REPORT_NAME),
    )
    return manifest
