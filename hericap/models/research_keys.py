"""Research state-dict keys (GRIT / HierCap ``Transformer``) -> HeriCap captioner keys.

Names only: shapes are checked against the model built for the checkpoint (``hericap import``,
:mod:`hericap.checkpoint.research`). Every source key is mapped, or dropped with the reason it
carries no information the model uses:

* beam-search state buffers of the research decoder (``running_*``), empty at rest;
* Swin's ``relative_position_index`` buffers (timm rebuilds them; the importer checks they are
  the standard ones);
* weights the research forward pass never uses: Swin's ``norm1..3`` output norms, GRIT's
  patch-merging ``expansion``/``norm2``, the deformable decoder's ``level_embed``, GRIT's
  ``fc_alpha2`` (both gates use ``fc_alpha1``), and the ``vis_att2``/``vis_att3`` of HierCap's
  ``Sequential`` decoder (it attends every memory through ``vis_att1``).

Keys that match no rule are reported as unknown (an error for the importer).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from hericap.models.backbone_weights import map_backbone_keys

__all__ = ["RESEARCH_FUSION_BRANCHES", "KeyMapping", "map_research_keys"]

BEAM_STATE = "beam-search state buffer of the research decoder (empty at rest)"
LEVEL_EMBED = (
    "GRIT creates level_embed but never uses it (the deformable decoder adds no level embedding)"
)

# The research attention modules' projections -> HeriCap's MultiHeadAttention.
_ATTENTION = {"fc_q": "q_proj", "fc_k": "k_proj", "fc_v": "v_proj", "fc_o": "out_proj"}
# The research FFN (``pwff``) -> HeriCap's FeedForward (Linear, act, Dropout, Linear).
_FFN = {"fc1": "ffn.net.0", "fc2": "ffn.net.3"}

# Per research decoder: its cross-attention modules -> the fusion group they attend (None:
# never used, with the reason), and its gates -> the fusion gate key.
RESEARCH_FUSION_BRANCHES: dict[tuple[str, str], tuple[dict, dict]] = {
    ("grit", "Parallel"): (
        {"vis_att1": "grid", "vis_att2": "region"},
        {"fc_alpha1": "shared", "fc_alpha2": None},
    ),
    ("hiercap", "Parallel"): (
        {"vis_att1": "grid", "vis_att2": "region", "vis_att3": "global"},
        {"fc_alpha1": "grid", "fc_alpha2": "region", "fc_alpha3": "global"},
    ),
    ("hiercap", "Concatenated_Parallel"): (
        {"vis_att1": "grid+region", "vis_att2": "region+global"},
        {"fc_alpha1": "grid+region", "fc_alpha2": "region+global"},
    ),
    ("hiercap", "Sequential"): (
        {"vis_att1": "shared", "vis_att2": None, "vis_att3": None},
        {},
    ),
    ("hiercap", "Concatenated_Sequential"): ({"vis_att": "shared"}, {}),
}
_UNUSED_BRANCH = {
    ("grit", "fc_alpha2"): "GRIT computes both gates with fc_alpha1: fc_alpha2 is never used",
    ("hiercap", "vis_att2"): "HierCap's Sequential attends every memory through vis_att1",
    ("hiercap", "vis_att3"): "HierCap's Sequential attends every memory through vis_att1",
}


@dataclass
class KeyMapping:
    """``mapped`` research key -> HeriCap key; ``dropped`` research key -> reason;
    ``unknown`` research keys no rule covers."""

    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


def _attention_or_norm(rest: str, target: str) -> str | None:
    """``attention.fc_q.weight`` / ``layer_norm.bias`` of a research MultiHeadAttention."""
    if m := re.fullmatch(r"attention\.(fc_[qkvo])\.(weight|bias)", rest):
        return f"{target}.{_ATTENTION[m[1]]}.{m[2]}"
    return None


def _grid(rest: str) -> str | None:
    if m := re.fullmatch(r"fc\.(weight|bias)", rest):
        return f"grid_encoder.proj.0.{m[1]}"
    if m := re.fullmatch(r"layer_norm\.(weight|bias)", rest):
        return f"grid_encoder.proj.3.{m[1]}"
    m = re.fullmatch(r"layers\.(\d+)\.(mhatt|pwff)\.(.+)", rest)
    if not m:
        return None
    layer, part, leaf = f"grid_encoder.layers.{m[1]}", m[2], m[3]
    if part == "mhatt":
        if n := re.fullmatch(r"layer_norm\.(weight|bias)", leaf):
            return f"{layer}.ln1.{n[1]}"
        return _attention_or_norm(leaf, f"{layer}.attn")
    return _ffn(leaf, layer, norm="ln2")


def _ffn(leaf: str, layer: str, norm: str) -> str | None:
    if m := re.fullmatch(r"(fc1|fc2)\.(weight|bias)", leaf):
        return f"{layer}.{_FFN[m[1]]}.{m[2]}"
    if m := re.fullmatch(r"layer_norm\.(weight|bias)", leaf):
        return f"{layer}.{norm}.{m[1]}"
    return None


_GRA_PARTS = {
    "theta_spatial": "theta",
    "phi_spatial": "phi",
    "gg_spatial": "relation",
    "gx_spatial": "own",
    "W_spatial": "gate",
}


def _glob(rest: str) -> str | None:
    if m := re.fullmatch(r"fc\.(weight|bias)", rest):
        return f"global_encoder.proj.{m[1]}"
    if m := re.fullmatch(r"layer_norm\.(weight|bias)", rest):
        return f"global_encoder.norm.{m[1]}"
    if m := re.fullmatch(r"layers\.(\d+)\.gratt\.(\w+)\.(\d+\.\w+)", rest):
        part = _GRA_PARTS.get(m[2])
        return f"global_encoder.layers.{m[1]}.attention.{part}.{m[3]}" if part else None
    if m := re.fullmatch(r"layers\.(\d+)\.pwff\.(.+)", rest):
        return _ffn(m[2], f"global_encoder.layers.{m[1]}", norm="norm")
    return None


def _cap_layer(repo: str, decoder: str, layer: str, rest: str) -> tuple[str | None, str | None]:
    """(HeriCap key, drop reason) of ``cap_generator.layers.{i}.<rest>``."""
    if re.fullmatch(r"self_att\.running_(keys|values)", rest):
        return None, BEAM_STATE
    if m := re.fullmatch(r"self_att\.layer_norm\.(weight|bias)", rest):
        return f"{layer}.ln1.{m[1]}", None
    if m := re.fullmatch(r"self_att\.(.+)", rest):
        return _attention_or_norm(m[1], f"{layer}.self_attn"), None
    if m := re.fullmatch(r"pwff\.(.+)", rest):
        return _ffn(m[1], layer, norm="ln3"), None
    branches, gates = RESEARCH_FUSION_BRANCHES.get((repo, decoder), ({}, {}))
    if (m := re.fullmatch(r"(vis_att\d?)\.(.+)", rest)) and m[1] in branches:
        group = branches[m[1]]
        if group is None:
            return None, _UNUSED_BRANCH[(repo, m[1])]
        if n := re.fullmatch(r"layer_norm\.(weight|bias)", m[2]):
            return f"{layer}.fusion.norms.{group}.{n[1]}", None
        return _attention_or_norm(m[2], f"{layer}.fusion.attn.{group}"), None
    if (m := re.fullmatch(r"(fc_alpha\d)\.(weight|bias)", rest)) and m[1] in gates:
        group = gates[m[1]]
        if group is None:
            return None, _UNUSED_BRANCH[(repo, m[1])]
        return f"{layer}.fusion.gates.{group}.{m[2]}", None
    return None, None


def _caption(repo: str, decoder: str, rest: str) -> tuple[str | None, str | None]:
    if rest in ("running_mask_x", "running_seq"):
        return None, BEAM_STATE
    simple = {
        "word_emb.weight": "decoder.embed.weight",
        "pos_emb.weight": "decoder.positions.weight",
        "fc.weight": "decoder.out.weight",
    }
    if rest in simple:
        return simple[rest], None
    if m := re.fullmatch(r"layers\.(\d+)\.(.+)", rest):
        return _cap_layer(repo, decoder, f"decoder.layers.{m[1]}", m[2])
    return None, None


def _detector(rest: str, num_stages: int, out: KeyMapping, key: str) -> None:
    """``detector.<rest>`` (captioner) or ``<rest>`` (detector-only checkpoint)."""
    if rest.startswith("backbone."):
        sub = rest.removeprefix("backbone.")
        # the research Swin merges at the end of every stage, the last one being the extra stage
        mapped, ignored, _ = map_backbone_keys([sub], num_stages, end_of_stage=True)
        if sub in ignored:
            out.dropped[key] = ignored[sub]
        elif mapped[sub].startswith(("body.", "extra.")):
            out.mapped[key] = f"extractor.{mapped[sub]}"
        else:
            out.unknown.append(key)
        return
    if rest.startswith("input_proj."):
        out.mapped[key] = f"region_encoder.{rest}"
    elif rest == "det_module.level_embed":
        out.dropped[key] = LEVEL_EMBED
    elif re.match(
        r"det_module\.(decoder_layers|reference_points|query_embed|class_embed|bbox_embed)\.",
        rest,
    ):
        out.mapped[key] = "region_encoder." + rest.removeprefix("det_module.")
    else:
        out.unknown.append(key)


def map_research_keys(
    keys: Iterable[str], repo: str, decoder_name: str, num_stages: int
) -> KeyMapping:
    """Map research keys onto a HeriCap captioner's.

    Args:
        keys: a research ``Transformer.state_dict()``'s keys, or a detector checkpoint's
            ``model`` keys (``backbone.*``, ``input_proj.*``, ``det_module.*``).
        repo: ``grit`` or ``hiercap``.
        decoder_name: the research decoder (``Parallel``, ``Sequential``,
            ``Concatenated_Parallel``, ``Concatenated_Sequential``; GRIT: ``Parallel``).
        num_stages: Swin stages (the last stage's patch merging is the extra stride-64 stage).
    """
    out = KeyMapping()
    for key in keys:
        if key.startswith(("backbone.", "input_proj.", "det_module.")):
            _detector(key, num_stages, out, key)
            continue
        if key.startswith("detector."):
            _detector(key.removeprefix("detector."), num_stages, out, key)
            continue
        target = reason = None
        if key.startswith("grid_net."):
            target = _grid(key.removeprefix("grid_net."))
        elif key.startswith("glob_net."):
            target = _glob(key.removeprefix("glob_net."))
        elif key.startswith("cap_generator."):
            target, reason = _caption(repo, decoder_name, key.removeprefix("cap_generator."))
        if target:
            out.mapped[key] = target
        elif reason:
            out.dropped[key] = reason
        else:
            out.unknown.append(key)
    return out
