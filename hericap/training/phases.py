"""The training phases of the paper, in order: frozen XE, frozen SCST, fine-tune XE, fine-tune SCST.

"Frozen" means the extractor and the region detector do not train (the research code's
``freezing_*`` epochs); "fine-tune" trains everything at two learning rates. Phases with no
epochs are skipped. SCST starts from a model trained with XE, so the first phase run is XE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hericap.config.schema import OptimizerConfig

__all__ = ["PHASE_KEYS", "Phase", "configured_phases", "phase_at", "plan_phases"]

# optimizer.* keys, in the order the phases run
PHASE_KEYS = (
    "freezing_xe_epochs",
    "freezing_sc_epochs",
    "finetune_xe_epochs",
    "finetune_sc_epochs",
)


@dataclass(frozen=True)
class Phase:
    """One phase: ``name`` (``freezing_xe`` ...), ``kind`` (``xe`` | ``sc``), whether the
    backbone is ``frozen``, and the epochs it covers, ``[first_epoch, first_epoch + epochs)``."""

    name: str
    kind: str
    frozen: bool
    first_epoch: int
    epochs: int

    @property
    def end_epoch(self) -> int:
        return self.first_epoch + self.epochs


def plan_phases(
    freezing_xe_epochs: int = 0,
    freezing_sc_epochs: int = 0,
    finetune_xe_epochs: int = 0,
    finetune_sc_epochs: int = 0,
) -> list[Phase]:
    """The phases to run, in order.

    Raises:
        ValueError: no epochs at all, a negative count, or SCST before any XE epoch.
    """
    counts = dict(
        zip(
            PHASE_KEYS,
            (freezing_xe_epochs, freezing_sc_epochs, finetune_xe_epochs, finetune_sc_epochs),
            strict=True,
        )
    )
    bad = {k: v for k, v in counts.items() if v < 0}
    if bad:
        raise ValueError(f"phase epochs must be >= 0: {bad}")
    phases: list[Phase] = []
    epoch = 0
    for key, n in counts.items():
        if n == 0:
            continue
        name = key.removesuffix("_epochs")
        phases.append(Phase(name, name.rsplit("_", 1)[1], name.startswith("freezing"), epoch, n))
        epoch += n
    if not phases:
        raise ValueError(
            f"no training epochs: set one of {', '.join('optimizer.' + k for k in PHASE_KEYS)}"
        )
    if phases[0].kind == "sc":
        raise ValueError(
            f"optimizer.{phases[0].name}_epochs={phases[0].epochs} would run SCST before any XE "
            "epoch; SCST starts from an XE model (set optimizer.freezing_xe_epochs or "
            "optimizer.finetune_xe_epochs)"
        )
    return phases


def configured_phases(optimizer: OptimizerConfig) -> list[Phase]:
    """:func:`plan_phases` of a run's ``optimizer.*_epochs`` keys. A phase whose backbone LR
    (``xe_backbone_lr`` / ``sc_backbone_lr``) is 0 is frozen too: what would not move gets no
    gradients computed."""
    backbone_lr = {"xe": optimizer.xe_backbone_lr, "sc": optimizer.sc_backbone_lr}
    return [
        replace(p, frozen=True) if backbone_lr[p.kind] == 0 else p
        for p in plan_phases(*(getattr(optimizer, k) for k in PHASE_KEYS))
    ]


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    """The phase that epoch ``epoch`` belongs to."""
    for phase in phases:
        if phase.first_epoch <= epoch < phase.end_epoch:
            return phase
    raise ValueError(f"epoch {epoch} is past the last phase ({phases[-1].end_epoch} epochs)")
