"""A 2-worker Ray Train run on the shared local cluster: checkpoint written, loaded, scored."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import mlflow_client
from PIL import Image
from tiny_model import TINY_MODEL

from hericap.checkpoint import load_checkpoint
from hericap.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = [
    "preset=demo",
    *TINY_MODEL,
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


def _val_cider(ckpt, cfg, shards, world: int) -> float:
    """Val CIDEr-D of a loaded checkpoint, decoding each rank's slice as validation does."""
    from hericap.data.shards import read_rows
    from hericap.evaluation.coco_metrics import cider_d

    files = [str(f) for f in shards.files("val")]
    references = {r["image_id"]: list(r["captions"]) for r in read_rows(files)}
    return cider_d(references, _val_captions(ckpt, cfg, files, references, world))


def _val_captions(ckpt, cfg, files, references, world: int) -> dict[str, str]:
    """The captions a loaded checkpoint gives the val images of ``references``, each rank's
    slice decoded as validation decodes it (one batch each, one thread)."""
    from hericap.data.transforms import resize_spec
    from hericap.evaluation.inference import caption_batch
    from hericap.training.validation import iter_val_slice

    candidates = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers ran (exp.cpus_per_worker=1)
    try:
        for rank in range(world):
            slices = iter_val_slice(
                files, references, resize_spec(cfg.dataset), cfg.decode.batch_size, rank, world
            )
            for ids, images, sizes in slices:
                captions = caption_batch(
                    ckpt.model,
                    ckpt.vocab,
                    images,
                    cfg.decode.val_beam_size,
                    cfg.decode.max_len,
                    image_hw=sizes,
                )
                candidates.update(zip(ids, captions, strict=True))
    finally:
        torch.set_num_threads(threads)
    return candidates


@pytest.mark.java  # the test split is scored with the coco-caption toolkit
def test_two_worker_run_of_the_whole_family_writes_a_checkpoint_that_loads_and_scores(
    ray_cluster, tiny_shards, tmp_path
):
    """Grid (routing cells) + region (Deformable DETR) + global under 2-worker DDP, with the
    paper's input pipeline at toy sizes (aspect-kept resize onto padded canvases, RandAugment):
    DDP without ``find_unused_parameters`` fails on the second step if any trainable parameter
    is unused. The checkpoint loads, generates and scores."""
    from hericap.data.shards import read_rows
    from hericap.runtime.batch_eval import evaluate_checkpoint
    from hericap.training.driver import train

    cfg = load_config(
        [
            "preset=tiny",
            "exp.name=ray_test",
            f"exp.output_dir={tmp_path}",
            f"dataset.shard_dir={tiny_shards.root}",
            "dataset.synthetic_seed=7",
            "dataset.vocab_min_count=1",
            "model.grid_layer_type=routing",
            "dataset.resize=max_side",
            "dataset.min_size=48",
            "dataset.max_size=80",
            "dataset.augment=randaugment",
            "model.cap_generator.decoder_name=Concatenated_Sequential",
            "optimizer.batch_size=8",
            "optimizer.max_steps=3",
            "optimizer.warmup_steps=2",
            "decode.test_beam_size=2",
            "decode.max_len=6",
            "evaluation.per_image=True",
            "evaluation.worst_images=3",
        ]
    )
    outcome = train(cfg)
    # 256 images / (2 workers x 8) = 16 steps per epoch, capped at 3 steps in total.
    assert outcome.best_metrics["step"] == 3 and outcome.best_metrics["epoch"] == 0
    assert len(outcome.history) == 1 and outcome.history[0]["val_images"] == 32

    ckpt = load_checkpoint(outcome.best_checkpoint)
    # the reported val CIDEr-D is what the checkpoint's weights give on the val images, decoded
    # as the two workers decoded them (each its slice, one batch each, one thread)
    assert outcome.best_metrics["val_CIDEr"] == pytest.approx(
        _val_cider(ckpt, cfg, tiny_shards, world=2), abs=1e-9
    )
    assert ckpt.config == cfg and len(ckpt.vocab) > 10
    assert ckpt.model.memory_names == ["grid", "region", "global"]
    assert ckpt.model.region_encoder is not None
    state = ckpt.training_state()
    assert state["step"] == 3 and state["phase"] == "finetune_xe" and len(state["rng"]) == 2
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
    # diversity of the test captions (novel against the train references), recorded with the
    # settings; the per-image file with every metric and the worst three by CIDEr
    from hericap.evaluation.diversity import caption_fingerprints, diversity_scores

    captions = {r["image_id"]: r["caption"] for r in results}
    train_refs = [c for r in read_rows(tiny_shards.files("train")) for c in r["captions"]]
    assert report["diversity"] == diversity_scores(
        captions, caption_fingerprints(train_refs), cfg.evaluation.collapse_unique_share
    ) | {"novel_from": report["diversity"]["novel_from"]}
    assert report["evaluation"]["per_image"] and report["training"]["ema_decay"] == 0.0
    per_image = json.loads((tmp_path / "ray_test" / "test_per_image.json").read_text())
    assert len(per_image["images"]) == 32 and report["files"]["per_image"].endswith(".json")
    assert set(per_image["images"][0]) >= {"caption", "references", "CIDEr", "METEOR", "Bleu_4"}
    worst = sorted(per_image["images"], key=lambda r: (r["CIDEr"], r["image_id"]))[:3]
    assert per_image["worst"] == worst == report["worst_images"]


