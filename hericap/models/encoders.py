"""The visual side: Swin extractor (timm) and the grid sub-encoder.

Extractor: a timm Swin Transformer with ``features_only`` (Liu et al., ICCV 2021), random init or
pretrained weights from a local or ``s3://`` file (:mod:`hericap.models.backbone_weights`); never
downloaded. One extra stride-2 patch-merging stage after the last
Swin stage (GRIT's layout) makes the coarsest map stride 64: a 384×640 image gives 6×10 tokens.
Inputs of any size divisible by the patch size work, square or not (timm's dynamic image size).

Grid sub-encoder: a linear projection of the coarsest map to ``d_model`` (+ ReLU, dropout,
LayerNorm, 2-D sinusoidal positions) followed by post-LN self-attention layers, as in GRIT (Nguyen
et al., ECCV 2022) and HierCap (Pan et al., 2026), or by dynamic routing layers
(:mod:`hericap.models.routing`).
"""

from __future__ import annotations

import logging
from functools import partial

import timm
import torch
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging
from torch import nn

from hericap.models.backbone_weights import BackboneLoadReport, load_backbone_weights
from hericap.models.layers import FeedForward, MultiHeadAttention, sinusoid_2d
from hericap.models.masks import additive_key_mask
from hericap.models.routing import RoutingLayer
from hericap.models.swin_windows import use_research_windows

__all__ = [
    "GRID_LAYER_TYPES",
    "STEMS",
    "ConvStem",
    "EncoderLayer",
    "GridEncoder",
    "SwinExtractor",
    "VisualProjection",
]

logger = logging.getLogger(__name__)


