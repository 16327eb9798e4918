"""Per-word attention heatmaps (and routing weights) for one captioned image, as a PNG.

For each generated word, the decoder's last layer's cross-attention over the grid tokens (or
the global tokens, which sit on the same map) is averaged over the fusion groups that contain
them and drawn over the image; with only the region branch, the five most attended boxes are
drawn instead. Models with routing cells get a last panel with each routing layer's path
weights.
"""

from __future__ import annotations

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

__all__ = ["explain", "word_maps"]


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
    maps = torch.stack(map_parts).mean(0).reshape(-1, h, w).numpy() if map_parts else None
    regions = torch.stack(region_parts).mean(0).numpy() if region_parts else None
    return maps, regions


@torch.no_grad()
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
    batch = crop_batch(canvas[None], np.asarray([image_hw]), model.input_multiple)
    x, hw = prepare_batch(
        canvas[None], np.asarray([image_hw]), model.input_multiple, model.zero_padding
    )
    words = [vocab.itos[t] for t in caption_tokens] + ["<eos>"]
    tokens = torch.tensor([[vocab.bos_idx, *caption_tokens]])
    att = model.attention(x, tokens, image_hw=hw)
    maps, regions = word_maps(att)
    image = batch[0]
    ih, iw = image_hw
    routing = att.encoded.routing
    panels = len(words) + 1 + (1 if routing else 0)
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
        if maps is not None:
            heat = Image.fromarray((255 * maps[i] / max(maps[i].max(), 1e-12)).astype(np.uint8))
            heat = heat.resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR)
            ax.imshow(np.asarray(heat)[:ih, :iw], cmap="jet", alpha=0.5)
        elif regions is not None and att.encoded.region_boxes is not None:
            boxes = att.encoded.region_boxes[0].numpy()
            for q in np.argsort(regions[i])[::-1][:5]:
                cx, cy, bw, bh = boxes[q]
                ax.add_patch(
                    plt.Rectangle(
                        ((cx - bw / 2) * image.shape[1], (cy - bh / 2) * image.shape[0]),
                        bw * image.shape[1],
                        bh * image.shape[0],
                        fill=False,
                        color="red",
                        linewidth=1 + 3 * float(regions[i][q] / regions[i].max()),
                    )
                )
        ax.set_title(word, fontsize=10)
    if routing:
        ax = axes.flat[len(words) + 1]
        ax.axis("on")
        labels, values = [], []
        for layer, paths in enumerate(routing):
            for name, weight in paths.items():
                labels.append(f"L{layer + 1} {name}")
                values.append(float(weight[0].float().mean()))
        ax.barh(labels, values)
        ax.set_title("routing weights", fontsize=10)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
