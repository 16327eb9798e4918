"""Ray Tune + Optuna sweeps: one Ray Train run per trial, ASHA stopping, best exported.

A space file (``tune_spaces/*.yaml``) names fixed overrides and the searched keys::

    preset: demo
    overrides: [optimizer.finetune_xe_epochs=4]
    num_samples: 8
    max_concurrent: 1
    trial_cpus: 0.1            # the trial's own driver; its Ray Train workers ask for theirs
    asha: {grace_period: 1, reduction_factor: 2}
    params:
      model.cap_generator.decoder_name: {choice: [Parallel, Sequential]}
      optimizer.xe_lr: {loguniform: [1.0e-5, 1.0e-3]}
      model.cap_generator.n_layers: {randint: [1, 4]}     # 1..3

Each trial is a function trainable that builds and fits a ``TorchTrainer`` (Ray 2.60 refuses
``Tuner(TorchTrainer)``) and reports every epoch to Tune through Ray Tune's
``TuneReportCallback``; the metric is val CIDEr. A sweep lives in ``<output_dir>/<name>`` (a
folder or a URI such as ``s3://bucket/sweeps``): Tune's experiment in ``sweep/``, and each trial's
run folder (checkpoints, kept best, logs) inside its trial folder there, written straight to that
storage from whichever node runs the trial. Sweeps resume with :func:`run_sweep`
``(resume=True)`` (``Tuner.restore``: finished trials are not rerun); a previous sweep of the
same name is an error unless resumed or overwritten. At the end: ``results.csv``,
``trials.png`` and the best trial's checkpoint (its ``config.json`` included) in ``best/`` with
``trial.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from hericap.config.loader import ConfigError, load_config
from hericap.config.schema import Config
from hericap.data import storage
from hericap.data.catalog import ensure_shards, shard_dir
from hericap.runtime.cluster import check_shared_locations
from hericap.runtime.datasets import run_on_ray
from hericap.runtime.preflight import check_config, check_tracking
from hericap.training.driver import VAL_METRIC, train
from hericap.training.phases import configured_phases
from hericap.training.tracking import (
    file_store_opt_in,
    tracking_uri,
    uses_mlflow,
    uses_tensorboard,
)

__all__ = [
    "EXPERIMENT",
    "SweepExistsError",
    "SweepInterruptedError",
    "SweepSpace",
    "claim_sweep",
    "export_best",
    "load_space",
    "run_sweep",
]

logger = logging.getLogger(__name__)

SAMPLERS = ("choice", "uniform", "loguniform", "randint")
SPACE_KEYS = {
    "preset",
    "overrides",
    "num_samples",
    "max_concurrent",
    "trial_cpus",
    "asha",
    "params",
    "seed",
}


# the Tune experiment's folder in the sweep folder
EXPERIMENT = "sweep"


class SweepInterruptedError(RuntimeError):
    """The sweep stopped before all its trials finished (Ctrl-C / SIGINT); its state is saved."""


class SweepExistsError(FileExistsError):
    """A sweep of this name already has outputs and neither ``--resume`` nor ``--overwrite``
    was given."""


@dataclass
class SweepSpace:
    """A parsed space file."""

    params: dict[str, dict[str, list]]
    preset: str = "demo"
    overrides: list[str] = field(default_factory=list)
    num_samples: int = 4
    max_concurrent: int = 1
    trial_cpus: float = 0.1
    asha: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def base_config(self) -> Config:
        """The config every trial starts from (preset + fixed overrides)."""
        return load_config([f"preset={self.preset}", *self.overrides])

    def tune_space(self) -> dict[str, Any]:
        out = {}
        for key, spec in self.params.items():
            (kind, args), *_ = spec.items()
            if kind == "choice":
                out[key] = tune.choice(list(args))
            elif kind == "uniform":
                out[key] = tune.uniform(float(args[0]), float(args[1]))
            elif kind == "loguniform":
                out[key] = tune.loguniform(float(args[0]), float(args[1]))
            else:
                out[key] = tune.randint(int(args[0]), int(args[1]))
        return out


def _candidates(kind: str, args: list) -> list[Any]:
    """The values of a sampler a sweep can draw that bound it: every choice, both ends of a
    range (``randint``'s high end is exclusive)."""
    if kind == "choice":
        return list(args)
    if kind == "randint":
        return [int(args[0]), int(args[1]) - 1]
    return [float(args[0]), float(args[1])]


def _check_sampler(path: str | Path, key: str, spec: Any) -> None:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        raise ConfigError(f"{path}: {key}: give one sampler of {list(SAMPLERS)}, got {spec}")
    (kind, args), *_ = spec.items()
    if not isinstance(args, list) or not args or (kind != "choice" and len(args) != 2):
        takes = "a list of values" if kind == "choice" else "[low, high]"
        raise ConfigError(f"{path}: {key}: {kind} takes {takes}, got {args}")
    if kind == "choice":
        return
    low, high = args
    empty = not low < high or (kind == "randint" and high - low < 1)
    if empty or (kind == "loguniform" and low <= 0):
        raise ConfigError(
            f"{path}: {key}: {kind} [{low}, {high}] is empty or invalid (low < high"
            f"{'; low > 0' if kind == 'loguniform' else ''})"
        )


def load_space(path: str | Path, extra_overrides: list[str] = ()) -> SweepSpace:
    """Read and check a space file before anything runs: unknown keys or samplers are errors,
    and every value a trial can get (each choice, both ends of each range) must give a config
    that passes :func:`~hericap.runtime.preflight.check_config`."""
    raw = yaml.safe_load(storage.read_text(path)) or {}
    unknown = set(raw) - SPACE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(SPACE_KEYS)}")
    if not raw.get("params"):
        raise ConfigError(f"{path}: no params to search")
    space = SweepSpace(**raw)
    space.overrides = [*space.overrides, *extra_overrides]
    for key, spec in space.params.items():
        _check_sampler(path, key, spec)
    first = {k: _candidates(*next(iter(v.items())))[0] for k, v in space.params.items()}
    tried: set[tuple] = set()
    for key, spec in space.params.items():
        for value in _candidates(*next(iter(spec.items()))):
            params = {**first, key: value}
            if tuple(params.items()) in tried:
                continue
            tried.add(tuple(params.items()))
            try:
                cfg = load_config(
                    [f"preset={space.preset}", *space.overrides]
                    + [f"{k}={v}" for k, v in params.items()]
                )
                check_config(cfg)
            except ConfigError as e:
                raise ConfigError(f"{path}: with {key}={value}: {e}") from e
    return space


