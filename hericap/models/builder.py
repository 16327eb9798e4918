"""Build a :class:`~hericap.models.captioner.Captioner` from the ``model`` config section, and
the decoding controls from the ``decode`` section.

This is the one place that reads the config; every module below takes explicit keyword
arguments.
"""

from __future__ import annotations

import logging

from torch import nn

from hericap.config.flavours import FlavourOptions, resolve_options
from hericap.config.schema import DecodeConfig, ModelConfig
from hericap.models.captioner import Captioner
from hericap.models.decoder import HierarchicalDecoder
from hericap.models.decoding import DecodeControls
from hericap.models.encoders import GridEncoder, SwinExtractor
from hericap.models.fusion import canonical_fusion_name
from hericap.models.global_encoder import GlobalEncoder
from hericap.models.grit_checkpoint import load_detector_checkpoint
from hericap.models.region import RegionEncoder
from hericap.models.research_global import ResearchGlobalEncoder

__all__ = [
    "build_captioner",
    "decode_controls",
    "format_parameter_summary",
    "parameter_summary",
]

logger = logging.getLogger(__name__)


def decode_controls(decode: DecodeConfig) -> DecodeControls:
    """The decoding controls of the ``decode`` section (validated with the config)."""
    return DecodeControls(
        alpha=decode.alpha,
        length_penalty=decode.length_penalty,
        no_repeat_ngram_size=decode.no_repeat_ngram_size,
        min_len=decode.min_len,
        beam_groups=decode.beam_groups,
        diversity_strength=decode.diversity_strength,
        top_k=decode.top_k,
        top_p=decode.top_p,
    )


def build_captioner(
    model: ModelConfig,
    vocab_size: int,
    image_size: int | tuple[int, int],
    load_pretrained: bool = True,
) -> Captioner:
    """Instantiate the captioner described by ``model``, in its flavour; with
    ``load_pretrained``, also load the weight files ``model.extractor.checkpoint`` /
    ``model.detector.checkpoint`` name (a checkpoint folder being loaded holds every weight
    itself and passes False).

    Raises:
        ValueError: an inconsistent configuration.
    """
    options = resolve_options(model)
    fusion_name = canonical_fusion_name(model.cap_generator.decoder_name)
    extractor = _extractor(model, options, image_size, load_pretrained)
    coarsest = extractor.channels[-1]
    grid = region = glob = None
    region_proj: nn.Module | None = None
    if model.use_gri_feat:
        grid = GridEncoder(
            in_dim=coarsest,
            d_model=model.d_model,
            n_layers=model.grid_layers,
            n_heads=model.n_heads,
            d_ff=model.d_ff,
            dropout=model.dropout,
            attn_dropout=model.attn_dropout,
            layer_type=model.grid_layer_type,
            positions=options.visual_positions,
        )
    if model.use_reg_feat:
        region = _region_encoder(model, extractor)
        if model.detector.d_model != model.d_model:
            region_proj = nn.Sequential(
                nn.Linear(model.detector.d_model, model.d_model), nn.LayerNorm(model.d_model)
            )
    if model.use_glob_feat:
        glob = _global_encoder(model, options, coarsest)
    memory_names = [n for n, m in (("grid", grid), ("region", region), ("global", glob)) if m]
    decoder = HierarchicalDecoder(
        vocab_size=vocab_size,
        memory_names=memory_names,
        fusion_name=fusion_name,
        d_model=model.d_model,
        n_layers=model.cap_generator.n_layers,
        n_heads=model.n_heads,
        d_ff=model.d_ff,
        dropout=model.dropout,
        attn_dropout=model.attn_dropout,
        activation=model.cap_generator.activation,
        fusion_wiring=options.fusion_wiring,
        embedding=options.embedding,
        position_table_size=model.cap_generator.position_table_size,
    )
    captioner = Captioner(
        extractor,
        decoder,
        grid_encoder=grid,
        region_encoder=region,
        global_encoder=glob,
        region_proj=region_proj,
        padding=options.padding,
        search=options.beam_search,
    )
    if load_pretrained and model.detector.checkpoint:
        load_detector_checkpoint(
            captioner,
            model.detector.checkpoint,
            num_stages=len(model.extractor.depths),
            allow_partial=model.detector.allow_partial_load,
        )
    return captioner


def _extractor(
    model: ModelConfig,
    options: FlavourOptions,
    image_size: int | tuple[int, int],
    load_pretrained: bool,
) -> SwinExtractor:
    ext = model.extractor
    return SwinExtractor(
        image_size=image_size,
        patch_size=ext.patch_size,
        embed_dim=ext.embed_dim,
        depths=tuple(ext.depths),
        num_heads=tuple(ext.num_heads),
        window_size=ext.window_size,
        extra_stage_dim=ext.extra_stage_dim or None,
        frozen_stages=model.frozen_stages,
        frozen_stages_rule=options.frozen_stages_rule,
        drop_path_rate=ext.drop_path_rate,
        stem=ext.stem,
        window_rule=options.window_rule,
        checkpoint=ext.checkpoint if load_pretrained else None,
    )


def _region_encoder(model: ModelConfig, extractor: SwinExtractor) -> RegionEncoder:
    det = model.detector  # Config.validate checks num_levels against the maps
    return RegionEncoder(
        in_channels=extractor.channels[-det.num_levels :],
        d_model=det.d_model,
        n_heads=det.num_heads,
        d_ff=det.dim_feedforward,
        n_layers=det.num_layers,
        n_levels=det.num_levels,
        n_points=det.num_points,
        n_queries=det.num_queries,
        n_classes=det.num_classes,
        dropout=det.dropout,
        activation=det.activation,
        with_box_refine=det.with_box_refine,
    )


def _global_encoder(
    model: ModelConfig, options: FlavourOptions, in_dim: int
) -> GlobalEncoder | ResearchGlobalEncoder:
    d_ff = model.global_d_ff or model.d_ff
    if options.global_module == "gra":
        return ResearchGlobalEncoder(
            in_dim=in_dim,
            d_model=model.d_model,
            n_layers=model.global_layers,
            d_ff=d_ff,
            dropout=model.dropout,
        )
    return GlobalEncoder(
        in_dim=in_dim,
        d_model=model.d_model,
        n_layers=model.global_layers,
        d_ff=d_ff,
        dropout=model.dropout,
        positions=options.visual_positions,
    )


BRANCHES = {
    "extractor": "Swin extractor",
    "grid_encoder": "grid sub-encoder",
    "region_encoder": "region sub-encoder (Deformable DETR)",
    "region_proj": "region projection",
    "global_encoder": "global sub-encoder",
    "decoder": "hierarchical decoder",
}


def parameter_summary(model: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level branch (branches with parameters), plus ``trainable``
    and ``total``."""
    counts = {
        name: n
        for name, child in model.named_children()
        if (n := sum(p.numel() for p in child.parameters()))
    }
    counts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def format_parameter_summary(model: nn.Module) -> str:
    """A table of :func:`parameter_summary`, in millions."""
    rows = [
        f"  {BRANCHES.get(name, name):<40} {count / 1e6:>9.2f} M"
        for name, count in parameter_summary(model).items()
    ]
    return "parameters per branch:\n" + "\n".join(rows)
