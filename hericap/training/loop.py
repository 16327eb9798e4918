"""The Ray Train worker entry point: ``train_loop_per_worker`` runs the
:class:`~hericap.training.recipe.CaptionRecipe` on every worker."""

from __future__ import annotations

from typing import Any

from hericap.log import setup_logging
from hericap.training.recipe import CaptionRecipe

__all__ = ["train_loop_per_worker"]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: set up, train, clean up (see :class:`CaptionRecipe` for the config)."""
    setup_logging()
    recipe = CaptionRecipe(loop_config)
    if recipe.setup():
        recipe.train()
    recipe.cleanup()
