"""Images/s through the Ray Data training pipeline vs a plain PIL loop vs a torch DataLoader.

Same encoded images, same transforms (decode to upright RGB, RandAugment 2 ops at magnitude 5,
the paper's max-side resize to 384x640 on a padded canvas), one run:

* ``ray_data``: Parquet shards -> ``ray.data.read_parquet`` -> ``map_batches(decode_batch)``
  with ``concurrency`` = cores, iterated by one consumer in batches (what a training worker sees);
  a local Ray cluster of ``cores`` CPUs, started before timing.
* ``pil_loop``: one process, the same function per image over the same bytes held in memory.
* ``dataloader``: ``torch.utils.data.DataLoader`` with ``cores`` workers over the bytes in memory,
  the same function per item, the default collate.

Images: the real Flickr8k photos under ``$HERICAP_REALDATA`` (or ``--images-dir``), repeated to
``--images``; otherwise photo-sized generated JPEGs (500x375, noise over gradients). Each path
makes one warm-up pass (``--warmup`` images; Ray: one file), then one timed pass, which also
records when its first batch arrived (start-up: worker processes, planning, the first batch's
work): a pass of ``--images`` pays it once, an epoch once per epoch. Prints one JSON object on
its last line.

    python benchmarks/bench_data.py [--images 600] [--cores N] [--batch 32] [--images-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from hericap.data.augment import RandAugment
from hericap.data.transforms import ResizeSpec, load_image, resize_to_canvas

SPEC = ResizeSpec(mode="max_side", min_size=384, max_size=640)
AUGMENT = RandAugment(num_ops=2, magnitude=5)


def _generated_jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (375, 500) if rng.random() < 0.7 else (500, 375)
        grad = np.linspace(0, 200, w)[None, :, None] + np.linspace(0, 55, h)[:, None, None]
        arr = np.clip(grad + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _load_images(args: argparse.Namespace) -> tuple[list[bytes], str]:
    folder = args.images_dir
    if folder is None and os.environ.get("HERICAP_REALDATA"):
        folder = Path(os.environ["HERICAP_REALDATA"]) / "flickr8k" / "images"
    photos = sorted(Path(folder).glob("*.jpg")) if folder else []
    if photos:
        blobs = [p.read_bytes() for p in photos]
        source = f"{len(photos)} real photos from {folder}"
    else:
        blobs = _generated_jpegs(min(args.images, 64))
        source = "generated 500x375 JPEGs"
    return [blobs[i % len(blobs)] for i in range(args.images)], source


def transform(data: bytes, rng: np.random.Generator) -> np.ndarray:
    """The per-image work every path does (the Ray path calls the same pieces in decode_batch)."""
    canvas, _ = resize_to_canvas(AUGMENT(load_image(data), rng), SPEC)
    return canvas


class _BytesDataset(torch.utils.data.Dataset):
    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = blobs

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(transform(self.blobs[i], np.random.default_rng()))


class _Timing:
    """Images and seconds of one timed pass, and when its first batch arrived."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.n = 0
        self.first_s = 0.0

    def batch(self, n: int) -> None:
        if not self.n:
            self.first_s = time.perf_counter() - self.t0
        self.n += n

    def done(self) -> dict[str, float]:
        """``images_per_s`` over the whole pass and ``first_batch_s``: start-up (worker
        processes, planning) plus what a first batch waits for. Ray Data hands out whole
        blocks, so its first batch waits for a task's first output block."""
        return {
            "images_per_s": self.n / (time.perf_counter() - self.t0),
            "first_batch_s": self.first_s,
        }


