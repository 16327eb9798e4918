"""The hierarchical caption decoder.

Word embedding + sinusoidal positions; per layer masked self-attention (with a key/value cache
for incremental decoding), a hierarchical fusion module over the visual memories, and an FFN
(post-LN, as in M2 Transformer / GRIT); a final Linear + log-softmax over the vocabulary.
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

__all__ = ["DecoderLayer", "HierarchicalDecoder"]

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
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.pad_idx = pad_idx
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_idx)
        # std d^-1/2, so that the sqrt(d) scaling in _embed gives unit-scale inputs; nn.Embedding's
        # N(0, 1) would enter the residual stream at std sqrt(d) and drown the attention branches
        # (the visual signal) at the start of training.
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[pad_idx].zero_()
        self.layers = nn.ModuleList(
            DecoderLayer(
                fusion_name, memory_names, d_model, n_heads, d_ff, dropout, attn_dropout, activation
            )
            for _ in range(n_layers)
        )
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, vocab_size)

    def _embed(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) * math.sqrt(self.d_model) + sinusoid_1d(pos, self.d_model)
        return self.drop(x)

    def forward(
        self,
        tokens: torch.Tensor,
        memories: Memories,
        need_weights: bool = False,
        captions_per_memory: int = 1,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Teacher-forced pass: ``tokens [N, T]`` -> log-probs ``[N, T, V]``.

        ``captions_per_memory``: ``tokens`` holds that many consecutive captions per memory row
        (``N = B * captions_per_memory``); the memories are not repeated.

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
        layout = None if need_weights else RowLayout.packing_padding(tokens, self.pad_idx)
        x = self._embed(tokens, 0)
        if layout is not None:
            x = layout.pack(x)
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
            )
            all_weights.append(w)
        log_probs = F.log_softmax(self.out(x), dim=-1)
        if layout is not None:
            log_probs = layout.unpack(log_probs)
        return log_probs, all_weights

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
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """One incremental step: ``tokens [N]`` at ``position`` -> log-probs ``[N, V]``.

        ``captions_per_memory``: as in :meth:`forward`, ``N = B * captions_per_memory``
        consecutive rows per memory row (the beams or samples of one image); the memories are
        not repeated, so their keys/values are projected and attended once per image.
        """
        x = self._embed(tokens[:, None], position)
        all_weights = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            x, w = layer(
                x,
                memories,
                None,
                cache=layer_cache,
                need_weights=need_weights,
                captions_per_memory=captions_per_memory,
            )
            all_weights.append(w)
        return F.log_softmax(self.out(x[:, 0]), dim=-1), all_weights

    @staticmethod
    def reorder_cache(cache: list[LayerCache], index: torch.Tensor) -> None:
        """Select rows of the self-attention caches (beam search); memory caches are per image
        and identical across an image's beams, so they stay."""
        for layer_cache in cache:
            sub = layer_cache.get("self")
            if sub:
                for k in ("k", "v"):
                    sub[k] = sub[k].index_select(0, index)
