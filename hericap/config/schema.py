"""The configuration schema shared by every entrypoint.

The key tree follows the research code that seed users know (GRIT / HierCap Hydra configs):
``exp.*``, ``dataset.*``, ``model.*``, ``model.detector.*``, ``model.cap_generator.*`` and
``optimizer.*``, plus what Ray needs (workers, GPUs, storage path) and the evaluation split
(``split``). Modules never receive these objects: builders turn sections into keyword arguments.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from hericap.config.decode_checks import SEARCH_CONTROLS, check_decode_controls

__all__ = [
    "CapGeneratorConfig",
    "Config",
    "DatasetConfig",
    "DecodeConfig",
    "DetectorConfig",
    "EvaluationConfig",
    "ExpConfig",
    "ExtractorConfig",
    "ModelConfig",
    "OptimizerConfig",
]

SPLITS = ("train", "val", "test")
RESIZE_MODES = ("square", "max_side", "maxwh")
AUGMENTATIONS = ("none", "randaugment")
MIXED_PRECISION = ("auto", "bf16", "no")
TRACKING_MODES = ("tensorboard", "mlflow", "both", "none")
MLFLOW_MODES = ("mlflow", "both")  # the exp.tracking values that log to MLflow
# What a COCO test-server / EvalAI submission name may hold.
SUBMISSION_NAME = re.compile(r"[A-Za-z0-9-]+")


@dataclass
class ExpConfig:
    """Run identity, placement on Ray, and where outputs go."""

    # Run name: outputs go to <output_dir>/<name>/ and Ray's run folder is named after it.
    name: str = "caption"
    # Seed of the initial weights, the caption choices and every worker's RNGs.
    seed: int = 123
    # Outputs go to <output_dir>/<name>/ (checkpoints, scores, results): a folder or a URI
    # (s3://bucket/prefix, endpoint $AWS_ENDPOINT_URL).
    output_dir: str = "outputs"
    # Ray Train storage (checkpoints, the kept best): a folder or a URI; defaults to
    # <output_dir>/<name>/runs. On a multi-node cluster a URI (file:///path for a shared mount).
    storage_path: str | None = None
    # A HeriCap checkpoint folder: `eval` scores it; `train` starts from its weights (its model
    # section, input keys and vocabulary, a fresh optimiser), as the research code's
    # exp.checkpoint does. Research .pth files become folders with `hericap import`.
    checkpoint: str | None = None
    # Continue the run of the same name from its latest checkpoint.
    resume: bool = False
    # Delete a previous run of the same name (its checkpoints and kept best) and start over.
    # Neither set and a previous run there: an error (nothing a user owns is deleted by default).
    overwrite: bool = False
    # Seed keys: world_size is the number of Ray Train workers, ngpus_per_node > 0 asks for GPUs.
    world_size: int = 1
    # > 0: each worker takes one GPU (the seed's key); 0: CPU workers.
    ngpus_per_node: int = 0
    # CPUs Ray reserves per training worker and per batch-inference actor.
    cpus_per_worker: float = 1.0
    # torch intra-op threads per worker; 0 means "as many as cpus_per_worker, at least 1".
    torch_threads: int = 0
    # Ray cluster to join ("auto": the one `ray start` began on this machine; None: $RAY_ADDRESS
    # when set, as in `ray job submit`, else a local cluster started for this run).
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
    # Dashboards: "tensorboard" (event files in the run folder), "mlflow" (a run in
    # $MLFLOW_TRACKING_URI, else the local store <output_dir>/mlruns; rank 0 logs live),
    # "both" or "none" (the CSVs only). Sweeps: one MLflow run per trial.
    tracking: str = "tensorboard"


@dataclass
class DatasetConfig:
    """Which dataset, where its shards are, and how images and captions are prepared."""

    # Dataset: synthetic (generated on demand), or one prepared with `hericap prepare` (coco,
    # flickr8k, flickr30k, nocaps, coco_captions).
    name: str = "synthetic"
    # Raw dataset root in the seed's layout (DATA_ROOT, as seed users set it): a run on coco,
    # flickr8k or flickr30k whose shards are missing prepares them from here.
    root: str = "${oc.env:DATA_ROOT,data}"
    # Prepared Parquet shards (a folder or a URI); defaults to <output_dir>/data/<dataset.name>.
    shard_dir: str | None = None
    # Train on a small fixed subset, with val = that same subset (debugging, as in the seed).
    overfit: bool = False
    # Images in the dataset.overfit subset.
    overfit_size: int = 64
    # Resize: "square" (image_size x image_size; tiny presets), "max_side" (aspect kept, short
    # side <= min_size and long side <= max_size, padded with the mean) or "maxwh" (the research
    # code's MaxWHResize: aspect kept, the largest size within min_size high x max_size wide,
    # i.e. its transform_cfg.size [384, 640]; sizes truncated as it truncates them).
    resize: str = "square"
    # Side of the square images (dataset.resize=square).
    image_size: int = 64
    # max_side: the short side is at most this (the paper: 384).
    min_size: int = 384
    # max_side: the long side is at most this (the paper: 640); also the canvas side.
    max_size: int = 640
    # Training augmentation, off for val/test: "none" or "randaugment" (caption-safe ops:
    # no flips, no colour changes; hericap.data.augment).
    augment: str = "none"
    # RandAugment: operations per image.
    randaugment_ops: int = 2
    # RandAugment: strength, 0-10.
    randaugment_magnitude: float = 5.0
    # Vocabulary: train words seen at least this many times (the paper: 5).
    vocab_min_count: int = 5
    # Training captions are cut to this many words.
    max_caption_len: int = 20
    # Synthetic dataset sizes and seed (ignored for other datasets).
    synthetic_train: int = 6000
    # Synthetic dataset: val images.
    synthetic_val: int = 250
    # Synthetic dataset: test images.
    synthetic_test: int = 500
    # Synthetic dataset: generator seed.
    synthetic_seed: int = 0
    # Synthetic dataset: images per Parquet shard.
    shard_rows: int = 1000
    # Images per Ray Data map_batches call, and how many decode tasks run at once
    # (0: optimizer.num_workers, the seed's data-loader workers; both 0: Ray decides).
    decode_batch_size: int = 64
    # Decode tasks at once (0: optimizer.num_workers, the seed's data-loader workers; both 0: Ray
    # decides).
    decode_concurrency: int = 0
    # Without augmentation every epoch decodes the same pixels: when the decoded train split
    # fits in this many MB, it is decoded once into Ray's object store and each epoch reads it
    # back, if it also fits in half of the object store (demo: 70 MiB; figures in the README).
    # 0: never.
    cache_decoded_mb: int = 2048
    # Rows each training worker shuffles locally (0: none); block order is reshuffled every epoch
    # anyway.
    local_shuffle_buffer: int = 1000
    # Limits the val/test images used (0: all). Val is scored every epoch.
    max_val_images: int = 0
    # Test images decoded and scored (0: all).
    max_test_images: int = 0


@dataclass
class ExtractorConfig:
    """The timm Swin backbone (random init unless ``checkpoint`` names a weight file)."""

    # Swin patch embedding stride.
    patch_size: int = 4
    # Channels of the first Swin stage (doubled per stage; Swin-B: 128).
    embed_dim: int = 32
    # Swin blocks per stage (Swin-B: [2, 2, 18, 2]).
    depths: list[int] = field(default_factory=lambda: [2, 2])
    # Attention heads per stage (Swin-B: [4, 8, 16, 32]).
    num_heads: list[int] = field(default_factory=lambda: [2, 4])
    # Swin attention window (the paper: 12).
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

    # GRIT detector checkpoint (the seed's region_ckpt.pth) loaded onto the extractor and the
    # region sub-encoder.
    checkpoint: str | None = None
    # Width of the deformable decoder (projected to model.d_model when they differ).
    d_model: int = 512
    # FFN width of the deformable decoder layers.
    dim_feedforward: int = 1024
    # Attention heads of the deformable decoder.
    num_heads: int = 8
    # Deformable decoder layers (the paper: 6).
    num_layers: int = 6
    # Feature levels the region sub-encoder reads (the last ones of the extractor).
    num_levels: int = 4
    # Sampling points per level and head.
    num_points: int = 4
    # Object queries: region tokens per image (the paper: 150).
    num_queries: int = 150
    # Detector classes (sizes the detection heads only; GRIT's Visual Genome detector: 1849).
    num_classes: int = 1849
    # Dropout in the deformable decoder.
    dropout: float = 0.1
    # FFN activation of the deformable decoder: relu or gelu.
    activation: str = "relu"
    # Iterative box refinement (one box head per layer).
    with_box_refine: bool = True
    # Load what matches of model.detector.checkpoint and log the rest instead of failing.
    allow_partial_load: bool = False


@dataclass
class CapGeneratorConfig:
    """The hierarchical decoder."""

    # Fusion of the visual memories: Parallel, Sequential, Concatenated_Parallel or
    # Concatenated_Sequential.
    decoder_name: str = "Parallel"
    # Decoder layers (the paper: 3).
    n_layers: int = 3
    # Decoder FFN activation: relu or gelu.
    activation: str = "relu"
    # Rows of the learned word-position table (model.embedding=research only; the research
    # code: max_len + 1 = 55). 0: positions are computed sinusoids (HeriCap).
    position_table_size: int = 0


@dataclass
class ModelConfig:
    """The captioning model: extractor, sub-encoders and decoder."""

    # Width of the sub-encoders and the decoder (the paper: 512).
    d_model: int = 512
    # Attention heads of the grid sub-encoder and the decoder.
    n_heads: int = 8
    # FFN width of the sub-encoders and the decoder.
    d_ff: int = 2048
    # Dropout on residual branches and embeddings.
    dropout: float = 0.2
    # Dropout on attention weights.
    attn_dropout: float = 0.2
    # Grid sub-encoder layers (the paper: 3; 0: projection only).
    grid_layers: int = 3
    # Grid sub-encoder layers: "transformer" (self-attention + FFN) or "routing" (DTNet-style
    # dynamic routing cells).
    grid_layer_type: str = "transformer"
    # Global sub-encoder layers (the paper: 3).
    global_layers: int = 3
    # Use the grid branch.
    use_gri_feat: bool = True
    # Use the region branch (Deformable DETR).
    use_reg_feat: bool = False
    # Use the global branch (relation-aware attention).
    use_glob_feat: bool = False
    # Freeze Swin's patch embedding and this many stages (-1: none; the paper: 2).
    frozen_stages: int = -1
    # FFN width of the global sub-encoder (0: d_ff; HierCap hard-wires 2048).
    global_d_ff: int = 0
    # "hericap" (HeriCap's own model, the default for new training), "grit" or "hiercap" (the
    # research code's exact computation, for imported checkpoints). The options below default
    # to the flavour's values (null); hericap/config/flavours.py documents each one.
    flavour: str = "hericap"
    # How each decoder layer fuses the memories: hericap | grit | hiercap (null: the flavour's).
    fusion_wiring: str | None = None
    # Word embedding and positions: hericap (scaled, sinusoidal) | research (unscaled, a learned
    # position table; null: the flavour's).
    embedding: str | None = None
    # 2-D sinusoidal positions on the grid/global tokens (null: the flavour's).
    visual_positions: bool | None = None
    # Global sub-encoder layer: relation (HeriCap's, any map size) | gra (HierCap's 6x10
    # relation-aware attention; null: the flavour's).
    global_module: str | None = None
    # How model.frozen_stages counts stages: timm | research (null: the flavour's).
    frozen_stages_rule: str | None = None
    # Batches of mixed sizes: by_size (each image encoded at its own size: captions do not
    # depend on the batch) | research (one zero-padded batch, as the research code; null: the
    # flavour's).
    padding: str | None = None
    # Beam search: hericap | research (the research code's step rules; null: the flavour's).
    beam_search: str | None = None
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    cap_generator: CapGeneratorConfig = field(default_factory=CapGeneratorConfig)


SCST_BASELINES = ("beam_mean", "leave_one_out", "greedy")


@dataclass
class OptimizerConfig:
    """Optimisation: phases, learning rates, batch size."""

    # Images per worker per batch (the seed's key).
    batch_size: int = 32
    # Data-loading parallelism (seed key): Ray Data decode tasks, unless
    # dataset.decode_concurrency sets them.
    num_workers: int = 2
    # XE epochs with the extractor and detector frozen (first phase).
    freezing_xe_epochs: int = 0
    # SCST epochs with them frozen (second phase).
    freezing_sc_epochs: int = 0
    # XE epochs training everything (third phase).
    finetune_xe_epochs: int = 10
    # SCST epochs training everything (fourth phase).
    finetune_sc_epochs: int = 0
    # XE learning rate of everything but the backbone.
    xe_lr: float = 1e-4
    # the extractor + region detector's LR; 0 freezes them for that kind of phase (no gradients)
    xe_backbone_lr: float = 1e-5
    # SCST learning rate of everything but the backbone (constant; the paper: 5e-6).
    sc_lr: float = 5e-6
    # SCST learning rate of the extractor + region detector (0 freezes them).
    sc_backbone_lr: float = 5e-6
    # SCST reward baseline: beam_mean (GRIT/M2), leave_one_out (PureT) or greedy (Rennie et al.)
    sc_baseline: str = "beam_mean"
    # beams (beam_mean) or samples (leave_one_out, greedy) per image
    sc_num_sequences: int = 5
    # append <eos> to the reward strings (SacreEOS); recorded with every score
    sc_include_eos: bool = True
    # XE warm-up in optimiser steps (linear), then cosine.
    warmup_steps: int = 1000
    # > 0: the XE warm-up lasts this many epochs instead (the research code warms up over one)
    warmup_epochs: float = 0.0
    # The cosine ends at this share of the peak LR (1: constant after warm-up).
    min_lr_ratio: float = 0.01
    # AdamW weight decay of matrices and embeddings (norms and biases never decay).
    weight_decay: float = 0.01
    # AdamW beta 1.
    beta_1: float = 0.9
    # AdamW beta 2.
    beta_2: float = 0.99
    # Gradient norm clipping (0: off).
    grad_clip: float = 1.0
    # XE label smoothing.
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
    # > 0: keep an exponential moving average of the weights (decay per optimiser step, capped
    # at (1 + n) / (10 + n) after n steps); validation, kept-best selection and the checkpoint's
    # model.pt use it (the raw weights resume training). 0: off. Typical: 0.999-0.9999.
    ema_decay: float = 0.0


@dataclass
class DecodeConfig:
    """How captions are decoded in val, test, eval, serve and caption (docs/decoding.md).

    The paper: beam 5, at most 20 words, every control off."""

    # Beam size of per-epoch validation (1: greedy).
    val_beam_size: int = 1
    # Beam size of test decoding, eval, serve and caption (the paper: 5).
    test_beam_size: int = 5
    # Words at most per caption (the paper: 20).
    max_len: int = 20
    # Final beam ranking by log-prob / length ** length_penalty, length counting <eos> (0: plain
    # log-prob, the research setting). Only one of this and decode.alpha may be non-zero.
    length_penalty: float = 0.0
    # Images per decoding batch.
    batch_size: int = 100
    # Collapse consecutive repeated words before scoring ("a a dog" -> "a dog"), as the research
    # evaluation does; recorded with every score.
    collapse_repeats: bool = False
    # GNMT length penalty (Wu et al., 2016): beams are compared, during the search and at the
    # end, by log-prob / ((5 + length) / 6) ** alpha, length counting <eos>; longer captions
    # win more often (0: off; typical 0.6-1.0).
    alpha: float = 0.0
    # No n-gram of this many words occurs twice in a caption: a word that would repeat one is
    # ruled out (0: off; 1: no word twice; 3 is common).
    no_repeat_ngram_size: int = 0
    # Words at least per caption: <eos> is ruled out before them (0: off).
    min_len: int = 0
    # Diverse beam search (Vijayakumar et al., 2018): the beams form this many groups, each
    # keeping beam_size / beam_groups beams; it must divide the beam sizes (1: plain beam search).
    beam_groups: int = 1
    # Diverse beam search: a word's log-prob in a group is lowered by this much for each beam of
    # an earlier group that chose it at the same step (Hamming diversity; 0: groups independent).
    diversity_strength: float = 0.0
    # Sampling (SCST's leave_one_out / greedy baselines, `hericap caption --sample`): draw only
    # among the k likeliest words (0: all words).
    top_k: int = 0
    # Sampling: draw only among the likeliest words whose probabilities sum to top_p (nucleus
    # sampling, Holtzman et al., 2020; 1: all words).
    top_p: float = 1.0

    def validate(self) -> None:
        """Raises ``ValueError`` saying which ``decode.*`` value to change."""
        if self.test_beam_size < 1 or self.val_beam_size < 1 or self.batch_size < 1:
            raise ValueError(
                "decode.val_beam_size, decode.test_beam_size and decode.batch_size must be >= 1"
            )
        check_decode_controls(
            alpha=self.alpha,
            length_penalty=self.length_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            min_len=self.min_len,
            beam_groups=self.beam_groups,
            diversity_strength=self.diversity_strength,
            top_k=self.top_k,
            top_p=self.top_p,
            max_len=self.max_len,
            beam_sizes=(self.val_beam_size, self.test_beam_size),
        )

    def search_controls(self) -> list[str]:
        """The ``decode.*`` keys set away from their defaults that change a beam search."""
        defaults = DecodeConfig()
        return [k for k in SEARCH_CONTROLS if getattr(self, k) != getattr(defaults, k)]


@dataclass
class EvaluationConfig:
    """What an evaluation reports and writes besides the toolkit metrics (docs/evaluation.md)."""

    # Also write <split>_per_image.json: every metric of every image, and the worst images.
    per_image: bool = False
    # The per-image file (and `hericap eval --per-image`) lists this many worst images by CIDEr.
    worst_images: int = 20
    # A collapse alarm: fewer distinct captions than this share of the images (val every epoch,
    # and every evaluation) logs a warning and sets `collapse` in the metrics (0: never).
    collapse_unique_share: float = 0.1
    # CLIP weights for CLIPScore / RefCLIPScore (Hessel et al., 2021): a local file or
    # s3://bucket/key; nothing is downloaded. None: both are reported unavailable.
    clip_checkpoint: str | None = None
    # open_clip architecture of those weights, or a path to an open_clip model-config JSON.
    # OpenAI's ViT-B/32 (the paper's) is ViT-B-32-quickgelu; a TorchScript file from OpenAI
    # carries its own architecture.
    clip_model: str = "ViT-B-32-quickgelu"
    # Images and captions per CLIP forward pass.
    clip_batch_size: int = 64
    # <name> in the COCO test-server file captions_<test|val>2014_<name>_results.json and the
    # nocaps EvalAI file; letters, digits and hyphens (None: exp.name, other characters as -).
    submission_name: str | None = None

    def validate(self) -> None:
        """Raises ``ValueError`` saying which ``evaluation.*`` value to change."""
        if self.worst_images < 0:
            raise ValueError(f"evaluation.worst_images={self.worst_images} must be >= 0")
        if not 0.0 <= self.collapse_unique_share <= 1.0:
            raise ValueError(
                f"evaluation.collapse_unique_share={self.collapse_unique_share} must be a share "
                "of the images in [0, 1] (0: no collapse alarm)"
            )
        if self.clip_batch_size < 1:
            raise ValueError(f"evaluation.clip_batch_size={self.clip_batch_size} must be >= 1")
        if not self.clip_model:
            raise ValueError("evaluation.clip_model is empty; the paper's is ViT-B-32-quickgelu")
        name = self.submission_name
        if name is not None and not SUBMISSION_NAME.fullmatch(name):
            raise ValueError(
                f"evaluation.submission_name={name!r}: use letters, digits and hyphens only "
                "(the COCO server splits captions_<split>_<name>_results.json on underscores)"
            )


@dataclass
class Config:
    """The whole configuration of a HeriCap run."""

    # The preset the config started from (hericap/config/presets/).
    preset: str = "coco"
    # Split `eval` decodes and scores: train, val or test.
    split: str = "test"
    exp: ExpConfig = field(default_factory=ExpConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def validate(self) -> None:
        """Every value in range, every choice known, the fields that must agree; raises
        ``ValueError`` saying what to change (:mod:`hericap.config.checks`)."""
        from hericap.config.checks import check_all

        check_all(self)

    @property
    def run_dir(self) -> str:
        """``<output_dir>/<exp.name>``: everything this run writes (a folder or a URI)."""
        output_dir = self.exp.output_dir
        if "://" in output_dir:
            return f"{output_dir.rstrip('/')}/{self.exp.name}"
        return os.path.join(output_dir, self.exp.name)
