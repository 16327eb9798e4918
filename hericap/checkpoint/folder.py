"""Self-describing checkpoint folders, and the one function that loads them.

A checkpoint folder holds everything needed to rebuild, evaluate, serve or resume:

* ``model.pt``: the model state dict (tensors only; loaded with ``weights_only=True``);
* ``training_state.pt``: optimiser, scheduler, RNG states, phase, epoch, step;
* ``config.json``: the full run config; ``vocab.json``: the vocabulary;
* ``meta.json``: epoch, step and the metrics reported with it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hericap.config.loader import from_dict, to_dict
from hericap.config.schema import Config
from hericap.data.text import Vocabulary
from hericap.data.transforms import resize_spec
from hericap.models.weights import load_state_dict_strict

__all__ = [
    "LoadedCheckpoint",
    "load_checkpoint",
    "read_config_and_vocab",
    "read_model_state",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
META_FILE = "meta.json"


def save_checkpoint(
    directory: str | Path,
    model: nn.Module | Mapping[str, torch.Tensor],
    config: Config,
    vocab: Vocabulary,
    meta: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder (model weights always: a model's, or a state dict such as a
    moving average; training state when given)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    weights = dict(model) if isinstance(model, Mapping) else model.state_dict()
    torch.save(weights, d / MODEL_FILE)
    if training_state is not None:
        torch.save(training_state, d / STATE_FILE)
    (d / CONFIG_FILE).write_text(json.dumps(to_dict(config), indent=1))
    vocab.save(d / VOCAB_FILE)
    (d / META_FILE).write_text(json.dumps(meta, indent=1))
    return d


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    config: Config
    vocab: Vocabulary
    meta: dict[str, Any]
    path: Path

    def training_state(self) -> dict[str, Any] | None:
        p = self.path / STATE_FILE
        return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None


def _require_folder(d: Path) -> None:
    if d.is_file():
        raise FileNotFoundError(
            f"{d} is a file, not a HeriCap checkpoint folder; a GRIT or HierCap research "
            "checkpoint becomes one with `hericap import grit|hiercap --checkpoint FILE ...`"
        )
    for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"{d} is not a HeriCap checkpoint folder: {name} is missing "
                f"(expected {MODEL_FILE}, {CONFIG_FILE}, {VOCAB_FILE})"
            )


def read_config_and_vocab(directory: str | Path) -> tuple[Config, Vocabulary]:
    """A checkpoint folder's config and vocabulary, without building its model.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
    """
    d = Path(directory)
    _require_folder(d)
    config = from_dict(json.loads((d / CONFIG_FILE).read_text()))
    return config, Vocabulary.load(d / VOCAB_FILE)


def read_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint folder's weights (tensors only: ``weights_only=True``)."""
    d = Path(directory)
    _require_folder(d)
    return torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint folder and load its weights strictly.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        RuntimeError: the weights do not match the model the config describes.
    """
    from hericap.models.builder import build_captioner

    d = Path(directory)
    config, vocab = read_config_and_vocab(d)
    # the folder holds every weight: the config's pretrained weight files are not read
    model = build_captioner(
        config.model, len(vocab), resize_spec(config.dataset).model_size, load_pretrained=False
    )
    load_state_dict_strict(model, read_model_state(d), what=f"checkpoint {d / MODEL_FILE}")
    meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
    return LoadedCheckpoint(model.to(device).eval(), config, vocab, meta, d)
