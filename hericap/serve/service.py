"""Captioning a batch of uploaded images with a checkpoint, and explaining one caption with
per-word attention maps (no Ray: the Serve deployment and ``hericap caption`` both use it). The
checkpoint is a folder or a URI (``s3://...``); the model runs on CUDA when present (bf16 autocast
where the GPU supports it), else on the CPU."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from hericap.checkpoint import load_checkpoint
from hericap.data import storage
from hericap.data.transforms import prepare_batch, resize_spec, resize_to_canvas
from hericap.evaluation.explain import WordAttention, word_attention
from hericap.evaluation.inference import autocast_for, pick_device
from hericap.models.builder import decode_controls
from hericap.models.decoding import DecodeControls, check_search_controls

__all__ = ["CaptionService", "attention_json", "model_id", "service_controls"]

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


def service_controls(checkpoint_decode: Any, overrides: Mapping[str, Any]) -> DecodeControls:
    """The checkpoint's ``decode.*`` controls (its config's ``decode`` section) with
    ``overrides`` (control name -> value; None: the checkpoint's) applied.

    Raises:
        ValueError: an unknown control name (the known ones are listed).
    """
    known = [f.name for f in dataclasses.fields(DecodeControls)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown decoding controls {unknown}; known: {known}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(decode_controls(checkpoint_decode), **given)


def model_id(checkpoint: str, meta: dict[str, Any]) -> str:
    """``<run name>/epoch<N>`` of a checkpoint, for responses and logs."""
    name = storage.basename(storage.parent(storage.resolve(checkpoint)))
    return f"{name}/epoch{meta.get('epoch', 0) + 1}" if meta else name


@dataclass
class CaptionService:
    """A loaded checkpoint that captions lists of PIL images (beam search, top-n beams; or
    ``sample``: ``n_best`` samples per image).

    The images of one call are decoded as one batch, padded as the checkpoint's flavour pads
    (``model.padding``: HeriCap's captions do not depend on the batch; a research flavour pads
    like the research code, so its captions do). ``collapse_repeats`` None: the checkpoint's
    ``decode.collapse_repeats``. ``decode``: decoding controls (``alpha``, ``min_len``,
    ``top_k``..., the ``decode.*`` names) over the checkpoint's own; a None value keeps the
    checkpoint's. ``seed``: the sampling generator's seed, per call (the same images give the
    same samples). ``device``: where the model runs (None: CUDA when present, else the CPU);
    ``mixed_precision``: ``exp.mixed_precision`` (``auto``: bf16 on a GPU that supports it).
    """

    checkpoint: str
    beam_size: int = 5
    n_best: int = 3
    max_len: int = 20
    torch_threads: int = 0
    collapse_repeats: bool | None = None
    decode: Mapping[str, Any] = field(default_factory=dict)
    sample: bool = False
    seed: int = 0
    device: str | None = None
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if self.n_best < 1:
            raise ValueError(f"n_best={self.n_best} must be >= 1")
        self.torch_device = pick_device(self.device)
        # weights_only=True, strict
        self.loaded = load_checkpoint(self.checkpoint, device=self.torch_device)
        search = self.loaded.model.search
        if not self.sample and self.n_best > self.beam_size and search != "research":
            raise ValueError(f"n_best={self.n_best} must be in [1, beam_size={self.beam_size}]")
        if self.collapse_repeats is None:
            self.collapse_repeats = self.loaded.config.decode.collapse_repeats
        self.controls = service_controls(self.loaded.config.decode, self.decode)
        self.controls.validate(None if self.sample else self.beam_size, self.max_len)
        if not self.sample:
            check_search_controls(search, self.controls)
        self.resize = resize_spec(self.loaded.config.dataset)
        self.id = model_id(self.checkpoint, self.loaded.meta)

    def prepare(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        canvases, sizes = zip(*(resize_to_canvas(im, self.resize) for im in images), strict=True)
        return np.stack(canvases), np.asarray(sizes)

    def settings(self) -> dict[str, Any]:
        """How captions are decoded: beam size or sampling, length, every control."""
        how = {"sample": self.sample, "seed": self.seed} if self.sample else {}
        return {
            "beam_size": None if self.sample else self.beam_size,
            "n_best": self.n_best,
            "max_len": self.max_len,
            "collapse_repeats": self.collapse_repeats,
            **self.controls.as_dict(),
            **how,
        }

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[dict[str, Any]]:
        """One result per image: ``caption``, ``beams`` (best first: ``caption``, ``log_prob``,
        ``tokens`` as the search returns them and each token's ``token_log_probs``)."""
        if not images:
            return []
        t0 = time.perf_counter()
        model, vocab = self.loaded.model, self.loaded.vocab
        batch, sizes = self.prepare(images)
        x, hw = prepare_batch(
            batch, sizes, model.input_multiple, model.zero_padding, self.torch_device
        )
        with autocast_for(self.torch_device, self.mixed_precision):
            out = model.generate(
                x,
                beam_size=self.beam_size,
                max_len=self.max_len,
                n_best=self.n_best,
                image_hw=hw,
                controls=self.controls,
                sample=self.sample,
                generator=torch.Generator(device=x.device).manual_seed(self.seed),
            )
        decode_ms = 1000 * (time.perf_counter() - t0)
        results = []
        for tokens, log_probs, per_token in zip(
            out.tokens, out.log_probs, out.token_log_probs, strict=True
        ):
            beams = [
                {
                    "caption": vocab.decode(t.tolist(), collapse_repeats=self.collapse_repeats),
                    "log_prob": float(lp),
                    "tokens": t.tolist(),
                    "token_log_probs": tl.tolist(),
                }
                for t, lp, tl in zip(tokens, log_probs, per_token, strict=True)
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
