"""Caption tokenisation and the vocabulary.

Captions are tokenised exactly as the coco-caption toolkit scores them (its PTB tokeniser, then
punctuation removed; :mod:`hericap.data.ptb`), so the words a model learns to emit are the words
the metrics and the SCST reward compare.
Special tokens follow the research code's indices: ``<unk>`` 0, ``<pad>`` 1, ``<bos>`` 2,
``<eos>`` 3. A vocabulary is taken as it is: the research vocabulary (``data/vocab.json`` of GRIT
and HierCap) has whitespace-only entries (``" "``, ``"\n"``...), which load, encode and decode
like any other word.

:func:`finish_caption` turns decoded words into the caption string, applying the ``decode.*``
post-processing options (today :func:`collapse_repeats`, the research evaluation's).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from hericap.data import storage
from hericap.data.ptb import ptb_tokens

__all__ = ["SPECIAL_TOKENS", "Vocabulary", "collapse_repeats", "finish_caption", "tokenize"]

SPECIAL_TOKENS = ("<unk>", "<pad>", "<bos>", "<eos>")


def tokenize(caption: str) -> list[str]:
    """The toolkit's word tokens of a caption: PTB-tokenised, lowercased, punctuation dropped."""
    return ptb_tokens(caption)


def collapse_repeats(words: Sequence[str]) -> list[str]:
    """Each run of a repeated word once (``a a dog`` -> ``a dog``), as the research evaluation
    does (``itertools.groupby`` over the decoded words) before scoring."""
    return [word for word, _ in itertools.groupby(words)]


def finish_caption(words: Sequence[str], collapse: bool = False) -> str:
    """Decoded words -> the caption string, after the ``decode.*`` post-processing options
    (``collapse``: :func:`collapse_repeats`; ``decode.collapse_repeats``)."""
    if collapse:
        words = collapse_repeats(words)
    return " ".join(words)


class Vocabulary:
    """Word <-> index mapping with the four special tokens first."""

    def __init__(self, words: Sequence[str], min_count: int = 1) -> None:
        words = [w for w in words if w not in SPECIAL_TOKENS]
        self.itos: list[str] = [*SPECIAL_TOKENS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocabulary words must be unique")
        self.min_count = min_count

    unk_idx, pad_idx, bos_idx, eos_idx = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        if min_count < 1:
            raise ValueError(f"min_count={min_count} must be >= 1")
        counts = Counter(t for c in captions for t in tokenize(c))
        words = sorted(
            (w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls(words, min_count=min_count)

    def encode(self, caption: str, max_len: int | None = None) -> list[int]:
        """Token ids with ``<bos>`` and ``<eos>``; ``max_len`` caps the words kept."""
        ids = [self.stoi.get(t, self.unk_idx) for t in tokenize(caption)]
        if max_len is not None:
            ids = ids[:max_len]
        return [self.bos_idx, *ids, self.eos_idx]

    def encode_batch(self, captions: Sequence[str], max_len: int | None = None) -> torch.Tensor:
        """Padded ``[N, T]`` tensor of :meth:`encode` results."""
        seqs = [self.encode(c, max_len) for c in captions]
        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), self.pad_idx, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out

    def words(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first ``<eos>``; ``<bos>`` and ``<pad>`` dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_idx:
                break
            if i in (self.bos_idx, self.pad_idx):
                continue
            words.append(self.itos[i])
        return words

    def decode(self, ids: Iterable[int], collapse_repeats: bool = False) -> str:
        """The caption of ``ids`` (:meth:`words` joined by spaces; see :func:`finish_caption`
        for ``collapse_repeats``)."""
        return finish_caption(self.words(ids), collapse=collapse_repeats)

    def to_dict(self) -> dict:
        return {"itos": self.itos, "min_count": self.min_count}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        itos = d["itos"]
        if tuple(itos[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {list(SPECIAL_TOKENS)}, got {itos[:4]}")
        return cls(itos[len(SPECIAL_TOKENS) :], min_count=d.get("min_count", 1))

    def save(self, path: str | Path) -> None:
        """Write ``vocab.json`` (a local path or an ``s3://`` URI)."""
        storage.write_text(path, json.dumps(self.to_dict(), indent=0))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary written by :meth:`save` (local path or ``s3://`` URI)."""
        try:
            text = storage.read_text(path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"vocabulary not found: {path}") from e
        return cls.from_dict(json.loads(text))