def bench_pil(blobs: list[bytes], batch: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    timing = _Timing()
    for start in range(0, len(blobs), batch):
        chunk = blobs[start : start + batch]
        for data in chunk:
            transform(data, rng)
        timing.batch(len(chunk))
    return timing.done()


def bench_dataloader(blobs: list[bytes], workers: int, batch: int, warmup: int) -> dict[str, float]:
    def run(items: list[bytes]) -> dict[str, float]:
        timing = _Timing()
        loader = torch.utils.data.DataLoader(
            _BytesDataset(items), batch_size=batch, num_workers=workers
        )
        for b in loader:
            timing.batch(len(b))
        return timing.done()

    run(blobs[:warmup])
    return run(blobs)


def _descendant_cpu_s() -> dict[str, float]:
    """CPU seconds of this process's descendants from ``/proc`` (Linux; empty elsewhere), by
    kind: ``workers`` (Ray task workers, ``ray::...``) and ``ray_system`` (raylet, GCS, agents)."""
    stats: dict[int, tuple[int, str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = entry.read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        stats[int(entry.parent.name)] = (
            int(fields[1]),
            name,
            (int(fields[11]) + int(fields[12])) / tick,
        )
    out = {"workers": 0.0, "ray_system": 0.0}
    mine, frontier = set(), [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, (ppid, _, _) in stats.items() if ppid == parent]
        mine.update(children)
        frontier.extend(children)
    for pid in mine:
        _, name, cpu = stats[pid]
        out["workers" if name.startswith("ray::") else "ray_system"] += cpu
    return out


def bench_ray(
    blobs: list[bytes], cores: int, batch: int, files: int
) -> tuple[dict[str, float], dict]:
    import ray

    from hericap.runtime.cluster import init_ray
    from hericap.runtime.datasets import shard_dataset

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        per_file = -(-len(blobs) // files)
        for k in range(files):
            part = blobs[k * per_file : (k + 1) * per_file]
            table = pa.table(
                {
                    "image_id": [f"{k}-{i}" for i in range(len(part))],
                    "image": pa.array(part, type=pa.binary()),
                }
            )
            paths.append(os.path.join(tmp, f"part-{k:03d}.parquet"))
            pq.write_table(table, paths[-1])
        started = init_ray(num_cpus=cores, dashboard=False)
        try:

            def run(shards: list[str]) -> dict[str, float]:
                timing = _Timing()
                ds = shard_dataset(
                    shards,
                    SPEC,
                    shuffle=True,
                    columns=["image_id", "image"],
                    decode_batch_size=batch,
                    concurrency=cores,
                    augment=AUGMENT,
                )
                for b in ds.iter_batches(batch_size=batch, batch_format="numpy"):
                    timing.batch(len(b["image"]))
                return timing.done()

            run(paths[:1])  # warm-up: worker processes, imports
            before, driver0 = _descendant_cpu_s(), sum(os.times()[:2])
            t0 = time.perf_counter()
            rates = run(paths)
            wall = time.perf_counter() - t0
            after, driver1 = _descendant_cpu_s(), sum(os.times()[:2])
            where = {
                "wall_s": round(wall, 2),
                "decode_workers_cpu_s": round(after["workers"] - before["workers"], 2),
                "ray_system_cpu_s": round(after["ray_system"] - before["ray_system"], 2),
                "driver_cpu_s": round(driver1 - driver0, 2),
                "cpu_available_s": round(wall * cores, 2),
            }
        finally:
            if started:
                ray.shutdown()
    return rates, where


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=64)
    ap.add_argument("--files", type=int, default=0, help="Parquet files (0: 2 per core)")
    ap.add_argument("--images-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    blobs, source = _load_images(args)
    bench_pil(blobs[: args.warmup], args.batch)  # warm-up pass
    pil = bench_pil(blobs, args.batch)
    loader = bench_dataloader(blobs, args.cores, args.batch, args.warmup)
    ray_rates, where = bench_ray(blobs, args.cores, args.batch, args.files or 2 * args.cores)
    ray_rate = ray_rates["images_per_s"]
    best = max(pil["images_per_s"], loader["images_per_s"])
    result = {
        "bench": "data",
        "images": len(blobs),
        "source": source,
        "cores": args.cores,
        "transform": "decode + RandAugment(2, 5) + max-side 384x640 on a 640x640 canvas",
        "ray_data_images_per_s": round(ray_rate, 1),
        "pil_loop_images_per_s": round(pil["images_per_s"], 1),
        "dataloader_images_per_s": round(loader["images_per_s"], 1),
        "ray_vs_pil": round(ray_rate / pil["images_per_s"], 3),
        "ray_vs_dataloader": round(ray_rate / loader["images_per_s"], 3),
        "ray_vs_best_other": round(ray_rate / best, 3),
        "first_batch_s": {
            "ray_data": round(ray_rates["first_batch_s"], 2),
            "pil_loop": round(pil["first_batch_s"], 2),
            "dataloader": round(loader["first_batch_s"], 2),
        },
        "ray_time": where,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
