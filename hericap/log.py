"""Logging set-up for process entry points (the CLI and Ray Train workers); the library only
creates loggers."""

from __future__ import annotations

import logging

__all__ = ["setup_logging"]


def setup_logging(level: int = logging.INFO) -> None:
    """HeriCap's loggers at ``level``; everything else (Ray's internals) at WARNING."""
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name in ("hericap", "__main__"):  # `python -m hericap.cli` logs as __main__
        logging.getLogger(name).setLevel(level)
    for noisy in ("ray.data", "ray.train"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
