"""Captioning a batch of uploaded images with a checkpoint, and explaining one caption with
per-word attention maps (no Ray: the Serve deployment and ``hericap caption`` both use it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hericap.checkpoint import load_checkpoint
from hericap.data.transforms import crop_batch, normalize_images, resize_spec, resize_to_canvas
from hericap.evaluation.explain import WordAttention, word_attention

__all__ = ["CaptionService", "attention_json", "model_id"]

# digits kept of the [0, 1] attention weights sent to the page: finer is invisible on a heatmap
_DIGITS = 3


def _unit_rows(weights: np.ndarray) -> list[list[float]]:
    """Each row of ``weights [T, N]`` divided by its maximum, rounded: what a heatmap shows."""
    peak = np.maximum(weights.max(axis=1, keepdims=True), 1e-12)
    return np.round(weights / peak, _DIGITS).tolist()


def attention_json(wa: WordAttention) -> dict[str, Any]:
    """:class:`WordAttention` as JSON-ready lists: per-word ``maps`` (``[T][h][w]``, each word's
    peak 1) or ``regions`` (boxes and per-word weights), ``routing`` weights, and
    ``image_extent``: the fraction of the maps' height and width that the image covers (the rest
    is padding the model saw)."""
    (bh, bw), (ih, iw) = wa.batch_hw, wa.image_hw
    out: dict[str, Any] = {
        "words": wa.words,
        "image_extent": [ih / bh, iw / bw],
        "maps": None,
        "map_size": None,
        "regions": None,
        "routing": [{"name": name, "weight": round(w, 4)} for name, w in wa.routing],
    }
    if wa.maps is not None:
        t, h, w = wa.maps.shape
        out["map_size"] = [h, w]
        out["maps"] = np.asarray(_unit_rows(wa.maps.reshape(t, h * w))).reshape(t, h, w).tolist()
    elif wa.regions is not None and wa.boxes is not None:
        out["regions"] = {
            "boxes": np.round(wa.boxes, 4).tolist(),  # cx, cy, w, h as fractions of the maps
            "weights": _unit_rows(wa.regions),
        }
    return out


def model_id(checkpoint: str | Path, meta: dict[str, Any]) -> str:
    """``<run name>/epoch<N>`` of a checkpoint, for responses and logs."""
    name = Path(checkpoint).resolve().parent.name
    return f"{name}/epoch{meta.get('epoch', 0) + 1}" if meta else name


@dataclass
class CaptionService:
    """A loaded checkpoint that captions lists of PIL images (beam search, top-n beams)."""

    checkpoint: str
    beam_size: int = 5
    n_best: int = 3
    max_len: int = 20
    torch_threads: int = 0

    def __post_init__(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if not 1 <= self.n_best <= self.beam_size:
            raise ValueError(f"n_best={self.n_best} must be in [1, beam_size={self.beam_size}]")
        self.loaded = load_checkpoint(self.checkpoint)  # weights_only=True, strict
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
        x = normalize_images(crop_batch(batch, sizes, model.input_multiple))
        out = model.generate(x, beam_size=self.beam_size, max_len=self.max_len, n_best=self.n_best)
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

    def caption_tokens(self, caption: str) -> list[int]:
        """Word ids of ``caption`` (no ``<bos>``/``<eos>``); words outside the vocabulary become
        ``<unk>``. ``ValueError`` when it has more than ``max_len`` words."""
        tokens = self.loaded.vocab.encode(caption)[1:-1]
        if len(tokens) > self.max_len:
            raise ValueError(
                f"caption has {len(tokens)} words; at most max_len={self.max_len} can be "
                "explained: send a shorter caption, or none to explain the model's own"
            )
        return tokens

    @torch.no_grad()
    def explain(self, image: Image.Image, caption: str) -> dict[str, Any]:
        """Where the model looks for each word of ``caption`` on ``image``: :func:`attention_json`
        plus ``caption`` and ``explain_ms``."""
        t0 = time.perf_counter()
        tokens = self.caption_tokens(caption)
        canvases, sizes = self.prepare([image])
        wa = word_attention(
            self.loaded.model, self.loaded.vocab, canvases[0], tuple(sizes[0]), tokens
        )
        return {
            "caption": caption,
            **attention_json(wa),
            "explain_ms": 1000 * (time.perf_counter() - t0),
        }
