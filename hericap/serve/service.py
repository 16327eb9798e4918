"""Captioning a batch of uploaded images with a checkpoint (no Ray: the Serve deployment and
``hericap caption`` both use it). The checkpoint is a folder or a URI (``s3://...``); the model
runs on CUDA when present (bf16 autocast where the GPU supports it), else on the CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from hericap.checkpoint import load_checkpoint
from hericap.data import storage
from hericap.data.transforms import crop_batch, normalize_images, resize_spec, resize_to_canvas
from hericap.evaluation.inference import autocast_for, pick_device

__all__ = ["CaptionService", "model_id"]


def model_id(checkpoint: str, meta: dict[str, Any]) -> str:
    """``<run name>/epoch<N>`` of a checkpoint, for responses and logs."""
    name = storage.basename(storage.parent(storage.resolve(checkpoint)))
    return f"{name}/epoch{meta.get('epoch', 0) + 1}" if meta else name


@dataclass
class CaptionService:
    """A loaded checkpoint that captions lists of PIL images (beam search, top-n beams);
    ``device`` None: CUDA when present, else the CPU."""

    checkpoint: str
    beam_size: int = 5
    n_best: int = 3
    max_len: int = 20
    torch_threads: int = 0
    device: str | None = None
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best={self.n_best} must be in [1, beam_size={self.beam_size}]")
        self.torch_device = pick_device(self.device)
        # weights_only=True, strict
        self.loaded = load_checkpoint(self.checkpoint, device=self.torch_device)
        self.resize = resize_spec(self.loaded.config.dataset)
        self.id = model_id(self.checkpoint, self.loaded.meta)

    def prepare(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        canvases, sizes = zip(*(resize_to_canvas(im, self.resize) for im in images), strict=True)
        return np.stack(canvases), np.asarray(sizes)

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """One result per image: ``caption``, ``beams`` ([{caption, log_prob}], best first)."""
        if not images:
            return []
        t0 = time.perf_counter()
        model, vocab = self.loaded.model, self.loaded.vocab
        batch, sizes = self.prepare(images)
        x = normalize_images(crop_batch(batch, sizes, model.input_multiple), self.torch_device)
        with autocast_for(self.torch_device, self.mixed_precision):
            out = model.generate(
                x, beam_size=self.beam_size, max_len=self.max_len, n_best=self.n_best
            )
        decode_ms = 1000 * (time.perf_counter() - t0)
        results = []
        for tokens, log_probs in zip(out.tokens, out.log_probs, strict=True):
            beams = [
                {"caption": vocab.decode(t.tolist()), "log_prob": float(lp)}
                for t, lp in zip(tokens, log_probs, strict=True)
            ]
            results.append(
                {
                    "caption": beams[0]["caption"],
                    "beams": beams,
                    "batch_size": len(images),
                    "decode_ms": decode_ms,
                }
            )
        return results
