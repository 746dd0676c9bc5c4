"""Tests for the playground's synthetic videos, Video-LLaVA JSON data, demo requests and video tower."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llava.constants import IMAGE_TAG, VIDEO_TAG
from llava.data.video import load_and_preprocess_videos, read_video_frames
from llava.playground.builder import GENERATED_ENTRIES, build_playground
from llava.playground.drawing import COLORS
from llava.playground.synthetic_video import (
    DIRECTIONS,
    VideoSpec,
    draw_video_frames,
    generate_video_data,
    random_video_spec,
    video_corpus_texts,
    video_demo_requests,
    write_videos,
)
from llava.tools.make_playground import main

NUM_VIDEO_PRETRAIN = 8
NUM_VIDEO_FINETUNE = 24
PHRASES = {"right": "left to right", "left": "right to left", "down": "top to bottom", "up": "bottom to top"}


def _load(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _spec(meta: dict) -> VideoSpec:
    from llava.playground.drawing import ShapeSpec

    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
    if fields["still"] is not None:
        still = fields["still"]
        fields["still"] = ShapeSpec(still["shape"], still["color"], still["position"], tuple(still["bbox"]))
    return VideoSpec(**fields)


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pgv") / "playground"
    build_playground(
        out,
        num_pretrain=6,
        num_finetune=10,
        seed=0,
        num_video_pretrain=NUM_VIDEO_PRETRAIN,
        num_video_finetune=NUM_VIDEO_FINETUNE,
    )
    return out


def _moving_centroids(spec: VideoSpec, frames: list, indices: list[int]) -> list[tuple[float, float]]:
    """Centroid of the pixels that have the moving shape's colour, per frame; checks the old colour is gone."""
    centroids = []
    for image, i in zip(frames, indices, strict=True):
        pixels = np.asarray(image, dtype=np.int16)
        target = np.array(COLORS[spec.color_at(i)], dtype=np.int16)
        mask = np.abs(pixels - target).max(-1) <= 40
        assert mask.sum() >= 0.5 * spec.radius**2, (spec.file, i, int(mask.sum()))
        if spec.color_at(i) != spec.color:  # after a colour change the old colour has vanished
            old = np.abs(pixels - np.array(COLORS[spec.color], dtype=np.int16)).max(-1) <= 40
            assert old.sum() < 0.1 * mask.sum(), (spec.file, i)
        ys, xs = np.nonzero(mask)
        centroids.append((xs.mean(), ys.mean()))
    return centroids


# --------------------------------------------------------------------------------------------
# Specs, drawing, determinism
# --------------------------------------------------------------------------------------------


def test_generation_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a, b, c = generate_video_data(4, 12, seed=5), generate_video_data(4, 12, seed=5), generate_video_data(4, 12, seed=6)
    assert a.pretrain == b.pretrain and a.finetune == b.finetune and a.all_videos == b.all_videos
    assert a.all_videos != c.all_videos
    write_videos(a.all_videos[:3], tmp_path / "a")
    write_videos(b.all_videos[:3], tmp_path / "b")
    for spec in a.all_videos[:3]:
        assert (tmp_path / "a" / spec.file).read_bytes() == (tmp_path / "b" / spec.file).read_bytes()
    json.dumps([s.to_json() for s in a.all_videos])  # JSON-serialisable


def test_specs_are_small_even_non_square_and_varied() -> None:
    import random

    rng = random.Random(0)
    specs = [random_video_spec(rng, f"v{i}.mp4") for i in range(60)]
    assert {s.direction for s in specs} == set(DIRECTIONS)
    assert any(s.new_color for s in specs) and any(s.still for s in specs)
    for s in specs:
        assert s.width % 2 == 0 and s.height % 2 == 0 and s.width != s.height
        assert s.width * s.height <= 160 * 160 and 12 <= s.num_frames <= 16
        colors = [s.color, s.new_color, s.still.color if s.still else None]
        present = [c for c in colors if c]
        assert len(set(present)) == len(present)  # distinct colours keep questions unambiguous


