"""The AnyRes family through the evaluation tools users run: ``llava.eval.compare`` (checkpoints x presets,
the table) and the lmms-eval plugin load a LLaVA-NeXT checkpoint by its ``model_type`` and answer with the
family's pipeline, compressed or not."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava.eval import compare
from llava.eval.base import EvalItem, Score

QUESTIONS = 4


class ShapeQuestions:
    """A question about each image of the checkpoint folder (three aspect ratios: different tile grids)."""

    name = "anyres_toy"
    score_name = "exact match"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        images = sorted(root.glob("image_*.png"))
        return [
            EvalItem(f"q{index}", "what colour is the shape", str(images[index % len(images)]), max_new_tokens=3,
                     reference={"answer": "red"})
            for index in range(QUESTIONS)
        ]  # fmt: skip

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        scored = [item for item in items if item.question_id in predictions]
        right = sum(predictions[item.question_id] == item.reference["answer"] for item in scored)
        return Score(100.0 * right / max(len(scored), 1), {"protocol": protocol}, len(scored), len(items))


def test_compare_runs_a_llava_next_checkpoint_with_anyres_presets(llava_next_checkpoint, tmp_path, monkeypatch):
    from llava.eval import registry

    monkeypatch.setitem(registry._BENCHMARKS, "anyres_toy", ("tests.test_llava_next_eval:ShapeQuestions", {}))
    argv = ["--model", f"next={llava_next_checkpoint}", "--benchmarks", "anyres_toy",
            "--presets", "none,anyres_pdrop_third,anyres_duet_third", "--root", str(llava_next_checkpoint),
            "--out", str(tmp_path), "--no-progress", "--batch-size", "2", "--device", "cpu"]  # fmt: skip
    rows = compare.main(argv)
    assert [row["preset"] for row in rows] == ["none", "anyres_pdrop_third", "anyres_duet_third"]
    tokens = {row["preset"]: row["visual_tokens_per_layer"] for row in rows}
    assert tokens["none"] > tokens["anyres_pdrop_third"] > 0 and tokens["none"] > tokens["anyres_duet_third"] > 0
    for row in rows:
        answers = (tmp_path / "next" / row["preset"] / "anyres_toy").glob("answers*.jsonl")
        lines = [json.loads(line) for path in answers for line in path.read_text().splitlines()]
        assert len(lines) == QUESTIONS
    assert json.loads((tmp_path / "table.json").read_text())["baseline"] == ["next", "none"]


def test_the_lmms_eval_plugin_loads_a_llava_next_checkpoint(llava_next_checkpoint):
    from llava.eval.lmms_plugin import DuetLlava
    from llava.families.llava_next import LlavaNextPipeline

    model = DuetLlava(pretrained=str(llava_next_checkpoint), batch_size=2, device="cpu", max_new_tokens=3,
                      compression="anyres_duet_third")  # fmt: skip
    assert isinstance(model.pipeline, LlavaNextPipeline)
    assert model.pipeline.model.stage_plan is not None
    image = str(llava_next_checkpoint / "image_0.png")
    answers = model.pipeline.generate([{"image": image, "prompt": "what colour is the shape"}], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)
