"""POPE, MME and TextVQA end to end on files in the exact layout and line format of LLaVA-1.5's released
evaluation folders: answered through the evaluation runner by a fake pipeline (canned answers per image and
prompt), scored under both protocols against numbers worked out by hand, and exported in the official
scripts' formats, which are read back the way those scripts read them (``eval_pope.py``,
``convert_answer_to_mme.py`` + MME's ``calculation.py``, ``eval_textvqa.py``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from llava.eval import runner
from llava.eval.base import SHORT_ANSWER, EvalDataError, EvalItem
from llava.eval.benchmarks.mme import COGNITION, MME, PERCEPTION
from llava.eval.benchmarks.pope import POPE
from llava.eval.benchmarks.textvqa import TextVQA
from llava.eval.benchmarks.vqa_metric import reference_vqa_accuracy
from tests.test_eval_choice import make_pope, write_image, write_jsonl


class FakePipeline:
    """What the runner needs of a pipeline; answers each request with ``answer(image name, prompt)``."""

    def __init__(self, answers: Mapping[tuple[str, str], str]) -> None:
        self.answers = answers
        self.device = torch.device("cpu")
        self.model = torch.nn.Identity()
        self.requests: list[dict[str, Any]] = []

    def generate(self, requests: Sequence[dict[str, Any]], max_new_tokens: int, batch_size: int) -> list[str]:
        self.requests += requests
        return [self.answers[(Path(request["image"]).name, request["prompt"])] for request in requests]


def run_benchmark(
    benchmark: Any, root: Path, folder: Path, answers: Mapping[tuple[str, str], str]
) -> tuple[list[EvalItem], dict[str, Any], dict[str, Any]]:
    """Load, answer through the runner, score under both protocols (official with the export)."""
    items = benchmark.load(root, root / "cache")
    pipeline = FakePipeline(answers)
    assert runner.generate_answers(pipeline, benchmark, items, folder, batch_size=3, progress=False) == len(items)
    assert len(pipeline.requests) == len(items)
    official = runner.score_folder(benchmark, items, folder, export="official")
    strict = runner.score_folder(benchmark, items, folder, protocol="strict")
    return items, official, strict


# --- POPE -----------------------------------------------------------------------------------------

POPE_LABELS = {
    "adversarial": ["yes", "no", "yes", "no"],
    "random": ["yes", "no", "yes", "no"],
    "popular": ["yes", "no", "no", "yes"],
}
# Canned answers per asked object (the same question about the same image gets the same answer in every split).
POPE_ANSWERS = {
    "thing0": "Yes, there is a thing0 in the image.",  # yes, label yes everywhere
    "thing2": "No.",  # no: false negative in adversarial and random
    "thing3": "Yes",  # yes: label yes in popular
    "adversarial-thing1": "No, there is not.",
    "adversarial-thing3": "Yes",  # false positive
    "random-thing1": "There is no thing.",
    "random-thing3": "No",
    "popular-thing1": "Yes.",  # false positive
    "popular-thing2": "I do not see one",  # "not" -> no
}


def pope_answers(root: Path) -> dict[tuple[str, str], str]:
    answers = {}
    for line in (root / "pope" / "llava_pope_test.jsonl").read_text().splitlines():
        record = json.loads(line)
        thing = record["text"].split("Is there a ")[1].split(" in the image?")[0]
        answers[(record["image"], record["text"])] = POPE_ANSWERS[thing]
    return answers


def eval_pope_read_back(question_file: Path, label_dir: Path, result_file: Path) -> dict[str, dict[str, float]]:
    """The measures LLaVA's eval_pope.py prints, computed the way it reads its three inputs: questions by
    id, answers filtered per split by the question's category, paired with the label file line by line,
    "no" when the first sentence (commas dropped, split on spaces) has No/no/not."""
    questions = {record["question_id"]: record for record in map(json.loads, question_file.read_text().splitlines())}
    answers = [json.loads(line) for line in result_file.read_text().splitlines()]
    measures = {}
    for name in sorted(os.listdir(label_dir)):
        split = name.removeprefix("coco_pope_").removesuffix(".json")
        labels = [json.loads(line)["label"] for line in (label_dir / name).read_text().splitlines()]
        said = [answer["text"] for answer in answers if questions[answer["question_id"]]["category"] == split]
        guesses = [
            "no" if {"No", "no", "not"} & set(t.split(".")[0].replace(",", "").split(" ")) else "yes" for t in said
        ]
        pairs = list(zip(guesses, labels, strict=False))
        tp = sum(g == "yes" and lab == "yes" for g, lab in pairs)
        fp = sum(g == "yes" and lab == "no" for g, lab in pairs)
        tn = sum(g == "no" and lab == "no" for g, lab in pairs)
        fn = sum(g == "no" and lab == "yes" for g, lab in pairs)
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        measures[split] = {
            "f1": 2 * precision * recall / (precision + recall),
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "yes_ratio": guesses.count("yes") / len(guesses),
        }
    return measures


def test_pope_end_to_end_on_llava_ids(tmp_path: Path) -> None:
    root = tmp_path / "eval"
    ids = make_pope(root, POPE_LABELS)
    assert ids["random"][0] == 10000001 and ids["popular"][-1] == 20000004
    items, official, strict = run_benchmark(POPE(), root, tmp_path / "run", pope_answers(root))
    assert [item.question_id for item in items][:5] == ["1", "2", "3", "4", "10000001"]

    # adversarial: TP 1 (thing0), FN 1 (thing2), TN 1, FP 1 -> P 1/2, R 1/2, F1 1/2, accuracy 1/2, yes 2/4
    # random:      TP 1, FN 1, TN 2, FP 0 -> P 1, R 1/2, F1 2/3, accuracy 3/4, yes 1/4
    # popular:     TP 2 (thing0, thing3), FP 1, TN 1 -> P 2/3, R 1, F1 4/5, accuracy 3/4, yes 3/4
    expected_f1 = {"adversarial": 1 / 2, "random": 2 / 3, "popular": 4 / 5}
    for result in (official, strict):  # POPE's protocols read answers alike
        assert result["complete"] and result["num_scored"] == 12
        for split, f1 in expected_f1.items():
            assert result["metrics"][f"{split}/f1"] == pytest.approx(f1)
        assert result["metrics"]["random/precision"] == pytest.approx(1.0)
        assert result["metrics"]["popular/yes_ratio"] == pytest.approx(3 / 4)
        assert result["metrics"]["accuracy"] == pytest.approx((1 / 2 + 3 / 4 + 3 / 4) / 3)
        assert result["score"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 4 / 5) / 3)
    assert (official["protocol"], official["metrics"]["protocol"]) == ("official", "official")
    assert strict["metrics"]["protocol"] == "strict"

    # The export is what eval_pope.py reads: LLaVA's ids, each split in its label file's order.
    (result_file,) = map(Path, official["export_files"])
    exported = [json.loads(line) for line in result_file.read_text().splitlines()]
    assert [line["question_id"] for line in exported] == ids["adversarial"] + ids["popular"] + ids["random"]
    read_back = eval_pope_read_back(root / "pope" / "llava_pope_test.jsonl", root / "pope" / "coco", result_file)
    for split, f1 in expected_f1.items():
        assert read_back[split]["f1"] == pytest.approx(f1)
        assert read_back[split]["accuracy"] == pytest.approx(official["metrics"][f"{split}/accuracy"])
        assert read_back[split]["yes_ratio"] == pytest.approx(official["metrics"][f"{split}/yes_ratio"])


def test_pope_export_follows_label_order(tmp_path: Path) -> None:
    # With a label file listed in another order, pairing by image and question still scores right, and the
    # export lists that split's answers in the label file's order so eval_pope.py pairs them right too.
    root = tmp_path / "eval"
    make_pope(root, POPE_LABELS)
    label_file = root / "pope" / "coco" / "coco_pope_popular.json"
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join([lines[2], lines[0], lines[3], lines[1]]) + "\n")
    _, official, _ = run_benchmark(POPE(), root, tmp_path / "run", pope_answers(root))
    assert official["metrics"]["popular/f1"] == pytest.approx(4 / 5)
    (result_file,) = map(Path, official["export_files"])
    read_back = eval_pope_read_back(root / "pope" / "llava_pope_test.jsonl", root / "pope" / "coco", result_file)
    assert read_back["popular"]["f1"] == pytest.approx(4 / 5)


@pytest.mark.parametrize("change", ["image", "question"])
def test_pope_regenerated_label_file_is_refused(tmp_path: Path, change: str) -> None:
    # A label file of another POPE version (same numbering, another image or object on a line) must stop
    # the run with a message naming it and the question file, never pair by position.
    root = tmp_path / "eval"
    make_pope(root, POPE_LABELS)
    label_file = root / "pope" / "coco" / "coco_pope_random.json"
    records = [json.loads(line) for line in label_file.read_text().splitlines()]
    if change == "image":
        records[2]["image"] = "COCO_val2014_000000999999.jpg"
    else:
        records[2]["text"] = "Is there a giraffe in the image?"
    write_jsonl(label_file, records)
    with pytest.raises(EvalDataError) as raised:
        POPE().load(root, root / "cache")
    message = str(raised.value)
    assert f"{label_file} does not belong to {root / 'pope' / 'llava_pope_test.jsonl'}" in message
    assert "question 10000003" in message and "thing2" in message


# --- MME ------------------------------------------------------------------------------------------

YES_NO = "Please answer yes or no."
# subtask -> (nested layout?, images); each image: two (question, ground truth, spacing, answer) lines.
MME_FIXTURE = {
    "existence": (
        False,
        {
            "e1": [("Is there a dog?", "Yes", " ", "Yes"), ("Is there a cat?", "No", " ", "No.")],
            "e2": [("Is there a car?", "Yes", " ", "Yes, there is."), ("Is there a bus?", "No", " ", "Yes")],
            # "  yes": calculation.py does not strip -> "other"; strict reads yes
            "e3": [("Is there a cup?", "Yes", " ", "  yes"), ("Is there a pen?", "No", "  ", "no")],
        },
    ),
    "OCR": (
        False,
        {
            "o1": [('Is the word "abc"?', "Yes", "  ", "Yes"), ('Is the word "abd"?', "No", " ", "No")],
            # "...No": calculation.py keeps periods -> "other"; strict (lmms-eval) reads no
            "o2": [('Is it "x1"?', "Yes", " ", "No"), ('Is it "x2"?', "No", " ", "...No")],
        },
    ),
    "code_reasoning": (
        True,
        {
            "c1": [("Does it print 3?", "Yes", " ", "Yes"), ("Does it print 4?", "No", " ", "no")],
            "c2": [("Is the output 0?", "Yes", " ", "The answer is yes"), ("Is the output 1?", "No", " ", "No")],
        },
    ),
}


def make_mme_release(root: Path) -> dict[tuple[str, str], str]:
    """MME in the real layout and line format; returns the canned answers per (image name, prompt)."""
    release = root / "MME" / "MME_Benchmark_release_version"
    questions, answers = [], {}
    for subtask, (nested, images) in MME_FIXTURE.items():
        for stem, lines in images.items():
            folder = release / subtask
            write_image((folder / "images" if nested else folder) / f"{stem}.png")
            truth = (folder / "questions_answers_YN" if nested else folder) / f"{stem}.txt"
            truth.parent.mkdir(parents=True, exist_ok=True)
            truth.write_text("".join(f"{q}{spacing}{YES_NO}\t{gt}\n" for q, gt, spacing, _ in lines))
            for question, _, _, answer in lines:
                name = f"{subtask}/{stem}.png"
                text = question + SHORT_ANSWER
                questions.append({"question_id": name, "image": name, "text": text, "category": subtask})
                answers[(f"{stem}.png", text)] = answer
    write_jsonl(root / "MME" / "llava_mme.jsonl", questions)
    return answers


def calculation_read_back(results_dir: Path) -> dict[str, float]:
    """Per-subtask and summed scores as MME's calculation.py computes them from ``<subtask>.txt`` files:
    lines split on tabs, answer lower-cased only, exact yes/no else yes/no within the first four
    characters, acc over all lines, acc+ over consecutive pairs of lines, each fraction x 100."""
    scores: dict[str, float] = {}
    for kind, subtasks in (("perception", PERCEPTION), ("cognition", COGNITION)):
        total = 0.0
        for subtask in subtasks:
            path = results_dir / f"{subtask}.txt"
            if not path.exists():
                continue
            with open(path) as handle:  # readlines keeps the newline, as the tool reads it
                lines = handle.readlines()
            right = []
            for line in lines:
                _, _, truth, answer = line.split("\t")
                answer = answer.lower()
                read = (
                    answer
                    if answer in ("yes", "no")
                    else next((word for word in ("yes", "no") if word in answer[:4]), "other")
                )
                right.append(read == truth.lower())
            pairs = [right[start : start + 2] for start in range(0, len(right), 2)]
            scores[subtask] = sum(right) / len(right) * 100 + sum(all(pair) for pair in pairs) / len(pairs) * 100
            total += scores[subtask]
        scores[kind] = total
    return scores


def test_mme_end_to_end_matches_calculation(tmp_path: Path) -> None:
    root = tmp_path / "eval"
    answers = make_mme_release(root)
    items, official, strict = run_benchmark(MME(), root, tmp_path / "run", answers)
    assert len(items) == 14 and official["complete"]

    # Official (calculation.py): existence e1 2 right, e2 1, e3 1 ("  yes" is other) -> acc 4/6, acc+ 1/3;
    # OCR o1 2, o2 0 ("No" wrong, "...No" other) -> 2/4, 1/2; code_reasoning c1 2, c2 1 -> 3/4, 1/2.
    existence, ocr, code = 4 / 6 * 100 + 1 / 3 * 100, 2 / 4 * 100 + 1 / 2 * 100, 3 / 4 * 100 + 1 / 2 * 100
    assert official["metrics"]["existence/acc"] == pytest.approx(4 / 6 * 100)
    assert official["metrics"]["existence/acc+"] == pytest.approx(100 / 3)
    assert official["metrics"]["OCR/score"] == pytest.approx(ocr)
    assert official["score"] == official["metrics"]["perception"] == existence + ocr  # to the digit
    assert official["metrics"]["cognition"] == code
    # Strict: "  yes" -> yes, "...No" -> no: existence 5/6 + 2/3, OCR 3/4 + 1/2; code unchanged
    assert strict["metrics"]["existence/score"] == pytest.approx(5 / 6 * 100 + 2 / 3 * 100)
    assert strict["metrics"]["OCR/score"] == pytest.approx(3 / 4 * 100 + 1 / 2 * 100)
    assert strict["score"] == pytest.approx(5 / 6 * 100 + 2 / 3 * 100 + 3 / 4 * 100 + 1 / 2 * 100)
    assert strict["metrics"]["cognition"] == pytest.approx(code)
    assert (official["metrics"]["protocol"], strict["metrics"]["protocol"]) == ("official", "strict")

    # The export: LLaVA's answer JSONL (original ids) and the per-subtask files calculation.py reads.
    files = [Path(path) for path in official["export_files"]]
    answer_lines = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert answer_lines[0] == {
        "question_id": "existence/e1.png",
        "prompt": "Is there a dog?" + SHORT_ANSWER,
        "text": "Yes",
    }
    tool_dir = files[1].parent
    assert sorted(path.name for path in files[1:]) == ["OCR.txt", "code_reasoning.txt", "existence.txt"]
    first = (tool_dir / "existence.txt").read_text().splitlines()
    assert first[0] == "e1.txt\tIs there a dog? Please answer yes or no.\tYes\tYes"
    assert first[5] == "e3.txt\tIs there a pen?  Please answer yes or no.\tNo\tno"  # double space kept
    read_back = calculation_read_back(tool_dir)
    assert read_back["perception"] == official["score"]
    assert read_back["cognition"] == official["metrics"]["cognition"]
    assert read_back["existence"] == official["metrics"]["existence/score"]


def test_mme_export_flattens_tabs_and_newlines(tmp_path: Path) -> None:
    root = tmp_path / "eval"
    make_mme_release(root)
    items = MME().load(root, root / "cache")
    predictions = {item.question_id: "Yes" for item in items}
    predictions[items[1].question_id] = "no\tit\nis not"
    files = MME().export_official(items, predictions, tmp_path / "export")
    lines = (tmp_path / "export" / "mme_eval_tool" / "existence.txt").read_text().splitlines()
    assert len(lines) == 6 and lines[1].split("\t")[3] == "no it is not"
    assert json.loads(files[0].read_text().splitlines()[1])["text"] == "no\tit\nis not"  # JSONL keeps it
    assert (
        calculation_read_back(files[1].parent)["existence"]
        == MME().score(items, predictions).metrics["existence/score"]
    )


# --- TextVQA --------------------------------------------------------------------------------------


def make_textvqa(root: Path) -> None:
    """TextVQA in the real format: LLaVA's question_id is the image id (repeated), text = question, OCR
    line, suffix; the official val JSON keyed by image id and question."""
    folder = root / "textvqa"
    questions = [
        ("003a8ae2ef43b901", "what is the brand of this camera?", "dakota, digital"),
        ("003a8ae2ef43b901", "What does the small white text say?", "single-use"),
        ("00685bc495504d61", "what number is on the jersey?", "22, boston"),
    ]
    records, data = [], []
    for index, (image_id, question, ocr) in enumerate(questions):
        write_image(folder / "train_images" / f"{image_id}.jpg")
        text = f"{question}\nReference OCR token: {ocr}{SHORT_ANSWER}"
        records.append({"question_id": image_id, "image": f"{image_id}.jpg", "text": text})
        answers = (
            ["dakota"] * 10
            if index == 0
            else (["single use"] * 4 + ["single-use"] * 6 if index == 1 else ["22"] * 2 + ["23"] * 8)
        )
        data.append({"question": question, "image_id": image_id, "question_id": 34602 + index, "answers": answers})
    write_jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", records)
    (folder / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}))


def eval_textvqa_question(prompt: str) -> str:
    """eval_textvqa.py's question from an answer's prompt: with the OCR line (three lines) the first line
    that is not it, else (two lines) the first line; lower-cased."""
    lines = prompt.split("\n")
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    assert len(lines) == 2, prompt
    return lines[0].lower()


@pytest.mark.parametrize("with_ocr", [True, False])
def test_textvqa_export_reads_back_like_eval_textvqa(tmp_path: Path, with_ocr: bool) -> None:
    root = tmp_path / "eval"
    make_textvqa(root)
    benchmark = TextVQA(with_ocr=with_ocr)
    items = benchmark.load(root, root / "cache")
    predictions = {items[0].question_id: "Dakota", items[1].question_id: "single use", items[2].question_id: "22"}
    for protocol in ("official", "strict"):
        assert benchmark.score(items, predictions, protocol=protocol).metrics["protocol"] == protocol
    expected = benchmark.score(items, predictions).score
    (result_file,) = benchmark.export_official(items, predictions, tmp_path / "export")
    annotations = json.loads((root / "textvqa" / "TextVQA_0.5.1_val.json").read_text())["data"]
    by_key = {(entry["image_id"], entry["question"].lower()): entry for entry in annotations}
    results = [json.loads(line) for line in result_file.read_text().splitlines()]
    assert [result["question_id"] for result in results] == ["003a8ae2ef43b901", "003a8ae2ef43b901", "00685bc495504d61"]
    accuracies = []
    for result, item in zip(results, items, strict=True):
        entry = by_key[(result["question_id"], eval_textvqa_question(result["prompt"]))]
        assert entry["answers"] == item.reference["answers"]
        accuracies.append(reference_vqa_accuracy(result["text"], item))
    # dakota 1; "single use" matched by 4 of 10 -> 1; "22" by 2 of 10 -> 0.6
    assert accuracies == pytest.approx([1.0, 1.0, 0.6])
    assert 100 * sum(accuracies) / len(accuracies) == pytest.approx(expected)
