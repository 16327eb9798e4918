"""Self-describing checkpoint folders, and the one function that loads them.

A checkpoint folder (a local folder or an object prefix such as ``s3://bucket/runs/best``) holds
everything needed to rebuild, evaluate, serve or resume:

* ``model.pt``: the model state dict (tensors only; loaded with ``weights_only=True``);
* ``training_state.pt``: optimiser, scheduler, RNG states, phase, epoch, step;
* ``config.json``: the full run config; ``vocab.json``: the vocabulary;
* ``meta.json``: epoch, step and the metrics reported with it.

Loading reads only those files: the config may record where the backbone and detector weights
came from (``model.extractor.checkpoint``, ``model.detector.checkpoint``), but the model is built
without them and gets every weight from ``model.pt``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hericap.config.loader import from_dict, to_dict
from hericap.config.schema import Config
from hericap.data import storage
from hericap.data.text import Vocabulary
from hericap.data.transforms import resize_spec
from hericap.models.weights import load_state_dict_strict

__all__ = [
    "LoadedCheckpoint",
    "load_checkpoint",
    "read_checkpoint_files",
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
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, VOCAB_FILE)


def _tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module | Mapping[str, torch.Tensor],
    config: Config,
    vocab: Vocabulary,
    meta: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint folder (a folder or URI; model weights always: a model's, or a state
    dict such as a moving average; training state when given); returns its location.
    ``meta.json`` is written last."""
    d = storage.resolve(directory)
    weights = dict(model) if isinstance(model, Mapping) else model.state_dict()
    storage.write_bytes(storage.join(d, MODEL_FILE), _tensor_bytes(weights))
    if training_state is not None:
        storage.write_bytes(storage.join(d, STATE_FILE), _tensor_bytes(training_state))
    storage.write_text(storage.join(d, CONFIG_FILE), json.dumps(to_dict(config), indent=1))
    vocab.save(storage.join(d, VOCAB_FILE))
    storage.write_text(storage.join(d, META_FILE), json.dumps(meta, indent=1))
    return d


def _read_required(d: str, name: str) -> bytes:
    """One of a checkpoint folder's own files; a missing one (or a file where the folder should
    be: a research checkpoint) says what a checkpoint folder is."""
    try:
        return storage.read_bytes(storage.join(d, name))
    except FileNotFoundError as e:
        if storage.file_type(d) == "file":
            raise FileNotFoundError(
                f"{d} is a file, not a HeriCap checkpoint folder; a GRIT or HierCap research "
                "checkpoint becomes one with `hericap import grit|hiercap --checkpoint FILE ...`"
            ) from e
        raise FileNotFoundError(
            f"{d} is not a HeriCap checkpoint folder: {name} is missing "
            f"(expected {', '.join(REQUIRED_FILES)})"
        ) from e


def read_config_and_vocab(location: str | os.PathLike) -> tuple[Config, Vocabulary]:
    """A checkpoint folder's config and vocabulary (a folder or a URI), without building its
    model.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
    """
    d = storage.resolve(location)
    config = from_dict(json.loads(_read_required(d, CONFIG_FILE)))
    vocab = Vocabulary.from_dict(json.loads(_read_required(d, VOCAB_FILE)))
    return config, vocab


def read_model_state(location: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint folder's weights (tensors only: ``weights_only=True``)."""
    data = _read_required(storage.resolve(location), MODEL_FILE)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_checkpoint_files(
    location: str | os.PathLike, with_training_state: bool = False
) -> dict[str, bytes]:
    """The files of a checkpoint folder as ``{name: bytes}`` (to ship them to processes that
    cannot read ``location``, e.g. through Ray's object store).

    Raises:
        FileNotFoundError: ``location`` is not a checkpoint folder.
    """
    d = storage.resolve(location)
    files = {name: _read_required(d, name) for name in REQUIRED_FILES}
    optional = (META_FILE, STATE_FILE) if with_training_state else (META_FILE,)
    for name in optional:
        with contextlib.suppress(FileNotFoundError):
            files[name] = storage.read_bytes(storage.join(d, name))
    return files


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    config: Config
    vocab: Vocabulary
    meta: dict[str, Any]
    path: str  # the checkpoint's location

    def training_state(self) -> dict[str, Any] | None:
        try:
            data = storage.read_bytes(storage.join(self.path, STATE_FILE))
        except FileNotFoundError:
            return None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def load_checkpoint(
    checkpoint: str | os.PathLike | dict[str, bytes],
    device: str | torch.device = "cpu",
    location: str | None = None,
) -> LoadedCheckpoint:
    """Rebuild the model of a checkpoint folder and load its weights strictly.

    Args:
        checkpoint: the folder's location, or its files (:func:`read_checkpoint_files`).
        device: where the model goes.
        location: where ``checkpoint``'s files came from (for messages and
            :meth:`LoadedCheckpoint.training_state`); default: ``checkpoint`` itself.

    Raises:
        FileNotFoundError: the folder or one of its files is missing.
        RuntimeError: the weights do not match the model the config describes.
    """
    from hericap.models.builder import build_captioner

    if isinstance(checkpoint, dict):
        files, where = checkpoint, location or "<checkpoint files>"
    else:
        where = storage.resolve(checkpoint)
        files = read_checkpoint_files(where)
    config = from_dict(json.loads(files[CONFIG_FILE]))
    vocab = Vocabulary.from_dict(json.loads(files[VOCAB_FILE]))
    # every weight comes from model.pt: the backbone / detector files the config names are
    # where training started, and need not exist where the checkpoint is loaded
    model = build_captioner(
        config.model, len(vocab), resize_spec(config.dataset).model_size, load_pretrained=False
    )
    state = torch.load(io.BytesIO(files[MODEL_FILE]), map_location="cpu", weights_only=True)
    load_state_dict_strict(model, state, what=f"checkpoint {storage.join(where, MODEL_FILE)}")
    meta = json.loads(files[META_FILE]) if META_FILE in files else {}
    return LoadedCheckpoint(model.to(device).eval(), config, vocab, meta, where)
