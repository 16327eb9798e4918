"""Pretrained Swin weights for the extractor (``model.extractor.checkpoint``).

Accepted, from a local path or an ``s3://`` URI, as ``.pth``/``.pt`` (read with weights_only) or
``.safetensors``:

* timm: ``timm.create_model(name).state_dict()`` as written, i.e. with ``norm.*`` and ``head.*``;
  stage ``i``'s patch merging at its start (``layers.{i}.downsample``, none in stage 0);
* Microsoft's release layout: ``{"model": state_dict}``, patch merging at the *end* of a stage
  (``layers.{i}.downsample`` for ``i < last``), ``relative_position_index`` and ``attn_mask``
  buffers, ``head.*``;
* the research code's backbone: a GRIT/HierCap caption checkpoint (``state_dict`` with
  ``detector.backbone.*``) or a GRIT detector checkpoint (``model`` with ``backbone.*``), whose
  last merging is the extra stride-64 stage.

Every source key is loaded or ignored with a reason (classifier head and final norm, derived
buffers, the research code's unused norms and detection-token layers, non-backbone weights of a
research checkpoint). The extractor's extra stride-2 stage starts fresh when the source has none.
Anything else is an error that lists the keys: an unknown key, a missing trained weight or a
shape that differs (e.g. another window size).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hericap.models.safe_load import read_weights
from hericap.models.weights import diff_state

__all__ = ["BackboneLoadReport", "load_backbone_weights", "map_backbone_keys"]

logger = logging.getLogger(__name__)

# Prefixes under which a checkpoint keeps its backbone (research caption, research detector,
# DistributedDataParallel).
BACKBONE_PREFIXES = ("detector.backbone.", "backbone.", "module.")

IGNORED = [
    (re.compile(r"^head\."), "classification head (the extractor has none)"),
    (re.compile(r"^norm\.(weight|bias)$"), "final norm of the classifier (not a feature map's)"),
    (re.compile(r"relative_position_index$"), "derived buffer, rebuilt by timm"),
    (re.compile(r"attn_mask$"), "derived buffer (shifted-window mask), rebuilt per input size"),
    (
        re.compile(r"^layers\.\d+\.downsample\.(expansion|norm2)\."),
        "GRIT's unused detection-token expansion in the patch merging",
    ),
    (re.compile(r"^norm\d+\.(weight|bias)$"), "research output norms, never applied"),
]
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(.+)$")
_MERGE = re.compile(r"^layers\.(\d+)\.downsample\.((?:norm|reduction)\..+)$")
_EXTRA_PREFIX = "extra."


@dataclass
class BackboneLoadReport:
    """What loading a backbone checkpoint did (keys are the extractor's)."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> reason
    fresh: list[str] = field(default_factory=list)

    def describe(self) -> str:
        reasons = Counter(self.ignored.values())
        ignored = "; ".join(f"{n} {why}" for why, n in reasons.items()) or "none"
        return (
            f"backbone {self.source} ({self.layout} layout): loaded {len(self.loaded)} tensors; "
            f"ignored: {ignored}; starting fresh: {self.fresh or 'none'}"
        )


def _strip_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """The backbone's keys without their prefix, and the other keys (ignored, with reason)."""
    for prefix in BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            outside = {
                k: "not part of the backbone (the checkpoint's other modules)"
                for k in state
                if not k.startswith(prefix)
            }
            return inside, outside
    return dict(state), {}


def map_backbone_keys(
    keys: list[str], num_stages: int, end_of_stage: bool | None = None
) -> tuple[dict[str, str], dict[str, str], str]:
    """Source backbone keys (prefix stripped) -> extractor keys.

    ``end_of_stage``: whether the source merges patches at the end of each stage (Microsoft,
    research) rather than at the start (timm); None: tell from the keys.

    Returns ``(mapped source -> ours, ignored source -> reason, layout)``; keys neither mapped
    nor ignored keep their name in ``mapped`` so that they surface as unexpected.
    """
    if end_of_stage is None:
        # original checkpoints merge at the end of a stage, so their stage 0 has a merging
        end_of_stage = "layers.0.downsample.reduction.weight" in keys
    layout = "timm" if not end_of_stage else "original (Microsoft / research)"
    mapped: dict[str, str] = {}
    ignored: dict[str, str] = {}
    for key in keys:
        reason = next((why for pattern, why in IGNORED if pattern.search(key)), None)
        if reason:
            ignored[key] = reason
        elif key.startswith("patch_embed."):
            mapped[key] = f"body.{key}"
        elif m := _BLOCK.match(key):
            mapped[key] = f"body.layers_{m[1]}.blocks.{m[2]}"
        elif m := _MERGE.match(key):
            stage = int(m[1]) + (1 if end_of_stage else 0)
            target = f"body.layers_{stage}.downsample.{m[2]}"
            mapped[key] = target if stage < num_stages else f"{_EXTRA_PREFIX}{m[2]}"
        else:
            mapped[key] = key
    return mapped, ignored, layout


def _unwrap(obj: object, source: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source} holds no state dict (expected a dict of tensors)")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: entries that are not tensors: {not_tensors[:10]}")
    return obj


def load_backbone_weights(extractor: nn.Module, location: str | Path) -> BackboneLoadReport:
    """Load pretrained Swin weights into a
    :class:`~hericap.models.encoders.SwinExtractor` (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file.
        RuntimeError: unknown keys, missing trained weights or shape mismatches (listed).
    """
    source = str(location)
    state, outside = _strip_prefix(_unwrap(read_weights(source), source))
    mapped, ignored, layout = map_backbone_keys(list(state), extractor.num_stages)
    ignored.update(outside)
    ours = {mapped[k]: state[k] for k in mapped}
    expected = extractor.state_dict()
    diff = diff_state(expected, ours)
    fresh = [k for k in diff.missing if k.startswith(_EXTRA_PREFIX)]
    missing = [k for k in diff.missing if not k.startswith(_EXTRA_PREFIX)]
    if missing or diff.unexpected or diff.mismatched:
        source_of = {ours_key: key for key, ours_key in mapped.items()}
        unknown = [source_of[k] for k in diff.unexpected]
        raise RuntimeError(
            f"backbone checkpoint {source} ({layout} layout) does not fit the extractor: missing "
            f"trained weights {missing[:20]}; unknown keys {unknown[:20]}; shape mismatches "
            f"(key, checkpoint, model) {diff.mismatched[:20]}"
        )
    merged = {**expected, **ours}
    extractor.load_state_dict(merged, strict=True)
    report = BackboneLoadReport(
        source=source, layout=layout, loaded=sorted(ours), ignored=ignored, fresh=fresh
    )
    logger.info("%s", report.describe())
    return report
