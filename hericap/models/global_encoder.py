"""The global sub-encoder: relation-aware global attention over the coarsest map.

Each position's relations to every other position, in both directions (how it relates to the
others, and how the others relate to it), decide how much that position's features count; the
idea is relation-aware global attention (Zhang et al., CVPR 2020) as HierCap (Pan et al., 2026)
uses it. The published layer embeds the raw row and column of the relation matrix, whose length is
the number of positions, so it only works at 6×10. Here each direction's relations instead
weight an embedding of the other positions (a softmax over the row, and over the column), which
gives a fixed-size summary at any map size. That summary is joined with the position's own
embedding, and a small network turns the result into a sigmoid gate that rescales the position's
value; then come Add & LayerNorm, an FFN, and Add & LayerNorm again. Padded positions (a padding
mask, True = padding) are left out of every position's relations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hericap.models.encoders import VisualProjection
from hericap.models.layers import FeedForward
from hericap.models.masks import additive_key_mask

__all__ = ["GlobalEncoder", "RelationAwareGlobalLayer"]


class RelationAwareGlobalLayer(nn.Module):
    """One relation-aware global attention layer.

    Args:
        d_model: width.
        d_ff: FFN width.
        dropout: dropout on the residual branches.
        d_relation: width of the relation and summary embeddings (default ``d_model // 4``).
    """

    def __init__(
        self, d_model: int, d_ff: int, dropout: float, d_relation: int | None = None
    ) -> None:
        super().__init__()
        d_r = d_relation or max(8, d_model // 4)
        self.d_relation = d_r
        self.query = nn.Linear(d_model, d_r)  # theta: the relating position
        self.key = nn.Linear(d_model, d_r)  # phi: the related position
        self.summary = nn.Linear(d_model, d_r)  # what a related position contributes
        self.own = nn.Linear(d_model, d_r)  # the position's own embedding
        self.gate = nn.Sequential(nn.Linear(3 * d_r, d_r), nn.ReLU(), nn.Linear(d_r, 1))
        self.value = nn.Linear(d_model, d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def position_gates(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, D]`` -> gates ``[B, N, 1]`` in (0, 1); ``key_mask``: additive ``[B, 1, N]``
        (``-inf`` on padded positions, which then relate to no position)."""
        relations = self.query(x) @ self.key(x).transpose(1, 2) / math.sqrt(self.d_relation)
        summary = self.summary(x)
        rows, cols = relations, relations.transpose(1, 2)
        if key_mask is not None:
            rows, cols = rows + key_mask, cols + key_mask
        outgoing = rows.softmax(dim=-1) @ summary  # row i: how i relates to the others
        incoming = cols.softmax(dim=-1) @ summary  # column i
        return torch.sigmoid(self.gate(torch.cat([self.own(x), outgoing, incoming], dim=-1)))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln1(x + self.drop(self.position_gates(x, key_mask) * self.value(x)))
        return self.ln2(x + self.drop(self.ffn(x)))


class GlobalEncoder(nn.Module):
    """Global sub-encoder: the grid's projection of the coarsest map, then relation-aware layers.

    Args:
        in_dim: channels of the input map.
        d_model: output width.
        n_layers: layers (paper: 3).
        d_ff: FFN width.
        dropout: dropout on the residual branches.
        positions: add 2-D sinusoidal positions to the tokens.
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int,
        n_layers: int,
        d_ff: int,
        dropout: float = 0.1,
        positions: bool = True,
    ) -> None:
        super().__init__()
        self.proj = VisualProjection(in_dim, d_model, dropout, positions=positions)
        self.layers = nn.ModuleList(
            RelationAwareGlobalLayer(d_model, d_ff, dropout) for _ in range(n_layers)
        )

    def forward(
        self, feature_map: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, h, w, C]`` -> ``[B, h*w, d_model]`` global tokens; ``padding [B, h*w]``
        (True = padding) keeps padded positions out of the relations."""
        x = self.proj(feature_map)
        key_mask = None
        if padding is not None:
            key_mask = additive_key_mask(padding)[:, 0]  # [B, 1, N]
        for layer in self.layers:
            x = layer(x, key_mask)
        return x

    def encode(
        self, feature_map: torch.Tensor, padding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, h, w, C]`` and its ``[B, h, w]`` padding -> tokens and ``[B, h*w]`` padding
        (the interface the captioner uses for either global encoder)."""
        flat = None if padding is None else padding.flatten(1)
        return self.forward(feature_map, flat), flat
