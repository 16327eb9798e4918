"""``hericap prepare``: a dataset to Parquet shards, a manifest, a vocabulary and a report."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def cmd_prepare(args: argparse.Namespace) -> int:
    from hericap.data.prepare import prepare_records, prepare_synthetic
    from hericap.data.readers import DEFAULT_LAYOUT, READERS

    known = ["synthetic", *READERS]
    if args.dataset not in known:
        raise SystemExit(f"unknown dataset '{args.dataset}'; known: {known}")
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint  # before Ray starts: workers inherit
    if args.dataset == "synthetic":
        m = prepare_synthetic(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            num_test=args.num_test,
            seed=args.seed,
            image_size=args.image_size,
            min_count=args.min_count,
            shard_rows=args.shard_rows,
        )
    else:
        from hericap.runtime.cluster import ray_session
        from hericap.runtime.datasets import run_on_ray

        root = Path(args.root or os.environ.get("DATA_ROOT", "data"))
        layout = DEFAULT_LAYOUT[args.dataset]
        annotations = Path(args.annotations) if args.annotations else root / layout["annotations"]
        images = Path(args.images) if args.images else root / layout["images"]
        records = READERS[args.dataset](
            annotations=annotations, images=images, split=args.split, split_list=args.split_list
        )
        with ray_session(args.ray_address, None):
            m = prepare_records(
                records,
                args.out,
                source=args.dataset,
                shard_rows=args.shard_rows,
                min_count=args.min_count,
                info={"annotations": str(annotations), "images": str(images)},
                run=lambda fn, plans: run_on_ray(fn, plans),
            )
    print(
        json.dumps(
            {
                "out": str(m.root),
                "counts": m.counts,
                "shards": len(m.shards),
                "skipped": m.info.get("skipped", {}),
            }
        )
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prepare`` command."""
    prep = sub.add_parser(
        "prepare", help="write a dataset as Parquet shards + manifest + vocabulary + report"
    )
    prep.add_argument(
        "dataset", help="synthetic, coco, flickr8k, flickr30k, nocaps or coco_captions"
    )
    prep.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    prep.add_argument("--root", default=None, help="DATA_ROOT (default: $DATA_ROOT, else ./data)")
    prep.add_argument("--annotations", default=None, help="annotation file (default: layout)")
    prep.add_argument("--images", default=None, help="image folder (default: layout)")
    prep.add_argument("--split", default="val", help="split of coco_captions / nocaps records")
    prep.add_argument("--split-list", default=None, help="coco_captions: ids/file names to keep")
    prep.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (AWS_ENDPOINT_URL)")
    prep.add_argument("--ray-address", default=None, help="Ray cluster (default: local)")
    prep.add_argument("--num-train", type=int, default=6000, help="synthetic only")
    prep.add_argument("--num-val", type=int, default=250, help="synthetic only")
    prep.add_argument("--num-test", type=int, default=500, help="synthetic only")
    prep.add_argument("--seed", type=int, default=0, help="synthetic only")
    prep.add_argument("--image-size", type=int, default=64, help="synthetic only")
    prep.add_argument("--min-count", type=int, default=5, help="vocabulary min word count")
    prep.add_argument("--shard-rows", type=int, default=1000, help="records per shard")
    prep.set_defaults(func=cmd_prepare)
