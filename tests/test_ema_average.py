"""The moving average of the weights (optimizer.ema_decay) and `hericap average`, without Ray:
the average follows its formula, validation sees it and training gets its own weights back
exactly, a checkpoint resumes exactly, and checkpoints average only when they are compatible.
(The Ray Train run with EMA is in test_train_ray.py's four-phase test.)"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from tiny_model import TINY_MODEL
from torch import nn

from hericap.config import load_config
from hericap.training.ema import WeightEma, checkpoint_weights, restore_weights

DECAY = 0.9


class Toy(nn.Module):
    """Parameters, a float buffer and an integer buffer (copied, never averaged)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x)) * self.scale


def _train(model: nn.Module, ema: WeightEma, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.count += 1
        ema.update(model)


def test_the_average_follows_its_formula_with_the_early_decay_cap():
    torch.manual_seed(0)
    model = Toy()
    frozen = model.norm.weight.detach().clone()
    model.norm.weight.requires_grad_(False)
    ema = WeightEma(model, 0.7)  # capped below by (1 + n) / (10 + n) until n = 20
    expected = {k: v.double().clone() for k, v in model.state_dict().items() if k != "count"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for n in range(25):
        decay = min(0.7, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(decay)
        _train(model, ema, opt, range(n, n + 1))
        for k, v in model.state_dict().items():
            if k != "count":
                expected[k] = decay * expected[k] + (1 - decay) * v.double()
    assert ema.updates == 25 and ema.current_decay() == 0.7
    averaged = ema.state_dict_for(model)
    for k, v in expected.items():
        assert torch.allclose(averaged[k].double(), v, atol=1e-6), k
    assert torch.equal(averaged["count"], model.count) and model.count == 25  # copied
    assert torch.equal(averaged["norm.weight"], frozen)  # a weight that never moved: exact
    assert not torch.allclose(averaged["lin.weight"], model.lin.weight)


def test_validation_sees_the_average_and_training_gets_its_weights_back_exactly():
    torch.manual_seed(1)
    model, reference = Toy(), Toy()
    ema = WeightEma(model, DECAY)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train(model, ema, opt, range(5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference.load_state_dict(ema.state_dict_for(model))
    x = torch.randn(2, 4)
    with ema.swapped_in(model):
        assert torch.equal(model(x), reference(x))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(KeyError), ema.swapped_in(model):
        raise KeyError("a failing validation still gives the weights back")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_checkpoint_with_ema_resumes_exactly(tmp_path):
    """Six steps straight vs three, a checkpoint through files (model.pt = the average, the raw
    weights in the training state), a fresh model and three more: identical weights and average.
    """

    def fresh():
        torch.manual_seed(2)
        model = Toy()
        ema = WeightEma(model, DECAY)
        return model, ema, torch.optim.AdamW(model.parameters(), lr=0.05)

    straight, straight_ema, opt = fresh()
    _train(straight, straight_ema, opt, range(6))

    model, ema, opt = fresh()
    _train(model, ema, opt, range(3))
    weights, extra = checkpoint_weights(model, ema)
    torch.save(weights, tmp_path / "model.pt")
    torch.save({"optimizer": opt.state_dict(), **extra}, tmp_path / "training_state.pt")

    resumed, resumed_ema, resumed_opt = fresh()
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    restore_weights(resumed, resumed_ema, saved, state, lambda m, s: m.load_state_dict(s))
    resumed_opt.load_state_dict(state["optimizer"])
    assert resumed_ema.updates == 3
    _train(resumed, resumed_ema, resumed_opt, range(3, 6))
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
        average, expected = (
            resumed_ema.state_dict_for(resumed),
            straight_ema.state_dict_for(straight),
        )
        assert torch.equal(average[k], expected[k]), k

    # a run without EMA resumes from the raw weights; one with EMA from a checkpoint without it
    # starts its average at the checkpoint's weights
    plain = Toy()
    restore_weights(plain, None, saved, state, lambda m, s: m.load_state_dict(s))
    assert torch.equal(plain.lin.weight, state["raw_model"]["lin.weight"])
    late, late_ema, _ = fresh()
    restore_weights(late, late_ema, saved, {}, lambda m, s: m.load_state_dict(s))
    assert late_ema.updates == 0 and torch.equal(late_ema.shadow["lin.weight"], saved["lin.weight"])


def test_no_ema_writes_the_weights_alone():
    model = Toy()
    weights, extra = checkpoint_weights(model, None)
    assert extra == {} and weights.keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEma(model, 1.0)


# ----------------------------------------------------------------------------- average

TINY = ["preset=demo", *TINY_MODEL, "dataset.vocab_min_count=1"]


def _checkpoint(path, seed: int, overrides: tuple[str, ...] = (), words=("dog", "cat", "red")):
    from hericap.checkpoint import save_checkpoint
    from hericap.data.text import Vocabulary
    from hericap.models import build_captioner

    cfg = load_config([*TINY, *overrides])
    vocab = Vocabulary(list(words))
    torch.manual_seed(seed)
    model = build_captioner(cfg.model, len(vocab), 64)
    meta = {"epoch": seed, "step": 10 * seed, "phase": "xe", "val_CIDEr": 0.1 * seed}
    save_checkpoint(path, model, cfg, vocab, meta=meta)
    return model.state_dict()


def test_average_of_compatible_checkpoints_loads_and_is_the_mean(tmp_path):
    from hericap.checkpoint import load_checkpoint
    from hericap.cli import main

    states = [_checkpoint(tmp_path / f"c{i}", seed=i) for i in range(3)]
    # a resumed run writes exp.resume=True: where a run ran does not change what it learnt
    states.append(_checkpoint(tmp_path / "c3", 3, ("exp.resume=True", "exp.output_dir=elsewhere")))
    paths = [str(tmp_path / f"c{i}") for i in range(4)]
    assert main(["average", *paths, "--out", str(tmp_path / "avg")]) == 0
    averaged = load_checkpoint(tmp_path / "avg")
    for k, v in averaged.model.state_dict().items():
        if v.is_floating_point():
            mean = sum(s[k].double() for s in states) / 4
            assert torch.allclose(v.double(), mean, atol=1e-7), k
        else:
            assert torch.equal(v, states[0][k]), k
    meta = json.loads((tmp_path / "avg" / "meta.json").read_text())
    assert [s["epoch"] for s in meta["averaged_from"]] == [0, 1, 2, 3] and meta["phase"] == "xe"
    assert not (tmp_path / "avg" / "training_state.pt").exists()  # evaluated, not resumed


def test_average_refuses_checkpoints_that_differ_and_lists_the_differences(tmp_path, capsys):
    from hericap.checkpoint.average import average_checkpoints
    from hericap.cli import main

    _checkpoint(tmp_path / "a", seed=0)
    _checkpoint(tmp_path / "lr", 1, ("optimizer.xe_lr=0.01", "exp.seed=7"))
    _checkpoint(tmp_path / "vocab", seed=2, words=("dog", "cat", "blue"))
    _checkpoint(tmp_path / "arch", 3, ("model.cap_generator.n_layers=2",))
    with pytest.raises(ValueError) as err:
        average_checkpoints([tmp_path / n for n in ("a", "lr", "vocab", "arch")], tmp_path / "o")
    message = str(err.value)
    assert "optimizer.xe_lr: 0.002 != 0.01" in message and "exp.seed: 123 != 7" in message
    assert "vocabulary" in message
    assert "model.cap_generator.n_layers: 1 != 2" in message and "unexpected" in message
    assert "--allow-different" in message and not (tmp_path / "o").exists()
    # differences named on the command line are accepted (runs from one exp.checkpoint, say)
    argv = ["average", str(tmp_path / "a"), str(tmp_path / "lr"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "optimizer.xe_lr" in capsys.readouterr().err
    allow = ["--allow-different", "optimizer.xe_lr", "--allow-different", "exp.seed"]
    assert main([*argv, *allow]) == 0
    with pytest.raises(ValueError, match="not empty"):
        average_checkpoints([tmp_path / "a", tmp_path / "lr"], tmp_path / "o", ["optimizer", "exp"])
    with pytest.raises(ValueError, match="at least two"):
        average_checkpoints([tmp_path / "a"], tmp_path / "p")
    with pytest.raises(FileNotFoundError):
        average_checkpoints([tmp_path / "a", tmp_path / "nothing"], tmp_path / "p")


# ----------------------------------------------------------------------------- the recipe


@pytest.fixture
def ray_train_stub(monkeypatch, tmp_path):
    """The few ray.train calls a one-worker recipe makes, answered in this process (no Ray
    cluster): reported checkpoints are copied to ``tmp_path/reported<n>``; ``resume_from[0]``
    is what ``get_checkpoint`` returns."""
    import shutil
    from types import SimpleNamespace

    import ray.train
    import ray.train.torch

    reported: list[tuple[dict, object]] = []
    resume_from: list = [None]

    def report(metrics, checkpoint=None):
        copy = None
        if checkpoint is not None:
            copy = tmp_path / f"reported{len(reported)}"
            shutil.copytree(checkpoint.path, copy)
        reported.append((metrics, copy))

    context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    monkeypatch.setattr(ray.train, "get_context", lambda: context)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: resume_from[0])
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: None)
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model: model)
    return reported, resume_from


def _recipe():
    from hericap.config.loader import to_dict
    from hericap.data.text import Vocabulary
    from hericap.training.recipe import CaptionRecipe

    cfg = load_config(
        [
            *TINY,
            "optimizer.ema_decay=0.5",
            "optimizer.batch_size=4",
            "optimizer.warmup_steps=1",
            "optimizer.captions_per_image=1",
            "evaluation.collapse_unique_share=0.5",
        ]
    )
    vocab = Vocabulary(["a", "red", "blue", "circle", "square"])
    recipe = CaptionRecipe(
        {
            "config": to_dict(cfg),
            "vocab": vocab.to_dict(),
            "val_files": [],
            "val_references": {},
            "train_references": {},
            "batches_per_epoch": 4,
        }
    )
    assert recipe.setup()
    return recipe


def _batch(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        "image": rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8),
        "captions": [["a red circle"], ["a blue square"], ["a red square"], ["a blue circle"]],
        "image_id": np.array([f"{i}-{j}" for j in range(4)]),
    }


def test_the_recipe_validates_checkpoints_and_resumes_the_average_exactly(
    ray_train_stub, monkeypatch, caplog
):
    """The worker recipe with optimizer.ema_decay (Ray's calls answered in-process): every
    optimiser step updates the average; validation decodes with the average and training gets
    its weights back; the epoch records the setting and the collapse alarm; the checkpoint holds
    the average as model.pt and the raw weights in its training state; a recipe resumed from it
    continues exactly as the one that wrote it."""
    from hericap.evaluation.diversity import diversity_scores
    from hericap.training import recipe as recipe_module
    from hericap.training.recipe import EpochState
    from hericap.training.validation import ValidationResult

    reported, resume_from = ray_train_stub
    recipe = _recipe()
    state = EpochState(0)
    for i in range(3):
        assert recipe._train_batch(_batch(i), state)
    assert recipe.ema.updates == 3 and recipe.step == 3

    seen: dict[str, torch.Tensor] = {}

    def fake_validate(net, *args, **kwargs):
        seen.update({k: v.clone() for k, v in net.state_dict().items()})
        same = {str(i): "a red circle" for i in range(8)}  # a collapsed model's captions
        return ValidationResult(
            0.25, 8, diversity_scores(same, None, kwargs["collapse_unique_share"])
        )

    monkeypatch.setattr(recipe_module, "validate", fake_validate)
    raw = {k: v.clone() for k, v in recipe.net.state_dict().items()}
    average = {k: v.clone() for k, v in recipe.ema.state_dict_for(recipe.net).items()}
    with caplog.at_level(logging.WARNING):
        recipe._end_epoch(state)
    assert all(torch.equal(seen[k], v) for k, v in average.items())  # validated: the average
    assert any(not torch.equal(seen[k], raw[k]) for k in raw if raw[k].is_floating_point())
    assert all(torch.equal(v, raw[k]) for k, v in recipe.net.state_dict().items())  # given back
    metrics, folder = reported[-1]
    assert metrics["ema_decay"] == 0.5 and metrics["val_collapse"] and metrics["val_CIDEr"] == 0.25
    assert metrics["val_decode"] == "greedy"  # how val was decoded (decode.*), recorded
    assert "caption collapse" in caplog.text and "optimizer.xe_lr" in caplog.text
    saved = torch.load(folder / "model.pt", weights_only=True)
    train_state = torch.load(folder / "training_state.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in average.items())
    assert all(torch.equal(train_state["raw_model"][k], v) for k, v in raw.items())
    assert train_state["ema"] == {"decay": 0.5, "updates": 3}

    from ray.train import Checkpoint

    resume_from[0] = Checkpoint.from_directory(str(folder))
    resumed = _recipe()
    assert resumed.ema.updates == 3 and resumed.step == 3
    for r in (recipe, resumed):
        r._train_batch(_batch(3), EpochState(1))
    for k, v in recipe.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[k], v), k
        assert torch.equal(resumed.ema.shadow.get(k, v), recipe.ema.shadow.get(k, v)), k
