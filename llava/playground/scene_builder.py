"""Build the learnable scenes playground: data, a held-out benchmark and tiny models, offline.

Layout of ``out_dir`` (every path relative to it):

* ``images/``: training scenes (336 px PNGs); ``pretrain.json`` (short conversations that align the
  projector, stage 1) and ``finetune.json`` (multi-turn short-answer VQA, stage 2), both in LLaVA's
  format and Vicuna v1 template; ``scene_metadata.json`` (what each image shows).
* ``eval/playground/``: the held-out benchmark (:mod:`llava.eval.benchmarks.playground`), scenes never
  used in training: ``questions.jsonl`` and ``images/``. ``eval`` is the evaluation root.
* ``demo_requests.jsonl``: a few benchmark questions in ``llava.tools.generate``'s request format.
* ``vision_tower/``: the tiny CLIP tower after supervised pretraining on generated scenes
  (:mod:`llava.playground.tower_training`; its held-out results in ``tower_pretraining.json``).
* ``llm/``: a tiny LLaMA, pretrained on text (:mod:`llava.playground.llm_pretraining`: the same
  questions with the scene told in words; results in ``llm_pretraining.json``), and its locally
  trained tokenizer.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llava.playground.conversations import SHORT_ANSWER_SUFFIX
from llava.playground.llm_pretraining import pretrain_llm
from llava.playground.output import prepare_out_dir, write_json, write_jsonl
from llava.playground.scenes import (
    QUESTION_KINDS,
    Scene,
    benchmark_questions,
    benchmark_scenes,
    caption,
    random_scene,
    vqa_sample,
    write_scenes,
)
from llava.playground.tiny_models import (
    VISION_DEFAULTS,
    build_clip_image_processor,
    build_tiny_llama,
    build_tiny_vision_tower,
    ensure_bos,
)
from llava.playground.tokenizer import train_playground_tokenizer
from llava.playground.tower_training import pretrain_tower

logger = logging.getLogger(__name__)

BENCHMARK_NAME = "playground"
"""Registry name of the held-out benchmark; its files live in ``<out>/eval/playground``."""
SCENE_LLM: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
LLM_INITIALIZER_RANGE = 0.08
"""Wider than LLaMA's 0.02: a tiny model learns its attention patterns sooner (measured on this task)."""
GENERATED_ENTRIES: tuple[str, ...] = (
    "images",
    "pretrain.json",
    "finetune.json",
    "scene_metadata.json",
    "eval",
    "demo_requests.jsonl",
    "vision_tower",
    "tower_pretraining.json",
    "llm",
    "llm_pretraining.json",
    "manifest.json",
    "README.md",
)
"""Top-level names the builder writes; ``force`` removes only these, never other files."""


def _scenes(rng: random.Random, prefix: str, count: int) -> list[Scene]:
    return [random_scene(rng, f"{prefix}_{i:06d}.png") for i in range(count)]


