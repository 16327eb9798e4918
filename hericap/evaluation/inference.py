"""Caption images with a checkpoint, or an ensemble of checkpoints (no Ray; Ray Data uses
:class:`CaptionPredictor` as a ``map_batches`` class)."""

from __future__ import annotations

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

__all__ = ["CaptionPredictor", "caption_batch"]


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
        checkpoint: a checkpoint folder, ``"A,B"`` or a list of folders (an ensemble).
        beam_size: 1 for greedy, else beam search.
        max_len: words at most.
        torch_threads: intra-op threads (0: leave torch's default).
        collapse_repeats: collapse repeated words (``decode.collapse_repeats``).
        controls: the ``decode.*`` decoding controls (None: all off).
    """

    def __init__(
        self,
        checkpoint: str | Sequence[str | Path],
        beam_size: int = 5,
        max_len: int = 20,
        torch_threads: int = 0,
        collapse_repeats: bool = False,
        controls: DecodeControls | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.loaded = load_models(checkpoint)
        self.beam_size, self.max_len = beam_size, max_len
        self.collapse_repeats = collapse_repeats
        self.controls = controls or DecodeControls()
        self.controls.validate(beam_size, max_len)
        check_search_controls(self.loaded.model.search, self.controls)

    def caption(self, images: np.ndarray, image_hw: np.ndarray | None = None) -> list[str]:
        """``uint8 [B, H, W, 3]`` (real sizes ``image_hw``) -> one caption per image."""
        return caption_batch(
            self.loaded.model,
            self.loaded.vocab,
            images,
            beam_size=self.beam_size,
            max_len=self.max_len,
            image_hw=image_hw,
            collapse_repeats=self.collapse_repeats,
            controls=self.controls,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "image_id": batch["image_id"],
            "caption": np.array(self.caption(batch["image"], batch.get("image_hw")), dtype=object),
        }
