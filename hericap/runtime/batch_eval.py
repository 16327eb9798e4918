"""Decode a split with a checkpoint, or an ensemble of checkpoints, on the Ray cluster (Ray Data
batch inference) and score it.

The checkpoints may live anywhere the driver reads (folders, S3): the driver reads their files
once and ships them to the inference actors through Ray's object store, so an actor on any node
loads the same weights without reading the checkpoints' locations itself. With
``exp.ngpus_per_node > 0`` each actor asks for one GPU and decodes there (bf16 autocast where the
GPU supports it, per ``exp.mixed_precision``).

Writes ``<split>_results.json`` (COCO results format) and ``<split>_scores.json`` to the run
folder (a folder or a URI), and where they apply the nocaps EvalAI file, the COCO test-server
file and the per-image file (:mod:`hericap.evaluation.submission`); returns the score report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.data

from hericap.checkpoint import META_FILE, read_checkpoint_files
from hericap.checkpoint.ensemble import split_checkpoints
from hericap.config.schema import Config
from hericap.data import storage
from hericap.data.catalog import ensure_shards, first_image_ids, shard_dir
from hericap.data.shards import read_rows
from hericap.data.synthetic import Scene
from hericap.data.transforms import resize_spec
from hericap.evaluation.clip_score import check_clip_setup, clip_report
from hericap.evaluation.coco_metrics import CocoScorer
from hericap.evaluation.diversity import caption_fingerprints, collapse_warning
from hericap.evaluation.inference import CaptionPredictor
from hericap.evaluation.report import build_report
from hericap.evaluation.submission import submission_name, write_evaluation_files
from hericap.models.builder import decode_controls
from hericap.runtime.cluster import check_resources, check_shared_locations
from hericap.runtime.datasets import shard_dataset

__all__ = ["evaluate_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass
class SplitReferences:
    """The images of a split to evaluate: shard files, the ids kept (None: all), references,
    (synthetic data) the true scenes, (nocaps) each image's domain, the file names and the
    source dataset (which server files apply)."""

    files: list
    keep: frozenset[str] | None
    references: dict[str, list[str]]
    scenes: dict[str, Scene] | None
    domains: dict[str, str] | None = None
    file_names: dict[str, str | None] = field(default_factory=dict)
    source: str | None = None


def split_references(cfg: Config, split: str) -> SplitReferences:
    """The references of ``split`` (``dataset.max_test_images`` / ``max_val_images`` apply)."""
    files = ensure_shards(cfg).files(split)
    limit = cfg.dataset.max_test_images if split == "test" else cfg.dataset.max_val_images
    keep = frozenset(first_image_ids(files, limit)) if limit else None
    columns = ["image_id", "captions", "scene", "meta", "file_name", "source"]
    rows = [r for r in read_rows(files, columns=columns) if keep is None or r["image_id"] in keep]
    scenes = (
        {r["image_id"]: Scene.from_dict(json.loads(r["scene"])) for r in rows}
        if all(r["scene"] for r in rows)
        else None
    )
    meta = {r["image_id"]: json.loads(r["meta"] or "{}") for r in rows}
    domains = {k: m["domain"] for k, m in meta.items() if "domain" in m}
    return SplitReferences(
        files,
        keep,
        {r["image_id"]: list(r["captions"]) for r in rows},
        scenes,
        domains=domains if rows and len(domains) == len(rows) else None,
        file_names={r["image_id"]: r["file_name"] for r in rows},
        source=rows[0]["source"] if rows else None,
    )


def iter_split_images(split: SplitReferences) -> Iterator[tuple[str, bytes]]:
    """``(image_id, encoded image)`` of the split's images, one shard in memory at a time."""
    for f in split.files:
        for row in read_rows([f], columns=["image_id", "image"]):
            if split.keep is None or row["image_id"] in split.keep:
                yield row["image_id"], row["image"]


def train_fingerprints(cfg: Config) -> tuple[np.ndarray | None, str]:
    """Fingerprints of the dataset's train references (what ``novel_share`` compares with) and
    where they came from; None with the reason when the shards have no train split (nocaps)."""
    manifest = ensure_shards(cfg)
    try:
        files = manifest.files("train")
    except ValueError:
        return None, f"no train split in {manifest.root}: novel_share is unknown"
    captions = [c for r in read_rows(files, columns=["captions"]) for c in r["captions"]]
    return caption_fingerprints(captions), f"{len(captions)} train references in {manifest.root}"


