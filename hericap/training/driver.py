"""The training driver: shards -> Ray Data -> Ray Train ``TorchTrainer`` -> best checkpoint.

Runs on the Ray driver. Each worker runs :func:`hericap.training.loop.train_loop_per_worker`.
The best checkpoint is chosen by validation CIDEr-D only; test is never looked at here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hericap.checkpoint.warm_start import check_warm_start
from hericap.config.loader import NotEnoughResourcesError, to_dict
from hericap.config.schema import Config
from hericap.data.augment import train_augmentation
from hericap.data.catalog import ensure_shards, first_image_ids
from hericap.data.shards import Manifest, read_rows
from hericap.data.text import Vocabulary
from hericap.data.transforms import resize_spec
from hericap.evaluation.diversity import caption_fingerprints
from hericap.runtime.datasets import shard_dataset
from hericap.training.loop import train_loop_per_worker
from hericap.training.phases import configured_phases
from hericap.training.run_logs import write_run_logs
from hericap.training.run_storage import KEPT_BEST, RUN_NAME, KeepBest, RunStorage
from hericap.training.tracking import tracking_uri, uses_mlflow

__all__ = [
    "TrainData",
    "TrainOutcome",
    "decode_concurrency",
    "select_data",
    "train",
]

logger = logging.getLogger(__name__)

VAL_METRIC = "val_CIDEr"
# The decoded train split is cached only within this share of Ray's object store, so that it
# neither spills to disk nor crowds out the blocks training streams.
CACHE_MAX_OBJECT_STORE_SHARE = 0.5


@dataclass
class TrainOutcome:
    run_dir: Path
    best_checkpoint: Path | None  # local copy; None when no epoch has been validated yet
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    wall_s: float
    latest_checkpoint: Path  # the last one written (local storage: in Ray's run folder)
    best_xe_checkpoint: Path | None = None  # runs with SCST: the best XE epoch, for comparison


def _check_gpus(cfg: Config) -> bool:
    if cfg.exp.ngpus_per_node <= 0:
        return False
    have = int(ray.cluster_resources().get("GPU", 0))
    if have < cfg.exp.world_size:
        raise NotEnoughResourcesError(
            f"exp.world_size={cfg.exp.world_size} workers with exp.ngpus_per_node="
            f"{cfg.exp.ngpus_per_node} ask for {cfg.exp.world_size} GPUs, but the Ray cluster has "
            f"{have}. To run on CPU: exp.ngpus_per_node=0 exp.world_size=N (N CPU workers)"
        )
    return True


def decode_concurrency(cfg: Config) -> int | None:
    """Ray Data decode tasks: ``dataset.decode_concurrency``, else the seed's
    ``optimizer.num_workers``, else None (Ray decides)."""
    return cfg.dataset.decode_concurrency or cfg.optimizer.num_workers or None


def cache_decoded_train(
    cfg: Config, n_train: int, object_store_bytes: float | None = None
) -> tuple[bool, str]:
    """Whether the train split is decoded once and kept (``dataset.cache_decoded_mb``), and why:
    only without augmentation, only when ``n_train`` canvases fit in the limit, and (given the
    cluster's ``object_store_bytes``) in half of Ray's object store, so that the cache does not
    spill to disk or crowd out the blocks that training streams."""
    if cfg.dataset.augment != "none":
        return False, f"dataset.augment={cfg.dataset.augment} draws new pixels every epoch"
    if cfg.dataset.cache_decoded_mb <= 0:
        return False, "dataset.cache_decoded_mb=0"
    height, width = resize_spec(cfg.dataset).canvas
    mb = n_train * height * width * 3 / 2**20
    if mb > cfg.dataset.cache_decoded_mb:
        return False, f"{mb:.0f} MB > dataset.cache_decoded_mb={cfg.dataset.cache_decoded_mb}"
    limit = CACHE_MAX_OBJECT_STORE_SHARE * (object_store_bytes or 0)
    if object_store_bytes is not None and mb * 2**20 > limit:
        return False, (
            f"{mb:.0f} MB > {CACHE_MAX_OBJECT_STORE_SHARE:.0%} of Ray's object store "
            f"({object_store_bytes / 2**20:.0f} MB)"
        )
    return True, f"~{mb:.0f} MB of dataset.cache_decoded_mb={cfg.dataset.cache_decoded_mb}"


@dataclass
class TrainData:
    """What a run trains and validates on: shard files, the image subsets kept (None: all),
    the references, and how many batches each worker takes per epoch."""

    train_files: list
    val_files: list
    keep_train: frozenset[str] | None
    n_train: int
    val_references: dict[str, list[str]]
    train_references: dict[str, list[str]]  # the SCST reward's corpus (empty without SCST)
    batches_per_epoch: int
    # the train captions as fingerprints: which val captions are copies (novel_share)
    train_fingerprints: np.ndarray | None = None


def select_data(cfg: Config, manifest: Manifest, with_scst: bool) -> TrainData:
    """The train and val images of ``cfg`` (``dataset.overfit``, ``max_val_images``) and the
    batches per worker per epoch (whole optimiser steps only).

    Raises:
        ValueError: the train images cannot fill one optimiser step.
    """
    train_files, val_files = manifest.files("train"), manifest.files("val")
    keep_train = None
    if cfg.dataset.overfit:
        keep_train = frozenset(first_image_ids(train_files, cfg.dataset.overfit_size))
        val_files, keep_val = train_files, keep_train
        n_train = len(keep_train)
    else:
        n_train = manifest.counts["train"]
        keep_val = (
            frozenset(first_image_ids(val_files, cfg.dataset.max_val_images))
            if cfg.dataset.max_val_images
            else None
        )
    world, batch = cfg.exp.world_size, cfg.optimizer.batch_size
    accum = cfg.optimizer.grad_accum_steps
    batches_per_epoch = n_train // (world * batch) // accum * accum
    if batches_per_epoch < 1:
        raise ValueError(
            f"{n_train} train images cannot fill one step of {world} workers x batch {batch} x "
            f"{accum} accumulated batches; lower optimizer.batch_size, "
            "optimizer.grad_accum_steps or exp.world_size"
        )
    train_references = _references(train_files, keep_train)
    return TrainData(
        train_files=train_files,
        val_files=val_files,
        keep_train=keep_train,
        n_train=n_train,
        val_references=_references(val_files, keep_val),
        train_references=train_references if with_scst else {},
        batches_per_epoch=batches_per_epoch,
        train_fingerprints=caption_fingerprints(
            c for captions in train_references.values() for c in captions
        ),
    )


def _references(files: list, keep: frozenset[str] | None) -> dict[str, list[str]]:
    return {
        r["image_id"]: list(r["captions"])
        for r in read_rows(files, columns=["image_id", "captions"])
        if keep is None or r["image_id"] in keep
    }


def _train_dataset(cfg: Config, data: TrainData) -> ray.data.Dataset:
    """The train split as a Ray Dataset: decoded every epoch, or once into the object store
    when :func:`cache_decoded_train` says so."""
    ds = cfg.dataset
    cache, why = cache_decoded_train(
        cfg, data.n_train, ray.cluster_resources().get("object_store_memory")
    )
    t0 = time.time()
    dataset = shard_dataset(
        data.train_files,
        resize_spec(ds),
        shuffle=True,
        augment=train_augmentation(ds.augment, ds.randaugment_ops, ds.randaugment_magnitude),
        decode_batch_size=ds.decode_batch_size,
        concurrency=decode_concurrency(cfg),
        keep_ids=data.keep_train,
        seed=cfg.exp.seed if cfg.exp.deterministic else None,
        cache=cache,
    )
    if cache:
        logger.info(
            "%d train images decoded once in %.1fs and kept in the object store (%s); epochs "
            "re-read them",
            data.n_train,
            time.time() - t0,
            why,
        )
    else:
        logger.info("train images are decoded every epoch (%s)", why)
    return dataset


def _make_trainer(
    cfg: Config,
    data: TrainData,
    vocab: Vocabulary,
    storage: RunStorage,
    use_gpu: bool,
    callbacks: list[ray.train.UserCallback],
) -> TorchTrainer:
    data_config = None
    if cfg.exp.deterministic:  # order-preserving execution and splits: exact resume
        options = DataConfig.default_ingest_options()
        options.preserve_order = True
        data_config = DataConfig(execution_options=options)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": to_dict(cfg),
            "vocab": vocab.to_dict(),
            "val_files": [str(f.resolve()) for f in data.val_files],
            "val_references": data.val_references,
            "train_references": data.train_references,
            "train_fingerprints": data.train_fingerprints,
            "batches_per_epoch": data.batches_per_epoch,
            "tracking_uri": (
                tracking_uri(cfg.exp.output_dir) if uses_mlflow(cfg.exp.tracking) else None
            ),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.exp.world_size,
            use_gpu=use_gpu,
            resources_per_worker={
                "CPU": cfg.exp.cpus_per_worker,
                **({"GPU": 1} if use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage.path,
            storage_filesystem=storage.fs if storage.remote else None,
            failure_config=FailureConfig(max_failures=cfg.exp.max_failures),
            # Ray keeps the last K (by time, so the latest: what a run resumes from); the best
            # ones are copied aside by KeepBest as they are reported.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.optimizer.checkpoint_num_to_keep),
            callbacks=[KeepBest(storage, VAL_METRIC), *callbacks],
        ),
        datasets={"train": _train_dataset(cfg, data)},
        dataset_config=data_config,
    )


def _run_storage(cfg: Config, run_dir: Path) -> RunStorage:
    """Where the run's checkpoints go; a previous run of the same name is replaced unless
    ``exp.resume``."""
    storage = RunStorage.at(cfg.exp.storage_path or str(run_dir / "runs"))
    if storage.exists(RUN_NAME) and not cfg.exp.resume:
        logger.warning(
            "replacing the previous run in %s (exp.resume=True continues it)",
            storage.location(RUN_NAME),
        )
        for name in (RUN_NAME, *KEPT_BEST):
            storage.delete(name)
    return storage


def train(cfg: Config, callbacks: list[ray.train.UserCallback] | None = None) -> TrainOutcome:
    """Train per ``cfg`` on the current Ray cluster (call :func:`init_ray` first).

    ``callbacks`` run on the Ray Train controller after each report (a Tune sweep passes Ray
    Tune's ``TuneReportCallback`` here)."""
    t_start = time.time()
    phases = configured_phases(cfg.optimizer)
    with_scst = any(p.kind == "sc" for p in phases)
    use_gpu = _check_gpus(cfg)
    manifest = ensure_shards(cfg)
    # starting from a checkpoint's weights: its vocabulary (the output layer is its size)
    vocab = check_warm_start(cfg) if cfg.exp.checkpoint else Vocabulary.load(manifest.vocab_path)
    run_dir = Path(cfg.run_dir).resolve()
    storage = _run_storage(cfg, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = select_data(cfg, manifest, with_scst)
    trainer = _make_trainer(cfg, data, vocab, storage, use_gpu, callbacks or [])
    accum = cfg.optimizer.grad_accum_steps
    logger.info(
        "training %s: phases %s; %d optimiser steps per epoch, %d workers x batch %d x %d "
        "accumulated; %d train images",
        cfg.exp.name,
        ", ".join(f"{p.name} {p.epochs}" for p in phases),
        data.batches_per_epoch // accum,
        cfg.exp.world_size,
        cfg.optimizer.batch_size,
        accum,
        data.n_train,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the run in {storage.location(RUN_NAME)} reported no checkpoint")
    outcome = _collect(result, storage, run_dir, with_scst)
    outcome.wall_s = time.time() - t_start
    return outcome


def _collect(
    result: ray.train.Result, storage: RunStorage, run_dir: Path, with_scst: bool
) -> TrainOutcome:
    """Local copies of the kept checkpoints, the run logs, and the best checkpoint's metrics."""
    best_dir = storage.fetch("best", run_dir / "best")
    best_xe_dir = storage.fetch("best_xe", run_dir / "best_xe") if with_scst else None
    latest = Path(result.checkpoint.path)
    if storage.remote:  # a local copy of the latest too (metrics; eval without S3)
        latest = storage.fetch_checkpoint(result.checkpoint, run_dir / "latest")
    # The latest checkpoint carries every epoch's metrics (Ray's metrics_dataframe holds only
    # the checkpoints it kept).
    meta = json.loads((latest / "meta.json").read_text())
    history = meta.get("history", [])
    logs = write_run_logs(run_dir, history, meta.get("steps", []))
    logger.info(
        "metrics: %s, %s; TensorBoard: %s", logs["metrics"], logs["steps"], logs["tensorboard"]
    )
    best_metrics: dict[str, Any] = {}
    if best_dir is None:  # stopped (exp.steps_per_run) before any epoch was validated
        logger.warning("no validated checkpoint yet; resume the run (exp.resume=True)")
    else:
        best_metrics = json.loads((best_dir / "meta.json").read_text())
        logger.info(
            "best checkpoint: epoch %d, val CIDEr %.3f -> %s",
            best_metrics["epoch"] + 1,
            best_metrics[VAL_METRIC],
            best_dir,
        )
    return TrainOutcome(run_dir, best_dir, best_metrics, history, 0.0, latest, best_xe_dir)
