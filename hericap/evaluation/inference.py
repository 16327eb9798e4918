"""Caption images with a checkpoint, or an ensemble of checkpoints (no Ray; Ray Data uses
:class:`CaptionPredictor` as a ``map_batches`` class), on the CPU or a GPU (bf16 autocast where
the GPU supports it)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hericap.checkpoint.ensemble import load_models
from hericap.data.text import Vocabulary
from hericap.data.transforms import prepare_batch
from hericap.models.captioner import Captioner
from hericap.models.decoding import DecodeControls, check_search_controls
from hericap.models.ensemble import CaptionEnsemble

__all__ = ["CaptionPredictor", "autocast_for", "caption_batch", "pick_device"]


def pick_device(device: str | None = None) -> torch.device:
    """``device``, or CUDA when present, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device | str, mixed_precision: str = "auto"):
    """A fresh bf16 autocast context per ``exp.mixed_precision``: ``auto`` on a GPU that
    supports bf16, ``bf16`` everywhere, ``no`` never."""
    device = torch.device(device)
    if mixed_precision == "bf16" or (
        mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def caption_batch(
    model: Captioner | CaptionEnsemble,
    vocab: Vocabulary,
    images: np.ndarray,
    beam_size: int = 5,
    max_len: int = 20,
    device: torch.device | str = "cpu",
    image_hw: np.ndarray | None = None,
    collapse_repeats: bool = False,
    controls: DecodeControls | None = None,
) -> list[str]:
    """``uint8 [B, H, W, 3]`` images -> one caption each (greedy when ``beam_size == 1``).

    ``image_hw`` (``[B, 2]``, the real sizes on padded canvases) trims the padding the batch
    does not need and tells the model where each image is (its flavour decides how padding is
    treated). ``collapse_repeats``: ``decode.collapse_repeats``; ``controls``: the other
    ``decode.*`` controls (None: all off).
    """
    if len(images) == 0:
        return []
    x, hw = prepare_batch(images, image_hw, model.input_multiple, model.zero_padding, device)
    out = model.generate(x, beam_size=beam_size, max_len=max_len, image_hw=hw, controls=controls)
    return [vocab.decode(seq[0].tolist(), collapse_repeats=collapse_repeats) for seq in out.tokens]


class CaptionPredictor:
    """Loads a checkpoint folder (or several: a log-prob-averaging ensemble) once and captions
    batches of decoded images.

    Args:
        checkpoint: a checkpoint folder (a local path or a URI), ``"A,B"`` or a list of folders
            (an ensemble).
        beam_size: 1 for greedy, else beam search.
        max_len: words at most.
        torch_threads: intra-op threads (0: leave torch's default).
        collapse_repeats: collapse repeated words (``decode.collapse_repeats``).
        controls: the ``decode.*`` decoding controls (None: all off).
        device: where the model runs (None: CUDA when present, else the CPU).
        mixed_precision: ``exp.mixed_precision`` (``auto``: bf16 on a GPU that supports it).
    """

    def __init__(
        self,
        checkpoint: str | Sequence[str | Path],
        beam_size: int = 5,
        max_len: int = 20,
        torch_threads: int = 0,
        collapse_repeats: bool = False,
        controls: DecodeControls | None = None,
        device: str | None = None,
        mixed_precision: str = "auto",
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = pick_device(device)
        self.mixed_precision = mixed_precision
        self.loaded = load_models(checkpoint, device=self.device)
        self.beam_size, self.max_len = beam_size, max_len
        self.collapse_repeats = collapse_repeats
        self.controls = controls or DecodeControls()
        self.controls.validate(beam_size, max_len)
        check_search_controls(self.loaded.model.search, self.controls)

    def caption(self, images: np.ndarray, image_hw: np.ndarray | None = None) -> list[str]:
        """``uint8 [B, H, W, 3]`` (real sizes ``image_hw``) -> one caption per image."""
        with autocast_for(self.device, self.mixed_precision):
            return caption_batch(
                self.loaded.model,
                self.loaded.vocab,
                images,
                beam_size=self.beam_size,
                max_len=self.max_len,
                device=self.device,
                image_hw=image_hw,
                collapse_repeats=self.collapse_repeats,
                controls=self.controls,
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = self.caption(batch["image"], batch.get("image_hw"))
        return {
            "image_id": batch["image_id"],
            "caption": np.array(captions, dtype=object),
            "device": np.array([str(self.device)] * len(captions), dtype=object),
        }