def _trial_config(space: SweepSpace, params: dict[str, Any], trial: str, shards: str) -> Config:
    """A trial's config: its run folder is the trial's folder in the sweep's storage (on S3 when
    the sweep is), and it resumes its own checkpoints when Tune restarts it. The sweep logs the
    trial's MLflow run (:func:`_tracking_callbacks`), so the trial itself keeps only its
    TensorBoard files, when asked for."""
    tracking = space.base_config().exp.tracking
    return load_config(
        [
            f"preset={space.preset}",
            *space.overrides,
            *(f"{k}={v}" for k, v in params.items()),
            f"exp.output_dir={trial}",
            "exp.name=run",
            "exp.resume=True",
            f"dataset.shard_dir={shards}",
            f"exp.tracking={'tensorboard' if uses_tensorboard(tracking) else 'none'}",
        ]
    )


def _tracking_callbacks(base: Config, name: str, output_dir: str) -> list[tune.Callback]:
    """With ``exp.tracking=mlflow|both``: Ray Tune's ``MLflowLoggerCallback``, one MLflow run
    per trial (its parameters and every epoch's report) under an experiment named after the
    sweep, in ``$MLFLOW_TRACKING_URI`` or ``<output_dir>/mlruns``. Logged by the sweep's
    driver only."""
    check_tracking(base.exp.tracking, output_dir, "--output-dir")
    if not uses_mlflow(base.exp.tracking):
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = tracking_uri(output_dir)
    file_store_opt_in(uri)
    logger.info("MLflow: one run per trial in experiment %s at %s", name, uri)
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=name, save_artifact=False)]


