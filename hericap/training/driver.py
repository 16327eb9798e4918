"""The training driver: shards -> Ray Data -> Ray Train ``TorchTrainer`` -> best checkpoint.

Runs on the Ray driver. Each worker runs :func:`hericap.training.loop.train_loop_per_worker`.
The best checkpoint is chosen by validation CIDEr-D only; test is never looked at here.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hericap.checkpoint import CONFIG_FILE
from hericap.checkpoint.warm_start import check_warm_start
from hericap.config.loader import to_dict
from hericap.config.schema import Config
from hericap.data import storage
from hericap.data.augment import train_augmentation
from hericap.data.catalog import ensure_shards, first_image_ids, seed_layout, shard_dir
from hericap.data.shards import MANIFEST_NAME, Manifest, read_rows
from hericap.data.text import Vocabulary
from hericap.data.transforms import resize_spec
from hericap.evaluation.diversity import caption_fingerprints
from hericap.runtime.cluster import check_resources, check_shared_locations
from hericap.runtime.datasets import run_on_ray, shard_dataset
from hericap.runtime.preflight import check_config, local_tracking_store, weight_files
from hericap.training.loop import train_loop_per_worker
from hericap.training.phases import configured_phases
from hericap.training.run_logs import plot_run, write_run_logs
from hericap.training.run_storage import RUN_NAME, KeepBest, RunStorage, claim_run, storage_location
from hericap.training.tracking import (
    log_run_outputs,
    tracking_uri,
    uses_mlflow,
    uses_tensorboard,
)

__all__ = [
    "TrainData",
    "TrainOutcome",
    "check_cluster",
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
    """What a run left: locations (local copies when the run folder is local, else in the
    run's storage), the best checkpoint's metrics and every epoch's."""

    run_dir: str
    best_checkpoint: str | None  # None when no epoch has been validated yet
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    wall_s: float
    latest_checkpoint: str  # the last one written
    best_xe_checkpoint: str | None = None  # runs with SCST: the best XE epoch, for comparison
    mlflow_run_id: str | None = None  # exp.tracking=mlflow|both: the run's MLflow run


def worker_bundle(cfg: Config) -> dict[str, float]:
    """What one training worker (or evaluation actor) asks Ray for."""
    return {"CPU": cfg.exp.cpus_per_worker, "GPU": 1.0 if cfg.exp.ngpus_per_node > 0 else 0.0}


def check_cluster(cfg: Config) -> None:
    """Refuse a run the cluster cannot hold or whose locations some node cannot reach, before
    any data or worker starts.

    Raises:
        ConfigError: a plain path that workers on other nodes would use (multi-node cluster).
        NotEnoughResourcesError: not enough CPUs or GPUs for ``exp.world_size`` workers.
    """
    shards = shard_dir(cfg)
    locations = {"exp.storage_path": storage_location(cfg), "dataset.shard_dir": shards}
    if not cfg.exp.resume:
        locations.update(weight_files(cfg))
        locations["exp.checkpoint"] = cfg.exp.checkpoint  # a warm start's weights
    if local_tracking_store(cfg):  # rank 0, on any node, writes MLflow's local store
        locations["exp.output_dir (MLflow's local store; or set $MLFLOW_TRACKING_URI)"] = (
            cfg.exp.output_dir
        )
    if seed_layout(cfg) and not storage.exists(storage.join(shards, MANIFEST_NAME)):
        locations["dataset.root"] = cfg.dataset.root  # its images are read by Ray tasks
    check_shared_locations(locations, "training")
    fix = (
        "To run on CPU: exp.ngpus_per_node=0 exp.world_size=N (N CPU workers)"
        if cfg.exp.ngpus_per_node > 0
        else "Lower exp.world_size or exp.cpus_per_worker, or add nodes"
    )
    check_resources(
        worker_bundle(cfg),
        cfg.exp.world_size,
        f"exp.world_size={cfg.exp.world_size} workers with exp.cpus_per_worker="
        f"{cfg.exp.cpus_per_worker:g} and exp.ngpus_per_node={cfg.exp.ngpus_per_node}",
        fix,
    )


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
    runs: RunStorage,
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
            "val_files": data.val_files,  # absolute paths or URIs
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
            resources_per_worker={k: v for k, v in worker_bundle(cfg).items() if v},
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=runs.path,
            storage_filesystem=runs.fs if runs.remote else None,
            failure_config=FailureConfig(max_failures=cfg.exp.max_failures),
            # Ray keeps the last K (by time, so the latest: what a run resumes from); the best
            # ones are copied aside by KeepBest as they are reported.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.optimizer.checkpoint_num_to_keep),
            callbacks=[KeepBest(runs, VAL_METRIC), *callbacks],
        ),
        datasets={"train": _train_dataset(cfg, data)},
        dataset_config=data_config,
    )