def test_drawn_frames_follow_the_spec() -> None:
    import random

    rng = random.Random(1)
    by_direction: dict[str, VideoSpec] = {}
    while len(by_direction) < len(DIRECTIONS):
        spec = random_video_spec(rng, "x.mp4", with_still=True, with_change=True)
        by_direction.setdefault(spec.direction, spec)
    for spec in by_direction.values():
        frames = draw_video_frames(spec)
        assert len(frames) == spec.num_frames and frames[0].size == (spec.width, spec.height)
        cents = _moving_centroids(spec, frames, list(range(spec.num_frames)))
        for i, (x, y) in enumerate(cents):
            ex, ey = spec.center(i)
            assert abs(x - ex) <= 1.5 and abs(y - ey) <= spec.radius / 2  # triangles sit low in their box


# --------------------------------------------------------------------------------------------
# Built playground: files, JSON, motion, demo requests, tower
# --------------------------------------------------------------------------------------------


def test_layout_manifest_and_readme(playground: Path) -> None:
    for name in ("videos", "video_pretrain.json", "video_finetune.json", "video_metadata.json"):
        assert (playground / name).exists(), name
    for name in ("video_tower", "video_demo_requests.jsonl"):
        assert (playground / name).exists() and name in GENERATED_ENTRIES
    manifest = _load(playground / "manifest.json")
    meta = _load(playground / "video_metadata.json")
    assert manifest["video_pretrain"]["samples"] == NUM_VIDEO_PRETRAIN
    assert manifest["video_finetune"]["samples"] == NUM_VIDEO_FINETUNE
    assert manifest["videos"]["count"] == len(list((playground / "videos").glob("*.mp4"))) == len(meta) + 8
    assert manifest["video_tower"]["tokens_per_frame"] == 257
    assert manifest["video_tower"]["tokens_per_video"] == 8 * 257
    assert manifest["vision_tower"]["tokens_per_image"] == 577  # the image tower is unchanged
    readme = (playground / "README.md").read_text()
    assert "video_finetune.json" in readme and "257 tokens per frame" in readme
    assert f"{manifest['videos']['count']} mpeg4 MP4s" in readme


