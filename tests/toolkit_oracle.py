"""The coco-caption toolkit's own CIDEr computations, used as oracles by the tests and by
``benchmarks/bench_cider.py`` (which adds this folder to ``sys.path``): document frequencies from
a fixed corpus and per-pair CIDEr with them, the SCST reward setting of M2 / GRIT."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["toolkit_cider_corpus_df", "toolkit_document_frequency"]


class _CorpusSized(list):
    """A list whose ``len()`` is the corpus size: the toolkit's ``compute_cider`` sets
    ``ref_len = log(len(self.crefs))`` and only iterates the list otherwise."""

    def __init__(self, items, size: int) -> None:
        super().__init__(items)
        self.corpus_size = size

    def __len__(self) -> int:
        return self.corpus_size


def toolkit_document_frequency(corpus: Mapping[str, Sequence[str]]):
    """The toolkit's CIDEr document-frequency table over ``{image_id: [tokenised refs]}``."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs

    source = CiderScorer(n=4, sigma=6.0)
    for refs in corpus.values():
        source.crefs.append(cook_refs(refs))
    source.compute_doc_freq()
    return source.document_frequency


def toolkit_cider_corpus_df(
    document_frequency, corpus_size: int, pairs: Sequence[tuple[str, Sequence[str]]]
) -> np.ndarray:
    """The toolkit's own ``CiderScorer`` with document frequencies from a fixed corpus (the
    SCST reward setting of M2 / GRIT): per-pair scores of ``(candidate, references)``, with
    ``ref_len = log(corpus_size)``. The reference the fast reward is checked against."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    scorer = CiderScorer(n=4, sigma=6.0)
    for candidate, refs in pairs:
        scorer += (candidate, list(refs))
    scorer.document_frequency = document_frequency
    scorer.crefs = _CorpusSized(scorer.crefs, corpus_size)
    return np.asarray(scorer.compute_cider())
