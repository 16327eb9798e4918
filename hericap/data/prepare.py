"""Turn a dataset into Parquet shards plus a manifest and a vocabulary.

Only the embedded synthetic dataset is here so far; real readers (COCO Karpathy, Flickr, nocaps)
plug into :data:`PREPARERS`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from hericap.data import synthetic
from hericap.data.shards import VOCAB_NAME, Manifest, ShardWriter
from hericap.data.text import Vocabulary

__all__ = ["PREPARERS", "prepare_synthetic"]

logger = logging.getLogger(__name__)


def prepare_synthetic(
    out_dir: str | Path,
    num_train: int = 6000,
    num_val: int = 250,
    num_test: int = 500,
    seed: int = 0,
    image_size: int = 64,
    min_count: int = 5,
    shard_rows: int = 1000,
    progress: bool = True,
) -> Manifest:
    """Generate the synthetic dataset into shards.

    Args:
        out_dir: folder for shards, ``manifest.json`` and ``vocab.json``.
        num_train: train images; ``num_val``/``num_test`` likewise.
        seed: dataset seed; the same seed gives byte-identical shards.
        image_size: square image side in pixels.
        min_count: vocabulary keeps train words seen at least this often.
        shard_rows: rows per Parquet shard.
        progress: show a progress bar.

    Returns:
        The manifest written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    shards: list[dict] = []
    train_captions: list[str] = []
    total = sum(sizes.values())
    with tqdm(total=total, desc="synthetic", unit="img", disable=not progress) as bar:
        for split, n in sizes.items():
            writer = ShardWriter(out, split, shard_rows=shard_rows)
            for s in synthetic.iter_split(seed, split, n, image_size=image_size):
                writer.add(
                    {
                        "image_id": s.image_id,
                        "split": split,
                        "image": s.jpeg,
                        "width": s.width,
                        "height": s.height,
                        "captions": s.captions,
                        "source": "synthetic",
                        "file_name": None,
                        "scene": json.dumps(s.scene.to_dict()),
                    }
                )
                if split == "train":
                    train_captions.extend(s.captions)
                bar.update(1)
            shards.extend(writer.close())
    vocab = Vocabulary.build(train_captions, min_count=min_count)
    vocab.save(out / VOCAB_NAME)
    manifest = Manifest(
        root=out,
        source="synthetic",
        shards=shards,
        counts={k: v for k, v in sizes.items() if v},
        vocab_file=VOCAB_NAME,
        info={
            "seed": seed,
            "image_size": image_size,
            "vocab_min_count": min_count,
            "vocab_size": len(vocab),
            "generator_version": synthetic.GENERATOR_VERSION,
        },
    )
    manifest.write()
    logger.info("wrote %d synthetic images to %s (vocabulary: %d words)", total, out, len(vocab))
    return manifest


PREPARERS: dict[str, Callable[..., Manifest]] = {"synthetic": prepare_synthetic}
