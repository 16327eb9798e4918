"""Starting and stopping the captioning application on a Ray cluster (``hericap serve``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml
from ray import serve

from hericap.checkpoint import MODEL_FILE
from hericap.data import storage
from hericap.runtime.cluster import check_resources, check_shared_locations, init_ray
from hericap.serve.app import DEFAULTS, build_app, serve_config

__all__ = ["check_serve_cluster", "resolve_checkpoint", "start", "stop", "write_serve_config"]

logger = logging.getLogger(__name__)


def resolve_checkpoint(checkpoint: str | None, best: str | None) -> str:
    """``--checkpoint LOCATION``, or ``--best SWEEP`` (its exported ``best/``): a folder or a
    URI, checked to hold a checkpoint."""
    if bool(checkpoint) == bool(best):
        raise ValueError("give exactly one of --checkpoint PATH or --best SWEEP_DIR")
    location = storage.resolve(checkpoint if checkpoint else storage.join(best, "best"))
    storage.check_location(location, "--checkpoint" if checkpoint else "--best")
    if not storage.exists(storage.join(location, MODEL_FILE)):
        raise FileNotFoundError(f"{location} is not a HeriCap checkpoint folder (no {MODEL_FILE})")
    return location


def check_serve_cluster(args: dict[str, Any]) -> None:
    """Refuse replicas the cluster cannot place, or a checkpoint path replicas on other nodes
    cannot read."""
    a = {**DEFAULTS, **args}
    check_shared_locations({"checkpoint": a["checkpoint"]}, "serving (replicas load it)")
    replicas = (a["autoscaling"] or {}).get("min_replicas", a["num_replicas"])
    check_resources(
        {"CPU": float(a["num_cpus"]), "GPU": float(a["num_gpus"])},
        max(1, int(replicas)),
        f"{replicas} replica(s)",
        "Lower --replicas, --replica-cpus or --replica-gpus",
    )


def start(
    args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, address: str | None = None
) -> str:
    """Run the application (joining ``address`` / ``$RAY_ADDRESS``, or starting Ray); returns
    its base URL."""
    init_ray(address)
    check_serve_cluster(args)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name="hericap", route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    logger.info(
        "captioning endpoint %s: the page at /, POST /caption and /explain, GET /healthz, /docs",
        url,
    )
    return url


def stop() -> None:
    serve.shutdown()


def wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")


def write_serve_config(path: str | Path, args: dict[str, Any], host: str, port: int) -> Path:
    """A Serve config YAML for ``serve deploy PATH`` with these arguments."""
    out = Path(path)
    out.write_text(
        "# `serve deploy` / `serve run` config for HeriCap (written by `hericap serve`)\n"
        + yaml.safe_dump(serve_config(args, host, port), sort_keys=False)
    )
    return out
