"""The learnable playground task: 336 px scenes whose questions need local image content.

Every image is a 336 x 336 canvas (LLaVA-1.5's input geometry: 24 x 24 patches of 14 px, so a preset
that keeps 64 of 576 tokens means what it means on CLIP-L/14-336) divided into quadrants of 168 px.
One to three large shapes (radius 40-56 px) of distinct colour and shape sit in distinct quadrants;
about half the scenes add one *small dot* (radius 11-15 px: a few of the 576 patches) in the free
quadrant. Questions ask for:

* ``color_at``: the colour of the shape in a named quadrant;
* ``where``: the quadrant of the shape of a named colour;
* ``count``: how many large shapes there are;
* ``exists``: whether a large shape of a given colour is there (half yes, half no);
* ``dot`` / ``dot_where``: the colour / quadrant of the small dot (drop its few tokens and it is gone).

Answers are one capitalised word or a quadrant name, drawn so that no single answer is common: a model
that always gives the same answer scores low. All randomness flows from one seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from llava.constants import IMAGE_TAG
from llava.playground.conversations import SHORT_ANSWER_SUFFIX
from llava.playground.drawing import COLORS, draw_shape, random_background

CANVAS = 336
"""Image side in pixels: CLIP-L/14-336's input, so no resizing happens in preprocessing."""
GRID = 2
CELL = CANVAS // GRID
SCENE_COLORS: dict[str, tuple[int, int, int]] = {name: rgb for name, rgb in COLORS.items() if name != "black"}
"""The playground's colours but black."""
SCENE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CELL_NAMES: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
"""Quadrant names in raster order (row-major), index = row * 2 + column."""
COUNT_WORDS: tuple[str, ...] = ("Zero", "One", "Two", "Three")
QUESTION_KINDS: tuple[str, ...] = ("color_at", "where", "count", "exists", "dot", "dot_where")
LARGE_RADIUS = (40, 56)
DOT_RADIUS = (11, 15)
_JITTER = 16


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: shape, colour, grid cell (raster index), centre and radius in pixels."""

    shape: str
    color: str
    cell: int
    center: tuple[int, int]
    radius: int

    @property
    def column(self) -> int:
        return self.cell % GRID

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        x, y = self.center
        return x - self.radius, y - self.radius, x + self.radius, y + self.radius


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw and ask about one image: its file, background, objects and dot."""

    file: str
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]
    dot: SceneObject | None
    noise_seed: int

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable metadata of the scene."""
        return asdict(self)

    def object_in(self, cell: int) -> SceneObject | None:
        """The large object in ``cell``, if any."""
        return next((obj for obj in self.objects if obj.cell == cell), None)


def random_scene(rng: random.Random, file: str, with_dot: bool | None = None) -> Scene:
    """A scene with 1-3 large objects (distinct colours, shapes and cells) and a dot (half the time, or as
    ``with_dot`` says)."""
    count = rng.randint(1, GRID * GRID - 1)
    cells = rng.sample(range(GRID * GRID), count + 1)
    colors = rng.sample(sorted(SCENE_COLORS), count)
    shapes = rng.sample(SCENE_SHAPES, count)
    objects = tuple(
        SceneObject(shape, color, cell, _jittered_center(rng, cell, _JITTER), rng.randint(*LARGE_RADIUS))
        for shape, color, cell in zip(shapes, colors, cells, strict=False)
    )
    dot = None
    if (rng.random() < 0.5) if with_dot is None else with_dot:
        radius = rng.randint(*DOT_RADIUS)
        dot_cell = cells[-1]
        dot = SceneObject("circle", rng.choice(sorted(SCENE_COLORS)), dot_cell,
                          _jittered_center(rng, dot_cell, CELL // 2 - radius - 4), radius)  # fmt: skip
    background = random_background(rng, low=222, high=244, spread=8)
    return Scene(file, background, objects, dot, rng.randrange(2**31))


def _jittered_center(rng: random.Random, cell: int, jitter: int) -> tuple[int, int]:
    row, column = divmod(cell, GRID)
    return (
        column * CELL + CELL // 2 + rng.randint(-jitter, jitter),
        row * CELL + CELL // 2 + rng.randint(-jitter, jitter),
    )


def draw_scene(scene: Scene) -> Image.Image:
    """Render ``scene`` as a 336 x 336 RGB image (deterministic: shading from ``scene.noise_seed``)."""
    # Smooth, low-frequency shading (6 x 6 noise upsampled): a background that is not flat, yet PNGs stay
    # small (per-pixel noise would make every 336 px PNG ~200 KB).
    shading = np.random.default_rng(scene.noise_seed).integers(-12, 13, size=(6, 6, 3))
    pixels = np.clip(np.asarray(scene.background, dtype=np.int16) + shading, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB").resize((CANVAS, CANVAS), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for obj in (*scene.objects, *([scene.dot] if scene.dot else [])):
        _draw_object(draw, obj, SCENE_COLORS[obj.color])
    return image


def draw_label_map(scene: Scene) -> np.ndarray:
    """[336, 336] int map: 0 background, ``i + 1`` where large object ``i`` is drawn, ``len + 1`` the dot."""
    labels = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(labels)
    for index, obj in enumerate(scene.objects):
        _draw_object(draw, obj, index + 1)
    if scene.dot is not None:
        _draw_object(draw, scene.dot, len(scene.objects) + 1)
    return np.asarray(labels)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, fill: Any) -> None:
    draw_shape(draw, obj.shape, obj.bbox, fill, square_inset=0.1, cross_half_width=0.17)


def write_scenes(scenes: Iterable[Scene], image_dir: Path) -> int:
    """Draw and save every scene as PNG under ``image_dir``; returns the number written."""
    image_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for scene in scenes:
        draw_scene(scene).save(image_dir / scene.file, format="PNG")
        written += 1
    return written


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneQuestion:
    """A question about one scene, its one-word answer and its kind (one of :data:`QUESTION_KINDS`)."""

    kind: str
    question: str
    answer: str


def _name(obj: SceneObject) -> str:
    return f"{obj.color} {obj.shape}"


def ask(scene: Scene, kind: str, rng: random.Random) -> SceneQuestion | None:
    """A random question of ``kind`` about ``scene``, or ``None`` when the scene cannot answer one."""
    objects = scene.objects
    if kind == "color_at":
        obj = rng.choice(objects)
        return SceneQuestion(kind, f"What color is the shape in the {CELL_NAMES[obj.cell]}?", obj.color.capitalize())
    if kind == "where":
        obj = rng.choice(objects)
        return SceneQuestion(kind, f"Where is the large {obj.color} shape?", CELL_NAMES[obj.cell].capitalize())
    if kind == "count":
        return SceneQuestion(kind, "How many large shapes are there?", COUNT_WORDS[len(objects)])
    if kind == "exists":
        present = sorted({obj.color for obj in objects})
        if rng.random() < 0.5:
            return SceneQuestion(kind, f"Is there a large {rng.choice(present)} shape?", "Yes")
        absent = [color for color in sorted(SCENE_COLORS) if color not in present]
        return SceneQuestion(kind, f"Is there a large {rng.choice(absent)} shape?", "No")
    if kind in ("dot", "dot_where"):
        if scene.dot is None:
            return None
        if kind == "dot":
            return SceneQuestion(kind, "What color is the small dot?", scene.dot.color.capitalize())
        return SceneQuestion(kind, "Where is the small dot?", CELL_NAMES[scene.dot.cell].capitalize())
    raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")


def ask_many(scene: Scene, rng: random.Random, count: int) -> list[SceneQuestion]:
    """Up to ``count`` distinct questions about ``scene``: every kind once (random order), then again."""
    questions: list[SceneQuestion] = []
    asked: set[str] = set()
    for _ in range(3):
        kinds = list(QUESTION_KINDS)
        rng.shuffle(kinds)
        for kind in kinds:
            question = ask(scene, kind, rng)
            if question is not None and question.question not in asked:
                asked.add(question.question)
                questions.append(question)
            if len(questions) == count:
                return questions
    return questions


def caption(scene: Scene) -> str:
    """A caption naming every object with its cell (raster order), then the dot: the pretraining target."""
    parts = [f"a {_name(obj)} in the {CELL_NAMES[obj.cell]}" for obj in sorted(scene.objects, key=lambda o: o.cell)]
    if scene.dot is not None:
        parts.append(f"a small {scene.dot.color} dot in the {CELL_NAMES[scene.dot.cell]}")
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + f" and {parts[-1]}"
    return f"{body[0].upper()}{body[1:]}."


CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Summarize the visual content of the image.",
    "List the objects in the picture and where they are.",
)


def caption_sample(scene: Scene, rng: random.Random, sample_id: str) -> dict[str, Any]:
    """One LLaVA pretraining sample (LCS-558K style) for ``scene``."""
    prompt = rng.choice(CAPTION_PROMPTS)
    return {
        "id": sample_id,
        "image": scene.file,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TAG}\n{prompt}"},
            {"from": "gpt", "value": caption(scene)},
        ],
    }


def vqa_sample(scene: Scene, rng: random.Random, sample_id: str, rounds: int) -> dict[str, Any]:
    """One multi-turn LLaVA instruction sample (mix665k style, short-answer suffix) for ``scene``."""
    conversations = []
    for turn, qa in enumerate(ask_many(scene, rng, rounds)):
        text = f"{qa.question}\n{SHORT_ANSWER_SUFFIX}"
        conversations.append({"from": "human", "value": f"{IMAGE_TAG}\n{text}" if turn == 0 else text})
        conversations.append({"from": "gpt", "value": qa.answer})
    return {"id": sample_id, "image": scene.file, "conversations": conversations}


def benchmark_scenes(rng: random.Random, count: int, prefix: str = "eval") -> list[tuple[Scene, str]]:
    """``count`` held-out scenes, each with the kind of its question: kinds dealt round robin, so every
    kind gets the same share (scenes for the dot kinds always have a dot)."""
    pairs = []
    for index in range(count):
        kind = QUESTION_KINDS[index % len(QUESTION_KINDS)]
        with_dot = True if kind.startswith("dot") else None
        pairs.append((random_scene(rng, f"{prefix}_{index:06d}.png", with_dot=with_dot), kind))
    return pairs


def benchmark_questions(pairs: Sequence[tuple[Scene, str]], rng: random.Random) -> list[dict[str, Any]]:
    """LLaVA question JSONL rows (plus the ``answer`` and ``category`` the playground benchmark scores
    with), one per ``(scene, kind)`` of :func:`benchmark_scenes`."""
    rows = []
    for index, (scene, kind) in enumerate(pairs):
        qa = ask(scene, kind, rng)
        if qa is None:
            raise ValueError(f"scene {scene.file} cannot answer a {kind!r} question")
        rows.append(
            {
                "question_id": index,
                "image": scene.file,
                "text": f"{qa.question}\n{SHORT_ANSWER_SUFFIX}",
                "answer": qa.answer,
                "category": qa.kind,
            }
        )
    return rows
