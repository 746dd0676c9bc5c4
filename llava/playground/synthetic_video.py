"""Synthetic videos of moving shapes, with captions and conversations, for the offline playground.

Each video shows one coloured shape sliding left, right, up or down across a light, slightly noisy
background; some videos add a second shape that stays still, and some make the moving shape change
colour halfway. Captions and answers come from each video's :class:`VideoSpec`, so a model can only
answer direction or colour-change questions by looking at several frames. Frames are drawn with the
same helpers as the images (:mod:`llava.playground.drawing`, :mod:`llava.playground.conversations`),
so shapes, colours and wording match the image data. All randomness flows from one seed (image data are
untouched: videos use their own random stream).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from llava.constants import IMAGE_TAG, VIDEO_TAG
from llava.data.video import write_video
from llava.playground.conversations import (
    DETAIL_PROMPTS,
    NUMBER_WORDS,
    Conversation,
    article,
    cap,
    caption_request,
    demo_request,
    image_conversation,
    phrase,
    text_conversation,
    vqa_conversation,
    where,
)
from llava.playground.drawing import (
    COLORS,
    SHAPES,
    ImageSpec,
    ShapeSpec,
    draw_background,
    draw_shapes,
    random_background,
)

logger = logging.getLogger(__name__)

VIDEO_SIZES: tuple[tuple[int, int], ...] = ((128, 96), (96, 128), (144, 96), (112, 80))
"""(width, height) choices: small, non-square and even (yuv420p needs even sizes)."""
VIDEO_FRAME_RANGE: tuple[int, int] = (12, 16)
"""Frames per video (inclusive), more than the 8 that Video-LLaVA samples."""
VIDEO_FPS = 8
VIDEO_CODEC = "mpeg4"
VIDEO_SUFFIX = ".mp4"

DIRECTIONS: tuple[str, ...] = ("right", "left", "down", "up")
_DIRECTION_PHRASE: dict[str, str] = {
    "right": "from left to right",
    "left": "from right to left",
    "down": "from top to bottom",
    "up": "from bottom to top",
}
_END_SIDE: dict[str, str] = {"right": "Right", "left": "Left", "down": "Bottom", "up": "Top"}
_END_PHRASE: dict[str, str] = {
    "right": "on the right side",
    "left": "on the left side",
    "down": "at the bottom",
    "up": "at the top",
}
_CORNERS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
_CORNER_XY: dict[str, tuple[float, float]] = {
    "top left": (0.2, 0.2),
    "top right": (0.8, 0.2),
    "bottom left": (0.2, 0.8),
    "bottom right": (0.8, 0.8),
}

VIDEO_CAPTION_PROMPTS: tuple[str, ...] = (
    "Describe the video concisely.",
    "Provide a brief description of the given video.",
    "Summarize what happens in the video.",
    "Give a short and clear explanation of the video.",
    "What happens in this video? Answer briefly.",
    "Share a concise interpretation of the video provided.",
    "Write a terse but informative summary of the clip.",
)
VIDEO_DETAIL_PROMPTS: tuple[str, ...] = (
    "Describe the video in detail.",
    "What happens in this video? Please be detailed.",
    "Can you describe everything that happens in this clip?",
)


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to draw (and describe) one synthetic video.

    The moving shape's centre goes linearly from ``start`` (frame 0) to ``end`` (last frame). If
    ``new_color`` is set, frames from ``change_frame`` on draw it in that colour. ``still`` is an
    optional second shape that never moves.
    """

    file: str
    width: int
    height: int
    num_frames: int
    fps: int
    background: tuple[int, int, int]
    shape: str
    color: str
    direction: str
    radius: int
    start: tuple[int, int]
    end: tuple[int, int]
    noise_seed: int
    new_color: str | None = None
    change_frame: int | None = None
    still: ShapeSpec | None = None

    def center(self, index: int) -> tuple[float, float]:
        """Centre (x, y) of the moving shape in frame ``index``."""
        t = index / (self.num_frames - 1)
        return (self.start[0] + t * (self.end[0] - self.start[0]), self.start[1] + t * (self.end[1] - self.start[1]))

    def color_at(self, index: int) -> str:
        """Colour name of the moving shape in frame ``index``."""
        if self.new_color is not None and self.change_frame is not None and index >= self.change_frame:
            return self.new_color
        return self.color

    def frame_spec(self, index: int) -> ImageSpec:
        """Frame ``index`` as an image spec (still shape first, so the moving one is drawn on top)."""
        cx, cy = self.center(index)
        r = self.radius
        bbox = (round(cx - r), round(cy - r), round(cx + r), round(cy + r))
        moving = ShapeSpec(self.shape, self.color_at(index), "moving", bbox)
        shapes = (self.still, moving) if self.still is not None else (moving,)
        return ImageSpec(self.file, self.width, self.height, self.background, shapes, self.noise_seed)

    @property
    def num_shapes(self) -> int:
        """Shapes in the video (1 or 2)."""
        return 1 if self.still is None else 2

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (the per-video generation metadata)."""
        return asdict(self)


@dataclass
class VideoPlaygroundData:
    """Generated video specs and Video-LLaVA-format samples (nothing written yet)."""

    pretrain_videos: list[VideoSpec] = field(default_factory=list)
    finetune_videos: list[VideoSpec] = field(default_factory=list)
    pretrain: list[dict[str, Any]] = field(default_factory=list)
    finetune: list[dict[str, Any]] = field(default_factory=list)

    @property
    def all_videos(self) -> list[VideoSpec]:
        """All video specs, pretrain first."""
        return self.pretrain_videos + self.finetune_videos


# --------------------------------------------------------------------------------------------
# Specs and drawing
# --------------------------------------------------------------------------------------------


def random_video_spec(
    rng: random.Random, file: str, with_still: bool | None = None, with_change: bool | None = None
) -> VideoSpec:
    """Sample a video: size, length, moving shape/colour/direction, optional still shape and colour change.

    Colours are distinct within a video (moving, new and still colours), so colour questions are
    unambiguous and the moving shape can be located by colour in every frame.
    """
    width, height = rng.choice(VIDEO_SIZES)
    num_frames = rng.randint(*VIDEO_FRAME_RANGE)
    with_still = rng.random() < 0.35 if with_still is None else with_still
    with_change = rng.random() < 0.3 if with_change is None else with_change
    shapes = rng.sample(SHAPES, 2)
    colors = rng.sample(sorted(COLORS), 3)
    direction = rng.choice(DIRECTIONS)
    side = min(width, height)
    radius = round(side * rng.uniform(0.13, 0.17))
    lo, hi = rng.uniform(0.22, 0.28), rng.uniform(0.72, 0.78)
    across = rng.uniform(0.45, 0.55)
    if direction in ("right", "left"):
        y = across * height
        a, b = (lo * width, y), (hi * width, y)
    else:
        x = across * width
        a, b = (x, lo * height), (x, hi * height)
    start, end = (a, b) if direction in ("right", "down") else (b, a)
    still = None
    if with_still:
        position = rng.choice(_CORNERS)
        fx, fy = _CORNER_XY[position]
        r = round(side * 0.12)
        cx, cy = round(fx * width), round(fy * height)
        still = ShapeSpec(shapes[1], colors[2], position, (cx - r, cy - r, cx + r, cy + r))
    new_color = colors[1] if with_change else None
    change_frame = rng.randint(num_frames // 3, (2 * num_frames) // 3) if with_change else None
    background = random_background(rng)
    return VideoSpec(
        file=file,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=VIDEO_FPS,
        background=background,
        shape=shapes[0],
        color=colors[0],
        direction=direction,
        radius=radius,
        start=(round(start[0]), round(start[1])),
        end=(round(end[0]), round(end[1])),
        noise_seed=rng.randrange(2**31),
        new_color=new_color,
        change_frame=change_frame,
        still=still,
    )


def draw_video_frames(spec: VideoSpec) -> list[Image.Image]:
    """Render every frame of ``spec`` (deterministic; the background noise is the same in each frame)."""
    background = draw_background(spec.width, spec.height, spec.background, spec.noise_seed)
    frames = []
    for i in range(spec.num_frames):
        frame = background.copy()
        draw_shapes(frame, spec.frame_spec(i).shapes)
        frames.append(frame)
    return frames


def write_videos(specs: Iterable[VideoSpec], video_dir: Path, desc: str = "videos") -> int:
    """Draw and encode every spec under ``video_dir``; returns the number written."""
    video_dir.mkdir(parents=True, exist_ok=True)
    specs = list(specs)
    for spec in tqdm(specs, desc=desc, unit="video", leave=False):
        write_video(video_dir / spec.file, draw_video_frames(spec), fps=spec.fps, codec=VIDEO_CODEC)
    return len(specs)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _movingphrase(spec: VideoSpec) -> str:
    return f"{article(spec.color)} {spec.color} {spec.shape}"


def describe_video_caption(spec: VideoSpec, rng: random.Random) -> str:
    """Short caption: the moving shape, its direction, any colour change and any still shape."""
    body = f"{_movingphrase(spec)} moves {_DIRECTION_PHRASE[spec.direction]}"
    if spec.new_color is not None:
        body += f" and turns {spec.new_color}"
    template = rng.choice(
        ("{body}.", "a simple animation: {body}.", "in the video, {body}.", "{body} on a light background.")
    )
    text = cap(template.format(body=body))
    if spec.still is not None:
        text += f" {cap(phrase(spec.still))} stays still {where(spec.still.position)}."
    return text


def describe_video_detail(spec: VideoSpec) -> str:
    """Longer multi-sentence description for detail questions."""
    n = spec.num_shapes
    noun = "shape" if n == 1 else "shapes"
    sentences = [f"The video shows {NUMBER_WORDS[n]} {noun} on a light background."]
    sentences.append(f"{cap(_movingphrase(spec))} moves {_DIRECTION_PHRASE[spec.direction]}.")
    if spec.new_color is not None:
        sentences.append(f"Partway through, the {spec.shape} changes color from {spec.color} to {spec.new_color}.")
    else:
        sentences.append(f"The {spec.shape} stays {spec.color} the whole time.")
    if spec.still is not None:
        sentences.append(f"{cap(phrase(spec.still))} does not move; it stays {where(spec.still.position)}.")
    sentences.append(f"At the end, the {spec.shape} is {_END_PHRASE[spec.direction]} of the frame.")
    return " ".join(sentences)


def _video_vqa_pool(spec: VideoSpec, rng: random.Random) -> list[tuple[str, str, str]]:
    """All candidate (question, short answer, sentence answer) triples for one video."""
    s, d = spec.shape, spec.direction
    qa: list[tuple[str, str, str]] = [
        (f"In which direction does the {s} move?", cap(d), f"The {s} moves {_DIRECTION_PHRASE[d]}."),
        ("What shape is moving in the video?", cap(s), f"{cap(article(s))} {s} is moving."),
        (f"Where is the {s} at the end of the video?", _END_SIDE[d], f"It ends up {_END_PHRASE[d]} of the frame."),
    ]
    other = rng.choice([x for x in DIRECTIONS if x != d])
    ask = rng.choice((d, other))
    yes = ask == d
    qa.append(
        (
            f"Is the {s} moving {ask}?",
            "Yes" if yes else "No",
            f"Yes, it moves {_DIRECTION_PHRASE[d]}." if yes else f"No, it moves {_DIRECTION_PHRASE[d]}.",
        )
    )
    if spec.new_color is None:
        qa.append((f"What color is the {s}?", cap(spec.color), f"The {s} is {spec.color}."))
        qa.append((f"Does the {s} change color?", "No", f"No, it stays {spec.color}."))
    else:
        new = spec.new_color
        qa.append((f"What color does the {s} turn?", cap(new), f"It turns {new}."))
        qa.append((f"What color is the {s} at the start of the video?", cap(spec.color), f"It starts {spec.color}."))
        qa.append((f"What color is the {s} at the end of the video?", cap(new), f"It is {new} at the end."))
        qa.append((f"Does the {s} change color?", "Yes", f"Yes, it changes from {spec.color} to {new}."))
    n = spec.num_shapes
    qa.append(
        (
            "How many shapes are in the video?",
            cap(NUMBER_WORDS[n]),
            f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}.",
        )
    )
    if spec.still is not None:
        t = spec.still
        qa.append(("Which shape does not move?", cap(t.shape), f"The {t.color} {t.shape} does not move."))
        qa.append((f"What color is the {t.shape}?", cap(t.color), f"The {t.shape} is {t.color}."))
        qa.append((f"Where is the {t.shape}?", cap(t.position), f"It stays {where(t.position)}."))
    return qa


def video_conversation(spec: VideoSpec, rng: random.Random) -> Conversation:
    """Multi-turn (1-3 rounds) QA about one video; the ``<video>`` tag goes in round one.

    As in the image data (:func:`llava.playground.conversations.vqa_conversation`), 60% of conversations
    ask for one-word answers and the rest answer in sentences; ~20% open with a detailed description.
    """
    pool = _video_vqa_pool(spec, rng)
    return vqa_conversation(pool, VIDEO_DETAIL_PROMPTS, describe_video_detail(spec), VIDEO_TAG, rng)


def image_video_conversation(video: VideoSpec, image: ImageSpec, rng: random.Random) -> Conversation:
    """One question about a video and an image together; ``<video>`` comes first, then ``<image>``."""
    head = f"{VIDEO_TAG}\n{IMAGE_TAG}\n"
    if rng.random() < 0.6:
        target = rng.choice(image.shapes)
        video_color = video.color if video.new_color is None else f"{video.color} and then {video.new_color}"
        question = (
            f"What color is the moving {video.shape} in the video, and what color is the {target.shape} in the image?"
        )
        answer = (
            f"The {video.shape} in the video is {video_color}, and the {target.shape} in the image is {target.color}."
        )
    else:
        total = video.num_shapes + len(image.shapes)
        question = "How many shapes are there in the video and the image together?"
        answer = f"{cap(NUMBER_WORDS[total])}."
    return [{"from": "human", "value": head + question}, {"from": "gpt", "value": answer}]


def video_caption_conversation(spec: VideoSpec, rng: random.Random) -> Conversation:
    """Single-turn caption request (the pretrain ``plain`` layout keeps only tag + caption)."""
    value = caption_request(VIDEO_CAPTION_PROMPTS, VIDEO_TAG, rng)
    return [{"from": "human", "value": value}, {"from": "gpt", "value": describe_video_caption(spec, rng)}]


# --------------------------------------------------------------------------------------------
# Dataset assembly
# --------------------------------------------------------------------------------------------


def generate_video_data(
    num_pretrain: int, num_finetune: int, seed: int = 0, images: Sequence[ImageSpec] = ()
) -> VideoPlaygroundData:
    """Build video specs and Video-LLaVA-format samples (nothing is written).

    Pretrain is one caption per video. Finetune mixes ~20% single-image VQA and ~5% video+image
    questions over the already generated ``images`` (when given), ~10% text-only chats (at least
    one of each when ``num_finetune >= 4``), and multi-turn video QA for the rest.
    """
    rng = random.Random(f"video-{seed}")
    data = VideoPlaygroundData()
    for i in range(num_pretrain):
        spec = random_video_spec(rng, f"pretrain_{i:06d}{VIDEO_SUFFIX}")
        data.pretrain_videos.append(spec)
        data.pretrain.append(
            {
                "id": f"video_pretrain_{i:06d}",
                "video": spec.file,
                "conversations": video_caption_conversation(spec, rng),
            }
        )

    many = num_finetune >= 4
    num_text = max(1, round(0.10 * num_finetune)) if many else 0
    num_image = max(1, round(0.20 * num_finetune)) if many and images else 0
    num_both = max(1, round(0.05 * num_finetune)) if many and images else 0
    num_video = num_finetune - num_text - num_image - num_both
    kinds = ["text"] * num_text + ["image"] * num_image + ["both"] * num_both + ["video"] * num_video
    rng.shuffle(kinds)

    def new_video() -> VideoSpec:
        spec = random_video_spec(rng, f"finetune_{len(data.finetune_videos):06d}{VIDEO_SUFFIX}")
        data.finetune_videos.append(spec)
        return spec

    for i, kind in enumerate(kinds):
        sample: dict[str, Any] = {"id": f"video_finetune_{i:06d}"}
        if kind == "text":
            sample["conversations"] = text_conversation(rng)
        elif kind == "image":
            image = rng.choice(images)
            sample["image"] = image.file
            sample["conversations"] = image_conversation(image, rng)
        elif kind == "both":
            video, image = new_video(), rng.choice(images)
            sample["video"] = video.file
            sample["image"] = image.file
            sample["conversations"] = image_video_conversation(video, image, rng)
        else:
            video = new_video()
            sample["video"] = video.file
            sample["conversations"] = video_conversation(video, rng)
        data.finetune.append(sample)
    logger.info(
        "generated %d video pretrain and %d video finetune samples (%d video, %d image, %d video+image, "
        "%d text-only), %d videos",
        len(data.pretrain), len(data.finetune), num_video, num_image, num_both, num_text, len(data.all_videos),
    )  # fmt: skip
    return data


def video_demo_requests(seed: int, count: int = 8) -> tuple[list[VideoSpec], list[dict[str, Any]]]:
    """Held-out videos (never in the training JSON) with one question each and its expected answer.

    Same JSONL format as ``demo_requests.jsonl`` with ``video`` instead of ``image``. Questions
    cycle through direction, moving shape and colour (or the colour it turns into).
    """
    rng = random.Random(f"video-demo-{seed}")
    specs = [random_video_spec(rng, f"demo_{i:03d}{VIDEO_SUFFIX}", with_still=False) for i in range(count)]
    requests = []
    for i, spec in enumerate(specs):
        if i % 3 == 0:
            question, answer = f"In which direction does the {spec.shape} move?", cap(spec.direction)
        elif i % 3 == 1:
            question, answer = "What shape is moving in the video?", cap(spec.shape)
        elif spec.new_color is not None:
            question, answer = f"What color does the {spec.shape} turn?", cap(spec.new_color)
        else:
            question, answer = f"What color is the {spec.shape}?", cap(spec.color)
        requests.append(demo_request(f"video_demo_{i:03d}", "video", spec.file, question, answer))
    return specs, requests


def video_corpus_texts(data: VideoPlaygroundData) -> list[str]:
    """Every turn of the video data (tags removed), plus the prompts, for the tokenizer corpus."""
    texts = [*VIDEO_CAPTION_PROMPTS, *VIDEO_DETAIL_PROMPTS, *DETAIL_PROMPTS]
    for sample in data.pretrain + data.finetune:
        for turn in sample["conversations"]:
            texts.append(turn["value"].replace(VIDEO_TAG, "").replace(IMAGE_TAG, "").strip())
    return texts
