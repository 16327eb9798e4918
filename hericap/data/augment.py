"""RandAugment-style training augmentation that keeps captions true.

Each image gets ``num_ops`` operations drawn uniformly from ``ops``, each at ``magnitude``
(0–10, the RandAugment scale). The default operation list is the one GRIT trains with
(identity, auto-contrast, equalise, brightness, sharpness, shears, translations, rotation) plus
contrast. Operations that would make a caption false are left out on purpose: horizontal flips
swap "left" and "right"; hue, colour, solarise, posterise and invert change colour words.
Geometric operations fill uncovered pixels with the ImageNet mean (zero after normalisation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from hericap.config.schema import AUGMENTATIONS
from hericap.data.transforms import MEAN_RGB

__all__ = ["AUGMENT_OPS", "CAPTION_SAFE_OPS", "RandAugment", "train_augmentation"]


_MAX_MAGNITUDE = 10.0


def _signed(rng: np.random.Generator, value: float) -> float:
    return value if rng.random() < 0.5 else -value


def _enhance(kind: type) -> Callable[[Image.Image, float, np.random.Generator], Image.Image]:
    def op(im: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
        return kind(im).enhance(1.0 + _signed(rng, 0.9 * level))

    return op


def _affine(im: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return im.transform(
        im.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=MEAN_RGB
    )


def _shear_x(im: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    return _affine(im, (1, _signed(rng, 0.3 * level), 0, 0, 1, 0))


def _shear_y(im: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    return _affine(im, (1, 0, 0, _signed(rng, 0.3 * level), 1, 0))


def _translate_x(im: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    return _affine(im, (1, 0, _signed(rng, 0.1 * level) * im.width, 0, 1, 0))


def _translate_y(im: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    return _affine(im, (1, 0, 0, 0, 1, _signed(rng, 0.1 * level) * im.height))


def _rotate(im: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    return im.rotate(_signed(rng, 30.0 * level), Image.Resampling.BILINEAR, fillcolor=MEAN_RGB)


# name -> op(image, level in [0, 1], rng)
AUGMENT_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "identity": lambda im, level, rng: im,
    "autocontrast": lambda im, level, rng: ImageOps.autocontrast(im),
    "equalize": lambda im, level, rng: ImageOps.equalize(im),
    "brightness": _enhance(ImageEnhance.Brightness),
    "contrast": _enhance(ImageEnhance.Contrast),
    "sharpness": _enhance(ImageEnhance.Sharpness),
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
    "rotate": _rotate,
}
CAPTION_SAFE_OPS = tuple(AUGMENT_OPS)


@dataclass(frozen=True)
class RandAugment:
    """``num_ops`` random operations per image at ``magnitude`` (0–10)."""

    num_ops: int = 2
    magnitude: float = 5.0
    ops: tuple[str, ...] = CAPTION_SAFE_OPS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.ops) - set(AUGMENT_OPS))
        if unknown:
            raise ValueError(f"unknown augmentation ops {unknown}; valid: {sorted(AUGMENT_OPS)}")
        if self.num_ops < 0 or not 0 <= self.magnitude <= _MAX_MAGNITUDE or not self.ops:
            raise ValueError(
                f"RandAugment needs num_ops >= 0, 0 <= magnitude <= 10 and some ops, got {self}"
            )

    def __call__(self, im: Image.Image, rng: np.random.Generator) -> Image.Image:
        level = self.magnitude / _MAX_MAGNITUDE
        for i in rng.integers(len(self.ops), size=self.num_ops):
            im = AUGMENT_OPS[self.ops[i]](im, level, rng)
        return im


def train_augmentation(kind: str, num_ops: int = 2, magnitude: float = 5.0) -> RandAugment | None:
    """The augmentation named by ``dataset.augment`` (``none``: None)."""
    if kind == "none":
        return None
    if kind == "randaugment":
        return RandAugment(num_ops=num_ops, magnitude=magnitude)
    raise ValueError(f"unknown augmentation {kind!r}; known: {list(AUGMENTATIONS)}")
