"""CLIPScore and RefCLIPScore (Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for
Image Captioning", EMNLP 2021), offline, through ``open_clip`` (the optional ``clip`` extra).

For an image ``v``, a candidate caption ``c`` and references ``R``, with CLIP's unit-normalised
embeddings (captions prefixed with the paper's prompt ``"A photo depicts"``):

* ``CLIP-S(c, v) = w * max(cos(c, v), 0)`` with ``w = 2.5``;
* ``RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(c, r), 0))``, the harmonic
  mean (0 when both are 0).

The corpus scores are the means over images. The paper uses OpenAI's ViT-B/32
(``evaluation.clip_model=ViT-B-32-quickgelu``, the default). Images are read as shipped and
converted to RGB, resized (shorter side, bicubic), centre-cropped and normalised as CLIP's own
preprocessing does. Weights come only from ``evaluation.clip_checkpoint`` (a local file or
``s3://``); without them, or without ``open_clip``, the scores are reported unavailable with the
reason, like SPICE.
"""

from __future__ import annotations

import io
import logging
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hericap.data import storage

__all__ = [
    "CLIP_PROMPT",
    "CLIP_W",
    "ClipScorer",
    "ClipStatus",
    "check_clip_setup",
    "clip_report",
    "clip_scores_from_features",
    "clip_status",
]

logger = logging.getLogger(__name__)

# The paper's rescaling weight w.
CLIP_W = 2.5
# The paper's prompt before every caption (candidates and references alike).
CLIP_PROMPT = "A photo depicts"
# What to install for the metric.
INSTALL_HINT = "pip install 'hericap[clip]' (open_clip_torch)"


@dataclass
class ClipStatus:
    available: bool
    reason: str


def clip_status(checkpoint: str | None) -> ClipStatus:
    """Whether CLIPScore can run: ``open_clip`` importable and the weights given and present."""
    if not checkpoint:
        return ClipStatus(
            False,
            "no CLIP weights: set evaluation.clip_checkpoint=FILE or s3://bucket/key (OpenAI's "
            "ViT-B/32 gives the paper's numbers); nothing is downloaded",
        )
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return ClipStatus(False, f"open_clip is not installed: {INSTALL_HINT}")
    if not storage.exists(checkpoint) or Path(checkpoint).is_dir():
        return ClipStatus(False, f"evaluation.clip_checkpoint={checkpoint} is not a file")
    return ClipStatus(True, f"weights {checkpoint}")


def check_clip_setup(checkpoint: str | None, clip_model: str = "ViT-B-32-quickgelu") -> None:
    """Before a long run: weights that were asked for (``evaluation.clip_checkpoint``) exist,
    ``open_clip`` imports and knows ``clip_model`` (unless the weights are a local TorchScript
    file, which carries its architecture). Without weights there is nothing to check (the score
    is reported unavailable).

    Raises:
        FileNotFoundError: the weights (or a model-config file) are not there.
        ValueError: ``open_clip`` is missing, or ``clip_model`` is not an open_clip model.
    """
    status = clip_status(checkpoint)
    if not checkpoint:
        return
    if not status.available:
        if "open_clip" in status.reason:
            raise ValueError(f"evaluation.clip_checkpoint is set but {status.reason}")
        raise FileNotFoundError(status.reason)
    if storage.is_s3(checkpoint) or not _is_torchscript(Path(checkpoint)):
        _model_name(clip_model)


def clip_report(
    checkpoint: str | None,
    clip_model: str,
    images: Callable[[], Iterable[tuple[str, bytes]]],
    candidates: Mapping[str, str],
    references: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 64,
    per_image: bool = False,
) -> dict[str, Any]:
    """The ``clip`` section of a report: the settings, ``available`` with the reason
    (``status``), the corpus CLIPScore / RefCLIPScore and, with ``per_image``, each image's.
    ``images()`` streams ``(image_id, encoded image)`` pairs. Weights that fail to load or run
    are logged and reported unavailable with the error, like a failing SPICE: the other
    metrics and files still come."""
    out: dict[str, Any] = {
        "model": clip_model,
        "weights": checkpoint,
        "w": CLIP_W,
        "prompt": CLIP_PROMPT,
        "CLIPScore": None,
        "RefCLIPScore": None,
    }
    status = clip_status(checkpoint)
    if not status.available:
        return out | {"available": False, "status": status.reason}
    try:
        scorer = ClipScorer.load(clip_model, checkpoint, batch_size)
        scores = scorer.score(images(), candidates, references)
    except (OSError, RuntimeError, ValueError, AssertionError) as e:
        # open_clip's loader asserts on some mismatched weights (text width, say)
        logger.error("CLIPScore failed, reported unavailable: %s: %s", type(e).__name__, e)
        return out | {"available": False, "status": f"CLIP failed: {type(e).__name__}: {e}"}
    out |= {"available": True, "status": status.reason, **scores.corpus}
    if per_image:
        out["per_image"] = scores.per_image
    return out


