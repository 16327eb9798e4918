"""Where a run's prepared dataset lives, and getting it ready: the shard location a config names,
its manifest (the synthetic dataset is generated on demand; a seed dataset is prepared from
``dataset.root`` when its shards are missing), and fixed image subsets.

Used by training, batch evaluation and sweeps alike; nothing here imports Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import pyarrow.parquet as pq

from hericap.config.schema import Config
from hericap.data import storage, synthetic
from hericap.data.prepare import PREPARERS, ShardPlan, prepare_records
from hericap.data.readers import DEFAULT_LAYOUT, KARPATHY_DATASETS, READERS
from hericap.data.shards import Manifest, read_manifest

__all__ = ["ensure_shards", "first_image_ids", "seed_layout", "shard_dir"]

logger = logging.getLogger(__name__)

Runner = Callable[[Callable[[ShardPlan], dict], list[ShardPlan]], Iterable[dict]]


def shard_dir(cfg: Config) -> str:
    """The dataset's location: ``dataset.shard_dir``, else ``<output_dir>/data/<name>``."""
    return storage.resolve(
        cfg.dataset.shard_dir or storage.join(cfg.exp.output_dir, "data", cfg.dataset.name)
    )


def seed_layout(cfg: Config) -> tuple[str, str] | None:
    """(annotation file, image folder) of the configured dataset under ``dataset.root`` in the
    seed's layout, for the datasets whose one file holds every split; None for the others."""
    if cfg.dataset.name not in KARPATHY_DATASETS:
        return None
    layout = DEFAULT_LAYOUT[cfg.dataset.name]
    root = cfg.dataset.root
    return storage.join(root, layout["annotations"]), storage.join(root, layout["images"])


def _ensure_synthetic(cfg: Config, root: str) -> Manifest:
    ds = cfg.dataset
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


def ensure_shards(cfg: Config, run: Runner | None = None) -> Manifest:
    """The manifest of the configured dataset.

    The synthetic dataset is generated when missing or when its sizes/seed differ from the
    config. A seed dataset (``coco``, ``flickr8k``, ``flickr30k``) whose shards are missing is
    prepared from ``dataset.root`` in the seed's layout, as the seed read its raw files from
    ``DATA_ROOT`` (``run`` runs the shard builds, e.g. as Ray tasks; default: here, in turn).

    Raises:
        FileNotFoundError: no shards and nothing to prepare them from.
    """
    root = shard_dir(cfg)
    ds = cfg.dataset
    if ds.name == "synthetic":
        return _ensure_synthetic(cfg, root)
    try:
        return read_manifest(root)
    except FileNotFoundError as e:
        raw = seed_layout(cfg)
        if raw is not None and storage.exists(raw[0]):
            logger.info(
                "no shards in %s: preparing %s from dataset.root=%s (%s)",
                root,
                ds.name,
                ds.root,
                raw[0],
            )
            records = READERS[ds.name](annotations=raw[0], images=raw[1])
            kwargs = {"run": run} if run is not None else {}
            return prepare_records(
                records,
                root,
                source=ds.name,
                shard_rows=ds.shard_rows,
                min_count=ds.vocab_min_count,
                info={"annotations": raw[0], "images": raw[1]},
                progress=False,
                **kwargs,
            )
        looked = f" (nor {raw[0]} under dataset.root to prepare them from)" if raw else ""
        raise FileNotFoundError(
            f"no prepared shards for dataset '{ds.name}' in {root}{looked}: run "
            f"`hericap prepare {ds.name} --out {root}` first (known preparers: "
            f"{sorted(['synthetic', *READERS])}), or set dataset.shard_dir"
        ) from e


def first_image_ids(files: list[str], limit: int) -> list[str]:
    """The first ``limit`` image ids of some shards, in file order (deterministic)."""
    ids: list[str] = []
    for f in files:
        fs, path = storage.filesystem(f)
        ids.extend(
            pq.read_table(path, columns=["image_id"], filesystem=fs).column("image_id").to_pylist()
        )
        if len(ids) >= limit:
            break
    return ids[:limit]
