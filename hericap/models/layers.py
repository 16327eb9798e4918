"""Building blocks shared by the encoders and the decoder.

Multi-head attention with an optional key/value cache (incremental decoding) and optional
attention weights (explanations), the position-wise FFN, and sinusoidal position encodings in
1-D (words) and 2-D (feature maps of any size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FeedForward",
    "MultiHeadAttention",
    "RowLayout",
    "causal_mask",
    "sinusoid_1d",
    "sinusoid_2d",
]

KVCache = dict[str, torch.Tensor]


class RowLayout:
    """Where a decoder's position-wise rows sit in attention's ``[batch, queries, D]`` layout.

    Projections, norms and FFNs are position-wise, so they can run on any arrangement of the
    positions; attention needs ``[batch, queries, D]``. For a batch of ``n`` sequences of ``t``
    positions:

    * ``index`` (packed rows): the rows are only the positions ``index`` of the flattened
      ``[n * t]`` grid, ``[M, D]``; the others (padding) are never computed and enter attention
      as zeros. Padding is a suffix of every sequence and attention is causal, so no kept
      position ever sees them.
    * ``group``: ``group`` consecutive sequences share one attention row (cross-attention to the
      memory of one image): ``[n, t, D]`` -> ``[n / group, group * t, D]``.

    Without ``index`` the rows are ``[n, t, D]`` and, with ``group == 1``, the layout is the
    identity.
    """

    def __init__(self, n: int, t: int, index: torch.Tensor | None = None, group: int = 1) -> None:
        if n % group:
            raise ValueError(f"{n} sequences are not a whole number of groups of {group}")
        self.n, self.t, self.index, self.group = n, t, index, group

    @classmethod
    def packing_padding(cls, tokens: torch.Tensor, pad_idx: int) -> RowLayout | None:
        """The packed layout of ``tokens [n, t]`` without their ``pad_idx`` positions, or None
        when there is no padding (nothing to skip) or it is not a pure suffix of every row
        (then only the dense layout is exact)."""
        keep = tokens != pad_idx
        if bool(keep.all()) or bool((keep[:, 1:] & ~keep[:, :-1]).any()):
            return None
        return cls(tokens.shape[0], tokens.shape[1], index=keep.flatten().nonzero().squeeze(1))

    def grouped(self, group: int) -> RowLayout:
        return RowLayout(self.n, self.t, self.index, group)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, t, ...]`` -> the layout's rows."""
        if self.index is None:
            return x
        return x.reshape(self.n * self.t, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """The layout's rows -> ``[n, t, ...]`` (zeros where nothing was computed)."""
        if self.index is None:
            return rows
        full = rows.new_zeros(self.n * self.t, *rows.shape[1:])
        return full.index_copy(0, self.index, rows).view(self.n, self.t, *rows.shape[1:])

    def to_attention(self, rows: torch.Tensor) -> torch.Tensor:
        x = self.unpack(rows)
        if self.group > 1:
            x = x.reshape(self.n // self.group, self.group * self.t, *x.shape[2:])
        return x

    def from_attention(self, x: torch.Tensor) -> torch.Tensor:
        if self.group > 1:
            x = x.reshape(self.n, self.t, *x.shape[2:])
        return self.pack(x)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``n_heads`` heads.

    Args:
        d_model: model width.
        n_heads: number of heads (must divide ``d_model``).
        dropout: dropout on attention weights.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        static_kv: bool = False,
        need_weights: bool = False,
        layout: RowLayout | None = None,
        kv_layout: RowLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend ``query [B, Tq, D]`` over ``key/value [B, Tk, D]``.

        Args:
            attn_mask: additive float mask broadcastable to ``[B, heads, Tq, Tk]``.
            cache: per-call state for incremental decoding. With ``static_kv`` (cross-attention)
                the projected memory is computed once and reused; otherwise (self-attention) the
                new keys/values are appended to those cached.
            need_weights: also return the attention weights averaged over heads ``[B, Tq, Tk]``
                (in the query's layout: ``[n, t, Tk]`` for a grouped one; not with packed rows).
            layout: ``query`` is in this :class:`RowLayout` (and so is the result): it is
                projected as it is and rearranged for attention.
            kv_layout: the same for ``key``/``value`` (self-attention over packed rows).
        """
        if need_weights and layout is not None and layout.index is not None:
            raise ValueError("attention weights are not kept for packed rows")
        q = self.q_proj(query)
        q = self._split(layout.to_attention(q) if layout is not None else q)
        if cache is not None and static_kv and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self.k_proj(key), self.v_proj(value)
            if kv_layout is not None:
                k, v = kv_layout.to_attention(k), kv_layout.to_attention(v)
            k, v = self._split(k), self._split(v)
            if cache is not None:
                if not static_kv and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if attn_mask is not None:
                scores = scores + attn_mask
            probs = scores.softmax(dim=-1)
            weights = probs.mean(dim=1)
            if layout is not None and layout.group > 1:
                weights = weights.reshape(layout.n, layout.t, -1)
            out = F.dropout(probs, p=dropout, training=self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        b, _, t, _ = out.shape
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        if layout is not None:
            out = layout.from_attention(out)
        return self.out_proj(out), weights


class FeedForward(nn.Module):
    """Position-wise ``Linear -> activation -> dropout -> Linear``."""

    def __init__(
        self, d_model: int, d_ff: int, dropout: float = 0.1, activation: str = "relu"
    ) -> None:
        super().__init__()
        acts = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"activation={activation!r}; known: {sorted(acts)}")
        self.net = nn.Sequential(
            nn.Linear(d_model, d_ff),
            acts[activation](),
            nn.Dropout(dropout),
            nn.Linear(d_ff, d_model),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def causal_mask(length: int, device: torch.device | None = None) -> torch.Tensor:
    """Additive ``[length, length]`` mask: position i sees positions <= i."""
    mask = torch.full((length, length), float("-inf"), device=device)
    return torch.triu(mask, diagonal=1)


def sinusoid_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encodings ``[..., dim]`` of integer ``positions``."""
    half = dim // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half
    )
    angles = positions.float().unsqueeze(-1) * freq
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        enc = F.pad(enc, (0, 1))
    return enc


def sinusoid_2d(
    height: int, width: int, dim: int, device: torch.device | None = None
) -> torch.Tensor:
    """``[height * width, dim]`` encodings: half the channels for rows, half for columns."""
    rows = sinusoid_1d(torch.arange(height, device=device), dim // 2)
    cols = sinusoid_1d(torch.arange(width, device=device), dim - dim // 2)
    grid = torch.cat(
        [rows[:, None, :].expand(height, width, -1), cols[None, :, :].expand(height, width, -1)],
        dim=-1,
    )
    return grid.reshape(height * width, dim)
