"""Where a training run's checkpoints live (a local folder or a URI such as S3), which ones are
kept, and what happens to a previous run of the same name.

Ray Train keeps the last ``optimizer.checkpoint_num_to_keep`` checkpoints of the run (by time:
the latest is what a run resumes from). The best ones by val CIDEr must survive that rotation,
so :class:`KeepBest`, a Ray Train callback on the controller, copies each new best aside as it is
reported: ``<storage>/best`` (over the whole run) and ``<storage>/best_xe`` (over XE epochs, the
comparison point for SCST). A kept best is replaced atomically (:func:`storage.replace_tree`: the
new copy is complete before the old one goes). After a resume it reads the kept scores back.

A previous run of the same name is never deleted by default (:func:`claim_run`): continuing it
takes ``exp.resume=True``, replacing it ``exp.overwrite=True``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import ray.train

from hericap.config.schema import Config
from hericap.data import storage

__all__ = [
    "KEPT_BEST",
    "RUN_NAME",
    "RUN_OUTPUTS",
    "KeepBest",
    "RunExistsError",
    "RunStorage",
    "claim_run",
    "storage_location",
]

logger = logging.getLogger(__name__)

RUN_NAME = "train"  # Ray's run folder under the storage path
# kept-best folder -> the phase kind it is chosen from (None: any)
KEPT_BEST: dict[str, str | None] = {"best": None, "best_xe": "xe"}
# what a run (and `hericap train` / `eval` after it) writes into its run folder
RUN_OUTPUTS = (
    "best",
    "best_xe",
    "latest",
    "xe",
    "metrics.csv",
    "steps.csv",
    "tensorboard",
    "curves.png",
    "test_results.json",
    "test_scores.json",
    "val_results.json",
    "val_scores.json",
)


class RunExistsError(FileExistsError):
    """A run of this name already has outputs and the config neither resumes nor overwrites
    it."""


@dataclass(frozen=True)
class RunStorage:
    """A storage location: its pyarrow filesystem, the path within it, and the location."""

    fs: pafs.FileSystem
    path: str
    remote: bool
    base: str

    @classmethod
    def at(cls, location: str) -> RunStorage:
        base = storage.resolve(location)
        fs, path = storage.filesystem(base)
        return cls(fs, path, not isinstance(fs, pafs.LocalFileSystem), base)

    def join(self, name: str) -> str:
        """``name``'s path within :attr:`fs`."""
        return f"{self.path.rstrip('/')}/{name}"

    def location(self, name: str) -> str:
        """``name``'s location (a path or a URI)."""
        return storage.join(self.base, name)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.join(name)).type != pafs.FileType.NotFound

    def delete(self, name: str) -> None:
        storage.delete_tree(self.join(name), fs=self.fs)

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(self.join(name)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None


def storage_location(cfg: Config) -> str:
    """``exp.storage_path``, else ``<run_dir>/runs``."""
    return storage.resolve(cfg.exp.storage_path or storage.join(cfg.run_dir, "runs"))


def _previous_outputs(cfg: Config, runs: RunStorage) -> list[str]:
    names = [RUN_NAME, *KEPT_BEST]
    found = [runs.location(n) for n in names if runs.exists(n)]
    run_dir = storage.resolve(cfg.run_dir)
    found += [
        storage.join(run_dir, n) for n in RUN_OUTPUTS if storage.exists(storage.join(run_dir, n))
    ]
    return found


def claim_run(cfg: Config) -> RunStorage:
    """The run's storage, after making sure no previous run of the same name is lost: with
    ``exp.resume`` the run continues it; with ``exp.overwrite`` its checkpoints, kept best and
    run-folder outputs are deleted first; with neither, its existence is an error.

    Raises:
        RunExistsError: a previous run's outputs exist and neither flag is set.
    """
    runs = RunStorage.at(storage_location(cfg))
    if cfg.exp.resume:
        return runs
    found = _previous_outputs(cfg, runs)
    if found and not cfg.exp.overwrite:
        raise RunExistsError(
            f"a run named '{cfg.exp.name}' already has outputs ({', '.join(found[:4])}"
            f"{' ...' if len(found) > 4 else ''}): continue it with exp.resume=True, delete them "
            "and start over with exp.overwrite=True, or choose another exp.name"
        )
    for location in found:
        logger.warning("exp.overwrite=True: deleting %s", location)
        storage.delete_tree(location)
    return runs


class KeepBest(ray.train.UserCallback):
    """Copies each reported checkpoint that beats the kept best (by ``metric``) aside, per
    :data:`KEPT_BEST`, replacing the previous one atomically. Checkpoints without the metric
    (mid-epoch ones) are never candidates."""

    def __init__(self, storage_: RunStorage, metric: str) -> None:
        self.storage = storage_
        self.metric = metric
        self._scores: dict[str, float | None] = {}

    def _kept_score(self, name: str) -> float | None:
        if name not in self._scores:
            # a replacement a crash cut short; the storage's own filesystem (this process, the
            # Train controller, may lack the endpoint and credentials in its environment)
            storage.recover_tree(self.storage.join(name), fs=self.storage.fs)
            meta = self.storage.read_json(f"{name}/meta.json")
            self._scores[name] = meta.get(self.metric) if meta else None
        return self._scores[name]

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: ray.train.Checkpoint | None,
    ) -> None:
        if checkpoint is None or not metrics or self.metric not in metrics[0]:
            return
        score, kind = metrics[0][self.metric], metrics[0].get("phase")
        for name, wanted_kind in KEPT_BEST.items():
            if wanted_kind is not None and kind != wanted_kind:
                continue
            kept = self._kept_score(name)
            if kept is not None and score <= kept:
                continue
            storage.replace_tree(
                checkpoint.path,
                self.storage.join(name),
                source_fs=checkpoint.filesystem,
                fs=self.storage.fs,
            )
            self._scores[name] = score
            logger.info("%s: epoch %s, %s %.4f", name, metrics[0].get("epoch"), self.metric, score)
