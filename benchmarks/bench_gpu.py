"""The paper-size model on one GPU: XE and SCST optimiser steps.

* XE: teacher-forced cross-entropy steps of the ``paper`` preset (Swin-B window 12 at 384x640
  with the extra stride-64 stage, 150-query Deformable DETR, 3 grid / 3 global / 3 decoder
  layers) on random images and captions, bf16 autocast where the GPU supports it, AdamW.
* SCST: self-critical steps of the same model (``beam_mean`` baseline, 5 beams, CIDEr-D reward
  against random references).

Reports steps/s and images/s, the peak GPU memory of each section and the batch size; prints
one JSON object on its last line. ``--device cpu`` with ``--preset tiny`` runs every path at toy
size (the smoke test). ``benchmarks/gpu_check.sh`` runs it with the GPU tests and the Serve
benchmark (``bench_serve.py --preset paper --replica-gpus 0.5``).

    python benchmarks/bench_gpu.py [--device cuda] [--preset paper] [--batch-size 32]
        [--steps 10] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch

from hericap.config.loader import load_config
from hericap.data.text import Vocabulary
from hericap.data.transforms import resize_spec
from hericap.evaluation.inference import autocast_for, pick_device
from hericap.models.builder import build_captioner
from hericap.training.scst import CiderReward, make_scst_decoder, scst_step
from hericap.training.xe import pick_captions, xe_loss

WORDS = [f"w{i}" for i in range(2000)]  # a vocabulary of the size of small datasets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return (
        round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    )


def _timed(step, n: int, warmup: int, device: torch.device, batch: int) -> dict:
    """Seconds per call of ``step(i)`` over ``n`` calls after ``warmup`` ones."""
    for i in range(warmup):
        step(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(n):
        step(warmup + i)
    _sync(device)
    seconds = (time.perf_counter() - t0) / n
    return {
        "batch_size": batch,
        "steps_per_s": round(1 / seconds, 3),
        "images_per_s": round(batch / seconds, 2),
        "peak_memory_gb": _peak_gb(device),
    }


def _model_and_data(cfg, device: torch.device, batch: int, vocab: Vocabulary):
    torch.manual_seed(0)
    model = build_captioner(cfg.model, len(vocab), resize_spec(cfg.dataset).model_size).to(device)
    model.train()
    size = resize_spec(cfg.dataset).model_size  # the paper's 384 x 640 landscape images
    h, w = (size, size) if isinstance(size, int) else size
    images = torch.randn(batch, 3, h, w, device=device)
    rng = random.Random(0)
    captions = [
        [" ".join(rng.choices(WORDS[:200], k=rng.randint(8, 14))) for _ in range(5)]
        for _ in range(batch)
    ]
    return model, images, captions


def bench_training(cfg, device: torch.device, batch: int, steps: int, warmup: int) -> dict:
    vocab = Vocabulary(WORDS, min_count=1)
    model, images, captions = _model_and_data(cfg, device, batch, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    k, rng = cfg.optimizer.captions_per_image, random.Random(0)
    mode = cfg.exp.mixed_precision  # auto: bf16 autocast on a GPU that supports it

    def xe_step(_: int) -> None:
        tokens = vocab.encode_batch(
            pick_captions(np.array(captions, dtype=object), k, rng), cfg.dataset.max_caption_len
        ).to(device)
        with autocast_for(device, mode):
            log_probs = model(images, tokens[:, :-1], captions_per_image=k)
        loss = xe_loss(log_probs.float(), tokens[:, 1:], vocab.pad_idx, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    ids = np.array([str(i) for i in range(batch)])
    reward = CiderReward(dict(zip(ids.tolist(), captions, strict=True)), vocab)
    decode = make_scst_decoder(
        "beam_mean", 5, cfg.decode.max_len, vocab.bos_idx, vocab.eos_idx, vocab.pad_idx
    )

    def sc_step(_: int) -> None:
        with autocast_for(device, mode):
            loss, _ = scst_step(model, images, ids, reward, decode, "beam_mean", vocab.eos_idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    xe = _timed(xe_step, steps, warmup, device, batch)
    sc = _timed(sc_step, steps, warmup, device, batch)
    sc["sequences_per_image"] = 5
    return {"xe": xe, "scst": sc}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda, cpu (default: CUDA when present)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--overrides", nargs="*", default=[], help="config key=value overrides")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (paper: 32/GPU)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cfg = load_config([f"preset={args.preset}", *args.overrides])
    result: dict = {
        "bench": "gpu",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "preset": args.preset,
        "image_size": list(resize_spec(cfg.dataset).canvas),
        "bf16": device.type == "cuda" and torch.cuda.is_bf16_supported(),
    }
    result |= bench_training(cfg, device, args.batch_size, args.steps, args.warmup)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
