"""``hericap model`` and ``plot``: what a config builds, and a run's curves."""

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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``model``, ``plot`` commands."""
    overrides = overrides_help()
    mo = sub.add_parser("model", help="build the configured model and print its parameters")
    mo.add_argument("overrides", nargs="*", help=overrides)
    mo.add_argument("--vocab-size", type=int, default=10_000, help="vocabulary size to assume")
    mo.set_defaults(func=cmd_model)

    pl = sub.add_parser("plot", help="draw a training run's curves (loss, val CIDEr, ...) as PNG")
    pl.add_argument("run_dir", help="the run folder, outputs/<exp.name>")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    pl.set_defaults(func=cmd_plot)
