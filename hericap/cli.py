"""The ``hericap`` command line: prepare, train, eval, score, tune, serve, caption, demo.

Training and evaluation take the seed's dotted overrides (``optimizer.batch_size=32``,
``split='test'``); ``preset=NAME`` picks a preset (``demo``, ``coco``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hericap.config.loader import (
    ConfigError,
    NotEnoughResourcesError,
    from_dict,
    list_presets,
    load_config,
)
from hericap.log import setup_logging

logger = logging.getLogger("hericap")


def _config(overrides: Sequence[str], default_preset: str):
    has_preset = any(o.split("=", 1)[0] == "preset" for o in overrides)
    return load_config(overrides, preset=None if has_preset else default_preset)


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


def _train_and_test(cfg, skip_test: bool = False, compare_xe: bool = False) -> dict | None:
    """Train, then score the best checkpoint on the test split. With ``compare_xe`` and SCST
    epochs, the best XE checkpoint is scored too (under ``report["xe"]``)."""
    from hericap.evaluation.coco_metrics import CocoScorer
    from hericap.runtime.batch_eval import evaluate_checkpoint
    from hericap.runtime.cluster import ray_session
    from hericap.training.driver import train

    with ray_session(cfg.exp.ray_address, cfg.exp.ray_num_cpus):
        outcome = train(cfg)
        if outcome.best_checkpoint is None:
            logger.info("training took %.0fs; no epoch finished yet", outcome.wall_s)
            return None
        logger.info(
            "training took %.0fs; best val CIDEr %.3f (epoch %d, %s)",
            outcome.wall_s,
            outcome.best_metrics["val_CIDEr"],
            outcome.best_metrics["epoch"] + 1,
            outcome.best_metrics.get("phase", "xe"),
        )
        if skip_test:
            return None
        # one toolkit (one METEOR JVM) for both checkpoints; its JVM loads during the decode
        with CocoScorer(spice_jars=None) as scorer:
            report = evaluate_checkpoint(cfg, outcome.best_checkpoint, "test", scorer=scorer)
            if compare_xe and outcome.best_xe_checkpoint is not None:
                xe = evaluate_checkpoint(
                    cfg,
                    outcome.best_xe_checkpoint,
                    "test",
                    out_dir=Path(cfg.run_dir) / "xe",
                    with_oracle=False,  # the same references: the oracle is the report's
                    scorer=scorer,
                )
                report["xe"] = {
                    k: xe[k]
                    for k in ("metrics", "metrics_4ref", "semantic", "checkpoint", "training")
                }
        return report


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args.overrides, default_preset="coco")
    report = _train_and_test(cfg, skip_test=args.no_test)
    if report is not None:
        from hericap.evaluation.report import format_table

        print(format_table(report))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hericap.evaluation.report import format_table
    from hericap.runtime.batch_eval import evaluate_checkpoint
    from hericap.runtime.cluster import ray_session

    pre = load_config(args.overrides, preset=None, validate=False) if args.overrides else None
    ckpt = pre.exp.checkpoint if pre else None
    if not ckpt:
        raise ConfigError("eval needs exp.checkpoint=PATH (a HeriCap checkpoint folder)")
    saved = Path(ckpt) / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"{ckpt} is not a HeriCap checkpoint folder (no config.json)")
    # The checkpoint's own config is the base; the command line overrides it.
    base = from_dict(json.loads(saved.read_text()))
    cfg = load_config(args.overrides, base=base)
    with ray_session(cfg.exp.ray_address, cfg.exp.ray_num_cpus):
        report = evaluate_checkpoint(cfg, ckpt, cfg.split)
    print(format_table(report))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from hericap.evaluation.coco_files import load_annotations, load_results, references_for
    from hericap.evaluation.coco_metrics import METRIC_KEYS, CocoScorer

    results = load_results(args.results)
    references = references_for(results, load_annotations(args.annotations))
    with CocoScorer(meteor=not args.no_meteor, spice_jars=args.spice_jars) as scorer:
        metrics = scorer.score(references, results)
        spice = scorer.spice
    print(f"{len(results)} images, {sum(len(v) for v in references.values())} references")
    for key in METRIC_KEYS:
        value = metrics[key]
        print(f"  {key:<9}{'unavailable' if value is None else f'{value:.4f}'}")
    if not spice.available:
        print(f"  (SPICE unavailable: {spice.reason})")
    if args.json:
        print(json.dumps(metrics))
    return 0


# What the demo is meant to reach on a 2-core machine (issue 2); reported, never hidden.
DEMO_TARGETS = {
    "wall_s_max": 600.0,
    "cider_min": 1.0,
    "cider_4ref_vs_oracle_min": 0.8,
    "shape_f1_min": 0.6,
}


def demo_targets(scores: dict) -> dict:
    """Each demo target with the value reached and whether it holds."""
    ratio = scores["metrics_4ref"]["CIDEr"] / scores["oracle"]["CIDEr"]
    checks = {
        "wall_s": (scores["wall_s"], scores["wall_s"] <= DEMO_TARGETS["wall_s_max"]),
        "CIDEr": (
            scores["metrics"]["CIDEr"],
            scores["metrics"]["CIDEr"] >= DEMO_TARGETS["cider_min"],
        ),
        "CIDEr_4ref_over_oracle": (ratio, ratio >= DEMO_TARGETS["cider_4ref_vs_oracle_min"]),
        "shape_f1": (
            scores["semantic"]["shape_f1"],
            scores["semantic"]["shape_f1"] >= DEMO_TARGETS["shape_f1_min"],
        ),
    }
    return {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()} | {"goals": DEMO_TARGETS}


def cmd_demo(args: argparse.Namespace) -> int:
    from hericap.evaluation.report import format_phase_comparison, format_table

    t0 = time.time()
    cfg = load_config(args.overrides, preset="demo")
    report = _train_and_test(cfg, compare_xe=True)
    scores = {
        "split": report["split"],
        "num_images": report["num_images"],
        "metrics": report["metrics"],
        "metrics_4ref": report["metrics_4ref"],
        "oracle": report["oracle"],
        "semantic": report["semantic"],
        "oracle_semantic": report["oracle_semantic"],
        "checkpoint": report["checkpoint"],
        "decode": report["decode"],
        "training": report["training"],
        "xe": report.get("xe"),
        "spice_status": report["spice_status"],
        "wall_s": time.time() - t0,
    }
    scores["targets"] = demo_targets(scores)
    out = Path(cfg.run_dir) / "test_scores.json"
    out.write_text(json.dumps(scores, indent=1))
    print()
    print(
        f"HeriCap demo: {report['num_images']} synthetic test images, "
        f"beam {report['decode']['beam_size']}, {time.time() - t0:.0f}s in all"
    )
    print(format_table(report))
    if report.get("xe"):
        print(f"\n{format_phase_comparison(report['xe'], report)}")
    print("\ndemo targets (issue 2):")
    for key, t in scores["targets"].items():
        if key != "goals":
            print(f"  {key:<24}{t['value']:>9.3f}  {'met' if t['met'] else 'NOT met'}")
    print(f"\nscores: {out}\ncheckpoint: {report['checkpoint']}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's curves from its metrics.csv / steps.csv."""
    from hericap.training.run_logs import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Ray Tune + Optuna + ASHA sweep over a space file; exports the best trial."""
    from hericap.runtime.cluster import ray_session
    from hericap.tune.sweep import SweepInterruptedError, load_space, run_sweep

    space = load_space(args.space, args.overrides)
    name = args.name or Path(args.space).stem
    try:
        # a local cluster gets the preset's logical CPUs (demo: 4), as `hericap train` does: on
        # 2 cores, 2 CPUs leave Ray Data's read tasks none beside a trial's workers (deadlock)
        with ray_session(args.ray_address, space.base_config().exp.ray_num_cpus):
            summary = run_sweep(space, name, args.output_dir, resume=args.resume)
    except SweepInterruptedError as e:
        logger.error("%s", e)
        return 130  # the shell's code for "stopped by Ctrl-C"
    print(json.dumps(summary))
    return 0


def _serve_args(args: argparse.Namespace) -> dict:
    from hericap.serve.server import resolve_checkpoint

    given = {
        "beam_size": args.beam_size,
        "n_best": args.n_best,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": None if args.batch_wait_ms is None else args.batch_wait_ms / 1000,
        "num_cpus": args.replica_cpus,
    }
    # options left out take the application's defaults (hericap.serve.app.DEFAULTS)
    out = {
        "checkpoint": resolve_checkpoint(args.checkpoint, args.best),
        "num_replicas": args.replicas,
        **{k: v for k, v in given.items() if v is not None},
    }
    if args.max_replicas:
        out["autoscaling"] = {"min_replicas": args.replicas, "max_replicas": args.max_replicas}
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    """Ray Serve HTTP endpoint for a checkpoint (or a sweep's best)."""
    from hericap.serve.server import start, stop, wait_forever, write_serve_config

    serve_args = _serve_args(args)
    if args.write_config:
        path = write_serve_config(args.write_config, serve_args, args.host, args.port)
        print(f"wrote {path}: `serve deploy {path}` runs it on a cluster")
        return 0
    url = start(serve_args, args.host, args.port)
    print(f"serving {serve_args['checkpoint']} at {url} (POST /caption, GET /healthz, /docs)")
    try:
        wait_forever()
    finally:
        stop()
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption image files with a checkpoint (no Ray), all of them as one batch; optionally
    draw attention maps."""
    from hericap.serve.images import ImageLimits, UploadRejectedError, open_upload
    from hericap.serve.service import CaptionService

    service = CaptionService(
        args.checkpoint,
        beam_size=args.beam_size,
        n_best=args.n_best,
        collapse_repeats=True if args.collapse_repeats else None,
    )
    paths, images, failures = [], [], 0
    for path in args.images:
        try:
            images.append(open_upload(Path(path).read_bytes(), ImageLimits()))
            paths.append(path)
        except (OSError, UploadRejectedError) as e:
            logger.error("%s: %s", path, e)
            failures += 1
    results = service.caption(images)  # one batch, padded as the checkpoint's flavour pads
    for i, (path, result) in enumerate(zip(paths, results, strict=True)):
        if args.json:
            line = {"image": path, "model": service.id, "captions": result["beams"]}
            print(json.dumps(line | {"collapse_repeats": service.collapse_repeats}))
        else:
            print(f"{path}\t{result['caption']}")
        if args.explain:
            from hericap.evaluation.explain import explain

            out = Path(args.explain)
            if len(paths) > 1:
                out = out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
            canvases, sizes = service.prepare([images[i]])
            vocab = service.loaded.vocab
            tokens = vocab.encode(result["caption"])[1:-1]
            explain(service.loaded.model, vocab, canvases[0], tuple(sizes[0]), tokens, out)
            print(f"attention maps: {out}")
    return 1 if failures else 0


def cmd_import(args: argparse.Namespace) -> int:
    """Convert a GRIT / HierCap checkpoint into a HeriCap checkpoint folder."""
    from hericap.checkpoint.research import import_research_checkpoint

    try:
        report = import_research_checkpoint(
            args.research, args.checkpoint, args.config, args.vocab, args.out, args.overrides
        )
    except RuntimeError as e:  # the weights do not fit: the message lists the keys
        logger.error("%s", e)
        return 2
    print(json.dumps(report.summary()))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    """Build the configured model on CPU and print its branches and parameter counts."""
    from hericap.data.transforms import resize_spec
    from hericap.models.builder import build_captioner, format_parameter_summary

    cfg = load_config(args.overrides)
    model = build_captioner(cfg.model, args.vocab_size, resize_spec(cfg.dataset).model_size)
    print(
        f"preset {cfg.preset}: memories {model.memory_names}, fusion "
        f"{cfg.model.cap_generator.decoder_name}, grid layers {cfg.model.grid_layer_type}"
    )
    print(format_parameter_summary(model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hericap", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

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

    overrides_help = f"key=value overrides; preset=NAME picks one of {list_presets()}"
    tr = sub.add_parser("train", help="train on Ray, then score the test split")
    tr.add_argument("overrides", nargs="*", help=overrides_help)
    tr.add_argument("--no-test", action="store_true", help="skip test decoding and scoring")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="decode and score a split with exp.checkpoint=PATH")
    ev.add_argument("overrides", nargs="*", help=overrides_help)
    ev.set_defaults(func=cmd_eval)

    sc = sub.add_parser("score", help="score a COCO results file against COCO annotations")
    sc.add_argument("--results", required=True, help="[{image_id, caption}] JSON")
    sc.add_argument("--annotations", required=True, help="COCO caption annotations JSON")
    sc.add_argument("--json", action="store_true", help="end with one JSON line of the metrics")
    sc.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves a JVM)")
    sc.add_argument("--spice-jars", default=None, help="folder of the CoreNLP 3.6.0 jars")
    sc.set_defaults(func=cmd_score)

    mo = sub.add_parser("model", help="build the configured model and print its parameters")
    mo.add_argument("overrides", nargs="*", help=overrides_help)
    mo.add_argument("--vocab-size", type=int, default=10_000, help="vocabulary size to assume")
    mo.set_defaults(func=cmd_model)

    pl = sub.add_parser("plot", help="draw a training run's curves (loss, val CIDEr, ...) as PNG")
    pl.add_argument("run_dir", help="the run folder, outputs/<exp.name>")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    pl.set_defaults(func=cmd_plot)

    tu = sub.add_parser("tune", help="Ray Tune + Optuna sweep (tune_spaces/*.yaml)")
    tu.add_argument("--space", required=True, help="a space file, e.g. tune_spaces/tiny_cpu.yaml")
    tu.add_argument("overrides", nargs="*", help="fixed key=value overrides for every trial")
    tu.add_argument("--name", default=None, help="sweep name (default: the space file's stem)")
    tu.add_argument("--output-dir", default="outputs", help="sweeps go to OUTPUT_DIR/NAME")
    tu.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    tu.add_argument("--ray-address", default=None, help="Ray cluster (default: local)")
    tu.set_defaults(func=cmd_tune)

    se = sub.add_parser("serve", help="Ray Serve HTTP captioning endpoint (127.0.0.1)")
    se.add_argument("--checkpoint", default=None, help="a checkpoint folder")
    se.add_argument("--best", default=None, help="a sweep folder: serve its exported best/")
    se.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--replicas", type=int, default=1, help="replicas (autoscaling: minimum)")
    se.add_argument("--max-replicas", type=int, default=0, help="> 0: autoscale up to this")
    # left out: the application's defaults (DEFAULTS in hericap/serve/app.py; README, "Serving")
    se.add_argument("--replica-cpus", type=float, default=None, help="CPUs per replica")
    se.add_argument("--max-batch-size", type=int, default=None, help="@serve.batch size")
    se.add_argument("--batch-wait-ms", type=float, default=None, help="@serve.batch wait")
    se.add_argument("--beam-size", type=int, default=None)
    se.add_argument("--n-best", type=int, default=None, help="beams returned per image")
    se.add_argument("--write-config", default=None, help="write a `serve deploy` YAML and exit")
    se.set_defaults(func=cmd_serve)

    ca = sub.add_parser("caption", help="caption image files with a checkpoint")
    ca.add_argument("images", nargs="+", help="image files")
    ca.add_argument("--checkpoint", required=True, help="a checkpoint folder")
    ca.add_argument("--beam-size", type=int, default=5)
    ca.add_argument("--n-best", type=int, default=1, help="captions per image, best first")
    ca.add_argument(
        "--json", action="store_true", help="one JSON line per image: captions, ids, log-probs"
    )
    ca.add_argument(
        "--collapse-repeats", action="store_true", help="collapse repeated words (research eval)"
    )
    ca.add_argument("--explain", default=None, help="PNG of per-word attention heatmaps")
    ca.set_defaults(func=cmd_caption)

    im = sub.add_parser("import", help="convert a GRIT/HierCap checkpoint to a checkpoint folder")
    im.add_argument("research", choices=["grit", "hiercap"], help="the research code it comes from")
    im.add_argument("--checkpoint", required=True, help="research .pth (caption or detector)")
    im.add_argument("--config", required=True, help="the research config YAML it was trained with")
    im.add_argument("--vocab", required=True, help="the research vocabulary JSON")
    im.add_argument("--out", required=True, help="the checkpoint folder to write")
    im.add_argument("overrides", nargs="*", help="key=value overrides of the written config")
    im.set_defaults(func=cmd_import)

    demo = sub.add_parser("demo", help="synthetic data -> Ray Train -> test scores table")
    demo.add_argument("overrides", nargs="*", help=overrides_help)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, NotEnoughResourcesError, FileNotFoundError, ValueError) as e:
        logger.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
