"""Load images and turn them into ``pixel_values`` the way LLaVA-1.5 does.

Independent of the dataset so inference and data checks use the same code path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from PIL import Image

AspectRatio = Literal["pad", "square"]
ASPECT_RATIOS: tuple[str, ...] = ("pad", "square")


class ImageError(ValueError):
    """An image file is missing, unreadable or corrupt; the message names the path."""


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image fully (so corrupt files fail here, not later) and convert it to RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise ImageError(f"image file not found: {path}") from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from error


def processor_background(processor: Any) -> tuple[int, int, int]:
    """The processor's mean colour in 0-255, the padding colour LLaVA uses (it normalises to ~0)."""
    return tuple(int(channel * 255) for channel in processor.image_mean)  # type: ignore[return-value]


def expand_to_square(image: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
    """Paste ``image`` centred on a square canvas of ``background_rgb`` (LLaVA's ``pad`` mode),
    so the processor's centre crop keeps the whole picture."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_rgb)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_images(images: Sequence[Image.Image], processor: Any, aspect_ratio: str = "pad") -> torch.Tensor:
    """Apply the aspect-ratio policy then the HF image processor; returns float ``[N, 3, H, W]``.

    ``pad`` squares the image on the mean colour first; ``square`` lets the processor resize and
    centre-crop directly (cutting the sides of non-square images).
    """
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {aspect_ratio!r}")
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    if aspect_ratio == "pad":
        background = processor_background(processor)
        images = [expand_to_square(image, background) for image in images]
    return processor(list(images), return_tensors="pt")["pixel_values"]


def load_and_preprocess(
    paths: Sequence[str | os.PathLike[str]], processor: Any, aspect_ratio: str = "pad"
) -> torch.Tensor:
    """Load every path (errors name the file) and preprocess them into one ``[N, 3, H, W]`` tensor."""
    return preprocess_images([load_image(path) for path in paths], processor, aspect_ratio)
