"""The HierCap model family (imports without Ray)."""

from hericap.models.builder import build_captioner, parameter_summary
from hericap.models.captioner import Captioner
from hericap.models.fusion import FUSION_REGISTRY, canonical_fusion_name

__all__ = [
    "FUSION_REGISTRY",
    "Captioner",
    "build_captioner",
    "canonical_fusion_name",
    "parameter_summary",
]
