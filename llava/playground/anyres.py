"""The AnyRes playground: the scenes task at three aspect ratios, as a tiny LLaVA-NeXT checkpoint, offline.

The scenes (:mod:`llava.playground.scenes`) are drawn on their 336 px canvas and resized to one of three image
sizes: wide (224 x 112, width x height), tall (112 x 224) and square (224 x 224). The checkpoint tiles them as
LLaVA-NeXT does (AnyRes), at a third of its geometry: 112 px views of 14 px patches (8 x 8 = 64 tokens a view),
grid pinpoints ``[[112, 224], [224, 112], [224, 224]]`` (height, width), so a wide image gets the base view plus
a 1 x 2 tile grid, a tall one 2 x 1 and a square one 2 x 2. Each image's tokens are the base view's 64, its
tiles' patches (unpadded: none are lost, the sizes match the pinpoints) and one ``image_newline`` per row of
the tile grid: 200 (wide), 208 (tall), 336 (square), written to the manifest as the processor counts them.
The quadrant questions stay the same under the resize; the small dot, a few pixels in the base view, is
sharper in the tiles (twice the base view's resolution): the tiles are what AnyRes adds.

Layout of ``out_dir`` (every path relative to it):

* ``images/``: training scenes (PNGs at the three sizes, dealt round robin); ``finetune.json`` (multi-turn
  short-answer VQA) and ``pretrain.json`` (1-3 rounds, for a projector stage), LLaVA JSON;
  ``scene_metadata.json`` (what each image shows and its aspect).
* ``eval/playground/``: the held-out benchmark of the scenes playground (:mod:`llava.eval.benchmarks.playground`),
  on scenes never used in training, at the same three sizes.
* ``model/``: the LLaVA-NeXT checkpoint, built through the model family's own builder
  (:func:`llava.families.registry.family_named`): a tiny CLIP tower pretrained at 112 px on generated scenes
  (:mod:`llava.playground.tower_training`), a tiny LLaMA pretrained on text (:mod:`llava.playground.llm_pretraining`),
  a random projector and ``image_newline``, and the checkpoint's processor (tokenizer with ``<image>`` and a
  Vicuna-v1-style chat template, the AnyRes image processor), loaded through transformers' Auto classes from the
  config the checkpoint saves.
* ``demo_requests.jsonl``, ``tower_pretraining.json``, ``llm_pretraining.json``, ``manifest.json``, ``README.md``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor

from llava.constants import IMAGE_TAG
from llava.data.templates import VICUNA_SYSTEM
from llava.families.registry import family_named
from llava.hf_adapter import llava_next_vision_tower
from llava.playground.conversations import SHORT_ANSWER_SUFFIX
from llava.playground.llm_pretraining import pretrain_llm
from llava.playground.output import prepare_out_dir, write_json, write_jsonl
from llava.playground.scene_builder import BENCHMARK_NAME, LLM_INITIALIZER_RANGE, SCENE_LLM
from llava.playground.scenes import (
    QUESTION_KINDS,
    Scene,
    benchmark_questions,
    benchmark_scenes,
    caption,
    draw_scene,
    random_scene,
    vqa_sample,
)
from llava.playground.tiny_models import (
    CLIP_MEAN,
    CLIP_STD,
    VISION_DEFAULTS,
    build_tiny_llama,
    build_tiny_vision_tower,
    ensure_bos,
)
from llava.playground.tokenizer import train_playground_tokenizer
from llava.playground.tower_training import pretrain_tower

logger = logging.getLogger(__name__)

FAMILY = "llava_next"
"""The model family the checkpoint belongs to (built by its registry entry, loaded by its pipeline)."""
VIEW = 112
"""Side of every AnyRes view (the base view and each tile) in pixels: a third of CLIP-L/14-336's."""
PATCH = 14
PINPOINTS: list[list[int]] = [[VIEW, 2 * VIEW], [2 * VIEW, VIEW], [2 * VIEW, 2 * VIEW]]
"""Grid pinpoints (height, width): a 1 x 2, 2 x 1 and 2 x 2 tile grid."""
ASPECTS: dict[str, tuple[int, int]] = {
    "wide": (2 * VIEW, VIEW),
    "tall": (VIEW, 2 * VIEW),
    "square": (2 * VIEW, 2 * VIEW),
}
"""Image sizes (width, height) per aspect; images are dealt round robin over them."""
IMAGE_TOKEN = IMAGE_TAG
"""The processor's image placeholder (a special token of the tokenizer)."""
FEATURE_LAYER = -2
"""CLIP layer whose patch features the projector reads (LLaVA's penultimate layer)."""
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    '{% if loop.first %}{{ "' + VICUNA_SYSTEM + " \" }}{% endif %}{{ 'USER: ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% for content in message['content'] %}{{ content['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""Vicuna v1's layout (``{system} USER: {q} ASSISTANT: {a}</s>``), the one the LLM was pretrained on, reading
llava-hf's content lists; images where the user's content puts them; system messages are not rendered."""
GENERATED_ENTRIES: tuple[str, ...] = (
    "images",
    "pretrain.json",
    "finetune.json",
    "scene_metadata.json",
    "eval",
    "demo_requests.jsonl",
    "model",
    "tower_pretraining.json",
    "llm_pretraining.json",
    "manifest.json",
    "README.md",
)
"""Top-level names the builder writes; ``force`` removes only these."""


def aspect_of(index: int) -> str:
    """The aspect of the ``index``-th image (round robin over :data:`ASPECTS`)."""
    return list(ASPECTS)[index % len(ASPECTS)]


def write_anyres_scenes(scenes: list[Scene], aspects: list[str], image_dir: Path) -> None:
    """Draw each scene on its canvas, resize it to its aspect's size and save it as PNG under ``image_dir``."""
    image_dir.mkdir(parents=True, exist_ok=True)
    for scene, aspect in tqdm(zip(scenes, aspects, strict=True), total=len(scenes), desc="drawing", leave=False):
        draw_scene(scene).resize(ASPECTS[aspect], Image.Resampling.BICUBIC).save(image_dir / scene.file, format="PNG")


