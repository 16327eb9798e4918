"""Image decoding, resizing and normalisation (no Ray; used by the Ray Data pipeline and serve)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "decode_image", "normalize_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Decode encoded image bytes to an upright RGB ``uint8`` array of ``image_size``².

    Raises:
        ValueError: the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
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
