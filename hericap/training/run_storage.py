"""Where a training run's checkpoints live (a local folder or S3), and which ones are kept.

Ray Train keeps the last ``optimizer.checkpoint_num_to_keep`` checkpoints of the run (by time:
the latest is what a run resumes from). The best ones by val CIDEr must survive that rotation,
so :class:`KeepBest`, a Ray Train callback on the controller, copies each new best aside as it is
reported: ``<storage>/best`` (over the whole run) and ``<storage>/best_xe`` (over XE epochs, the
comparison point for SCST). After a resume it reads the kept scores back from storage.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train

from hericap.data.storage import filesystem, is_s3

__all__ = ["KEPT_BEST", "RUN_NAME", "KeepBest", "RunStorage"]

logger = logging.getLogger(__name__)

RUN_NAME = "train"  # Ray's run folder under the storage path
# kept-best folder -> the phase kind it is chosen from (None: any)
KEPT_BEST: dict[str, str | None] = {"best": None, "best_xe": "xe"}


@dataclass(frozen=True)
class RunStorage:
    """A storage location: its pyarrow filesystem and the path within it."""

    fs: pafs.FileSystem
    path: str
    remote: bool

    @classmethod
    def at(cls, location: str) -> RunStorage:
        fs, path = filesystem(location)
        return cls(fs, path, is_s3(location))

    def join(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def location(self, name: str) -> str:
        return f"s3://{self.join(name)}" if self.remote else self.join(name)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.join(name)).type != pafs.FileType.NotFound

    def delete(self, name: str) -> None:
        if self.exists(name):
            self.fs.delete_dir(self.join(name))

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            with self.fs.open_input_stream(self.join(name)) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def fetch(self, name: str, local: Path) -> Path | None:
        """A fresh local copy of folder ``name`` at ``local``; None when there is none."""
        if not self.exists(name):
            return None
        return self._copy_out(self.fs, self.join(name), local)

    def fetch_checkpoint(self, checkpoint: ray.train.Checkpoint, local: Path) -> Path:
        return self._copy_out(checkpoint.filesystem, checkpoint.path, local)

    @staticmethod
    def _copy_out(fs: pafs.FileSystem, path: str, local: Path) -> Path:
        if local.exists():
            shutil.rmtree(local)
        local.mkdir(parents=True)
        pafs.copy_files(
            path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        return local


class KeepBest(ray.train.UserCallback):
    """Copies each reported checkpoint that beats the kept best (by ``metric``) aside, per
    :data:`KEPT_BEST`. Checkpoints without the metric (mid-epoch ones) are never candidates."""

    def __init__(self, storage: RunStorage, metric: str) -> None:
        self.storage = storage
        self.metric = metric
        self._scores: dict[str, float | None] = {}

    def _kept_score(self, name: str) -> float | None:
        if name not in self._scores:
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
            self.storage.delete(name)
            self.storage.fs.create_dir(self.storage.join(name), recursive=True)
            pafs.copy_files(
                checkpoint.path,
                self.storage.join(name),
                source_filesystem=checkpoint.filesystem,
                destination_filesystem=self.storage.fs,
            )
            self._scores[name] = score
            logger.info("%s: epoch %s, %s %.4f", name, metrics[0].get("epoch"), self.metric, score)