def _processor_files(model_dir: Path, tokenizer: Any) -> Any:
    """Write the tokenizer, the image processor's and the processor's settings and the chat template into
    ``model_dir``, load them back with ``AutoProcessor`` (its class follows from the checkpoint's config) and
    save the result in transformers' own format; returns the processor."""
    tokenizer.save_pretrained(model_dir)
    image_settings = {
        "image_grid_pinpoints": PINPOINTS,
        "size": {"shortest_edge": VIEW},
        "crop_size": {"height": VIEW, "width": VIEW},
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_pad": True,
        "resample": 3,
    }
    processor_settings = {
        "patch_size": PATCH,
        "vision_feature_select_strategy": "default",
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 1,
    }
    write_json(model_dir / "preprocessor_config.json", image_settings)
    write_json(model_dir / "processor_config.json", processor_settings)
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    processor = AutoProcessor.from_pretrained(str(model_dir))
    (model_dir / "preprocessor_config.json").unlink()  # the processor's own save holds it (with its class)
    processor.save_pretrained(str(model_dir))
    return AutoProcessor.from_pretrained(str(model_dir))


def tokens_per_aspect(processor: Any) -> dict[str, int]:
    """Visual tokens of one image of each aspect, as the checkpoint's processor expands its placeholder."""
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    counts = {}
    for aspect, size in ASPECTS.items():
        encoded = processor(images=[Image.new("RGB", size)], text=[IMAGE_TOKEN], return_tensors="pt")
        counts[aspect] = int((encoded["input_ids"] == image_id).sum())
    return counts


