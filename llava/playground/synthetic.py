"""Synthetic images, captions and conversations for the offline playground.

Every image holds one or two coloured shapes on a light, slightly noisy background, and every
caption/answer is derived from that image's metadata, so a model can only answer by looking.
Images have varied non-square sizes so that LLaVA's pad-to-square preprocessing matters.
All randomness flows from one seed, so the same seed gives byte-identical outputs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from llava.constants import IMAGE_TAG

logger = logging.getLogger(__name__)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 0),
    "purple": (130, 40, 170),
    "orange": (245, 130, 0),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
_POSITION_XY: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

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
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
DETAIL_PROMPTS: tuple[str, ...] = (
    "Describe the image in detail.",
    "What do you see in this picture? Please be detailed.",
    "Can you describe everything that is drawn in this image?",
)


@dataclass(frozen=True)
class ShapeSpec:
    """One drawn shape: what it is, its colour, where it sits, and its pixel box (x0, y0, x1, y1)."""

    shape: str
    color: str
    position: str
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to draw (and describe) one synthetic image."""

    file: str
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[ShapeSpec, ...]
    noise_seed: int

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (the per-image generation metadata)."""
        return asdict(self)


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
    gray = rng.randint(226, 246)
    background = (gray + rng.randint(-6, 6), gray + rng.randint(-6, 6), gray + rng.randint(-6, 6))
    return ImageSpec(file, width, height, background, tuple(specs), rng.randrange(2**31))


def _star_points(x0: int, y0: int, x1: int, y1: int) -> list[tuple[float, float]]:
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


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


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(s: ShapeSpec) -> str:
    return f"{_article(s.color)} {s.color} {s.shape}"


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"in the {position} corner"


def describe_caption(spec: ImageSpec, rng: random.Random) -> str:
    """Short caption naming every shape's colour, shape and position."""
    parts = [f"{_phrase(s)} {_where(s.position)}" for s in spec.shapes]
    body = parts[0] if len(parts) == 1 else f"{parts[0]} and {parts[1]}"
    template = rng.choice(
        (
            "{body}.",
            "{body} on a light background.",
            "a simple drawing of {body}.",
            "an image showing {body}.",
        )
    )
    text = template.format(body=body)
    return text[0].upper() + text[1:]


def describe_detail(spec: ImageSpec) -> str:
    """Longer multi-sentence description (shape count, layout, orientation) for detail questions."""
    n = len(spec.shapes)
    orientation = "wider than it is tall" if spec.width > spec.height else "taller than it is wide"
    noun = "shape" if n == 1 else "shapes"
    sentences = [f"The image is {orientation} and shows {NUMBER_WORDS[n]} {noun} on a light background."]
    for s in spec.shapes:
        sentences.append(f"There is {_phrase(s)} {_where(s.position)}.")
    if n == 2:
        a, b = spec.shapes
        sentences.append(f"The {a.shape} is {a.color}, while the {b.shape} is {b.color}.")
    sentences.append("Nothing else is drawn in the picture.")
    return " ".join(sentences)


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _vqa_pool(spec: ImageSpec, rng: random.Random) -> list[tuple[str, str]]:
    """All candidate (question, short answer) pairs for one image."""
    qa: list[tuple[str, str]] = []
    n = len(spec.shapes)
    for s in spec.shapes:
        qa.append((f"What color is the {s.shape}?", _cap(s.color)))
        qa.append((f"What shape is the {s.color} object?", _cap(s.shape)))
        qa.append((f"Where is the {s.color} {s.shape}?", _cap(s.position)))
        qa.append((f"Which shape is {_where(s.position)} of the image?", _cap(s.shape)))
    qa.append(("How many shapes are in the image?", _cap(NUMBER_WORDS[n])))
    present = {(s.color, s.shape) for s in spec.shapes}
    s = rng.choice(spec.shapes)
    qa.append((f"Is there {_phrase(s)} in the image?", "Yes"))
    for _ in range(10):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in present:
            qa.append((f"Is there {_article(color)} {color} {shape} in the image?", "No"))
            break
    absent_colors = [c for c in sorted(COLORS) if c not in {s.color for s in spec.shapes}]
    qa.append((f"Is anything {rng.choice(absent_colors)} drawn in the picture?", "No"))
    return qa


