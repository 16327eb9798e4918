"""Where a run's prepared dataset lives, and getting it ready: the shard folder a config names,
its manifest (the embedded synthetic dataset is generated on demand), and fixed image subsets.

Used by training, batch evaluation and sweeps alike; nothing here imports Ray.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow.parquet as pq

from hericap.config.schema import Config
from hericap.data import synthetic
from hericap.data.prepare import PREPARERS
from hericap.data.shards import Manifest, read_manifest

__all__ = ["ensure_shards", "first_image_ids", "shard_dir"]

logger = logging.getLogger(__name__)


def shard_dir(cfg: Config) -> Path:
    return Path(cfg.dataset.shard_dir or os.path.join(cfg.exp.output_dir, "data", cfg.dataset.name))


def ensure_shards(cfg: Config) -> Manifest:
    """The manifest of the configured dataset; the synthetic one is generated when missing or
    when its sizes/seed differ from the config."""
    root = shard_dir(cfg)
    ds = cfg.dataset
    if ds.name == "synthetic":
        want = {"train": ds.synthetic_train, "val": ds.synthetic_val, "test": ds.synthetic_test}
        want_info = {
            "seed": ds.synthetic_seed,
            "image_size": ds.image_size,
            "vocab_min_count": ds.vocab_min_count,
            "generator_version": synthetic.GENERATOR_VERSION,
        }
        try:
            m = read_manifest(root)
            info = {k: m.info.get(k) for k in want_info}
            if m.counts == {k: v for k, v in want.items() if v} and info == want_info:
                return m
            logger.info("synthetic shards in %s differ from the config; regenerating", root)
        except FileNotFoundError:
            pass
        except ValueError as e:  # an older shard format
            logger.info("%s; regenerating the synthetic shards", e)
        return PREPARERS["synthetic"](
            root,
            num_train=ds.synthetic_train,
            num_val=ds.synthetic_val,
            num_test=ds.synthetic_test,
            seed=ds.synthetic_seed,
            image_size=ds.image_size,
            min_count=ds.vocab_min_count,
            shard_rows=ds.shard_rows,
        )
    try:
        return read_manifest(root)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no prepared shards for dataset '{ds.name}' in {root}: run "
            f"`hericap prepare {ds.name} --out {root}` first (known preparers: "
            f"{sorted(PREPARERS)}), or set dataset.shard_dir"
        ) from e


def first_image_ids(files: list[Path], limit: int) -> list[str]:
    """The first ``limit`` image ids of some shards, in file order (deterministic)."""
    ids: list[str] = []
    for f in files:
        ids.extend(pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist())
        if len(ids) >= limit:
            break
    return ids[:limit]
