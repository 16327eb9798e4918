"""The Ray Train worker loop (``train_loop_per_worker``): the XE and SCST phases (frozen, then
fine-tuned), validated every epoch.

Every worker rebuilds typed objects from the plain-dict loop config, trains on its dataset shard
under DDP, decodes its slice of the validation images, and all workers agree on val CIDEr-D.
Rank 0 writes the checkpoint; every rank reports the same metrics. Checkpoints come at every
epoch end and, with ``exp.checkpoint_every_steps``, inside epochs. A run with a checkpoint
(Ray's ``get_checkpoint``, e.g. after a worker failure or a rerun with ``exp.resume=True``)
continues where it was written, with the saved optimiser, scheduler and RNG states; from a
mid-epoch checkpoint it skips the batches of that epoch it already trained on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from hericap.checkpoint import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    save_checkpoint,
)
from hericap.config.loader import from_dict
from hericap.data.text import Vocabulary
from hericap.data.transforms import (
    ResizeSpec,
    crop_batch,
    load_image,
    normalize_images,
    resize_spec,
    resize_to_canvas,
)
from hericap.evaluation.coco_metrics import cider_d
from hericap.evaluation.inference import caption_batch
from hericap.log import setup_logging
from hericap.models.builder import build_captioner, format_parameter_summary
from hericap.models.weights import load_state_dict_strict
from hericap.training.optim import build_optimizer, constant_lr, warmup_cosine
from hericap.training.phases import Phase, configured_phases, phase_at
from hericap.training.scst import CiderReward, make_scst_decoder, scst_step
from hericap.training.xe import pick_captions, xe_loss

__all__ = ["train_loop_per_worker"]

logger = logging.getLogger("hericap.train")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _rng_state() -> dict[str, Any]:
    """RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _iter_val_slice(
    files: list[str],
    references: dict[str, list[str]],
    resize: ResizeSpec,
    batch_size: int,
    rank: int,
    world: int,
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """This rank's val images (``crc32(image_id) % world == rank``), decoded, in batches.

    Read straight from the shards: validation is small, and a Ray Data pipeline per worker per
    epoch costs more to start than decoding a few hundred images.
    """
    ids: list[str] = []
    images: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    for f in files:
        table = pq.read_table(f, columns=["image_id", "image"])
        for image_id, data in zip(
            table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True
        ):
            if image_id not in references or zlib.crc32(image_id.encode()) % world != rank:
                continue
            canvas, size = resize_to_canvas(load_image(data), resize)
            ids.append(image_id)
            images.append(canvas)
            sizes.append(size)
            if len(ids) == batch_size:
                yield ids, np.stack(images), np.asarray(sizes)
                ids, images, sizes = [], [], []
    if ids:
        yield ids, np.stack(images), np.asarray(sizes)


def _validate(
    model: nn.Module,
    files: list[str],
    references: dict[str, list[str]],
    vocab: Vocabulary,
    resize: ResizeSpec,
    beam_size: int,
    max_len: int,
    batch_size: int,
    device: torch.device,
    rank: int,
    world: int,
) -> tuple[float, int]:
    """Decode this rank's slice of the val images; all ranks return the same CIDEr-D."""
    net = _unwrap(model)
    net.eval()
    mine: list[tuple[str, str]] = []
    for ids, images, sizes in _iter_val_slice(files, references, resize, batch_size, rank, world):
        captions = caption_batch(
            net, vocab, images, beam_size, max_len, device=device, image_hw=sizes
        )
        mine.extend(zip(ids, captions, strict=True))
    gathered: list[list[tuple[str, str]]] = [mine]
    if world > 1:
        gathered = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
    candidates = dict(pair for part in gathered for pair in part)
    if set(candidates) != set(references):
        missing = sorted(set(references) - set(candidates))[:5]
        raise RuntimeError(
            f"validation decoded {len(candidates)} of {len(references)} images; "
            f"missing e.g. {missing}"
        )
    net.train()
    return cider_d(references, candidates), len(candidates)


def _learning_rates(optimizer: torch.optim.Optimizer) -> tuple[float, float | None]:
    """(head LR, backbone LR; None while the backbone is frozen) from the named groups."""
    lrs = {g["name"].split("_")[0]: g["lr"] for g in optimizer.param_groups}
    return lrs["head"], lrs.get("backbone")


def _autocast(device: torch.device, mode: str):
    """bf16 autocast per ``exp.mixed_precision``: ``auto`` (bf16 on GPU, off on CPU), ``bf16``
    or ``no``."""
    enabled = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: ``loop_config`` holds ``config`` (dict), ``vocab`` (dict),
    ``val_files`` (shard paths), ``val_references`` ({image_id: captions}: the val images),
    ``train_references`` (the SCST reward corpus) and ``batches_per_epoch`` (per worker, a
    multiple of ``optimizer.grad_accum_steps``)."""
    setup_logging()
    cfg = from_dict(loop_config["config"])
    vocab = Vocabulary.from_dict(loop_config["vocab"])
    references: dict[str, list[str]] = loop_config["val_references"]
    batches_per_epoch: int = loop_config["batches_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    opt_cfg = cfg.optimizer
    torch.set_num_threads(cfg.exp.torch_threads or max(1, int(cfg.exp.cpus_per_worker)))
    phases = configured_phases(opt_cfg)
    epochs = phases[-1].end_epoch
    accum = opt_cfg.grad_accum_steps
    updates_per_epoch = batches_per_epoch // accum

    torch.manual_seed(cfg.exp.seed)  # identical initial weights on every rank
    resize = resize_spec(cfg.dataset)
    net = build_captioner(cfg.model, len(vocab), resize.model_size)
    if rank == 0:
        logger.info("model: memories %s; %s", net.memory_names, format_parameter_summary(net))
    device = ray.train.torch.get_device()

    def wrap(phase: Phase) -> nn.Module:
        """Freeze or unfreeze the backbone for ``phase``, then wrap for DDP: DDP tracks the
        parameters that require gradients when it is built, so a change means a new wrapper."""
        net.freeze_backbone(phase.frozen)
        return ray.train.torch.prepare_model(net)

    def make_optimizer(phase: Phase):
        """XE: AdamW with warm-up and cosine decay over the phase; SCST: constant LR (the
        paper: 5e-6)."""
        xe = phase.kind == "xe"
        opt = build_optimizer(
            net,
            lr=opt_cfg.xe_lr if xe else opt_cfg.sc_lr,
            backbone_lr=opt_cfg.xe_backbone_lr if xe else opt_cfg.sc_backbone_lr,
            weight_decay=opt_cfg.weight_decay,
            betas=(opt_cfg.beta_1, opt_cfg.beta_2),
        )
        if not xe:
            return opt, constant_lr(opt)
        total = phase.epochs * updates_per_epoch
        if opt_cfg.max_steps:
            total = min(total, opt_cfg.max_steps)
        return opt, warmup_cosine(opt, opt_cfg.warmup_steps, total, opt_cfg.min_lr_ratio)

    start_epoch, step = 0, 0
    # a mid-epoch checkpoint's position and running sums inside its epoch
    progress: dict[str, Any] | None = None
    history: list[dict[str, Any]] = []  # every epoch's metrics, carried in each checkpoint
    step_log: list[dict[str, Any]] = []  # every log_every_steps-th update, likewise
    train_state: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
            load_state_dict_strict(net, state, what=f"checkpoint {d}")
            train_state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            meta = json.loads((Path(d) / META_FILE).read_text())
            history, step_log = meta.get("history", []), meta.get("steps", [])
        _set_rng_state(train_state["rng"][min(rank, len(train_state["rng"]) - 1)])
        progress = train_state.get("epoch_progress")
        start_epoch = train_state["epoch"] + (0 if progress else 1)
        step = train_state["step"]
        attempt = train_state.get("attempt", 1) + 1
        if rank == 0:
            logger.info(
                "attempt %d: resumed at epoch %d%s, step %d",
                attempt,
                start_epoch + 1,
                f" after {progress['batches']} batches" if progress else "",
                step,
            )
    else:
        attempt = 1
        random.seed(cfg.exp.seed + rank)
        np.random.seed(cfg.exp.seed + rank)
    if start_epoch >= epochs:
        if rank == 0:
            logger.info("the checkpoint already covers all %d epochs: nothing to train", epochs)
        return
    phase = phase_at(phases, start_epoch)
    model = wrap(phase)
    optimizer, scheduler = make_optimizer(phase)
    if train_state is not None:
        if train_state.get("phase") == phase.name:
            optimizer.load_state_dict(train_state["optimizer"])
            scheduler.load_state_dict(train_state["scheduler"])
        elif rank == 0:
            logger.info(
                "checkpoint ended phase %s; starting %s with a fresh optimiser",
                train_state.get("phase"),
                phase.name,
            )
    reward = scst_decode = None

    caption_rng = random.Random()
    train_iter = ray.train.get_dataset_shard("train")
    k = opt_cfg.captions_per_image
    log_every = max(1, cfg.exp.log_every_steps)
    run_start = time.time()
    last_epoch = epochs
    if cfg.exp.epochs_per_run:
        last_epoch = min(epochs, start_epoch + cfg.exp.epochs_per_run)
    stop_step = step + cfg.exp.steps_per_run if cfg.exp.steps_per_run else None
    every = cfg.exp.checkpoint_every_steps

    def checkpoint_and_report(metrics: dict[str, Any], state: dict[str, Any]) -> None:
        """Every rank reports ``metrics``; rank 0 also writes the checkpoint (model, optimiser,
        scheduler, every rank's RNG state and ``state``)."""
        rng_states = [_rng_state()]
        if world > 1:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, _rng_state())
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(
                tmp,
                net,
                cfg,
                vocab,
                meta={**metrics, "history": history, "steps": step_log},
                training_state={
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_states,
                    "step": step,
                    "phase": phase.name,
                    "attempt": attempt,
                    **state,
                },
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    for epoch in range(start_epoch, last_epoch):
        if epoch >= phase.end_epoch:  # next phase: new optimiser, maybe (un)frozen backbone
            previous, phase = phase, phase_at(phases, epoch)
            if phase.frozen != previous.frozen:
                del model
                model = wrap(phase)
            optimizer, scheduler = make_optimizer(phase)
            if rank == 0:
                logger.info(
                    "phase %s (%d epochs) starts at epoch %d", phase.name, phase.epochs, epoch + 1
                )
        if phase.kind == "sc" and reward is None:
            reward = CiderReward(
                loop_config["train_references"], vocab, include_eos=opt_cfg.sc_include_eos
            )
            scst_decode = make_scst_decoder(
                opt_cfg.sc_baseline,
                opt_cfg.sc_num_sequences,
                cfg.decode.max_len,
                vocab.bos_idx,
                vocab.eos_idx,
                vocab.pad_idx,
            )
        caption_rng.seed(f"{cfg.exp.seed}/{rank}/{epoch}")
        model.train()
        t0, loss_sum, reward_sum, n_batches, n_updates = time.time(), 0.0, 0.0, 0, 0
        skip = 0  # batches of this epoch trained before the mid-epoch checkpoint resumed from
        if progress is not None and epoch == start_epoch:
            skip = n_batches = progress["batches"]
            n_updates, loss_sum, reward_sum = progress["updates"], *progress["sums"]
            t0 -= progress["train_s"]
            caption_rng.setstate(progress["caption_rng"])
        stopping = False
        optimizer.zero_grad(set_to_none=True)
        for batch in train_iter.iter_batches(
            batch_size=opt_cfg.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=cfg.dataset.local_shuffle_buffer or None,
            local_shuffle_seed=cfg.exp.seed * 1000 + epoch * world + rank,
        ):
            if skip:  # the same order as before (exp.deterministic): exact resume
                skip -= 1
                continue
            if n_batches >= batches_per_epoch or (opt_cfg.max_steps and step >= opt_cfg.max_steps):
                break
            images = normalize_images(
                crop_batch(batch["image"], batch.get("image_hw"), net.input_multiple),
                device,
            )
            update = (n_batches + 1) % accum == 0
            # no gradient all-reduce on the accumulation batches, only on the update's
            sync = model.no_sync() if world > 1 and not update else contextlib.nullcontext()
            with sync:
                with _autocast(device, cfg.exp.mixed_precision):
                    if phase.kind == "xe":
                        tokens = vocab.encode_batch(
                            pick_captions(batch["captions"], k, caption_rng),
                            max_len=cfg.dataset.max_caption_len,
                        ).to(device)
                        log_probs = model(images, tokens[:, :-1], captions_per_image=k)
                        loss = xe_loss(
                            log_probs.float(), tokens[:, 1:], vocab.pad_idx, opt_cfg.label_smoothing
                        )
                    else:
                        loss, mean_reward = scst_step(
                            model,
                            images,
                            batch["image_id"],
                            reward,
                            scst_decode,
                            opt_cfg.sc_baseline,
                            vocab.eos_idx,
                        )
                        reward_sum += mean_reward
                (loss / accum).backward()
            n_batches += 1
            loss_sum += loss.item()
            if not update:
                continue
            grad_norm = (
                float(nn.utils.clip_grad_norm_(net.parameters(), opt_cfg.grad_clip))
                if opt_cfg.grad_clip
                else None
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_updates += 1
            lr, lr_backbone = _learning_rates(optimizer)
            if rank == 0 and step % log_every == 0:
                step_log.append(
                    {
                        "step": step,
                        "epoch": epoch,
                        "phase": phase.name,
                        "loss": loss.item(),
                        "lr": lr,
                        "lr_backbone": lr_backbone,
                        **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                        **({"reward": mean_reward} if phase.kind == "sc" else {}),
                        "elapsed_s": time.time() - run_start,
                    }
                )
            if rank == 0 and n_updates % 50 == 0:
                logger.info(
                    "%s epoch %d/%d step %d/%d loss %.3f%s lr %.2e elapsed %.0fs",
                    phase.name,
                    epoch + 1,
                    epochs,
                    n_updates,
                    updates_per_epoch,
                    loss_sum / n_batches,
                    f" reward {reward_sum / n_batches:.3f}" if phase.kind == "sc" else "",
                    lr,
                    time.time() - run_start,
                )
            stopping = stop_step is not None and step >= stop_step
            if stopping and rank == 0:
                logger.info("stopping at step %d (exp.steps_per_run); resume to go on", step)
            if n_batches < batches_per_epoch and ((every and step % every == 0) or stopping):
                # inside the epoch (its end has its own checkpoint, with val scores)
                checkpoint_and_report(
                    {
                        "phase": phase.kind,
                        "phase_name": phase.name,
                        "epoch": epoch,
                        "step": step,
                        "mid_epoch": True,
                        "train_loss": loss_sum / n_batches,
                        "attempt": attempt,
                    },
                    {
                        "epoch": epoch,
                        "epoch_progress": {
                            "batches": n_batches,
                            "updates": n_updates,
                            "sums": (loss_sum, reward_sum),
                            "train_s": time.time() - t0,
                            "caption_rng": caption_rng.getstate(),
                        },
                    },
                )
            if stopping:
                break
        if stopping and n_batches < batches_per_epoch:
            return
        train_time = time.time() - t0
        steps_min = steps_max = n_updates  # per-worker updates: equal when the shards are even
        if world > 1:  # every rank reports the same mean train loss and reward
            totals = torch.tensor([loss_sum, reward_sum, float(n_batches)], dtype=torch.float64)
            dist.all_reduce(totals)
            loss_sum, reward_sum, loss_batches = totals.tolist()
            spread = torch.tensor([n_updates, -n_updates], dtype=torch.int64)
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
            steps_max, steps_min = int(spread[0]), -int(spread[1])
        else:
            loss_batches = n_batches
        val_cider, n_val = _validate(
            model,
            loop_config["val_files"],
            references,
            vocab,
            resize,
            cfg.decode.val_beam_size,
            cfg.decode.max_len,
            cfg.decode.batch_size,
            device,
            rank,
            world,
        )
        lr, lr_backbone = _learning_rates(optimizer)
        metrics = {
            "phase": phase.kind,
            "phase_name": phase.name,
            "frozen_backbone": phase.frozen,
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / max(1.0, loss_batches),
            "val_CIDEr": val_cider,
            "val_images": n_val,
            "worker_steps_min": steps_min,
            "worker_steps_max": steps_max,
            "lr": lr,
            "lr_backbone": lr_backbone,
            **(
                {
                    "train_reward": reward_sum / max(1.0, loss_batches),
                    "sc_baseline": opt_cfg.sc_baseline,
                    "sc_include_eos": opt_cfg.sc_include_eos,
                }
                if phase.kind == "sc"
                else {}
            ),
            # worker-group starts so far: 1 + resumes after failures or exp.resume
            "attempt": attempt,
            "epoch_train_s": train_time,
            "epoch_s": time.time() - t0,
        }
        history.append(metrics)
        if rank == 0:
            logger.info(
                "%s epoch %d/%d done: loss %.3f val CIDEr %.3f (%d images) train %.0fs total %.0fs",
                phase.name,
                epoch + 1,
                epochs,
                metrics["train_loss"],
                val_cider,
                n_val,
                train_time,
                time.time() - run_start,
            )
        checkpoint_and_report(metrics, {"epoch": epoch})
        if stopping or (opt_cfg.max_steps and step >= opt_cfg.max_steps):
            break
