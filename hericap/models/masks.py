"""Padding masks: which pixels, feature cells and tokens of a padded batch are padding.

Masks are boolean with True = padding (the NestedTensor convention of DETR and of the research
code). A feature map's mask is the pixel mask nearest-interpolated to the map's size, i.e. a
cell is padding when its top-left pixel is, exactly as the research code computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "additive_key_mask",
    "level_masks",
    "pixel_padding_mask",
    "resize_mask",
    "valid_ratios",
]


def pixel_padding_mask(image_hw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, height, width]`` mask of a batch whose image ``i`` fills the top-left
    ``image_hw[i] = (h, w)`` pixels."""
    rows = torch.arange(height, device=image_hw.device)[None, :, None] >= image_hw[:, 0, None, None]
    cols = torch.arange(width, device=image_hw.device)[None, None, :] >= image_hw[:, 1, None, None]
    return rows | cols


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W]`` -> ``[B, h, w]`` by nearest interpolation (the research rule)."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


def level_masks(mask: torch.Tensor, maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """The pixel mask at the size of each NHWC feature map ``[B, h, w, C]``."""
    return [resize_mask(mask, (m.shape[1], m.shape[2])) for m in maps]


def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` fraction of a map's width and height that is image: ``(w_ratio, h_ratio)``,
    counted along the first row and column (Deformable DETR's rule)."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def additive_key_mask(padding: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, N]`` key padding (True = padding) -> additive ``[B, 1, 1, N]`` attention mask
    (``-inf`` on padding, broadcast over heads and queries); None stays None."""
    if padding is None:
        return None
    out = torch.zeros(padding.shape, dtype=torch.float32, device=padding.device)
    return out.masked_fill(padding, float("-inf"))[:, None, None, :]