def test_json_references_and_tags(playground: Path) -> None:
    kinds = set()
    for name in ("video_pretrain.json", "video_finetune.json"):
        samples = _load(playground / name)
        assert len({s["id"] for s in samples}) == len(samples)
        for sample in samples:
            video, image = sample.get("video"), sample.get("image")
            kinds.add((name, video is not None, image is not None))
            if video is not None:
                assert (playground / "videos" / video).is_file(), video
            if image is not None:
                assert (playground / "images" / image).is_file(), image
            conv = sample["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            first = conv[0]["value"]
            assert first.count(VIDEO_TAG) == (video is not None)
            assert first.count(IMAGE_TAG) == (image is not None)
            if video is not None and image is not None:
                assert first.index(VIDEO_TAG) < first.index(IMAGE_TAG)
            assert all(VIDEO_TAG not in t["value"] and IMAGE_TAG not in t["value"] for t in conv[1:])
    assert kinds == {
        ("video_pretrain.json", True, False),
        ("video_finetune.json", True, False),
        ("video_finetune.json", False, True),
        ("video_finetune.json", True, True),
        ("video_finetune.json", False, False),
    }


def test_answers_match_metadata(playground: Path) -> None:
    meta = {file: _spec(m) for file, m in _load(playground / "video_metadata.json").items()}
    checked = 0
    for sample in _load(playground / "video_pretrain.json"):
        spec = meta[sample["video"]]
        caption = sample["conversations"][1]["value"].lower()
        assert f"{spec.color} {spec.shape} moves from {PHRASES[spec.direction]}" in caption
        assert (f"turns {spec.new_color}" in caption) == (spec.new_color is not None)
    for sample in _load(playground / "video_finetune.json"):
        if "video" not in sample or "image" in sample:
            continue
        spec = meta[sample["video"]]
        conv = sample["conversations"]
        for q, a in zip(conv[::2], conv[1::2], strict=True):
            answer = a["value"].lower().rstrip(".")
            if re.search(r"In which direction does the (\w+) move\?", q["value"]):
                assert answer == spec.direction or PHRASES[spec.direction] in answer
                checked += 1
            if re.search(r"What color does the (\w+) turn\?", q["value"]):
                assert spec.new_color in answer
                checked += 1
            if "What shape is moving" in q["value"]:
                assert spec.shape in answer
                checked += 1
    assert checked >= 3


def test_decoded_motion_matches_direction(playground: Path) -> None:
    meta = [_spec(m) for m in _load(playground / "video_metadata.json").values()]
    assert {s.direction for s in meta} == set(DIRECTIONS)
    for spec in meta[:12]:
        indices = [0, spec.num_frames // 2, spec.num_frames - 1]
        decoded = read_video_frames(playground / "videos" / spec.file, spec.num_frames)
        frames = [decoded[i] for i in indices]
        (x0, y0), (x1, y1), (x2, y2) = _moving_centroids(spec, frames, indices)
        axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[spec.direction]
        positions = [(x0, x1, x2), (y0, y1, y2)][axis]
        size = (spec.width, spec.height)[axis]
        steps = np.diff(positions) * sign
        assert (steps > 0.15 * size).all(), (spec.file, spec.direction, positions)
        across = [(y0, y1, y2), (x0, x1, x2)][axis]
        assert max(across) - min(across) < 3, (spec.file, across)  # no motion across the axis


def test_demo_requests_are_held_out_and_correct(playground: Path) -> None:
    lines = (playground / "video_demo_requests.jsonl").read_text().splitlines()
    requests = [json.loads(line) for line in lines]
    assert len(requests) == 8
    training = {
        s.get("video") for name in ("video_pretrain.json", "video_finetune.json") for s in _load(playground / name)
    }
    specs, expected = video_demo_requests(seed=0)
    assert requests == expected
    for request, spec in zip(requests, specs, strict=True):
        assert set(request) == {"id", "video", "prompt", "expected"}
        assert request["video"] not in training and request["video"] not in _load(playground / "video_metadata.json")
        assert (playground / "videos" / request["video"]).is_file()
        answers = {spec.direction, spec.shape, spec.new_color or spec.color}
        assert request["expected"].lower() in answers
        assert request["prompt"].endswith("Answer the question using a single word or phrase.")


def test_video_tower_geometry_and_loading(playground: Path) -> None:
    from transformers import CLIPVisionModel

    from llava.hf_adapter import load_image_processor

    tower = CLIPVisionModel.from_pretrained(playground / "video_tower").eval()
    image_tower = CLIPVisionModel.from_pretrained(playground / "vision_tower")
    processor = load_image_processor(playground / "video_tower")
    assert tower.config.image_size == 224 and image_tower.config.image_size == 336
    assert tower.config.hidden_size == image_tower.config.hidden_size
    assert tower.config.num_hidden_layers == image_tower.config.num_hidden_layers
    files = sorted((playground / "videos").glob("pretrain_*.mp4"))[:2]
    pixels = load_and_preprocess_videos(files, processor, num_frames=8)
    assert pixels.shape == (2, 8, 3, 224, 224) and pixels.dtype == torch.float32
    with torch.no_grad():
        out = tower(pixels.flatten(0, 1), output_hidden_states=True)
    assert tuple(out.hidden_states[-2].shape) == (16, 257, 64)


def test_tokenizer_corpus_includes_video_text(playground: Path) -> None:
    from transformers import AutoTokenizer

    data = generate_video_data(2, 6, seed=0)
    texts = video_corpus_texts(data)
    assert any("moves from" in t for t in texts)
    assert not any(VIDEO_TAG in t or IMAGE_TAG in t for t in texts)
    tokenizer = AutoTokenizer.from_pretrained(playground / "llm")
    for word in ("video", "moves", "direction"):
        assert len(tokenizer.tokenize(f" {word}")) == 1, word  # frequent video words are whole tokens


def test_zero_videos_and_cli(tmp_path: Path) -> None:
    out = tmp_path / "pg"
    args = ["--out", str(out), "--num-pretrain", "2", "--num-finetune", "4"]
    assert main([*args, "--num-video-pretrain", "0", "--num-video-finetune", "0"]) == 0
    assert not (out / "videos").exists() and not (out / "video_finetune.json").exists()
    assert (out / "video_tower" / "config.json").is_file()
    assert _load(out / "manifest.json")["videos"]["count"] == 0
    assert main([*args, "--num-video-pretrain", "2", "--num-video-finetune", "4", "--force"]) == 0
    assert len(_load(out / "video_pretrain.json")) == 2 and len(_load(out / "video_finetune.json")) == 4
    assert len(list((out / "videos").glob("*.mp4"))) == 2 + _load(out / "manifest.json")["videos"]["finetune"] + 8
    assert main([*args, "--num-video-pretrain", "0", "--num-video-finetune", "0", "--force"]) == 0
    assert not (out / "videos").exists()  # --force removed the previous videos
    with pytest.raises(SystemExit):
        main([*args, "--num-video-pretrain", "-1", "--force"])
