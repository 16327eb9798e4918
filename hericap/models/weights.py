"""Strict weight loading: a state dict that does not match its module is an error."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["StateDiff", "diff_state", "load_state_dict_strict"]


@dataclass
class StateDiff:
    """How a state dict differs from what a module expects."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, checkpoint, model

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 20) -> str:
        def cut(keys: list) -> str:
            return f"{keys[:limit]}{' ...' if len(keys) > limit else ''}"

        return (
            f"missing keys ({len(self.missing)}) {cut(self.missing)}; "
            f"unexpected keys ({len(self.unexpected)}) {cut(self.unexpected)}; "
            f"shape mismatches (key, checkpoint, model) ({len(self.mismatched)}) "
            f"{cut(self.mismatched)}"
        )


def diff_state(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> StateDiff:
    """Compare ``state`` against ``expected`` (a module's ``state_dict()``)."""
    return StateDiff(
        missing=sorted(set(expected) - set(state)),
        unexpected=sorted(set(state) - set(expected)),
        mismatched=[
            (k, tuple(state[k].shape), tuple(expected[k].shape))
            for k in sorted(set(expected) & set(state))
            if tuple(expected[k].shape) != tuple(state[k].shape)
        ],
    )


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is a
    ``RuntimeError`` that lists them (``what`` names the source in the message)."""
    diff = diff_state(model.state_dict(), state)
    if not diff.clean:
        raise RuntimeError(f"{what} does not match the model: {diff.describe()}")
    model.load_state_dict(state, strict=True)