def image_conversation(spec: ImageSpec, rng: random.Random) -> list[dict[str, str]]:
    """Multi-turn (1-3 rounds) VQA about one image, mix665k style; the tag goes in round one."""
    pool = _vqa_pool(spec, rng)
    rng.shuffle(pool)
    rounds = rng.choice((1, 2, 2, 3))
    turns: list[tuple[str, str]] = []
    if rng.random() < 0.2:
        turns.append((rng.choice(DETAIL_PROMPTS), describe_detail(spec)))
    short_suffix = rng.random() < 0.6
    for question, answer in pool[: rounds - len(turns)]:
        if short_suffix:
            turns.append((f"{question}\n{SHORT_ANSWER_SUFFIX}", answer))
        else:
            turns.append((question, answer if answer in ("Yes", "No") else f"{answer}."))
    conv: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            question = f"{IMAGE_TAG}\n{question}" if rng.random() < 0.8 else f"{question}\n{IMAGE_TAG}"
        conv.append({"from": "human", "value": question})
        conv.append({"from": "gpt", "value": answer})
    return conv


_OPPOSITES = {
    "big": "small", "hot": "cold", "up": "down", "left": "right", "fast": "slow",
    "light": "dark", "open": "closed", "old": "new", "happy": "sad", "early": "late",
}  # fmt: skip
_WORDS = ("cat", "tree", "house", "river", "apple", "light", "shape", "green", "music", "cloud")


def text_conversation(rng: random.Random) -> list[dict[str, str]]:
    """Text-only multi-turn chat (arithmetic and word questions), with no image tag."""
    turns: list[tuple[str, str]] = []
    for _ in range(rng.choice((1, 1, 2))):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            turns.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        elif kind == 1:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            turns.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
        elif kind == 2:
            word = rng.choice(sorted(_OPPOSITES))
            turns.append(
                (
                    f'What is the opposite of the word "{word}"?',
                    f'The opposite of "{word}" is "{_OPPOSITES[word]}".',
                )
            )
        else:
            word = rng.choice(_WORDS)
            turns.append(
                (
                    f'How many letters are in the word "{word}"?',
                    f'The word "{word}" has {NUMBER_WORDS[len(word)]} letters.',
                )
            )
    conv: list[dict[str, str]] = []
    for question, answer in turns:
        conv.append({"from": "human", "value": question})
        conv.append({"from": "gpt", "value": answer})
    return conv


def two_image_conversation(first: ImageSpec, second: ImageSpec, rng: random.Random) -> list[dict[str, str]]:
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
        answer = f"{_cap(NUMBER_WORDS[total])}."
    return [{"from": "human", "value": head + question}, {"from": "gpt", "value": answer}]


def caption_conversation(spec: ImageSpec, rng: random.Random) -> list[dict[str, str]]:
    """Single-turn caption request (LCS-558K style); the tag goes before or after the prompt."""
    prompt = rng.choice(CAPTION_PROMPTS)
    value = f"{IMAGE_TAG}\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n{IMAGE_TAG}"
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


# --------------------------------------------------------------------------------------------
# Whole playground
# --------------------------------------------------------------------------------------------

GENERATED_ENTRIES: tuple[str, ...] = (
    "images",
    "pretrain.json",
    "finetune.json",
    "image_metadata.json",
    "vision_tower",
    "llm",
    "manifest.json",
    "README.md",
    "demo_requests.jsonl",
    "videos",
    "video_pretrain.json",
    "video_finetune.json",
    "video_metadata.json",
    "video_demo_requests.jsonl",
    "video_tower",
)
"""Top-level names the builder writes; ``force`` removes only these, never other files."""


def prepare_out_dir(out_dir: Path, force: bool, entries: Iterable[str] = GENERATED_ENTRIES) -> None:
    """Create ``out_dir``; a non-empty one is a FileExistsError unless ``force``, which removes only ``entries``
    (the names a builder writes), never other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"output directory {out_dir} is not empty; pass --force (force=True) to overwrite it")
        for name in entries:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        logger.warning("overwriting playground outputs in %s", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented UTF-8 JSON."""
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


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
            (f"What color is the {shape.shape}?", _cap(shape.color)),
            (f"What shape is the {shape.color} object?", _cap(shape.shape)),
        ][i % 2]
        requests.append(
            {
                "id": f"demo_{i:03d}",
                "image": spec.file,
                "prompt": f"{question}\n{SHORT_ANSWER_SUFFIX}",
                "expected": answer,
            }
        )
    return specs, requests


