"""``hericap serve`` and ``caption``: the HTTP endpoint and captioning files from the shell."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _serve_args(args: argparse.Namespace) -> dict:
    from hericap.serve.server import resolve_checkpoint

    given = {
        "beam_size": args.beam_size,
        "n_best": args.n_best,
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": None if args.batch_wait_ms is None else args.batch_wait_ms / 1000,
        "num_cpus": args.replica_cpus,
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
    url = start(serve_args, args.host, args.port)
    print(f"serving {serve_args['checkpoint']} at {url} (POST /caption, GET /healthz, /docs)")
    print(f"open {url}/ in a browser to caption an image and see where the model looks")
    try:
        wait_forever()
    finally:
        stop()
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption image files with a checkpoint (no Ray); optionally draw attention maps."""
    from hericap.serve.images import ImageLimits, UploadRejectedError, open_upload
    from hericap.serve.service import CaptionService

    service = CaptionService(args.checkpoint, beam_size=args.beam_size, n_best=1)
    failures = 0
    for i, path in enumerate(args.images):
        try:
            image = open_upload(Path(path).read_bytes(), ImageLimits())
        except (OSError, UploadRejectedError) as e:
            logger.error("%s: %s", path, e)
            failures += 1
            continue
        caption = service.caption([image])[0]["caption"]
        print(f"{path}\t{caption}")
        if args.explain:
            from hericap.evaluation.explain import explain

            out = Path(args.explain)
            if len(args.images) > 1:
                out = out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}")
            canvases, sizes = service.prepare([image])
            vocab = service.loaded.vocab
            tokens = vocab.encode(caption)[1:-1]
            explain(service.loaded.model, vocab, canvases[0], tuple(sizes[0]), tokens, out)
            print(f"attention maps: {out}")
    return 1 if failures else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve``, ``caption`` commands."""
    se = sub.add_parser("serve", help="Ray Serve HTTP captioning endpoint (127.0.0.1)")
    se.add_argument("--checkpoint", default=None, help="a checkpoint folder")
    se.add_argument("--best", default=None, help="a sweep folder: serve its exported best/")
    se.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--replicas", type=int, default=1, help="replicas (autoscaling: minimum)")
    se.add_argument("--max-replicas", type=int, default=0, help="> 0: autoscale up to this")
    # left out: the application's defaults (DEFAULTS in hericap/serve/app.py; README, "Serving")
    se.add_argument("--replica-cpus", type=float, default=None, help="CPUs per replica")
    se.add_argument("--max-batch-size", type=int, default=None, help="@serve.batch size")
    se.add_argument("--batch-wait-ms", type=float, default=None, help="@serve.batch wait")
    se.add_argument("--beam-size", type=int, default=None)
    se.add_argument("--n-best", type=int, default=None, help="beams returned per image")
    se.add_argument("--write-config", default=None, help="write a `serve deploy` YAML and exit")
    se.set_defaults(func=cmd_serve)

    ca = sub.add_parser("caption", help="caption image files with a checkpoint")
    ca.add_argument("images", nargs="+", help="image files")
    ca.add_argument("--checkpoint", required=True, help="a checkpoint folder")
    ca.add_argument("--beam-size", type=int, default=5)
    ca.add_argument("--explain", default=None, help="PNG of per-word attention heatmaps")
    ca.set_defaults(func=cmd_caption)
