"""The HeriCap config of a research checkpoint (GRIT / HierCap), for ``hericap import``.

The research code reads some sizes from its Hydra config and hard-wires others (the Swin-B
builder; d_model / heads / FFN width of the grid net, glob net and caption generator). So sizes
are read from the checkpoint's tensors wherever they show there, the heads the research code
hard-wires are its constant 8, and the rest comes from the config keys the research code reads:
``model.use_*_feat``, ``dropout``, ``frozen_stages``, ``max_len``, ``beam_size``, ``beam_len``,
``model.detector.*`` (or ``model.det_module.*`` of a detection config), HierCap's
``cap_generator.decoder_name``, ``dataset.transform_cfg`` and a few optimiser keys. A detection
config has no caption keys: the caption side then takes the paper's values
(:data:`PAPER_CAPTION`), and dotted overrides change any key afterwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hericap.config.loader import load_config
from hericap.config.schema import Config

__all__ = ["PAPER_CAPTION", "RESEARCH_HEADS", "research_config"]

# Attention heads of the grid net, glob net and caption generator: constructor defaults the
# research Transformer never overrides (its config's model.n_heads does not reach them).
RESEARCH_HEADS = 8
# The research Swin builder (swin_base_win7_384) hard-wires stochastic depth 0.3.
RESEARCH_DROP_PATH = 0.3
# The caption side of the paper config (coco_config.yaml), for detection configs.
PAPER_CAPTION: dict[str, Any] = {
    "grid_layers": 3,
    "glob_layers": 3,
    "cap_layers": 3,
    "d_ff": 2048,
    "dropout": 0.2,
    "frozen_stages": 2,
    "max_len": 54,
    "beam_size": 5,
    "beam_len": 20,
    "glob_d_ff": 2048,
    "decoder_name": {"grit": "Parallel", "hiercap": "Parallel"},  # what train_caption.sh trains
    "size": (384, 640),
}
# The research optimiser keys HeriCap has under the same meaning.
_OPTIMIZER_KEYS = (
    "xe_lr",
    "sc_lr",
    "xe_backbone_lr",
    "sc_backbone_lr",
    "batch_size",
    "beta_1",
    "beta_2",
    "freezing_xe_epochs",
    "freezing_sc_epochs",
    "finetune_xe_epochs",
    "finetune_sc_epochs",
)


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many distinct indices ``(\\d+)`` in ``pattern`` appear among the keys."""
    regex = re.compile(pattern)
    return len({m[1] for k in state if (m := regex.match(k))})


