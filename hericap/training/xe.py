"""Cross-entropy (teacher-forced) training pieces, free of Ray: caption sampling and the loss."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["pick_captions", "xe_loss"]


def pick_captions(captions: np.ndarray, k: int, rng: random.Random) -> list[str]:
    """``k`` captions per image (without replacement when there are enough), image-major."""
    out: list[str] = []
    for caps in captions:
        caps = list(caps)
        out.extend(rng.sample(caps, k) if len(caps) >= k else rng.choices(caps, k=k))
    return out


def xe_loss(
    log_probs: torch.Tensor, targets: torch.Tensor, pad_idx: int, label_smoothing: float
) -> torch.Tensor:
    """Token NLL over non-padding targets, optionally label-smoothed."""
    flat, tgt = log_probs.reshape(-1, log_probs.shape[-1]), targets.reshape(-1)
    nll = F.nll_loss(flat, tgt, ignore_index=pad_idx)
    if not label_smoothing:
        return nll
    mask = tgt != pad_idx
    smooth = -flat[mask].mean(dim=-1).mean()
    return (1 - label_smoothing) * nll + label_smoothing * smooth
