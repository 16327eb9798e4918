"""A 2-worker Ray Train run on the shared local cluster: checkpoint written, loaded, scored."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hericap.config import load_config
from hericap.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.ray

TINY = [
    "preset=demo",
    "model.d_model=32",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.grid_layers=1",
    "model.cap_generator.n_layers=1",
    "model.extractor.embed_dim=16",
    "optimizer.batch_size=8",
    "optimizer.finetune_xe_epochs=2",
    "optimizer.warmup_steps=2",
    "dataset.vocab_min_count=1",
    "decode.test_beam_size=2",
    "decode.max_len=8",
]


def _shard_run_config(name: str, tmp_path, tiny_shards, *extra: str):
    """TINY on the shared tiny shards (256 / 32 / 32 images), writing under ``tmp_path``."""
    return load_config(
        [
            *TINY,
            f"exp.name={name}",
            f"exp.output_dir={tmp_path}",
            f"dataset.shard_dir={tiny_shards.root}",
            "dataset.synthetic_train=256",
            "dataset.synthetic_val=32",
            "dataset.synthetic_test=32",
            "dataset.synthetic_seed=7",
            *extra,
        ]
    )


def test_two_worker_run_writes_checkpoint_that_loads_and_scores(ray_cluster, tiny_shards, tmp_path):
    from hericap.training.driver import train
    from hericap.training.evaluate import evaluate_checkpoint

    cfg = _shard_run_config("ray_test", tmp_path, tiny_shards, "optimizer.max_steps=6")
    outcome = train(cfg)
    # 256 images / (2 workers x 8) = 16 steps per epoch, capped at 6 steps in total.
    assert outcome.best_metrics["step"] == 6 and outcome.best_metrics["epoch"] == 0
    assert len(outcome.history) == 1 and outcome.history[0]["val_images"] == 32
    assert outcome.best_metrics["val_CIDEr"] >= 0.0

    ckpt = load_checkpoint(outcome.best_checkpoint)
    assert ckpt.config == cfg and len(ckpt.vocab) > 10
    state = ckpt.training_state()
    assert state["step"] == 6 and state["phase"] == "xe" and len(state["rng"]) == 2
    assert {g["name"] for g in state["optimizer"]["param_groups"]} >= {"head_decay"}
    out = ckpt.model.generate(torch.zeros(1, 3, 64, 64), beam_size=2, max_len=5)
    assert out.tokens.shape[0] == 1

    report = evaluate_checkpoint(cfg, outcome.best_checkpoint, "test")
    assert report["num_images"] == 32 and report["split"] == "test"
    assert set(report["metrics"]) >= {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}
    assert report["oracle"]["CIDEr"] > 0.5  # the human oracle on synthetic captions
    assert set(report["semantic"]) >= {"shape_f1", "colour_f1", "count_acc", "exact_scene"}
    results = json.loads((tmp_path / "ray_test" / "test_results.json").read_text())
    assert len(results) == 32 and {"image_id", "caption"} <= set(results[0])


def test_checkpoint_mismatch_is_an_error(tmp_path, tiny_shards):
    # Build a checkpoint folder by hand, then change the config it claims: loading must fail
    # with the missing/unexpected keys, never load partially.
    from hericap.data.text import Vocabulary
    from hericap.models import build_captioner
    from hericap.training.checkpoint import save_checkpoint

    cfg = load_config(TINY)
    vocab = Vocabulary.load(tiny_shards.vocab_path)
    model = build_captioner(cfg.model, len(vocab), 64)
    save_checkpoint(tmp_path / "c", model, cfg, vocab, meta={"epoch": 0})
    assert load_checkpoint(tmp_path / "c").meta == {"epoch": 0}
    cfg2 = load_config([*TINY, "model.cap_generator.n_layers=2"])
    save_checkpoint(tmp_path / "d", model, cfg2, vocab, meta={})
    with pytest.raises(RuntimeError, match="missing keys"):
        load_checkpoint(tmp_path / "d")
    shutil.rmtree(tmp_path / "c")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "c")


def test_asking_for_missing_gpus_is_a_clear_error(ray_cluster, tiny_shards, tmp_path):
    from hericap.training.driver import train

    cfg = load_config(
        [
            *TINY,
            "exp.ngpus_per_node=8",
            "exp.world_size=8",
            f"exp.output_dir={tmp_path}",
            f"dataset.shard_dir={tiny_shards.root}",
        ]
    )
    with pytest.raises(RuntimeError, match=r"exp\.ngpus_per_node=0"):
        train(cfg)


def test_frozen_phases_are_refused_not_ignored(ray_cluster, tmp_path):
    from hericap.training.driver import train

    for key in ("freezing_xe_epochs", "freezing_sc_epochs"):
        cfg = load_config([*TINY, f"optimizer.{key}=1", f"exp.output_dir={tmp_path}"])
        with pytest.raises(ValueError, match=f"optimizer.{key}=1: frozen phases"):
            train(cfg)


def test_xe_then_scst_run_records_the_reward_setting(ray_cluster, tiny_shards, tmp_path):
    from hericap.training.driver import train

    cfg = _shard_run_config(
        "ray_scst",
        tmp_path,
        tiny_shards,
        "dataset.overfit=True",
        "dataset.overfit_size=32",
        "optimizer.finetune_xe_epochs=1",
        "optimizer.finetune_sc_epochs=1",
        "optimizer.sc_baseline=leave_one_out",
        "optimizer.sc_num_sequences=3",
        "optimizer.sc_lr=1e-4",
        "optimizer.sc_backbone_lr=1e-4",
    )
    outcome = train(cfg)
    # 32 images / (2 workers x 8) = 2 steps per epoch: one XE epoch, then one SCST epoch
    assert [h["phase"] for h in outcome.history] == ["xe", "sc"]
    # even per-worker shards: both workers took every step of both epochs
    assert all(h["worker_steps_min"] == h["worker_steps_max"] == 2 for h in outcome.history)
    sc = outcome.history[1]
    assert sc["step"] == 4 and sc["sc_baseline"] == "leave_one_out" and sc["sc_include_eos"]
    assert sc["train_reward"] >= 0.0 and sc["lr"] == pytest.approx(1e-4)
    latest = json.loads((outcome.latest_checkpoint / "meta.json").read_text())
    assert latest["phase"] == "sc"
    state = load_checkpoint(outcome.latest_checkpoint).training_state()
    assert state["phase"] == "sc" and state["epoch"] == 1


def test_full_model_family_trains_under_ddp_without_unused_parameters(
    ray_cluster, tiny_shards, tmp_path
):
    """Grid (routing cells) + region (Deformable DETR) + global under 2-worker DDP: DDP without
    ``find_unused_parameters`` fails on the second step if any trainable parameter is unused."""
    from hericap.training.driver import train

    cfg = load_config(
        [
            "preset=tiny",
            "exp.name=family",
            f"exp.output_dir={tmp_path}",
            f"dataset.shard_dir={tiny_shards.root}",
            "dataset.synthetic_seed=7",
            "dataset.vocab_min_count=1",
            "dataset.max_val_images=16",
            "model.grid_layer_type=routing",
            # the paper's pipeline at toy sizes: aspect-kept resize onto padded canvases, and
            # training augmentation
            "dataset.resize=max_side",
            "dataset.min_size=48",
            "dataset.max_size=80",
            "dataset.augment=randaugment",
            "model.cap_generator.decoder_name=Concatenated_Sequential",
            "optimizer.batch_size=8",
            "optimizer.max_steps=3",
            "optimizer.warmup_steps=2",
            "decode.max_len=6",
        ]
    )
    outcome = train(cfg)
    assert outcome.best_metrics["step"] == 3
    ckpt = load_checkpoint(outcome.best_checkpoint)
    assert ckpt.model.memory_names == ["grid", "region", "global"]
    assert ckpt.model.region_encoder is not None