def test_checkpoint_mismatch_is_an_error(tmp_path, tiny_shards):
    # Build a checkpoint folder by hand, then change the config it claims: loading must fail
    # with the missing/unexpected keys, never load partially.
    from hericap.checkpoint import save_checkpoint
    from hericap.data.text import Vocabulary
    from hericap.models import build_captioner

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
    # CPU bundles too, each on one node: 2 workers of 3 CPUs do not fit a 4-CPU node (Ray
    # would wait for them forever)
    cfg = load_config([*TINY, "exp.world_size=2", "exp.cpus_per_worker=3"])
    with pytest.raises(RuntimeError, match=r"2 x \(3 CPU\).*hold 1"):
        train(cfg)


def _checkpoints(run_storage) -> dict[int, dict[str, torch.Tensor]]:
    """{epoch: model state} of every checkpoint Ray kept under ``run_storage``."""
    out = {}
    for d in sorted(p for p in run_storage.glob("checkpoint_*") if p.is_dir()):
        epoch = json.loads((d / "meta.json").read_text())["epoch"]
        out[epoch] = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
    return out


def test_four_phases_freeze_then_finetune_under_ddp_with_accumulation(
    ray_cluster, tiny_shards, tmp_path
):
    """freezing_xe -> freezing_sc -> finetune_xe -> finetune_sc, 2 DDP workers, 2 accumulated
    batches per step, bf16 autocast (here on CPU; GPU runs get it by default), a moving average
    of the weights: the backbone does not move in the frozen phases and does after; the SCST
    epochs record their reward setting; validation scores the average, which model.pt holds,
    and records the val captions' diversity. (A backbone LR of 0 freezing a phase is tested in
    test_phases.py; the average's arithmetic and exact resume in test_ema_average.py.)"""
    from hericap.models.builder import build_captioner
    from hericap.training.driver import train

    # a previous run of the same name, replaced on purpose (exp.overwrite=True): its checkpoint
    # and its kept best (a score no run of this test reaches) must not survive
    previous = tmp_path / "phases" / "runs"
    for name in ("train/checkpoint_old", "best"):
        (previous / name).mkdir(parents=True)
        (previous / name / "meta.json").write_text('{"epoch": 9, "val_CIDEr": 999.0}')
    cfg = _shard_run_config(
        "phases",
        tmp_path,
        tiny_shards,
        "dataset.overfit=True",
        "dataset.overfit_size=64",
        "optimizer.freezing_xe_epochs=1",
        "optimizer.freezing_sc_epochs=1",
        "optimizer.finetune_xe_epochs=1",
        "optimizer.finetune_sc_epochs=1",
        "optimizer.sc_backbone_lr=5e-5",  # the preset's 0 would freeze it in finetune_sc too
        "optimizer.sc_lr=1e-4",
        "optimizer.grad_accum_steps=2",
        "optimizer.sc_baseline=leave_one_out",
        "optimizer.sc_num_sequences=2",
        "exp.mixed_precision=bf16",
        "optimizer.checkpoint_num_to_keep=4",
        "exp.log_every_steps=1",
        "decode.max_len=6",
        "optimizer.ema_decay=0.5",
        "exp.overwrite=True",
        "exp.tracking=both",  # TensorBoard files and an MLflow run (local store)
    )
    outcome = train(cfg)
    assert outcome.best_metrics["val_CIDEr"] == max(h["val_CIDEr"] for h in outcome.history)
    # 64 images / (2 workers x 8) = 4 batches per epoch = 2 optimiser steps
    assert [h["phase_name"] for h in outcome.history] == [
        "freezing_xe",
        "freezing_sc",
        "finetune_xe",
        "finetune_sc",
    ]
    assert [h["frozen_backbone"] for h in outcome.history] == [True, True, False, False]
    assert [h["step"] for h in outcome.history] == [2, 4, 6, 8]
    assert all(h["worker_steps_min"] == h["worker_steps_max"] == 2 for h in outcome.history)
    assert outcome.history[0]["lr_backbone"] is None  # no backbone group while frozen
    assert outcome.history[2]["lr_backbone"] > 0
    assert [h["phase"] for h in outcome.history] == ["xe", "sc", "xe", "sc"]
    for sc in (outcome.history[1], outcome.history[3]):
        assert sc["sc_baseline"] == "leave_one_out" and sc["sc_include_eos"]
        # the mean CIDEr-D of sampled captions: above 0 (some words match), at most 10
        assert 0.0 < sc["train_reward"] <= 10.0 and sc["lr"] == pytest.approx(1e-4)
    latest = json.loads((Path(outcome.latest_checkpoint) / "meta.json").read_text())
    assert latest["phase"] == "sc"
    state = load_checkpoint(outcome.latest_checkpoint).training_state()
    assert state["phase"] == "finetune_sc" and state["epoch"] == 3

    vocab_size = len(load_checkpoint(outcome.best_checkpoint).vocab)
    torch.manual_seed(cfg.exp.seed)  # the loop builds the initial weights the same way
    initial = build_captioner(cfg.model, vocab_size, 64).state_dict()
    states = _checkpoints(tmp_path / "phases" / "runs" / "train")
    assert sorted(states) == [0, 1, 2, 3]
    extractor = [k for k in initial if k.startswith("extractor.") and "weight" in k]
    decoder = [k for k in initial if k.startswith("decoder.") and "weight" in k]
    for epoch in (0, 1):
        assert all(torch.equal(states[epoch][k], initial[k]) for k in extractor)
        assert any(not torch.equal(states[epoch][k], initial[k]) for k in decoder)
    assert any(not torch.equal(states[2][k], initial[k]) for k in extractor)

    # EMA: model.pt holds the average (above: a frozen weight's average stays exact), the
    # training state the raw weights; the kept best's model.pt, decoded as the two workers
    # decoded the val images, gives the val CIDEr-D and diversity its epoch reported (after 8
    # steps this toy model may say one caption with either weights, so which weights validation
    # decodes is checked in test_ema_average.py, on the recipe itself)
    from hericap.data.catalog import first_image_ids
    from hericap.data.shards import read_rows
    from hericap.evaluation.coco_metrics import cider_d
    from hericap.evaluation.diversity import caption_fingerprints, diversity_scores

    assert state["ema"] == {"decay": 0.5, "updates": 8}
    averaged = torch.load(Path(outcome.latest_checkpoint) / "model.pt", weights_only=True)
    assert any(not torch.equal(state["raw_model"][k], averaged[k]) for k in decoder)
    assert all(h["ema_decay"] == 0.5 for h in outcome.history)
    best = load_checkpoint(outcome.best_checkpoint)
    files = [str(f) for f in tiny_shards.files("train")]
    keep = set(first_image_ids(tiny_shards.files("train"), 64))  # dataset.overfit: val = train
    refs = {r["image_id"]: list(r["captions"]) for r in read_rows(files) if r["image_id"] in keep}
    captions = _val_captions(best, cfg, files, refs, world=2)
    assert best.meta["val_CIDEr"] == pytest.approx(cider_d(refs, captions), abs=1e-9)
    seen = caption_fingerprints(c for v in refs.values() for c in v)
    expected = diversity_scores(captions, seen, cfg.evaluation.collapse_unique_share)
    for key in ("distinct_1", "distinct_2", "vocab_used", "unique_share", "novel_share"):
        assert best.meta[f"val_{key}"] == pytest.approx(expected[key]), key
    assert best.meta["val_collapse"] == expected["collapse"]
    assert all(h["val_collapse"] == (h["val_unique_share"] < 0.1) for h in outcome.history)

    # observability: CSVs, TensorBoard event files, and `hericap plot`
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hericap.cli import main
    from hericap.training.run_logs import read_csv

    run_dir = tmp_path / "phases"
    epochs = read_csv(run_dir / "metrics.csv")
    steps = read_csv(run_dir / "steps.csv")
    assert [r["phase_name"] for r in epochs] == [h["phase_name"] for h in outcome.history]
    assert [r["step"] for r in steps] == [float(i) for i in range(1, 9)]
    assert all(r["reward"] is not None for r in steps if r["phase"].endswith("_sc"))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"epoch/val_CIDEr", "epoch/train_loss", "step/loss", "step/lr", "step/reward"} <= tags
    assert {"epoch/val_unique_share", "epoch/val_distinct_2"} <= tags
    assert [e.step for e in events.Scalars("epoch/val_CIDEr")] == [2, 4, 6, 8]
    with Image.open(run_dir / "curves.png") as png:  # drawn at the end of the run
        assert png.format == "PNG" and png.size[0] > 500
    (run_dir / "curves.png").unlink()
    assert main(["plot", str(run_dir)]) == 0 and (run_dir / "curves.png").is_file()
    _check_mlflow_run(tmp_path / "mlruns", "phases", outcome, steps)


