"""Dynamic routing cells (DTNet-style) as a grid sub-encoder layer type.

Each :class:`RoutingLayer` has a spatial step and a channel step. The spatial step mixes three
cells: global self-attention, a local (depth-wise 3×3) convolution and axial attention (along
rows, then along columns). The channel step mixes two: an FFN and a squeeze-and-excitation gate.
Each step's cells are weighted per image by a router that reads pooled statistics of its input:
a spatial statistic (the mean over positions) and a channel statistic (the features pooled with
weights from each position's mean over channels). Routing is soft: every cell runs and is
weighted, so every parameter takes part in every step (DDP needs no ``find_unused_parameters``)
and the weights are differentiable. The per-image weights are returned so the "paths" an image
takes can be plotted.

Every cell works for any map size: nothing depends on ``h`` or ``w`` beyond the forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from hericap.models.layers import FeedForward, MultiHeadAttention

__all__ = ["CHANNEL_CELLS", "SPATIAL_CELLS", "Router", "RoutingLayer"]

SPATIAL_CELLS = ("global_attention", "local_conv", "axial")
CHANNEL_CELLS = ("ffn", "squeeze_excitation")


class GlobalAttentionCell(nn.Module):
    """Self-attention over all positions."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads, attn_dropout)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.attn(x, x, x)[0]


class LocalConvCell(nn.Module):
    """Depth-wise 3×3 convolution over the map, GELU, then a point-wise projection."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(d_model, d_model, 3, padding=1, groups=d_model)
        self.act = nn.GELU()
        self.pointwise = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, d = x.shape
        y = self.depthwise(x.transpose(1, 2).reshape(b, d, h, w))
        return self.pointwise(self.act(y.flatten(2).transpose(1, 2)))


class AxialCell(nn.Module):
    """Attention along each row, then along each column."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float) -> None:
        super().__init__()
        self.row = MultiHeadAttention(d_model, n_heads, attn_dropout)
        self.col = MultiHeadAttention(d_model, n_heads, attn_dropout)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, d = x.shape
        rows = x.reshape(b * h, w, d)
        y = self.row(rows, rows, rows)[0].reshape(b, h, w, d)
        cols = y.transpose(1, 2).reshape(b * w, h, d)
        y = self.col(cols, cols, cols)[0].reshape(b, w, h, d).transpose(1, 2)
        return y.reshape(b, n, d)


class SqueezeExcitationCell(nn.Module):
    """Channel gate from the mean over positions (Hu et al., CVPR 2018)."""

    def __init__(self, d_model: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(8, d_model // reduction)
        self.gate = nn.Sequential(
            nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, d_model), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean(dim=1, keepdim=True))


class Router(nn.Module):
    """Softmax weights over ``n_cells`` per image from pooled statistics of ``x [B, N, D]``."""

    def __init__(self, d_model: int, n_cells: int) -> None:
        super().__init__()
        hidden = max(8, d_model // 4)
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_model, hidden), nn.ReLU(), nn.Linear(hidden, n_cells)
        )
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.mean(dim=1)  # [B, D]: pooled over positions
        position_weights = x.mean(dim=2).softmax(dim=1)  # [B, N]: pooled over channels
        channel = (position_weights.unsqueeze(-1) * x).sum(dim=1)  # [B, D]
        return self.mlp(torch.cat([spatial, channel], dim=-1)).softmax(dim=-1)


class RoutingLayer(nn.Module):
    """A router-weighted spatial step and channel step, each with Add & LayerNorm (post-LN).

    Args:
        d_model: width.
        n_heads: heads of the attention cells.
        d_ff: FFN cell width.
        dropout: dropout on the residual branches.
        attn_dropout: dropout on attention weights.
    """

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float
    ) -> None:
        super().__init__()
        self.spatial_cells = nn.ModuleList(
            [
                GlobalAttentionCell(d_model, n_heads, attn_dropout),
                LocalConvCell(d_model),
                AxialCell(d_model, n_heads, attn_dropout),
            ]
        )
        self.channel_cells = nn.ModuleList(
            [FeedForward(d_model, d_ff, dropout), SqueezeExcitationCell(d_model)]
        )
        self.spatial_router = Router(d_model, len(self.spatial_cells))
        self.channel_router = Router(d_model, len(self.channel_cells))
        self.ln1 = nn.LayerNorm(d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, h: int, w: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x [B, h*w, D]`` -> same shape, and the routing weights
        ``{"spatial": [B, 3], "channel": [B, 2]}`` (cells in :data:`SPATIAL_CELLS` /
        :data:`CHANNEL_CELLS` order)."""
        if x.shape[1] != h * w:
            raise ValueError(f"{x.shape[1]} tokens for a {h}x{w} map")
        ws = self.spatial_router(x)
        mixed = sum(
            ws[:, i, None, None] * cell(x, h, w) for i, cell in enumerate(self.spatial_cells)
        )
        x = self.ln1(x + self.drop(mixed))
        wc = self.channel_router(x)
        mixed = sum(wc[:, i, None, None] * cell(x) for i, cell in enumerate(self.channel_cells))
        x = self.ln2(x + self.drop(mixed))
        return x, {"spatial": ws, "channel": wc}
