"""The configuration schema shared by every entrypoint.

The key tree follows the research code that seed users know (GRIT / HierCap Hydra configs):
``exp.*``, ``dataset.*``, ``model.*``, ``model.detector.*``, ``model.cap_generator.*`` and
``optimizer.*``, plus what Ray needs (workers, GPUs, storage path) and the evaluation split
(``split``). Modules never receive these objects: builders turn sections into keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hericap.config.flavours import check_flavour

__all__ = [
    "CapGeneratorConfig",
    "Config",
    "DatasetConfig",
    "DecodeConfig",
    "DetectorConfig",
    "ExpConfig",
    "ExtractorConfig",
    "ModelConfig",
    "OptimizerConfig",
]

SPLITS = ("train", "val", "test")
RESIZE_MODES = ("square", "max_side", "maxwh")
AUGMENTATIONS = ("none", "randaugment")
MIXED_PRECISION = ("auto", "bf16", "no")


@dataclass
class ExpConfig:
    """Run identity, placement on Ray, and where outputs go."""

    name: str = "caption"
    seed: int = 123
    # Outputs go to <output_dir>/<name>/ (checkpoints, scores, results).
    output_dir: str = "outputs"
    # Ray Train storage: a local folder or s3://bucket/prefix (endpoint: $AWS_ENDPOINT_URL);
    # defaults to <output_dir>/<name>/runs.
    storage_path: str | None = None
    # Checkpoint folder to evaluate or serve (eval entrypoint).
    checkpoint: str | None = None
    # Continue the run of the same name from its latest checkpoint instead of replacing it.
    resume: bool = False
    # Seed keys: world_size is the number of Ray Train workers, ngpus_per_node > 0 asks for GPUs.
    world_size: int = 1
    ngpus_per_node: int = 0
    cpus_per_worker: float = 1.0
    # torch intra-op threads per worker; 0 means "as many as cpus_per_worker, at least 1".
    torch_threads: int = 0
    # Ray cluster to join (None: start or reuse a local one).
    ray_address: str | None = None
    # Logical CPUs of a local Ray cluster started by us (None: Ray's default, the machine's cores).
    ray_num_cpus: int | None = None
    # bf16 autocast: "auto" (on GPU only), "bf16" (also on CPU) or "no".
    mixed_precision: str = "auto"
    # Fixed data order (seeded block order, order-preserving execution) so a resumed run sees
    # the batches a straight run would: exact resume. Slower; augmentation stays random.
    deterministic: bool = False
    # Train at most this many epochs in this invocation, then stop with a checkpoint (0: all);
    # exp.resume=True continues. For time-boxed or preemptible slots.
    epochs_per_run: int = 0
    # Likewise in optimiser steps (0: no limit); the run stops with a mid-epoch checkpoint.
    steps_per_run: int = 0
    # Also checkpoint every this many optimiser steps inside an epoch (0: at epoch ends only);
    # a run resumed from one skips the batches it already trained on.
    checkpoint_every_steps: int = 0
    # Worker failures (a dead process or node) the run recovers from, restarting from the last
    # checkpoint; -1: without limit.
    max_failures: int = 3
    # Every this many optimiser steps, rank 0 logs loss / LR / grad norm (steps.csv, TensorBoard).
    log_every_steps: int = 10


@dataclass
class DatasetConfig:
    """Which dataset, where its shards are, and how images and captions are prepared."""

    name: str = "synthetic"
    # Raw dataset root (COCO/Flickr/nocaps layouts); seed users set DATA_ROOT.
    root: str = "${oc.env:DATA_ROOT,data}"
    # Prepared Parquet shards; defaults to <output_dir>/data/<dataset.name>.
    shard_dir: str | None = None
    # Train on a small fixed subset, with val = that same subset (debugging, as in the seed).
    overfit: bool = False
    overfit_size: int = 64
    # Resize: "square" (image_size x image_size; tiny presets), "max_side" (aspect kept, short
    # side <= min_size and long side <= max_size, padded with the mean) or "maxwh" (the research
    # code's MaxWHResize: aspect kept, the largest size within min_size high x max_size wide,
    # i.e. its transform_cfg.size [384, 640]; sizes truncated as it truncates them).
    resize: str = "square"
    image_size: int = 64
    min_size: int = 384
    max_size: int = 640
    # Training augmentation, off for val/test: "none" or "randaugment" (caption-safe ops:
    # no flips, no colour changes; hericap.data.augment).
    augment: str = "none"
    randaugment_ops: int = 2
    randaugment_magnitude: float = 5.0
    vocab_min_count: int = 5
    max_caption_len: int = 20
    # Synthetic dataset sizes and seed (ignored for other datasets).
    synthetic_train: int = 6000
    synthetic_val: int = 250
    synthetic_test: int = 500
    synthetic_seed: int = 0
    shard_rows: int = 1000
    # Images per Ray Data map_batches call, and how many decode tasks run at once
    # (0: optimizer.num_workers, the seed's data-loader workers; both 0: Ray decides).
    decode_batch_size: int = 64
    decode_concurrency: int = 0
    # Without augmentation every epoch decodes the same pixels: when the decoded train split
    # fits in this many MB, it is decoded once into Ray's object store and each epoch reads it
    # back, if it also fits in half of the object store (demo: 70 MiB; figures in the README).
    # 0: never.
    cache_decoded_mb: int = 2048
    local_shuffle_buffer: int = 1000
    # Limits the val/test images used (0: all). Val is scored every epoch.
    max_val_images: int = 0
    max_test_images: int = 0


@dataclass
class ExtractorConfig:
    """The timm Swin backbone (random init unless ``checkpoint`` names a weight file)."""

    patch_size: int = 4
    embed_dim: int = 32
    depths: list[int] = field(default_factory=lambda: [2, 2])
    num_heads: list[int] = field(default_factory=lambda: [2, 4])
    window_size: int = 8
    # Patch embedding: "patch" (timm's, what pretrained Swin weights have) or "conv" (a
    # convolutional stem that learns much faster from random init).
    stem: str = "patch"
    # Channels of GRIT's extra stride-2 merging stage after the last Swin stage (the coarsest
    # map then has stride 64; Swin-B: 1024). 0: no extra stage.
    extra_stage_dim: int = 0
    # Stochastic depth over the Swin blocks (linear from 0; the research Swin-B: 0.3).
    drop_path_rate: float = 0.0
    # Swin windows: "timm" or "research" (pad to whole windows then shift, 12x12 windows even on
    # smaller maps); null: the flavour's (hericap/config/flavours.py).
    window_rule: str | None = None
    # Pretrained backbone weights (local path or s3://; .pth/.pt or .safetensors): a timm Swin
    # state dict, Microsoft's release layout ({"model": ...}), or a GRIT/HierCap backbone.
    checkpoint: str | None = None


@dataclass
class DetectorConfig:
    """Region sub-encoder (Deformable DETR decoder); checkpoint: the seed's region_ckpt.pth."""

    checkpoint: str | None = None
    d_model: int = 512
    dim_feedforward: int = 1024
    num_heads: int = 8
    num_layers: int = 6
    num_levels: int = 4
    num_points: int = 4
    num_queries: int = 150
    num_classes: int = 1849
    dropout: float = 0.1
    activation: str = "relu"
    with_box_refine: bool = True
    allow_partial_load: bool = False


