"""What batch-independent captions cost: one padded pass vs encoding by image size.

HeriCap's default flavour encodes each image at its own padded size (``model.padding=by_size``):
images of one size share a pass, the memories are then padded with masks for the decoder. The
alternative is one pass over the padded batch (what the research code does, and HeriCap did
before): it computes the padding too, and its captions depend on the batch. Masking the padding
inside Swin instead would cost at least that padded pass (the padded cells are still computed,
plus the masks).

A batch of COCO-like sizes (``max_side`` 384/640: 4:3 landscape, 3:4 portrait, square, 16:9),
random weights, CPU. Times encode-only and encode + beam search per batch, the two ways taking
turns (so a busy machine slows both alike; the minimum over repeats is the figure to read), and
the share of the padded batch that is padding. Prints one JSON object on its last line.

    python benchmarks/bench_batching.py [--repeats 3] [--threads 2] [--embed-dim 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hericap.config.loader import load_config
from hericap.data.transforms import resize_spec
from hericap.models.builder import build_captioner

# (width, height) of the originals: COCO's common shapes
ORIGINALS = [(640, 480)] * 4 + [(480, 640)] * 2 + [(500, 500), (640, 360)]
VOCAB = 1000


def _batch(spec, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    sizes = [spec.target_size(w, h)[::-1] for w, h in ORIGINALS]  # (h, w)
    hw = torch.tensor(sizes)
    h, w = (int(-(-v // multiple) * multiple) for v in hw.max(0).values)
    x = torch.zeros(len(sizes), 3, h, w)
    for i, (ih, iw) in enumerate(sizes):
        x[i, :, :ih, :iw] = torch.randn(3, ih, iw)
    return x, hw


def _take_turns(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Run each function once per round, ``repeats`` rounds after a warm-up one."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - t0)
    return {n: {"min_s": min(t), "median_s": statistics.median(t)} for n, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--embed-dim", type=int, default=32)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--min-size", type=int, default=384, help="dataset.min_size (the paper's)")
    ap.add_argument("--max-size", type=int, default=640, help="dataset.max_size (the paper's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    e = args.embed_dim
    cfg = load_config(
        [
            "preset=coco",
            f"model.extractor.embed_dim={e}",
            "model.extractor.depths=[2,2,2,2]",
            "model.extractor.num_heads=[1,2,4,8]",
            f"model.extractor.extra_stage_dim={8 * e}",
            "model.d_model=128",
            "model.d_ff=256",
            "model.grid_layers=2",
            "model.global_layers=2",
            "model.cap_generator.n_layers=2",
            "model.detector.d_model=128",
            "model.detector.dim_feedforward=256",
            "model.detector.num_layers=2",
            f"dataset.min_size={args.min_size}",
            f"dataset.max_size={args.max_size}",
        ]
    )
    spec = resize_spec(cfg.dataset)
    model = build_captioner(cfg.model, VOCAB, spec.model_size).eval()
    x, hw = _batch(spec, model.input_multiple)
    real = float((hw[:, 0] * hw[:, 1]).sum())
    padding_share = 1 - real / (x.shape[0] * x.shape[2] * x.shape[3])
    runs = {
        "encode_padded_pass": lambda: model.encode_all(x),
        "encode_by_size": lambda: model.encode_all(x, hw),
        "caption_padded_pass": lambda: model.generate(x, beam_size=args.beam, max_len=20),
        "caption_by_size": lambda: model.generate(x, beam_size=args.beam, max_len=20, image_hw=hw),
    }
    with torch.no_grad():
        timings = _take_turns(runs, args.repeats)
    out = {
        "batch": list(x.shape),
        "sizes_hw": hw.tolist(),
        "padding_share": round(padding_share, 3),
        "threads": args.threads,
        **{name: t for name, t in timings.items()},
    }
    for what in ("encode", "caption"):
        ratio = timings[f"{what}_by_size"]["min_s"] / timings[f"{what}_padded_pass"]["min_s"]
        out[f"{what}_by_size_over_padded_min"] = round(ratio, 3)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
