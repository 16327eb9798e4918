"""Training phases (frozen XE / SCST, fine-tune XE / SCST) and backbone freezing."""

from __future__ import annotations

from pathlib import Path

import pytest

from hericap.config import load_config
from hericap.models.builder import build_captioner
from hericap.training.optim import param_groups
from hericap.training.phases import configured_phases, phase_at, plan_phases


def test_phases_run_in_the_papers_order_and_skip_empty_ones():
    phases = plan_phases(2, 1, 3, 4)
    assert [(p.name, p.kind, p.frozen, p.first_epoch, p.epochs) for p in phases] == [
        ("freezing_xe", "xe", True, 0, 2),
        ("freezing_sc", "sc", True, 2, 1),
        ("finetune_xe", "xe", False, 3, 3),
        ("finetune_sc", "sc", False, 6, 4),
    ]
    assert [p.name for p in plan_phases(0, 0, 5, 1)] == ["finetune_xe", "finetune_sc"]
    assert phase_at(phases, 0).name == "freezing_xe" and phase_at(phases, 9).name == "finetune_sc"
    with pytest.raises(ValueError, match="past the last phase"):
        phase_at(phases, 10)


def test_a_backbone_lr_of_zero_freezes_that_kind_of_phase():
    def frozen(*overrides: str) -> dict[str, bool]:
        cfg = load_config(["preset=demo", *overrides])
        return {p.name: p.frozen for p in configured_phases(cfg.optimizer)}

    epochs = ["optimizer.finetune_xe_epochs=2", "optimizer.finetune_sc_epochs=1"]
    assert frozen(*epochs, "optimizer.sc_backbone_lr=0", "optimizer.xe_backbone_lr=1e-5") == {
        "finetune_xe": False,
        "finetune_sc": True,
    }
    assert frozen(*epochs, "optimizer.sc_backbone_lr=5e-6", "optimizer.xe_backbone_lr=0") == {
        "finetune_xe": True,
        "finetune_sc": False,
    }


def test_impossible_phase_plans_are_errors():
    with pytest.raises(ValueError, match="no training epochs"):
        plan_phases(0, 0, 0, 0)
    with pytest.raises(ValueError, match=r"freezing_sc_epochs=2 would run SCST before any XE"):
        plan_phases(0, 2, 1, 0)
    with pytest.raises(ValueError, match="must be >= 0"):
        plan_phases(-1, 0, 1, 0)


def test_freezing_the_backbone_freezes_extractor_and_detector_only():
    cfg = load_config(["preset=tiny", "model.frozen_stages=1"])
    model = build_captioner(cfg.model, 50, 64)
    always = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("extractor.") for n in always)  # frozen_stages=1
    assert any(n.startswith("region_encoder.") for n in always)  # the box heads
    assert model.freeze_backbone(True) > 0
    for name, p in model.named_parameters():
        backbone = name.startswith(("extractor.", "region_encoder."))
        assert p.requires_grad == (not backbone), name
    names = {g["name"] for g in param_groups(model, 1e-3, 1e-4, 0.01)}
    assert names == {"head_decay", "head_no_decay"}
    model.freeze_backbone(False)
    # unfreezing restores exactly what was trainable before: permanently frozen parts stay so
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == always
    assert model.freeze_backbone(False) == 0


def test_accumulation_and_precision_keys_are_checked():
    with pytest.raises(ValueError, match="grad_accum_steps=0 must be >= 1"):
        load_config(["preset=demo", "optimizer.grad_accum_steps=0"])
    with pytest.raises(ValueError, match=r"exp.mixed_precision='fp8'.*auto"):
        load_config(["preset=demo", "exp.mixed_precision=fp8"])


def test_plot_names_a_folder_that_is_not_a_run(tmp_path):
    from hericap.cli import main
    from hericap.training.run_logs import plot_run, write_csv

    with pytest.raises(FileNotFoundError, match=r"metrics\.csv not found"):
        plot_run(tmp_path)
    assert main(["plot", str(tmp_path)]) == 2
    # an XE-only run without a step log still plots (the reward panel says it is absent)
    write_csv(
        tmp_path / "metrics.csv",
        [{"epoch": 0, "step": 5, "train_loss": 3.0, "val_CIDEr": 0.2, "lr": 1e-3}],
    )
    assert Path(plot_run(tmp_path)).is_file()
