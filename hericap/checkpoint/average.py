"""Averaging checkpoints into one (``hericap average CKPT... --out DIR``), strictly.

The average of the weights of several checkpoints of one run (the last epochs, say) often scores
better than any of them. It only means something for checkpoints of the same model trained the
same way, so nothing is averaged unless the checkpoints have the same config (keys that only say
where and in how many invocations a run ran, :data:`PLACEMENT_KEYS`, may differ; others only when
named in ``allow_different``), the same vocabulary and the same weight names, shapes and dtypes;
otherwise the error lists every difference. Floating-point weights are averaged in float64;
integer ones must be equal. The result is a normal checkpoint folder (no training state: it is
evaluated, served or fine-tuned with ``exp.checkpoint``, not resumed) whose ``meta.json`` lists
its sources.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from hericap.checkpoint.folder import (
    META_FILE,
    read_config_and_vocab,
    read_model_state,
    save_checkpoint,
)
from hericap.config.loader import to_dict
from hericap.data import storage
from hericap.models.weights import diff_state

__all__ = ["PLACEMENT_KEYS", "average_checkpoints", "config_differences"]

logger = logging.getLogger(__name__)

# Config keys that say where and how a run was executed, not what it learnt: a run resumed
# with exp.resume=True, or on another cluster, averages with its earlier checkpoints.
PLACEMENT_KEYS = frozenset(
    {
        "exp.output_dir",
        "exp.storage_path",
        "exp.resume",
        "exp.ray_address",
        "exp.ray_num_cpus",
        "exp.epochs_per_run",
        "exp.steps_per_run",
        "exp.checkpoint_every_steps",
        "exp.max_failures",
        "exp.log_every_steps",
        "exp.torch_threads",
        "exp.cpus_per_worker",
    }
)
# Differences listed per checkpoint in an error (the rest are counted).
MAX_LISTED = 20


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(
    first: dict[str, Any], other: dict[str, Any], allow_different: Sequence[str] = ()
) -> list[str]:
    """``key: first value != other value`` for every config key that differs, except
    :data:`PLACEMENT_KEYS` and keys under an ``allow_different`` entry (a key or a group)."""

    def allowed(key: str) -> bool:
        return key in PLACEMENT_KEYS or any(
            key == a or key.startswith(a.rstrip(".") + ".") for a in allow_different
        )

    a, b = _flat(first), _flat(other)
    return [
        f"{k}: {a.get(k)!r} != {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not allowed(k)
    ]


def _state_differences(first: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> list:
    diff = diff_state(first, other)
    problems = [] if diff.clean else [diff.describe(limit=MAX_LISTED)]
    problems += [
        f"{k}: dtype {other[k].dtype} != {first[k].dtype}"
        for k in sorted(set(first) & set(other))
        if other[k].dtype != first[k].dtype
    ]
    return problems


def _check_compatible(
    paths: list[str], allow_different: Sequence[str]
) -> tuple[Any, Any, list[dict[str, torch.Tensor]]]:
    """(config, vocabulary, states) of the first checkpoint and all states, after checking that
    every checkpoint matches the first; the error lists every difference found."""
    config, vocab = read_config_and_vocab(paths[0])
    states = [read_model_state(paths[0])]
    problems: list[str] = []
    for path in paths[1:]:
        other_config, other_vocab = read_config_and_vocab(path)
        state = read_model_state(path)
        found = config_differences(to_dict(config), to_dict(other_config), allow_different)
        if other_vocab != vocab:
            found.append(f"vocabulary: {len(other_vocab)} words != {len(vocab)} (or another order)")
        found += _state_differences(states[0], state)
        if found:
            listed = found[:MAX_LISTED]
            more = f" (+{len(found) - MAX_LISTED} more)" if len(found) > MAX_LISTED else ""
            problems.append(f"{path} differs from {paths[0]}: " + "; ".join(listed) + more)
        states.append(state)
    if problems:
        raise ValueError(
            "checkpoints that differ are not averaged:\n  "
            + "\n  ".join(problems)
            + "\nAverage checkpoints of one run, or name config keys that may differ with "
            "--allow-different KEY (e.g. exp.seed for runs started from one exp.checkpoint)"
        )
    return config, vocab, states


def _mean(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Floating-point entries averaged in float64 (cast back); other entries must be equal."""
    out: dict[str, torch.Tensor] = {}
    unequal = []
    for key, first in states[0].items():
        if first.is_floating_point():
            total = torch.zeros(first.shape, dtype=torch.float64)
            for state in states:
                total += state[key].to(torch.float64)
            out[key] = (total / len(states)).to(first.dtype)
        elif all(torch.equal(first, state[key]) for state in states[1:]):
            out[key] = first.clone()
        else:
            unequal.append(key)
    if unequal:
        raise ValueError(
            f"integer weights differ between the checkpoints and cannot be averaged: "
            f"{unequal[:MAX_LISTED]}"
        )
    return out


def _source(path: str) -> dict[str, Any]:
    try:
        meta = json.loads(storage.read_text(storage.join(path, META_FILE)))
    except FileNotFoundError:
        meta = {}
    keys = ("phase", "phase_name", "epoch", "step", "val_CIDEr", "ema_decay")
    return {"path": path, **{k: meta.get(k) for k in keys if k in meta}}


def average_checkpoints(
    checkpoints: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    allow_different: Sequence[str] = (),
) -> str:
    """Write the average of ``checkpoints`` as a checkpoint folder at ``out``.

    Raises:
        ValueError: fewer than two checkpoints, ``out`` is not empty, or they differ (listed).
        FileNotFoundError: one is not a checkpoint folder.
    """
    paths = [storage.resolve(c) for c in checkpoints]  # folders or URIs
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(paths)}")
    if len(set(paths)) != len(paths):
        raise ValueError("a checkpoint is named twice; each counts once in the average")
    out = storage.resolve(out)
    if storage.listdir(out):
        raise ValueError(f"--out {out} is not empty; choose a new folder")
    config, vocab, states = _check_compatible(paths, allow_different)
    sources = [_source(p) for p in paths]
    emas = {s.get("ema_decay") for s in sources}
    meta = {
        "averaged_from": sources,
        "phase": sources[0].get("phase") if len({s.get("phase") for s in sources}) == 1 else None,
        "ema_decay": emas.pop() if len(emas) == 1 else None,
        "allowed_differences": list(allow_different),
    }
    save_checkpoint(out, _mean(states), config, vocab, meta)
    logger.info("averaged %d checkpoints into %s", len(paths), out)
    return out
