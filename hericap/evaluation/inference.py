"""Caption images with a checkpoint (no Ray; Ray Data uses it as a ``map_batches`` class)."""

from __future__ import annotations

import numpy as np
import torch

from hericap.checkpoint import load_checkpoint
from hericap.data.text import Vocabulary
from hericap.data.transforms import prepare_batch
from hericap.models.captioner import Captioner

__all__ = ["CaptionPredictor", "caption_batch"]


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
    collapse_repeats: bool = False,
) -> list[str]:
    """``uint8 [B, H, W, 3]`` images -> one caption each (greedy when ``beam_size == 1``).

    ``image_hw`` (``[B, 2]``, the real sizes on padded canvases) trims the padding the batch
    does not need and tells the model where each image is (its flavour decides how padding is
    treated). ``collapse_repeats``: ``decode.collapse_repeats``.
    """
    if len(images) == 0:
        return []
    x, hw = prepare_batch(images, image_hw, model.input_multiple, model.zero_padding, device)
    out = model.generate(
        x,
        beam_size=beam_size,
        max_len=max_len,
        length_penalty=length_penalty,
        image_hw=hw,
    )
    return [vocab.decode(seq[0].tolist(), collapse_repeats=collapse_repeats) for seq in out.tokens]


class CaptionPredictor:
    """Loads a checkpoint folder once and captions batches of decoded images.

    Args:
        checkpoint: checkpoint folder.
        beam_size: 1 for greedy, else beam search.
        max_len: words at most.
        length_penalty: beam ranking length penalty.
        torch_threads: intra-op threads (0: leave torch's default).
        collapse_repeats: collapse repeated words (``decode.collapse_repeats``).
    """

    def __init__(
        self,
        checkpoint: str,
        beam_size: int = 5,
        max_len: int = 20,
        length_penalty: float = 0.0,
        torch_threads: int = 0,
        collapse_repeats: bool = False,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.ckpt = load_checkpoint(checkpoint)
        self.beam_size, self.max_len, self.length_penalty = beam_size, max_len, length_penalty
        self.collapse_repeats = collapse_repeats

    def caption(self, images: np.ndarray, image_hw: np.ndarray | None = None) -> list[str]:
        """``uint8 [B, H, W, 3]`` (real sizes ``image_hw``) -> one caption per image."""
        return caption_batch(
            self.ckpt.model,
            self.ckpt.vocab,
            images,
            beam_size=self.beam_size,
            max_len=self.max_len,
            length_penalty=self.length_penalty,
            image_hw=image_hw,
            collapse_repeats=self.collapse_repeats,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "image_id": batch["image_id"],
            "caption": np.array(self.caption(batch["image"], batch.get("image_hw")), dtype=object),
        }
