"""Load GRIT's released detector checkpoints (the seed's ``region_ckpt.pth``) into a Captioner.

The file holds ``{"model": state_dict}`` with GRIT's detector layout:

* ``backbone.*``: the original Swin code's keys (not timm's). ``backbone.layers.{i}.blocks...``
  are stage ``i``'s blocks; ``backbone.layers.{i}.downsample.{norm,reduction}`` is the patch
  merging *after* stage ``i``, which timm keeps at the start of stage ``i + 1``
  (``layers_{i+1}.downsample``); the last stage's merging is GRIT's extra stride-64 stage, our
  ``extractor.extra``.
* ``input_proj.{level}.{0,1}``: 1×1 convolution and GroupNorm per level.
* ``det_module.*``: the deformable decoder (``decoder_layers``, ``reference_points``,
  ``query_embed``, ``class_embed``, ``bbox_embed``), which our
  :class:`~hericap.models.region.RegionEncoder` names alike.

Keys that GRIT saves but never uses in its forward pass are dropped by name, and always logged:
the merging layers' ``expansion``/``norm2`` (a detection-token path GRIT marks "not implemented"),
the backbone's ``norm1..3`` output norms ("not used"), ``det_module.level_embed`` (created, never
added) and ``relative_position_index`` buffers (derived; timm rebuilds them); the rules are those
of the research importer (:mod:`hericap.models.research_keys`). Everything else must match: a
missing, unexpected or mis-shaped key is an error listing them, unless partial loading is
allowed, in which case what matched is loaded and the rest is logged. The file is read with
weights_only and an allow-list (its pickled ``args`` config), never by unpickling code.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hericap.models.research_keys import map_research_keys
from hericap.models.safe_load import read_weights
from hericap.models.weights import StateDiff, diff_state

__all__ = ["DetectorLoadReport", "load_detector_checkpoint", "map_grit_detector_keys"]

logger = logging.getLogger(__name__)


def map_grit_detector_keys(
    state: dict[str, torch.Tensor], num_stages: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename GRIT detector keys to Captioner keys.

    Returns the renamed state (keys it does not know keep their name, so they surface as
    unexpected) and the dropped unused keys with the reason for each.
    """
    mapping = map_research_keys(state, "grit", "Parallel", num_stages)
    mapped = {target: state[source] for source, target in mapping.mapped.items()}
    for key in mapping.unknown:  # named where they would go, so the diff lists them there
        if key.startswith("det_module."):
            mapped["region_encoder." + key.removeprefix("det_module.")] = state[key]
        elif key.startswith("input_proj."):
            mapped["region_encoder." + key] = state[key]
        else:
            mapped[key] = state[key]
    return mapped, mapping.dropped


@dataclass
class DetectorLoadReport:
    """What a detector checkpoint load did."""

    loaded: list[str]
    diff: StateDiff
    dropped_unused: dict[str, str]
    skipped_branch_off: list[str] = field(default_factory=list)


def load_detector_checkpoint(
    model: nn.Module, path: str | Path, num_stages: int, allow_partial: bool = False
) -> DetectorLoadReport:
    """Load a GRIT ``region_ckpt.pth`` into ``model``'s extractor and region encoder.

    Args:
        model: a :class:`~hericap.models.captioner.Captioner`.
        path: the checkpoint (``{"model": state_dict}`` or a bare state dict).
        num_stages: Swin stages of the model's extractor.
        allow_partial: load what matches and log the rest instead of raising.

    Raises:
        FileNotFoundError: no such file.
        RuntimeError: keys or shapes do not match (lists them), unless ``allow_partial``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.detector.checkpoint not found: {p}")
    raw = read_weights(p)
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    mapped, dropped = map_grit_detector_keys(state, num_stages)
    branches = {"extractor": model.extractor}
    if getattr(model, "region_encoder", None) is not None:
        branches["region_encoder"] = model.region_encoder
    # with the region branch off, its detector keys have nowhere to go (reported, not loaded)
    skipped = (
        []
        if "region_encoder" in branches
        else sorted(k for k in mapped if k.startswith("region_encoder."))
    )
    for k in skipped:
        del mapped[k]
    expected = {
        f"{name}.{k}": v
        for name, branch in branches.items()
        for k, v in branch.state_dict().items()
    }
    diff = diff_state(expected, mapped)
    if not diff.clean and not allow_partial:
        raise RuntimeError(
            f"detector checkpoint {p} does not match the model: {diff.describe()} (set "
            "model.detector.allow_partial_load=True to load what matches and log the rest)"
        )
    bad = {k for k, *_ in diff.mismatched}
    loadable = {k: v for k, v in mapped.items() if k in expected and k not in bad}
    for name, branch in branches.items():
        sub = {
            k.removeprefix(name + "."): v for k, v in loadable.items() if k.startswith(name + ".")
        }
        # strict unless the user opted into partial loading (and that is logged below)
        branch.load_state_dict(sub, strict=diff.clean)
    if not diff.clean:
        logger.warning("detector checkpoint %s loaded partially: %s", p, diff.describe())
    for why, count in Counter(dropped.values()).items():
        logger.info("detector checkpoint %s: skipped %d keys (%s)", p, count, why)
    if skipped:
        logger.warning(
            "detector checkpoint %s: %d region-detector keys not loaded because "
            "model.use_reg_feat=False",
            p,
            len(skipped),
        )
    logger.info("loaded %d tensors from detector checkpoint %s", len(loadable), p)
    return DetectorLoadReport(
        loaded=sorted(loadable), diff=diff, dropped_unused=dropped, skipped_branch_off=skipped
    )
