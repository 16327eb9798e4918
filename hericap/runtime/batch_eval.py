"""Decode a split with a checkpoint on the Ray cluster (Ray Data batch inference) and score it.

The checkpoint may live anywhere the driver reads (a folder, S3): the driver reads its files once
and ships them to the inference actors through Ray's object store, so an actor on any node loads
the same weights without reading the checkpoint's location itself. With ``exp.ngpus_per_node > 0``
each actor asks for one GPU and decodes there (bf16 autocast where the GPU supports it, per
``exp.mixed_precision``).

Writes ``<split>_results.json`` (COCO results format) and ``<split>_scores.json`` to the run
folder (a folder or a URI) and returns the score report.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import ray
import ray.data

from hericap.checkpoint import META_FILE, read_checkpoint_files
from hericap.config.schema import Config
from hericap.data import storage
from hericap.data.catalog import ensure_shards, first_image_ids, shard_dir
from hericap.data.shards import read_rows
from hericap.data.synthetic import Scene
from hericap.data.transforms import resize_spec
from hericap.evaluation.coco_metrics import CocoScorer
from hericap.evaluation.inference import CaptionPredictor
from hericap.evaluation.report import build_report
from hericap.runtime.cluster import check_resources, check_shared_locations
from hericap.runtime.datasets import shard_dataset

__all__ = ["evaluate_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass
class SplitReferences:
    """The images of a split to evaluate: shard files, the ids kept (None: all), references and
    (synthetic data) the true scenes."""

    files: list
    keep: frozenset[str] | None
    references: dict[str, list[str]]
    scenes: dict[str, Scene] | None


def split_references(cfg: Config, split: str) -> SplitReferences:
    """The references of ``split`` (``dataset.max_test_images`` / ``max_val_images`` apply)."""
    files = ensure_shards(cfg).files(split)
    limit = cfg.dataset.max_test_images if split == "test" else cfg.dataset.max_val_images
    keep = frozenset(first_image_ids(files, limit)) if limit else None
    rows = [
        r
        for r in read_rows(files, columns=["image_id", "captions", "scene"])
        if keep is None or r["image_id"] in keep
    ]
    scenes = (
        {r["image_id"]: Scene.from_dict(json.loads(r["scene"])) for r in rows}
        if all(r["scene"] for r in rows)
        else None
    )
    return SplitReferences(files, keep, {r["image_id"]: list(r["captions"]) for r in rows}, scenes)


class _ShippedPredictor(CaptionPredictor):
    """A :class:`CaptionPredictor` over checkpoint files that travel in Ray's object store (a
    one-element list, so that Ray Data hands the reference over instead of resolving it)."""

    def __init__(self, files_ref: list[ray.ObjectRef], location: str, **kwargs: Any) -> None:
        super().__init__(ray.get(files_ref[0]), location=location, **kwargs)


def eval_resources(cfg: Config) -> dict[str, float]:
    """What one inference actor asks for: ``exp.cpus_per_worker`` CPUs, and a GPU when
    ``exp.ngpus_per_node > 0``."""
    return {"CPU": cfg.exp.cpus_per_worker, "GPU": 1.0 if cfg.exp.ngpus_per_node > 0 else 0.0}


def check_eval_cluster(cfg: Config) -> None:
    """Refuse an evaluation the cluster cannot hold, or whose shards some node cannot read."""
    check_shared_locations({"dataset.shard_dir": shard_dir(cfg)}, "batch inference")
    check_resources(
        eval_resources(cfg),
        max(1, cfg.exp.world_size),
        f"exp.world_size={cfg.exp.world_size} inference actors",
        "Lower exp.world_size or exp.cpus_per_worker; exp.ngpus_per_node=0 runs them on CPU",
    )


def decode_split(
    cfg: Config, checkpoint: str, split: SplitReferences
) -> tuple[dict[str, str], list[str]]:
    """Caption every image of ``split`` with Ray Data batch inference: a pool of
    ``exp.world_size`` actors (one GPU each with ``exp.ngpus_per_node > 0``), each loading the
    checkpoint once from the files the driver put in the object store. Returns the captions and
    the devices the actors decoded on."""
    resources = eval_resources(cfg)
    ds = shard_dataset(
        split.files,
        resize_spec(cfg.dataset),
        columns=["image_id", "image"],
        decode_batch_size=cfg.dataset.decode_batch_size,
        keep_ids=split.keep,
    )
    files_ref = ray.put(read_checkpoint_files(checkpoint))
    preds = ds.map_batches(
        _ShippedPredictor,
        fn_constructor_kwargs={
            "files_ref": [files_ref],
            "location": checkpoint,
            "beam_size": cfg.decode.test_beam_size,
            "max_len": cfg.decode.max_len,
            "length_penalty": cfg.decode.length_penalty,
            "torch_threads": max(1, int(cfg.exp.cpus_per_worker)),
            "device": "cuda" if resources["GPU"] else "cpu",
            "mixed_precision": cfg.exp.mixed_precision,
        },
        batch_size=cfg.decode.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, cfg.exp.world_size)),
        num_cpus=resources["CPU"],
        num_gpus=resources["GPU"] or None,
    ).take_all()
    candidates = {str(p["image_id"]): str(p["caption"]) for p in preds}
    if set(candidates) != set(split.references):
        raise RuntimeError(f"decoded {len(candidates)} of {len(split.references)} images")
    return candidates, sorted({str(p["device"]) for p in preds})


def training_info(checkpoint: str) -> dict[str, Any]:
    """Where in training a checkpoint comes from (phase, epoch, step) and, after SCST, how its
    reward was computed: recorded with every score."""
    try:
        meta = json.loads(storage.read_text(storage.join(checkpoint, META_FILE)))
    except FileNotFoundError:
        meta = {}
    training = {"phase": meta.get("phase"), "epoch": meta.get("epoch"), "step": meta.get("step")}
    if meta.get("phase") == "sc":
        training["reward"] = {
            "metric": "CIDEr-D",
            "baseline": meta.get("sc_baseline"),
            "include_eos": meta.get("sc_include_eos"),
        }
    return training


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike | None = None,
    with_oracle: bool = True,
    scorer: CocoScorer | None = None,
) -> dict[str, Any]:
    """Caption every image of ``split`` with ``checkpoint`` and score the captions.

    Args:
        cfg: the run config (dataset location, decoding, workers).
        checkpoint: checkpoint folder (a folder or a URI).
        split: ``val`` or ``test`` (or ``train``).
        out_dir: where results and scores go (default: the run folder).
        with_oracle: also score the human oracle (off for a second checkpoint on one split).
        scorer: the toolkit to score with (one METEOR JVM for several checkpoints: its start-up
            is ~6 s); None: one of its own, closed after.
    """
    t0 = time.time()
    checkpoint = storage.resolve(checkpoint)
    check_eval_cluster(cfg)
    images = split_references(cfg, split)
    candidates, devices = decode_split(cfg, checkpoint, images)
    decode_s = time.time() - t0
    logger.info(
        "decoded %d %s images in %.0fs (beam %d)",
        len(candidates),
        split,
        decode_s,
        cfg.decode.test_beam_size,
    )
    with CocoScorer(spice_jars=None) if scorer is None else nullcontext(scorer) as active:
        report = build_report(
            active, images.references, candidates, images.scenes, with_oracle=with_oracle
        )
    report.update(
        {
            "split": split,
            "checkpoint": checkpoint,
            "training": training_info(checkpoint),
            "decode": {
                "devices": devices,
                "beam_size": cfg.decode.test_beam_size,
                "max_len": cfg.decode.max_len,
                "length_penalty": cfg.decode.length_penalty,
                "decode_s": decode_s,
            },
            "eval_s": time.time() - t0,
        }
    )
    out = storage.resolve(out_dir or cfg.run_dir)
    storage.write_text(
        storage.join(out, f"{split}_results.json"),
        json.dumps(
            [{"image_id": k, "caption": v} for k, v in sorted(candidates.items())], indent=0
        ),
    )
    storage.write_text(storage.join(out, f"{split}_scores.json"), json.dumps(report, indent=1))
    return report
