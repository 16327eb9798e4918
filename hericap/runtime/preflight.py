"""Checks a config passes before anything starts: no Ray, no data, no workers.

:meth:`Config.validate <hericap.config.schema.Config.validate>` checks each value on its own and
the fields that must agree; this adds what needs the registries one layer up: the dataset name
(the readers), every location's form and the weight files' existence, and the model section,
built on PyTorch's ``meta`` device (no memory, no weights read) so that whatever the builder
would refuse inside a Ray worker (an unknown decoder variant, layer type, stem or activation, a
head count that does not divide a width) is refused here, with the image canvas checked against
the model's coarsest stride. The cluster-side checks (resources, locations every node can read)
are :mod:`hericap.runtime.cluster`'s. Nothing here imports Ray.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os

import torch

from hericap.config.checks import check_training
from hericap.config.loader import ConfigError, from_dict, to_dict
from hericap.config.schema import MLFLOW_MODES, Config
from hericap.data import storage
from hericap.data.readers import READERS
from hericap.data.transforms import resize_spec

__all__ = [
    "DATASETS",
    "check_config",
    "check_tracking",
    "local_tracking_store",
    "location_keys",
    "weight_files",
]

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", *READERS)
# configs that passed (their JSON): training checks at the CLI and again in `train`
_PASSED: set[str] = set()


def location_keys(cfg: Config) -> dict[str, str | None]:
    """Every config key that names a location, with its value."""
    return {
        "exp.output_dir": cfg.exp.output_dir,
        "exp.storage_path": cfg.exp.storage_path,
        "exp.checkpoint": cfg.exp.checkpoint,
        "dataset.root": cfg.dataset.root,
        "dataset.shard_dir": cfg.dataset.shard_dir,
        **weight_files(cfg),
    }


def weight_files(cfg: Config) -> dict[str, str | None]:
    """The backbone / detector weight files a training run starts from."""
    return {
        "model.extractor.checkpoint": cfg.model.extractor.checkpoint,
        "model.detector.checkpoint": cfg.model.detector.checkpoint,
    }


@functools.lru_cache(maxsize=64)
def _coarsest_stride(model_json: str, model_size: int | tuple[int, int]) -> int:
    """Build the model section on the meta device (cached: a sweep's trials share models);
    returns its coarsest stride."""
    from hericap.models.builder import build_captioner

    model_cfg = from_dict({"model": json.loads(model_json)}).model
    try:
        with torch.device("meta"):
            model = build_captioner(model_cfg, 16, model_size, load_pretrained=False)
    except (ValueError, TypeError, AssertionError, RuntimeError, KeyError) as e:
        raise ConfigError(f"the model section cannot be built: {e}") from e
    return model.input_multiple


def local_tracking_store(cfg: Config) -> bool:
    """Whether the run's MLflow runs go to the local store under ``exp.output_dir`` (MLflow
    tracking on, no ``$MLFLOW_TRACKING_URI``)."""
    return _local_store(cfg.exp.tracking)


def _local_store(mode: str) -> bool:
    return mode in MLFLOW_MODES and not os.environ.get("MLFLOW_TRACKING_URI")


def check_tracking(mode: str, output_dir: str, where: str = "exp.output_dir") -> None:
    """MLflow tracking (``mode`` mlflow|both) needs MLflow installed, and a store:
    ``$MLFLOW_TRACKING_URI`` or a local folder (``<output_dir>/mlruns``, so not under a URI
    ``output_dir``; ``where`` names the setting that gave it). Runs and sweeps share it."""
    if mode not in MLFLOW_MODES:
        return
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"exp.tracking={mode} needs MLflow: pip install 'hericap[tracking]' "
            "(mlflow-skinny), or exp.tracking=tensorboard"
        )
    if _local_store(mode) and storage.is_uri(output_dir):
        raise ConfigError(
            f"exp.tracking={mode} keeps MLflow's local store in <{where}>/mlruns, a folder, "
            f"but {where}={output_dir} is a URI: set $MLFLOW_TRACKING_URI to a tracking "
            "server, or exp.tracking=tensorboard"
        )


def _check_model(cfg: Config) -> None:
    """Build the model on the meta device; refuse a canvas the coarsest stride does not divide."""
    model_json = json.dumps(to_dict(cfg)["model"], sort_keys=True)
    stride = _coarsest_stride(model_json, resize_spec(cfg.dataset).model_size)
    sides = {"dataset.image_size": cfg.dataset.image_size}
    if cfg.dataset.resize != "square":
        sides = {"dataset.min_size": cfg.dataset.min_size, "dataset.max_size": cfg.dataset.max_size}
    bad = {k: v for k, v in sides.items() if v % stride}
    if bad:
        raise ConfigError(
            f"{bad} must be multiples of the model's coarsest stride {stride} (patch_size "
            f"{cfg.model.extractor.patch_size} x 2 per stage after the first"
            f"{', x 2 for the extra stage' if cfg.model.extractor.extra_stage_dim else ''})"
        )


def check_config(cfg: Config, need_weights: bool = True, training: bool = True) -> None:
    """Everything about ``cfg`` that can be checked without Ray, data or workers.

    Args:
        cfg: the config.
        need_weights: the run loads ``model.extractor.checkpoint`` / ``model.detector.checkpoint``
            (a new training run; False for a checkpoint's own config, which never reads them).
        training: the config trains (some epochs, XE before SCST); False for evaluation.

    Raises:
        ConfigError: a value the run would fail on, with what to change.
        FileNotFoundError: a weight file the run needs does not exist.
    """
    key = json.dumps(to_dict(cfg), sort_keys=True) + str((need_weights, training))
    if key in _PASSED:
        return
    try:
        cfg.validate()
        if training:
            check_training(cfg.optimizer)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.dataset.name not in DATASETS:
        raise ConfigError(f"dataset.name={cfg.dataset.name!r}; known: {list(DATASETS)}")
    for name, location in location_keys(cfg).items():
        if location is not None:
            try:
                storage.check_location(location, name)
            except ValueError as e:
                raise ConfigError(str(e)) from e
    if training:
        check_tracking(cfg.exp.tracking, cfg.exp.output_dir)
    if need_weights:
        for name, location in weight_files(cfg).items():
            if location and not storage.exists(location):
                raise FileNotFoundError(f"{name}={location} not found")
    _check_model(cfg)
    _PASSED.add(key)
