"""Experiment tracking: which dashboards a run writes (``exp.tracking``), and its MLflow run.

* ``tensorboard`` (default): event files under ``<run>/tensorboard`` (:mod:`run_logs`).
* ``mlflow``: one MLflow run per training run, logged live by rank 0: the config as parameters,
  every ``exp.log_every_steps``-th step's loss / learning rates / gradient norm / SCST reward and
  every epoch's metrics as metrics (the same names as the TensorBoard tags), then the curves, the
  test scores and the best checkpoint's config as artefacts. A resumed run continues its MLflow
  run. The store is ``$MLFLOW_TRACKING_URI`` when set, else a local file store under
  ``<exp.output_dir>/mlruns`` (on a multi-node cluster, point the variable at a tracking server
  or shared storage: a worker writes to its own machine's disk otherwise).
* ``both``: the two; ``none``: only the CSVs every run writes.

Sweeps log one MLflow run per trial under an experiment named after the sweep, through Ray
Tune's ``MLflowLoggerCallback`` (:mod:`hericap.tune.sweep`). Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hericap.config.schema import MLFLOW_MODES, TRACKING_MODES

__all__ = [
    "TRACKING_MODES",
    "MlflowRun",
    "file_store_opt_in",
    "flat_params",
    "log_run_outputs",
    "numeric_metrics",
    "tracking_uri",
    "uses_mlflow",
    "uses_tensorboard",
]

logger = logging.getLogger(__name__)

# the local store's folder under exp.output_dir
LOCAL_STORE = "mlruns"
# MLflow 3 keeps its file store in maintenance mode and refuses it unless this is set; a local
# folder of runs is what the default asks for (a database or a server: $MLFLOW_TRACKING_URI)
FILE_STORE_OPT_IN = "MLFLOW_ALLOW_FILE_STORE"
# what MLflow accepts per log_batch call
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_CHARS = 6000


def uses_mlflow(mode: str) -> bool:
    return mode in MLFLOW_MODES


def uses_tensorboard(mode: str) -> bool:
    return mode in ("tensorboard", "both")


def tracking_uri(output_dir: str) -> str:
    """``$MLFLOW_TRACKING_URI``, else the local file store ``<output_dir>/mlruns`` (absolute, so
    the driver and the workers of one machine agree)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from hericap.data import storage

    if storage.is_uri(output_dir):  # the config checks refuse this before anything starts
        raise ValueError(
            f"MLflow's local store needs a folder, not {output_dir}: set $MLFLOW_TRACKING_URI"
        )
    return Path(output_dir, LOCAL_STORE).resolve().as_uri()


def file_store_opt_in(uri: str) -> None:
    """Let MLflow 3 open a local file store (``file:`` URIs) in this process."""
    if uri.startswith("file:"):
        os.environ.setdefault(FILE_STORE_OPT_IN, "true")


def log_run_outputs(
    uri: str,
    run_id: str,
    files: Mapping[str, str],
    metrics: Mapping[str, float] | None = None,
    step: int = 0,
) -> list[str]:
    """Add a finished training run's outputs to its MLflow run (``files``: artefact name ->
    location, missing ones skipped; ``metrics``: e.g. the test scores) and mark it finished.
    Returns the artefact names logged."""
    run = MlflowRun(uri, experiment="", run_name="", run_id=run_id)
    logged = run.log_files(files)
    if metrics:
        run.log_metrics(metrics, step)
    run.end()
    logger.info("MLflow run %s: logged %s", run_id, ", ".join(logged) or "no files")
    return logged


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: dotted keys, values as strings."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:_MAX_PARAM_CHARS]
    return out


def numeric_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of ``values`` (booleans as 0/1), keys prefixed."""
    out = {}
    for key, value in values.items():
        # booleans are ints: they log as 0 / 1
        if isinstance(value, int | float) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class MlflowRun:
    """One MLflow run through ``MlflowClient`` (explicit ids, no process-global active run).

    Args:
        uri: the tracking URI.
        experiment: experiment name (created when missing).
        run_name: the run's name.
        run_id: continue this run (a resumed training run) instead of creating one.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None) -> None:
        file_store_opt_in(uri)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        logger.info("MLflow run %s (experiment %s) in %s", self.run_id, experiment, uri)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for chunk in _chunks(items, _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for chunk in _chunks(items, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_files(self, files: Mapping[str, str], artifact_path: str | None = None) -> list[str]:
        """Log files (local paths or URIs, by the artefact name they take) as artefacts; the
        ones that do not exist are skipped. Returns the names logged."""
        from hericap.data import storage

        logged = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, location in files.items():
                if not storage.exists(location) or storage.is_dir(location):
                    continue
                local = Path(tmp, name)
                local.write_bytes(storage.read_bytes(location))
                self.client.log_artifact(self.run_id, str(local), artifact_path=artifact_path)
                logged.append(name)
        return logged

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
