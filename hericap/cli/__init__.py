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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides allowed anywhere after the command (also
    after options: ``hericap tune --space S --output-dir D exp.name=x``, which argparse alone
    refuses once an option has split the positionals)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