def build_checkpoint(
    model_dir: Path, tower: torch.nn.Module, llm: torch.nn.Module, tokenizer: Any, seed: int = 0
) -> Any:
    """Save a LLaVA-NeXT checkpoint made of ``tower`` (a CLIP vision model at :data:`VIEW` px), ``llm`` (a LLaMA
    whose vocabulary has :data:`IMAGE_TOKEN`), a random projector and ``image_newline``, and its processor;
    returns the processor."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    fields = {
        "vision_config": tower.config.to_dict(),
        "text_config": llm.config.to_dict(),
        "image_grid_pinpoints": PINPOINTS,
        "image_token_id": image_id,
        "vision_feature_layer": FEATURE_LAYER,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    model = family_named(FAMILY).random_model(fields, torch.float32, "cpu", "sdpa")
    llava_next_vision_tower(model.hf_model).load_state_dict(tower.state_dict())
    model.language_model.load_state_dict(llm.model.state_dict())
    model.get_output_embeddings().load_state_dict(llm.lm_head.state_dict())
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    return _processor_files(model_dir, tokenizer)


def build_anyres_playground(
    out_dir: str | Path,
    num_pretrain: int = 600,
    num_finetune: int = 1500,
    num_eval: int = 300,
    rounds: tuple[int, int] = (5, 7),
    tower_steps: int = 300,
    llm_steps: int = 400,
    seed: int = 0,
    vocab_size: int = 600,
    force: bool = False,
) -> dict[str, Any]:
    """Write the AnyRes playground into ``out_dir`` and return its manifest (also ``manifest.json``).

    As :func:`llava.playground.scene_builder.build_scene_playground` (same scenes, questions, benchmark and
    pretraining of the tower and the LLM; ``tower_steps = 0`` / ``llm_steps = 0`` keep them random), with the
    images at three aspect ratios and a LLaVA-NeXT checkpoint in ``model/``. Deterministic for a given ``seed``;
    refuses a non-empty ``out_dir`` unless ``force``.
    """
    out = Path(out_dir)
    prepare_out_dir(out, force, GENERATED_ENTRIES)
    rng = random.Random(f"anyres-{seed}")
    pretrain_scenes = [random_scene(rng, f"pretrain_{i:06d}.png") for i in range(num_pretrain)]
    finetune_scenes = [random_scene(rng, f"finetune_{i:06d}.png") for i in range(num_finetune)]
    pretrain = [vqa_sample(s, rng, f"pretrain_{i:06d}", rng.randint(1, 3)) for i, s in enumerate(pretrain_scenes)]
    finetune = [vqa_sample(s, rng, f"finetune_{i:06d}", rng.randint(*rounds)) for i, s in enumerate(finetune_scenes)]
    eval_rng = random.Random(f"anyres-eval-{seed}")
    eval_pairs = benchmark_scenes(eval_rng, num_eval)
    eval_scenes = [scene for scene, _ in eval_pairs]
    questions = benchmark_questions(eval_pairs, eval_rng)

    training = pretrain_scenes + finetune_scenes
    training_aspects = [aspect_of(i) for i in range(len(training))]
    eval_aspects = [aspect_of(i // len(QUESTION_KINDS)) for i in range(len(eval_scenes))]  # every kind x aspect
    write_anyres_scenes(training, training_aspects, out / "images")
    write_anyres_scenes(eval_scenes, eval_aspects, out / "eval" / BENCHMARK_NAME / "images")
    write_json(out / "pretrain.json", pretrain)
    write_json(out / "finetune.json", finetune)
    metadata = {
        s.file: {**s.to_json(), "aspect": aspect}
        for s, aspect in zip(training + eval_scenes, training_aspects + eval_aspects, strict=True)
    }
    write_json(out / "scene_metadata.json", metadata)
    write_jsonl(out / "eval" / BENCHMARK_NAME / "questions.jsonl", questions)
    demo = [
        {"id": f"demo_{row['question_id']}", "image": row["image"], "prompt": row["text"], "expected": row["answer"]}
        for row in questions[: len(QUESTION_KINDS)]
    ]
    write_jsonl(out / "demo_requests.jsonl", demo)

    tower = build_tiny_vision_tower(seed, image_size=VIEW, patch_size=PATCH)
    tower_result = pretrain_tower(tower, steps=tower_steps, seed=seed) if tower_steps > 0 else None
    write_json(out / "tower_pretraining.json", asdict(tower_result) if tower_result else {"steps": 0})

    texts = [turn["value"] for sample in pretrain + finetune for turn in sample["conversations"]]
    texts += [SHORT_ANSWER_SUFFIX, "USER:", "ASSISTANT:", "Scene:", VICUNA_SYSTEM] + [caption(s) for s in training]
    tokenizer = train_playground_tokenizer(texts, vocab_size=vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    ensure_bos(tokenizer)
    llm = build_tiny_llama(tokenizer, seed, initializer_range=LLM_INITIALIZER_RANGE, **SCENE_LLM)
    llm_result = pretrain_llm(llm, tokenizer, steps=llm_steps, seed=seed) if llm_steps > 0 else {"steps": 0}
    write_json(out / "llm_pretraining.json", llm_result)

    processor = build_checkpoint(out / "model", tower, llm, tokenizer, seed)
    tokens = tokens_per_aspect(processor)
    kinds = {kind: sum(q["category"] == kind for q in questions) for kind in QUESTION_KINDS}
    manifest: dict[str, Any] = {
        "seed": seed,
        "task": "anyres",
        "family": FAMILY,
        "model": "model",
        "images": {
            "dir": "images",
            "pretrain": len(pretrain_scenes),
            "finetune": len(finetune_scenes),
            "sizes": {aspect: list(size) for aspect, size in ASPECTS.items()},
        },
        "anyres": {
            "view_size": VIEW,
            "patch_size": PATCH,
            "tokens_per_view": (VIEW // PATCH) ** 2,
            "grid_pinpoints": PINPOINTS,
            "tokens_per_image": tokens,
            "mean_tokens_per_image": sum(tokens.values()) / len(tokens),
        },
        "pretrain": {"file": "pretrain.json", "samples": len(pretrain)},
        "finetune": {
            "file": "finetune.json",
            "samples": len(finetune),
            "answers": sum(len(s["conversations"]) // 2 for s in finetune),
        },
        "benchmark": {
            "name": BENCHMARK_NAME,
            "root": "eval",
            "questions": len(questions),
            "by_kind": kinds,
            "by_aspect": {aspect: eval_aspects.count(aspect) for aspect in ASPECTS},
            "images": "held out from training",
        },
        "vision_tower": {
            **{k: getattr(tower.config, k) for k in VISION_DEFAULTS},
            "pretraining": asdict(tower_result) if tower_result else None,
        },
        "llm": {
            **SCENE_LLM,
            "vocab_size": len(tokenizer),
            "parameters": llm.num_parameters(),
            "pretraining": llm_result if llm_steps > 0 else None,
        },
    }
    write_json(out / "manifest.json", manifest)
    (out / "README.md").write_text(_readme(manifest), encoding="utf-8")
    logger.info("AnyRes playground in %s: visual tokens per image %s", out, json.dumps(tokens))
    return manifest


def _readme(manifest: dict[str, Any]) -> str:
    anyres = manifest["anyres"]
    bench = manifest["benchmark"]
    return f"""# duet-vlm AnyRes playground