def train(
    cfg: Config,
    callbacks: list[ray.train.UserCallback] | None = None,
) -> TrainOutcome:
    """Train per ``cfg`` on the current Ray cluster (call :func:`init_ray` first).

    Everything is checked before data or workers start: the config
    (:func:`~hericap.runtime.preflight.check_config`), the cluster (:func:`check_cluster`) and
    the run's previous outputs (:func:`~hericap.training.run_storage.claim_run`: an error
    unless ``exp.resume`` or ``exp.overwrite``).

    ``callbacks`` run on the Ray Train controller after each report (a Tune sweep passes Ray
    Tune's ``TuneReportCallback`` here)."""
    t_start = time.time()
    check_config(cfg, need_weights=not cfg.exp.resume)
    phases = configured_phases(cfg.optimizer)
    with_scst = any(p.kind == "sc" for p in phases)
    check_cluster(cfg)
    runs = claim_run(cfg)
    manifest = ensure_shards(cfg, run=run_on_ray)
    # starting from a checkpoint's weights: its vocabulary (the output layer is its size)
    vocab = check_warm_start(cfg) if cfg.exp.checkpoint else Vocabulary.load(manifest.vocab_path)
    run_dir = storage.resolve(cfg.run_dir)
    data = select_data(cfg, manifest, with_scst)
    trainer = _make_trainer(cfg, data, vocab, runs, cfg.exp.ngpus_per_node > 0, callbacks or [])
    accum = cfg.optimizer.grad_accum_steps
    logger.info(
        "training %s: phases %s; %d optimiser steps per epoch, %d workers x batch %d x %d "
        "accumulated; %d train images; checkpoints in %s",
        cfg.exp.name,
        ", ".join(f"{p.name} {p.epochs}" for p in phases),
        data.batches_per_epoch // accum,
        cfg.exp.world_size,
        cfg.optimizer.batch_size,
        accum,
        data.n_train,
        runs.base,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the run in {runs.location(RUN_NAME)} reported no checkpoint")
    outcome = _collect(result, runs, run_dir, with_scst, cfg.exp.tracking)
    if outcome.mlflow_run_id is not None:
        files = {name: storage.join(run_dir, name) for name in ("curves.png", "metrics.csv")}
        if outcome.best_checkpoint is not None:
            files["best_config.json"] = storage.join(outcome.best_checkpoint, CONFIG_FILE)
        uri = tracking_uri(cfg.exp.output_dir)
        log_run_outputs(uri, outcome.mlflow_run_id, files)
    outcome.wall_s = time.time() - t_start
    return outcome


def _write_logs(run_dir: str, history: list[dict], steps: list[dict], tracking: str) -> None:
    """The run logs into the run folder (through a local folder when it is a URI): the CSVs,
    TensorBoard's event files when ``tracking`` asks for them, the curves unless it is
    ``none``."""
    tensorboard = uses_tensorboard(tracking)
    if not storage.is_uri(run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_run_logs(run_dir, history, steps, tensorboard=tensorboard)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            write_run_logs(tmp, history, steps, tensorboard=tensorboard)
            if tensorboard:
                storage.delete_tree(storage.join(run_dir, "tensorboard"))
            storage.copy_tree(tmp, run_dir)
    if tracking != "none" and history:
        plot_run(run_dir)
    logger.info("metrics: %s%s", run_dir, "; TensorBoard: tensorboard/" if tensorboard else "")


def _collect(
    result: ray.train.Result, runs: RunStorage, run_dir: str, with_scst: bool, tracking: str
) -> TrainOutcome:
    """The kept checkpoints (copied into a local run folder), the run logs, and the best
    checkpoint's metrics."""
    local = not storage.is_uri(run_dir)

    def kept(name: str) -> str | None:
        if not runs.exists(name):
            return None
        if not local:
            return runs.location(name)
        storage.replace_tree(runs.join(name), storage.join(run_dir, name), source_fs=runs.fs)
        return storage.join(run_dir, name)

    best_dir = kept("best")
    best_xe_dir = kept("best_xe") if with_scst else None
    checkpoint = result.checkpoint
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        latest = checkpoint.path
    elif local:  # a local copy of the latest too (metrics; eval without S3)
        latest = storage.join(run_dir, "latest")
        storage.replace_tree(checkpoint.path, latest, source_fs=checkpoint.filesystem)
    else:
        latest = storage.join(runs.base, checkpoint.path.removeprefix(runs.path).lstrip("/"))
    # The latest checkpoint carries every epoch's metrics (Ray's metrics_dataframe holds only
    # the checkpoints it kept).
    meta = json.loads(storage.read_text(storage.join(latest, "meta.json")))
    history = meta.get("history", [])
    _write_logs(run_dir, history, meta.get("steps", []), tracking)
    best_metrics: dict[str, Any] = {}
    if best_dir is None:  # stopped (exp.steps_per_run) before any epoch was validated
        logger.warning("no validated checkpoint yet; resume the run (exp.resume=True)")
    else:
        best_metrics = json.loads(storage.read_text(storage.join(best_dir, "meta.json")))
        logger.info(
            "best checkpoint: epoch %d, val CIDEr %.3f -> %s",
            best_metrics["epoch"] + 1,
            best_metrics[VAL_METRIC],
            best_dir,
        )
    return TrainOutcome(
        run_dir,
        best_dir,
        best_metrics,
        history,
        0.0,
        latest,
        best_xe_dir,
        mlflow_run_id=meta.get("mlflow_run_id"),
    )
