"""SCST vs XE: seconds per optimisation step, same model, same images per step.

The demo model on synthetic images (CPU). XE trains on 5 captions per image; SCST decodes
``k = 5`` sequences per image (beam search for ``beam_mean``, sampling for the others), scores
them with the CIDEr-D reward and trains on them. The model first gets a few XE steps so that
it emits captions of realistic length. Prints one JSON object on its last line.

    python benchmarks/bench_scst.py [--batch-size 32] [--steps 10] [--warmup-xe-steps 60]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch

from hericap.config.loader import load_config
from hericap.data.synthetic import iter_split
from hericap.data.text import Vocabulary
from hericap.data.transforms import (
    ResizeSpec,
    load_image,
    normalize_images,
    resize_to_canvas,
)
from hericap.models.builder import build_captioner
from hericap.training.scst import SCST_BASELINES, CiderReward, make_scst_decoder, scst_step
from hericap.training.xe import pick_captions, xe_loss


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup-xe-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=1000, help="synthetic train images to draw from")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config([], preset="demo")
    samples = list(iter_split(0, "train", args.images))
    vocab = Vocabulary.build([c for s in samples for c in s.captions], min_count=5)
    spec = ResizeSpec(size=cfg.dataset.image_size)
    images = np.stack([resize_to_canvas(load_image(s.jpeg), spec)[0] for s in samples])
    captions = [s.captions for s in samples]
    ids = np.asarray([s.image_id for s in samples])
    reward = CiderReward(dict(zip(ids.tolist(), captions, strict=True)), vocab)
    model = build_captioner(cfg.model, len(vocab), cfg.dataset.image_size)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng, k = random.Random(0), cfg.optimizer.captions_per_image
    b = args.batch_size

    def batch(i: int):
        sel = np.arange(i * b, (i + 1) * b) % len(samples)
        return normalize_images(images[sel]), sel

    def xe_step(i: int) -> None:
        x, sel = batch(i)
        tokens = vocab.encode_batch(
            pick_captions([captions[j] for j in sel], k, rng), cfg.dataset.max_caption_len
        )
        loss = xe_loss(model(x, tokens[:, :-1], captions_per_image=k), tokens[:, 1:], 1, 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sc_step(i: int, baseline: str, decode) -> None:
        x, sel = batch(i)
        loss, _ = scst_step(model, x, ids[sel], reward, decode, baseline, vocab.eos_idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(args.warmup_xe_steps):
        xe_step(i)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # timing only: barely move
    start = model.state_dict()

    def timed(fn) -> float:
        model.load_state_dict(start)
        fn(0)  # one untimed step
        t = time.perf_counter()
        for i in range(1, args.steps + 1):
            fn(i)
        return (time.perf_counter() - t) / args.steps

    result = {"bench": "scst", "batch_size": b, "sequences_per_image": 5}
    result["xe_step_s"] = timed(xe_step)
    for baseline in SCST_BASELINES:
        decode = make_scst_decoder(
            baseline, 5, cfg.decode.max_len, vocab.bos_idx, vocab.eos_idx, vocab.pad_idx
        )
        step_s = timed(lambda i, bl=baseline, d=decode: sc_step(i, bl, d))
        result[f"scst_{baseline}_step_s"] = step_s
        result[f"scst_{baseline}_over_xe"] = step_s / result["xe_step_s"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
