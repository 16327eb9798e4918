"""``hericap import``: a GRIT or HierCap research checkpoint as a HeriCap checkpoint folder."""

from __future__ import annotations

import argparse
import json
import logging

from hericap.cli.common import EXIT_USER_ERROR

logger = logging.getLogger(__name__)


def cmd_import(args: argparse.Namespace) -> int:
    """Convert a GRIT / HierCap checkpoint into a HeriCap checkpoint folder."""
    from hericap.checkpoint.research import import_research_checkpoint

    try:
        report = import_research_checkpoint(
            args.research, args.checkpoint, args.config, args.vocab, args.out, args.overrides
        )
    except RuntimeError as e:  # the weights do not fit: the message lists the keys
        logger.error("%s", e)
        return EXIT_USER_ERROR
    print(json.dumps(report.summary()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``import`` command."""
    im = sub.add_parser("import", help="convert a GRIT/HierCap checkpoint to a checkpoint folder")
    im.add_argument("research", choices=["grit", "hiercap"], help="the research code it comes from")
    im.add_argument("--checkpoint", required=True, help="research .pth (caption or detector)")
    im.add_argument("--config", required=True, help="the research config YAML it was trained with")
    im.add_argument("--vocab", required=True, help="the research vocabulary JSON")
    im.add_argument("--out", required=True, help="the checkpoint folder to write")
    im.add_argument("overrides", nargs="*", help="key=value overrides of the written config")
    im.set_defaults(func=cmd_import)
