"""The schema's own checks: every value in range, every choice known, the fields that must agree
with each other (one function per config section). ``Config.validate`` runs them all; what needs
the model registries or the dataset readers is checked one layer up
(:func:`hericap.runtime.preflight.check_config`).

Each check raises ``ValueError`` naming the key, the value and what to set instead.
"""

from __future__ import annotations

import re
from typing import Any

from hericap.config.flavours import check_flavour
from hericap.config.schema import (
    AUGMENTATIONS,
    MIXED_PRECISION,
    RESIZE_MODES,
    SCST_BASELINES,
    SPLITS,
    TRACKING_MODES,
    Config,
    DatasetConfig,
    DecodeConfig,
    ExpConfig,
    ModelConfig,
    OptimizerConfig,
)

__all__ = ["check_all", "check_training"]
# exp.name is a folder name under exp.output_dir (and a Ray run name)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# numpy's global seed must stay below 2**32 after adding a worker's rank
MAX_SEED = 2**31 - 1


def _at_least(section: str, obj: Any, minimum: float, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value < minimum:
            raise ValueError(f"{section}.{key}={value} must be >= {minimum}")


def _fraction(section: str, obj: Any, *keys: str, closed: bool = False) -> None:
    """Values in [0, 1) (``closed``: [0, 1])."""
    for key in keys:
        value = getattr(obj, key)
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            bound = "]" if closed else ")"
            raise ValueError(f"{section}.{key}={value} must be in [0, 1{bound}")


def _choice(key: str, value: str, known: tuple[str, ...]) -> None:
    if value not in known:
        raise ValueError(f"{key}={value!r}; known: {list(known)}")


def check_exp(exp: ExpConfig) -> None:
    if not _NAME.fullmatch(exp.name):
        raise ValueError(
            f"exp.name={exp.name!r} must be a plain folder name (letters, digits, '.', '_', '-')"
        )
    if not 0 <= exp.seed <= MAX_SEED:
        raise ValueError(f"exp.seed={exp.seed} must be in [0, {MAX_SEED}]")
    _at_least("exp", exp, 1, "world_size", "log_every_steps")
    _at_least("exp", exp, 0, "ngpus_per_node", "torch_threads")
    _at_least("exp", exp, 0, "epochs_per_run", "steps_per_run", "checkpoint_every_steps")
    _at_least("exp", exp, -1, "max_failures")
    if exp.cpus_per_worker <= 0:
        raise ValueError(
            f"exp.cpus_per_worker={exp.cpus_per_worker} must be > 0 (fractions share a core)"
        )
    if exp.ray_num_cpus is not None and exp.ray_num_cpus < 1:
        raise ValueError(f"exp.ray_num_cpus={exp.ray_num_cpus} must be >= 1 (or null)")
    _choice("exp.mixed_precision", exp.mixed_precision, MIXED_PRECISION)
    _choice("exp.tracking", exp.tracking, TRACKING_MODES)
    if exp.resume and exp.overwrite:
        raise ValueError(
            "exp.resume=True continues the previous run and exp.overwrite=True deletes it: "
            "set one of them"
        )


def check_dataset(ds: DatasetConfig) -> None:
    _choice("dataset.resize", ds.resize, RESIZE_MODES)
    _choice("dataset.augment", ds.augment, AUGMENTATIONS)
    if min(ds.image_size, ds.min_size, ds.max_size) < 1 or ds.min_size > ds.max_size:
        raise ValueError(
            f"dataset.image_size={ds.image_size}, min_size={ds.min_size} and max_size="
            f"{ds.max_size} must be >= 1 with min_size <= max_size"
        )
    _at_least("dataset", ds, 1, "overfit_size", "vocab_min_count", "max_caption_len")
    _at_least("dataset", ds, 1, "shard_rows", "decode_batch_size")
    _at_least("dataset", ds, 0, "synthetic_train", "synthetic_val", "synthetic_test")
    _at_least("dataset", ds, 0, "synthetic_seed", "decode_concurrency", "cache_decoded_mb")
    _at_least("dataset", ds, 0, "local_shuffle_buffer", "max_val_images", "max_test_images")
    _at_least("dataset", ds, 0, "randaugment_ops")
    if not 0.0 <= ds.randaugment_magnitude <= 10.0:
        raise ValueError(
            f"dataset.randaugment_magnitude={ds.randaugment_magnitude} must be in [0, 10]"
        )
    if ds.name == "synthetic" and not (ds.synthetic_train and ds.synthetic_val):
        raise ValueError(
            "the synthetic dataset needs train and val images: dataset.synthetic_train="
            f"{ds.synthetic_train}, dataset.synthetic_val={ds.synthetic_val}"
        )


def _check_extractor(model: ModelConfig) -> int:
    """The extractor's keys; returns how many feature maps it gives."""
    ext = model.extractor
    if not ext.depths or len(ext.depths) != len(ext.num_heads):
        raise ValueError(
            f"model.extractor.depths={ext.depths} and model.extractor.num_heads="
            f"{ext.num_heads} must have the same, non-zero length (one entry per Swin stage)"
        )
    if min(ext.depths) < 1 or min(ext.num_heads) < 1:
        raise ValueError(
            f"model.extractor.depths={ext.depths} and num_heads={ext.num_heads} must be >= 1"
        )
    _at_least("model.extractor", ext, 1, "patch_size", "embed_dim", "window_size")
    _at_least("model.extractor", ext, 0, "extra_stage_dim")
    for stage, heads in enumerate(ext.num_heads):
        channels = ext.embed_dim * 2**stage
        if channels % heads:
            raise ValueError(
                f"Swin stage {stage} has {channels} channels (model.extractor.embed_dim="
                f"{ext.embed_dim} x 2^{stage}), not divisible by its num_heads={heads}"
            )
    if not -1 <= model.frozen_stages <= len(ext.depths):
        raise ValueError(
            f"model.frozen_stages={model.frozen_stages} must be in [-1, {len(ext.depths)}] "
            f"(-1: nothing frozen; N: the patch embedding and the first N of the "
            f"{len(ext.depths)} stages)"
        )
    return len(ext.depths) + (1 if ext.extra_stage_dim else 0)


def check_model(model: ModelConfig) -> None:
    if not (model.use_gri_feat or model.use_reg_feat or model.use_glob_feat):
        raise ValueError(
            "at least one of model.use_gri_feat / use_reg_feat / use_glob_feat must be True"
        )
    _at_least("model", model, 1, "d_model", "n_heads", "d_ff")
    _at_least("model", model, 0, "grid_layers", "global_layers")
    _fraction("model", model, "dropout", "attn_dropout")
    if model.d_model % model.n_heads:
        raise ValueError(
            f"model.d_model={model.d_model} must be divisible by model.n_heads={model.n_heads}"
        )
    _at_least("model.cap_generator", model.cap_generator, 1, "n_layers")
    n_maps = _check_extractor(model)
    if not model.use_reg_feat:
        return
    det, ext = model.detector, model.extractor
    _at_least("model.detector", det, 1, "d_model", "dim_feedforward", "num_heads")
    _at_least("model.detector", det, 1, "num_layers", "num_levels", "num_points")
    _at_least("model.detector", det, 1, "num_queries", "num_classes")
    _fraction("model.detector", det, "dropout")
    if det.num_levels > n_maps:
        raise ValueError(
            f"model.detector.num_levels={det.num_levels} but the extractor gives {n_maps} "
            f"maps (model.extractor.depths={ext.depths}, extra_stage_dim="
            f"{ext.extra_stage_dim}); lower num_levels or add stages"
        )
    if det.d_model % det.num_heads:
        raise ValueError(
            f"model.detector.d_model={det.d_model} must be divisible by "
            f"model.detector.num_heads={det.num_heads}"
        )


def check_optimizer(opt: OptimizerConfig) -> None:
    _at_least("optimizer", opt, 1, "batch_size", "grad_accum_steps", "captions_per_image")
    _at_least("optimizer", opt, 0, "num_workers", "warmup_steps", "max_steps")
    _at_least("optimizer", opt, 0, "freezing_xe_epochs", "freezing_sc_epochs")
    _at_least("optimizer", opt, 0, "finetune_xe_epochs", "finetune_sc_epochs")
    _at_least("optimizer", opt, 0, "xe_lr", "xe_backbone_lr", "sc_lr", "sc_backbone_lr")
    _at_least("optimizer", opt, 0, "weight_decay", "grad_clip", "warmup_epochs")
    _fraction("optimizer", opt, "beta_1", "beta_2", "label_smoothing")
    _fraction("optimizer", opt, "min_lr_ratio", closed=True)
    if opt.checkpoint_num_to_keep < 1:
        raise ValueError(
            f"optimizer.checkpoint_num_to_keep={opt.checkpoint_num_to_keep} must be >= 1 "
            "(the latest checkpoint is what a run resumes from)"
        )
    _choice("optimizer.sc_baseline", opt.sc_baseline, SCST_BASELINES)
    if not 0.0 <= opt.ema_decay < 1.0:
        raise ValueError(
            f"optimizer.ema_decay={opt.ema_decay} must be in [0, 1) (0: no moving average; "
            "typical: 0.999)"
        )
    min_sequences = 2 if opt.sc_baseline == "leave_one_out" else 1
    if opt.sc_num_sequences < min_sequences:
        raise ValueError(
            f"optimizer.sc_num_sequences={opt.sc_num_sequences} must be >= {min_sequences} "
            f"for the {opt.sc_baseline} baseline"
        )


def check_training(opt: OptimizerConfig) -> None:
    """What a training run needs beyond a valid config (a checkpoint's config, imported or
    evaluated, may train nothing): some epochs, and XE before SCST."""
    phases = ("freezing_xe", "freezing_sc", "finetune_xe", "finetune_sc")
    run = [p for p in phases if getattr(opt, f"{p}_epochs")]
    if not run:
        raise ValueError(
            f"no training epochs: set one of {', '.join(f'optimizer.{p}_epochs' for p in phases)}"
        )
    if run[0].endswith("_sc"):
        raise ValueError(
            f"optimizer.{run[0]}_epochs={getattr(opt, run[0] + '_epochs')} would run SCST "
            "before any XE epoch; SCST starts from an XE model (set optimizer.freezing_xe_epochs "
            "or optimizer.finetune_xe_epochs)"
        )


def check_decode(decode: DecodeConfig) -> None:
    """Beams, lengths and every search control (:meth:`DecodeConfig.validate`)."""
    decode.validate()


def check_across_sections(cfg: Config) -> None:
    """The model's flavour with the caption lengths, and the research beam search, which has
    none of the ``decode.*`` search controls."""
    options = check_flavour(cfg)
    controls = cfg.decode.search_controls()
    if options.beam_search == "research" and controls:
        raise ValueError(
            f"decode.{', decode.'.join(controls)}: the research beam search "
            "(model.beam_search=research, the grit/hiercap flavours' default) reproduces the "
            "research code and has none of these controls; set them back to their defaults "
            "or use model.beam_search=hericap"
        )


def check_all(cfg: Config) -> None:
    """Every section's checks, then the ones across sections."""
    _choice("split", cfg.split, SPLITS)
    check_exp(cfg.exp)
    check_dataset(cfg.dataset)
    check_model(cfg.model)
    check_optimizer(cfg.optimizer)
    check_decode(cfg.decode)
    cfg.evaluation.validate()
    check_across_sections(cfg)
