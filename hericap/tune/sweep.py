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
``TuneReportCallback``; the metric is val CIDEr. Sweeps live in ``outputs/<name>/sweep`` and
resume with :func:`run_sweep` ``(resume=True)`` (``Tuner.restore``: finished trials are not
rerun). At the end: ``results.csv``, ``trials.png`` and the best trial's checkpoint (its
``config.json`` included) in ``outputs/<name>/best/`` with ``trial.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from hericap.config.loader import ConfigError, load_config
from hericap.config.schema import Config
from hericap.data.catalog import ensure_shards, shard_dir
from hericap.training.driver import VAL_METRIC, train
from hericap.training.phases import configured_phases

__all__ = ["SweepInterruptedError", "SweepSpace", "export_best", "load_space", "run_sweep"]

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


class SweepInterruptedError(RuntimeError):
    """The sweep stopped before all its trials finished (Ctrl-C / SIGINT); its state is saved."""


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


def _example(spec: dict[str, list]) -> Any:
    return next(iter(spec.values()))[0]


def load_space(path: str | Path, extra_overrides: list[str] = ()) -> SweepSpace:
    """Read and check a space file: unknown keys, samplers or config keys are errors."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(raw) - SPACE_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(SPACE_KEYS)}")
    if not raw.get("params"):
        raise ConfigError(f"{path}: no params to search")
    space = SweepSpace(**raw)
    space.overrides = [*space.overrides, *extra_overrides]
    for key, spec in space.params.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{path}: {key}: give one sampler of {list(SAMPLERS)}, got {spec}")
    # every searched key is a config key of the right type (checked with a sample value)
    load_config(
        [f"preset={space.preset}", *space.overrides]
        + [f"{k}={_example(v)}" for k, v in space.params.items()]
    )
    return space


def _trial_config(space: SweepSpace, params: dict[str, Any], trial_dir: str, shards: str):
    return load_config(
        [
            f"preset={space.preset}",
            *space.overrides,
            *(f"{k}={v}" for k, v in params.items()),
            f"exp.output_dir={trial_dir}",
            "exp.name=run",
            f"dataset.shard_dir={shards}",
        ]
    )


def _trainable(params: dict[str, Any], space: SweepSpace, shards: str) -> None:
    """One trial: a Ray Train run whose epoch reports reach Tune (ASHA may stop it)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = _trial_config(space, params, tune.get_context().get_trial_dir(), shards)
    train(cfg, callbacks=[TuneReportCallback()])


def run_sweep(
    space: SweepSpace,
    name: str,
    output_dir: str = "outputs",
    resume: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the sweep ``name`` on the current Ray cluster; write the results table,
    the plot and the best trial's checkpoint.

    ``resume`` restores an interrupted sweep (Ctrl-C, a lost driver) with ``Tuner.restore``:
    finished trials keep their results, unfinished and errored ones run again, and the searcher
    draws the samples still missing. A sweep stopped before all ``num_samples`` trials finished
    raises :class:`SweepInterruptedError` instead of exporting a partial best."""
    sweep_root = Path(output_dir, name).resolve()
    experiment = sweep_root / "sweep"
    base = space.base_config()
    ensure_shards(base)  # once, before the trials: they all read the same shards
    shards = str(shard_dir(base).resolve())
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, space=space, shards=shards), {"cpu": space.trial_cpus}
    )
    if resume and tune.Tuner.can_restore(str(experiment)):
        logger.info("resuming the sweep in %s", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_errored=True)
    else:
        if experiment.exists():
            logger.warning("replacing the previous sweep in %s (--resume continues it)", experiment)
            shutil.rmtree(experiment)
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
        tuner = tune.Tuner(
            trainable,
            param_space=space.tune_space(),
            tune_config=tune.TuneConfig(
                search_alg=search, scheduler=scheduler, num_samples=space.num_samples
            ),
            run_config=tune.RunConfig(
                name="sweep",
                storage_path=str(sweep_root),
                verbose=1,
            ),
        )
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


def export_best(grid: tune.ResultGrid, space: SweepSpace, sweep_root: Path) -> dict[str, Any]:
    """``results.csv``, ``trials.png`` and ``best/`` (checkpoint + ``trial.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for result in grid:
        config = {k: v for k, v in (result.config or {}).items() if k in space.params}
        history = result.metrics_dataframe
        best_val = (
            float(history[VAL_METRIC].max())
            if history is not None and VAL_METRIC in history
            else math.nan
        )
        rows.append(
            {
                "trial": Path(result.path).name,
                **config,
                "best_val_CIDEr": best_val,
                "epochs": 0 if history is None else len(history),
                "status": "error" if result.error else "ok",
                "path": result.path,
            }
        )
    if not rows:
        raise RuntimeError(f"the sweep in {sweep_root} has no trials")
    table = sweep_root / "results.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    labels = [
        "\n".join(f"{k.rsplit('.', 1)[-1]}={_short(r.get(k))}" for k in space.params) for r in rows
    ]
    ax.bar(range(len(rows)), [r["best_val_CIDEr"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("best val CIDEr")
    ax.set_title(f"{sweep_root.name}: {len(rows)} trials")
    fig.tight_layout()
    png = sweep_root / "trials.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)

    scored = [r for r in rows if not math.isnan(r["best_val_CIDEr"])]
    if not scored:
        raise RuntimeError(f"no trial of {sweep_root} reported {VAL_METRIC}")
    winner = max(scored, key=lambda r: r["best_val_CIDEr"])
    # the trial's best checkpoint, kept by KeepBest even when ASHA stopped the trial
    source = Path(winner["path"]) / "run" / "runs" / "best"
    best = sweep_root / "best"
    if best.exists():
        shutil.rmtree(best)
    shutil.copytree(source, best)
    summary = {
        "trial": winner["trial"],
        "params": {k: winner[k] for k in space.params},
        VAL_METRIC: winner["best_val_CIDEr"],
        "trials": len(rows),
        "results": str(table),
        "plot": str(png),
        "best": str(best),
    }
    (best / "trial.json").write_text(json.dumps(summary, indent=1))
    logger.info("best trial %s: val CIDEr %.4f -> %s", winner["trial"], summary[VAL_METRIC], best)
    return summary


def _short(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)
