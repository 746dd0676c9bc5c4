"""Colours, shapes and how the playground draws them: shared by the image, video and scene generators.

A shape is one of :data:`SHAPES` filled with one of :data:`COLORS`, inside a square pixel box. Images and
video frames are :class:`ImageSpec` canvases (a light, noisy background plus :class:`ShapeSpec` shapes);
the 336 px scenes draw the same shapes with their own proportions through :func:`draw_shape`.
Everything here is deterministic: randomness comes in only through the ``rng`` and seeds passed in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
    "purple": (130, 40, 170),
    "orange": (245, 130, 0),
    "black": (20, 20, 20),
}
"""Colour names and their RGB fill; names are what captions and answers say."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: what it is, its colour, where it sits, and its pixel box (x0, y0, x1, y1)."""

    shape: str
    color: str
    position: str
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to draw (and describe) one synthetic image or video frame."""

    file: str
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[ShapeSpec, ...]
    noise_seed: int

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (the per-image generation metadata)."""
        return asdict(self)


def random_background(rng: random.Random, low: int = 226, high: int = 246, spread: int = 6) -> tuple[int, int, int]:
    """A light grey in ``[low, high]`` with each channel moved by up to ``spread``, so backgrounds vary in tint.

    Draws ``rng.randint`` four times (grey, then red, green, blue): callers rely on that order for
    reproducible data.
    """
    gray = rng.randint(low, high)
    return (
        gray + rng.randint(-spread, spread),
        gray + rng.randint(-spread, spread),
        gray + rng.randint(-spread, spread),
    )


def draw_image(spec: ImageSpec) -> Image.Image:
    """Render ``spec`` to an RGB image (deterministic: noise comes from ``spec.noise_seed``)."""
    image = draw_background(spec.width, spec.height, spec.background, spec.noise_seed)
    draw_shapes(image, spec.shapes)
    return image


def draw_background(width: int, height: int, color: tuple[int, int, int], noise_seed: int) -> Image.Image:
    """Light canvas of ``color`` with +-8 per-pixel noise drawn from ``noise_seed``."""
    noise = np.random.default_rng(noise_seed).integers(-8, 9, size=(height, width, 3))
    base = np.asarray(color, dtype=np.int16)[None, None, :] + noise
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), mode="RGB")


def draw_shapes(image: Image.Image, shapes: Iterable[ShapeSpec]) -> None:
    """Draw ``shapes`` onto ``image`` in place, in order (later shapes on top)."""
    draw = ImageDraw.Draw(image)
    for s in shapes:
        draw_shape(draw, s.shape, s.bbox, COLORS[s.color])


def _star_points(x0: int, y0: int, x1: int, y1: int) -> list[tuple[float, float]]:
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    bbox: tuple[int, int, int, int],
    fill: Any,
    square_inset: float = 0.12,
    cross_half_width: float = 0.18,
) -> None:
    """Draw one ``shape`` filling ``bbox`` (x0, y0, x1, y1) with ``fill`` (a colour, or a label id on an
    ``L`` image). ``square_inset`` and ``cross_half_width`` are fractions of the box width."""
    x0, y0, x1, y1 = bbox
    if shape == "circle":
        draw.ellipse(bbox, fill=fill)
    elif shape == "square":
        inset = round((x1 - x0) * square_inset)
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        draw.polygon(_star_points(x0, y0, x1, y1), fill=fill)
    elif shape == "cross":
        half = (x1 - x0) * cross_half_width
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.rectangle((cx - half, y0, cx + half, y1), fill=fill)
        draw.rectangle((x0, cy - half, x1, cy + half), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
