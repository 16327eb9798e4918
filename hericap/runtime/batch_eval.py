"""Decode a split with a checkpoint on the Ray cluster (Ray Data batch inference) and score it.

Writes ``<split>_results.json`` (COCO results format) and ``<split>_scores.json`` to the run
folder and returns the score report.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.data

from hericap.checkpoint import META_FILE
from hericap.config.schema import Config
from hericap.data.catalog import ensure_shards, first_image_ids
from hericap.data.shards import read_rows
from hericap.data.synthetic import Scene
from hericap.data.transforms import resize_spec
from hericap.evaluation.coco_metrics import CocoScorer
from hericap.evaluation.inference import CaptionPredictor
from hericap.evaluation.report import build_report
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


def decode_split(cfg: Config, checkpoint: Path, split: SplitReferences) -> dict[str, str]:
    """Caption every image of ``split`` with Ray Data batch inference: a pool of
    ``exp.world_size`` actors, each loading the checkpoint once."""
    ds = shard_dataset(
        split.files,
        resize_spec(cfg.dataset),
        columns=["image_id", "image"],
        decode_batch_size=cfg.dataset.decode_batch_size,
        keep_ids=split.keep,
    )
    preds = ds.map_batches(
        CaptionPredictor,
        fn_constructor_kwargs={
            "checkpoint": str(checkpoint),
            "beam_size": cfg.decode.test_beam_size,
            "max_len": cfg.decode.max_len,
            "length_penalty": cfg.decode.length_penalty,
            "torch_threads": max(1, int(cfg.exp.cpus_per_worker)),
            "collapse_repeats": cfg.decode.collapse_repeats,
        },
        batch_size=cfg.decode.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, cfg.exp.world_size)),
        num_cpus=cfg.exp.cpus_per_worker,
    ).take_all()
    candidates = {str(p["image_id"]): str(p["caption"]) for p in preds}
    if set(candidates) != set(split.references):
        raise RuntimeError(f"decoded {len(candidates)} of {len(split.references)} images")
    return candidates


def training_info(checkpoint: Path) -> dict[str, Any]:
    """Where in training a checkpoint comes from (phase, epoch, step) and, after SCST, how its
    reward was computed: recorded with every score."""
    meta_file = checkpoint / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
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
    checkpoint: str | Path,
    split: str,
    out_dir: str | Path | None = None,
    with_oracle: bool = True,
    scorer: CocoScorer | None = None,
) -> dict[str, Any]:
    """Caption every image of ``split`` with ``checkpoint`` and score the captions.

    Args:
        cfg: the run config (dataset location, decoding, workers).
        checkpoint: checkpoint folder.
        split: ``val`` or ``test`` (or ``train``).
        out_dir: where results and scores go (default: the run folder).
        with_oracle: also score the human oracle (off for a second checkpoint on one split).
        scorer: the toolkit to score with (one METEOR JVM for several checkpoints: its start-up
            is ~6 s); None: one of its own, closed after.
    """
    t0 = time.time()
    checkpoint = Path(checkpoint).resolve()
    images = split_references(cfg, split)
    candidates = decode_split(cfg, checkpoint, images)
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
            "checkpoint": str(checkpoint),
            "training": training_info(checkpoint),
            "decode": {
                "beam_size": cfg.decode.test_beam_size,
                "max_len": cfg.decode.max_len,
                "length_penalty": cfg.decode.length_penalty,
                "collapse_repeats": cfg.decode.collapse_repeats,
                "decode_s": decode_s,
            },
            "eval_s": time.time() - t0,
        }
    )
    out = Path(out_dir or cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{split}_results.json").write_text(
        json.dumps([{"image_id": k, "caption": v} for k, v in sorted(candidates.items())], indent=0)
    )
    (out / f"{split}_scores.json").write_text(json.dumps(report, indent=1))
    return report
