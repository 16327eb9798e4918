"""Starting and stopping the captioning application on a Ray cluster (``hericap serve``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import yaml
from ray import serve

from hericap.runtime.cluster import init_ray
from hericap.serve.app import build_app, serve_config

__all__ = ["resolve_checkpoint", "start", "stop", "write_serve_config"]

logger = logging.getLogger(__name__)


def resolve_checkpoint(checkpoint: str | None, best: str | None) -> str:
    """``--checkpoint PATH``, or ``--best SWEEP_DIR`` (its exported ``best/``)."""
    if bool(checkpoint) == bool(best):
        raise ValueError("give exactly one of --checkpoint PATH or --best SWEEP_DIR")
    path = Path(checkpoint) if checkpoint else Path(best) / "best"
    if not (path / "model.pt").is_file():
        raise FileNotFoundError(f"{path} is not a HeriCap checkpoint folder (no model.pt)")
    return str(path.resolve())


def start(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000) -> str:
    """Run the application (joining or starting Ray); returns its base URL."""
    init_ray()
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
