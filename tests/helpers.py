"""Small helpers shared by the tests: free local ports and JPEG bytes of an array."""

from __future__ import annotations

import io
import socket

import numpy as np
from PIL import Image


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
