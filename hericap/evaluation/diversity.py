"""How varied a split's captions are, and the collapse alarm (no Ray, no JVM).

Captioning models can collapse to a few generic captions ("a man standing in a room" for every
image), typically after a learning rate too high or an SCST reward that a short, safe caption
games. CIDEr falls too, but slowly; the diversity of the captions shows it at once:

* ``distinct_1`` / ``distinct_2``: distinct unigrams / bigrams over all unigrams / bigrams of the
  captions (one caption per image; Li et al., 2016), words as the toolkit tokenises them;
* ``vocab_used``: the number of distinct words;
* ``unique_share``: distinct captions (tokenised) over images;
* ``novel_share``: the share of captions that are not a training reference (compared without
  case, spaces and punctuation), None when no training references are known.

A split whose ``unique_share`` is below ``evaluation.collapse_unique_share`` is flagged
``collapse`` and :func:`collapse_warning` says what usually causes it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from hericap.data.ptb import ptb_tokens

__all__ = [
    "DIVERSITY_KEYS",
    "caption_fingerprints",
    "collapse_warning",
    "diversity_scores",
]

DIVERSITY_KEYS = ("distinct_1", "distinct_2", "vocab_used", "unique_share", "novel_share")
# Bytes of a caption fingerprint: 8 (one uint64); collisions are ~n^2 / 2^65, none in practice.
_FINGERPRINT_BYTES = 8
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


def _squash(caption: str) -> str:
    """A caption without case, spaces or punctuation: the same string for a training caption
    and for the model's (PTB-tokenised, lowercased) rendering of it."""
    return _NOT_ALNUM.sub("", caption.lower())


def _fingerprint(caption: str) -> int:
    digest = hashlib.blake2b(_squash(caption).encode(), digest_size=_FINGERPRINT_BYTES).digest()
    return int.from_bytes(digest, "little")


def caption_fingerprints(captions: Iterable[str]) -> np.ndarray:
    """Sorted distinct 64-bit fingerprints of ``captions`` (compared without case, spaces and
    punctuation): a compact set of the training references that workers receive instead of the
    strings (566k COCO captions: 4.5 MB)."""
    return np.array(sorted({_fingerprint(c) for c in captions}), dtype=np.uint64)


def _seen(captions: list[str], fingerprints: np.ndarray) -> np.ndarray:
    """Whether each caption's fingerprint is in the sorted ``fingerprints``."""
    if not len(fingerprints):
        return np.zeros(len(captions), dtype=bool)
    mine = np.array([_fingerprint(c) for c in captions], dtype=np.uint64)
    where = np.minimum(np.searchsorted(fingerprints, mine), len(fingerprints) - 1)
    return fingerprints[where] == mine


def _distinct(tokenised: list[list[str]], n: int) -> float:
    """Distinct n-grams over all n-grams of the captions (0 when there are none)."""
    grams = [tuple(words[i : i + n]) for words in tokenised for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity_scores(
    candidates: Mapping[str, str],
    train_fingerprints: np.ndarray | None = None,
    collapse_unique_share: float = 0.0,
) -> dict[str, Any]:
    """The diversity of one caption per image.

    Args:
        candidates: ``{image_id: caption}``.
        train_fingerprints: :func:`caption_fingerprints` of the training references (None:
            ``novel_share`` is None).
        collapse_unique_share: flag ``collapse`` below this ``unique_share`` (0: never).

    Returns:
        :data:`DIVERSITY_KEYS`, ``images``, ``collapse`` and ``collapse_unique_share``.

    Raises:
        ValueError: no captions.
    """
    if not candidates:
        raise ValueError("diversity of an empty set of captions")
    captions = list(candidates.values())
    tokenised = [ptb_tokens(c) for c in captions]
    unique_share = len({" ".join(t) for t in tokenised}) / len(captions)
    novel = None
    if train_fingerprints is not None:
        novel = float(np.mean(~_seen(captions, train_fingerprints)))
    return {
        "images": len(captions),
        "distinct_1": _distinct(tokenised, 1),
        "distinct_2": _distinct(tokenised, 2),
        "vocab_used": len({w for t in tokenised for w in t}),
        "unique_share": unique_share,
        "novel_share": novel,
        "collapse": unique_share < collapse_unique_share,
        "collapse_unique_share": collapse_unique_share,
    }


def collapse_warning(diversity: Mapping[str, Any], where: str, scst: bool) -> str | None:
    """The warning to log when ``diversity`` is flagged ``collapse`` (else None), naming the
    usual causes; ``scst``: the captions come from an SCST phase (its reward is then suspect)."""
    if not diversity.get("collapse"):
        return None
    distinct = round(diversity["unique_share"] * diversity["images"])
    causes = [
        "a learning rate too high for this model (optimizer.xe_lr / sc_lr; with warm-up, "
        "optimizer.warmup_steps)"
    ]
    if scst:
        causes.insert(
            0,
            "the SCST reward favouring one safe caption (optimizer.sc_lr too high for SCST, "
            "optimizer.sc_include_eos=False rewarding cut captions, or a weak "
            "optimizer.sc_baseline)",
        )
    causes.append("too few training steps yet (early epochs often say one generic caption)")
    return (
        f"{where}: caption collapse: {distinct} distinct captions for {diversity['images']} "
        f"images (unique share {diversity['unique_share']:.3f} < "
        f"evaluation.collapse_unique_share={diversity['collapse_unique_share']}). Likely "
        f"causes: {'; '.join(causes)}"
    )
