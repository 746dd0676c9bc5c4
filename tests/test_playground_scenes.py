"""The scenes playground: questions that need local content, a balanced held-out benchmark, and a task
that a tiny model learns (a short run beats the constant-answer baseline by a wide margin)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llava.eval.base import EvalDataError
from llava.eval.registry import get_benchmark
from llava.playground.scene_builder import BENCHMARK_NAME, build_scene_playground
from llava.playground.scenes import (
    CANVAS,
    CELL_NAMES,
    QUESTION_KINDS,
    SCENE_COLORS,
    ask,
    benchmark_questions,
    benchmark_scenes,
    draw_label_map,
    draw_scene,
    random_scene,
)
from llava.playground.tower_training import scene_targets


def test_scenes_are_deterministic_and_at_llava_geometry():
    first = [random_scene(random.Random(5), f"s{i}.png") for i in range(4)]
    again = [random_scene(random.Random(5), f"s{i}.png") for i in range(4)]
    assert first == again
    image = draw_scene(first[0])
    assert image.size == (CANVAS, CANVAS) == (336, 336) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(draw_scene(again[0])))


def test_every_answer_follows_from_the_drawn_pixels():
    rng = random.Random(0)
    for index in range(40):
        scene = random_scene(rng, f"s{index}.png", with_dot=True)
        pixels = np.asarray(draw_scene(scene)).astype(int)
        for obj in (*scene.objects, scene.dot):
            x, y = obj.center
            assert tuple(pixels[y, x]) == SCENE_COLORS[obj.color]  # the object is drawn where the answer says
        qa = ask(scene, "color_at", rng)
        cell = CELL_NAMES.index(qa.question.split("in the ")[1].rstrip("?"))
        assert qa.answer.lower() == scene.object_in(cell).color
        assert ask(scene, "dot", rng).answer.lower() == scene.dot.color
        assert ask(scene, "count", rng).answer in ("One", "Two", "Three")


def test_the_dot_is_a_few_patches_and_the_large_shapes_are_many():
    rng = random.Random(1)
    for index in range(30):
        scene = random_scene(rng, f"s{index}.png", with_dot=True)
        targets = scene_targets(scene, patch_size=14)
        dot_patches = int(np.count_nonzero(targets["patch_shape"] == targets["patch_shape"].max()))
        assert 1 <= dot_patches <= 9  # of 576: dropping the wrong tokens loses the dot
        labels = draw_label_map(scene)
        assert np.count_nonzero(labels == 1) > 15 * 14 * 14  # a large shape covers tens of patches


def test_benchmark_is_balanced_over_kinds_and_answers():
    rng = random.Random(2)
    rows = benchmark_questions(benchmark_scenes(rng, 600), rng)
    kinds = Counter(row["category"] for row in rows)
    assert set(kinds) == set(QUESTION_KINDS) and max(kinds.values()) - min(kinds.values()) <= 1
    answers = Counter(row["answer"] for row in rows)
    assert answers.most_common(1)[0][1] / len(rows) < 0.12  # a constant answer scores low
    assert len({row["question_id"] for row in rows}) == len(rows)


@pytest.fixture(scope="module")
def scenes_playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "playground"
    build_scene_playground(out, num_pretrain=8, num_finetune=16, num_eval=12, tower_steps=2, llm_steps=2)
    return out


def test_builder_writes_data_models_and_a_held_out_benchmark(scenes_playground):
    manifest = json.loads((scenes_playground / "manifest.json").read_text())
    assert manifest["task"] == "scenes" and manifest["benchmark"]["questions"] == 12
    finetune = json.loads((scenes_playground / "finetune.json").read_text())
    train_images = {sample["image"] for sample in finetune}
    assert all((scenes_playground / "images" / name).is_file() for name in train_images)
    items = get_benchmark(BENCHMARK_NAME).load(scenes_playground / "eval", scenes_playground / "cache")
    assert len(items) == 12 and not {Path(item.image).name for item in items} & train_images
    assert all(Path(item.image).is_relative_to(scenes_playground / "eval" / BENCHMARK_NAME) for item in items)
    for name in ("vision_tower/model.safetensors", "llm/model.safetensors", "llm/tokenizer.json", "README.md"):
        assert (scenes_playground / name).is_file(), name
    with pytest.raises(FileExistsError, match="not empty"):
        build_scene_playground(scenes_playground, num_pretrain=1, num_finetune=1, num_eval=1, tower_steps=0)


def test_benchmark_scores_exact_match_per_kind(scenes_playground):
    benchmark = get_benchmark(BENCHMARK_NAME)
    items = benchmark.load(scenes_playground / "eval", scenes_playground / "cache")
    predictions = {item.question_id: item.reference["answer"].capitalize() + "." for item in items}
    predictions[items[0].question_id] = "not an answer"
    score = benchmark.score(items, predictions)
    assert score.score == pytest.approx(100.0 * 11 / 12) and score.complete
    assert score.metrics[f"category/{items[0].reference['category']}"] < 100.0


def test_benchmark_line_without_answer_names_the_file_and_question(tmp_path, scenes_playground):
    root = tmp_path / "eval"
    folder = root / BENCHMARK_NAME
    folder.mkdir(parents=True)
    (folder / "images").symlink_to(scenes_playground / "eval" / BENCHMARK_NAME / "images")
    row = json.loads((scenes_playground / "eval" / BENCHMARK_NAME / "questions.jsonl").read_text().splitlines()[0])
    del row["answer"]
    (folder / "questions.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(EvalDataError, match=r"questions.jsonl:1: question 0: 'answer'"):
        get_benchmark(BENCHMARK_NAME).load(root, tmp_path / "cache")


def test_a_short_run_learns_the_task_well_above_a_constant_answer(tmp_path):
    """Build a small scenes playground (brief tower and LLM pretraining), finetune through the real entry
    point for a few dozen steps and score the held-out benchmark with the real runner. The bound is loose:
    the full main job trains far longer; here it only has to beat the best constant answer clearly."""
    from llava.eval import run as run_cli
    from llava.training.train import train
    from tests.run_args import base_args

    playground = tmp_path / "scenes"
    # Tower 60 and LLM 80 pretraining steps (were 120 and 150; ~35 s less): measured 33.3 vs a constant 12.5 here,
    # more margin than the longer pretraining gave (31.2); the finetune keeps its 60 steps (45 fell below the bound).
    build_scene_playground(playground, num_pretrain=8, num_finetune=480, num_eval=96, tower_steps=60, llm_steps=80)
    out = tmp_path / "model"
    train(
        base_args(
            playground, out, "--version", "v1", "--data_path", str(playground / "finetune.json"),
            "--learning_rate", "3e-3", "--per_device_train_batch_size", "8", "--max_steps", "60",
            "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", "-2", "--mm_vision_select_feature", "patch", "--image_aspect_ratio", "pad",
        )
    )  # fmt: skip
    [result] = run_cli.main(["--model", str(out), "--root", str(playground / "eval"), "--benchmarks", BENCHMARK_NAME,
                             "--out", str(tmp_path / "eval"), "--batch-size", "16", "--no-progress"])  # fmt: skip
    rows = [json.loads(line) for line in (playground / "eval" / BENCHMARK_NAME / "questions.jsonl").open()]
    constant = 100.0 * Counter(row["answer"] for row in rows).most_common(1)[0][1] / len(rows)
    assert result["complete"] and result["num_scored"] == 96
    assert result["score"] >= constant + 15.0, (result["score"], constant, result["metrics"])
