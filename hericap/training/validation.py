"""Per-epoch validation inside the training workers: each rank decodes its slice of the val images
straight from the shards, and all ranks agree on val CIDEr-D (computed without a JVM) and on the
diversity of the captions (the collapse alarm's input)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from hericap.data import storage
from hericap.data.text import Vocabulary
from hericap.data.transforms import ResizeSpec, load_image, resize_to_canvas
from hericap.evaluation.coco_metrics import cider_d
from hericap.evaluation.diversity import diversity_scores
from hericap.evaluation.inference import caption_batch
from hericap.models.decoding import DecodeControls

__all__ = ["ValidationResult", "iter_val_slice", "validate"]


def _owner(image_id: str, world: int) -> int:
    """The rank that decodes ``image_id``: a stable hash, so every rank agrees without talking."""
    return zlib.crc32(image_id.encode()) % world


def iter_val_slice(
    files: Sequence[str],
    references: Mapping[str, list[str]],
    resize: ResizeSpec,
    batch_size: int,
    rank: int,
    world: int,
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """This rank's val images (those of ``references`` it owns), decoded, in batches of
    ``(ids, canvases [B, H, W, 3], real sizes [B, 2])``.

    Read straight from the shards: validation is small, and a Ray Data pipeline per worker per
    epoch costs more to start than decoding a few hundred images.
    """
    ids: list[str] = []
    images: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    for f in files:
        fs, path = storage.filesystem(f)
        table = pq.read_table(path, columns=["image_id", "image"], filesystem=fs)
        for image_id, data in zip(
            table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True
        ):
            if image_id not in references or _owner(image_id, world) != rank:
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


class ValidationResult(NamedTuple):
    """What every rank gets from :func:`validate`."""

    cider: float
    images: int
    # diversity_scores of the val captions (distinct-n, unique / novel shares, collapse)
    diversity: dict[str, Any]


def validate(
    net: nn.Module,
    files: Sequence[str],
    references: Mapping[str, list[str]],
    vocab: Vocabulary,
    resize: ResizeSpec,
    beam_size: int,
    max_len: int,
    batch_size: int,
    device: torch.device,
    rank: int,
    world: int,
    train_fingerprints: np.ndarray | None = None,
    collapse_unique_share: float = 0.0,
    controls: DecodeControls | None = None,
) -> ValidationResult:
    """Decode this rank's slice of the val images with ``net`` (the unwrapped model; the
    ``decode.*`` ``controls`` apply); every rank returns the same CIDEr-D, images decoded and
    diversity of the captions (``novel_share`` against ``train_fingerprints``; ``collapse``
    below ``collapse_unique_share``).

    Raises:
        RuntimeError: the ranks together did not decode every val image.
    """
    net.eval()
    mine: list[tuple[str, str]] = []
    for ids, images, sizes in iter_val_slice(files, references, resize, batch_size, rank, world):
        captions = caption_batch(
            net, vocab, images, beam_size, max_len, device=device, image_hw=sizes, controls=controls
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
    diversity = diversity_scores(candidates, train_fingerprints, collapse_unique_share)
    return ValidationResult(cider_d(references, candidates), len(candidates), diversity)
