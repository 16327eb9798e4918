"""The captioning endpoint with dynamic batching vs ``max_batch_size=1``: same model, same
replica count, same client load, one run.

Serves an untrained model of ``--preset`` (default ``demo``; the timing does not depend on
training) on a local Ray cluster at 127.0.0.1, on the CPU or, with ``--replica-gpus``, on a GPU
(``benchmarks/gpu_check.sh``: the ``paper`` model, both replicas sharing one GPU): both
configurations run side by side as two Serve applications, one
replica each, and take turns under load, ``--rounds`` rounds of ``--requests / --rounds`` JPEG
requests (real photos from ``skimage.data``) from ``--concurrency`` client threads. Taking
turns keeps the comparison fair on a machine whose speed drifts by tens of percent within
minutes. Prints requests/s and p50/p99 latency over all rounds and each round's ratio; then
times the model alone (no HTTP, no Ray) at batch 1 and at the batch size, whose ratio is what
batching gives the model itself. Prints one JSON object on its last line.

    python benchmarks/bench_serve.py [--requests 400] [--rounds 4] [--concurrency 16]
        [--max-batch-size N] [--batch-wait-ms MS] [--preset demo] [--replica-gpus 0]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

from hericap.checkpoint import save_checkpoint
from hericap.config.loader import load_config
from hericap.data.text import Vocabulary
from hericap.models.builder import build_captioner
from hericap.serve.app import DEFAULTS


def _photos() -> list[bytes]:
    from skimage import data

    out = []
    for array in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket()):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _checkpoint(folder: Path, preset: str = "demo") -> str:
    cfg = load_config([f"preset={preset}"])
    words = [
        "a",
        "an",
        "the",
        "one",
        "two",
        "three",
        "red",
        "blue",
        "green",
        "circle",
        "square",
        "triangle",
        "above",
        "below",
        "left",
    ]
    vocab = Vocabulary(words, min_count=1)
    torch.manual_seed(0)
    model = build_captioner(cfg.model, len(vocab), cfg.dataset.image_size)
    return save_checkpoint(folder / "ckpt", model, cfg, vocab, meta={"epoch": 0})


def _model_only(ckpt: Path, photos: list[bytes], beam_size: int, batch: int) -> dict:
    """The model alone (no HTTP, no Ray) in this process, one thread: ms per image at batch 1
    and at ``batch``. Their ratio is what batching gives the model itself."""
    from hericap.serve.images import ImageLimits, open_upload
    from hericap.serve.service import CaptionService

    service = CaptionService(str(ckpt), beam_size=beam_size, n_best=1, torch_threads=1)
    images = [open_upload(p, ImageLimits()) for p in photos]
    out = {}
    for size in (1, batch):
        chunk = (images * batch)[:size]
        service.caption(chunk)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            service.caption(chunk)
        out[f"ms_per_image_batch_{size}"] = round((time.perf_counter() - t0) / 5 / size * 1000, 2)
    out["ceiling_ratio"] = round(
        out["ms_per_image_batch_1"] / out[f"ms_per_image_batch_{batch}"], 2
    )
    return out


def _poster(url: str, photos: list[bytes]) -> Callable[[int], tuple[float, int, int]]:
    local = threading.local()

    def post(i: int) -> tuple[float, int, int]:
        # one keep-alive connection per client thread, as load generators (wrk, locust) do
        if not hasattr(local, "session"):
            local.session = requests.Session()
        t0 = time.perf_counter()
        r = local.session.post(
            f"{url}/caption",
            data=photos[i % len(photos)],
            headers={"Content-Type": "image/jpeg"},
            timeout=300,
        )
        batch = r.json().get("timing", {}).get("batch_size", 0) if r.ok else 0
        return time.perf_counter() - t0, r.status_code, batch

    return post


def _round(post: Callable, n: int, concurrency: int) -> tuple[float, list[tuple]]:
    """``n`` requests from ``concurrency`` client threads: (wall seconds, per-request results)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(post, range(n)))
    return time.perf_counter() - t0, results


def _figures(walls: list[float], results: list[tuple]) -> dict:
    latencies = np.array([r[0] for r in results]) * 1000
    return {
        "requests_per_s": round(len(results) / sum(walls), 2),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "errors": sum(1 for r in results if r[1] != 200),
        "mean_batch": round(float(np.mean([r[2] for r in results])), 2),
    }


def _deploy(ckpt: Path, args: argparse.Namespace) -> dict[str, str]:
    """Both configurations as two applications of one Serve instance: {name: base URL}."""
    from ray import serve

    from hericap.runtime.cluster import init_ray
    from hericap.serve.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # one replica each; logical CPUs enough for both wherever this runs
    init_ray(num_cpus=max(os.cpu_count() or 1, math.ceil(2 * args.replica_cpus)))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for name, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
        app = build_app(
            {
                "checkpoint": str(ckpt),
                "beam_size": args.beam_size,
                "n_best": 1,
                "max_batch_size": batch,
                "batch_wait_timeout_s": args.batch_wait_ms / 1000,
                "num_cpus": args.replica_cpus,
                "num_gpus": args.replica_gpus,
                "torch_threads": max(1, int(args.replica_cpus)),
            }
        )
        serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)
        urls[name] = f"http://127.0.0.1:{port}/{name}"
    return urls


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400, help="per configuration, all rounds")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=DEFAULTS["max_batch_size"])
    p.add_argument("--batch-wait-ms", type=float, default=1000 * DEFAULTS["batch_wait_timeout_s"])
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument(
        "--replica-gpus", type=float, default=0.0, help="GPUs per replica (0.5: both on one GPU)"
    )
    p.add_argument("--preset", default="demo", help="the model served (untrained)")
    args = p.parse_args(argv)
    from ray import serve

    photos = _photos()
    names = ("batched", "unbatched")
    walls: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[tuple]] = {name: [] for name in names}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _checkpoint(Path(tmp), args.preset)
        try:
            urls = _deploy(ckpt, args)
            posters = {name: _poster(url, photos) for name, url in urls.items()}
            device = requests.get(f"{urls['batched']}/healthz", timeout=600).json()["device"]
            for name in names:  # warm-up
                _round(posters[name], args.concurrency, args.concurrency)
            per_round = max(args.concurrency, args.requests // args.rounds)
            for r in range(args.rounds):
                rate = {}
                for name in names:
                    wall, out = _round(posters[name], per_round, args.concurrency)
                    walls[name].append(wall)
                    results[name].extend(out)
                    rate[name] = per_round / wall
                ratios.append(round(rate["batched"] / rate["unbatched"], 2))
                print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f} req/s" for k, v in rate.items()))
        finally:
            serve.shutdown()
        model_only = _model_only(ckpt, photos, args.beam_size, args.max_batch_size)
        print("model only", model_only, flush=True)
    b, u = (_figures(walls[name], results[name]) for name in names)
    result = {
        "preset": args.preset,
        "device": device,
        "replica_gpus": args.replica_gpus,
        "concurrency": args.concurrency,
        "requests": len(results["batched"]),
        "rounds": args.rounds,
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "batched": b,
        "unbatched": u,
        "throughput_ratio": round(b["requests_per_s"] / u["requests_per_s"], 2),
        "round_ratios": ratios,
        "p99_ratio": round(b["p99_ms"] / u["p99_ms"], 2),
        "model_only": model_only,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
