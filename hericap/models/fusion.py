"""Hierarchical fusion modules: how a decoder layer attends to the visual memories.

The memories arrive as an ordered dict among ``grid``, ``region`` and ``global`` (whichever the
model uses). The four variants of HierCap (Pan et al., 2026):

* ``Parallel``: one gated cross-attention per memory; gate = sigmoid(Linear([query; attended]));
  the gated outputs are summed and scaled by 1/sqrt(number of memories).
* ``Sequential``: cross-attention to each memory in turn (grid, region, global).
* ``Concatenated_Parallel``: gated cross-attentions over cat(grid, region) and
  cat(region, global), fused as in ``Parallel``.
* ``Concatenated_Sequential``: the same concatenations attended in turn.

With fewer memories the concatenations pair what is present (one memory: one group).

Wirings (``model.fusion_wiring``; :mod:`hericap.config.flavours`):

* ``hericap``: each group its own modules, so every parameter takes part in every step (DDP needs
  no ``find_unused_parameters``); gated variants put one residual + LayerNorm around the fused
  sum and gate the raw attention output.
* ``grit`` and ``hiercap`` reproduce the research code: each cross-attention carries its own
  residual + LayerNorm, gates read that normalised output, and the fused sum goes to the FFN
  without a further residual. Two research quirks change outputs and are reproduced here only:
  GRIT's Parallel layer computes both gates with one layer (``fc_alpha1``; its ``fc_alpha2`` is
  never used), and HierCap's sequential variants attend every memory through one shared module
  (its other modules are never used).

``memory_masks`` (True = padding, per memory) keep padded memory tokens out of the keys.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hericap.models.layers import MultiHeadAttention, RowLayout
from hericap.models.masks import additive_key_mask

__all__ = [
    "FUSION_REGISTRY",
    "FUSION_WIRINGS",
    "MEMORY_ORDER",
    "build_fusion",
    "canonical_fusion_name",
]

MEMORY_ORDER = ("grid", "region", "global")
FUSION_WIRINGS = ("hericap", "grit", "hiercap")
# The module key of the research code's shared attention / gate.
SHARED = "shared"

Memories = dict[str, torch.Tensor]
Cache = dict[str, dict[str, torch.Tensor]]
Weights = dict[str, torch.Tensor]


def _concat_groups(names: list[str]) -> list[tuple[str, ...]]:
    """Consecutive pairs of the present memories: (grid, region), (region, global)."""
    if len(names) == 1:
        return [tuple(names)]
    return [tuple(names[i : i + 2]) for i in range(len(names) - 1)]


class _FusionBase(nn.Module):
    """Common machinery: one cross-attention per memory group (see the module docstring)."""

    gated = False
    concatenated = False

    def __init__(
        self,
        memory_names: list[str],
        d_model: int,
        n_heads: int,
        dropout: float,
        attn_dropout: float,
        wiring: str = "hericap",
    ) -> None:
        super().__init__()
        unknown = [m for m in memory_names if m not in MEMORY_ORDER]
        if unknown or not memory_names:
            raise ValueError(f"memory names {memory_names}; expected a subset of {MEMORY_ORDER}")
        if wiring not in FUSION_WIRINGS:
            raise ValueError(f"unknown model.fusion_wiring={wiring!r}; known: {FUSION_WIRINGS}")
        names = [m for m in MEMORY_ORDER if m in memory_names]
        self.groups = _concat_groups(names) if self.concatenated else [(m,) for m in names]
        self.keys = ["+".join(g) for g in self.groups]
        self.wiring = wiring
        # research quirk (HierCap's sequential variants): one module attends every memory
        self.shared = wiring == "hiercap" and not self.gated
        attn_keys = [SHARED] if self.shared else self.keys
        self.attn = nn.ModuleDict(
            {k: MultiHeadAttention(d_model, n_heads, attn_dropout) for k in attn_keys}
        )
        if self.gated:
            # research quirk (GRIT's Parallel layer): both gates come from one layer
            gate_keys = [SHARED] if wiring == "grit" else self.keys
            self.gates = nn.ModuleDict({k: nn.Linear(2 * d_model, d_model) for k in gate_keys})
            if wiring == "hericap":
                self.norm = nn.LayerNorm(d_model)
            else:  # the research code normalises inside each cross-attention
                self.norms = nn.ModuleDict({k: nn.LayerNorm(d_model) for k in self.keys})
        else:
            self.norms = nn.ModuleDict({k: nn.LayerNorm(d_model) for k in attn_keys})
        self.drop = nn.Dropout(dropout)

    def _memory(
        self, memories: Memories, masks: dict[str, torch.Tensor] | None, group: tuple[str, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        missing = [m for m in group if m not in memories]
        if missing:
            raise ValueError(f"fusion expects memories {group}, missing {missing}")
        memory = torch.cat([memories[m] for m in group], dim=1)
        if not masks or not any(m in masks for m in group):
            return memory, None
        padding = [
            masks[m]
            if m in masks
            else torch.zeros(memories[m].shape[:2], dtype=torch.bool, device=memory.device)
            for m in group
        ]
        return memory, additive_key_mask(torch.cat(padding, dim=1))

    def _attend(
        self,
        module_key: str,
        group_key: str,
        x: torch.Tensor,
        memory: tuple[torch.Tensor, torch.Tensor | None],
        cache: Cache | None,
        need_weights: bool,
        layout: RowLayout | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        sub = None
        if cache is not None:  # per memory group: a shared module attends different memories
            sub = cache.setdefault(f"cross:{group_key}", {})
        tokens, mask = memory
        return self.attn[module_key](
            x,
            tokens,
            tokens,
            attn_mask=mask,
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
        memory_masks: dict[str, torch.Tensor] | None = None,
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
            return self._gated(x, memories, cache, need_weights, layout, memory_masks)
        for group, key in zip(self.groups, self.keys, strict=True):
            module_key = SHARED if self.shared else key
            memory = self._memory(memories, memory_masks, group)
            a, w = self._attend(module_key, key, x, memory, cache, need_weights, layout)
            x = self.norms[module_key](x + self.drop(a))
            if w is not None:
                weights[key] = w
        return x, weights

    def _gated(
        self,
        x: torch.Tensor,
        memories: Memories,
        cache: Cache | None,
        need_weights: bool,
        layout: RowLayout | None,
        memory_masks: dict[str, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, Weights]:
        weights: Weights = {}
        total = 0
        for group, key in zip(self.groups, self.keys, strict=True):
            memory = self._memory(memories, memory_masks, group)
            a, w = self._attend(key, key, x, memory, cache, need_weights, layout)
            branch = a if self.wiring == "hericap" else self.norms[key](x + self.drop(a))
            gate_layer = self.gates[SHARED if self.wiring == "grit" else key]
            total = total + torch.sigmoid(gate_layer(torch.cat([x, branch], dim=-1))) * branch
            if w is not None:
                weights[key] = w
        fused = total / math.sqrt(len(self.groups))
        if self.wiring == "hericap":
            return self.norm(x + self.drop(fused)), weights
        return fused, weights


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
