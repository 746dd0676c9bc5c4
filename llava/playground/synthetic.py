"""Synthetic images, captions and conversations for the offline (shapes) playground.

Every image holds one or two coloured shapes on a light, slightly noisy background, and every
caption/answer is derived from that image's metadata, so a model can only answer by looking.
Images have varied non-square sizes so that LLaVA's pad-to-square preprocessing matters.
All randomness flows from one seed, so the same seed gives byte-identical outputs.
Colours, drawing and the wording shared with the video data live in :mod:`llava.playground.drawing`
and :mod:`llava.playground.conversations`; :mod:`llava.playground.builder` writes the whole playground.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llava.constants import IMAGE_TAG
from llava.data.templates import VICUNA_SYSTEM
from llava.playground.conversations import (
    NUMBER_WORDS,
    Conversation,
    cap,
    caption_request,
    demo_request,
    image_conversation,
    phrase,
    text_conversation,
    where,
)
from llava.playground.drawing import COLORS, SHAPES, ImageSpec, ShapeSpec, draw_image, random_background

logger = logging.getLogger(__name__)

POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
_POSITION_XY: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}

CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)


@dataclass
class PlaygroundData:
    """Generated specs and LLaVA-format samples (not yet written, except for the images)."""

    pretrain_images: list[ImageSpec] = field(default_factory=list)
    finetune_images: list[ImageSpec] = field(default_factory=list)
    pretrain: list[dict[str, Any]] = field(default_factory=list)
    finetune: list[dict[str, Any]] = field(default_factory=list)

    @property
    def all_images(self) -> list[ImageSpec]:
        """All image specs, pretrain first."""
        return self.pretrain_images + self.finetune_images


# --------------------------------------------------------------------------------------------
# Image specs and drawing
# --------------------------------------------------------------------------------------------


def random_image_spec(rng: random.Random, file: str, num_shapes: int | None = None) -> ImageSpec:
    """Sample a non-square canvas with 1-2 shapes of distinct shape, colour and position.

    Distinct shapes and colours within an image keep questions like "what color is the circle?"
    unambiguous.
    """
    width = rng.randint(96, 192)
    height = rng.randint(96, 192)
    while abs(width - height) < 16:
        height = rng.randint(96, 192)
    n = num_shapes if num_shapes is not None else rng.choice((1, 1, 2, 2, 2))
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(sorted(COLORS), n)
    positions = rng.sample(POSITIONS, n)
    side = min(width, height)
    specs = []
    for shape, color, position in zip(shapes, colors, positions, strict=True):
        radius = side * rng.uniform(0.12, 0.17)
        fx, fy = _POSITION_XY[position]
        cx = fx * width + rng.uniform(-0.04, 0.04) * width
        cy = fy * height + rng.uniform(-0.04, 0.04) * height
        bbox = (round(cx - radius), round(cy - radius), round(cx + radius), round(cy + radius))
        specs.append(ShapeSpec(shape, color, position, bbox))
    background = random_background(rng)
    return ImageSpec(file, width, height, background, tuple(specs), rng.randrange(2**31))


def write_images(specs: Iterable[ImageSpec], image_dir: Path, desc: str = "images") -> int:
    """Draw and save every spec as PNG under ``image_dir``; returns the number written."""
    image_dir.mkdir(parents=True, exist_ok=True)
    specs = list(specs)
    for spec in tqdm(specs, desc=desc, unit="img", leave=False):
        draw_image(spec).save(image_dir / spec.file, format="PNG", optimize=False)
    return len(specs)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def describe_caption(spec: ImageSpec, rng: random.Random) -> str:
    """Short caption naming every shape's colour, shape and position."""
    parts = [f"{phrase(s)} {where(s.position)}" for s in spec.shapes]
    body = parts[0] if len(parts) == 1 else f"{parts[0]} and {parts[1]}"
    template = rng.choice(
        (
            "{body}.",
            "{body} on a light background.",
            "a simple drawing of {body}.",
            "an image showing {body}.",
        )
    )
    return cap(template.format(body=body))