def _check_mlflow_run(store: Path, experiment: str, outcome, steps: list[dict]) -> None:
    """The run's MLflow run, read back with MlflowClient: the config as parameters, every
    logged step and every epoch as metrics, the curves, metrics and best config as artefacts."""
    client = mlflow_client(store)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.run_id == outcome.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.params["optimizer.ema_decay"] == "0.5"
    assert run.data.params["model.cap_generator.decoder_name"] == "Parallel"
    val = client.get_metric_history(run.info.run_id, "epoch/val_CIDEr")
    assert [(m.step, m.value) for m in val] == [
        (h["step"], pytest.approx(h["val_CIDEr"])) for h in outcome.history
    ]
    loss = client.get_metric_history(run.info.run_id, "step/loss")
    assert [(m.step, m.value) for m in loss] == [
        (r["step"], pytest.approx(r["loss"])) for r in steps
    ]
    rewards = client.get_metric_history(run.info.run_id, "step/reward")  # the SCST steps
    assert [m.step for m in rewards] == [r["step"] for r in steps if r["reward"] is not None]
    artefacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert artefacts == {"curves.png", "metrics.csv", "best_config.json"}
    best = Path(client.download_artifacts(run.info.run_id, "best_config.json"))
    best = json.loads(best.read_text())
    assert best == json.loads((Path(outcome.best_checkpoint) / "config.json").read_text())


