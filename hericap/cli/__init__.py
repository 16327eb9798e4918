"""The ``hericap`` command line: prepare, train, eval, score, tune, serve, caption, demo.

Each command lives in a module of this package with a ``register(subparsers)`` function; this
module assembles them. Training and evaluation take the seed's dotted overrides
(``optimizer.batch_size=32``, ``split='test'``); ``preset=NAME`` picks a preset.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hericap.cli import data, model, research, score, serve, train, tune
from hericap.cli.common import EXIT_USER_ERROR
from hericap.config.loader import ConfigError, NotEnoughResourcesError
from hericap.log import setup_logging

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

logger = logging.getLogger(__name__)

# Modules that register commands, in the order `hericap --help` lists them.
COMMAND_MODULES = (data, train, score, model, tune, serve, research)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hericap",
        description="HeriCap: prepare, train, eval, score, tune, serve and caption on Ray.",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except (
        ConfigError,
        NotEnoughResourcesError,
        FileNotFoundError,
        FileExistsError,
        ValueError,
    ) as e:
        logger.error("%s", e)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
