"""Weight decay by one rule, two learning rates, warm-up then cosine."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from hericap.training.optim import build_optimizer, param_groups, warmup_cosine


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.extractor = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)


def test_groups_split_backbone_and_decay():
    groups = {
        g["name"]: g for g in param_groups(_Toy(), lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)
    }
    assert set(groups) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    assert groups["backbone_decay"]["lr"] == 1e-4 and groups["head_decay"]["lr"] == 1e-3
    assert groups["head_decay"]["weight_decay"] == 0.05
    assert groups["head_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups["head_decay"]["params"])
    assert all(p.ndim < 2 for p in groups["backbone_no_decay"]["params"])


def test_weight_decay_is_really_applied():
    model = _Toy()
    opt = build_optimizer(model, lr=0.1, backbone_lr=0.1, weight_decay=0.5, betas=(0.9, 0.99))
    w0, b0 = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(model.head.weight, w0 * (1 - 0.1 * 0.5))
    assert torch.equal(model.head.bias, b0)


def test_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))
    assert abs(opt.param_groups[0]["lr"] - 0.1) < 1e-9


def test_the_paper_recipe_warms_up_over_one_epoch_then_holds_the_rate():
    """`preset=paper`: the research schedule (warm-up over the first epoch, then constant: its
    min_lr equals xe_lr), phases 0/0/10/10, no weight decay (the research optimiser's
    `weight_decay_rate` key is ignored by torch's Adam)."""
    from hericap.config import load_config
    from hericap.training.optim import warmup_length

    opt = load_config(["preset=paper"]).optimizer
    assert (opt.freezing_xe_epochs, opt.freezing_sc_epochs) == (0, 0)
    assert (opt.finetune_xe_epochs, opt.finetune_sc_epochs) == (10, 10)
    assert opt.weight_decay == 0.0 and (opt.beta_1, opt.beta_2) == (0.9, 0.99)
    per_epoch = 442  # 113,287 COCO train images / (8 workers x 32)
    warmup = warmup_length(opt.warmup_steps, opt.warmup_epochs, per_epoch)
    assert warmup == per_epoch
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, opt.xe_lr, opt.xe_backbone_lr, 0.0, (0.9, 0.99))
    schedule = warmup_cosine(optimizer, warmup, 10 * per_epoch, opt.min_lr_ratio)
    lrs = []
    for _ in range(3 * per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] < opt.xe_lr / 100 and lrs[per_epoch // 2] < opt.xe_lr
    assert all(lr == opt.xe_lr for lr in lrs[per_epoch:])
    # without warmup_epochs, warmup_steps counts
    assert warmup_length(100, 0.0, per_epoch) == 100