def build_scene_playground(
    out_dir: str | Path,
    num_pretrain: int = 1000,
    num_finetune: int = 3000,
    num_eval: int = 300,
    rounds: tuple[int, int] = (5, 7),
    tower_steps: int = 300,
    llm_steps: int = 400,
    seed: int = 0,
    vocab_size: int = 600,
    force: bool = False,
) -> dict[str, Any]:
    """Write the scenes playground into ``out_dir`` and return its manifest (also ``manifest.json``).

    ``rounds`` bounds the question rounds per finetune sample (several answers per image make each
    image's tokens teach more; stage-1 samples have 1-3). ``tower_steps = 0`` / ``llm_steps = 0`` keep
    the tower / the LLM random (fast, for tests of the plumbing). Deterministic for a given ``seed``;
    refuses a non-empty ``out_dir`` unless ``force``.
    """
    out = Path(out_dir)
    prepare_out_dir(out, force, GENERATED_ENTRIES)
    rng = random.Random(f"scenes-{seed}")
    pretrain_scenes = _scenes(rng, "pretrain", num_pretrain)
    finetune_scenes = _scenes(rng, "finetune", num_finetune)
    pretrain = [vqa_sample(s, rng, f"pretrain_{i:06d}", rng.randint(1, 3)) for i, s in enumerate(pretrain_scenes)]
    finetune = [vqa_sample(s, rng, f"finetune_{i:06d}", rng.randint(*rounds)) for i, s in enumerate(finetune_scenes)]
    eval_rng = random.Random(f"scenes-eval-{seed}")
    eval_pairs = benchmark_scenes(eval_rng, num_eval)
    eval_scenes = [scene for scene, _ in eval_pairs]
    questions = benchmark_questions(eval_pairs, eval_rng)

    all_training = pretrain_scenes + finetune_scenes
    for scenes, folder in ((all_training, out / "images"), (eval_scenes, out / "eval" / BENCHMARK_NAME / "images")):
        write_scenes(tqdm(scenes, desc=f"drawing {folder.relative_to(out)}", unit="img", leave=False), folder)
    write_json(out / "pretrain.json", pretrain)
    write_json(out / "finetune.json", finetune)
    write_json(out / "scene_metadata.json", {s.file: s.to_json() for s in all_training + eval_scenes})
    write_jsonl(out / "eval" / BENCHMARK_NAME / "questions.jsonl", questions)
    demo = [
        {"id": f"demo_{row['question_id']}", "image": row["image"], "prompt": row["text"], "expected": row["answer"]}
        for row in questions[: len(QUESTION_KINDS)]
    ]
    write_jsonl(out / "demo_requests.jsonl", demo)

    tower = build_tiny_vision_tower(seed)
    tower_result = pretrain_tower(tower, steps=tower_steps, seed=seed) if tower_steps > 0 else None
    tower.save_pretrained(out / "vision_tower", safe_serialization=True)
    build_clip_image_processor(tower.config.image_size).save_pretrained(out / "vision_tower")
    write_json(out / "tower_pretraining.json", asdict(tower_result) if tower_result else {"steps": 0})

    texts = [turn["value"] for sample in pretrain + finetune for turn in sample["conversations"]]
    texts += [SHORT_ANSWER_SUFFIX, "USER:", "ASSISTANT:", "Scene:"] + [caption(s) for s in pretrain_scenes]
    tokenizer = train_playground_tokenizer(texts, vocab_size=vocab_size)
    ensure_bos(tokenizer)
    llm = build_tiny_llama(tokenizer, seed, initializer_range=LLM_INITIALIZER_RANGE, **SCENE_LLM)
    llm_result = pretrain_llm(llm, tokenizer, steps=llm_steps, seed=seed) if llm_steps > 0 else {"steps": 0}
    llm.save_pretrained(out / "llm", safe_serialization=True)
    tokenizer.save_pretrained(out / "llm")
    write_json(out / "llm_pretraining.json", llm_result)

    kinds = {kind: sum(q["category"] == kind for q in questions) for kind in QUESTION_KINDS}
    manifest: dict[str, Any] = {
        "seed": seed,
        "task": "scenes",
        "images": {"dir": "images", "pretrain": len(pretrain_scenes), "finetune": len(finetune_scenes)},
        "pretrain": {
            "file": "pretrain.json",
            "samples": len(pretrain),
            "answers": sum(len(s["conversations"]) // 2 for s in pretrain),
        },
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
            "images": "held out from training",
        },
        "vision_tower": {
            "dir": "vision_tower",
            **{k: getattr(tower.config, k) for k in VISION_DEFAULTS},
            "pretraining": asdict(tower_result) if tower_result else None,
        },
        "llm": {
            "dir": "llm",
            **SCENE_LLM,
            "vocab_size": len(tokenizer),
            "parameters": llm.num_parameters(),
            "pretraining": llm_result if llm_steps > 0 else None,
        },
    }
    write_json(out / "manifest.json", manifest)
    (out / "README.md").write_text(_readme(manifest), encoding="utf-8")
    return manifest


def _readme(manifest: dict[str, Any]) -> str:
    tower = manifest["vision_tower"]["pretraining"]
    tower_line = "kept random (`--tower-steps 0`)"
    if tower:
        tower_line = (
            f"pretrained for {tower['steps']} steps on freshly drawn scenes (never the images here): held-out "
            f"patch colour accuracy {100 * tower['patch_color_accuracy']:.1f} % on object patches, CLS attention "
            f"on object patches {100 * tower['object_patch_attention']:.1f} %"
        )
    llm = manifest["llm"]
    llm_line = "kept random (`--llm-steps 0`)"
    if llm["pretraining"]:
        llm_line = (
            f"pretrained for {llm['pretraining']['steps']} steps on text (held-out answer-token accuracy "
            f"{100 * llm['pretraining']['answer_token_accuracy']:.1f} %)"
        )
    bench = manifest["benchmark"]
    return f"""# duet-vlm scenes playground

Generated offline by `python -m llava.tools.make_playground --task scenes` (seed {manifest["seed"]}).

336 x 336 scenes (CLIP-L/14-336 geometry: 576 patches) in quadrants: one to three large shapes of distinct
colour and shape, and in half of them a small dot (a few patches). Questions need local content: the colour
in a named quadrant, the quadrant of a named colour, the count, whether a colour is present, the colour and
the quadrant of the small dot. One-word answers, balanced so that a constant answer scores low.

- `pretrain.json`: {manifest["pretrain"]["samples"]} short conversations (stage 1 aligns the projector).
- `finetune.json`: {manifest["finetune"]["samples"]} multi-turn samples ({manifest["finetune"]["answers"]} answers).
- `eval/{bench["name"]}/`: {bench["questions"]} held-out questions ({bench["by_kind"]}):
  `python -m llava.eval.run --benchmarks {bench["name"]} --root <this folder>/eval ...`.
- `vision_tower/`: tiny CLIP, {tower_line}.
  Why: a random tower's CLS query attends almost uniformly and its patch features hardly separate colours;
  a real CLIP's do both, and CLS-ranked compression (DUET, VisionZip) relies on it.
- `llm/`: tiny LLaMA (hidden {llm["hidden_size"]}, {llm["num_hidden_layers"]} layers, vocabulary {llm["vocab_size"]}),
  {llm_line}: the same conversations with the image replaced by a sentence describing the scene.
  Why: LLaVA starts from an LLM that already reads questions; LLaVA's stages teach it to look at visual tokens.
"""
