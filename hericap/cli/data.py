"""``hericap prepare``: a dataset to Parquet shards, a manifest, a vocabulary and a report."""

from __future__ import annotations

import argparse
import json
import logging
import os

logger = logging.getLogger(__name__)


def _per_split(values: list[str] | None, flag: str) -> tuple[str | None, dict[str, str]]:
    """The values of a repeatable flag: ``VALUE`` (every split) and ``SPLIT=VALUE`` ones."""
    plain: str | None = None
    keyed: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if sep and name and "/" not in name:
            if name in keyed:
                raise ValueError(f"{flag} {name}=... is given twice")
            keyed[name] = rest
        elif plain is None:
            plain = value
        else:
            raise ValueError(f"{flag} is given twice without SPLIT=: {values}")
    return plain, keyed


def _sources(args: argparse.Namespace, root: str):
    """The split sources of the command line: several ``--split SPLIT=FILE``, or one file."""
    from hericap.data import storage
    from hericap.data.readers import DEFAULT_LAYOUT, SplitSource

    layout = DEFAULT_LAYOUT[args.dataset]
    split, split_files = _per_split(args.split, "--split")
    images, split_images = _per_split(args.images, "--images")
    split_list, split_lists = _per_split(args.split_list, "--split-list")
    default_images = images or storage.join(root, layout["images"])
    if not split_files:
        annotations = args.annotations or storage.join(root, layout["annotations"])
        name = split or "val"
        return [
            SplitSource(
                name,
                annotations,
                split_images.get(name, default_images),
                split_lists.get(name, split_list),
            )
        ]
    unknown = (set(split_images) | set(split_lists)) - set(split_files)
    if split or args.annotations or split_list or unknown:
        raise ValueError(
            "with --split SPLIT=FILE, give every split as SPLIT=FILE, and --images / "
            "--split-list per split as SPLIT=VALUE (or --images DIR for all); "
            f"splits without a file: {sorted(unknown)}"
        )
    return [
        SplitSource(name, ann, split_images.get(name, default_images), split_lists.get(name))
        for name, ann in split_files.items()
    ]


def _prepare_real(args: argparse.Namespace):
    from hericap.data.prepare import prepare_records
    from hericap.data.readers import KARPATHY_DATASETS, READERS, read_splits
    from hericap.runtime.cluster import check_shared_locations, ray_session
    from hericap.runtime.datasets import run_on_ray

    root = args.root or os.environ.get("DATA_ROOT", "data")  # a folder or a URI
    sources = _sources(args, root)
    if args.dataset in KARPATHY_DATASETS:
        (source,) = sources
        records = READERS[args.dataset](annotations=source.annotations, images=source.images)
    else:
        records = read_splits(args.dataset, sources)
    info = {
        "splits": {
            s.split: {"annotations": s.annotations, "images": s.images, "list": s.split_list}
            for s in sources
        }
    }
    with ray_session(args.ray_address, None):
        # the shard builds run as Ray tasks on any node: they read the images and write the
        # shards there
        check_shared_locations(
            {"--out": args.out} | {f"--images ({s.split})": s.images for s in sources},
            "preparing shards",
        )
        return prepare_records(
            records,
            args.out,
            source=args.dataset,
            shard_rows=args.shard_rows,
            min_count=args.min_count,
            info=info,
            run=lambda fn, plans: run_on_ray(fn, plans),
            add=args.add,
        )


def cmd_prepare(args: argparse.Namespace) -> int:
    from hericap.data import storage
    from hericap.data.prepare import prepare_synthetic
    from hericap.data.readers import READERS

    known = ["synthetic", *READERS]
    if args.dataset not in known:
        raise SystemExit(f"unknown dataset '{args.dataset}'; known: {known}")
    storage.check_location(args.out, "--out")
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
        m = _prepare_real(args)
    print(
        json.dumps(
            {
                "out": m.root,
                "counts": m.counts,
                "shards": len(m.shards),
                "vocab": m.vocab_file,
                "skipped": m.info.get("skipped", {}),
            }
        )
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prepare`` command."""
    prep = sub.add_parser(
        "prepare",
        help="write a dataset as Parquet shards + manifest + vocabulary + report",
        description=(
            "Several COCO-format files become one dataset in one call: --split train=A.json "
            "--split val=B.json --split test=B.json --split-list val=VAL.txt --split-list "
            "test=TEST.txt --images train=DIR --images val=DIR --images test=DIR. --add adds "
            "splits to a dataset already in --out."
        ),
    )
    prep.add_argument(
        "dataset", help="synthetic, coco, flickr8k, flickr30k, nocaps or coco_captions"
    )
    prep.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    prep.add_argument("--root", default=None, help="DATA_ROOT (default: $DATA_ROOT, else ./data)")
    prep.add_argument("--annotations", default=None, help="annotation file (default: layout)")
    prep.add_argument(
        "--images",
        action="append",
        default=None,
        help="image folder (default: layout); SPLIT=DIR for one split (repeatable)",
    )
    prep.add_argument(
        "--split",
        action="append",
        default=None,
        help="coco_captions / nocaps: the split of --annotations (default val), or SPLIT=FILE "
        "(repeatable: one dataset of several files)",
    )
    prep.add_argument(
        "--split-list",
        action="append",
        default=None,
        help="coco_captions: image ids / file names to keep; SPLIT=FILE for one split",
    )
    prep.add_argument(
        "--add",
        action="store_true",
        help="add these splits to the dataset in --out, keeping its other splits",
    )
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
