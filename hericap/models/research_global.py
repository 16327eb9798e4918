"""HierCap's own global sub-encoder (``model.global_module=gra``), for the ``hiercap`` flavour.

HierCap (Pan et al., 2026) encodes the coarsest map with layers of global relation attention, a
spatial form of relation-aware global attention (Zhang et al., CVPR 2020): for each position its
affinities with every position, in both directions, are embedded (1x1 convolution + BatchNorm +
ReLU) and joined with a channel-pooled embedding of the position's own features; two more 1x1
convolutions turn that into one sigmoid gate per position, which rescales the features. A
position-wise FFN with residual and LayerNorm follows (there is no residual around the gate).

The relation embedding's input has one channel per position, so the module only exists for one
map size: the research code fixes it to 6x10 (60 positions, a 384x640 image at stride 64) and
resizes any other map, and its padding mask, to 6x10 by nearest interpolation (a quirk this
module reproduces: a batch of portrait images is stretched to 6x10). For any map size use
HeriCap's :class:`~hericap.models.global_encoder.GlobalEncoder`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hericap.models.layers import FeedForward
from hericap.models.masks import resize_mask

__all__ = ["RESEARCH_GLOBAL_GRID", "GlobalRelationAttention", "ResearchGlobalEncoder"]

# HierCap's fixed global grid (its in_spatial = 60): every map is resized to it.
RESEARCH_GLOBAL_GRID = (6, 10)
# HierCap's reduction ratios: channels (cha_ratio), relation channels (spa_ratio) and the gate's
# hidden width (down_ratio).
CHANNEL_RATIO = 4
RELATION_RATIO = 8
GATE_RATIO = 8


def _conv_bn(c_in: int, c_out: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)]
    layers.append(nn.BatchNorm2d(c_out))
    if relu:
        layers.append(nn.ReLU())
    return layers


class GlobalRelationAttention(nn.Module):
    """Spatial global relation attention over a ``[B, C, h, w]`` map with ``h * w`` fixed.

    Args:
        channels: map channels (HierCap: d_model).
        positions: ``h * w`` (HierCap: 60).
    """

    def __init__(self, channels: int, positions: int) -> None:
        super().__init__()
        inner = channels // CHANNEL_RATIO
        relation = positions // RELATION_RATIO
        joined = 1 + relation
        self.positions = positions
        self.theta = nn.Sequential(*_conv_bn(channels, inner))  # the relating position
        self.phi = nn.Sequential(*_conv_bn(channels, inner))  # the related position
        self.relation = nn.Sequential(*_conv_bn(2 * positions, relation))
        self.own = nn.Sequential(*_conv_bn(channels, inner))
        self.gate = nn.Sequential(
            *_conv_bn(joined, joined // GATE_RATIO), *_conv_bn(joined // GATE_RATIO, 1, relu=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h * w != self.positions:
            raise ValueError(f"a {h}x{w} map for a module built for {self.positions} positions")
        theta = self.theta(x).flatten(2).transpose(1, 2)  # [B, hw, inner]
        phi = self.phi(x).flatten(2)  # [B, inner, hw]
        affinity = theta @ phi  # [B, hw (from), hw (to)]
        # channel j at position i: i's affinity to j (outgoing), then j's affinity to i (incoming)
        outgoing = affinity.transpose(1, 2).reshape(b, h * w, h, w)
        incoming = affinity.reshape(b, h * w, h, w)
        relations = self.relation(torch.cat([outgoing, incoming], dim=1))
        own = self.own(x).mean(dim=1, keepdim=True)
        gate = self.gate(torch.cat([own, relations], dim=1))
        return torch.sigmoid(gate.expand_as(x)) * x


class GlobalRelationLayer(nn.Module):
    """Gate (no residual), then a position-wise FFN with residual and LayerNorm."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, positions: int) -> None:
        super().__init__()
        self.attention = GlobalRelationAttention(d_model, positions)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, d, h, w]`` -> ``[B, d, h, w]``."""
        b, c, h, w = x.shape
        tokens = self.attention(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = self.norm(tokens + self.drop(self.ffn(tokens)))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class ResearchGlobalEncoder(nn.Module):
    """HierCap's global sub-encoder (see the module docstring).

    Args:
        in_dim: channels of the coarsest map.
        d_model: width.
        n_layers: layers (paper: 3).
        d_ff: FFN width (HierCap hard-wires 2048).
        dropout: dropout after the input projection and in the FFNs.
    """

    def __init__(
        self, in_dim: int, d_model: int, n_layers: int, d_ff: int, dropout: float = 0.1
    ) -> None:
        super().__init__()
        positions = RESEARCH_GLOBAL_GRID[0] * RESEARCH_GLOBAL_GRID[1]
        self.proj = nn.Linear(in_dim, d_model)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(
            GlobalRelationLayer(d_model, d_ff, dropout, positions) for _ in range(n_layers)
        )

    def encode(
        self, feature_map: torch.Tensor, padding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The captioner's interface (same as :meth:`forward`)."""
        return self.forward(feature_map, padding)

    def forward(
        self, feature_map: torch.Tensor, padding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, h, w, C]`` (and its ``[B, h, w]`` padding) -> ``[B, 60, d_model]`` global tokens
        and their ``[B, 60]`` padding, after the research code's resize to 6x10."""
        x = feature_map.permute(0, 3, 1, 2)
        if tuple(x.shape[2:]) != RESEARCH_GLOBAL_GRID:
            # HierCap's quirk: every other map size is resized to its fixed 6x10 grid
            x = F.interpolate(x, size=RESEARCH_GLOBAL_GRID, mode="nearest")
            if padding is not None:
                padding = resize_mask(padding, RESEARCH_GLOBAL_GRID)
        b, c, h, w = x.shape
        tokens = self.norm(self.drop(F.relu(self.proj(x.permute(0, 2, 3, 1).reshape(b, h * w, c)))))
        out = tokens.transpose(1, 2).reshape(b, -1, h, w)
        for layer in self.layers:
            out = layer(out)
        out = out.flatten(2).transpose(1, 2)
        return out, None if padding is None else padding.flatten(1)
