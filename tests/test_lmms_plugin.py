"""The lmms-eval plugin, end to end through lmms-eval's own evaluator on a local yes/no task.

Needs the ``lmms`` extra and lmms-eval itself (installed with ``--no-deps``, see the README); the README's
test command and ``.ci/run`` install both.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from llava.data.tokenization import tokenize_text_with_images
from llava.eval.lmms_plugin import MODEL_ID, DuetLlava, register, truncate_at_stops
from llava.hf_adapter import load_image_processor
from llava.inference import LlavaPipeline
from llava.model.modeling import DuetLlavaForCausalLM
from llava.playground.builder import build_playground

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

QUESTIONS = [
    ("Is there a red circle in the image?", "yes"),
    ("Is there a blue square in the image?", "no"),
    ("Is there a black star in the image?", "yes"),
    ("Is the background white?", "no"),
    ("Is there any shape in the image?", "yes"),
]
POST_PROMPT = "\nAnswer the question using a single word or phrase."

UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc, results):
    return {"accuracy": float(results[0].strip().lower() == doc["answer"])}


def process_loglikelihood(doc, results):
    # lmms-eval 0.7.3's built-in loglikelihood scoring unpacks the one-element results list itself
    # (ValueError), so the task scores (logprob, is_greedy) here.
    # and the evaluator hands responses over as str((logprob, is_greedy)).
    import ast

    result = results[0]
    logprob, is_greedy = ast.literal_eval(result) if isinstance(result, str) else result
    return {"perplexity": logprob, "acc": int(is_greedy)}
"""

TASK_YAML = """
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: True
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "{target}"
{extra}
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "{post_prompt}"
metadata:
  - version: 0.0
"""