def test_resume_from_s3_gives_the_weights_of_a_straight_run(
    ray_cluster, tiny_shards, moto_server, tmp_path
):
    """2 epochs straight (local storage) vs the same 2 epochs in two invocations with Ray Train
    storage on S3 (a moto server on 127.0.0.1): 40 steps and stop (epoch 1, a step checkpoint at
    step 35 and the stop's at step 40, both inside epoch 2), resume from the bucket to the end:
    identical weights and losses (CPU, one worker, deterministic data order); checkpoints and
    the kept best land in the bucket, with local copies that load. Resuming from an epoch-end
    checkpoint is exercised by the killed-worker test."""
    import boto3

    from hericap.training.driver import train

    s3 = boto3.client("s3", endpoint_url=moto_server)
    s3.create_bucket(Bucket="runs")

    def bucket_keys() -> set[str]:
        return {o["Key"] for o in s3.list_objects_v2(Bucket="runs")["Contents"]}

    common = [
        "optimizer.finetune_xe_epochs=2",
        "optimizer.finetune_sc_epochs=0",
        "exp.deterministic=True",
        "exp.world_size=1",
    ]
    straight = train(_shard_run_config("straight", tmp_path, tiny_shards, *common))

    def stopped(*extra: str):
        more = [*common, "exp.storage_path=s3://runs/hericap", "optimizer.checkpoint_num_to_keep=1"]
        more.append("exp.tracking=mlflow")
        return train(_shard_run_config("stopped", tmp_path, tiny_shards, *more, *extra))

    first = stopped("exp.steps_per_run=40", "exp.checkpoint_every_steps=35")
    latest = json.loads((Path(first.latest_checkpoint) / "meta.json").read_text())
    assert latest["mid_epoch"] and latest["step"] == 40 and latest["epoch"] == 1
    assert (Path(first.latest_checkpoint) / "training_state.pt").is_file()  # a local copy
    assert [h["epoch"] for h in first.history] == [0]  # epoch 2 not finished yet
    keys = bucket_keys()
    assert any(k.startswith("hericap/train/checkpoint_") and k.endswith("/model.pt") for k in keys)
    assert {"hericap/best/meta.json", "hericap/best/model.pt"} <= keys
    assert load_checkpoint(first.best_checkpoint).meta["epoch"] == 0

    resumed = stopped("exp.resume=True")
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    assert resumed.history[1]["step"] == straight.history[1]["step"] == 64  # 256 / 8 x 2
    assert resumed.history[1]["attempt"] == 2

    a = _checkpoints(tmp_path / "straight" / "runs" / "train")[1]
    b = torch.load(
        Path(resumed.latest_checkpoint) / "model.pt", map_location="cpu", weights_only=True
    )
    assert json.loads((Path(resumed.latest_checkpoint) / "meta.json").read_text())["epoch"] == 1
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert resumed.history[1]["train_loss"] == straight.history[1]["train_loss"]
    # the resumed run continued its MLflow run: one run, both epochs, only MLflow's files
    assert resumed.mlflow_run_id == first.mlflow_run_id is not None
    client = mlflow_client(tmp_path / "mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    val = client.get_metric_history(run.info.run_id, "epoch/val_CIDEr")
    assert [m.step for m in val] == [32, 64] and run.info.status == "FINISHED"
    assert not (tmp_path / "stopped" / "tensorboard").exists()
    assert client.get_experiment_by_name("straight") is None
    assert (tmp_path / "straight" / "tensorboard").is_dir()  # the default: TensorBoard

    # retention in the bucket: Ray kept only the latest (K=1); the best by val CIDEr was copied
    # aside
    kept = {k.split("/")[2] for k in bucket_keys() if k.startswith("hericap/train/checkpoint_")}
    kept.discard("checkpoint_manager_snapshot.json")
    assert len(kept) == 1
    best_epoch = max(resumed.history, key=lambda h: h["val_CIDEr"])["epoch"]
    assert resumed.best_metrics["epoch"] == best_epoch
    best = json.loads(s3.get_object(Bucket="runs", Key="hericap/best/meta.json")["Body"].read())
    assert best["val_CIDEr"] == max(h["val_CIDEr"] for h in resumed.history)


def test_a_killed_worker_is_replaced_and_the_run_completes(ray_cluster, tiny_shards, tmp_path):
    """SIGKILL one training worker process after the first checkpoint: Ray Train's
    FailureConfig restarts the group, which resumes from that checkpoint and finishes with the
    expected steps."""
    from ray.util.state import list_actors

    from hericap.training.driver import train

    cfg = _shard_run_config(
        "failover",
        tmp_path,
        tiny_shards,
        "optimizer.finetune_xe_epochs=3",
        "optimizer.finetune_sc_epochs=0",
        "exp.max_failures=2",
    )
    storage = tmp_path / "failover" / "runs" / "train"
    killed: list[int] = []

    def first_checkpoint_registered() -> bool:
        """Ray lists a checkpoint in its snapshot once it is committed (its folder appears
        earlier, while being written: a kill then restarts from scratch)."""
        try:
            snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return bool(snapshot.get("checkpoint_results"))

    def kill_one_worker_after_the_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline:
            if first_checkpoint_registered():
                workers = list_actors(
                    filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                    detail=True,
                )
                if len(workers) == 2:
                    time.sleep(1.0)  # into the second epoch
                    pid = max(w.pid for w in workers)
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    outcome = train(cfg)
    killer.join(timeout=5)
    assert killed, "no worker was killed: the test did not exercise recovery"
    # 256 images / (2 workers x 8) = 16 steps per epoch, 3 epochs, each epoch once
    assert [h["epoch"] for h in outcome.history] == [0, 1, 2]
    assert [h["step"] for h in outcome.history] == [16, 32, 48]
    assert outcome.history[0]["attempt"] == 1 and outcome.history[-1]["attempt"] == 2