class _ShippedPredictor(CaptionPredictor):
    """A :class:`CaptionPredictor` over checkpoint files that travel in Ray's object store (in
    a list, so that Ray Data hands the references over instead of resolving them): each
    member's files are written to a folder of the actor's own, which it then loads."""

    def __init__(self, files_refs: list[ray.ObjectRef], **kwargs: Any) -> None:
        self._folders = tempfile.TemporaryDirectory(prefix="hericap-checkpoint-")
        members = []
        for i, files in enumerate(ray.get(files_refs)):
            folder = os.path.join(self._folders.name, str(i))
            for name, data in files.items():
                storage.write_bytes(os.path.join(folder, name), data)
            members.append(folder)
        super().__init__(members, **kwargs)


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
    cfg: Config, checkpoints: Sequence[str], split: SplitReferences
) -> tuple[dict[str, str], list[str]]:
    """Caption every image of ``split`` with Ray Data batch inference: a pool of
    ``exp.world_size`` actors (one GPU each with ``exp.ngpus_per_node > 0``), each loading the
    checkpoint (or the ensemble of ``checkpoints``) once from the files the driver put in the
    object store. Returns the captions and the devices the actors decoded on."""
    resources = eval_resources(cfg)
    ds = shard_dataset(
        split.files,
        resize_spec(cfg.dataset),
        columns=["image_id", "image"],
        decode_batch_size=cfg.dataset.decode_batch_size,
        keep_ids=split.keep,
    )
    files_refs = [ray.put(read_checkpoint_files(c)) for c in checkpoints]
    preds = ds.map_batches(
        _ShippedPredictor,
        fn_constructor_kwargs={
            "files_refs": files_refs,
            "beam_size": cfg.decode.test_beam_size,
            "max_len": cfg.decode.max_len,
            "torch_threads": max(1, int(cfg.exp.cpus_per_worker)),
            "collapse_repeats": cfg.decode.collapse_repeats,
            "controls": decode_controls(cfg.decode),
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
    # the weights model.pt holds: the moving average (optimizer.ema_decay) or an average of
    # checkpoints (`hericap average`)
    training["ema_decay"] = meta.get("ema_decay")
    if meta.get("averaged_from"):
        training["averaged_from"] = meta["averaged_from"]
    if meta.get("phase") == "sc":
        training["reward"] = {
            "metric": "CIDEr-D",
            "baseline": meta.get("sc_baseline"),
            "include_eos": meta.get("sc_include_eos"),
        }
        if "sc_top_k" in meta:  # the sampling baselines: what they sampled from
            training["reward"].update(top_k=meta["sc_top_k"], top_p=meta["sc_top_p"])
    return training


def decode_record(cfg: Config, checkpoints: Sequence[str], decode_s: float) -> dict[str, Any]:
    """How the captions of a report were decoded: beam size, length, every ``decode.*``
    control (the sampling ones only act in sampling), time, and the ensemble's members (None
    for one checkpoint)."""
    return {
        "beam_size": cfg.decode.test_beam_size,
        "max_len": cfg.decode.max_len,
        "collapse_repeats": cfg.decode.collapse_repeats,
        **decode_controls(cfg.decode).as_dict(),
        "search": describe_search(cfg, len(checkpoints)),
        "ensemble": [str(c) for c in checkpoints] if len(checkpoints) > 1 else None,
        "decode_s": decode_s,
    }


def describe_search(cfg: Config, members: int) -> str:
    """One line: ``beam 5, alpha=0.9`` (and ``, ensemble of 2 (mean log-prob)``)."""
    line = decode_controls(cfg.decode).describe(cfg.decode.test_beam_size)
    return line + (f", ensemble of {members} (mean log-prob)" if members > 1 else "")


def ensemble_training(checkpoints: Sequence[str]) -> dict[str, Any]:
    """:func:`training_info` of one checkpoint; for an ensemble, each member's under
    ``members`` (and ``phase`` when they all share one)."""
    if len(checkpoints) == 1:
        return training_info(checkpoints[0])
    members = [{"checkpoint": str(c), **training_info(c)} for c in checkpoints]
    phases = {m["phase"] for m in members}
    return {"phase": phases.pop() if len(phases) == 1 else None, "members": members}


def score_split(
    cfg: Config,
    images: SplitReferences,
    candidates: dict[str, str],
    scorer: CocoScorer,
    with_oracle: bool = True,
    scst: bool = False,
    where: str = "evaluation",
) -> dict[str, Any]:
    """The report of decoded ``candidates``: toolkit metrics (per domain on nocaps), diversity
    against the train references (the collapse alarm logs, naming ``where``, when it trips;
    ``scst``: the captions come from an SCST checkpoint), CLIPScore."""
    settings = cfg.evaluation
    fingerprints, seen_from = train_fingerprints(cfg)
    report = build_report(
        scorer,
        images.references,
        candidates,
        images.scenes,
        with_oracle=with_oracle,
        groups=images.domains,
        train_fingerprints=fingerprints,
        collapse_unique_share=settings.collapse_unique_share,
        per_image=settings.per_image,
    )
    report["diversity"]["novel_from"] = seen_from
    warning = collapse_warning(report["diversity"], where, scst=scst)
    if warning:
        logger.warning("%s", warning)
    report["clip"] = clip_report(
        settings.clip_checkpoint,
        settings.clip_model,
        lambda: iter_split_images(images),
        candidates,
        images.references,
        batch_size=settings.clip_batch_size,
        per_image=settings.per_image,
    )
    return report


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | os.PathLike | Sequence[str | os.PathLike],
    split: str,
    out_dir: str | os.PathLike | None = None,
    with_oracle: bool = True,
    scorer: CocoScorer | None = None,
) -> dict[str, Any]:
    """Caption every image of ``split`` with ``checkpoint`` and score the captions.

    Args:
        cfg: the run config (dataset location, decoding, workers, ``evaluation.*``).
        checkpoint: checkpoint folder (a folder or a URI); several (``"A,B"`` or a list):
            decoded as a log-prob-averaging ensemble (:mod:`hericap.models.ensemble`).
        split: ``val`` or ``test`` (or ``train``).
        out_dir: where results and scores go (default: the run folder).
        with_oracle: also score the human oracle (off for a second checkpoint on one split).
        scorer: the toolkit to score with (one METEOR JVM for several checkpoints: its start-up
            is ~6 s); None: one of its own, closed after.
    """
    t0 = time.time()
    checkpoints = [storage.resolve(c) for c in split_checkpoints(checkpoint)]
    # a CLIP set-up that cannot work, or a cluster that cannot run it, fails before the decode
    check_clip_setup(cfg.evaluation.clip_checkpoint, cfg.evaluation.clip_model)
    check_eval_cluster(cfg)
    images = split_references(cfg, split)
    candidates, devices = decode_split(cfg, checkpoints, images)
    decode_s = time.time() - t0
    logger.info(
        "decoded %d %s images in %.0fs (%s)",
        len(candidates),
        split,
        decode_s,
        describe_search(cfg, len(checkpoints)),
    )
    training = ensemble_training(checkpoints)
    where = ",".join(str(c) for c in checkpoints)
    with CocoScorer(spice_jars=None) if scorer is None else nullcontext(scorer) as active:
        report = score_split(
            cfg,
            images,
            candidates,
            active,
            with_oracle,
            scst=training.get("phase") == "sc",
            where=f"{split} split, {where}",
        )
    report.update(
        {
            "split": split,
            "checkpoint": where,
            "training": training,
            "decode": decode_record(cfg, checkpoints, decode_s) | {"devices": devices},
            "evaluation": dataclasses.asdict(cfg.evaluation),
        }
    )
    out = storage.resolve(out_dir or cfg.run_dir)
    report["files"] = _write_files(cfg, out, split, candidates, report, images)
    report["eval_s"] = time.time() - t0
    storage.write_text(storage.join(out, f"{split}_scores.json"), json.dumps(report, indent=1))
    return report


def _write_files(
    cfg: Config,
    out: str,
    split: str,
    candidates: dict[str, str],
    report: dict[str, Any],
    images: SplitReferences,
) -> dict[str, str]:
    """:func:`write_evaluation_files` into ``out`` (a folder, or a URI: through a local
    folder); returns ``{kind: location}``."""
    kwargs = {
        "name": submission_name(cfg.evaluation.submission_name, cfg.exp.name),
        "source": images.source,
        "file_names": images.file_names.values(),
        "references": images.references,
        "domains": images.domains,
        "per_image": cfg.evaluation.per_image,
        "worst_n": cfg.evaluation.worst_images,
    }
    if not storage.is_uri(out):
        return write_evaluation_files(out, split, candidates, report, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        files = write_evaluation_files(tmp, split, candidates, report, **kwargs)
        storage.copy_tree(tmp, out)
    return {kind: storage.join(out, os.path.relpath(path, tmp)) for kind, path in files.items()}