def _get(tree: Mapping, dotted: str, default: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _swin(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    prefix = "detector.backbone."
    stages = _count(state, rf"{re.escape(prefix)}layers\.(\d+)\.")
    if not stages:
        raise ValueError("the checkpoint has no Swin backbone (detector.backbone.* keys)")
    depths = [
        _count(state, rf"{re.escape(prefix)}layers\.{i}\.blocks\.(\d+)\.") for i in range(stages)
    ]
    tables = [
        state[f"{prefix}layers.{i}.blocks.0.attn.relative_position_bias_table"]
        for i in range(stages)
    ]
    window = (math.isqrt(tables[0].shape[0]) + 1) // 2
    patch = state[f"{prefix}patch_embed.proj.weight"]
    return {
        "patch_size": patch.shape[-1],
        "embed_dim": patch.shape[0],
        "depths": depths,
        "num_heads": [t.shape[1] for t in tables],
        "window_size": window,
        "extra_stage_dim": state[f"{prefix}layers.{stages - 1}.downsample.reduction.weight"].shape[
            0
        ],
        "drop_path_rate": RESEARCH_DROP_PATH,
    }


def _detector(state: Mapping[str, torch.Tensor], tree: Mapping) -> dict[str, Any]:
    det = "detector.det_module."
    cfg = _get(tree, "model.detector") or _get(tree, "model.det_module") or {}
    levels = _count(state, r"detector\.input_proj\.(\d+)\.")
    heads, points = int(cfg.get("num_heads", 8)), int(cfg.get("num_points", 4))
    offsets = state[f"{det}decoder_layers.0.cross_attn.sampling_offsets.weight"].shape[0]
    if offsets != heads * levels * points * 2:
        raise ValueError(
            f"model.detector num_heads={heads} x num_points={points} x {levels} levels does not "
            f"match the checkpoint's sampling offsets ({offsets} = heads x levels x points x 2)"
        )
    return {
        "d_model": state["detector.input_proj.0.0.weight"].shape[0],
        "dim_feedforward": state[f"{det}decoder_layers.0.linear1.weight"].shape[0],
        "num_heads": heads,
        "num_layers": _count(state, rf"{re.escape(det)}decoder_layers\.(\d+)\."),
        "num_levels": levels,
        "num_points": points,
        "num_queries": state[f"{det}query_embed.weight"].shape[0],
        "num_classes": state[f"{det}class_embed.0.weight"].shape[0],
        "dropout": float(cfg.get("dropout", 0.1)),
        "activation": str(cfg.get("activation", "relu")),
        "with_box_refine": bool(cfg.get("with_box_refine", True)),
    }


def _caption_sizes(
    state: Mapping[str, torch.Tensor], repo: str, caption_tree: Mapping | None, d_model: int
) -> dict[str, Any]:
    """Caption-side sizes: from the tensors (caption checkpoints) or the paper (detector-only)."""
    model = _get(caption_tree or {}, "model", {})
    if "cap_generator.word_emb.weight" not in state:  # detector-only: the caption side is fresh
        name = _get(model, "cap_generator.decoder_name", PAPER_CAPTION["decoder_name"][repo])
        return {
            "d_model": d_model,
            "d_ff": PAPER_CAPTION["d_ff"],
            "grid_layers": int(_get(model, "grid_net.n_layers", PAPER_CAPTION["grid_layers"])),
            "global_layers": int(_get(model, "glob_net.n_layers", PAPER_CAPTION["glob_layers"])),
            "cap_layers": int(_get(model, "cap_generator.n_layers", PAPER_CAPTION["cap_layers"])),
            "global_d_ff": PAPER_CAPTION["glob_d_ff"] if repo == "hiercap" else 0,
            "table": int(_get(model, "max_len", PAPER_CAPTION["max_len"])) + 1,
            "decoder_name": "Parallel" if repo == "grit" else name,
        }
    d_ff = state["cap_generator.layers.0.pwff.fc1.weight"].shape[0]
    grid_ff = state.get("grid_net.layers.0.pwff.fc1.weight")
    if grid_ff is not None and grid_ff.shape[0] != d_ff:
        raise ValueError(
            f"grid net FFN width {grid_ff.shape[0]} differs from the caption generator's {d_ff}: "
            "HeriCap has one model.d_ff for both"
        )
    glob_ff = state.get("glob_net.layers.0.pwff.fc1.weight")
    return {
        "d_model": state["cap_generator.word_emb.weight"].shape[1],
        "d_ff": d_ff,
        "grid_layers": _count(state, r"grid_net\.layers\.(\d+)\."),
        "global_layers": _count(state, r"glob_net\.layers\.(\d+)\."),
        "cap_layers": _count(state, r"cap_generator\.layers\.(\d+)\."),
        "global_d_ff": 0 if glob_ff is None else glob_ff.shape[0],
        "table": state["cap_generator.pos_emb.weight"].shape[0],
        # GRIT never passes decoder_name: its CaptionGenerator always builds "parallel"
        "decoder_name": "Parallel" if repo == "grit" else model["cap_generator"]["decoder_name"],
    }


def research_config(
    repo: str,
    tree: Mapping,
    state: Mapping[str, torch.Tensor],
    vocab_size: int,
    overrides: Sequence[str] = (),
) -> Config:
    """The HeriCap config (``grit`` / ``hiercap`` flavour) of a research checkpoint.

    Args:
        repo: ``grit`` or ``hiercap``.
        tree: the research config (caption or detection YAML) as a plain dict.
        state: the checkpoint's tensors under captioner keys (``detector.*``, ``grid_net.*``...;
            meta tensors do: only shapes are read).
        vocab_size: the vocabulary's size.
        overrides: HeriCap dotted overrides applied last.

    Raises:
        ValueError: the config and the tensors disagree, or the result fails validation.
    """
    detection = _get(tree, "model.det_module") is not None
    caption_tree = None if detection else tree
    model_tree = _get(caption_tree or {}, "model", {})
    det = _detector(state, tree)
    sizes = _caption_sizes(state, repo, caption_tree, det["d_model"])
    if "cap_generator.word_emb.weight" in state and sizes["d_model"] != det["d_model"]:
        raise ValueError(
            f"region features ({det['d_model']}) and caption generator ({sizes['d_model']}) "
            "differ in width: the research code feeds one to the other"
        )
    cfg = load_config(preset="coco", validate=False)
    cfg.exp.name = str(_get(tree, "exp.name", f"{repo}_import"))
    cfg.exp.world_size, cfg.exp.ngpus_per_node, cfg.exp.cpus_per_worker = 1, 0, 1.0
    size = _get(caption_tree or {}, "dataset.transform_cfg.size", PAPER_CAPTION["size"])
    ds = cfg.dataset
    ds.resize, ds.min_size, ds.max_size = "maxwh", int(size[0]), int(size[1])
    ds.augment = "randaugment" if _get(tree, "dataset.transform_cfg.randaug", True) else "none"
    ds.max_caption_len = sizes["table"] - 2  # teacher forcing reads positions 1..len + 1
    m = cfg.model
    m.flavour = repo
    m.d_model, m.n_heads, m.d_ff = sizes["d_model"], RESEARCH_HEADS, sizes["d_ff"]
    m.dropout = m.attn_dropout = float(model_tree.get("dropout", PAPER_CAPTION["dropout"]))
    m.grid_layers, m.global_layers = sizes["grid_layers"], sizes["global_layers"]
    m.global_d_ff, m.grid_layer_type = sizes["global_d_ff"], "transformer"
    m.use_gri_feat = bool(model_tree.get("use_gri_feat", True))
    m.use_reg_feat = bool(model_tree.get("use_reg_feat", True))
    m.use_glob_feat = repo == "hiercap" and bool(model_tree.get("use_glob_feat", True))
    m.frozen_stages = int(model_tree.get("frozen_stages", PAPER_CAPTION["frozen_stages"]))
    for key, value in _swin(state).items():
        setattr(m.extractor, key, value)
    m.extractor.stem, m.extractor.checkpoint = "patch", None
    for key, value in det.items():
        setattr(m.detector, key, value)
    m.detector.checkpoint = None
    m.cap_generator.decoder_name = sizes["decoder_name"]
    m.cap_generator.n_layers = sizes["cap_layers"]
    m.cap_generator.position_table_size = sizes["table"]
    cfg.decode.val_beam_size = cfg.decode.test_beam_size = int(
        model_tree.get("beam_size", PAPER_CAPTION["beam_size"])
    )
    cfg.decode.max_len = int(model_tree.get("beam_len", PAPER_CAPTION["beam_len"]))
    cfg.decode.length_penalty = 0.0
    for key in _OPTIMIZER_KEYS:
        value = _get(caption_tree or {}, f"optimizer.{key}")
        if value is not None:
            setattr(cfg.optimizer, key, type(getattr(cfg.optimizer, key))(value))
    # the research parameter groups use "weight_decay_rate", which Adam ignores: no decay
    cfg.optimizer.weight_decay = 0.0
    if vocab_size != int(model_tree.get("vocab_size", vocab_size)):
        raise ValueError(f"config model.vocab_size differs from the vocabulary's {vocab_size}")
    cfg = load_config(overrides, base=cfg, validate=False)
    cfg.validate()
    return cfg
