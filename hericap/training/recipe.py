"""The training recipe one Ray Train worker runs: XE and SCST phases (frozen, then fine-tuned),
validated every epoch, checkpointed by rank 0, reported by every rank.

Read it top-down like a torchtune recipe: :meth:`CaptionRecipe.setup` builds the model, restores a
checkpoint, wraps the model for DDP and makes the optimiser; :meth:`CaptionRecipe.train` runs the
epochs; each epoch runs XE or SCST steps, then :meth:`CaptionRecipe.validate`, then
:meth:`CaptionRecipe.save_checkpoint` (which also reports). A run with a checkpoint (Ray's
``get_checkpoint``: a worker failure or ``exp.resume=True``) continues where it was written, with
the saved optimiser, scheduler and RNG states; from a mid-epoch checkpoint it skips the batches of
that epoch it already trained on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from hericap.checkpoint import META_FILE, MODEL_FILE, STATE_FILE
from hericap.checkpoint import save_checkpoint as write_checkpoint_folder
from hericap.checkpoint.folder import read_model_state
from hericap.config.loader import from_dict, to_dict
from hericap.data.text import Vocabulary
from hericap.data.transforms import prepare_batch, resize_spec
from hericap.evaluation.diversity import DIVERSITY_KEYS, collapse_warning
from hericap.models.builder import build_captioner, decode_controls, format_parameter_summary
from hericap.models.weights import load_state_dict_strict
from hericap.training.ema import WeightEma, checkpoint_weights, restore_weights
from hericap.training.optim import build_optimizer, constant_lr, warmup_cosine, warmup_length
from hericap.training.phases import Phase, configured_phases, phase_at
from hericap.training.rng import get_rng_state, seed_everything, set_rng_state
from hericap.training.scst import CiderReward, make_scst_decoder, scst_step
from hericap.training.tracking import MlflowRun, flat_params, numeric_metrics, uses_mlflow
from hericap.training.validation import ValidationResult, validate
from hericap.training.xe import pick_captions, xe_loss

__all__ = ["CaptionRecipe", "EpochState"]

logger = logging.getLogger(__name__)

# Rank 0 logs a progress line every this many optimiser steps of an epoch.
PROGRESS_EVERY_STEPS = 50
# Local shuffle seeds: seed * SHUFFLE_SEED_STRIDE + epoch * world + rank, distinct per epoch/rank.
SHUFFLE_SEED_STRIDE = 1000


@dataclass
class EpochState:
    """Where an epoch is: batches and optimiser updates done, running sums, its start time, and
    (when resumed mid-epoch) how many batches to skip."""

    epoch: int
    start: float = field(default_factory=time.time)
    batches: int = 0
    updates: int = 0
    loss_sum: float = 0.0
    reward_sum: float = 0.0
    skip: int = 0
    last_reward: float | None = None

    def progress(self, caption_rng: random.Random) -> dict[str, Any]:
        """What a mid-epoch checkpoint stores to continue this epoch exactly."""
        return {
            "batches": self.batches,
            "updates": self.updates,
            "sums": (self.loss_sum, self.reward_sum),
            "train_s": time.time() - self.start,
            "caption_rng": caption_rng.getstate(),
        }

    @classmethod
    def resumed(cls, epoch: int, progress: dict[str, Any]) -> EpochState:
        loss_sum, reward_sum = progress["sums"]
        return cls(
            epoch=epoch,
            start=time.time() - progress["train_s"],
            batches=progress["batches"],
            updates=progress["updates"],
            loss_sum=loss_sum,
            reward_sum=reward_sum,
            skip=progress["batches"],
        )


def _autocast(device: torch.device, mode: str):
    """bf16 autocast per ``exp.mixed_precision``: ``auto`` (bf16 on GPU, off on CPU), ``bf16``
    or ``no``."""
    enabled = mode == "bf16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _learning_rates(optimizer: torch.optim.Optimizer) -> tuple[float, float | None]:
    """(head LR, backbone LR; None while the backbone is frozen) from the named groups."""
    lrs = {g["name"].split("_")[0]: g["lr"] for g in optimizer.param_groups}
    return lrs["head"], lrs.get("backbone")


class CaptionRecipe:
    """One worker's training run.

    Args:
        loop_config: what the driver passes to every worker: ``config`` (dict), ``vocab``
            (dict), ``val_files`` (shard locations), ``val_references`` ({image_id: captions}),
            ``train_references`` (the SCST reward corpus), ``train_fingerprints`` (the train
            captions, for the val captions' ``novel_share``) and ``batches_per_epoch`` (per
            worker, a multiple of ``optimizer.grad_accum_steps``).
    """

    def __init__(self, loop_config: dict[str, Any]) -> None:
        self.cfg = from_dict(loop_config["config"])
        self.vocab = Vocabulary.from_dict(loop_config["vocab"])
        self.val_files: list[str] = loop_config["val_files"]
        self.val_references: dict[str, list[str]] = loop_config["val_references"]
        self.train_references: dict[str, list[str]] = loop_config["train_references"]
        self.train_fingerprints = loop_config.get("train_fingerprints")
        self.batches_per_epoch: int = loop_config["batches_per_epoch"]
        # the MLflow store, resolved by the driver (None: exp.tracking logs no MLflow run)
        self.tracking_uri: str | None = loop_config.get("tracking_uri")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.phases = configured_phases(self.cfg.optimizer)
        self.epochs = self.phases[-1].end_epoch
        self.accum = self.cfg.optimizer.grad_accum_steps
        self.updates_per_epoch = self.batches_per_epoch // self.accum
        self.resize = resize_spec(self.cfg.dataset)
        self.step = 0
        self.start_epoch = 0
        self.attempt = 1
        self.history: list[dict[str, Any]] = []  # every epoch's metrics, in each checkpoint
        self.step_log: list[dict[str, Any]] = []  # every log_every_steps-th update, likewise
        self.progress: dict[str, Any] | None = None  # a mid-epoch checkpoint's position
        self.caption_rng = random.Random()
        self.reward: CiderReward | None = None
        self.scst_decode = None
        self.ema: WeightEma | None = None  # optimizer.ema_decay > 0
        self.run_start = time.time()

    # ----------------------------------------------------------------- set-up
    def setup(self) -> bool:
        """Build the model, restore the run's checkpoint if there is one, wrap the model and
        make the optimiser. Returns False when the checkpoint already covers every epoch."""
        cfg = self.cfg
        torch.set_num_threads(cfg.exp.torch_threads or max(1, int(cfg.exp.cpus_per_worker)))
        self.device = ray.train.torch.get_device()
        self._setup_model()
        train_state = self._restore()
        if self.start_epoch >= self.epochs:
            self._log("the checkpoint already covers all %d epochs: nothing to train", self.epochs)
            return False
        self.phase = phase_at(self.phases, self.start_epoch)
        self.model = self._wrap(self.phase)
        self._setup_optimizer(self.phase, train_state)
        self._setup_data()
        self._setup_tracking(train_state)
        return True

    def _setup_tracking(self, train_state: dict[str, Any] | None) -> None:
        """Rank 0 opens the run's MLflow run (``exp.tracking``), or continues it on resume."""
        self.tracker: MlflowRun | None = None
        if self.rank != 0 or not uses_mlflow(self.cfg.exp.tracking):
            return
        run_id = (train_state or {}).get("mlflow_run_id")
        name = self.cfg.exp.name
        self.tracker = MlflowRun(self.tracking_uri, experiment=name, run_name=name, run_id=run_id)
        if run_id is None:
            self.tracker.log_params(flat_params(to_dict(self.cfg)))

    def _setup_model(self) -> None:
        torch.manual_seed(self.cfg.exp.seed)  # identical initial weights on every rank
        # a run that restores a checkpoint, or starts from one's weights (exp.checkpoint), takes
        # every weight from it: the backbone / detector files are not read (they need not exist
        # where it runs)
        self.net = build_captioner(
            self.cfg.model,
            len(self.vocab),
            self.resize.model_size,
            load_pretrained=ray.train.get_checkpoint() is None and not self.cfg.exp.checkpoint,
        )
        if self.cfg.optimizer.ema_decay > 0:
            self.ema = WeightEma(self.net, self.cfg.optimizer.ema_decay)
        summary = format_parameter_summary(self.net)
        nodes = [ray.get_runtime_context().get_node_id()]
        if self.world > 1:
            nodes = [None] * self.world
            dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        self.worker_nodes = len(set(nodes))
        self._log(
            "model: memories %s; %s; %d workers on %d node(s)",
            self.net.memory_names,
            summary,
            self.world,
            self.worker_nodes,
        )

    def _restore(self) -> dict[str, Any] | None:
        """Load the run's latest checkpoint (weights, history, RNG, position), if any."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            seed_everything(self.cfg.exp.seed + self.rank)
            if self.cfg.exp.checkpoint:  # a fresh run from another checkpoint's weights
                state = read_model_state(self.cfg.exp.checkpoint)
                load_state_dict_strict(
                    self.net, state, what=f"exp.checkpoint={self.cfg.exp.checkpoint}"
                )
                if self.ema is not None:  # the average starts at the weights training starts at
                    self.ema.load(self.net.state_dict(), 0)
                self._log("initialised from the weights of %s", self.cfg.exp.checkpoint)
            return None
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
            train_state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            restore_weights(
                self.net,
                self.ema,
                state,
                train_state,
                lambda model, weights: load_state_dict_strict(
                    model, weights, what=f"checkpoint {d}"
                ),
            )
            meta = json.loads((Path(d) / META_FILE).read_text())
        self.history, self.step_log = meta.get("history", []), meta.get("steps", [])
        rng = train_state["rng"]
        set_rng_state(rng[min(self.rank, len(rng) - 1)])
        self.progress = train_state.get("epoch_progress")
        self.start_epoch = train_state["epoch"] + (0 if self.progress else 1)
        self.step = train_state["step"]
        self.attempt = train_state.get("attempt", 1) + 1
        after = f" after {self.progress['batches']} batches" if self.progress else ""
        self._log(
            "attempt %d: resumed at epoch %d%s, step %d",
            self.attempt,
            self.start_epoch + 1,
            after,
            self.step,
        )
        return train_state

    def _wrap(self, phase: Phase) -> nn.Module:
        """Freeze or unfreeze the backbone for ``phase``, then wrap for DDP: DDP tracks the
        parameters that require gradients when it is built, so a change means a new wrapper."""
        self.net.freeze_backbone(phase.frozen)
        return ray.train.torch.prepare_model(self.net)

    def _setup_optimizer(self, phase: Phase, train_state: dict[str, Any] | None = None) -> None:
        """XE: AdamW with warm-up and cosine decay over the phase; SCST: constant LR (the
        paper: 5e-6). The checkpoint's optimiser and scheduler states are restored when it was
        written in this same phase."""
        opt = self.cfg.optimizer
        xe = phase.kind == "xe"
        self.optimizer = build_optimizer(
            self.net,
            lr=opt.xe_lr if xe else opt.sc_lr,
            backbone_lr=opt.xe_backbone_lr if xe else opt.sc_backbone_lr,
            weight_decay=opt.weight_decay,
            betas=(opt.beta_1, opt.beta_2),
        )
        if xe:
            total = phase.epochs * self.updates_per_epoch
            if opt.max_steps:
                total = min(total, opt.max_steps)
            warmup = warmup_length(opt.warmup_steps, opt.warmup_epochs, self.updates_per_epoch)
            self.scheduler = warmup_cosine(self.optimizer, warmup, total, opt.min_lr_ratio)
        else:
            self.scheduler = constant_lr(self.optimizer)
        if train_state is None:
            return
        if train_state.get("phase") == phase.name:
            self.optimizer.load_state_dict(train_state["optimizer"])
            self.scheduler.load_state_dict(train_state["scheduler"])
        else:
            self._log(
                "checkpoint ended phase %s; starting %s with a fresh optimiser",
                train_state.get("phase"),
                phase.name,
            )

    def _setup_data(self) -> None:
        self.train_iter = ray.train.get_dataset_shard("train")

    def _setup_scst(self) -> None:
        """The CIDEr-D reward and the SCST decoder, built when the first SCST epoch starts."""
        opt = self.cfg.optimizer
        self.reward = CiderReward(self.train_references, self.vocab, include_eos=opt.sc_include_eos)
        self.scst_decode = make_scst_decoder(
            opt.sc_baseline,
            opt.sc_num_sequences,
            self.cfg.decode.max_len,
            self.vocab.bos_idx,
            self.vocab.eos_idx,
            self.vocab.pad_idx,
            top_k=self.cfg.decode.top_k,
            top_p=self.cfg.decode.top_p,
        )

    # ----------------------------------------------------------------- training
    def train(self) -> None:
        """Run the remaining epochs (or as many as ``exp.epochs_per_run`` / ``steps_per_run``
        allow in this invocation)."""
        exp = self.cfg.exp
        last_epoch = self.epochs
        if exp.epochs_per_run:
            last_epoch = min(self.epochs, self.start_epoch + exp.epochs_per_run)
        self.stop_step = self.step + exp.steps_per_run if exp.steps_per_run else None
        for epoch in range(self.start_epoch, last_epoch):
            self._enter_phase(epoch)
            state, stopped = self._run_epoch(epoch)
            if stopped and state.batches < self.batches_per_epoch:
                return  # a mid-epoch stop: its checkpoint is written
            self._end_epoch(state)
            max_steps = self.cfg.optimizer.max_steps
            if stopped or (max_steps and self.step >= max_steps):
                break

    def _enter_phase(self, epoch: int) -> None:
        """At a phase boundary: a new optimiser, and a new DDP wrapper when the backbone's
        freezing changes; the SCST reward when SCST starts."""
        if epoch >= self.phase.end_epoch:
            previous, self.phase = self.phase, phase_at(self.phases, epoch)
            if self.phase.frozen != previous.frozen:
                del self.model
                self.model = self._wrap(self.phase)
            self._setup_optimizer(self.phase)
            self._log(
                "phase %s (%d epochs) starts at epoch %d",
                self.phase.name,
                self.phase.epochs,
                epoch + 1,
            )
        if self.phase.kind == "sc" and self.reward is None:
            self._setup_scst()

    def _batches(self, epoch: int):
        cfg = self.cfg
        return self.train_iter.iter_batches(
            batch_size=cfg.optimizer.batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=cfg.dataset.local_shuffle_buffer or None,
            local_shuffle_seed=cfg.exp.seed * SHUFFLE_SEED_STRIDE + epoch * self.world + self.rank,
        )

    def _run_epoch(self, epoch: int) -> tuple[EpochState, bool]:
        """Train one epoch; returns its state and whether the run stops here
        (``exp.steps_per_run``)."""
        self.caption_rng.seed(f"{self.cfg.exp.seed}/{self.rank}/{epoch}")
        self.model.train()
        state = EpochState(epoch)
        if self.progress is not None and epoch == self.start_epoch:
            state = EpochState.resumed(epoch, self.progress)
            self.caption_rng.setstate(self.progress["caption_rng"])
        max_steps = self.cfg.optimizer.max_steps
        self.optimizer.zero_grad(set_to_none=True)
        for batch in self._batches(epoch):
            if state.skip:  # the same order as before (exp.deterministic): exact resume
                state.skip -= 1
                continue
            if state.batches >= self.batches_per_epoch or (max_steps and self.step >= max_steps):
                break
            update = self._train_batch(batch, state)
            if not update:
                continue
            stopped = self.stop_step is not None and self.step >= self.stop_step
            if stopped:
                self._log("stopping at step %d (exp.steps_per_run); resume to go on", self.step)
            every = self.cfg.exp.checkpoint_every_steps
            if state.batches < self.batches_per_epoch and (
                (every and self.step % every == 0) or stopped
            ):
                self._mid_epoch_checkpoint(state)
            if stopped:
                return state, True
        return state, False

    def _train_batch(self, batch: dict[str, Any], state: EpochState) -> bool:
        """Forward and backward one batch (gradients accumulate); returns whether it completed an
        optimiser step."""
        images, image_hw = prepare_batch(
            batch["image"],
            batch.get("image_hw"),
            self.net.input_multiple,
            self.net.zero_padding,
            self.device,
        )
        update = (state.batches + 1) % self.accum == 0
        # no gradient all-reduce on the accumulation batches, only on the update's
        sync = self.model.no_sync() if self.world > 1 and not update else contextlib.nullcontext()
        with sync:
            with _autocast(self.device, self.cfg.exp.mixed_precision):
                if self.phase.kind == "xe":
                    loss = self._xe_loss(images, image_hw, batch["captions"])
                else:
                    loss, state.last_reward = self._scst_loss(images, image_hw, batch["image_id"])
                    state.reward_sum += state.last_reward
            (loss / self.accum).backward()
        state.batches += 1
        state.loss_sum += loss.item()
        if not update:
            return False
        grad_norm = self._optimizer_step()
        state.updates += 1
        self._log_step(loss.item(), grad_norm, state)
        return True

    def _xe_loss(
        self, images: torch.Tensor, image_hw: torch.Tensor | None, captions: Any
    ) -> torch.Tensor:
        """Teacher-forced cross-entropy of ``captions_per_image`` captions per image."""
        opt = self.cfg.optimizer
        k = opt.captions_per_image
        tokens = self.vocab.encode_batch(
            pick_captions(captions, k, self.caption_rng),
            max_len=self.cfg.dataset.max_caption_len,
        ).to(self.device)
        log_probs = self.model(images, tokens[:, :-1], captions_per_image=k, image_hw=image_hw)
        return xe_loss(log_probs.float(), tokens[:, 1:], self.vocab.pad_idx, opt.label_smoothing)

    def _scst_loss(
        self, images: torch.Tensor, image_hw: torch.Tensor | None, image_ids: Any
    ) -> tuple[torch.Tensor, float]:
        """The self-critical loss and the batch's mean reward."""
        return scst_step(
            self.model,
            images,
            image_ids,
            self.reward,
            self.scst_decode,
            self.cfg.optimizer.sc_baseline,
            self.vocab.eos_idx,
            image_hw=image_hw,
        )

    def _optimizer_step(self) -> float | None:
        """Clip, step the optimiser and the schedule; returns the gradient norm (None without
        clipping)."""
        clip = self.cfg.optimizer.grad_clip
        grad_norm = float(nn.utils.clip_grad_norm_(self.net.parameters(), clip)) if clip else None
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.net)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm

    def _log_step(self, loss: float, grad_norm: float | None, state: EpochState) -> None:
        """Rank 0 keeps every ``exp.log_every_steps``-th step and logs progress now and then."""
        if self.rank != 0:
            return
        lr, lr_backbone = _learning_rates(self.optimizer)
        sc = self.phase.kind == "sc"
        if self.step % max(1, self.cfg.exp.log_every_steps) == 0:
            entry = {
                "step": self.step,
                "epoch": state.epoch,
                "phase": self.phase.name,
                "loss": loss,
                "lr": lr,
                "lr_backbone": lr_backbone,
                **({"grad_norm": grad_norm} if grad_norm is not None else {}),
                **({"reward": state.last_reward} if sc else {}),
                "elapsed_s": time.time() - self.run_start,
            }
            self.step_log.append(entry)
            if self.tracker is not None:
                logged = {k: v for k, v in entry.items() if k not in ("step", "epoch")}
                self.tracker.log_metrics(numeric_metrics(logged, "step/"), self.step)
        if state.updates % PROGRESS_EVERY_STEPS == 0:
            logger.info(
                "%s epoch %d/%d step %d/%d loss %.3f%s lr %.2e elapsed %.0fs",
                self.phase.name,
                state.epoch + 1,
                self.epochs,
                state.updates,
                self.updates_per_epoch,
                state.loss_sum / state.batches,
                f" reward {state.reward_sum / state.batches:.3f}" if sc else "",
                lr,
                time.time() - self.run_start,
            )

    # ----------------------------------------------------------------- epoch end
    def _end_epoch(self, state: EpochState) -> None:
        """Agree on the epoch's sums, validate, record and checkpoint."""
        train_time = time.time() - state.start
        sums = self._reduce(state)
        val = self.validate()
        metrics = self._epoch_metrics(state, sums, val, train_time)
        self.history.append(metrics)
        if self.tracker is not None:
            self.tracker.log_metrics(numeric_metrics(metrics, "epoch/"), self.step)
        self._log(
            "%s epoch %d/%d done: loss %.3f val CIDEr %.3f (%d images, %.0f%% distinct "
            "captions) train %.0fs total %.0fs",
            self.phase.name,
            state.epoch + 1,
            self.epochs,
            metrics["train_loss"],
            val.cider,
            val.images,
            100 * val.diversity["unique_share"],
            train_time,
            time.time() - self.run_start,
        )
        warning = collapse_warning(
            val.diversity,
            f"val, {self.phase.name} epoch {state.epoch + 1}",
            scst=self.phase.kind == "sc",
        )
        if warning and self.rank == 0:
            logger.warning("%s", warning)
        self.save_checkpoint(metrics, {"epoch": state.epoch})

    def _sampling_record(self) -> dict[str, Any]:
        """``sc_top_k`` / ``sc_top_p`` when SCST samples (leave_one_out, greedy baselines)."""
        if self.cfg.optimizer.sc_baseline == "beam_mean":
            return {}
        return {"sc_top_k": self.cfg.decode.top_k, "sc_top_p": self.cfg.decode.top_p}

    def _epoch_metrics(
        self,
        state: EpochState,
        sums: tuple[float, float, float, int, int],
        val: ValidationResult,
        train_time: float,
    ) -> dict[str, Any]:
        """What every epoch reports (and its checkpoint's meta.json records)."""
        loss_sum, reward_sum, batches, steps_min, steps_max = sums
        lr, lr_backbone = _learning_rates(self.optimizer)
        opt = self.cfg.optimizer
        return {
            "phase": self.phase.kind,
            "phase_name": self.phase.name,
            "frozen_backbone": self.phase.frozen,
            "epoch": state.epoch,
            "step": self.step,
            "train_loss": loss_sum / max(1.0, batches),
            "val_CIDEr": val.cider,
            "val_images": val.images,
            # how val was decoded: greedy or beam N, and the decode.* controls set
            "val_decode": decode_controls(self.cfg.decode).describe(self.cfg.decode.val_beam_size),
            # the weights validated (and kept when best): the moving average when > 0
            "ema_decay": opt.ema_decay,
            **{f"val_{k}": val.diversity[k] for k in DIVERSITY_KEYS},
            "val_collapse": val.diversity["collapse"],
            "collapse_unique_share": val.diversity["collapse_unique_share"],
            "worker_steps_min": steps_min,
            "worker_steps_max": steps_max,
            "lr": lr,
            "lr_backbone": lr_backbone,
            **(
                {
                    "train_reward": reward_sum / max(1.0, batches),
                    "sc_baseline": opt.sc_baseline,
                    "sc_include_eos": opt.sc_include_eos,
                    # what the sampling baselines sample from (decode.top_k / top_p)
                    **self._sampling_record(),
                }
                if self.phase.kind == "sc"
                else {}
            ),
            # worker-group starts so far: 1 + resumes after failures or exp.resume
            "attempt": self.attempt,
            "worker_nodes": self.worker_nodes,
            "epoch_train_s": train_time,
            "epoch_s": time.time() - state.start,
        }

    def _reduce(self, state: EpochState) -> tuple[float, float, float, int, int]:
        """Every rank's (loss sum, reward sum, batches) summed, and the fewest and most updates
        any worker made (equal when the shards are even)."""
        if self.world == 1:
            return state.loss_sum, state.reward_sum, state.batches, state.updates, state.updates
        totals = torch.tensor(
            [state.loss_sum, state.reward_sum, float(state.batches)], dtype=torch.float64
        )
        dist.all_reduce(totals)
        spread = torch.tensor([state.updates, -state.updates], dtype=torch.int64)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        loss_sum, reward_sum, batches = totals.tolist()
        return loss_sum, reward_sum, batches, -int(spread[1]), int(spread[0])

    def validate(self) -> ValidationResult:
        """Val CIDEr-D and caption diversity of the current weights, or of their moving average
        when ``optimizer.ema_decay`` > 0 (every rank gets the same)."""
        decode = self.cfg.decode
        averaged = self.ema.swapped_in(self.net) if self.ema else contextlib.nullcontext()
        with averaged:
            return validate(
                self.net,
                self.val_files,
                self.val_references,
                self.vocab,
                self.resize,
                decode.val_beam_size,
                decode.max_len,
                decode.batch_size,
                self.device,
                self.rank,
                self.world,
                train_fingerprints=self.train_fingerprints,
                collapse_unique_share=self.cfg.evaluation.collapse_unique_share,
                controls=decode_controls(decode),
            )

    # ----------------------------------------------------------------- checkpoints
    def _mid_epoch_checkpoint(self, state: EpochState) -> None:
        self.save_checkpoint(
            {
                "phase": self.phase.kind,
                "phase_name": self.phase.name,
                "epoch": state.epoch,
                "step": self.step,
                "mid_epoch": True,
                "train_loss": state.loss_sum / state.batches,
                "ema_decay": self.cfg.optimizer.ema_decay,
                "attempt": self.attempt,
            },
            {"epoch": state.epoch, "epoch_progress": state.progress(self.caption_rng)},
        )

    def save_checkpoint(self, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        """Every rank reports ``metrics``; rank 0 also writes the checkpoint (model, optimiser,
        scheduler, every rank's RNG state and ``state``). With EMA, ``model.pt`` holds the moving
        average and the training state the raw weights (:func:`checkpoint_weights`)."""
        rng_states = [get_rng_state()]
        if self.world > 1:
            rng_states = [None] * self.world
            dist.all_gather_object(rng_states, get_rng_state())
        if self.rank != 0:
            ray.train.report(metrics)
            return
        weights, raw = checkpoint_weights(self.net, self.ema)
        # the MLflow run this checkpoint belongs to: a resume continues it, the driver adds the
        # artefacts to it
        tracked = {"mlflow_run_id": self.tracker.run_id} if self.tracker is not None else {}
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint_folder(
                tmp,
                weights,
                self.cfg,
                self.vocab,
                meta={**metrics, "history": self.history, "steps": self.step_log, **tracked},
                training_state={
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_states,
                    "step": self.step,
                    "phase": self.phase.name,
                    "attempt": self.attempt,
                    **tracked,
                    **raw,
                    **state,
                },
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def cleanup(self) -> None:
        """Release what the run holds (the DDP wrapper and the reward's tables)."""
        self.model = None
        self.reward = None
        if self.tracker is not None:
            self.tracker.end()

    def _log(self, message: str, *args: Any) -> None:
        """Log on rank 0 only."""
        if self.rank == 0:
            logger.info(message, *args)
