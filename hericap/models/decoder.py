"""The hierarchical caption decoder.

Word embedding + sinusoidal positions; per layer masked self-attention (with a key/value cache
for incremental decoding), a hierarchical fusion module over the visual memories, and an FFN
(post-LN, as in M2 Transformer / GRIT); a final Linear + log-softmax over the vocabulary.

``embedding="research"`` reproduces the research code's embeddings and padding rules: the word
embedding unscaled plus a position table that is loaded, not computed (the research init
overwrites its sinusoids with random values that never train), positions counted from 1 with
<pad> tokens at row 0, no embedding dropout, an output layer without bias, <pad> tokens masked
as self-attention keys and their outputs zeroed (so their log-probs are uniform).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hericap.models.fusion import build_fusion
from hericap.models.layers import (
    FeedForward,
    MultiHeadAttention,
    RowLayout,
    causal_mask,
    sinusoid_1d,
)
from hericap.models.masks import additive_key_mask

__all__ = ["EMBEDDINGS", "DecoderLayer", "HierarchicalDecoder"]

# Word/position embedding rules (``model.embedding``; see the module docstring).
EMBEDDINGS = ("hericap", "research")

Memories = dict[str, torch.Tensor]
LayerCache = dict[str, dict[str, torch.Tensor]]


class DecoderLayer(nn.Module):
    """Masked self-attention -> fusion over memories -> FFN."""

    def __init__(
        self,
        fusion_name: str,
        memory_names: list[str],
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        attn_dropout: float,
        activation: str,
        fusion_wiring: str = "hericap",
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attn_dropout)
        self.ln1 = nn.LayerNorm(d_model)
        self.fusion = build_fusion(
            fusion_name,
            memory_names=memory_names,
            d_model=d_model,
            n_heads=n_heads,
            dropout=dropout,
            attn_dropout=attn_dropout,
            wiring=fusion_wiring,
        )
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.ln3 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        memories: Memories,
        self_mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        need_weights: bool = False,
        captions_per_memory: int = 1,
        layout: RowLayout | None = None,
        memory_masks: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x [N, T, D]``, or the packed rows of ``layout`` (see :class:`RowLayout`)."""
        if layout is None:
            layout = RowLayout(x.shape[0], x.shape[1])
        self_cache = cache.setdefault("self", {}) if cache is not None else None
        a, _ = self.self_attn(
            x, x, x, attn_mask=self_mask, cache=self_cache, layout=layout, kv_layout=layout
        )
        x = self.ln1(x + self.drop(a))
        x, weights = self.fusion(
            x,
            memories,
            cache=cache,
            need_weights=need_weights,
            layout=layout.grouped(captions_per_memory),
            memory_masks=memory_masks,
        )
        return self.ln3(x + self.drop(self.ffn(x))), weights


