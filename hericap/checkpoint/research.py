"""``hericap import``: research checkpoints (GRIT, HierCap) -> HeriCap checkpoint folders.

Accepted files (read with weights_only and an allow-list, :mod:`hericap.models.safe_load`):

* caption checkpoints as the research ``train_caption.py`` saves them: ``{state_dict,
  optim_model, optim_backbone, scores, best_ciders, epoch, exp_name, scheduler}`` (only
  ``state_dict`` and ``epoch`` are used: a HeriCap run starts its own optimiser);
* detector checkpoints as GRIT's detector training saves them (``region_ckpt.pth``):
  ``{epoch, model, optimizer, scheduler, epoch_res, args}``; the captioning side then starts
  fresh (and is reported so).

The result is a normal checkpoint folder (:func:`~hericap.checkpoint.folder.save_checkpoint`)
in the ``grit`` or ``hiercap`` flavour: config, the vocabulary file as given, weights, and
``meta.json`` naming the source file (SHA-256) and the research commit the mapping matches.
Every source key is mapped or dropped with a reason (:mod:`hericap.models.research_keys`);
unknown keys, missing weights and shape mismatches are errors that list the keys.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.models.swin_transformer import get_relative_position_index
from torch import nn

from hericap.checkpoint.folder import VOCAB_FILE, save_checkpoint
from hericap.checkpoint.research_config import research_config
from hericap.data import storage
from hericap.data.text import Vocabulary
from hericap.data.transforms import resize_spec
from hericap.models.builder import build_captioner
from hericap.models.research_keys import KeyMapping, map_research_keys
from hericap.models.safe_load import load_tensor_file
from hericap.models.weights import diff_state

__all__ = [
    "RESEARCH_SOURCES",
    "ImportReport",
    "checkpoint_state",
    "import_research_checkpoint",
    "plan_weights",
]

logger = logging.getLogger(__name__)

# The research code each flavour reproduces: repository and the commit the key mapping and the
# oracle (../shared/realdata/research_checkpoints) were made from.
RESEARCH_SOURCES = {
    "grit": {"repo": "davidnvq/grit", "commit": "4664d69fc0b01a5459cfae73f1fd68045ce1a6ea"},
    "hiercap": {
        "repo": "Panlizhi/HierCap",
        "commit": "dd758e7a343b4c33d9043d1ac99dfbf9584c10d4",
    },
}
# Keys of a detector-only checkpoint, which the captioner keeps under ``detector.``.
_DETECTOR_PARTS = ("backbone.", "input_proj.", "det_module.")
# Where detector weights go in the captioner: anything else starts fresh in a detector import.
_DETECTOR_BRANCHES = ("extractor.", "region_encoder.")


@dataclass
class ImportReport:
    """What an import did: the folder, the source's kind and hash, and every key's fate."""

    out: str  # the checkpoint folder or URI
    kind: str
    sha256: str
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "kind": self.kind,
            "sha256": self.sha256,
            "mapped": len(self.mapped),
            "dropped": dict(Counter(self.dropped.values())),
            "fresh": len(self.fresh),
        }


def checkpoint_state(obj: object, source: str) -> tuple[str, dict[str, torch.Tensor], int]:
    """``(kind, tensors under captioner keys, epoch)`` of a loaded research checkpoint.

    Raises:
        ValueError: neither a research caption nor a detector checkpoint.
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source} is not a research checkpoint (a dict)")
    epoch = int(obj.get("epoch", 0) or 0)
    if isinstance(obj.get("state_dict"), Mapping):
        return "caption", dict(obj["state_dict"]), epoch
    model = obj.get("model")
    if isinstance(model, Mapping) and all(k.startswith(_DETECTOR_PARTS) for k in model):
        return "detector", {f"detector.{k}": v for k, v in model.items()}, epoch
    raise ValueError(
        f"{source}: expected a research caption checkpoint (a 'state_dict' entry) or a GRIT "
        f"detector checkpoint (a 'model' entry with {list(_DETECTOR_PARTS)} keys); found "
        f"{sorted(obj)[:10]}"
    )


def _check_position_index(state: Mapping[str, torch.Tensor]) -> None:
    """The dropped ``relative_position_index`` buffers must be the standard ones timm builds."""
    for key, value in state.items():
        if not key.endswith("relative_position_index") or value.is_meta:
            continue
        side = math.isqrt(value.shape[0])
        if side * side != value.shape[0] or not torch.equal(
            value, get_relative_position_index(side, side)
        ):
            raise ValueError(f"{key} is not the standard relative position index of a window")


