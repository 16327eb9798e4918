"""Ray Data datasets over the Parquet shards, and plain Ray tasks.

Shards are read with ``ray.data.read_parquet``; images are decoded and resized on CPU workers in
``map_batches``; captions travel as strings. Train datasets randomise block order per execution
(each epoch re-executes the pipeline) and the worker adds a local shuffle buffer.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import ray
import ray.data

from hericap.data import storage
from hericap.data.augment import RandAugment
from hericap.data.decode import decode_batch
from hericap.data.transforms import ResizeSpec

__all__ = ["run_on_ray", "shard_dataset"]

logger = logging.getLogger(__name__)

TRAIN_COLUMNS = ["image_id", "image", "captions"]
DECODED_BLOCK_BYTES = 32 * 2**20


def shard_dataset(
    files: Sequence[str | Path],
    resize: ResizeSpec | int,
    shuffle: bool = False,
    columns: Sequence[str] = TRAIN_COLUMNS,
    decode_batch_size: int = 64,
    concurrency: int | None = None,
    keep_ids: frozenset[str] | None = None,
    augment: RandAugment | None = None,
    seed: int | None = None,
    cache: bool = False,
) -> ray.data.Dataset:
    """Decoded images (+ the other ``columns``) of some shards as a Ray Dataset.

    Args:
        files: shard paths (one split).
        resize: how images are resized (an int: square side).
        shuffle: randomise block order at each execution (train).
        columns: shard columns to read (``image`` is replaced by the decoded array, and
            ``image_hw`` added).
        decode_batch_size: rows per ``map_batches`` call.
        concurrency: decode tasks at once (None: Ray decides).
        keep_ids: keep only these image ids (the ``dataset.overfit`` subset, eval limits).
        augment: training augmentation (None for val/test).
        seed: with ``shuffle``, a fixed block order (every execution the same; for exact
            resume), else a fresh one per execution.
        cache: decode now, once, into the object store (blocks in file order), and return a
            dataset over those blocks: executions re-read them instead of decoding again.
            Only for pixels that do not change between executions (no ``augment``).
    """
    if cache and augment is not None:
        raise ValueError("cache=True would freeze one draw of the augmentation for every epoch")
    if isinstance(resize, int):
        resize = ResizeSpec(size=resize)
    located = [storage.filesystem(f) for f in files]  # one split: all local or all on S3
    # Ray 2.60's default Parquet reader (datasource V2) packs small files into one block, and a
    # block is decoded by one task: 600 images in 4 files decoded on one core (55 images/s vs 96
    # on 2 cores, benchmarks/bench_data.py). The V1 reader keeps a block per file and splits
    # further to ``override_num_blocks``, so every decode task slot has work.
    ctx = ray.data.DataContext.get_current()
    previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        ds = ray.data.read_parquet(
            [path for _, path in located],
            columns=list(columns),
            filesystem=located[0][0],
            override_num_blocks=max(len(files), 2 * concurrency) if concurrency else None,
        )
    finally:
        ctx.use_datasource_v2 = previous
    if shuffle and not cache:
        ds = ds.randomize_block_order(seed=seed)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"resize": resize, "augment": augment, "keep_ids": keep_ids},
        batch_size=decode_batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
    )
    # Ray cuts a task's output into 128 MiB blocks by default: ~100 canvases of 640², so nothing
    # reaches the consumer until a task has decoded that many (~1.8 s of a core per epoch
    # start). At 32 MiB the first batch of benchmarks/bench_data.py arrives in 1.65-1.8 s instead
    # of 2.9-3.1 s (figures in the README); 8 MiB was slower (per-block overhead). The setting
    # is this dataset's own context, not the process-wide one.
    ds.context.target_max_block_size = DECODED_BLOCK_BYTES
    if not cache:
        return ds
    # A fixed block order, so that a seeded shuffle of the cached blocks repeats exactly (a
    # resumed run decodes its own cache). Train's ingest sets its own execution options.
    ds.context.execution_options.preserve_order = True
    ds = ds.materialize()
    return ds.randomize_block_order(seed=seed) if shuffle else ds


def _call_with(fn):
    """A plain function calling ``fn`` (Ray tasks take functions, not partials or objects)."""

    def call(item):
        return fn(item)

    return call


def run_on_ray(fn, items: Sequence, num_cpus: float = 1.0, max_in_flight: int = 0):
    """Run ``fn(item)`` for every item as Ray tasks; yield results as they finish.

    ``max_in_flight`` bounds the tasks submitted at once (0: twice the cluster's CPUs), so a
    dataset of many shards does not queue them all.
    """
    if not items:
        return
    task = ray.remote(num_cpus=num_cpus)(_call_with(fn))
    limit = max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending = iter(items)
    in_flight = [task.remote(item) for item in itertools.islice(pending, limit)]
    while in_flight:
        done, in_flight = ray.wait(in_flight, num_returns=1)
        yield ray.get(done[0])
        in_flight.extend(task.remote(item) for item in itertools.islice(pending, 1))
