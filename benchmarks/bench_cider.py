"""CIDEr-D reward speed: HeriCap's vectorised CiderD vs pycocoevalcap's Cider on one batch.

The SCST setting: document frequencies from a fixed training corpus (built once, not part of the
per-batch time on either side; ours also computes every reference vector then, and its
``hericap_init_s`` is reported), then a batch of candidates (several per image) scored against
their references. ``hericap_cold_cache_s`` is the path for corpora too large to precompute:
the batch's reference vectors are computed on first use.
Real captions from ``$HERICAP_REALDATA`` (Flickr8k Karpathy train split) when available, else the
synthetic dataset. Prints one JSON object on its last line.

    python benchmarks/bench_cider.py [--images 50] [--per-image 5] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np

from hericap.data.ptb import ptb_tokenize
from hericap.evaluation.cider import CiderD
from hericap.evaluation.coco_metrics import toolkit_cider_corpus_df, toolkit_document_frequency


def load_corpus() -> tuple[str, dict[str, list[str]]]:
    root = os.environ.get("HERICAP_REALDATA")
    path = Path(root or "") / "flickr8k/dataset_flickr8k.json"
    if root and path.is_file():
        data = json.loads(path.read_text())
        return "flickr8k-train", {
            str(im["imgid"]): [ptb_tokenize(s["raw"]) for s in im["sentences"]]
            for im in data["images"]
            if im["split"] == "train"
        }
    from hericap.data.synthetic import iter_split

    return "synthetic-train", {
        s.image_id: [ptb_tokenize(c) for c in s.captions] for s in iter_split(0, "train", 2000)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    source, corpus = load_corpus()
    rng = random.Random(0)
    keys = sorted(corpus)
    ids = [k for k in rng.sample(keys, args.images) for _ in range(args.per_image)]
    # candidates: references of random other images (realistic lengths and overlap)
    cands = [rng.choice(corpus[rng.choice(keys)]) for _ in ids]

    document_frequency = toolkit_document_frequency(corpus)
    t = time.perf_counter()
    ours_scorer = CiderD(corpus)  # once per run: df and every reference vector
    ours_init_s = time.perf_counter() - t

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        return best, out

    pairs = [(c, corpus[i]) for i, c in zip(ids, cands, strict=True)]
    toolkit_s, theirs = timed(
        lambda: toolkit_cider_corpus_df(document_frequency, len(corpus), pairs)
    )
    ours_s, ours = timed(lambda: ours_scorer.score(ids, cands))
    # SCST's path: decoded token ids map straight to word ids (no text split)
    tokens = ours_scorer.encode(cands)
    ours_tokens_s, _ = timed(lambda: ours_scorer.score_tokens(ids, tokens))
    # large corpora compute reference vectors on first use instead: time that path too
    lazy = CiderD(corpus, precompute_max_refs=0)
    t = time.perf_counter()
    lazy.score(ids, cands)
    ours_cold_s = time.perf_counter() - t
    result = {
        "bench": "cider",
        "source": source,
        "corpus_images": len(corpus),
        "candidates": len(ids),
        "toolkit_s": toolkit_s,
        "hericap_init_s": ours_init_s,
        "hericap_s": ours_s,
        "hericap_cold_cache_s": ours_cold_s,
        "hericap_token_ids_s": ours_tokens_s,
        "speedup": toolkit_s / ours_s,
        "speedup_cold_cache": toolkit_s / ours_cold_s,
        "speedup_token_ids": toolkit_s / ours_tokens_s,
        "max_abs_diff": float(np.max(np.abs(ours - theirs))),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
