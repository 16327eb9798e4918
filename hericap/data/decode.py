"""Decoding a batch of shard rows into padded image canvases (the map step of the Ray Data
datasets in :mod:`hericap.runtime.datasets`; pure, so it is testable and benchmarkable alone)."""

from __future__ import annotations

import logging

import numpy as np

from hericap.data.augment import RandAugment
from hericap.data.transforms import ResizeSpec, load_image, resize_to_canvas

__all__ = ["decode_batch"]

logger = logging.getLogger(__name__)


def decode_batch(
    batch: dict[str, np.ndarray],
    resize: ResizeSpec,
    augment: RandAugment | None = None,
    keep_ids: frozenset[str] | None = None,
) -> dict[str, np.ndarray]:
    """Decode ``image`` bytes to ``uint8 [B, H, W, 3]`` canvases plus ``image_hw`` ``[B, 2]``
    (each image's real height and width on its canvas); unreadable images are dropped, logged.

    ``augment`` is applied after decoding and before resizing (fresh randomness per call, so
    per epoch); ``keep_ids`` keeps only those rows (filtered before decoding).
    """
    rng = np.random.default_rng() if augment is not None else None
    images, sizes, keep = [], [], []
    for i, data in enumerate(batch["image"]):
        if keep_ids is not None and batch["image_id"][i] not in keep_ids:
            continue
        try:
            im = load_image(data)
        except ValueError as e:
            logger.warning("skipping image %s: %s", batch["image_id"][i], e)
            continue
        if augment is not None:
            im = augment(im, rng)
        canvas, size = resize_to_canvas(im, resize)
        images.append(canvas)
        sizes.append(size)
        keep.append(i)
    out = {k: v[keep] for k, v in batch.items() if k not in ("image", "captions")}
    if "captions" in batch:
        # Lists of str (not arrays of str) so Arrow stores them as list<string> columns.
        captions = np.empty(len(keep), dtype=object)
        captions[:] = [[str(c) for c in batch["captions"][i]] for i in keep]
        out["captions"] = captions
    out["image"] = np.stack(images) if images else np.zeros((0, *resize.canvas, 3), dtype=np.uint8)
    out["image_hw"] = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
    return out