GENERATE_EXTRA = """
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
  until: ["\\n\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""

LOGLIKELIHOOD_EXTRA = """
process_results: !function utils.process_loglikelihood
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny DUET-LLaVA checkpoint with its tokenizer and image processor."""
    out = tmp_path_factory.mktemp("pg_lmms") / "playground"
    build_playground(out, num_pretrain=2, num_finetune=4, seed=0)
    ckpt = out.parent / "ckpt"
    model = DuetLlavaForCausalLM.from_components(
        AutoModelForCausalLM.from_pretrained(out / "llm"), CLIPVisionModel.from_pretrained(out / "vision_tower")
    )
    model.save_pretrained(ckpt)
    AutoTokenizer.from_pretrained(out / "llm").save_pretrained(ckpt)
    load_image_processor(out / "vision_tower").save_pretrained(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An include_path folder with a generate_until and a loglikelihood task over one local dataset."""
    root = tmp_path_factory.mktemp("lmms_tasks")
    colours = ["red", "blue", "green", "black", "orange"]
    images = [Image.new("RGB", (40 + 8 * i, 48), colour) for i, colour in enumerate(colours)]
    features = Features({"question": Value("string"), "answer": Value("string"), "image": ImageFeature()})
    data = {
        "question": [question for question, _ in QUESTIONS],
        "answer": [answer for _, answer in QUESTIONS],
        "image": images,
    }
    DatasetDict({"test": Dataset.from_dict(data, features=features)}).save_to_disk(str(root / "data"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(textwrap.dedent(UTILS))
    common = {"data": root / "data", "post_prompt": POST_PROMPT.replace("\n", "\\n")}
    (tasks / "duet_yesno.yaml").write_text(
        TASK_YAML.format(
            task="duet_yesno", output_type="generate_until", target="answer", extra=GENERATE_EXTRA, **common
        )
    )
    (tasks / "duet_yesno_ll.yaml").write_text(
        TASK_YAML.format(
            task="duet_yesno_ll", output_type="loglikelihood", target="{{answer}}", extra=LOGLIKELIHOOD_EXTRA, **common
        )
    )
    return tasks


def _evaluate(model: DuetLlava, task_dir: Path, task: str) -> dict:
    return simple_evaluate(
        model=model,
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        bootstrap_iters=0,
    )


def _responses(results: dict, task: str) -> list:
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [sample["resps"][0][0] for sample in samples]


def _saved_images(task_dir: Path, tmp_path: Path) -> list[str]:
    data = DatasetDict.load_from_disk(str(task_dir.parent / "data"))["test"]
    paths = []
    for index, doc in enumerate(data):
        path = tmp_path / f"{index}.png"
        doc["image"].convert("RGB").save(path)
        paths.append(str(path))
    return paths


def test_generate_until_matches_pipeline_and_batch_size(checkpoint: Path, task_dir: Path, tmp_path: Path) -> None:
    by_batch = {}
    for batch_size in (1, 4):
        # Batch 4 on the fast decode path (as a --model_args string sets it): the answers must not change.
        fast = "true" if batch_size == 4 else None
        model = DuetLlava(
            pretrained=str(checkpoint), batch_size=batch_size, device="cpu", max_new_tokens=6, fast_decoding=fast
        )
        assert (model.pipeline.fast_decoder() is not None) == (fast == "true")
        results = _evaluate(model, task_dir, "duet_yesno")
        answers = _responses(results, "duet_yesno")
        assert len(answers) == len(QUESTIONS)
        assert all(isinstance(answer, str) for answer in answers)
        accuracy = results["results"]["duet_yesno"]["accuracy,none"]
        expected = sum(a.strip().lower() == gt for a, (_, gt) in zip(answers, QUESTIONS, strict=True)) / len(QUESTIONS)
        assert accuracy == pytest.approx(expected)
        by_batch[batch_size] = answers
    assert by_batch[1] == by_batch[4]

    pipeline = LlavaPipeline.from_pretrained(checkpoint, device="cpu")
    requests = [
        {"image": path, "prompt": question + POST_PROMPT}
        for path, (question, _) in zip(_saved_images(task_dir, tmp_path), QUESTIONS, strict=True)
    ]
    direct = pipeline.generate(requests, max_new_tokens=6, batch_size=2)
    assert by_batch[4] == [truncate_at_stops(text, ["\n\n"]) for text in direct]


def _direct_loglikelihood(pipeline: LlavaPipeline, image: str, context: str, continuation: str) -> tuple[float, bool]:
    """One unpadded forward over prompt + continuation, queries limited to the prompt."""
    prompt = pipeline.prepare([{"image": image, "prompt": context}])
    prefill = pipeline.model(prompt["input_ids"], pixel_values=prompt["pixel_values"], logits_to_keep=1)
    cont = torch.tensor([tokenize_text_with_images(pipeline.tokenizer, continuation)])
    with torch.no_grad():
        out = pipeline.model(
            torch.cat([prompt["input_ids"], cont], dim=1),
            pixel_values=prompt["pixel_values"],
            query_end=prefill.prompt_length,
        )
    log_probs = torch.log_softmax(out.logits[0, -cont.shape[1] - 1 : -1].float(), dim=-1)
    picked = log_probs.gather(-1, cont[0].unsqueeze(-1)).squeeze(-1)
    return float(picked.sum()), bool((log_probs.argmax(-1) == cont[0]).all())


def test_loglikelihood_matches_direct_computation(checkpoint: Path, task_dir: Path, tmp_path: Path) -> None:
    model = DuetLlava(pretrained=str(checkpoint), batch_size=3, device="cpu")
    results = _evaluate(model, task_dir, "duet_yesno_ll")
    # lmms-eval 0.7.3 logs loglikelihood responses as str((logprob, is_greedy)).
    scores = [ast.literal_eval(s) if isinstance(s, str) else s for s in _responses(results, "duet_yesno_ll")]
    assert len(scores) == len(QUESTIONS)
    assert "perplexity,none" in results["results"]["duet_yesno_ll"]

    pipeline = model.pipeline
    images = _saved_images(task_dir, tmp_path)
    for (logprob, is_greedy), image, (question, answer) in zip(scores, images, QUESTIONS, strict=True):
        direct_logprob, direct_greedy = _direct_loglikelihood(pipeline, image, question + POST_PROMPT, answer)
        assert logprob == pytest.approx(direct_logprob, abs=1e-4)
        assert logprob < 0
        assert is_greedy == direct_greedy


def test_registration_resolves_model_name() -> None:
    from lmms_eval.models import get_model

    register()
    assert get_model(MODEL_ID) is DuetLlava


def test_model_args_win_over_cli_batch_size(checkpoint: Path) -> None:
    model = DuetLlava.create_from_arg_string(
        f"pretrained={checkpoint},batch_size=4,device=cpu", {"batch_size": 1, "device": None, "max_batch_size": None}
    )
    assert model.batch_size == 4
    with pytest.raises(ValueError, match="fast_decoding must be true or false"):
        DuetLlava.create_from_arg_string(f"pretrained={checkpoint},device=cpu,fast_decoding=maybe")


def test_truncate_at_stops_cuts_at_earliest() -> None:
    assert truncate_at_stops("yes\n\nno. more", ["\n\n", "."]) == "yes"
    assert truncate_at_stops("yes", []) == "yes"


def test_lmms_eval_cli_finds_and_runs_duet_llava(checkpoint: Path, task_dir: Path, tmp_path: Path) -> None:
    """``lmms-eval eval --model duet_llava`` as a user runs it: the name resolves through the installed entry
    point, the local task is evaluated offline, and the results land in --output_path."""
    cli = Path(sys.executable).parent / "lmms-eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [str(cli), "eval", "--model", "duet_llava", "--model_args",
         f"pretrained={checkpoint},compression=duet_64,batch_size=4,device=cpu", "--tasks", "duet_yesno",
         "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|duet_yesno|" in result.stdout.replace(" ", "")
    saved = list((tmp_path / "out").rglob("*results*.json"))
    assert saved, list((tmp_path / "out").rglob("*"))
    results = json.loads(saved[0].read_text())
    assert "accuracy,none" in results["results"]["duet_yesno"]
    assert "compression=duet_64" in json.dumps(results["config"])


def test_a_qwen_checkpoint_answers_and_scores_through_the_plugin(qwen_checkpoint: Path, task_dir: Path) -> None:
    """The plugin loads Qwen2.5-VL through the same pipeline dispatch: generation and loglikelihood."""
    from llava.families.qwen import QwenVLPipeline

    model = DuetLlava(pretrained=str(qwen_checkpoint), batch_size=2, device="cpu", max_new_tokens=4)
    assert isinstance(model.pipeline, QwenVLPipeline)
    answers = _responses(_evaluate(model, task_dir, "duet_yesno"), "duet_yesno")
    assert len(answers) == len(QUESTIONS) and all(isinstance(answer, str) for answer in answers)
    scores = _responses(_evaluate(model, task_dir, "duet_yesno_ll"), "duet_yesno_ll")
    scores = [ast.literal_eval(s) if isinstance(s, str) else s for s in scores]
    assert len(scores) == len(QUESTIONS) and all(logprob < 0 for logprob, _ in scores)
