"""Loading several checkpoint folders as one log-prob-averaging ensemble
(:class:`~hericap.models.ensemble.CaptionEnsemble`; ``hericap eval exp.checkpoint=A,B``).

Members must share the vocabulary (word for word) and the input settings (how images are
resized and padded); anything else (sizes, flavours of fusion, training) may differ. One path
loads as the plain model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hericap.checkpoint.folder import LoadedCheckpoint, load_checkpoint
from hericap.config.schema import Config
from hericap.data import storage
from hericap.data.text import Vocabulary
from hericap.data.transforms import resize_spec
from hericap.models.captioner import Captioner
from hericap.models.ensemble import CaptionEnsemble

__all__ = ["CHECKPOINT_SEPARATOR", "LoadedModels", "load_models", "split_checkpoints"]

logger = logging.getLogger(__name__)

# exp.checkpoint=A,B names the members of an ensemble.
CHECKPOINT_SEPARATOR = ","


def split_checkpoints(value: str | Path | Sequence[str | Path]) -> list[str]:
    """``"A,B"`` (or one path, or a list of paths) -> ``["A", "B"]``.

    Raises:
        ValueError: nothing named, an empty entry, or a folder named twice.
    """
    if isinstance(value, Path):
        items: list[str | Path] = [value]
    elif isinstance(value, str):
        items = list(value.split(CHECKPOINT_SEPARATOR))
    else:
        items = list(value)
    paths = [str(p).strip() for p in items]
    if not paths or any(not p for p in paths):
        raise ValueError(
            f"exp.checkpoint={value!r}: name one checkpoint folder, or several separated by "
            f"'{CHECKPOINT_SEPARATOR}' for an ensemble (exp.checkpoint=A,B), without empty entries"
        )
    resolved = [storage.resolve(p) for p in paths]  # folders or URIs
    if len(set(resolved)) != len(resolved):
        raise ValueError(
            f"exp.checkpoint={value!r} names a folder twice; an ensemble of a model with itself "
            "is that model: name each member once"
        )
    return paths


@dataclass
class LoadedModels:
    """What the captioning paths need of one checkpoint or an ensemble: the ``model`` (a
    :class:`Captioner`, or a :class:`CaptionEnsemble` of several), the shared ``vocab``, the
    first member's ``config`` and every member's :class:`LoadedCheckpoint`."""

    model: Captioner | CaptionEnsemble
    vocab: Vocabulary
    config: Config
    members: list[LoadedCheckpoint]


def _check_compatible(members: Sequence[LoadedCheckpoint]) -> None:
    """Raises ``ValueError`` naming the first member that differs from the first one in its
    vocabulary or its input settings."""
    first = members[0]
    spec = resize_spec(first.config.dataset)
    for other in members[1:]:
        if other.vocab.itos != first.vocab.itos:
            pairs = zip(first.vocab.itos, other.vocab.itos, strict=False)
            shorter = min(len(first.vocab), len(other.vocab))
            mismatch = next((i for i, (a, b) in enumerate(pairs) if a != b), shorter)
            raise ValueError(
                f"ensemble members {first.path} and {other.path} have different vocabularies "
                f"({len(first.vocab)} vs {len(other.vocab)} words, first difference at index "
                f"{mismatch}); an ensemble averages log-probs word by word, so its members must "
                "be trained with one vocabulary"
            )
        if resize_spec(other.config.dataset) != spec:
            raise ValueError(
                f"ensemble members {first.path} and {other.path} read images differently "
                f"({spec} vs {resize_spec(other.config.dataset)}; dataset.resize, image_size, "
                "min_size, max_size): an ensemble's members must share the input settings"
            )


def load_models(
    paths: str | Path | Sequence[str | Path], device: str | torch.device = "cpu"
) -> LoadedModels:
    """Load ``paths`` (``"A,B"`` or a list) as one model: the checkpoint itself for one path, a
    log-prob-averaging ensemble for several.

    Raises:
        FileNotFoundError: a folder or one of its files is missing.
        ValueError: the members do not share vocabulary and input settings.
    """
    members = [load_checkpoint(p, device=device) for p in split_checkpoints(paths)]
    _check_compatible(members)
    first = members[0]
    if len(members) == 1:
        return LoadedModels(first.model, first.vocab, first.config, members)
    model = CaptionEnsemble([m.model for m in members])
    logger.info("ensemble of %d checkpoints: %s", len(members), [str(m.path) for m in members])
    return LoadedModels(model, first.vocab, first.config, members)
