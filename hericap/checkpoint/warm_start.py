"""Starting a training run from a checkpoint's weights: ``exp.checkpoint=DIR`` in ``train``.

As in the research code's ``exp.checkpoint``, the run starts from those weights with a fresh
optimiser (``exp.resume=True`` is different: it continues this run's own latest checkpoint). The
weights fix the architecture and the vocabulary, so the run takes the checkpoint's ``model``
section, its input keys (how images are resized) and its vocabulary; anything else comes from
the command line. A checkpoint from ``hericap import`` (a GRIT or HierCap research model) starts
a run like any trained one, e.g. to SCST-finetune GRIT's published model.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import torch

from hericap.checkpoint.folder import MODEL_FILE, read_config_and_vocab
from hericap.config.schema import Config
from hericap.data import storage
from hericap.data.text import Vocabulary
from hericap.data.transforms import resize_spec
from hericap.models.weights import diff_state

__all__ = ["INPUT_KEYS", "check_warm_start", "warm_start_base"]

logger = logging.getLogger(__name__)

# dataset.* keys that describe the model's input, taken from the checkpoint with its model
INPUT_KEYS = ("resize", "image_size", "min_size", "max_size")


def warm_start_base(cfg: Config, checkpoint: str) -> Config:
    """``cfg`` with the checkpoint's model section and input keys: the base that command-line
    overrides then apply to."""
    saved, _ = read_config_and_vocab(checkpoint)
    inputs = {k: getattr(saved.dataset, k) for k in INPUT_KEYS}
    base = dataclasses.replace(
        cfg, model=saved.model, dataset=dataclasses.replace(cfg.dataset, **inputs)
    )
    base.exp = dataclasses.replace(cfg.exp, checkpoint=checkpoint)
    return base


def check_warm_start(cfg: Config) -> Vocabulary:
    """The vocabulary of ``cfg.exp.checkpoint``, after checking (on the ``meta`` device: no
    memory, no weights read) that the model ``cfg`` describes has exactly the checkpoint's
    weights. Other settings may differ (dropout, say); input keys that differ are logged.

    Raises:
        FileNotFoundError: not a checkpoint folder.
        ValueError: the weights would not load; lists the missing, unexpected and mis-shaped keys.
    """
    from hericap.models.builder import build_captioner

    saved, vocab = read_config_and_vocab(cfg.exp.checkpoint)
    with torch.device("meta"):
        model = build_captioner(
            cfg.model, len(vocab), resize_spec(cfg.dataset).model_size, load_pretrained=False
        )
    weights = storage.join(storage.resolve(cfg.exp.checkpoint), MODEL_FILE)
    if storage.is_uri(weights):  # an object store: read, then only shapes are kept
        state = torch.load(
            io.BytesIO(storage.read_bytes(weights)), map_location="meta", weights_only=True
        )
    else:  # a local file: memory-mapped, nothing read but the shapes
        state = torch.load(weights, map_location="meta", weights_only=True, mmap=True)
    diff = diff_state(model.state_dict(), state)
    if not diff.clean:
        raise ValueError(
            f"exp.checkpoint={cfg.exp.checkpoint} holds another model than this config "
            f"describes: {diff.describe()}. `hericap train exp.checkpoint=DIR` takes the "
            "checkpoint's model section itself; leave architecture keys out of the overrides"
        )
    for key in INPUT_KEYS:
        ours, theirs = getattr(cfg.dataset, key), getattr(saved.dataset, key)
        if ours != theirs:
            logger.warning("dataset.%s=%r; the checkpoint was trained with %r", key, ours, theirs)
    logger.info(
        "starting from the weights of %s (vocabulary of %d words, fresh optimiser)",
        cfg.exp.checkpoint,
        len(vocab),
    )
    return vocab