def _trainable(params: dict[str, Any], space: SweepSpace, shards: str, experiment: str) -> None:
    """One trial: a Ray Train run whose epoch reports reach Tune (ASHA may stop it)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = storage.join(experiment, storage.basename(tune.get_context().get_trial_dir()))
    train(_trial_config(space, params, trial, shards), callbacks=[TuneReportCallback()])


def _sweep_outputs(sweep_root: str) -> list[str]:
    names = (EXPERIMENT, "best", "results.csv", "trials.png")
    found = [storage.join(sweep_root, n) for n in names]
    return [location for location in found if storage.exists(location)]


def claim_sweep(sweep_root: str, resume: bool, overwrite: bool, delete: bool = True) -> None:
    """Make sure a previous sweep of the same name is not lost: ``resume`` continues it,
    ``overwrite`` deletes it (when ``delete``; False only checks), neither is an error when it
    exists.

    Raises:
        SweepExistsError: a previous sweep's outputs exist and neither flag is set.
    """
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the previous sweep and --overwrite deletes it: give one of them"
        )
    found = [] if resume else _sweep_outputs(sweep_root)
    if found and not overwrite:
        raise SweepExistsError(
            f"a sweep already has outputs in {sweep_root} ({', '.join(found)}): continue it "
            "with --resume, delete them and start over with --overwrite, or choose another "
            "--name"
        )
    for location in found if delete else ():
        logger.warning("--overwrite: deleting %s", location)
        storage.delete_tree(location)


def _tuner(
    space: SweepSpace,
    base: Config,
    trainable: Any,
    sweep_root: str,
    callbacks: list[tune.Callback],
) -> tune.Tuner:
    max_epochs = configured_phases(base.optimizer)[-1].end_epoch
    search = ConcurrencyLimiter(
        OptunaSearch(metric=VAL_METRIC, mode="max", seed=space.seed),
        max_concurrent=space.max_concurrent,
    )
    scheduler = ASHAScheduler(
        metric=VAL_METRIC,
        mode="max",
        max_t=max_epochs,
        grace_period=int(space.asha.get("grace_period", 1)),
        reduction_factor=float(space.asha.get("reduction_factor", 2)),
    )
    fs, path = storage.filesystem(sweep_root)
    local = isinstance(fs, pafs.LocalFileSystem)
    return tune.Tuner(
        trainable,
        param_space=space.tune_space(),
        tune_config=tune.TuneConfig(
            search_alg=search, scheduler=scheduler, num_samples=space.num_samples
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=path,
            storage_filesystem=None if local else fs,
            verbose=1,
            callbacks=callbacks,
        ),
    )


def run_sweep(
    space: SweepSpace,
    name: str,
    output_dir: str = "outputs",
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the sweep ``name`` on the current Ray cluster; write the results table,
    the plot and the best trial's checkpoint. ``output_dir`` is a folder or a URI (on a
    multi-node cluster it must be a URI every node reaches, as must the shards).

    ``resume`` restores an interrupted sweep (Ctrl-C, a lost driver) with ``Tuner.restore``:
    finished trials keep their results, unfinished and errored ones run again (from their last
    checkpoint), and the searcher draws the samples still missing. A sweep stopped before all
    ``num_samples`` trials finished raises :class:`SweepInterruptedError` instead of exporting a
    partial best. A previous sweep of that name is an error unless ``resume`` or ``overwrite``
    (which deletes it)."""
    sweep_root = storage.join(storage.resolve(output_dir), name)
    experiment = storage.join(sweep_root, EXPERIMENT)
    base = space.base_config()
    shards = shard_dir(base)
    check_shared_locations({"--output-dir": sweep_root, "dataset.shard_dir": shards}, "a sweep")
    callbacks = _tracking_callbacks(base, name, output_dir)
    claim_sweep(sweep_root, resume, overwrite)
    ensure_shards(base, run=run_on_ray)  # once, before the trials: they all read the same shards
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, space=space, shards=shards, experiment=experiment),
        {"cpu": space.trial_cpus},
    )
    fs, path = storage.filesystem(experiment)
    fs_arg = None if isinstance(fs, pafs.LocalFileSystem) else fs
    if resume and tune.Tuner.can_restore(path, storage_filesystem=fs_arg):
        logger.info("resuming the sweep in %s", experiment)
        tuner = tune.Tuner.restore(
            path, trainable=trainable, resume_errored=True, storage_filesystem=fs_arg
        )
    else:
        tuner = _tuner(space, base, trainable, sweep_root, callbacks)
    grid = tuner.fit()
    # Tune catches the first SIGINT, saves the sweep, stops the running trials (they then read
    # TERMINATED) and returns normally; a trial that really ended (its last epoch, or stopped by
    # ASHA) has ``done`` in its last result. Exporting "the best" of a half-run sweep would pass a
    # partial answer off as the sweep's result.
    ended = sum(1 for r in grid if r.error or (r.metrics or {}).get("done"))
    unfinished = space.num_samples - ended
    if unfinished > 0:
        raise SweepInterruptedError(
            f"the sweep {name} stopped with {unfinished} of {space.num_samples} trials "
            f"unfinished; its state is saved in {experiment}: continue it with --resume"
        )
    return export_best(grid, space, sweep_root)