Generated offline by `python -m llava.tools.make_playground --task anyres` (seed {manifest["seed"]}).

The scenes task (quadrant colours, counts, the small dot; see the scenes playground) at three aspect ratios
(width x height: {", ".join(f"{a} {w} x {h}" for a, (w, h) in manifest["images"]["sizes"].items())}), as a tiny
LLaVA-NeXT checkpoint in `model/`: {anyres["view_size"]} px views of {anyres["patch_size"]} px patches
({anyres["tokens_per_view"]} tokens a view), grid pinpoints {anyres["grid_pinpoints"]} (height, width), so the
tile grid follows the aspect ratio. Visual tokens per image (base view + tiles + one newline per tile row):
{anyres["tokens_per_image"]}.

- `finetune.json`: {manifest["finetune"]["samples"]} multi-turn samples ({manifest["finetune"]["answers"]} answers),
  `pretrain.json`: {manifest["pretrain"]["samples"]} short ones; LLaVA JSON, `--version chat_template`.
- `eval/{bench["name"]}/`: {bench["questions"]} held-out questions ({bench["by_aspect"]}):
  `python -m llava.eval.run --model <checkpoint> --benchmarks {bench["name"]} --root <this folder>/eval ...`.
- `model/`: CLIP tower pretrained on scenes at {anyres["view_size"]} px, LLaMA pretrained on text, random
  projector and `image_newline`; finetune it with `MODEL=<this folder>/model bash scripts/v1_5/finetune.sh`.
"""
