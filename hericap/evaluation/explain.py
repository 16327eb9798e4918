"""Per-word attention heatmaps (and routing weights) for one captioned image, as a PNG.

For each generated word, the decoder's last layer's cross-attention over the grid tokens (or
the global tokens, which sit on the same map) is averaged over the fusion groups that contain
them and drawn over the image; with only the region branch, the five most attended boxes are
drawn instead. Models with routing cells get a last panel with each routing layer's path
weights. :func:`word_attention` computes the same numbers without drawing them (the web page's
``POST /explain`` sends them to the browser, which draws the panels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from hericap.data.text import Vocabulary
from hericap.data.transforms import crop_batch, prepare_batch
from hericap.models.captioner import Attention, Captioner

__all__ = ["WordAttention", "explain", "word_attention", "word_maps"]


def word_maps(att: Attention) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``(maps [T, h, w], boxes_weights [T, Q])`` of image 0 from the last decoder layer: the
    attention over the map tokens (grid, else global) per word, and over region queries."""
    last = att.weights[-1]
    h, w = att.encoded.map_size
    map_parts, region_parts = [], []
    for key, weights in last.items():
        names, offset = key.split("+"), 0
        for name in names:
            n = att.token_counts[name]
            part = weights[0, :, offset : offset + n]
            offset += n
            if name in ("grid", "global") and n == h * w:
                map_parts.append(part)
            elif name == "region":
                region_parts.append(part)
    maps = (
        torch.stack(map_parts).mean(0).reshape(-1, h, w).float().cpu().numpy()
        if map_parts
        else None
    )
    regions = torch.stack(region_parts).mean(0).float().cpu().numpy() if region_parts else None
    return maps, regions


@dataclass
class WordAttention:
    """Where the decoder looked for each word of one caption of one image.

    The model sees ``batch_hw`` pixels (the image at ``image_hw``, top-left, then padding);
    ``maps`` (``[T, h, w]`` over the whole ``batch_hw``) and region ``boxes`` (``cx, cy, w, h``
    as fractions of ``batch_hw``) are in that frame.
    """

    words: list[str]  # the caption's words, then "<eos>"
    image: np.ndarray  # uint8 [H, W, 3]: what the model saw, padding included
    image_hw: tuple[int, int]
    maps: np.ndarray | None  # [T, h, w]: attention over the map tokens per word
    regions: np.ndarray | None  # [T, Q]: attention over the region queries per word
    boxes: np.ndarray | None  # [Q, 4]: the region queries' boxes
    routing: list[tuple[str, float]] = field(default_factory=list)  # ("L1 path", mean weight)

    @property
    def batch_hw(self) -> tuple[int, int]:
        return self.image.shape[0], self.image.shape[1]


@torch.no_grad()
def word_attention(
    model: Captioner,
    vocab: Vocabulary,
    canvas: np.ndarray,
    image_hw: tuple[int, int],
    caption_tokens: list[int],
) -> WordAttention:
    """The last decoder layer's attention for each word of ``caption_tokens`` (word ids, no
    ``<bos>``/``<eos>``) over ``canvas`` (``uint8 [H, W, 3]``, the real image at ``image_hw``
    top-left), teacher-forced as in training."""
    batch = crop_batch(canvas[None], np.asarray([image_hw]), model.input_multiple)
    device = next(model.parameters()).device  # a GPU replica's model stays on its GPU
    x, hw = prepare_batch(
        canvas[None], np.asarray([image_hw]), model.input_multiple, model.zero_padding, device
    )
    tokens = torch.tensor([[vocab.bos_idx, *caption_tokens]], device=device)
    att = model.attention(x, tokens, image_hw=hw)
    maps, regions = word_maps(att)
    boxes = att.encoded.region_boxes
    routing = [
        (f"L{layer + 1} {name}", float(weight[0].float().mean()))
        for layer, paths in enumerate(att.encoded.routing or [])
        for name, weight in paths.items()
    ]
    return WordAttention(
        words=[vocab.itos[t] for t in caption_tokens] + ["<eos>"],
        image=batch[0],
        image_hw=(int(image_hw[0]), int(image_hw[1])),
        maps=maps,
        regions=regions,
        boxes=boxes[0].float().cpu().numpy() if boxes is not None else None,
        routing=routing,
    )


def _draw_boxes(ax: plt.Axes, boxes: np.ndarray, weights: np.ndarray, hw: tuple[int, int]) -> None:
    """The five most attended region boxes, thicker where attended more."""
    height, width = hw
    for q in np.argsort(weights)[::-1][:5]:
        cx, cy, bw, bh = boxes[q]
        ax.add_patch(
            plt.Rectangle(
                ((cx - bw / 2) * width, (cy - bh / 2) * height),
                bw * width,
                bh * height,
                fill=False,
                color="red",
                linewidth=1 + 3 * float(weights[q] / weights.max()),
            )
        )


def explain(
    model: Captioner,
    vocab: Vocabulary,
    canvas: np.ndarray,
    image_hw: tuple[int, int],
    caption_tokens: list[int],
    out: str | Path,
) -> Path:
    """Draw ``canvas`` (``uint8 [H, W, 3]``, the real image at ``image_hw`` top-left) with one
    heatmap per word of ``caption_tokens`` (word ids, no ``<bos>``/``<eos>``) into ``out``."""
    wa = word_attention(model, vocab, canvas, image_hw, caption_tokens)
    image, words = wa.image, wa.words
    ih, iw = wa.image_hw
    panels = len(words) + 1 + (1 if wa.routing else 0)
    cols = min(5, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image[:ih, :iw])
    axes.flat[0].set_title(" ".join(words[:-1]), fontsize=8, wrap=True)
    for i, word in enumerate(words):
        ax = axes.flat[i + 1]
        ax.imshow(image[:ih, :iw])
        if wa.maps is not None:
            m = wa.maps[i]
            heat = Image.fromarray((255 * m / max(m.max(), 1e-12)).astype(np.uint8))
            heat = heat.resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR)
            ax.imshow(np.asarray(heat)[:ih, :iw], cmap="jet", alpha=0.5)
        elif wa.regions is not None and wa.boxes is not None:
            _draw_boxes(ax, wa.boxes, wa.regions[i], wa.batch_hw)
        ax.set_title(word, fontsize=10)
    if wa.routing:
        ax = axes.flat[len(words) + 1]
        ax.axis("on")
        ax.barh([label for label, _ in wa.routing], [value for _, value in wa.routing])
        ax.set_title("routing weights", fontsize=10)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