def build_playground(
    out_dir: str | Path,
    num_pretrain: int = 600,
    num_finetune: int = 600,
    seed: int = 0,
    force: bool = False,
    vocab_size: int = 1000,
    num_video_pretrain: int = 160,
    num_video_finetune: int = 160,
) -> dict[str, Any]:
    """Write images, videos, LLaVA / Video-LLaVA JSON, tiny image and video CLIP towers, tiny LLaMA
    + tokenizer and a manifest.

    ``video_finetune.json`` mixes video, image (reusing ``images/``), video+image and text-only
    samples. ``num_video_pretrain = num_video_finetune = 0`` writes no videos (the video tower is
    still saved). Offline and deterministic for a given ``seed``. Refuses a non-empty ``out_dir``
    unless ``force``. Returns the manifest dict (also written to ``out_dir/manifest.json``).
    """
    from llava.data.video import DEFAULT_NUM_FRAMES
    from llava.playground import synthetic_video as sv
    from llava.playground.tiny_models import (
        LLM_DEFAULTS,
        VISION_DEFAULTS,
        save_llm,
        save_video_tower,
        save_vision_tower,
    )
    from llava.playground.tokenizer import train_playground_tokenizer

    out = Path(out_dir)
    prepare_out_dir(out, force)
    data = generate_data(num_pretrain, num_finetune, seed)
    write_images(data.all_images, out / "images")
    write_json(out / "pretrain.json", data.pretrain)
    write_json(out / "finetune.json", data.finetune)
    write_json(out / "image_metadata.json", {spec.file: spec.to_json() for spec in data.all_images})
    demo_specs, demo = demo_requests(seed)
    write_images(demo_specs, out / "images", desc="demo images")
    write_jsonl(out / "demo_requests.jsonl", demo)

    vdata = sv.generate_video_data(num_video_pretrain, num_video_finetune, seed, images=data.all_images)
    video_demo_specs: list[sv.VideoSpec] = []
    video_demo: list[dict[str, Any]] = []
    if vdata.pretrain or vdata.finetune:
        sv.write_videos(vdata.all_videos, out / "videos")
        video_demo_specs, video_demo = sv.video_demo_requests(seed)
        sv.write_videos(video_demo_specs, out / "videos", desc="demo videos")
        write_json(out / "video_pretrain.json", vdata.pretrain)
        write_json(out / "video_finetune.json", vdata.finetune)
        write_json(out / "video_metadata.json", {spec.file: spec.to_json() for spec in vdata.all_videos})
        write_jsonl(out / "video_demo_requests.jsonl", video_demo)

    tokenizer = train_playground_tokenizer(corpus_texts(data) + sv.video_corpus_texts(vdata), vocab_size=vocab_size)
    vision = save_vision_tower(out / "vision_tower", seed=seed)
    video_tower = save_video_tower(out / "video_tower", seed=seed)
    llm = save_llm(out / "llm", tokenizer, seed=seed)

    vcfg, tcfg = vision.config, video_tower.config
    num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    frame_tokens = (tcfg.image_size // tcfg.patch_size) ** 2 + 1
    vft = vdata.finetune
    manifest: dict[str, Any] = {
        "seed": seed,
        "images": {
            "dir": "images",
            "count": len(data.all_images) + len(demo_specs),
            "demo": len(demo_specs),
            "pretrain": len(data.pretrain_images),
            "finetune": len(data.finetune_images),
            "metadata": "image_metadata.json",
        },
        "pretrain": {"file": "pretrain.json", "samples": len(data.pretrain)},
        "demo_requests": {"file": "demo_requests.jsonl", "requests": len(demo), "images": "held out from training"},
        "finetune": {
            "file": "finetune.json",
            "samples": len(data.finetune),
            "text_only": sum("image" not in s for s in data.finetune),
            "two_image": sum(isinstance(s.get("image"), list) for s in data.finetune),
        },
        "vision_tower": {
            "dir": "vision_tower",
            "class": type(vision).__name__,
            **{k: getattr(vcfg, k) for k in VISION_DEFAULTS},
            "tokens_per_image": num_patches + 1,
            "parameters": vision.num_parameters(),
        },
        "videos": {
            "dir": "videos",
            "count": len(vdata.all_videos) + len(video_demo_specs),
            "demo": len(video_demo_specs),
            "pretrain": len(vdata.pretrain_videos),
            "finetune": len(vdata.finetune_videos),
            "frames_per_video": list(sv.VIDEO_FRAME_RANGE),
            "fps": sv.VIDEO_FPS,
            "sizes": [list(size) for size in sv.VIDEO_SIZES],
            "codec": sv.VIDEO_CODEC,
            "metadata": "video_metadata.json" if vdata.all_videos else None,
        },
        "video_pretrain": {"file": "video_pretrain.json", "samples": len(vdata.pretrain)},
        "video_finetune": {
            "file": "video_finetune.json",
            "samples": len(vft),
            "video": sum("video" in s and "image" not in s for s in vft),
            "image": sum("image" in s and "video" not in s for s in vft),
            "video_and_image": sum("video" in s and "image" in s for s in vft),
            "text_only": sum("video" not in s and "image" not in s for s in vft),
        },
        "video_demo_requests": {
            "file": "video_demo_requests.jsonl",
            "requests": len(video_demo),
            "videos": "held out from training",
        },
        "video_tower": {
            "dir": "video_tower",
            "class": type(video_tower).__name__,
            **{k: getattr(tcfg, k) for k in VISION_DEFAULTS},
            "tokens_per_frame": frame_tokens,
            "frames_per_video": DEFAULT_NUM_FRAMES,
            "tokens_per_video": DEFAULT_NUM_FRAMES * frame_tokens,
            "parameters": video_tower.num_parameters(),
        },
        "llm": {
            "dir": "llm",
            "class": type(llm).__name__,
            **{k: getattr(llm.config, k) for k in LLM_DEFAULTS},
            "vocab_size": len(tokenizer),
            "parameters": llm.num_parameters(),
        },
    }
    write_json(out / "manifest.json", manifest)
    (out / "README.md").write_text(_readme(manifest), encoding="utf-8")
    return manifest


def _readme(m: dict[str, Any]) -> str:
    v, lm, ft = m["vision_tower"], m["llm"], m["finetune"]
    return (
        "# duet-vlm playground\n\n"
        "Synthetic, offline data and tiny random models for smoke-testing LLaVA-1.5 training and\n"
        f"inference (generated by `python -m llava.tools.make_playground`, seed {m['seed']}).\n"
        "The models are random: they exercise the code paths, not quality.\n\n"
        f"- `images/`: {m['images']['count']} PNGs (96-192 px, non-square), 1-2 coloured shapes each;\n"
        "  per-image shapes/colours/positions in `image_metadata.json`.\n"
        f"- `pretrain.json`: {m['pretrain']['samples']} caption samples (LCS-558K style).\n"
        f"- `finetune.json`: {ft['samples']} multi-turn samples (mix665k style): {ft['text_only']} "
        f"text-only, {ft['two_image']} with two images, the rest single-image VQA.\n"
        f"- `vision_tower/`: tiny random CLIPVisionModel, image {v['image_size']}, patch {v['patch_size']} "
        f"({v['tokens_per_image']} tokens), hidden {v['hidden_size']}, {v['num_hidden_layers']} layers, "
        "plus its CLIPImageProcessor.\n"
        f"- `llm/`: tiny random LlamaForCausalLM, hidden {lm['hidden_size']}, {lm['num_hidden_layers']} "
        f"layers, {lm['num_attention_heads']} heads / {lm['num_key_value_heads']} KV heads, "
        f"vocab {lm['vocab_size']}, plus its locally trained tokenizer.\n"
        f"{_readme_video(m)}"
        "- `manifest.json`: the counts and model sizes above, machine-readable.\n"
    )


def _readme_video(m: dict[str, Any]) -> str:
    vids, vft, t = m["videos"], m["video_finetune"], m["video_tower"]
    tower = (
        f"- `video_tower/`: the same tiny CLIPVisionModel at Video-LLaVA frame geometry: image "
        f"{t['image_size']}, patch {t['patch_size']} ({t['tokens_per_frame']} tokens per frame, "
        f"{t['frames_per_video']} sampled frames = {t['tokens_per_video']} tokens per video), plus its processor.\n"
    )
    if not vids["count"]:
        return tower
    lo, hi = vids["frames_per_video"]
    sizes = ", ".join(f"{w}x{h}" for w, h in vids["sizes"])
    return (
        f"- `videos/`: {vids['count']} {vids['codec']} MP4s ({lo}-{hi} frames at {vids['fps']} fps, {sizes}) of a "
        "coloured shape moving left/right/up/down, sometimes changing colour or next to a still shape;\n"
        "  per-video specs in `video_metadata.json`. Use as `--video_folder`; image samples refer to `images/`.\n"
        f"- `video_pretrain.json`: {m['video_pretrain']['samples']} video caption samples.\n"
        f"- `video_finetune.json`: {vft['samples']} samples (Video-LLaVA style): {vft['video']} video QA, "
        f"{vft['image']} image VQA, {vft['video_and_image']} video+image, {vft['text_only']} text-only.\n"
        f"- `video_demo_requests.jsonl`: {m['video_demo_requests']['requests']} questions on held-out videos "
        "with expected answers.\n"
        f"{tower}"
    )
