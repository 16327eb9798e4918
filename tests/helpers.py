"""Small helpers shared by the tests: free local ports, JPEG bytes of an array, decoding
encoded bytes to one canvas, and a client of a local MLflow store."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
from PIL import Image

from hericap.data.transforms import ResizeSpec, load_image, resize_to_canvas


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports of 127.0.0.1 that were free a moment ago (all held until chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def jpeg(array: np.ndarray, **save) -> bytes:
    """``uint8 [H, W(, 3)]`` -> JPEG bytes (``save``: PIL's JPEG options, e.g. ``exif``)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", **save)
    return buf.getvalue()


def decode_image(data: bytes, spec: ResizeSpec | int) -> np.ndarray:
    """Decode encoded image bytes to an upright RGB ``uint8`` canvas (an int: a square side).

    Raises:
        ValueError: the bytes are not a readable image.
    """
    spec = ResizeSpec(size=spec) if isinstance(spec, int) else spec
    return resize_to_canvas(load_image(data), spec)[0]


def mlflow_client(store: Path):
    """A client of the local MLflow store ``store`` (MLflow 3 opens file stores when asked)."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=store.as_uri())
