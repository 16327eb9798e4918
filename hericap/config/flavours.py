"""Model flavours: which code a captioner reproduces, as one coherent set of model options.

* ``hericap`` (the default, for new training): HeriCap's own model. Captions do not depend on
  which other images share a batch (images are encoded per padded size, see
  :class:`~hericap.models.captioner.Captioner`), every parameter is used, words are embedded
  scaled with sinusoidal positions, grid and global tokens carry 2-D positions.
* ``grit`` / ``hiercap``: the exact computation of the research code (GRIT, Nguyen et al., ECCV
  2022; HierCap, Pan et al., 2026) at its pinned commits, quirks included, so that imported
  research checkpoints give the research outputs (``hericap import``; ``docs/research_import.md``).

Each option below can also be set on its own (``model.<option>=...``); left unset (None) it
takes the flavour's value. :func:`resolve_options` resolves and validates the set up front.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hericap.config.schema import Config, ModelConfig

__all__ = [
    "FLAVOURS",
    "OPTION_VALUES",
    "FlavourOptions",
    "check_flavour",
    "resolve_options",
]


@dataclass(frozen=True)
class FlavourOptions:
    """The model options a flavour fixes.

    Attributes:
        fusion_wiring: how a decoder layer attends to the visual memories. ``hericap``: one
            residual + LayerNorm around the fused cross-attentions, every module its own.
            ``grit``: GRIT's wiring (residual + LayerNorm inside each cross-attention; both
            gates computed by one shared layer). ``hiercap``: HierCap's wiring (residual +
            LayerNorm inside each cross-attention, one gate per branch; its sequential
            variants attend every memory through one shared module).
        embedding: ``hericap``: word embedding scaled by sqrt(d) plus computed sinusoids,
            embedding dropout, output layer with bias. ``research``: unscaled word embedding
            plus a position table loaded from the checkpoint (positions count from 1, <pad>
            tokens take row 0), no embedding dropout, output layer without bias.
        visual_positions: add 2-D sinusoidal positions to grid and global tokens.
        global_module: ``relation`` (HeriCap's relation-aware global layer, any map size) or
            ``gra`` (HierCap's global relation-attention module, fixed 6x10 grid).
        frozen_stages_rule: ``timm`` (freeze timm stages ``< frozen_stages``) or ``research``
            (the research count: patch embedding, then stages ``< frozen_stages - 1`` with the
            patch merging that ends them).
        window_rule: Swin windows. ``timm``: timm's (shift, then pad; smaller windows on small
            maps). ``research``: the research Swin's (pad to whole windows, then shift; always
            12x12 windows shifted by 6).
        padding: how a batch of differently sized images is encoded. ``by_size``: each image at
            its own padded size (captions independent of the batch). ``research``: one
            zero-padded batch; Swin attends over the padding, as the research code does, so
            an image's features change with the other images in its batch.
        beam_search: ``hericap`` (never emits <bos>/<pad>, forces <eos> after ``max_len``
            words, stops when every beam ends) or ``research`` (the research loop: exactly
            ``max_len`` steps, finished beams continue with <unk> at log-prob 0, any word may
            be chosen).
    """

    fusion_wiring: str
    embedding: str
    visual_positions: bool
    global_module: str
    frozen_stages_rule: str
    window_rule: str
    padding: str
    beam_search: str


# The values each option accepts (booleans: True/False).
OPTION_VALUES: dict[str, tuple] = {
    "fusion_wiring": ("hericap", "grit", "hiercap"),
    "embedding": ("hericap", "research"),
    "visual_positions": (True, False),
    "global_module": ("relation", "gra"),
    "frozen_stages_rule": ("timm", "research"),
    "window_rule": ("timm", "research"),
    "padding": ("by_size", "research"),
    "beam_search": ("hericap", "research"),
}

_RESEARCH = {
    "embedding": "research",
    "visual_positions": False,
    "frozen_stages_rule": "research",
    "window_rule": "research",
    "padding": "research",
    "beam_search": "research",
}

FLAVOURS: dict[str, FlavourOptions] = {
    "hericap": FlavourOptions(
        fusion_wiring="hericap",
        embedding="hericap",
        visual_positions=True,
        global_module="relation",
        frozen_stages_rule="timm",
        window_rule="timm",
        padding="by_size",
        beam_search="hericap",
    ),
    "grit": FlavourOptions(fusion_wiring="grit", global_module="relation", **_RESEARCH),
    "hiercap": FlavourOptions(fusion_wiring="hiercap", global_module="gra", **_RESEARCH),
}

# Where an option lives in the config (``window_rule`` sits with the extractor's keys).
_OPTION_KEYS = {f.name: f"model.{f.name}" for f in fields(FlavourOptions)}
_OPTION_KEYS["window_rule"] = "model.extractor.window_rule"


def _explicit(model: ModelConfig) -> dict[str, object]:
    values = {name: getattr(model, name, None) for name in _OPTION_KEYS}
    values["window_rule"] = model.extractor.window_rule
    return {k: v for k, v in values.items() if v is not None}


def resolve_options(model: ModelConfig) -> FlavourOptions:
    """The flavour's options with the ones set explicitly in ``model`` applied.

    Raises:
        ValueError: an unknown flavour or option value, or options that cannot work together.
    """
    if model.flavour not in FLAVOURS:
        raise ValueError(f"unknown model.flavour={model.flavour!r}; known: {list(FLAVOURS)}")
    values = {f.name: getattr(FLAVOURS[model.flavour], f.name) for f in fields(FlavourOptions)}
    for name, value in _explicit(model).items():
        if value not in OPTION_VALUES[name]:
            raise ValueError(
                f"{_OPTION_KEYS[name]}={value!r}; known: {list(OPTION_VALUES[name])} "
                f"(or null for the flavour's value)"
            )
        values[name] = value
    options = FlavourOptions(**values)
    _check_model(model, options)
    return options


def _check_model(model: ModelConfig, options: FlavourOptions) -> None:
    _check_wiring(model, options)
    _check_sizes(model, options)


def _check_wiring(model: ModelConfig, options: FlavourOptions) -> None:
    branches = (model.use_gri_feat, model.use_reg_feat, model.use_glob_feat)
    name = model.cap_generator.decoder_name.strip().lower()
    if options.fusion_wiring == "grit" and (branches != (True, True, False) or name != "parallel"):
        raise ValueError(
            "model.fusion_wiring=grit is GRIT's parallel layer over the grid and region "
            "memories: it needs model.cap_generator.decoder_name=Parallel, use_gri_feat="
            f"True, use_reg_feat=True, use_glob_feat=False (got {name!r}, {branches})"
        )
    if options.fusion_wiring == "hiercap" and branches != (True, True, True):
        raise ValueError(
            "model.fusion_wiring=hiercap is HierCap's decoder over the grid, region and global "
            f"memories: set use_gri_feat, use_reg_feat and use_glob_feat to True (got {branches})"
        )
    if options.fusion_wiring != "hericap":
        if model.use_reg_feat and model.detector.d_model != model.d_model:
            raise ValueError(
                f"model.fusion_wiring={options.fusion_wiring} feeds region features to the "
                f"decoder unprojected: model.detector.d_model={model.detector.d_model} must equal "
                f"model.d_model={model.d_model}"
            )
        if model.grid_layer_type != "transformer" or model.extractor.stem != "patch":
            raise ValueError(
                f"model.fusion_wiring={options.fusion_wiring} is the research model: it needs "
                "model.grid_layer_type=transformer and model.extractor.stem=patch"
            )


def _check_sizes(model: ModelConfig, options: FlavourOptions) -> None:
    table = model.cap_generator.position_table_size
    if options.embedding == "research" and table < 2:
        raise ValueError(
            "model.embedding=research reads word positions from a table: set "
            f"model.cap_generator.position_table_size (research: max_len + 1 = 55), got {table}"
        )
    if options.embedding == "hericap" and table:
        raise ValueError(
            f"model.cap_generator.position_table_size={table} is only used with "
            "model.embedding=research (HeriCap computes sinusoids for any length); set it to 0"
        )
    if options.global_module == "gra" and model.use_glob_feat and model.d_model % 4:
        raise ValueError(
            f"model.global_module=gra embeds relations in model.d_model // 4 channels: "
            f"model.d_model={model.d_model} must be divisible by 4"
        )
    if model.global_d_ff < 0 or not 0.0 <= model.extractor.drop_path_rate < 1.0:
        raise ValueError(
            f"model.global_d_ff={model.global_d_ff} must be >= 0 and "
            f"model.extractor.drop_path_rate={model.extractor.drop_path_rate} in [0, 1)"
        )


def check_flavour(cfg: Config) -> FlavourOptions:
    """:func:`resolve_options` plus the checks that involve other sections (caption lengths).

    Raises:
        ValueError: what to change.
    """
    options = resolve_options(cfg.model)
    table = cfg.model.cap_generator.position_table_size
    if options.embedding == "research":
        # beam search reads rows 1..decode.max_len; teacher forcing 1..max_caption_len + 1
        need = max(cfg.decode.max_len, cfg.dataset.max_caption_len + 1) + 1
        if table < need:
            raise ValueError(
                f"model.cap_generator.position_table_size={table} rows cannot embed positions "
                f"up to {need - 1} (decode.max_len={cfg.decode.max_len}, "
                f"dataset.max_caption_len={cfg.dataset.max_caption_len}): lower those or use a "
                "larger table"
            )
    return options
