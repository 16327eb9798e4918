"""``hericap model``, ``plot`` and ``average``: what a config builds, a run's curves, and the
average of checkpoints."""

from __future__ import annotations

import argparse
import logging

from hericap.cli.common import overrides_help
from hericap.config.loader import load_config

logger = logging.getLogger(__name__)


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


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's curves from its metrics.csv / steps.csv."""
    from hericap.training.run_logs import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    """Average compatible checkpoints into a new checkpoint folder."""
    from hericap.checkpoint.average import average_checkpoints

    out = average_checkpoints(args.checkpoints, args.out, allow_different=args.allow_different)
    print(f"averaged {len(args.checkpoints)} checkpoints -> {out}")
    print(f"score it: hericap eval exp.checkpoint={out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``model``, ``plot``, ``average`` commands."""
    overrides = overrides_help()
    mo = sub.add_parser("model", help="build the configured model and print its parameters")
    mo.add_argument("overrides", nargs="*", help=overrides)
    mo.add_argument("--vocab-size", type=int, default=10_000, help="vocabulary size to assume")
    mo.set_defaults(func=cmd_model)

    pl = sub.add_parser("plot", help="draw a training run's curves (loss, val CIDEr, ...) as PNG")
    pl.add_argument("run_dir", help="the run folder, outputs/<exp.name>")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    pl.set_defaults(func=cmd_plot)

    av = sub.add_parser(
        "average",
        help="average the weights of checkpoints of one run (same config, vocabulary, weights)",
    )
    av.add_argument("checkpoints", nargs="+", help="checkpoint folders (at least two)")
    av.add_argument("--out", required=True, help="the new checkpoint folder (new or empty)")
    av.add_argument(
        "--allow-different",
        action="append",
        default=[],
        metavar="KEY",
        help="a config key (or group) that may differ, e.g. exp.seed; repeatable",
    )
    av.set_defaults(func=cmd_average)