@dataclass
class CapGeneratorConfig:
    """The hierarchical decoder."""

    decoder_name: str = "Parallel"
    n_layers: int = 3
    activation: str = "relu"
    # Rows of the learned word-position table (model.embedding=research only; the research
    # code: max_len + 1 = 55). 0: positions are computed sinusoids (HeriCap).
    position_table_size: int = 0


@dataclass
class ModelConfig:
    """The captioning model: extractor, sub-encoders and decoder."""

    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.2
    attn_dropout: float = 0.2
    grid_layers: int = 3
    # Grid sub-encoder layers: "transformer" (self-attention + FFN) or "routing" (DTNet-style
    # dynamic routing cells).
    grid_layer_type: str = "transformer"
    global_layers: int = 3
    use_gri_feat: bool = True
    use_reg_feat: bool = False
    use_glob_feat: bool = False
    frozen_stages: int = -1
    # FFN width of the global sub-encoder (0: d_ff; HierCap hard-wires 2048).
    global_d_ff: int = 0
    # "hericap" (HeriCap's own model, the default for new training), "grit" or "hiercap" (the
    # research code's exact computation, for imported checkpoints). The options below default
    # to the flavour's values (null); hericap/config/flavours.py documents each one.
    flavour: str = "hericap"
    fusion_wiring: str | None = None  # hericap | grit | hiercap
    embedding: str | None = None  # hericap | research
    visual_positions: bool | None = None  # 2-D positions on grid/global tokens
    global_module: str | None = None  # relation | gra
    frozen_stages_rule: str | None = None  # timm | research
    padding: str | None = None  # by_size | research
    beam_search: str | None = None  # hericap | research
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    cap_generator: CapGeneratorConfig = field(default_factory=CapGeneratorConfig)


