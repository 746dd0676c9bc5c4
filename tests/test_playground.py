"""Tests for the offline playground generator (synthetic data + tiny models)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_TAG
from llava.playground.builder import build_playground
from llava.tools.make_playground import main

NUM_PRETRAIN = 24
NUM_FINETUNE = 40


def _load(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _image_files(sample: dict) -> list[str]:
    image = sample.get("image")
    if image is None:
        return []
    return image if isinstance(image, list) else [image]


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pg") / "playground"
    build_playground(out, num_pretrain=NUM_PRETRAIN, num_finetune=NUM_FINETUNE, seed=0)
    return out


def test_layout_and_manifest(playground: Path) -> None:
    for name in ("images", "pretrain.json", "finetune.json", "vision_tower", "llm", "manifest.json"):
        assert (playground / name).exists(), name
    manifest = _load(playground / "manifest.json")
    assert manifest["pretrain"]["samples"] == NUM_PRETRAIN
    assert manifest["finetune"]["samples"] == NUM_FINETUNE
    assert manifest["images"]["count"] == len(list((playground / "images").glob("*.png")))
    assert manifest["vision_tower"]["tokens_per_image"] == 577


def test_json_references_resolve_and_tags_match(playground: Path) -> None:
    for name in ("pretrain.json", "finetune.json"):
        samples = _load(playground / name)
        assert len({s["id"] for s in samples}) == len(samples)
        for sample in samples:
            files = _image_files(sample)
            for file in files:
                assert (playground / "images" / file).is_file(), file
            conv = sample["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            tags = sum(t["value"].count(IMAGE_TAG) for t in conv)
            assert tags == len(files)
            assert all(IMAGE_TAG not in t["value"] for t in conv[1:])


def test_images_are_varied_non_square(playground: Path) -> None:
    sizes = set()
    for path in sorted((playground / "images").glob("*.png"))[:20]:
        with Image.open(path) as img:
            assert img.mode == "RGB"
            assert 96 <= img.width <= 192 and 96 <= img.height <= 192
            assert img.width != img.height
            sizes.add(img.size)
    assert len(sizes) > 5


def test_captions_match_metadata(playground: Path) -> None:
    meta = _load(playground / "image_metadata.json")
    for sample in _load(playground / "pretrain.json"):
        caption = sample["conversations"][1]["value"].lower()
        shapes = meta[sample["image"]]["shapes"]
        assert 1 <= len(shapes) <= 2
        for s in shapes:
            assert f"{s['color']} {s['shape']}" in caption
            assert s["position"] in caption


def test_drawn_pixels_match_metadata(playground: Path) -> None:
    """The shape's colour is really at the centre of its box (so answers depend on the image)."""
    from llava.playground.drawing import COLORS

    meta = _load(playground / "image_metadata.json")
    for file, spec in list(meta.items())[:15]:
        with Image.open(playground / "images" / file) as img:
            for s in spec["shapes"]:
                x0, y0, x1, y1 = s["bbox"]
                cx, cy = (x0 + x1) // 2, (y0 + y1) // 2 + (4 if s["shape"] == "triangle" else 0)
                assert img.getpixel((cx, cy)) == COLORS[s["color"]], (file, s)


def test_finetune_mix_and_answers(playground: Path) -> None:
    meta = _load(playground / "image_metadata.json")
    samples = _load(playground / "finetune.json")
    text_only = [s for s in samples if "image" not in s]
    two_image = [s for s in samples if isinstance(s.get("image"), list)]
    assert text_only and two_image
    assert all(len(s["image"]) == 2 for s in two_image)
    assert any(len(s["conversations"]) > 2 for s in samples)
    checked = 0
    for sample in samples:
        files = _image_files(sample)
        conv = sample["conversations"]
        for q, a in zip(conv[::2], conv[1::2], strict=True):
            question, answer = q["value"], a["value"].lower()
            if len(files) == 1:
                shapes = meta[files[0]]["shapes"]
                if m := re.search(r"What color is the (\w+)\?", question):
                    assert answer.rstrip(".") == next(s["color"] for s in shapes if s["shape"] == m[1])
                    checked += 1
                if m := re.search(r"What shape is the (\w+) object\?", question):
                    assert answer.rstrip(".") == next(s["shape"] for s in shapes if s["color"] == m[1])
                    checked += 1
                if "How many shapes" in question:
                    assert answer.rstrip(".") == ["one", "two"][len(shapes) - 1]
                    checked += 1
            elif len(files) == 2 and (m := re.search(r"has the (\w+) shape", question)):
                which = 0 if "first" in answer else 1
                assert any(s["color"] == m[1] for s in meta[files[which]]["shapes"])
                assert not any(s["color"] == m[1] for s in meta[files[1 - which]]["shapes"])
    assert checked > 5


def test_vision_tower_geometry(playground: Path) -> None:
    from transformers import CLIPVisionModel

    from llava.hf_adapter import load_image_processor

    tower = CLIPVisionModel.from_pretrained(playground / "vision_tower").eval()
    processor = load_image_processor(playground / "vision_tower")
    image_file = next((playground / "images").glob("*.png"))
    with Image.open(image_file) as img:
        pixels = processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 336, 336)
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True)
    assert tuple(out.last_hidden_state.shape) == (1, 577, 64)
    assert len(out.hidden_states) == 4  # embeddings + 3 layers, so layer -2 exists
    assert tuple(out.hidden_states[-2].shape) == (1, 577, 64)


def test_llm_and_tokenizer_load(playground: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(playground / "llm")
    model = AutoModelForCausalLM.from_pretrained(playground / "llm").eval()
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.bos_token_id == 1 and model.config.eos_token_id == 2
    text = "USER: What color is the circle? ASSISTANT: Red."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id not in tokenizer("émoji 🙂 and 42", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert tuple(logits.shape) == (1, len(ids), len(tokenizer))


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_for_seed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    build_playground(a, num_pretrain=6, num_finetune=12, seed=3)
    build_playground(b, num_pretrain=6, num_finetune=12, seed=3)
    build_playground(c, num_pretrain=6, num_finetune=12, seed=4)
    for name in ("pretrain.json", "finetune.json", "image_metadata.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    assert _digest(a / "images") == _digest(b / "images")
    for name in ("vision_tower/model.safetensors", "llm/model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_refuses_non_empty_dir_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="--force"):
        build_playground(out, num_pretrain=2, num_finetune=4)
    assert main(["--out", str(out), "--num-pretrain", "2", "--num-finetune", "4"]) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    args = ["--out", str(out), "--num-pretrain", "2", "--num-finetune", "4", "--force"]
    assert main(args) == 0
    assert (out / "manifest.json").is_file()
    assert (out / "keep.txt").read_text() == "user file"  # --force only replaces generated outputs
    assert len(_load(out / "pretrain.json")) == 2