class ConvStem(nn.Module):
    """A convolutional patch embedding for Swin: pairs of 3×3 convolutions (stride 2, then 1) down
    to the patch stride, then a 1×1 projection and LayerNorm (Xiao et al., "Early convolutions help
    transformers see better", NeurIPS 2021). From random init it learns local shape far sooner
    than the single linear projection of a patch.

    Takes the keyword arguments timm's Swin passes to its ``embed_layer`` and returns NHWC maps.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer=None,
        strict_img_size: bool = True,
        output_fmt: str = "NHWC",
        **_: object,
    ) -> None:
        super().__init__()
        if patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"the conv stem needs a power-of-two patch_size >= 2: {patch_size}")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        layers: list[nn.Module] = []
        channels, stride = in_chans, 1
        while stride < patch_size:
            # each halving: a stride-2 3×3 conv then a stride-1 3×3 conv (receptive field 19 px
            # at stride 4, enough to see a small object whole)
            out = embed_dim if stride * 2 == patch_size else max(16, embed_dim // 2)
            layers += [
                nn.Conv2d(channels, out, 3, stride=2, padding=1),
                nn.GELU(),
                nn.Conv2d(out, out, 3, stride=1, padding=1),
                nn.GELU(),
            ]
            channels, stride = out, stride * 2
        layers.append(nn.Conv2d(channels, embed_dim, 1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


# Patch embeddings selectable by ``model.extractor.stem``; None keeps timm's own.
STEMS: dict[str, type[nn.Module] | None] = {"patch": None, "conv": ConvStem}
# Window and frozen-stage rules of the extractor (hericap/config/flavours.py).
SWIN_RULES = ("timm", "research")


class SwinExtractor(nn.Module):
    """A timm Swin backbone returning NHWC feature maps of every stage (plus the extra stage).

    Args:
        image_size: input size the model is built for (side, or ``(height, width)``); other
            sizes divisible by ``patch_size`` work too (any size with ``window_rule="research"``,
            which pads the image to whole patches as the research code does).
        patch_size: patch embedding stride.
        embed_dim: channels of the first stage (doubled per stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window (must divide each stage's map).
        extra_stage_dim: channels of one extra stride-2 patch-merging stage after the last Swin
            stage (GRIT: 1024 for Swin-B); 0 or None: no extra stage.
        frozen_stages: how many stages to freeze (-1: nothing), counted by
            ``frozen_stages_rule``.
        frozen_stages_rule: ``timm``: the patch embedding and timm stages
            ``0..frozen_stages - 1``; ``research``: the research count, i.e. the patch embedding
            (``frozen_stages >= 0``) and stages ``0..frozen_stages - 2`` with the patch merging
            that ends each of them.
        drop_path_rate: stochastic depth, linear over the blocks.
        stem: patch embedding: ``patch`` (timm's linear patch projection) or ``conv``
            (:class:`ConvStem`).
        window_rule: ``timm`` or ``research`` (:mod:`hericap.models.swin_windows`).
        checkpoint: pretrained backbone weights (:mod:`hericap.models.backbone_weights`).
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        extra_stage_dim: int | None = None,
        frozen_stages: int = -1,
        frozen_stages_rule: str = "timm",
        drop_path_rate: float = 0.0,
        stem: str = "patch",
        window_rule: str = "timm",
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown model.extractor.stem={stem!r}; known: {sorted(STEMS)}")
        for name, value in (
            ("window_rule", window_rule),
            ("frozen_stages_rule", frozen_stages_rule),
        ):
            if value not in SWIN_RULES:
                raise ValueError(f"unknown {name}={value!r}; known: {list(SWIN_RULES)}")
        research = window_rule == "research"
        stem_kwargs = {}
        if STEMS[stem] is not None:
            stem_kwargs["embed_layer"] = STEMS[stem]
        elif research:  # pad the image to whole patches (the research PatchEmbed does)
            stem_kwargs["embed_layer"] = partial(PatchEmbed, dynamic_img_pad=True)
        self.body = timm.create_model(
            "swin_tiny_patch4_window7_224",  # architecture family; every size is set below
            pretrained=False,
            features_only=True,
            out_indices=tuple(range(len(depths))),
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            always_partition=research,
            **stem_kwargs,
        )
        if research:
            use_research_windows(self.body)
        self.channels: list[int] = self.body.feature_info.channels()
        self.reductions: list[int] = self.body.feature_info.reduction()
        last_dim = embed_dim * 2 ** (len(depths) - 1)
        self.extra: PatchMerging | None = None
        if extra_stage_dim:
            # keys `norm`, `reduction`: the layout of timm's (and the original Swin's) merging
            self.extra = PatchMerging(dim=last_dim, out_dim=extra_stage_dim)
            self.channels.append(extra_stage_dim)
            self.reductions.append(self.reductions[-1] * 2)
        self.num_stages = len(depths)
        self.load_report: BackboneLoadReport | None = None
        if checkpoint:
            self.load_report = load_backbone_weights(self, checkpoint)
        self.frozen_stages, self.frozen_stages_rule = frozen_stages, frozen_stages_rule
        self._freeze()

    def load_backbone(self, path: str) -> BackboneLoadReport:
        """Load pretrained backbone weights (any supported layout); see
        :func:`~hericap.models.backbone_weights.load_backbone_weights`."""
        self.load_report = load_backbone_weights(self, path)
        return self.load_report

    def _frozen_modules(self) -> list[nn.Module]:
        stages = dict(self.body.named_children())
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [stages["patch_embed"]]
        if self.frozen_stages_rule == "timm":
            return modules + [stages[f"layers_{i}"] for i in range(self.frozen_stages)]
        # research: stages 0..frozen_stages - 2, each with the merging that ends it (timm keeps
        # that merging at the start of the next stage; the last one is our extra stage)
        for i in range(min(self.frozen_stages - 1, self.num_stages)):
            modules.append(stages[f"layers_{i}"].blocks)
            if i + 1 < self.num_stages:
                modules.append(stages[f"layers_{i + 1}"].downsample)
            elif self.extra is not None:
                modules.append(self.extra)
        return modules

    def _freeze(self) -> None:
        for m in self._frozen_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinExtractor:
        super().train(mode)
        self._freeze()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images [B, 3, H, W]`` -> list of ``[B, h, w, C]`` maps, finest first."""
        maps = self.body(images)
        if self.extra is not None:
            maps.append(self.extra(maps[-1]))
        return maps


class EncoderLayer(nn.Module):
    """Post-LN self-attention + FFN layer."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        attn_dropout: float,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads, attn_dropout)
        self.ln1 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.ln2 = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, N, D]``; ``attn_mask``: additive, e.g. ``[B, 1, 1, N]`` over padded keys."""
        a, _ = self.attn(x, x, x, attn_mask=attn_mask)
        x = self.ln1(x + self.drop(a))
        return self.ln2(x + self.drop(self.ffn(x)))


class VisualProjection(nn.Sequential):
    """``Linear -> ReLU -> Dropout -> LayerNorm`` from the map's channels to ``d_model``, plus
    (``positions``) 2-D sinusoidal positions: how the grid and global sub-encoders read the
    coarsest map. The research code adds no positions."""

    def __init__(self, in_dim: int, d_model: int, dropout: float, positions: bool = True) -> None:
        super().__init__(
            nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout), nn.LayerNorm(d_model)
        )
        self.d_model, self.positions = d_model, positions

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``[B, h, w, C]`` -> ``[B, h*w, d_model]``."""
        b, h, w, c = feature_map.shape
        x = super().forward(feature_map.reshape(b, h * w, c))
        if not self.positions:
            return x
        return x + sinusoid_2d(h, w, self.d_model, device=x.device).to(x.dtype)


# Layer types of the grid sub-encoder (``model.grid_layer_type``).
GRID_LAYER_TYPES = ("transformer", "routing")


class GridEncoder(nn.Module):
    """Grid sub-encoder over the coarsest feature map.

    Args:
        in_dim: channels of the input map.
        d_model: output width.
        n_layers: layers (paper: 3).
        n_heads: attention heads.
        d_ff: FFN width.
        dropout: dropout on residual branches.
        attn_dropout: dropout on attention weights.
        layer_type: ``transformer`` (self-attention + FFN) or ``routing`` (DTNet-style dynamic
            routing cells, :class:`~hericap.models.routing.RoutingLayer`).
        positions: add 2-D sinusoidal positions to the tokens (the research code does not).
    """

    def __init__(
        self,
        in_dim: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        layer_type: str = "transformer",
        positions: bool = True,
    ) -> None:
        super().__init__()
        if layer_type not in GRID_LAYER_TYPES:
            raise ValueError(
                f"unknown model.grid_layer_type={layer_type!r}; known: {list(GRID_LAYER_TYPES)}"
            )
        self.proj = VisualProjection(in_dim, d_model, dropout, positions=positions)
        self.layer_type = layer_type
        if layer_type == "routing":
            self.layers = nn.ModuleList(
                RoutingLayer(d_model, n_heads, d_ff, dropout, attn_dropout) for _ in range(n_layers)
            )
        else:
            self.layers = nn.ModuleList(
                EncoderLayer(d_model, n_heads, d_ff, dropout, attn_dropout) for _ in range(n_layers)
            )
        self.d_model = d_model

    def forward(
        self, feature_map: torch.Tensor, padding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """``[B, h, w, C]`` -> ``[B, h*w, d_model]`` grid tokens, and per routing layer its
        per-image routing weights ``{"spatial": [B, 3], "channel": [B, 2]}`` (empty for
        transformer layers).

        ``padding [B, h*w]`` (True = padding) keeps padded tokens out of the self-attention
        keys (transformer layers).
        """
        _, h, w, _ = feature_map.shape
        x = self.proj(feature_map)
        if padding is not None and self.layer_type == "routing":
            raise ValueError("routing grid layers take no padding mask (encode per image size)")
        mask = additive_key_mask(padding)
        routing = []
        for layer in self.layers:
            if self.layer_type == "routing":
                x, weights = layer(x, h, w)
                routing.append(weights)
            else:
                x = layer(x, attn_mask=mask)
        return x, routing
