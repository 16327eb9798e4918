"""Vectorised CIDEr-D, equal to the coco-caption toolkit's ``Cider`` (n=4, sigma=6).

The toolkit scores one caption at a time in Python dictionaries, which is what makes research-code
SCST spend hours per epoch on rewards. Here every caption is an array of word ids, each n-gram is
packed into one ``uint64`` (16 bits per word), and a batch is scored with sorts, searches and
bincounts:

* document frequencies (and ``log(number of images)``) come either from a fixed corpus, built once
  (SCST rewards: the training references), or from the evaluated references (evaluation);
* each reference's tf-idf vector, norm and length are computed once per image and cached;
* a candidate's score is the toolkit's: per n-gram order, the clipped dot product
  ``sum min(h, r) * r`` over ``|h| |r|``, times ``exp(-(len_h - len_r)^2 / (2 sigma^2))``, where the
  length is the toolkit's (number of bigrams), averaged over orders and references, times 10.

Texts are expected in the toolkit's tokenised form (:func:`hericap.data.ptb.ptb_tokenize`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain

import numpy as np

__all__ = ["CiderD", "cider_d_scores", "drop_empty_words"]

_BITS = 16
_MAX_WORDS = (1 << _BITS) - 1  # word ids are 1.._MAX_WORDS; 0 marks "no word"


class CiderD:
    """CIDEr-D over a reference corpus.

    Args:
        references: ``{image_id: [tokenised reference, ...]}``; document frequencies are computed
            over these images (one document per image, as in the toolkit).
        n: maximum n-gram order.
        sigma: length-penalty width.
        precompute_max_refs: compute every reference's vector up front (once, like the document
            frequencies) when the corpus has at most this many references; larger corpora
            compute each image's on first use and cache it (~30 bytes per n-gram).
    """

    def __init__(
        self,
        references: Mapping[str, Sequence[str]],
        n: int = 4,
        sigma: float = 6.0,
        precompute_max_refs: int = 200_000,
    ) -> None:
        if not references:
            raise ValueError("CIDEr-D needs at least one image of references")
        if n * _BITS > 64:
            raise ValueError(f"n={n} n-grams do not pack into 64 bits")
        self.n, self.sigma = n, sigma
        self._words: dict[str, int] = {}
        self._image_ids = list(references)
        self._image_index = {k: i for i, k in enumerate(self._image_ids)}
        ref_ids = []
        for image_id, refs in references.items():
            if not refs:
                raise ValueError(f"image {image_id!r} has no references")
            ref_ids.append([self.word_ids(r) for r in refs])
        self._ref_ids = ref_ids
        # document frequency: the number of images whose references contain the n-gram
        counts = np.asarray([len(r) for r in ref_ids])
        ref_image = np.repeat(np.arange(len(ref_ids)), counts)
        rows, keys, _ = self._ngrams(_pad([r for refs in ref_ids for r in refs]))
        uniq, dense = np.unique(keys, return_inverse=True)
        per_image = np.unique(ref_image[rows] * max(len(uniq), 1) + dense)
        df = np.bincount(per_image % max(len(uniq), 1), minlength=len(uniq))
        self._df_keys = uniq
        self._df_index = _KeyIndex(uniq)
        self.ref_len = float(np.log(float(len(ref_ids))))
        # each corpus n-gram's idf weight, log(images) - log(df), once rather than per batch
        self._idf = self.ref_len - np.log(np.maximum(1.0, df.astype(np.float64)))
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}
        if int(counts.sum()) <= precompute_max_refs:
            chunk = 2000
            for start in range(0, len(self._image_ids), chunk):
                self._ref_vectors(self._image_ids[start : start + chunk])

    # --- words and n-grams ----------------------------------------------------------------------

    def _word_id(self, word: str) -> int:
        """The id of ``word``; an unseen word gets a fresh one (it matches no reference)."""
        i = self._words.get(word)
        if i is None:
            i = self._words[word] = len(self._words) + 1
            if i > _MAX_WORDS:
                raise ValueError(f"more than {_MAX_WORDS} distinct words")
        return i

    def word_ids(self, text: str) -> np.ndarray:
        """Word ids of a tokenised text; unseen words get fresh ids (they match nothing)."""
        return np.asarray([self._word_id(w) for w in text.split()], dtype=np.uint64)

    def vocab_table(self, words: Sequence[str]) -> np.ndarray:
        """Word ids for a model vocabulary (index -> word), to score token ids directly.

        A whitespace-only entry (the research vocabulary has a few: ``" "``, ``"\\n"``) gets id
        0: decoded and tokenised, it is no word at all, and callers drop it
        (:func:`drop_empty_words`).

        Raises:
            ValueError: an entry of several words (it cannot be one token).
        """
        bad = [w for w in words if len(w.split()) > 1]
        if bad:
            raise ValueError(f"vocabulary entries must be single words: {bad[:5]}")
        return np.asarray([self.word_ids(w)[0] if w.strip() else 0 for w in words], dtype=np.uint64)

    def _ngrams(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every n-gram of a batch ``[B, T]`` of word ids (0-padded on the right), vectorised:
        row, packed key and order (0-based) of each occurrence, row-major."""
        b, t = tokens.shape
        tokens = tokens.astype(np.uint64, copy=False)
        keys = np.zeros((b, self.n, t), dtype=np.uint64)  # [row, order, start]
        key = keys[:, 0] = tokens
        for k in range(1, min(self.n, t)):
            key = (key[:, :-1] << np.uint64(_BITS)) | tokens[:, k:]
            keys[:, k, : t - k] = key
        # an n-gram exists where its last word does (padding is a suffix, words are >= 1)
        valid = (keys & np.uint64(_MAX_WORDS)) != 0
        rows, orders, _ = np.nonzero(valid)
        return rows, keys[valid], orders

    def _vectors(self, tokens: np.ndarray) -> tuple[np.ndarray, ...]:
        """tf-idf vectors of a batch ``[B, T]``: flat ``(row, n-gram index, order, weight)``
        entries sorted by row, norms ``[B, n]`` and the toolkit's lengths ``[B]`` (bigram counts).
        The n-gram index points into the corpus n-grams (-1 for n-grams outside it)."""
        b = tokens.shape[0]
        rows, keys, orders = self._ngrams(tokens)
        # each occurrence's corpus n-gram (-1: in no reference, so it can match nothing)
        index = self._df_index.lookup(keys)
        # term frequencies: occurrences per (row, n-gram); n-grams outside the corpus still
        # count (they weigh in the norm), numbered after the corpus ones
        identity, n_new = index, 0
        new = index < 0
        if new.any():
            new_keys, new_identity = np.unique(keys[new], return_inverse=True)
            identity, n_new = index.copy(), len(new_keys)
            identity[new] = len(self._df_keys) + new_identity
        _, first, tf = np.unique(
            rows * (len(self._df_keys) + n_new) + identity, return_index=True, return_counts=True
        )
        rows, index, orders = rows[first], index[first], orders[first]
        # an n-gram in no reference has df 0, which the toolkit clips to 1: idf log(images)
        weights = tf * np.where(index >= 0, self._idf[index], self.ref_len)
        norms = np.sqrt(
            np.bincount(rows * self.n + orders, weights=weights * weights, minlength=b * self.n)
        ).reshape(b, self.n)
        bigrams = np.maximum((tokens != 0).sum(axis=1) - 1, 0).astype(np.float64)
        return rows, index, orders, weights, norms, bigrams

    def _ref_vectors(self, image_ids: Sequence[str]) -> list[tuple[np.ndarray, ...]]:
        """Cached reference vectors of each image: n-gram indices, orders, weights, ref index,
        norms ``[R, n]``, lengths ``[R]``; missing ones are computed in one batch."""
        try:
            index = [self._image_index[i] for i in image_ids]
        except KeyError as e:
            raise KeyError(f"image {e.args[0]!r} is not in the reference corpus") from None
        missing = sorted({i for i in index if i not in self._cache})
        if missing:
            counts = np.asarray([len(self._ref_ids[i]) for i in missing])
            refs = [r for i in missing for r in self._ref_ids[i]]
            rows, keys, orders, weights, norms, lengths = self._vectors(_pad(refs))
            # all missing images at once: entries sorted by (image, n-gram, reference)
            first_ref = np.concatenate([[0], np.cumsum(counts)])
            image = np.repeat(np.arange(len(missing)), counts)[rows]
            order = np.lexsort((rows, keys, image))
            rows, keys, orders, weights, image = (
                rows[order],
                keys[order],
                orders[order],
                weights[order],
                image[order],
            )
            local_ref = rows - first_ref[image]
            bounds = np.searchsorted(image, np.arange(len(missing) + 1))
            # distinct (image, n-gram) runs: where each starts and how many references share it
            new_run = np.ones(len(keys), dtype=bool)
            new_run[1:] = (keys[1:] != keys[:-1]) | (image[1:] != image[:-1])
            run_start = np.flatnonzero(new_run)
            run_count = np.diff(np.append(run_start, len(keys)))
            run_bounds = np.searchsorted(image[run_start], np.arange(len(missing) + 1))
            for j, i in enumerate(missing):
                lo, hi = bounds[j], bounds[j + 1]
                rlo, rhi = run_bounds[j], run_bounds[j + 1]
                self._cache[i] = (
                    keys[lo:hi],
                    orders[lo:hi],
                    weights[lo:hi],
                    local_ref[lo:hi],
                    norms[first_ref[j] : first_ref[j + 1]],
                    lengths[first_ref[j] : first_ref[j + 1]],
                    keys[run_start[rlo:rhi]],  # distinct n-grams of the image's references
                    run_start[rlo:rhi] - lo,  # where each starts among the entries
                    run_count[rlo:rhi],  # in how many of the references it occurs
                )
        return [self._cache[i] for i in index]

    # --- scoring --------------------------------------------------------------------------------

    def score_tokens(self, image_ids: Sequence[str], tokens: np.ndarray) -> np.ndarray:
        """CIDEr-D of each row of ``tokens`` (``[B, T]`` word ids from :meth:`word_ids` or
        :meth:`vocab_table`, 0-padded on the right) against its image's references;
        ``image_ids`` may repeat (several candidates per image)."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or len(image_ids) != len(tokens):
            raise ValueError("tokens must be [B, T] with one image id per row")
        b, n = len(tokens), self.n
        h_row, h_key, h_ord, h_w, h_norm, h_len = self._vectors(tokens)
        # the batch's distinct images in order of first appearance (image-major batches then
        # give sorted search needles), each image's references once
        numbering: dict[str, int] = {}
        cand_image = np.fromiter(
            (numbering.setdefault(i, len(numbering)) for i in image_ids), np.int64, count=b
        )
        refs = self._ref_vectors(list(numbering))
        n_refs_image = np.asarray([len(r[5]) for r in refs])
        first_ref = np.concatenate([[0], np.cumsum(n_refs_image)])[:-1]
        sizes = np.asarray([len(r[0]) for r in refs])
        entry_offset = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        width = len(self._df_keys)
        r_w = np.concatenate([r[2] for r in refs])
        r_ref = np.concatenate([r[3] for r in refs])
        r_norm = np.concatenate([r[4] for r in refs])
        r_len = np.concatenate([r[5] for r in refs])
        # each image's distinct reference n-grams, as sorted (image, n-gram index) int64s
        n_unique = np.asarray([len(r[6]) for r in refs])
        u_comb = np.repeat(np.arange(len(refs)), n_unique) * width + np.concatenate(
            [r[6] for r in refs]
        )
        u_start = np.repeat(entry_offset, n_unique) + np.concatenate([r[7] for r in refs])
        u_count = np.concatenate([r[8] for r in refs])
        # each candidate n-gram finds the equal n-grams of its image's references
        keep = h_key >= 0
        h_row, h_ord, h_w = h_row[keep], h_ord[keep], h_w[keep]
        h_comb = cand_image[h_row] * width + h_key[keep]
        if len(u_comb):
            pos = np.minimum(np.searchsorted(u_comb, h_comb), len(u_comb) - 1)
            found = u_comb[pos] == h_comb
        else:
            pos, found = np.zeros(len(h_comb), np.int64), np.zeros(len(h_comb), bool)
        lo = u_start[pos] if len(u_comb) else pos
        hits = np.where(found, u_count[pos] if len(u_comb) else 0, 0)
        entry = np.repeat(np.arange(len(h_comb)), hits)
        ref_entry = lo[entry] + np.arange(len(entry)) - np.repeat(np.cumsum(hits) - hits, hits)
        # (candidate, reference) pairs, candidate-major
        n_refs = n_refs_image[cand_image]
        pair_offset = np.concatenate([[0], np.cumsum(n_refs)])
        pair = pair_offset[h_row[entry]] + r_ref[ref_entry]
        contrib = np.minimum(h_w[entry], r_w[ref_entry]) * r_w[ref_entry]
        dots = np.bincount(
            pair * n + h_ord[entry], weights=contrib, minlength=pair_offset[-1] * n
        ).reshape(-1, n)
        pair_cand = np.repeat(np.arange(b), n_refs)
        pair_ref = np.repeat(first_ref[cand_image], n_refs) + (
            np.arange(pair_offset[-1]) - np.repeat(pair_offset[:-1], n_refs)
        )
        denom = h_norm[pair_cand] * r_norm[pair_ref]
        val = np.where(denom != 0, dots / np.where(denom != 0, denom, 1.0), dots)
        delta = h_len[pair_cand] - r_len[pair_ref]
        val *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None]
        return np.bincount(pair_cand, weights=val.mean(axis=1), minlength=b) / n_refs * 10.0

    def score(self, image_ids: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """CIDEr-D of tokenised candidate texts (see :meth:`score_ids`)."""
        return self.score_tokens(image_ids, self.encode(candidates))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Tokenised texts -> ``[B, T]`` word ids, 0-padded (one dictionary pass for all)."""
        split = [t.split() for t in texts]
        lengths = np.fromiter(map(len, split), dtype=np.int64, count=len(split))
        flat = list(map(self._words.get, chain.from_iterable(split)))
        if None in flat:  # unseen words: the slower path that gives them fresh ids
            flat = list(map(self._word_id, chain.from_iterable(split)))
        out = np.zeros((len(texts), max(int(lengths.max(initial=0)), 1)), dtype=np.uint64)
        # row-major boolean mask: the words fill each row from the left, rows in order
        out[np.arange(out.shape[1])[None, :] < lengths[:, None]] = np.fromiter(
            flat, dtype=np.uint64, count=len(flat)
        )
        return out


