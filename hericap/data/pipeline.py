"""Ray Data pipelines over the Parquet shards (the layer that imports Ray).

Shards are read with ``ray.data.read_parquet``; images are decoded and resized on CPU workers in
``map_batches``; captions travel as strings. Train datasets randomise block order per execution
(each epoch re-executes the pipeline) and the worker adds a local shuffle buffer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import ray.data

from hericap.data.transforms import decode_image

__all__ = ["decode_batch", "shard_dataset"]

logger = logging.getLogger(__name__)

TRAIN_COLUMNS = ["image_id", "image", "captions"]


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int, keep_ids: frozenset[str] | None = None
) -> dict[str, np.ndarray]:
    """Decode ``image`` bytes to ``uint8 [B, S, S, 3]``; unreadable images are dropped, logged.

    ``keep_ids`` keeps only those rows (filtered before decoding).
    """
    images, keep = [], []
    for i, data in enumerate(batch["image"]):
        if keep_ids is not None and batch["image_id"][i] not in keep_ids:
            continue
        try:
            images.append(decode_image(data, image_size))
            keep.append(i)
        except ValueError as e:
            logger.warning("skipping image %s: %s", batch["image_id"][i], e)
    out = {k: v[keep] for k, v in batch.items() if k not in ("image", "captions")}
    if "captions" in batch:
        # Lists of str (not arrays of str) so Arrow stores them as list<string> columns.
        captions = np.empty(len(keep), dtype=object)
        captions[:] = [[str(c) for c in batch["captions"][i]] for i in keep]
        out["captions"] = captions
    out["image"] = (
        np.stack(images) if images else np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    )
    return out


def shard_dataset(
    files: Sequence[str | Path],
    image_size: int,
    shuffle: bool = False,
    columns: Sequence[str] = TRAIN_COLUMNS,
    decode_batch_size: int = 64,
    concurrency: int | None = None,
    keep_ids: frozenset[str] | None = None,
) -> ray.data.Dataset:
    """Decoded images (+ the other ``columns``) of some shards as a Ray Dataset.

    Args:
        files: shard paths (one split).
        image_size: square side images are resized to.
        shuffle: randomise block order at each execution (train).
        columns: shard columns to read (``image`` is replaced by the decoded array).
        decode_batch_size: rows per ``map_batches`` call.
        concurrency: decode tasks at once (None: Ray decides).
        keep_ids: keep only these image ids (the ``dataset.overfit`` subset, eval limits).
    """
    ds = ray.data.read_parquet([str(f) for f in files], columns=list(columns))
    if shuffle:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": image_size, "keep_ids": keep_ids},
        batch_size=decode_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
    )
