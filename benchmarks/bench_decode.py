"""Beam search with the key/value cache vs recomputing the prefix at every step.

Same model (the ``tiny`` preset: grid + region + global branches, CPU), same images, same beam
search code: the only difference is the decoder's ``step``. With the cache, each step embeds one
new word per beam and attends to cached keys/values (and cached projections of the visual
memories); without it, each step re-runs the decoder over the whole prefix and keeps the last
position. ``<eos>`` is held off until the last step so that every caption is 20 words long.
Prints one JSON object on its last line.

    python benchmarks/bench_decode.py [--images 20] [--beam 5] [--words 20] [--preset tiny]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hericap.config.loader import load_config
from hericap.models.builder import build_captioner
from hericap.models.decoding import beam_search


class FixedLength:
    """Wraps a cached or recomputing decoder: ``<eos>`` is impossible before ``words``."""

    def __init__(self, decoder, eos_idx: int, words: int) -> None:
        self.decoder, self.eos_idx, self.words = decoder, eos_idx, words

    def init_cache(self):
        return self.decoder.init_cache()

    def reorder_cache(self, cache, index):
        self.decoder.reorder_cache(cache, index)

    def step(self, tokens, memories, cache, position, **kwargs):
        logp, w = self.decoder.step(tokens, memories, cache, position, **kwargs)
        if position < self.words:
            logp = logp.clone()
            logp[:, self.eos_idx] = float("-inf")
        return logp, w


class Recompute:
    """The decoder without a cache: every step runs the full prefix (teacher-forced pass)."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder

    def init_cache(self):
        return {"prefix": None}

    def reorder_cache(self, cache, index):
        cache["prefix"] = cache["prefix"].index_select(0, index)

    def step(self, tokens, memories, cache, position, captions_per_memory=1, memory_masks=None):
        prefix = (
            tokens[:, None]
            if cache["prefix"] is None
            else torch.cat([cache["prefix"], tokens[:, None]], dim=1)
        )
        cache["prefix"] = prefix
        log_probs, _ = self.decoder(
            prefix, memories, captions_per_memory=captions_per_memory, memory_masks=memory_masks
        )
        return log_probs[:, -1], []


def _run(decoder, memories, args, ids) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = beam_search(decoder, memories, args.beam, args.words, **ids)
    return time.perf_counter() - t0, out.tokens


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--words", type=int, default=20)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config([], preset=args.preset)
    model = build_captioner(cfg.model, args.vocab_size, cfg.dataset.image_size).eval()
    size = cfg.dataset.image_size
    ids = {"bos_idx": model.bos_idx, "eos_idx": model.eos_idx, "pad_idx": model.pad_idx}
    with torch.no_grad():
        memories = model.encode(torch.randn(args.images, 3, size, size))
        cached = FixedLength(model.decoder, model.eos_idx, args.words)
        recompute = FixedLength(Recompute(model.decoder), model.eos_idx, args.words)
        _run(cached, memories, args, ids)  # warm-up (allocator, kernels)
        cached_s, cached_tokens = _run(cached, memories, args, ids)
        recompute_s, recompute_tokens = _run(recompute, memories, args, ids)
    result = {
        "bench": "decode",
        "preset": args.preset,
        "images": args.images,
        "beam": args.beam,
        "words": args.words,
        "threads": args.threads,
        "cached_captions_per_s": round(args.images / cached_s, 2),
        "recompute_captions_per_s": round(args.images / recompute_s, 2),
        "speedup": round(recompute_s / cached_s, 2),
        "same_captions": bool(torch.equal(cached_tokens, recompute_tokens)),
        "caption_tokens": int(cached_tokens.shape[-1]),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
