"""Build a :class:`~hericap.models.captioner.Captioner` from the ``model`` config section.

This is the one place that reads the config; every module below takes explicit keyword
arguments.
"""

from __future__ import annotations

import logging

from torch import nn

from hericap.config.schema import ModelConfig
from hericap.models.captioner import Captioner
from hericap.models.decoder import HierarchicalDecoder
from hericap.models.encoders import GridEncoder, SwinExtractor
from hericap.models.fusion import canonical_fusion_name

__all__ = ["build_captioner", "parameter_summary"]

logger = logging.getLogger(__name__)


def build_captioner(model: ModelConfig, vocab_size: int, image_size: int) -> Captioner:
    """Instantiate the captioner described by ``model``.

    Raises:
        ValueError: a branch or variant this version cannot build.
    """
    fusion_name = canonical_fusion_name(model.cap_generator.decoder_name)
    unsupported = [k for k in ("use_reg_feat", "use_glob_feat") if getattr(model, k)]
    if unsupported:
        raise ValueError(
            f"{', '.join('model.' + k + '=True' for k in unsupported)}: this HeriCap version "
            "builds the grid branch only (region and global sub-encoders are not included yet); "
            "set them to False"
        )
    if model.detector.checkpoint:
        raise ValueError(
            f"model.detector.checkpoint={model.detector.checkpoint!r} is set, but this HeriCap "
            "version has no region sub-encoder to load it into; remove it (it would be ignored)"
        )
    if not model.use_gri_feat:
        raise ValueError("model.use_gri_feat=False leaves no visual memory in this version")
    ext = model.extractor
    extractor = SwinExtractor(
        image_size=image_size,
        patch_size=ext.patch_size,
        embed_dim=ext.embed_dim,
        depths=tuple(ext.depths),
        num_heads=tuple(ext.num_heads),
        window_size=ext.window_size,
        frozen_stages=model.frozen_stages,
        stem=ext.stem,
        checkpoint=ext.checkpoint,
    )
    grid = GridEncoder(
        in_dim=extractor.channels[-1],
        d_model=model.d_model,
        n_layers=model.grid_layers,
        n_heads=model.n_heads,
        d_ff=model.d_ff,
        dropout=model.dropout,
        attn_dropout=model.attn_dropout,
    )
    decoder = HierarchicalDecoder(
        vocab_size=vocab_size,
        memory_names=["grid"],
        fusion_name=fusion_name,
        d_model=model.d_model,
        n_layers=model.cap_generator.n_layers,
        n_heads=model.n_heads,
        d_ff=model.d_ff,
        dropout=model.dropout,
        attn_dropout=model.attn_dropout,
        activation=model.cap_generator.activation,
    )
    return Captioner(extractor, grid, decoder)


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level branch, plus ``total``."""
    counts = {
        name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()
    }
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
