"""The research code's Swin window rule, on top of timm's Swin blocks.

GRIT and HierCap run the original Swin Transformer code (Liu et al., ICCV 2021, as vendored in
GRIT's ``models/common/swin_model.py``). It differs from timm's Swin blocks in two ways that
change the features of every map that is not a whole number of windows (at 384x640 with window
12: the 160-, 80-, 40- and 20-wide maps):

* order of padding and cyclic shift: the research block pads the map at the bottom/right to
  whole windows first and then rolls the padded map by half a window, so rows and columns of
  zeros travel with the roll; timm rolls the map first and pads after. The windows then hold
  different tokens.
* window size on small maps: the research code always uses 12x12 windows shifted by 6, even when
  a map is smaller than a window (a 12x8 map of a portrait image); timm shrinks the window to the
  map and drops the shift unless ``always_partition=True``.

timm covers the second with ``always_partition=True`` and builds the shifted-window mask for the
padded size with ``dynamic_img_size=True``, so those come from timm's options. It has no option
for the first, so :class:`ResearchWindowBlock` overrides only the one method that orders padding
and shift; parameters, keys, attention and MLP stay timm's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import nn

__all__ = ["ResearchWindowBlock", "use_research_windows"]


class ResearchWindowBlock(SwinTransformerBlock):
    """A timm Swin block that pads to whole windows before the cyclic shift (research rule).

    Not built directly: :func:`use_research_windows` turns the blocks of a timm Swin built with
    ``always_partition=True`` and ``dynamic_img_size=True`` into this class.
    """

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, h, w, c = x.shape
        win_h, win_w = self.window_size
        pad_h = (win_h - h % win_h) % win_h
        pad_w = (win_w - w % win_w) % win_w
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # zeros after norm1, as the research block
        shift_h, shift_w = self.shift_size
        shifted = bool(shift_h or shift_w)
        if shifted:
            x = torch.roll(x, shifts=(-shift_h, -shift_w), dims=(1, 2))
        padded_h, padded_w = x.shape[1], x.shape[2]
        windows = window_partition(x, self.window_size).view(-1, self.window_area, c)
        # the shifted-window mask of the padded (and rolled) map, as the research code builds it
        mask = self.get_attn_mask(x)
        out = self.attn(windows, mask=mask).view(-1, win_h, win_w, c)
        x = window_reverse(out, self.window_size, padded_h, padded_w)
        if shifted:
            x = torch.roll(x, shifts=(shift_h, shift_w), dims=(1, 2))
        return x[:, :h, :w].contiguous()


def use_research_windows(model: nn.Module) -> int:
    """Switch every timm Swin block of ``model`` to :class:`ResearchWindowBlock` in place;
    returns how many. Only the padding/shift order changes: the state dict is untouched."""
    count = 0
    for module in model.modules():
        if type(module) is SwinTransformerBlock:
            if not (module.always_partition and module.dynamic_mask):
                raise ValueError(
                    "research windows need a Swin built with always_partition=True and "
                    "dynamic_img_size=True"
                )
            module.__class__ = ResearchWindowBlock
            count += 1
    return count
