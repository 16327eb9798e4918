"""The region sub-encoder: a decoder-only Deformable DETR over the extractor's multi-scale maps.

Every scale is projected to ``d_model`` (1×1 convolution + GroupNorm); a set of learned object
queries runs self-attention, multi-scale deformable cross-attention (Zhu et al., ICLR 2021) and an
FFN per layer, with iterative box refinement. The outputs are the region features (one per query)
and their boxes (``cx, cy, w, h`` in [0, 1] of the image).

The deformable attention is pure PyTorch (``grid_sample``): nothing to compile, runs on CPU and GPU.

With padding masks (one per level, True = padding) the encoder does what Deformable DETR and the
research code do: padded cells give zero values, and the reference points are scaled per level
by the fraction of the map that is image (``valid_ratios``), so boxes stay relative to the image.

Module and parameter names follow GRIT's detector (``input_proj``, ``decoder_layers.N.cross_attn
.sampling_offsets``, ``query_embed``, ``class_embed``, ``bbox_embed``...), so that its released
``region_ckpt.pth`` maps onto this module key for key (:mod:`hericap.models.grit_checkpoint`).

Which parameters learn from the caption loss: between layers the refined boxes are detached (as in
Deformable DETR), so with box refinement the box heads, the class heads and the initial
reference-point projection get no gradient from captioning. They are detector-only parameters:
frozen here (``requires_grad=False``) and kept at the detector's pretrained values, which keeps
every trainable parameter in the graph (DDP runs without ``find_unused_parameters``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hericap.models.masks import valid_ratios as level_valid_ratios

__all__ = [
    "DeformableDecoderLayer",
    "MultiScaleDeformableAttention",
    "RegionEncoder",
    "RegionOutput",
    "ms_deform_attn",
]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention by bilinear sampling.

    Args:
        value: ``[B, S, heads, head_dim]``, the levels' maps flattened and concatenated
            (``S = sum(h * w)``, finest first, in ``spatial_shapes`` order).
        spatial_shapes: ``(h, w)`` per level.
        sampling_locations: ``[B, Q, heads, levels, points, 2]``, ``(x, y)`` in [0, 1].
        attention_weights: ``[B, Q, heads, levels, points]``, summing to 1 over levels × points.

    Returns:
        ``[B, Q, heads * head_dim]``.
    """
    b, _, heads, head_dim = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        v = value[:, start : start + h * w]  # [B, h*w, heads, hd]
        start += h * w
        v = v.permute(0, 2, 3, 1).reshape(b * heads, head_dim, h, w)
        g = grids[:, :, :, level].transpose(1, 2).reshape(b * heads, q, points, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*heads, hd, Q, levels*points]
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (stacked * weights).sum(-1)  # [B*heads, hd, Q]
    return out.view(b, heads * head_dim, q).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Each query samples ``n_points`` locations per level and head around its reference point.

    Args:
        d_model: width.
        n_levels: feature levels.
        n_heads: heads.
        n_points: sampling points per level and head.
    """

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as a star: head k looks in direction 2πk/heads, point i at distance i+1.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        start = directions[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        start = start * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(start.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        value_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query [B, Q, D]``, ``reference_points [B, Q, 2]`` (centres) or ``[B, Q, 4]`` (boxes),
        or per level ``[B, Q, levels, 2|4]``, ``value [B, S, D]`` -> ``[B, Q, D]``.

        ``value_padding [B, S]`` (True = padding) zeroes the padded cells' values.
        """
        b, q, _ = query.shape
        v = self.value_proj(value)
        if value_padding is not None:
            v = v.masked_fill(value_padding[..., None], 0.0)
        v = v.view(b, value.shape[1], self.n_heads, -1)
        offsets = self.sampling_offsets(query).view(
            b, q, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            b, q, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(b, q, self.n_heads, self.n_levels, self.n_points)
        # [B, Q, 1 (heads), levels or 1, 1 (points), 2|4]
        if reference_points.dim() == 4:
            ref = reference_points[:, :, None, :, None, :]
        else:
            ref = reference_points[:, :, None, None, None, :]
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level
            size = torch.tensor(
                [[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device
            )
            locations = ref + offsets / size[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are in fractions of half the box, spread over the points
            locations = ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference points of size {reference_points.shape[-1]}; want 2 or 4")
        return self.output_proj(ms_deform_attn(v, spatial_shapes, locations, weights))


class DeformableDecoderLayer(nn.Module):
    """Query self-attention -> deformable cross-attention -> FFN, each with Add & LN (post-LN)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        dropout: float,
        activation: str,
        n_levels: int,
        n_heads: int,
        n_points: int,
    ) -> None:
        super().__init__()
        acts = {"relu": F.relu, "gelu": F.gelu}
        if activation not in acts:
            raise ValueError(f"model.detector.activation={activation!r}; known: {sorted(acts)}")
        self.cross_attn = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.activation = acts[activation]
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        src: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        valid_ratios: torch.Tensor | None = None,
        src_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``valid_ratios [B, levels, 2]`` and ``src_padding [B, S]`` come with padded maps."""
        if valid_ratios is not None:
            # the reference boxes (image-relative) in each level's padded coordinates
            scale = (
                valid_ratios if reference_points.shape[-1] == 2 else valid_ratios.repeat(1, 1, 2)
            )
            reference_points = reference_points[:, :, None] * scale[:, None]
        q = tgt + query_pos
        a = self.self_attn(q, q, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop(a))
        a = self.cross_attn(
            tgt + query_pos, reference_points, src, spatial_shapes, value_padding=src_padding
        )
        tgt = self.norm1(tgt + self.drop(a))
        ffn = self.linear2(self.drop(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.drop(ffn))


class BoxHead(nn.Module):
    """Three-layer MLP to box deltas (``layers.0..2``, GRIT's ``bbox_embed`` layout)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(d_model, d_model), nn.Linear(d_model, d_model), nn.Linear(d_model, 4)]
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _refine(head: BoxHead, tgt: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """New boxes ``[B, Q, 4]`` = sigmoid(head(tgt) + logit(reference)), detached."""
    delta = head(tgt)
    if reference.shape[-1] == 4:
        boxes = delta + _inverse_sigmoid(reference)
    else:
        boxes = torch.cat([delta[..., :2] + _inverse_sigmoid(reference), delta[..., 2:]], dim=-1)
    return boxes.sigmoid().detach()


@dataclass
class RegionOutput:
    """``features [B, Q, D]``, ``boxes [B, Q, 4]`` (cx, cy, w, h in [0, 1]) and, when asked for,
    ``class_logits [B, Q, classes]`` and the per-layer ``hidden_states [layers + 1, B, Q, D]``
    (index 0: the query targets) and ``references [layers + 1, B, Q, 2|4]`` (index 0: the
    initial ones)."""

    features: torch.Tensor
    boxes: torch.Tensor
    class_logits: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    references: torch.Tensor | None = None


class RegionEncoder(nn.Module):
    """Decoder-only Deformable DETR.

    Args:
        in_channels: channels of the maps it reads (the last ``n_levels`` of the extractor's).
        d_model: width (GRIT: the caption model's d_model, 512).
        n_heads: attention heads.
        d_ff: FFN width.
        n_layers: decoder layers (paper: 6).
        n_levels: feature levels (paper: 4).
        n_points: sampling points per level and head (paper: 4).
        n_queries: object queries (paper: 150).
        n_classes: detector classes (GRIT's Visual Genome detector: 1849).
        dropout: dropout.
        activation: FFN activation.
        with_box_refine: iterative box refinement (one box and class head per layer, plus one
            for the initial boxes); without it, one head each and the reference points stay put.
    """

    def __init__(
        self,
        in_channels: list[int],
        d_model: int = 512,
        n_heads: int = 8,
        d_ff: int = 1024,
        n_layers: int = 6,
        n_levels: int = 4,
        n_points: int = 4,
        n_queries: int = 150,
        n_classes: int = 1849,
        dropout: float = 0.1,
        activation: str = "relu",
        with_box_refine: bool = True,
    ) -> None:
        super().__init__()
        if len(in_channels) != n_levels:
            raise ValueError(f"{len(in_channels)} input maps for n_levels={n_levels}")
        groups = math.gcd(32, d_model)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), nn.GroupNorm(groups, d_model))
            for c in in_channels
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.decoder_layers = nn.ModuleList(
            DeformableDecoderLayer(d_model, d_ff, dropout, activation, n_levels, n_heads, n_points)
            for _ in range(n_layers)
        )
        self.reference_points = nn.Linear(d_model, 2)
        self.query_embed = nn.Embedding(n_queries, 2 * d_model)
        n_predictions = n_layers + 1 if with_box_refine else 1
        self.class_embed = nn.ModuleList(
            nn.Linear(d_model, n_classes) for _ in range(n_predictions)
        )
        prior = 0.01  # focal-loss prior of the detector's class heads
        for head in self.class_embed:
            nn.init.constant_(head.bias, -math.log((1 - prior) / prior))
        self.bbox_embed = nn.ModuleList(BoxHead(d_model) for _ in range(n_predictions))
        if with_box_refine:
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        self.d_model, self.n_levels, self.with_box_refine = d_model, n_levels, with_box_refine
        for p in self.detection_only_parameters():
            p.requires_grad_(False)

    def detection_only_parameters(self) -> list[nn.Parameter]:
        """Parameters the caption loss cannot reach (see the module docstring)."""
        modules: list[nn.Module] = [self.class_embed, self.bbox_embed]
        if self.with_box_refine:
            modules.append(self.reference_points)
        return [p for m in modules for p in m.parameters()]

    def forward(
        self,
        maps: list[torch.Tensor],
        masks: list[torch.Tensor] | None = None,
        return_logits: bool = False,
        return_intermediate: bool = False,
    ) -> RegionOutput:
        """``maps``: the extractor's NHWC maps, finest first; the last ``n_levels`` are read.

        ``masks``: the padding mask ``[B, h, w]`` of each of those maps (None: no padding).
        """
        if len(maps) < self.n_levels:
            raise ValueError(f"{len(maps)} feature maps for n_levels={self.n_levels}")
        maps = maps[-self.n_levels :]
        srcs, shapes = [], []
        for proj, m in zip(self.input_proj, maps, strict=True):
            s = proj(m.permute(0, 3, 1, 2))
            shapes.append((s.shape[2], s.shape[3]))
            srcs.append(s.flatten(2).transpose(1, 2))
        src = torch.cat(srcs, dim=1)
        padding = ratios = None
        if masks is not None:
            masks = masks[-self.n_levels :]
            padding = torch.cat([m.flatten(1) for m in masks], dim=1)
            ratios = torch.stack([level_valid_ratios(m) for m in masks], dim=1)
        b = src.shape[0]
        query_pos, tgt = self.query_embed.weight.split(self.d_model, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(b, -1, -1)
        tgt = tgt.unsqueeze(0).expand(b, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()
        if self.with_box_refine:
            reference = _refine(self.bbox_embed[0], tgt, reference)
        hidden, references = [tgt], [reference]
        for i, layer in enumerate(self.decoder_layers):
            tgt = layer(tgt, query_pos, reference, src, shapes, ratios, padding)
            if self.with_box_refine:
                reference = _refine(self.bbox_embed[i + 1], tgt, reference)
            hidden.append(tgt)
            references.append(reference)
        boxes = reference if self.with_box_refine else _refine(self.bbox_embed[0], tgt, reference)
        out = RegionOutput(features=tgt, boxes=boxes)
        if return_logits:
            out.class_logits = self.class_embed[-1](tgt)
        if return_intermediate:
            out.hidden_states, out.references = torch.stack(hidden), torch.stack(references)
        return out