def _rows(grid: tune.ResultGrid, space: SweepSpace, experiment: str) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        config = {k: v for k, v in (result.config or {}).items() if k in space.params}
        history = result.metrics_dataframe
        best_val = (
            float(history[VAL_METRIC].max())
            if history is not None and VAL_METRIC in history
            else math.nan
        )
        trial = storage.basename(result.path)
        rows.append(
            {
                "trial": trial,
                **config,
                "best_val_CIDEr": best_val,
                "epochs": 0 if history is None else len(history),
                "status": "error" if result.error else "ok",
                "path": storage.join(experiment, trial),
            }
        )
    return rows


def _plot(rows: list[dict[str, Any]], space: SweepSpace, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    labels = [
        "\n".join(f"{k.rsplit('.', 1)[-1]}={_short(r.get(k))}" for k in space.params) for r in rows
    ]
    ax.bar(range(len(rows)), [r["best_val_CIDEr"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("best val CIDEr")
    ax.set_title(f"{title}: {len(rows)} trials")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def export_best(grid: tune.ResultGrid, space: SweepSpace, sweep_root: str) -> dict[str, Any]:
    """``results.csv``, ``trials.png`` and ``best/`` (checkpoint + ``trial.json``) in the sweep
    folder (a folder or a URI); ``best/`` is replaced atomically."""
    rows = _rows(grid, space, storage.join(sweep_root, EXPERIMENT))
    if not rows:
        raise RuntimeError(f"the sweep in {sweep_root} has no trials")
    table = storage.join(sweep_root, "results.csv")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(table, text.getvalue())
    png = storage.join(sweep_root, "trials.png")
    storage.write_bytes(png, _plot(rows, space, storage.basename(sweep_root)))

    scored = [r for r in rows if not math.isnan(r["best_val_CIDEr"])]
    if not scored:
        raise RuntimeError(f"no trial of {sweep_root} reported {VAL_METRIC}")
    winner = max(scored, key=lambda r: r["best_val_CIDEr"])
    # the trial's best checkpoint, kept by KeepBest even when ASHA stopped the trial
    best = storage.join(sweep_root, "best")
    storage.replace_tree(storage.join(winner["path"], "run", "runs", "best"), best)
    summary = {
        "trial": winner["trial"],
        "params": {k: winner[k] for k in space.params},
        VAL_METRIC: winner["best_val_CIDEr"],
        "trials": len(rows),
        "results": table,
        "plot": png,
        "best": best,
    }
    storage.write_text(storage.join(best, "trial.json"), json.dumps(summary, indent=1))
    logger.info("best trial %s: val CIDEr %.4f -> %s", winner["trial"], summary[VAL_METRIC], best)
    return summary


def _short(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)
