"""Image decoding, resizing and normalisation (no Ray; used by the Ray Data pipeline and serve)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps

from hericap.config.schema import RESIZE_MODES

if TYPE_CHECKING:
    from hericap.config.schema import DatasetConfig

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MEAN_RGB",
    "ResizeSpec",
    "crop_batch",
    "load_image",
    "normalize_images",
    "prepare_batch",
    "resize_spec",
    "resize_to_canvas",
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


# The ImageNet mean as uint8: padding with it is zero after normalisation.
MEAN_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)


@dataclass(frozen=True)
class ResizeSpec:
    """How images are resized before the model sees them.

    * ``square``: every image becomes ``size`` × ``size`` (tiny presets, synthetic data).
    * ``max_side``: the paper's rule (GRIT): keep the aspect ratio and scale (up or down) to the
      largest size whose short side is at most ``min_size`` and long side at most ``max_size``
      (384 and 640), so one of the two limits is reached. The result is padded with the
      ImageNet mean onto a ``max_size`` × ``max_size`` canvas (landscape and portrait both
      fit), so a batch is one array; the real height and width travel next to it and
      :func:`crop_batch` trims the batch back to what its largest image needs.
    * ``maxwh``: the research code's rule (GRIT/HierCap ``MaxWHResize``, its
      ``transform_cfg.size = [384, 640]``): keep the aspect ratio and scale (up or down) by
      ``min(max_size / width, min_size / height)``, truncating the new sides as it does, so the
      image fits ``min_size`` high × ``max_size`` wide; the canvas is that box.
    """

    mode: str = "square"
    size: int = 64
    min_size: int = 384
    max_size: int = 640

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {self.mode!r}")
        if min(self.size, self.min_size, self.max_size) <= 0 or self.min_size > self.max_size:
            raise ValueError(f"bad resize sizes in {self}")

    @property
    def canvas(self) -> tuple[int, int]:
        """``(height, width)`` of the arrays the pipeline emits."""
        if self.mode == "maxwh":
            return self.min_size, self.max_size
        side = self.size if self.mode == "square" else self.max_size
        return side, side

    @property
    def model_size(self) -> int | tuple[int, int]:
        """The input size a model is built for (it accepts any size; this sets its defaults)."""
        return self.size if self.mode == "square" else (self.min_size, self.max_size)

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` an image of that size is resized to."""
        if self.mode == "square":
            return self.size, self.size
        if self.mode == "maxwh":
            # the research expression, float for float: int() truncates (500x292 -> 640x373)
            scale = min(self.max_size / width, self.min_size / height)
            return max(1, int(width * scale)), max(1, int(height * scale))
        short, long = min(width, height), max(width, height)
        scale = min(self.min_size / short, self.max_size / long)
        return max(1, round(width * scale)), max(1, round(height * scale))


def resize_spec(dataset: DatasetConfig) -> ResizeSpec:
    """The :class:`ResizeSpec` of a run's ``dataset.*`` keys."""
    return ResizeSpec(
        mode=dataset.resize,
        size=dataset.image_size,
        min_size=dataset.min_size,
        max_size=dataset.max_size,
    )


def load_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> upright RGB PIL image.

    Raises:
        ValueError: the bytes are not a readable image.
    """
    try:
        im = Image.open(io.BytesIO(data))  # in memory: nothing to close
        im.load()
        return to_rgb_upright(im)
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"not a readable image ({len(data)} bytes): {e}") from e


def resize_to_canvas(im: Image.Image, spec: ResizeSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize ``im`` by ``spec`` and pad it onto the canvas (top-left).

    Returns the ``uint8 [H, W, 3]`` canvas and the image's real ``(height, width)`` on it.
    """
    size = spec.target_size(*im.size)
    if im.size != size:
        im = im.resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    canvas_h, canvas_w = spec.canvas
    if arr.shape[:2] == (canvas_h, canvas_w):
        return arr, (canvas_h, canvas_w)
    out = np.empty((canvas_h, canvas_w, 3), dtype=np.uint8)
    out[:] = MEAN_RGB
    out[: arr.shape[0], : arr.shape[1]] = arr
    return out, arr.shape[:2]


def crop_batch(
    images: np.ndarray, heights_widths: np.ndarray | None, multiple: int = 32
) -> np.ndarray:
    """Trim padded canvases ``[B, H, W, 3]`` to the largest real image of the batch.

    ``heights_widths`` is ``[B, 2]`` (None: nothing to trim); the kept size is rounded up to
    ``multiple`` (the model's coarsest stride) and never exceeds the canvas.
    """
    if heights_widths is None or len(heights_widths) == 0:
        return images
    h, w = np.asarray(heights_widths).max(axis=0)
    h = min(images.shape[1], -(-int(h) // multiple) * multiple)
    w = min(images.shape[2], -(-int(w) // multiple) * multiple)
    return images[:, :h, :w]


def normalize_images(
    images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> ImageNet-normalised ``float32 [B, 3, H, W]``."""
    x = torch.as_tensor(images, device=device)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def prepare_batch(
    images: np.ndarray,
    heights_widths: np.ndarray | None,
    multiple: int,
    zero_padding: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Padded canvases -> the model's input batch and the images' real sizes on it.

    Args:
        images: ``uint8 [B, H, W, 3]`` canvases (images top-left, padding after).
        heights_widths: ``[B, 2]`` real sizes (None: every canvas is all image).
        multiple: the batch is trimmed to its largest image rounded up to this
            (``Captioner.input_multiple``: 1 pads exactly to the largest image, as the research
            code's ``nested_tensor_from_tensor_list`` does).
        zero_padding: set the padding to 0 after normalisation (the research code pads the
            normalised tensors with zeros) instead of keeping the canvas's mean colour.
        device: where the tensor goes.

    Returns:
        ``float32 [B, 3, h, w]`` and ``int64 [B, 2]`` real sizes (None when not given).
    """
    x = normalize_images(crop_batch(images, heights_widths, multiple), device)
    if heights_widths is None:
        return x, None
    hw = torch.as_tensor(np.asarray(heights_widths), dtype=torch.long, device=x.device)
    if zero_padding:
        rows = torch.arange(x.shape[2], device=x.device)[None, :, None] >= hw[:, 0, None, None]
        cols = torch.arange(x.shape[3], device=x.device)[None, None, :] >= hw[:, 1, None, None]
        x = x.masked_fill((rows | cols)[:, None], 0.0)
    return x, hw
