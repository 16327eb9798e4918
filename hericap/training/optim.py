"""Optimiser and learning-rate schedule.

AdamW with two learning rates (extractor + region detector vs the rest, as in the paper:
1e-5 / 1e-4) and weight
decay by one rule: matrices and embeddings decay, norms and biases (parameters with fewer than
two dimensions) do not. Schedule: linear warm-up, then cosine down to ``min_lr_ratio`` of the
peak.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hericap.models.captioner import Captioner

__all__ = ["build_optimizer", "constant_lr", "param_groups", "warmup_cosine", "warmup_length"]


def param_groups(
    model: nn.Module,
    lr: float,
    backbone_lr: float,
    weight_decay: float,
    backbone_prefix: tuple[str, ...] = Captioner.BACKBONE_PREFIXES,
) -> list[dict]:
    """Four AdamW groups: (backbone | rest) × (decay | no decay); frozen parameters left out."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")  # DDP wrapper
        key = (name.startswith(backbone_prefix), p.ndim >= 2)
        groups.setdefault(key, []).append(p)
    return [
        {
            "params": params,
            "lr": backbone_lr if is_backbone else lr,
            "weight_decay": weight_decay if decays else 0.0,
            "name": f"{'backbone' if is_backbone else 'head'}_{'decay' if decays else 'no_decay'}",
        }
        for (is_backbone, decays), params in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module, lr: float, backbone_lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, lr, backbone_lr, weight_decay), betas=betas)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` then cosine to ``min_lr_ratio`` at ``total_steps``."""
    total_steps = max(1, total_steps)
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_length(warmup_steps: int, warmup_epochs: float, updates_per_epoch: int) -> int:
    """Warm-up steps: ``warmup_epochs`` epochs of updates when > 0 (at least one step), else
    ``warmup_steps``."""
    if warmup_epochs > 0:
        return max(1, round(warmup_epochs * updates_per_epoch))
    return warmup_steps


def constant_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The groups' learning rates, unchanged (SCST, as in the paper)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
