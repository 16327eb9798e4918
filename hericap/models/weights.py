"""Strict weight loading: a state dict that does not match its module is an error."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load_state_dict_strict"]


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is a
    ``RuntimeError`` that lists them (``what`` names the source in the message)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or mismatched:
        shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in mismatched[:10]]
        raise RuntimeError(
            f"{what} does not match the model: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}; "
            f"shape mismatches (key, checkpoint, model) {shapes}"
        )
    model.load_state_dict(state, strict=True)
