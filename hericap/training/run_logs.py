"""A run's metrics as files: CSV tables, TensorBoard event files and PNG curves (no Ray).

Every checkpoint carries the run's epoch metrics (``history``) and the optimiser-step log
(``steps``, every ``exp.log_every_steps``-th step on rank 0). :func:`write_run_logs` turns them
into ``metrics.csv``, ``steps.csv`` and ``tensorboard/`` in the run folder; :func:`plot_run`
draws ``curves.png`` from the CSVs (``hericap plot RUN_DIR``).
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hericap.data import storage

__all__ = ["plot_run", "read_csv", "write_csv", "write_run_logs"]

logger = logging.getLogger(__name__)

# epoch metrics drawn as TensorBoard scalars (tag "epoch/<name>")
_EPOCH_SCALARS = (
    "train_loss",
    "val_CIDEr",
    "val_distinct_2",
    "val_unique_share",
    "train_reward",
    "lr",
    "lr_backbone",
    "epoch_s",
)
# step-log fields drawn as TensorBoard scalars (tag "step/<name>")
_STEP_SCALARS = ("loss", "lr", "lr_backbone", "grad_norm", "reward")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` as CSV; the header is every key in first-seen order (SCST adds columns)."""
    if not rows:
        return
    with path.open("w", newline="") as f:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by :func:`write_csv` (a local path or a URI), numbers parsed back
    (empty cells: None)."""

    def parse(value: str) -> Any:
        if value == "":
            return None
        try:
            return float(value)
        except ValueError:
            return value

    text = io.StringIO(storage.read_text(path), newline="")
    return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(text)]


def write_run_logs(
    run_dir: str | Path,
    history: Sequence[dict[str, Any]],
    steps: Sequence[dict[str, Any]],
    tensorboard: bool = True,
) -> dict[str, Path]:
    """Write ``metrics.csv`` (one row per epoch), ``steps.csv`` and, with ``tensorboard``,
    TensorBoard event files (``tensorboard/``, rewritten whole) into ``run_dir``; returns what
    was written."""
    run_dir = Path(run_dir)
    out = {"metrics": run_dir / "metrics.csv", "steps": run_dir / "steps.csv"}
    write_csv(out["metrics"], history)
    write_csv(out["steps"], steps)
    if not tensorboard:
        return out
    from torch.utils.tensorboard import SummaryWriter

    tb_dir = run_dir / "tensorboard"
    if tb_dir.exists():
        shutil.rmtree(tb_dir)
    with SummaryWriter(log_dir=str(tb_dir)) as writer:
        for row in history:
            for name in _EPOCH_SCALARS:
                if isinstance(row.get(name), (int, float)):
                    writer.add_scalar(f"epoch/{name}", row[name], global_step=int(row["step"]))
        for row in steps:
            for name in _STEP_SCALARS:
                if isinstance(row.get(name), (int, float)):
                    writer.add_scalar(f"step/{name}", row[name], global_step=int(row["step"]))
    out["tensorboard"] = tb_dir
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> str:
    """Draw loss, val CIDEr, SCST reward and learning rate against optimiser steps from the
    run's CSVs into ``out`` (default ``RUN_DIR/curves.png``; folders or URIs).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``metrics.csv``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = storage.resolve(run_dir)
    metrics, steps_csv = storage.join(run_dir, "metrics.csv"), storage.join(run_dir, "steps.csv")
    if not storage.exists(metrics):
        raise FileNotFoundError(
            f"{metrics} not found: is {run_dir} a training run folder (outputs/<exp.name>)?"
        )
    epochs = read_csv(metrics)
    steps = read_csv(steps_csv) if storage.exists(steps_csv) else []

    def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [
        (axes[0, 0], "loss", [(steps, "loss", "per step"), (epochs, "train_loss", "epoch mean")]),
        (axes[0, 1], "val CIDEr-D", [(epochs, "val_CIDEr", "val")]),
        (
            axes[1, 0],
            "SCST reward",
            [(steps, "reward", "per step"), (epochs, "train_reward", "epoch mean")],
        ),
        (
            axes[1, 1],
            "learning rate",
            [(steps or epochs, "lr", "head"), (steps or epochs, "lr_backbone", "backbone")],
        ),
    ]
    for ax, title, lines in panels:
        drawn = False
        for rows, key, label in lines:
            x, y = series(rows, key)
            if x:
                ax.plot(x, y, marker="o" if rows is epochs else None, markersize=3, label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{storage.basename(run_dir)}: {len(epochs)} epochs")
    path = storage.resolve(out) if out else storage.join(run_dir, "curves.png")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())
    logger.info("wrote %s", path)
    return path
