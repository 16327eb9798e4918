"""``hericap serve`` and ``caption``: the HTTP endpoint and captioning files from the shell."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# The decoding controls both commands take (docs/decoding.md), as option -> decode.* name.
BEAM_CONTROLS = (
    "alpha",
    "length_penalty",
    "no_repeat_ngram_size",
    "min_len",
    "beam_groups",
    "diversity_strength",
)
SAMPLING_CONTROLS = ("top_k", "top_p")


def _given_controls(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The decoding controls set on the command line (the others stay the checkpoint's)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _serve_args(args: argparse.Namespace) -> dict:
    from hericap.serve.server import resolve_checkpoint

    given = {
        "beam_size": args.beam_size,
        "n_best": args.n_best,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": None if args.batch_wait_ms is None else args.batch_wait_ms / 1000,
        "num_cpus": args.replica_cpus,
        "num_gpus": args.replica_gpus,
        "collapse_repeats": True if args.collapse_repeats else None,
        **_given_controls(args, BEAM_CONTROLS),
    }
    # options left out take the application's defaults (hericap.serve.app.DEFAULTS)
    out = {
        "checkpoint": resolve_checkpoint(args.checkpoint, args.best),
        "num_replicas": args.replicas,
        **{k: v for k, v in given.items() if v is not None},
    }
    if args.max_replicas:
        out["autoscaling"] = {"min_replicas": args.replicas, "max_replicas": args.max_replicas}
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    """Ray Serve HTTP endpoint for a checkpoint (or a sweep's best)."""
    from hericap.serve.server import start, stop, wait_forever, write_serve_config

    serve_args = _serve_args(args)
    if args.write_config:
        path = write_serve_config(args.write_config, serve_args, args.host, args.port)
        print(f"wrote {path}: `serve deploy {path}` runs it on a cluster")
        return 0
    url = start(serve_args, args.host, args.port, address=args.ray_address)
    print(f"serving {serve_args['checkpoint']} at {url} (POST /caption, GET /healthz, /docs)")
    print(f"open {url}/ in a browser to caption an image and see where the model looks")
    try:
        wait_forever()
    finally:
        stop()
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption image files (local paths or URIs) with a checkpoint (a folder or a URI; no Ray),
    all of them as one batch, on CUDA when present, else the CPU; optionally draw attention
    maps."""
    from hericap.data import storage
    from hericap.serve.images import ImageLimits, UploadRejectedError, open_upload
    from hericap.serve.service import CaptionService

    service = CaptionService(
        args.checkpoint,
        beam_size=args.beam_size,
        n_best=args.n_best,
        collapse_repeats=True if args.collapse_repeats else None,
        decode=_given_controls(args, BEAM_CONTROLS + SAMPLING_CONTROLS),
        sample=args.sample,
        seed=args.seed,
        device=args.device,
    )
    logger.info("captioning on %s", service.torch_device)
    paths, images, failures = [], [], 0
    for path in args.images:
        try:
            images.append(open_upload(storage.read_bytes(path), ImageLimits()))
            paths.append(path)
        except (OSError, UploadRejectedError) as e:
            logger.error("%s: %s", path, e)
            failures += 1
    results = service.caption(images)  # one batch, padded as the checkpoint's flavour pads
    for i, (path, result) in enumerate(zip(paths, results, strict=True)):
        if args.json:
            line = {"image": path, "model": service.id, "captions": result["beams"]}
            settings = {"collapse_repeats": service.collapse_repeats, "decode": service.settings()}
            print(json.dumps(line | settings))
        else:
            print(f"{path}\t{result['caption']}")
        if args.explain:
            _explain(service, images[i], result["caption"], Path(args.explain), i, len(paths))
    return 1 if failures else 0


def _explain(service, image, caption: str, out: Path, index: int, count: int) -> None:
    """Draw the per-word attention maps of ``caption`` on ``image`` (``out`` numbered when
    several images are captioned)."""
    from hericap.evaluation.explain import explain

    if count > 1:
        out = out.with_name(f"{out.stem}_{index}{out.suffix or '.png'}")
    canvases, sizes = service.prepare([image])
    vocab = service.loaded.vocab
    tokens = vocab.encode(caption)[1:-1]
    explain(service.loaded.model, vocab, canvases[0], tuple(sizes[0]), tokens, out)
    print(f"attention maps: {out}")


def _add_controls(parser: argparse.ArgumentParser, sampling: bool) -> None:
    """The decoding-control options (left out: the checkpoint's ``decode.*`` values)."""
    group = parser.add_argument_group(
        "decoding controls", "docs/decoding.md; each left out takes the checkpoint's decode.* value"
    )
    group.add_argument("--alpha", type=float, help="GNMT length penalty (0: off; e.g. 0.9)")
    group.add_argument(
        "--length-penalty", type=float, help="final ranking by log-prob / length ** p (0: off)"
    )
    group.add_argument(
        "--no-repeat-ngram-size", type=int, metavar="N", help="no N-gram twice (0: off)"
    )
    group.add_argument("--min-len", type=int, metavar="N", help="at least N words (0: off)")
    group.add_argument("--beam-groups", type=int, metavar="G", help="diverse beam search groups")
    group.add_argument("--diversity-strength", type=float, help="diverse beam search penalty")
    group.add_argument(
        "--collapse-repeats", action="store_true", help="collapse repeated words (research eval)"
    )
    if not sampling:
        return
    group.add_argument(
        "--sample", action="store_true", help="--n-best samples per image instead of beams"
    )
    group.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest")
    group.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass P")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve``, ``caption`` commands."""
    se = sub.add_parser("serve", help="Ray Serve HTTP captioning endpoint (127.0.0.1)")
    se.add_argument("--checkpoint", default=None, help="a checkpoint folder or URI (s3://...)")
    se.add_argument("--best", default=None, help="a sweep folder or URI: serve its best/")
    se.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--replicas", type=int, default=1, help="replicas (autoscaling: minimum)")
    se.add_argument("--max-replicas", type=int, default=0, help="> 0: autoscale up to this")
    # left out: the application's defaults (DEFAULTS in hericap/serve/app.py; README, "Serving")
    se.add_argument("--replica-cpus", type=float, default=None, help="CPUs per replica")
    se.add_argument(
        "--replica-gpus", type=float, default=None, help="GPUs per replica (it decodes there)"
    )
    se.add_argument("--max-batch-size", type=int, default=None, help="@serve.batch size")
    se.add_argument("--batch-wait-ms", type=float, default=None, help="@serve.batch wait")
    se.add_argument("--beam-size", type=int, default=None)
    se.add_argument("--n-best", type=int, default=None, help="beams returned per image")
    se.add_argument("--write-config", default=None, help="write a `serve deploy` YAML and exit")
    se.add_argument("--ray-address", default=None, help="Ray cluster (default: local)")
    _add_controls(se, sampling=False)
    se.set_defaults(func=cmd_serve)

    ca = sub.add_parser("caption", help="caption image files with a checkpoint")
    ca.add_argument("images", nargs="+", help="image files")
    ca.add_argument("--checkpoint", required=True, help="a checkpoint folder or URI (s3://...)")
    ca.add_argument("--beam-size", type=int, default=5)
    ca.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    ca.add_argument("--n-best", type=int, default=1, help="captions per image, best first")
    ca.add_argument(
        "--json", action="store_true", help="one JSON line per image: captions, ids, log-probs"
    )
    ca.add_argument("--explain", default=None, help="PNG of per-word attention heatmaps")
    _add_controls(ca, sampling=True)
    ca.set_defaults(func=cmd_caption)
