"""Ray Data pipelines over the Parquet shards (the layer that imports Ray).

Shards are read with ``ray.data.read_parquet``; images are decoded and resized on CPU workers in
``map_batches``; captions travel as strings. Train datasets randomise block order per execution
(each epoch re-executes the pipeline) and the worker adds a local shuffle buffer.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import ray
import ray.data

from hericap.data import storage
from hericap.data.transforms import decode_image

__all__ = ["decode_batch", "run_on_ray", "shard_dataset"]

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
    located = [storage.filesystem(f) for f in files]  # one split: all local or all on S3
    ds = ray.data.read_parquet(
        [path for _, path in located], columns=list(columns), filesystem=located[0][0]
    )
    if shuffle:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": image_size, "keep_ids": keep_ids},
        batch_size=decode_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
    )


def run_on_ray(fn, items: Sequence, num_cpus: float = 1.0, max_in_flight: int = 0):
    """Run ``fn(item)`` for every item as Ray tasks; yield results as they finish.

    ``max_in_flight`` bounds the tasks submitted at once (0: twice the cluster's CPUs), so a
    dataset of many shards does not queue them all.
    """
    if not items:
        return
    task = ray.remote(num_cpus=num_cpus)(fn)
    limit = max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = iter(items)
    in_flight = [task.remote(item) for item in itertools.islice(pending, limit)]
    while in_flight:
        done, in_flight = ray.wait(in_flight, num_returns=1)
        yield ray.get(done[0])
        in_flight.extend(task.remote(item) for item in itertools.islice(pending, 1))
