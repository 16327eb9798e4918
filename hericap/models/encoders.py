"""The visual side: Swin extractor (timm) and the grid sub-encoder.

Extractor: a timm Swin Transformer with ``features_only`` (Liu et al., ICCV 2021), random init or
weights from a local file; never downloaded. Grid sub-encoder: a linear projection of the coarsest
map to ``d_model`` (+ ReLU, dropout, LayerNorm, 2-D sinusoidal positions) followed by post-LN
self-attention layers, as in GRIT (Nguyen et al., ECCV 2022) and HierCap (Pan et al., 2026).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from hericap.models.layers import FeedForward, MultiHeadAttention, sinusoid_2d

__all__ = ["EncoderLayer", "GridEncoder", "SwinExtractor"]

logger = logging.getLogger(__name__)


class SwinExtractor(nn.Module):
    """A timm Swin backbone returning NHWC feature maps of the requested stages.

    Args:
        image_size: input side in pixels.
        patch_size: patch embedding stride.
        embed_dim: channels of the first stage (doubled per stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window (must divide each stage's map).
        out_indices: stages whose maps are returned (default: the last).
        frozen_stages: freeze the patch embedding and stages ``0..frozen_stages - 1``
            (-1: nothing frozen).
        drop_path_rate: stochastic depth.
        checkpoint: local file with backbone weights (a state dict, optionally under ``model``).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int = 4,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        out_indices: tuple[int, ...] | None = None,
        frozen_stages: int = -1,
        drop_path_rate: float = 0.0,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        out_indices = out_indices if out_indices is not None else (len(depths) - 1,)
        self.body = timm.create_model(
            "swin_tiny_patch4_window7_224",  # architecture family; every size is set below
            pretrained=False,
            features_only=True,
            out_indices=out_indices,
            img_size=image_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            drop_path_rate=drop_path_rate,
        )
        self.channels: list[int] = self.body.feature_info.channels()
        self.reductions: list[int] = self.body.feature_info.reduction()
        if checkpoint:
            self.load_backbone(checkpoint)
        self.frozen_stages = frozen_stages
        self._freeze()

    def load_backbone(self, path: str) -> None:
        """Load timm-layout backbone weights strictly; a mismatch lists the keys."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"model.extractor.checkpoint not found: {p}")
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        expected = set(self.body.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"backbone checkpoint {p} does not match the extractor: "
                f"missing keys {missing[:20]}{'...' if len(missing) > 20 else ''}, "
                f"unexpected keys {unexpected[:20]}{'...' if len(unexpected) > 20 else ''}"
            )
        self.body.load_state_dict(state, strict=True)
        logger.info("loaded backbone weights from %s", p)

    def _freeze(self) -> None:
        if self.frozen_stages < 0:
            return
        modules = [m for n, m in self.body.named_children() if n == "patch_embed"]
        modules += [
            m
            for n, m in self.body.named_children()
            if n.startswith("layers_") and int(n.split("_")[1]) < self.frozen_stages
        ]
        for m in modules:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinExtractor:
        super().train(mode)
        self._freeze()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """``images [B, 3, H, W]`` -> list of ``[B, h, w, C]`` maps."""
        return self.body(images)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x)
        x = self.ln1(x + self.drop(a))
        return self.ln2(x + self.drop(self.ffn(x)))


class GridEncoder(nn.Module):
    """Grid sub-encoder over the coarsest feature map.

    Args:
        in_dim: channels of the input map.
        d_model: output width.
        n_layers: self-attention layers (paper: 3).
        n_heads: attention heads.
        d_ff: FFN width.
        dropout: dropout on residual branches.
        attn_dropout: dropout on attention weights.
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
    ) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(in_dim, d_model), nn.ReLU(), nn.Dropout(dropout), nn.LayerNorm(d_model)
        )
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, dropout, attn_dropout) for _ in range(n_layers)
        )
        self.d_model = d_model

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """``[B, h, w, C]`` -> ``[B, h*w, d_model]`` grid tokens."""
        b, h, w, c = feature_map.shape
        x = self.proj(feature_map.reshape(b, h * w, c))
        x = x + sinusoid_2d(h, w, self.d_model, device=x.device).to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return x