SCST_BASELINES = ("beam_mean", "leave_one_out", "greedy")


@dataclass
class OptimizerConfig:
    """Optimisation: phases, learning rates, batch size."""

    batch_size: int = 32
    # Data-loading parallelism (seed key): Ray Data decode tasks, unless
    # dataset.decode_concurrency sets them.
    num_workers: int = 2
    freezing_xe_epochs: int = 0
    freezing_sc_epochs: int = 0
    finetune_xe_epochs: int = 10
    finetune_sc_epochs: int = 0
    xe_lr: float = 1e-4
    # the extractor + region detector's LR; 0 freezes them for that kind of phase (no gradients)
    xe_backbone_lr: float = 1e-5
    sc_lr: float = 5e-6
    sc_backbone_lr: float = 5e-6
    # SCST reward baseline: beam_mean (GRIT/M2), leave_one_out (PureT) or greedy (Rennie et al.)
    sc_baseline: str = "beam_mean"
    # beams (beam_mean) or samples (leave_one_out, greedy) per image
    sc_num_sequences: int = 5
    # append <eos> to the reward strings (SacreEOS); recorded with every score
    sc_include_eos: bool = True
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    # Batches per optimiser step (gradients accumulated; the effective batch is this x
    # batch_size x exp.world_size).
    grad_accum_steps: int = 1
    # Captions used per image per step (each image is encoded once and decodes all of them).
    captions_per_image: int = 5
    # Stop after this many optimisation steps in total (0: no limit); tests use it.
    max_steps: int = 0
    # The last K checkpoints (epoch and step ones) Ray keeps for resuming; the best by val
    # CIDEr (and the best XE one when SCST follows) is copied aside and kept regardless.
    checkpoint_num_to_keep: int = 2


@dataclass
class DecodeConfig:
    """How val/test captions are decoded (the paper: beam 5, 20 words)."""

    val_beam_size: int = 1
    test_beam_size: int = 5
    max_len: int = 20
    length_penalty: float = 0.0
    batch_size: int = 100
    # Collapse consecutive repeated words before scoring ("a a dog" -> "a dog"), as the research
    # evaluation does; recorded with every score.
    collapse_repeats: bool = False


