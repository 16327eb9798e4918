"""Image decoding, resizing and normalisation (no Ray; used by the Ray Data pipeline and serve)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "decode_image",
    "normalize_images",
    "to_rgb_upright",
    "validate_image_bytes",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb_upright(im: Image.Image) -> Image.Image:
    """EXIF orientation applied; grayscale, CMYK, palette and the like converted to RGB; an alpha
    channel composited over white (dropping it would expose whatever colour hides under
    transparent pixels)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def validate_image_bytes(data: bytes, quality: int = 95) -> tuple[bytes, int, int, str | None]:
    """Check that ``data`` is a whole, readable image and make it an upright RGB JPEG.

    Returns ``(jpeg_bytes, width, height, change)``: the original bytes when they already are an
    upright RGB JPEG (``change`` None), else a re-encoded JPEG and what was changed (e.g.
    ``"CMYK -> RGB"``, ``"EXIF rotation"``, ``"PNG -> JPEG"``).

    Raises:
        ValueError: empty, truncated or unreadable data, with the reason.
    """
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes every byte: a truncated file fails here
            fmt, mode = im.format, im.mode
            orientation = im.getexif().get(0x0112, 1)
            if fmt == "JPEG" and mode == "RGB" and orientation in (1, None):
                return data, im.width, im.height, None
            fixed = to_rgb_upright(im)
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise ValueError(f"unreadable or truncated image: {e}") from e
    changes = []
    if fmt != "JPEG":
        changes.append(f"{fmt} -> JPEG")
    if mode != "RGB":
        changes.append(f"{mode} -> RGB")
    if orientation not in (1, None):
        changes.append(f"EXIF orientation {orientation} applied")
    out = io.BytesIO()
    fixed.save(out, format="JPEG", quality=quality)
    return out.getvalue(), fixed.width, fixed.height, ", ".join(changes)


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Decode encoded image bytes to an upright RGB ``uint8`` array of ``image_size``².

    Raises:
        ValueError: the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = to_rgb_upright(im)
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"not a readable image ({len(data)} bytes): {e}") from e


def normalize_images(
    images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> ImageNet-normalised ``float32 [B, 3, H, W]``."""
    x = torch.as_tensor(images, device=device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