def two_image_conversation(first: ImageSpec, second: ImageSpec, rng: random.Random) -> Conversation:
    """One question comparing two images; a colour/shape that only one image has, else a count."""
    colors_a = {s.color for s in first.shapes}
    colors_b = {s.color for s in second.shapes}
    only = sorted(colors_a ^ colors_b)
    head = f"{IMAGE_TAG}\n{IMAGE_TAG}\n"
    if only and rng.random() < 0.7:
        color = rng.choice(only)
        which = "first" if color in colors_a else "second"
        question = f"Which image has the {color} shape, the first or the second?"
        answer = f"The {which} image."
    else:
        total = len(first.shapes) + len(second.shapes)
        question = "How many shapes are there in the two images together?"
        answer = f"{cap(NUMBER_WORDS[total])}."
    return [{"from": "human", "value": head + question}, {"from": "gpt", "value": answer}]


def caption_conversation(spec: ImageSpec, rng: random.Random) -> Conversation:
    """Single-turn caption request (LCS-558K style); the tag goes before or after the prompt."""
    value = caption_request(CAPTION_PROMPTS, IMAGE_TAG, rng)
    return [{"from": "human", "value": value}, {"from": "gpt", "value": describe_caption(spec, rng)}]


# --------------------------------------------------------------------------------------------
# Dataset assembly
# --------------------------------------------------------------------------------------------


def generate_data(num_pretrain: int, num_finetune: int, seed: int = 0) -> PlaygroundData:
    """Build image specs and LLaVA-format pretrain/finetune samples (nothing is written).

    Finetune mixes ~10% text-only chats, ~3% two-image comparisons (at least one of each when
    ``num_finetune >= 4``) and single-image multi-turn VQA for the rest.
    """
    rng = random.Random(seed)
    data = PlaygroundData()
    for i in range(num_pretrain):
        spec = random_image_spec(rng, f"pretrain_{i:06d}.png")
        data.pretrain_images.append(spec)
        data.pretrain.append(
            {"id": f"pretrain_{i:06d}", "image": spec.file, "conversations": caption_conversation(spec, rng)}
        )

    num_text = max(1, round(0.10 * num_finetune)) if num_finetune >= 4 else 0
    num_pair = max(1, round(0.03 * num_finetune)) if num_finetune >= 4 else 0
    kinds = ["text"] * num_text + ["pair"] * num_pair + ["image"] * (num_finetune - num_text - num_pair)
    rng.shuffle(kinds)

    def new_image() -> ImageSpec:
        spec = random_image_spec(rng, f"finetune_{len(data.finetune_images):06d}.png")
        data.finetune_images.append(spec)
        return spec

    for i, kind in enumerate(kinds):
        sample: dict[str, Any] = {"id": f"finetune_{i:06d}"}
        if kind == "text":
            sample["conversations"] = text_conversation(rng)
        elif kind == "pair":
            first, second = new_image(), new_image()
            sample["image"] = [first.file, second.file]
            sample["conversations"] = two_image_conversation(first, second, rng)
        else:
            spec = new_image()
            sample["image"] = spec.file
            sample["conversations"] = image_conversation(spec, rng)
        data.finetune.append(sample)
    logger.info(
        "generated %d pretrain and %d finetune samples (%d text-only, %d two-image), %d images",
        len(data.pretrain), len(data.finetune), num_text, num_pair, len(data.all_images),
    )  # fmt: skip
    return data


def corpus_texts(data: PlaygroundData) -> list[str]:
    """All text a tokenizer should see: every turn plus the Vicuna v1 template pieces."""
    texts = [VICUNA_SYSTEM, "USER:", "ASSISTANT:", f"{VICUNA_SYSTEM} USER: Hello! ASSISTANT: Hi.</s>"]
    for sample in data.pretrain + data.finetune:
        for turn in sample["conversations"]:
            texts.append(turn["value"].replace(IMAGE_TAG, "").strip())
    return texts


def demo_requests(seed: int, count: int = 8) -> tuple[list[ImageSpec], list[dict[str, Any]]]:
    """Held-out images (never in the training JSON) with one question each and its expected answer.

    The requests use the ``llava.tools.generate`` JSONL format plus an ``expected`` field, so a
    trained playground model can be checked by eye (or by a script) on unseen images.
    """
    rng = random.Random(f"demo-{seed}")
    specs = [random_image_spec(rng, f"demo_{i:03d}.png", num_shapes=1) for i in range(count)]
    requests = []
    for i, spec in enumerate(specs):
        shape = spec.shapes[0]
        question, answer = [
            (f"What color is the {shape.shape}?", cap(shape.color)),
            (f"What shape is the {shape.color} object?", cap(shape.shape)),
        ][i % 2]
        requests.append(demo_request(f"demo_{i:03d}", "image", spec.file, question, answer))
    return specs, requests
