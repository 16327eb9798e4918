"""Checking untrusted image uploads before anything decodes them (no Ray, no web framework).

Every way an upload can be bad maps to an :class:`UploadRejectedError` with an HTTP status and a
reason: empty (400), too many bytes (413), not an image content type (415), not an image or
truncated (400), too many pixels for the bytes (a decompression bomb) or absurd dimensions
(413). Only the header is parsed before the size checks, so a bomb is refused without ever
allocating its pixels. Nothing here fetches URLs.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from hericap.data.transforms import to_rgb_upright

__all__ = ["IMAGE_CONTENT_TYPES", "ImageLimits", "UploadRejectedError", "open_upload"]

IMAGE_CONTENT_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff"}
)


class UploadRejectedError(ValueError):
    """An upload that cannot be captioned: ``status`` (4xx) and ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may be: bytes, pixels, and the longest side."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 12_000


def check_content_type(content_type: str | None) -> str:
    """The bare media type of an image upload; 415 for anything else."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in IMAGE_CONTENT_TYPES:
        raise UploadRejectedError(
            415,
            f"content type {media or '(none)'!r} is not an image type; send the image bytes "
            f"with one of {sorted(IMAGE_CONTENT_TYPES)} or as multipart/form-data field 'image'",
        )
    return media


def open_upload(data: bytes, limits: ImageLimits) -> Image.Image:
    """Untrusted bytes -> an upright RGB image, or :class:`UploadRejectedError`."""
    if not data:
        raise UploadRejectedError(400, "empty body: no image bytes")
    if len(data) > limits.max_bytes:
        raise UploadRejectedError(413, f"{len(data)} bytes is over the limit of {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UploadRejectedError(413, f"decompression bomb refused: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise UploadRejectedError(
            400, f"not an image ({len(data)} bytes in no format Pillow reads)"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise UploadRejectedError(400, f"not a readable image ({len(data)} bytes): {e}") from e
    width, height = im.size
    if width < 1 or height < 1:
        raise UploadRejectedError(400, f"absurd dimensions {width}x{height}")
    if max(width, height) > limits.max_side:
        raise UploadRejectedError(
            413, f"dimensions {width}x{height} exceed the longest side of {limits.max_side}"
        )
    if width * height > limits.max_pixels:
        raise UploadRejectedError(
            413,
            f"{width}x{height} = {width * height} pixels is over the limit of "
            f"{limits.max_pixels} (a decompression bomb in {len(data)} bytes?)",
        )
    try:
        im.load()  # every byte decoded: a truncated file fails here
        return to_rgb_upright(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UploadRejectedError(400, f"unreadable or truncated image: {e}") from e