class _KeyIndex:
    """Positions of the distinct ``uint64`` keys of a sorted array, looked up in batches.

    An open-addressing hash table (linear probing, load at most 1/4) answers most needles in
    one or two vectorised probe rounds; the few still unresolved then fall back to a binary
    search of the sorted keys. Faster than ``searchsorted`` alone on large corpora, whose
    random needles miss the cache at every step of the search.
    """

    _MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the top bits are the slot
    _PROBE_ROUNDS = 2

    def __init__(self, sorted_keys: np.ndarray) -> None:
        self._sorted = sorted_keys
        bits = max(int(np.ceil(np.log2(max(len(sorted_keys), 1) * 4))), 4)
        self._shift, self._mask = np.uint64(64 - bits), (1 << bits) - 1
        self._keys = np.zeros(1 << bits, dtype=np.uint64)
        self._values = np.full(1 << bits, -1, dtype=np.int32 if bits < 31 else np.int64)
        pending, slot = np.arange(len(sorted_keys)), self._slot(sorted_keys)
        while len(pending):
            s = slot[pending]
            free = self._values[s] < 0
            self._values[s[free]] = pending[free]
            placed = free & (self._values[s] == pending)  # one of several claimants wins a slot
            self._keys[s[placed]] = sorted_keys[pending[placed]]
            pending = pending[~placed]
            slot[pending] = (s[~placed] + 1) & self._mask

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        return ((keys * self._MULTIPLIER) >> self._shift).astype(np.intp)

    def lookup(self, needles: np.ndarray) -> np.ndarray:
        """Each needle's position in the sorted keys, -1 where it is absent."""
        slot = self._slot(needles)
        # the first probe round covers every needle, so it needs no index of the active ones
        value = self._values[slot]
        occupied = value >= 0
        hit = self._keys[slot] == needles
        hit &= occupied
        out = np.where(hit, value, -1)
        active = np.flatnonzero(occupied & ~hit)  # an empty slot ends a needle's search: absent
        for _ in range(self._PROBE_ROUNDS - 1):
            if not len(active):
                return out
            slot = (slot[active] + 1) & self._mask
            value = self._values[slot]
            occupied = value >= 0
            hit = occupied & (self._keys[slot] == needles[active])
            out[active[hit]] = value[hit]
            active = active[occupied & ~hit]
        if len(active):
            rest = needles[active]
            pos = np.minimum(np.searchsorted(self._sorted, rest), len(self._sorted) - 1)
            out[active] = np.where(self._sorted[pos] == rest, pos, -1)
        return out


def drop_empty_words(ids: np.ndarray) -> np.ndarray:
    """Rows of word ids with their 0 entries moved to the end, the others in order: the words a
    text has once empty tokens (whitespace-only vocabulary entries, padding) are gone."""
    order = np.argsort(ids == 0, axis=1, kind="stable")
    return np.take_along_axis(ids, order, axis=1)


def _pad(sequences: Sequence[np.ndarray]) -> np.ndarray:
    """Word-id arrays -> one ``[B, T]`` matrix, 0-padded on the right."""
    width = max((len(s) for s in sequences), default=0)
    out = np.zeros((len(sequences), max(width, 1)), dtype=np.uint64)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = s
    return out


def cider_d_scores(
    references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]
) -> tuple[float, dict[str, float]]:
    """The toolkit's ``Cider().compute_score`` on tokenised text: document frequencies from
    ``references``; returns the corpus score and each image's score."""
    if set(references) != set(candidates):
        raise ValueError("references and candidates must cover the same image ids")
    scorer = CiderD(references)
    ids = list(candidates)
    scores = scorer.score(ids, [candidates[i] for i in ids])
    return float(scores.mean()), dict(zip(ids, scores.tolist(), strict=True))