def clip_scores_from_features(
    image: np.ndarray,
    candidate: np.ndarray,
    references: Sequence[np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per-image CLIP-S (and RefCLIP-S with ``references``) from unit-normalised embeddings:
    ``image`` and ``candidate`` ``[N, D]``, ``references[i]`` ``[R_i, D]``."""
    clip_s = CLIP_W * np.clip(np.sum(image * candidate, axis=1), 0.0, None)
    out = {"CLIPScore": clip_s}
    if references is not None:
        ref_s = np.array(
            [
                max(float(np.max(refs @ c)), 0.0)
                for c, refs in zip(candidate, references, strict=True)
            ]
        )
        total = clip_s + ref_s
        harmonic = np.divide(2 * clip_s * ref_s, total, out=np.zeros_like(total), where=total > 0)
        out["RefCLIPScore"] = harmonic
    return out


def _local_weights(checkpoint: str, scratch: Path) -> Path:
    """``checkpoint`` as a local file (an ``s3://`` object is copied into ``scratch``)."""
    if not storage.is_s3(checkpoint):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation.clip_checkpoint={checkpoint} is not a file")
        return path
    local = scratch / Path(checkpoint).name
    local.write_bytes(storage.read_bytes(checkpoint))
    return local


def _is_torchscript(path: Path) -> bool:
    """OpenAI's released CLIP files are TorchScript archives (a zip with ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def _model_name(clip_model: str) -> str:
    """An open_clip model name; a ``.json`` path is registered as a model config first."""
    import open_clip

    if clip_model.endswith(".json"):
        path = Path(clip_model)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation.clip_model={clip_model}: no such config file")
        open_clip.add_model_config(path)
        return path.stem
    if clip_model not in open_clip.list_models():
        raise ValueError(
            f"evaluation.clip_model={clip_model!r} is not an open_clip model; the paper's is "
            "ViT-B-32-quickgelu (or give a path to a model-config JSON)"
        )
    return clip_model


def _load(clip_model: str, weights: Path) -> tuple[torch.nn.Module, Any, Any]:
    """(model, image preprocessing, tokenizer) of local ``weights``; never downloads."""
    import open_clip
    from open_clip.model import build_model_from_openai_state_dict

    if _is_torchscript(weights):
        state = dict(torch.jit.load(str(weights), map_location="cpu").state_dict())
        # OpenAI's archives keep their sizes as tensors; a traced open_clip keeps its mask
        for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
            state.pop(key, None)
        model = build_model_from_openai_state_dict(state, cast_dtype=None)
        name = "ViT-B-32"
    else:
        name = _model_name(clip_model)
        text_cfg = open_clip.get_model_config(name).get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name"):
            raise ValueError(
                f"evaluation.clip_model={clip_model} uses a Hugging Face tokenizer, which would "
                "be downloaded; use a CLIP with its own BPE tokenizer (e.g. ViT-B-32-quickgelu)"
            )
        model = open_clip.create_model(name, pretrained=str(weights))
    size = model.visual.image_size
    preprocess = open_clip.image_transform(size, is_train=False)
    return model.float().eval(), preprocess, open_clip.get_tokenizer(name)


@dataclass
class ClipScores:
    """Corpus CLIPScore / RefCLIPScore (RefCLIPScore None without references) and per image."""

    corpus: dict[str, float | None]
    per_image: dict[str, dict[str, float | None]] = field(default_factory=dict)


class ClipScorer:
    """CLIP-S and RefCLIP-S of captions, batched.

    Args:
        model: the CLIP (``encode_image`` / ``encode_text``).
        preprocess: PIL image -> ``[3, H, W]`` tensor (CLIP's eval transform).
        tokenizer: texts -> token ids ``[N, L]``.
        batch_size: images or texts per forward pass.
        device: where CLIP runs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Any,
        tokenizer: Any,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.batch_size, self.device = batch_size, torch.device(device)

    @classmethod
    def load(
        cls, clip_model: str, checkpoint: str, batch_size: int = 64, device: str | None = None
    ) -> ClipScorer:
        """Load ``checkpoint`` (local or ``s3://``) as ``clip_model``; raises when it cannot."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with tempfile.TemporaryDirectory(prefix="hericap-clip-") as scratch:
            model, preprocess, tokenizer = _load(
                clip_model, _local_weights(checkpoint, Path(scratch))
            )
        logger.info("CLIPScore: %s from %s on %s", clip_model, checkpoint, device)
        return cls(model, preprocess, tokenizer, batch_size, device)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-normalised embeddings of ``texts`` prefixed with :data:`CLIP_PROMPT`."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [f"{CLIP_PROMPT} {t}" for t in texts[start : start + self.batch_size]]
            tokens = self.tokenizer(chunk).to(self.device)
            out.append(self.model.encode_text(tokens).float())
        return _normalise(torch.cat(out))

    @torch.no_grad()
    def image_features(self, images: Sequence[bytes | Image.Image]) -> np.ndarray:
        """Unit-normalised embeddings of encoded images (or PIL images)."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack(
                [self.preprocess(_rgb(im)) for im in images[start : start + self.batch_size]]
            )
            out.append(self.model.encode_image(batch.to(self.device)).float())
        return _normalise(torch.cat(out))

    def _reference_features(self, references: list[Sequence[str]]) -> list[np.ndarray]:
        """Each image's reference embeddings ``[R_i, D]``, encoded in shared batches."""
        flat = self.text_features([r for refs in references for r in refs])
        bounds = np.cumsum([0, *(len(refs) for refs in references)])
        return [flat[a:b] for a, b in pairwise(bounds)]

    def score(
        self,
        images: Iterable[tuple[str, bytes | Image.Image]],
        candidates: Mapping[str, str],
        references: Mapping[str, Sequence[str]] | None = None,
    ) -> ClipScores:
        """CLIP-S (and RefCLIP-S when ``references`` has some for every image) of ``candidates``
        on ``images`` (``(image_id, image)`` pairs, streamed in batches).

        Raises:
            ValueError: an image without a candidate, or candidates without an image.
        """
        with_refs = bool(references) and all(references.get(k) for k in candidates)
        per_image: dict[str, dict[str, float | None]] = {}
        for ids, batch in _batches(images, self.batch_size):
            missing = [k for k in ids if k not in candidates]
            if missing:
                raise ValueError(f"images without a candidate caption: {missing[:5]}")
            refs = self._reference_features([references[k] for k in ids]) if with_refs else None
            scores = clip_scores_from_features(
                self.image_features(batch), self.text_features([candidates[k] for k in ids]), refs
            )
            for i, k in enumerate(ids):
                per_image[k] = {
                    "CLIPScore": float(scores["CLIPScore"][i]),
                    "RefCLIPScore": float(scores["RefCLIPScore"][i]) if with_refs else None,
                }
        if set(per_image) != set(candidates):
            raise ValueError(
                f"CLIPScore saw {len(per_image)} images for {len(candidates)} captions; missing "
                f"e.g. {sorted(set(candidates) - set(per_image))[:5]}"
            )
        corpus = {"CLIPScore": float(np.mean([v["CLIPScore"] for v in per_image.values()]))}
        corpus["RefCLIPScore"] = (
            float(np.mean([v["RefCLIPScore"] for v in per_image.values()])) if with_refs else None
        )
        return ClipScores(corpus, per_image)


def _rgb(image: bytes | Image.Image) -> Image.Image:
    """As the paper's code reads images: opened as shipped (no EXIF rotation), RGB."""
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    return image.convert("RGB")


def _normalise(features: torch.Tensor) -> np.ndarray:
    array = features.cpu().numpy().astype(np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def _batches(
    images: Iterable[tuple[str, bytes | Image.Image]], size: int
) -> Iterable[tuple[list[str], list[bytes | Image.Image]]]:
    ids: list[str] = []
    batch: list[bytes | Image.Image] = []
    for image_id, image in images:
        ids.append(image_id)
        batch.append(image)
        if len(ids) == size:
            yield ids, batch
            ids, batch = [], []
    if ids:
        yield ids, batch