@dataclass
class Config:
    """The whole configuration of a HeriCap run."""

    preset: str = "coco"
    split: str = "test"
    exp: ExpConfig = field(default_factory=ExpConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def validate(self) -> None:
        """Cross-field checks; raises ``ValueError`` saying what to change."""
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is not one of {list(SPLITS)}")
        if self.exp.world_size < 1:
            raise ValueError(f"exp.world_size={self.exp.world_size} must be >= 1")
        if self.exp.ngpus_per_node < 0:
            raise ValueError(f"exp.ngpus_per_node={self.exp.ngpus_per_node} must be >= 0")
        if self.exp.cpus_per_worker <= 0:
            raise ValueError(f"exp.cpus_per_worker={self.exp.cpus_per_worker} must be > 0")
        if self.model.d_model % self.model.n_heads:
            raise ValueError(
                f"model.d_model={self.model.d_model} must be divisible by "
                f"model.n_heads={self.model.n_heads}"
            )
        ext = self.model.extractor
        if len(ext.depths) != len(ext.num_heads):
            raise ValueError(
                f"model.extractor.depths={ext.depths} and model.extractor.num_heads="
                f"{ext.num_heads} must have the same length (one entry per Swin stage)"
            )
        n_maps = len(ext.depths) + (1 if ext.extra_stage_dim else 0)
        det = self.model.detector
        if self.model.use_reg_feat and det.num_levels > n_maps:
            raise ValueError(
                f"model.detector.num_levels={det.num_levels} but the extractor gives {n_maps} "
                f"maps (model.extractor.depths={ext.depths}, extra_stage_dim="
                f"{ext.extra_stage_dim}); lower num_levels or add stages"
            )
        if self.model.use_reg_feat and det.d_model % det.num_heads:
            raise ValueError(
                f"model.detector.d_model={det.d_model} must be divisible by "
                f"model.detector.num_heads={det.num_heads}"
            )
        if not (self.model.use_gri_feat or self.model.use_reg_feat or self.model.use_glob_feat):
            raise ValueError(
                "at least one of model.use_gri_feat / use_reg_feat / use_glob_feat must be True"
            )
        opt = self.optimizer
        if opt.batch_size < 1:
            raise ValueError(f"optimizer.batch_size={opt.batch_size} must be >= 1")
        if opt.grad_accum_steps < 1:
            raise ValueError(f"optimizer.grad_accum_steps={opt.grad_accum_steps} must be >= 1")
        if opt.checkpoint_num_to_keep < 1:
            raise ValueError(
                f"optimizer.checkpoint_num_to_keep={opt.checkpoint_num_to_keep} must be >= 1 "
                "(the latest checkpoint is what a run resumes from)"
            )
        for key in ("epochs_per_run", "steps_per_run", "checkpoint_every_steps"):
            if getattr(self.exp, key) < 0:
                raise ValueError(f"exp.{key}={getattr(self.exp, key)} must be >= 0")
        if self.exp.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"exp.mixed_precision={self.exp.mixed_precision!r}; known: {list(MIXED_PRECISION)}"
            )
        if opt.captions_per_image < 1:
            raise ValueError(f"optimizer.captions_per_image={opt.captions_per_image} must be >= 1")
        for key in (
            "freezing_xe_epochs",
            "freezing_sc_epochs",
            "finetune_xe_epochs",
            "finetune_sc_epochs",
        ):
            if getattr(opt, key) < 0:
                raise ValueError(f"optimizer.{key}={getattr(opt, key)} must be >= 0")
        if opt.sc_baseline not in SCST_BASELINES:
            raise ValueError(
                f"optimizer.sc_baseline={opt.sc_baseline!r}; known: {list(SCST_BASELINES)}"
            )
        min_sequences = 2 if opt.sc_baseline == "leave_one_out" else 1
        if opt.sc_num_sequences < min_sequences:
            raise ValueError(
                f"optimizer.sc_num_sequences={opt.sc_num_sequences} must be >= {min_sequences} "
                f"for the {opt.sc_baseline} baseline"
            )
        ds = self.dataset
        if ds.resize not in RESIZE_MODES:
            raise ValueError(f"dataset.resize={ds.resize!r}; known: {list(RESIZE_MODES)}")
        if ds.augment not in AUGMENTATIONS:
            raise ValueError(f"dataset.augment={ds.augment!r}; known: {list(AUGMENTATIONS)}")
        if min(ds.image_size, ds.min_size, ds.max_size) < 1 or ds.min_size > ds.max_size:
            raise ValueError(
                f"dataset.image_size={ds.image_size}, min_size={ds.min_size} and max_size="
                f"{ds.max_size} must be >= 1 with min_size <= max_size"
            )
        if self.decode.test_beam_size < 1 or self.decode.val_beam_size < 1:
            raise ValueError("decode.val_beam_size and decode.test_beam_size must be >= 1")
        check_flavour(self)

    @property
    def run_dir(self) -> str:
        """``<output_dir>/<exp.name>``: everything this run writes."""
        import os

        return os.path.join(self.exp.output_dir, self.exp.name)
