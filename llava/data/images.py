"""Load images and turn them into ``pixel_values`` the way LLaVA-1.5 does.

Independent of the dataset so inference and data checks use the same code path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

AspectRatio = Literal["pad", "square"]
ASPECT_RATIOS: tuple[str, ...] = ("pad", "square")


class ImageError(ValueError):
    """An image file is missing, unreadable or corrupt; the message names the path."""


ALPHA_BACKGROUND = (255, 255, 255)
"""Colour transparent pixels are composited onto (white, as transformers' ``convert_rgb`` does)."""
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image fully (so corrupt files fail here, not later), as displayed, in RGB."""
    return inspect_image(path)[0]


def inspect_image(path: str | os.PathLike[str]) -> tuple[Image.Image, str | None]:
    """:func:`load_image` plus what the conversion to 8-bit RGB lost (``None`` when nothing did)."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError as error:
        raise ImageError(f"image file not found: {path}") from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"cannot read image {path}: {error}") from error


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """The image as displayed (EXIF orientation applied) in 8-bit RGB, and what the conversion lost.

    Pillow's own ``convert("RGB")`` clips 16-bit, 32-bit and float pixels instead of scaling them (a 50 %
    grey 16-bit PNG turns white) and drops alpha onto black; here high-bit-depth images are scaled to
    8 bits and transparency is composited onto :data:`ALPHA_BACKGROUND`.
    """
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image, dtype=np.int64)
        lossy = "16-bit pixels reduced to 8 bits"
        if values.size and (values.min() < 0 or values.max() > 65535):
            lossy = f"32-bit pixels outside 0-65535 (min {values.min()}, max {values.max()}) clipped"
        scaled = np.clip(values, 0, 65535) // 257  # 0-65535 onto 0-255, exactly (65535 = 255 * 257)
        if mode == "I" and values.size and values.min() >= 0 and values.max() <= 255:
            scaled, lossy = values, None  # 8-bit data stored as 32-bit integers: nothing to scale
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB"), lossy
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        high = float(finite.max()) if finite.size else 0.0
        low = float(finite.min()) if finite.size else 0.0
        scale = 255.0 if high <= 1.0 else 1.0  # floats in 0-1 (common) or already in 0-255
        lossy = "float pixels reduced to 8 bits"
        if low < 0 or high * scale > 255.0 or finite.size != values.size:
            lossy = f"float pixels outside the displayable range (min {low:g}, max {high:g}) or not finite, clipped"
        pixels = np.clip(np.nan_to_num(values * scale, nan=0.0), 0, 255).round().astype(np.uint8)
        return Image.fromarray(pixels, mode="L").convert("RGB"), lossy
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        lossy = None if alpha.getextrema() == (255, 255) else "transparency composited onto white"
        canvas = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        canvas.paste(rgba.convert("RGB"), mask=alpha)
        return canvas, lossy
    if mode in ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return (image if mode == "RGB" else image.convert("RGB")), None
    raise ValueError(f"unsupported image mode {mode!r}")


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
