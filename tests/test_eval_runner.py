"""The evaluation runner on the tiny playground model: shards, resume after a kill, partial and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from llava.constants import VIDEO_PROCESSOR_DIR
from llava.eval import compare, runner
from llava.eval import run as run_cli
from llava.eval.answers import read_answers, shard_file
from llava.eval.base import SHORT_ANSWER, EvalDataError, EvalItem, Score
from llava.hf_adapter import load_image_processor
from llava.inference import LlavaPipeline
from llava.model.modeling import DuetLlavaForCausalLM
from llava.playground.builder import build_playground


class ToyBenchmark:
    """Shape questions about playground images; exact match against a fixed reference."""

    name = "toy"
    score_name = "exact match"

    def __init__(self, count: int = 7) -> None:
        self.count = count

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        images = sorted((root / "images").glob("*.png"))[: self.count]
        return [
            EvalItem(f"q{index}", "Which shape is it?", str(path), max_new_tokens=3, reference={"answer": "Circle"})
            for index, path in enumerate(images)
        ]

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        scored = [item for item in items if item.question_id in predictions]
        right = sum(predictions[item.question_id] == item.reference["answer"] for item in scored)
        return Score(
            100.0 * right / max(len(scored), 1), {"right": right, "protocol": protocol}, len(scored), len(items)
        )


@pytest.fixture(scope="module")
def image_playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pg_eval") / "playground"
    build_playground(out, num_pretrain=2, num_finetune=8, seed=0)
    return out


@pytest.fixture(scope="module")
def checkpoint(image_playground: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved checkpoint (random projector) with its tokenizer and image processor."""
    checkpoint = tmp_path_factory.mktemp("ckpt") / "model"
    model = DuetLlavaForCausalLM.from_components(
        AutoModelForCausalLM.from_pretrained(image_playground / "llm"),
        CLIPVisionModel.from_pretrained(image_playground / "vision_tower"),
    )
    model.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(image_playground / "llm").save_pretrained(checkpoint)
    load_image_processor(image_playground / "vision_tower").save_pretrained(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def pipeline(checkpoint: Path) -> LlavaPipeline:
    return LlavaPipeline.from_pretrained(checkpoint, device="cpu")


def answers_of(folder: Path) -> dict[str, str]:
    return {question_id: record["text"] for question_id, record in read_answers(folder).items()}


def test_two_shards_merged_equal_one_process(pipeline, image_playground, tmp_path):
    benchmark = ToyBenchmark()
    items = benchmark.load(image_playground, tmp_path)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert runner.generate_answers(pipeline, benchmark, items, single, batch_size=3, progress=False) == 7
    for rank in (0, 1):
        runner.generate_answers(
            pipeline, benchmark, items, sharded, batch_size=2, rank=rank, world_size=2, progress=False
        )
    assert len(shard_file(sharded, 0, 2).read_text().splitlines()) == 4  # questions 0, 2, 4, 6
    assert answers_of(single) == answers_of(sharded) and len(answers_of(single)) == 7
    one, two = runner.score_folder(benchmark, items, single), runner.score_folder(benchmark, items, sharded)
    assert one["score"] == two["score"] and one["complete"] and two["num_scored"] == 7
    saved = json.loads((sharded / "result.json").read_text())
    assert saved["num_questions"] == 7 and saved["visual_tokens_per_layer"] == pytest.approx(576.0)
    assert saved["prefill_s"] > 0 and saved["generate_s"] >= saved["prefill_s"]


class PreemptedError(RuntimeError):
    pass


class KilledAfter:
    """A pipeline that dies after ``batches`` generate calls, as a preempted job would."""

    def __init__(self, pipeline: LlavaPipeline, batches: int) -> None:
        self.inner, self.left = pipeline, batches
        self.model, self.device = pipeline.model, pipeline.device

    def generate(self, *args, **kwargs):
        if self.left == 0:
            raise PreemptedError
        self.left -= 1
        return self.inner.generate(*args, **kwargs)


def test_killed_run_resumes_to_the_uninterrupted_result(pipeline, image_playground, tmp_path):
    benchmark = ToyBenchmark()
    items = benchmark.load(image_playground, tmp_path)
    reference = tmp_path / "reference"
    runner.generate_answers(pipeline, benchmark, items, reference, batch_size=2, progress=False)
    resumed = tmp_path / "resumed"
    with pytest.raises(PreemptedError):
        runner.generate_answers(KilledAfter(pipeline, 2), benchmark, items, resumed, batch_size=2, progress=False)
    path = shard_file(resumed, 0, 1)
    assert len(path.read_text().splitlines()) == 4
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"question_id": "q4", "te')  # torn by the kill mid-write
    answered = runner.generate_answers(pipeline, benchmark, items, resumed, batch_size=2, progress=False)
    assert answered == 3  # only the unanswered questions were generated again
    assert path.read_text().count('"question_id": "q0"') == 1  # finished answers are never rewritten
    assert answers_of(resumed) == answers_of(reference)
    assert (
        runner.score_folder(benchmark, items, resumed)["score"]
        == runner.score_folder(benchmark, items, reference)["score"]
    )


def test_partial_answers_are_reported_as_partial(pipeline, image_playground, tmp_path):
    benchmark = ToyBenchmark()
    items = benchmark.load(image_playground, tmp_path)
    runner.generate_answers(
        pipeline, benchmark, items, tmp_path / "run", batch_size=4, rank=0, world_size=2, progress=False
    )
    result = runner.score_folder(benchmark, items, tmp_path / "run")
    assert (result["num_scored"], result["num_questions"], result["complete"]) == (4, 7, False)


def test_answers_for_unknown_questions_are_an_error(image_playground, tmp_path):
    benchmark = ToyBenchmark()
    items = benchmark.load(image_playground, tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    shard_file(folder, 0, 1).write_text('{"question_id": "elsewhere-1", "text": "x"}\n')
    with pytest.raises(EvalDataError, match="elsewhere-1"):
        runner.score_folder(benchmark, items, folder)


def test_unreadable_image_names_the_question_or_is_skipped(pipeline, image_playground, tmp_path):
    benchmark = ToyBenchmark(count=3)
    items = benchmark.load(image_playground, tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items[1] = EvalItem("q1", items[1].prompt, str(broken), max_new_tokens=3, reference={"answer": "Circle"})
    with pytest.raises(EvalDataError, match="q1"):
        runner.generate_answers(pipeline, benchmark, items, tmp_path / "strict", batch_size=3, progress=False)
    runner.generate_answers(pipeline, benchmark, items, tmp_path / "skip", batch_size=3, skip_bad=True, progress=False)
    result = runner.score_folder(benchmark, items, tmp_path / "skip")
    assert result["num_skipped"] == 1 and result["skipped"][0]["question_id"] == "q1"
    assert (result["num_scored"], result["complete"]) == (2, False)


def test_cli_runs_presets_and_resumes(pipeline, image_playground, tmp_path, monkeypatch):
    from llava.eval import registry

    monkeypatch.setitem(registry._BENCHMARKS, "toy", ("tests.test_eval_runner:ToyBenchmark", {}))
    monkeypatch.setattr(run_cli, "_load_pipeline", lambda args: pipeline)
    argv = ["--model", "unused", "--root", str(image_playground), "--benchmarks", "toy", "--presets", "none,duet_64",
            "--out", str(tmp_path / "eval"), "--batch-size", "4", "--no-progress"]  # fmt: skip
    try:
        results = run_cli.main(argv)
    finally:
        pipeline.model.set_compression("none")
    assert [(result["preset"], result["benchmark"]) for result in results] == [("none", "toy"), ("duet_64", "toy")]
    assert results[0]["visual_tokens_per_layer"] == pytest.approx(576.0)
    assert results[1]["visual_tokens_per_layer"] < 576.0  # the preset was applied
    assert all(result["complete"] for result in results)
    try:
        again = run_cli.main(argv)  # everything answered: nothing is generated, the scores are the same
    finally:
        pipeline.model.set_compression("none")
    assert [result["score"] for result in again] == [result["score"] for result in results]
    assert len(shard_file(tmp_path / "eval" / "none" / "toy", 0, 1).read_text().splitlines()) == 7


def _result(checkpoint: str, preset: str, benchmark: str, score: float, tokens: float, complete: bool = True) -> dict:
    return {"checkpoint": checkpoint, "preset": preset, "benchmark": benchmark, "score": score, "complete": complete,
            "num_scored": 10 if complete else 5, "num_questions": 10, "visual_tokens_per_layer": tokens,
            "prefill_s": 0.5}  # fmt: skip


def test_compare_table_arithmetic(tmp_path):
    results = [
        _result("base", "none", "gqa", 60.0, 576), _result("base", "none", "pope", 80.0, 576),
        _result("base", "duet_64", "gqa", 57.0, 64), _result("base", "duet_64", "pope", 84.0, 64),
        _result("trained", "duet_64", "gqa", 59.4, 64), _result("trained", "duet_64", "pope", 40.0, 64, complete=False),
    ]  # fmt: skip
    rows = compare.build_table(results, ["gqa", "pope"], ("base", "none"))
    by_key = {(row["checkpoint"], row["preset"]): row for row in rows}
    assert by_key[("base", "none")]["average_retained"] == pytest.approx(100.0)
    duet = by_key[("base", "duet_64")]
    assert duet["cells"]["gqa"]["retained"] == pytest.approx(95.0) and duet["cells"]["pope"]["retained"] == 105.0
    assert duet["average_retained"] == pytest.approx(100.0)  # (95 + 105) / 2: the paper's Avg%
    assert duet["visual_tokens_per_layer"] == 64 and duet["prefill_ms_per_question"] == pytest.approx(50.0)
    trained = by_key[("trained", "duet_64")]
    assert trained["incomplete"] == ["pope (5/10)"]
    markdown = compare.write_table(rows, ["gqa", "pope"], ("base", "none"), tmp_path)
    assert "| base | duet_64 | 57.0 (95.0 %) | 84.0 (105.0 %) | 100.0 |" in markdown
    assert "INCOMPLETE" in markdown and (tmp_path / "table.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="baseline"):
        compare.build_table(results, ["gqa"], ("other", "none"))


def test_compare_refuses_results_scored_under_different_protocols_and_names_the_protocol(tmp_path):
    official = [{**_result(checkpoint, preset, "sqa", 60.0, 576), "protocol": "official"}
                for checkpoint, preset in (("base", "none"), ("base", "duet_64"))]  # fmt: skip
    rows = compare.build_table(official, ["sqa"], ("base", "none"))
    assert "Scoring protocol (llava.eval.run --protocol): sqa official" in compare.render_markdown(
        rows, ["sqa"], ("base", "none")
    )
    mixed = [official[0], {**official[1], "protocol": "strict"}]
    with pytest.raises(ValueError, match=r"sqa: official \(base/none\), strict \(base/duet_64\)"):
        compare.build_table(mixed, ["sqa"], ("base", "none"))
    unrecorded = [official[0], _result("base", "duet_64", "sqa", 60.0, 64)]  # a result from before protocols
    with pytest.raises(ValueError, match="unrecorded"):
        compare.build_table(unrecorded, ["sqa"], ("base", "none"))


def test_compare_training_time_columns_and_per_model_presets(tmp_path):
    assert compare.parse_models(["a=runs/x", "runs/y@duet_64,none"]) == [
        ("a", "runs/x", None),
        ("y", "runs/y", ["duet_64", "none"]),
    ]
    with pytest.raises(ValueError, match="must differ"):
        compare.parse_models(["runs/x", "other/x"])
    stage = tmp_path / "pretrain.jsonl"
    stage.write_text('{"step": 1, "loss": 2.0}\n{"train_runtime": 30.0}\n')
    finetune = tmp_path / "finetune.jsonl"
    finetune.write_text('{"train_runtime": 5.0}\n{"step": 9, "loss": 1.0}\n{"train_runtime": 70.0}\n')
    assert compare.training_seconds([stage, finetune]) == pytest.approx(100.0)  # the last value per file
    unfinished = tmp_path / "killed.jsonl"
    unfinished.write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ValueError, match=r"killed\.jsonl: no train_runtime"):
        compare.parse_train_times([f"x={unfinished}"])
    times = compare.parse_train_times([f"base={stage},{finetune}", f"trained={stage}"])
    results = [_result("base", "none", "gqa", 60.0, 576), _result("trained", "duet_64", "gqa", 57.0, 64)]
    rows = compare.build_table(results, ["gqa"], ("base", "none"), times)
    assert [(row["train_s"], row["train_saved_percent"]) for row in rows] == [(100.0, 0.0), (30.0, 70.0)]
    markdown = compare.write_table(rows, ["gqa"], ("base", "none"), tmp_path / "table")
    assert (tmp_path / "table" / "table.png").read_bytes()[:4] == b"\x89PNG"  # with the training-time panel
    assert (
        "train time saved %" in markdown
        and "| trained | duet_64 | 57.0 (95.0 %) | 95.0 | 64.0 | 50.00 | 30 | 70.0 |" in markdown
    )


def test_compare_runs_checkpoints_and_presets(pipeline, image_playground, tmp_path, monkeypatch):
    from llava.eval import registry

    monkeypatch.setitem(registry._BENCHMARKS, "toy", ("tests.test_eval_runner:ToyBenchmark", {}))
    monkeypatch.setattr(run_cli, "_load_pipeline", lambda args: pipeline)
    try:
        argv = ["--model", "a=ckpt-a", "--model", "b=ckpt-b", "--model", "c=ckpt-c@random_64", "--benchmarks", "toy",
                "--presets", "none,duet_64",
                "--root", str(image_playground), "--out", str(tmp_path), "--no-progress"]  # fmt: skip
        rows = compare.main(argv)
    finally:
        pipeline.model.set_compression("none")
    assert [(row["checkpoint"], row["preset"]) for row in rows] == [
        ("a", "none"),
        ("a", "duet_64"),
        ("b", "none"),
        ("b", "duet_64"),
        ("c", "random_64"),
    ]
    assert rows[0]["visual_tokens_per_layer"] == pytest.approx(576.0) and rows[1]["visual_tokens_per_layer"] < 100
    assert json.loads((tmp_path / "table.json").read_text())["baseline"] == ["a", "none"]


def test_eval_scripts_build_the_launch_commands():
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DRY_RUN": "1", "MODEL": "runs/m", "NUM_GPUS": "4", "PRESETS": "none,duet_64"}
    command = subprocess.run(
        ["bash", str(repo / "scripts" / "eval" / "run.sh"), "--limit", "5"], env=env, capture_output=True, text=True,
        check=True,
    ).stdout.split()  # fmt: skip
    assert command[:6] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    assert command[command.index("--presets") + 1] == "none\\,duet_64" and command[-2:] == ["--limit", "5"]
    env = {**os.environ, "DRY_RUN": "1", "MODELS": "a=runs/x runs/y"}
    command = subprocess.run(
        ["bash", str(repo / "scripts" / "eval" / "compare.sh")], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert command[-4:] == ["--model", "a=runs/x", "--model", "runs/y"]


def test_video_qa_through_the_cli_with_a_judge(playground, tmp_path, monkeypatch):
    """A Video-LLaVA checkpoint answers MSVD-format questions (answers listed in another order) and the
    optional judge's summary lands in the result."""
    checkpoint = tmp_path / "video-model"
    model = DuetLlavaForCausalLM.from_components(
        AutoModelForCausalLM.from_pretrained(playground / "llm"),
        CLIPVisionModel.from_pretrained(playground / "vision_tower"),
        video_model=CLIPVisionModel.from_pretrained(playground / "video_tower"),
    )
    model.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(playground / "llm").save_pretrained(checkpoint)
    load_image_processor(playground / "vision_tower").save_pretrained(checkpoint)
    load_image_processor(playground / "video_tower").save_pretrained(checkpoint / VIDEO_PROCESSOR_DIR)
    folder = tmp_path / "eval" / "GPT_Zero_Shot_QA" / "MSVD_Zero_Shot_QA"
    (folder / "videos").mkdir(parents=True)
    videos = sorted((playground / "videos").glob("*.mp4"))[:3]
    questions = []
    for index, video in enumerate(videos):
        shutil.copy(video, folder / "videos" / video.name)
        questions.append({"video_name": video.stem, "question": "what moves?", "question_id": f"v{index}"})
    answers = [{"answer": "circle", "type": "what", "question_id": question["question_id"]} for question in questions]
    (folder / "test_q.json").write_text(json.dumps(questions))
    (folder / "test_a.json").write_text(json.dumps(answers[::-1]))
    seen = {}

    def fake_judge(items, predictions, config, protocol):
        seen["url"], seen["ids"], seen["protocol"] = config.url, sorted(predictions), protocol
        return {"accuracy": 50.0, "score": 2.5, "num_judged": len(predictions), "judgements": {"v0": {}}}

    monkeypatch.setattr(run_cli, "judge_answers", fake_judge)
    results = run_cli.main(
        ["--model", str(checkpoint), "--root", str(tmp_path / "eval"), "--benchmarks", "msvd", "--presets", "none",
         "--out", str(tmp_path / "out"), "--batch-size", "2", "--device", "cpu", "--no-progress", "--judge",
         "--judge-url", "http://judge.invalid/v1"]
    )  # fmt: skip
    (result,) = results
    assert result["complete"] and result["num_scored"] == 3
    assert result["visual_tokens_per_layer"] == pytest.approx(model.config.llm_tokens_per_video)
    assert result["judge"] == {"accuracy": 50.0, "score": 2.5, "num_judged": 3}
    assert seen == {"url": "http://judge.invalid/v1", "ids": ["v0", "v1", "v2"], "protocol": "official"}
    assert result["protocol"] == "official"
    assert json.loads((tmp_path / "out" / "none" / "msvd" / "judge.json").read_text())["judgements"] == {"v0": {}}


def write_gqa(root: Path, images: Sequence[Path]) -> None:
    """A GQA testdev-balanced folder in LLaVA's layout over the given images."""
    folder = root / "gqa"
    (folder / "data" / "images").mkdir(parents=True)
    annotations, lines = {}, []
    for index, image in enumerate(images):
        shutil.copy(image, folder / "data" / "images" / image.name)
        question = "Which shape is it?"
        lines.append(json.dumps({"question_id": f"g{index}", "image": image.name, "text": question + SHORT_ANSWER}))
        annotations[f"g{index}"] = {"imageId": image.stem, "question": question, "answer": "circle"}
    (folder / "llava_gqa_testdev_balanced.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "data" / "testdev_balanced_questions.json").write_text(json.dumps(annotations))


def test_torchrun_two_ranks_equal_one_process(checkpoint, image_playground, tmp_path):
    """Two CPU ranks under torchrun (gloo): each answers its shard, rank 0 merges and scores."""
    write_gqa(tmp_path / "eval", sorted((image_playground / "images").glob("*.png"))[:5])
    base = [sys.executable, "-m", "llava.eval.run", "--model", str(checkpoint), "--root", str(tmp_path / "eval"),
            "--benchmarks", "gqa", "--presets", "none", "--device", "cpu", "--batch-size", "2",
            "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    single = subprocess.run([*base, "--out", str(tmp_path / "one")], env=env, cwd=repo, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    launched = subprocess.run(
        [*launcher, *base[1:], "--out", str(tmp_path / "two")], env=env, cwd=repo, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    folder = tmp_path / "two" / "none" / "gqa"
    assert sorted(path.name for path in folder.glob("answers-*.jsonl")) == ["answers-0of2.jsonl", "answers-1of2.jsonl"]
    one = json.loads((tmp_path / "one" / "none" / "gqa" / "result.json").read_text())
    two = json.loads((folder / "result.json").read_text())
    assert (two["world_size"], two["num_scored"], two["complete"]) == (2, 5, True)
    assert two["score"] == one["score"] and answers_of(folder) == answers_of(tmp_path / "one" / "none" / "gqa")


def test_fast_decoding_answers_equal_the_eager_loop_and_the_flag_reaches_the_pipeline(
    pipeline, image_playground, checkpoint, tmp_path, monkeypatch
):
    benchmark = ToyBenchmark()
    items = benchmark.load(image_playground, tmp_path)
    pipeline.model.set_compression("duet_64")
    try:
        runner.generate_answers(pipeline, benchmark, items, tmp_path / "eager", batch_size=3, progress=False)
        pipeline.fast_decoding = True
        runner.generate_answers(pipeline, benchmark, items, tmp_path / "fast", batch_size=3, progress=False)
        assert pipeline.fast_decoder() is not None and pipeline.fast_decoder().runners()
    finally:
        pipeline.fast_decoding = None
        pipeline.model.set_compression("none")
    assert answers_of(tmp_path / "fast") == answers_of(tmp_path / "eager")

    seen = {}
    monkeypatch.setattr("llava.inference.load_pipeline", lambda path, **kwargs: seen.update(kwargs))
    for flag, expected in (("--fast-decoding", True), ("--no-fast-decoding", False), (None, None)):
        argv = ["--model", str(checkpoint), "--benchmarks", "playground", "--out", str(tmp_path / "x")]
        run_cli._load_pipeline(run_cli.parse_args([*argv, flag] if flag else argv))
        assert seen["fast_decoding"] is expected