def plan_weights(
    model_state: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    mapping: KeyMapping,
    kind: str,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's weights from a research state: ``(mapped tensors, fresh keys)``.

    Fresh keys (left at their initial values) exist only for a detector checkpoint, outside the
    extractor and region encoder. Works on meta tensors (shapes only).

    Raises:
        RuntimeError: unknown source keys, two sources for one weight, missing weights or shape
            mismatches, each listed.
    """
    targets = Counter(mapping.mapped.values())
    twice = sorted(k for k, n in targets.items() if n > 1)
    ours = {target: state[source] for source, target in mapping.mapped.items()}
    diff = diff_state(dict(model_state), ours)
    fresh = [k for k in diff.missing if kind == "detector" and not k.startswith(_DETECTOR_BRANCHES)]
    missing = [k for k in diff.missing if k not in fresh]
    if mapping.unknown or twice or missing or diff.unexpected or diff.mismatched:
        raise RuntimeError(
            "the research checkpoint does not fit the model: unknown keys "
            f"({len(mapping.unknown)}) {mapping.unknown[:20]}; mapped twice {twice[:20]}; "
            f"missing ({len(missing)}) {missing[:20]}; unexpected {diff.unexpected[:20]}; "
            f"shape mismatches (key, checkpoint, model) {diff.mismatched[:20]}"
        )
    return ours, fresh


def _load_weights(model: nn.Module, ours: dict[str, torch.Tensor]) -> None:
    merged = {**model.state_dict(), **ours}
    model.load_state_dict(merged, strict=True)


def import_research_checkpoint(
    repo: str,
    checkpoint: str | Path,
    config: str | Path,
    vocab: str | Path,
    out: str | Path,
    overrides: Sequence[str] = (),
) -> ImportReport:
    """Convert a research checkpoint into a HeriCap checkpoint folder.

    Args:
        repo: ``grit`` or ``hiercap`` (the flavour and key layout).
        checkpoint: the research ``.pth`` (local path or ``s3://``).
        config: the research config YAML the checkpoint was trained with (caption or
            detection config).
        vocab: the research vocabulary JSON (``itos``/``stoi``/``freqs``), kept as given.
        out: the folder to write.
        overrides: HeriCap dotted overrides for the written config.

    Raises:
        ValueError, RuntimeError, FileNotFoundError: with what to fix.
    """
    if repo not in RESEARCH_SOURCES:
        raise ValueError(f"unknown research code {repo!r}; known: {list(RESEARCH_SOURCES)}")
    data = storage.read_bytes(checkpoint)
    sha256 = hashlib.sha256(data).hexdigest()
    kind, state, epoch = checkpoint_state(load_tensor_file(data, str(checkpoint)), str(checkpoint))
    tree = yaml.safe_load(storage.read_text(config)) or {}
    vocab_bytes = storage.read_bytes(vocab)
    vocabulary = Vocabulary.load(vocab)
    words = state.get("cap_generator.word_emb.weight")
    if words is not None and words.shape[0] != len(vocabulary):
        raise ValueError(f"{vocab} has {len(vocabulary)} words, the checkpoint {words.shape[0]}")
    cfg = research_config(repo, tree, state, len(vocabulary), overrides)
    model = build_captioner(cfg.model, len(vocabulary), resize_spec(cfg.dataset).model_size)
    mapping = map_research_keys(
        state, repo, cfg.model.cap_generator.decoder_name, len(cfg.model.extractor.depths)
    )
    _check_position_index(state)
    ours, fresh = plan_weights(model.state_dict(), state, mapping, kind)
    _load_weights(model, ours)
    meta = {
        "epoch": epoch,
        "phase": "imported",
        "imported_from": {
            "kind": kind,
            "file": str(checkpoint),
            "sha256": sha256,
            "research": repo,
            "research_repo": RESEARCH_SOURCES[repo]["repo"],
            "research_commit": RESEARCH_SOURCES[repo]["commit"],
            "config": str(config),
            "dropped": dict(Counter(mapping.dropped.values())),
            "fresh": fresh,
        },
    }
    folder = save_checkpoint(out, model, cfg, vocabulary, meta)  # a folder or a URI
    # the vocabulary file exactly as given
    storage.write_bytes(storage.join(folder, VOCAB_FILE), vocab_bytes)
    report = ImportReport(folder, kind, sha256, mapping.mapped, mapping.dropped, fresh)
    for why, n in Counter(mapping.dropped.values()).items():
        logger.info("dropped %d keys: %s", n, why)
    if fresh:
        logger.info("%d caption weights start fresh (detector checkpoint)", len(fresh))
    logger.info("imported %s (%s, sha256 %s) into %s", checkpoint, kind, sha256[:12], folder)
    return report