class HierarchicalDecoder(nn.Module):
    """Caption decoder over a dict of visual memories.

    Args:
        vocab_size: output vocabulary size.
        memory_names: memories it fuses (subset of ``grid``, ``region``, ``global``).
        fusion_name: fusion variant (see :mod:`hericap.models.fusion`).
        d_model: width.
        n_layers: decoder layers (paper: 3).
        n_heads: attention heads.
        d_ff: FFN width.
        dropout: dropout on residual branches and embeddings.
        attn_dropout: dropout on attention weights.
        activation: FFN activation.
        pad_idx: padding token (zero embedding).
        fusion_wiring: ``hericap``, ``grit`` or ``hiercap`` (:mod:`hericap.models.fusion`).
        embedding: ``hericap`` or ``research`` (see the module docstring).
        position_table_size: rows of the research position table (``embedding="research"``).
    """

    def __init__(
        self,
        vocab_size: int,
        memory_names: list[str],
        fusion_name: str = "Parallel",
        d_model: int = 512,
        n_layers: int = 3,
        n_heads: int = 8,
        d_ff: int = 2048,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        activation: str = "relu",
        pad_idx: int = 1,
        fusion_wiring: str = "hericap",
        embedding: str = "hericap",
        position_table_size: int = 0,
    ) -> None:
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"unknown model.embedding={embedding!r}; known: {list(EMBEDDINGS)}")
        self.d_model = d_model
        self.pad_idx = pad_idx
        self.research = embedding == "research"
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_idx)
        # std d^-1/2, so that the sqrt(d) scaling in _embed gives unit-scale inputs; nn.Embedding's
        # N(0, 1) would enter the residual stream at std sqrt(d) and drown the attention branches
        # (the visual signal) at the start of training.
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[pad_idx].zero_()
        self.positions: nn.Embedding | None = None
        if self.research:
            # loaded from the checkpoint and frozen, as in the research code; never recomputed
            self.positions = nn.Embedding(position_table_size, d_model)
            self.positions.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(
                fusion_name,
                memory_names,
                d_model,
                n_heads,
                d_ff,
                dropout,
                attn_dropout,
                activation,
                fusion_wiring=fusion_wiring,
            )
            for _ in range(n_layers)
        )
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, vocab_size, bias=not self.research)

    def _embed(self, tokens: torch.Tensor, start: int, pad_at_zero: bool = False) -> torch.Tensor:
        """Word + position embeddings of ``tokens [N, T]`` at positions ``start..``.

        ``pad_at_zero`` (research teacher forcing): <pad> tokens take the position table's row 0.
        """
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        if not self.research:
            x = self.embed(tokens) * math.sqrt(self.d_model) + sinusoid_1d(pos, self.d_model)
            return self.drop(x)
        pos = (pos + 1).expand_as(tokens)  # the research table counts positions from 1
        if pad_at_zero:
            pos = pos.masked_fill(tokens == self.pad_idx, 0)
        if int(pos.max()) >= self.positions.num_embeddings:
            raise ValueError(
                f"position {int(pos.max())} is beyond the {self.positions.num_embeddings}-row "
                "position table (model.cap_generator.position_table_size)"
            )
        return self.embed(tokens) + self.positions(pos)

    def _research_self_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Additive ``[N, 1, T, T]``: causal, and <pad> tokens masked as keys (research)."""
        t = tokens.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1)
        blocked = future[None] | (tokens == self.pad_idx)[:, None, :]
        out = torch.zeros(blocked.shape, device=tokens.device)
        return out.masked_fill(blocked, float("-inf"))[:, None]

    def _logits(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.research:  # the research code zeroes <pad> rows: uniform log-probs there
            x = x * (tokens != self.pad_idx).unsqueeze(-1).to(x.dtype)
        return F.log_softmax(self.out(x), dim=-1)

    def forward(
        self,
        tokens: torch.Tensor,
        memories: Memories,
        need_weights: bool = False,
        captions_per_memory: int = 1,
        memory_masks: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Teacher-forced pass: ``tokens [N, T]`` -> log-probs ``[N, T, V]``.

        ``captions_per_memory``: ``tokens`` holds that many consecutive captions per memory row
        (``N = B * captions_per_memory``); the memories are not repeated. ``memory_masks``:
        ``{name: [B, tokens]}`` padding of the memories (True = padding).

        Returns the log-probs and, with ``need_weights``, per layer the cross-attention weights
        ``[N, T, memory tokens]`` keyed by memory group.

        Positions whose input token is ``<pad>`` are not computed (when padding is a suffix of
        every row, as in teacher forcing): the position-wise layers run on the other positions
        only, and the log-probs returned there are 0. On 5-caption batches of the synthetic data
        ~40% of the positions are padding.
        """
        rows = next(iter(memories.values())).shape[0]
        if tokens.shape[0] != rows * captions_per_memory:
            raise ValueError(
                f"{tokens.shape[0]} captions for {rows} memory rows x {captions_per_memory}"
            )
        packed = not (need_weights or self.research)
        layout = RowLayout.packing_padding(tokens, self.pad_idx) if packed else None
        x = self._embed(tokens, 0, pad_at_zero=True)
        if layout is not None:
            x = layout.pack(x)
        if self.research:
            mask = self._research_self_mask(tokens)
        else:
            mask = causal_mask(tokens.shape[1], device=tokens.device)
        all_weights = []
        for layer in self.layers:
            x, w = layer(
                x,
                memories,
                mask,
                need_weights=need_weights,
                captions_per_memory=captions_per_memory,
                layout=layout,
                memory_masks=memory_masks,
            )
            all_weights.append(w)
        if layout is not None:
            return layout.unpack(F.log_softmax(self.out(x), dim=-1)), all_weights
        return self._logits(x, tokens), all_weights

    def init_cache(self) -> list[LayerCache]:
        return [{} for _ in self.layers]

    def step(
        self,
        tokens: torch.Tensor,
        memories: Memories,
        cache: list[LayerCache],
        position: int,
        need_weights: bool = False,
        captions_per_memory: int = 1,
        memory_masks: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """One incremental step: ``tokens [N]`` at ``position`` -> log-probs ``[N, V]``.

        ``captions_per_memory``: as in :meth:`forward`, ``N = B * captions_per_memory``
        consecutive rows per memory row (the beams or samples of one image); the memories are
        not repeated, so their keys/values are projected and attended once per image.
        """
        x = self._embed(tokens[:, None], position)
        self_mask = None
        if self.research:  # <pad> words chosen earlier stay masked as keys (research)
            # kept beside layer 0's self-attention keys, so reorder_cache reorders them too
            pad = cache[0].setdefault("self", {})
            flags = (tokens == self.pad_idx)[:, None]
            pad["pad"] = torch.cat([pad["pad"], flags], dim=1) if "pad" in pad else flags
            self_mask = additive_key_mask(pad["pad"])
        all_weights = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, w = layer(
                x,
                memories,
                self_mask,
                cache=layer_cache,
                need_weights=need_weights,
                captions_per_memory=captions_per_memory,
                memory_masks=memory_masks,
            )
            all_weights.append(w)
        return self._logits(x[:, 0], tokens), all_weights

    @staticmethod
    def reorder_cache(cache: list[LayerCache], index: torch.Tensor) -> None:
        """Select rows of the self-attention caches (beam search); memory caches are per image
        and identical across an image's beams, so they stay."""
        for layer_cache in cache:
            sub = layer_cache.get("self")
            if sub:
                for k in sub:
                    sub[k] = sub[k].index_select(0, index)
