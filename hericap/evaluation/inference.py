"""Caption images with a checkpoint (no Ray; Ray Data uses it as a ``map_batches`` class), on
the CPU or a GPU (bf16 autocast where the GPU supports it)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from hericap.checkpoint import load_checkpoint
from hericap.data.text import Vocabulary
from hericap.data.transforms import crop_batch, normalize_images
from hericap.models.captioner import Captioner

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
    model: Captioner,
    vocab: Vocabulary,
    images: np.ndarray,
    beam_size: int = 5,
    max_len: int = 20,
    length_penalty: float = 0.0,
    device: torch.device | str = "cpu",
    image_hw: np.ndarray | None = None,
) -> list[str]:
    """``uint8 [B, H, W, 3]`` images -> one caption each (greedy when ``beam_size == 1``).

    ``image_hw`` (``[B, 2]``, the real sizes on padded canvases) trims the padding the batch
    does not need.
    """
    if len(images) == 0:
        return []
    images = crop_batch(images, image_hw, model.input_multiple)
    out = model.generate(
        normalize_images(images, device),
        beam_size=beam_size,
        max_len=max_len,
        length_penalty=length_penalty,
    )
    return [vocab.decode(seq[0].tolist()) for seq in out.tokens]


class CaptionPredictor:
    """Loads a checkpoint once and captions batches of decoded images.

    Args:
        checkpoint: checkpoint folder (a location), or its files
            (:func:`~hericap.checkpoint.read_checkpoint_files`).
        beam_size: 1 for greedy, else beam search.
        max_len: words at most.
        length_penalty: beam ranking length penalty.
        torch_threads: intra-op threads (0: leave torch's default).
        device: where the model runs (None: CUDA when present, else the CPU).
        mixed_precision: ``exp.mixed_precision`` (``auto``: bf16 on a GPU that supports it).
        location: where ``checkpoint``'s files came from (messages).
    """

    def __init__(
        self,
        checkpoint: str | dict[str, bytes],
        beam_size: int = 5,
        max_len: int = 20,
        length_penalty: float = 0.0,
        torch_threads: int = 0,
        device: str | None = None,
        mixed_precision: str = "auto",
        location: str | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = pick_device(device)
        self.ckpt = load_checkpoint(checkpoint, device=self.device, location=location)
        self.mixed_precision = mixed_precision
        self.beam_size, self.max_len, self.length_penalty = beam_size, max_len, length_penalty

    def caption(self, images: np.ndarray, image_hw: np.ndarray | None = None) -> list[str]:
        """``uint8 [B, H, W, 3]`` (real sizes ``image_hw``) -> one caption per image."""
        with autocast_for(self.device, self.mixed_precision):
            return caption_batch(
                self.ckpt.model,
                self.ckpt.vocab,
                images,
                beam_size=self.beam_size,
                max_len=self.max_len,
                length_penalty=self.length_penalty,
                device=self.device,
                image_hw=image_hw,
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = self.caption(batch["image"], batch.get("image_hw"))
        return {
            "image_id": batch["image_id"],
            "caption": np.array(captions, dtype=object),
            "device": np.array([str(self.device)] * len(captions), dtype=object),
        }
