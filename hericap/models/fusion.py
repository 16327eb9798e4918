"""Hierarchical fusion modules: how a decoder layer attends to the visual memories.

The memories arrive as an ordered dict among ``grid``, ``region`` and ``global`` (whichever the
model uses). The four variants of HierCap (Pan et al., 2026), each with its own modules so that
every parameter takes part in every step (DDP needs no ``find_unused_parameters``):

* ``Parallel``: one gated cross-attention per memory; gate = sigmoid(Linear([query; attended]));
  the gated outputs are summed and scaled by 1/sqrt(number of memories).
* ``Sequential``: cross-attention to each memory in turn (grid, region, global).
* ``Concatenated_Parallel``: gated cross-attentions over cat(grid, region) and
  cat(region, global), fused as in ``Parallel``.
* ``Concatenated_Sequential``: the same concatenations attended in turn.

With fewer memories the concatenations pair what is present (one memory: one group).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hericap.models.layers import MultiHeadAttention, RowLayout

__all__ = ["FUSION_REGISTRY", "MEMORY_ORDER", "build_fusion", "canonical_fusion_name"]

MEMORY_ORDER = ("grid", "region", "global")

Memories = dict[str, torch.Tensor]
Cache = dict[str, dict[str, torch.Tensor]]
Weights = dict[str, torch.Tensor]


def _concat_groups(names: list[str]) -> list[tuple[str, ...]]:
    """Consecutive pairs of the present memories: (grid, region), (region, global)."""
    if len(names) == 1:
        return [tuple(names)]
    return [tuple(names[i : i + 2]) for i in range(len(names) - 1)]


class _FusionBase(nn.Module):
    """Common machinery: one cross-attention per memory group."""

    gated = False
    concatenated = False

    def __init__(
        self,
        memory_names: list[str],
        d_model: int,
        n_heads: int,
        dropout: float,
        attn_dropout: float,
    ) -> None:
        super().__init__()
        unknown = [m for m in memory_names if m not in MEMORY_ORDER]
        if unknown or not memory_names:
            raise ValueError(f"memory names {memory_names}; expected a subset of {MEMORY_ORDER}")
        names = [m for m in MEMORY_ORDER if m in memory_names]
        self.groups = _concat_groups(names) if self.concatenated else [(m,) for m in names]
        self.keys = ["+".join(g) for g in self.groups]
        self.attn = nn.ModuleDict(
            {k: MultiHeadAttention(d_model, n_heads, attn_dropout) for k in self.keys}
        )
        if self.gated:
            self.gates = nn.ModuleDict({k: nn.Linear(2 * d_model, d_model) for k in self.keys})
            self.norm = nn.LayerNorm(d_model)
        else:
            self.norms = nn.ModuleDict({k: nn.LayerNorm(d_model) for k in self.keys})
        self.drop = nn.Dropout(dropout)

    def _memory(self, memories: Memories, group: tuple[str, ...]) -> torch.Tensor:
        missing = [m for m in group if m not in memories]
        if missing:
            raise ValueError(f"fusion expects memories {group}, missing {missing}")
        return torch.cat([memories[m] for m in group], dim=1)

    def _attend(
        self,
        key: str,
        x: torch.Tensor,
        memory: torch.Tensor,
        cache: Cache | None,
        need_weights: bool,
        layout: RowLayout | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        sub = None
        if cache is not None:
            sub = cache.setdefault(f"cross:{key}", {})
        return self.attn[key](
            x,
            memory,
            memory,
            cache=sub,
            static_kv=True,
            need_weights=need_weights,
            layout=layout,
        )

    def forward(
        self,
        x: torch.Tensor,
        memories: Memories,
        cache: Cache | None = None,
        need_weights: bool = False,
        layout: RowLayout | None = None,
    ) -> tuple[torch.Tensor, Weights]:
        """Fuse ``x`` (``[N, T, D]``, or the rows of ``layout``) with the memories.

        A grouped ``layout`` (see :class:`~hericap.models.layers.RowLayout`) says that ``x``
        holds ``group`` consecutive captions per memory row (``N = B * group``): cross-attention
        is per query, so those captions are folded into the query axis and attend the unrepeated
        memory, which projects its keys/values once per image instead of once per caption. The
        result is identical.
        """
        weights: Weights = {}
        if self.gated:
            total = 0
            for group, key in zip(self.groups, self.keys, strict=True):
                a, w = self._attend(
                    key, x, self._memory(memories, group), cache, need_weights, layout
                )
                gate = torch.sigmoid(self.gates[key](torch.cat([x, a], dim=-1)))
                total = total + gate * a
                if w is not None:
                    weights[key] = w
            return self.norm(x + self.drop(total / math.sqrt(len(self.groups)))), weights
        for group, key in zip(self.groups, self.keys, strict=True):
            a, w = self._attend(key, x, self._memory(memories, group), cache, need_weights, layout)
            x = self.norms[key](x + self.drop(a))
            if w is not None:
                weights[key] = w
        return x, weights


class ParallelFusion(_FusionBase):
    gated = True


class SequentialFusion(_FusionBase):
    pass


class ConcatenatedParallelFusion(_FusionBase):
    gated = True
    concatenated = True


class ConcatenatedSequentialFusion(_FusionBase):
    concatenated = True


FUSION_REGISTRY: dict[str, type[_FusionBase]] = {
    "Parallel": ParallelFusion,
    "Sequential": SequentialFusion,
    "Concatenated_Parallel": ConcatenatedParallelFusion,
    "Concatenated_Sequential": ConcatenatedSequentialFusion,
}
# The research code's lower-case names.
_ALIASES = {"parallel": "Parallel", "sequential": "Sequential", "concat": "Concatenated_Parallel"}


def canonical_fusion_name(name: str) -> str:
    """Registry name for ``name`` (case-insensitive; research-code aliases accepted)."""
    by_lower = {k.lower(): k for k in FUSION_REGISTRY}
    key = name.strip().lower()
    if key in by_lower:
        return by_lower[key]
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(
        f"unknown model.cap_generator.decoder_name={name!r}; known: {list(FUSION_REGISTRY)} "
        f"(aliases {list(_ALIASES)})"
    )


def build_fusion(name: str, **kwargs) -> _FusionBase:
    """Instantiate a fusion variant by (case-insensitive) name."""
    return FUSION_REGISTRY[canonical_fusion_name(name)](**kwargs)
