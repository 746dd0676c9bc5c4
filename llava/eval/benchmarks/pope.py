"""POPE: object-hallucination yes/no questions on COCO val2014 in three splits (adversarial, popular,
random); the headline is the F1 averaged over the splits.

Labels come from ``pope/coco/coco_pope_<split>.json`` (JSONL despite the name). LLaVA's
``eval_pope.py`` pairs answers with labels by file order, which silently misaligns once the question
file is reordered, filtered or sharded. Here a label is matched by ``question_id`` within its split and
checked against the question's image; where the ids of the two files disagree (they are numbered
independently) the label with the same image and question text is used instead. A question with no
matching label is an :class:`EvalDataError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava.eval.base import EvalDataError, EvalItem, Score, read_jsonl, require_fields
from llava.eval.benchmarks.choice import existing_image, parse_yes_no_pope

SPLITS = ("adversarial", "popular", "random")
MEASURES = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def _key(image: Any, text: Any) -> tuple[str, str]:
    return str(image), " ".join(str(text).split())


class _Labels:
    """One split's label file, indexed by question id and by (image, question text)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_id: dict[str, dict[str, Any]] = {}
        self.by_text: dict[tuple[str, str], dict[str, Any]] = {}
        for number, record in read_jsonl(path):
            require_fields(record, ("question_id", "label"), f"{path}:{number}")
            if str(record["label"]).lower() not in ("yes", "no"):
                raise EvalDataError(f"{path}:{number}: label {record['label']!r} is not yes/no")
            self.by_id[str(record["question_id"])] = record
            if "image" in record and "text" in record:
                self.by_text[_key(record["image"], record["text"])] = record

    def label(self, question: Mapping[str, Any]) -> str:
        record = self.by_id.get(str(question["question_id"]))
        if record is not None and str(record.get("image", question["image"])) != str(question["image"]):
            record = None
        if record is None:
            record = self.by_text.get(_key(question["image"], question["text"]))
        if record is None:
            raise EvalDataError(
                f"{self.path}: no label for question {question['question_id']} "
                f"(image {question['image']}); the label file does not match the questions"
            )
        return str(record["label"]).lower()


def split_metrics(labels: Sequence[str], predicted: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = "yes") and the predicted-yes ratio, as fractions."""
    pairs = list(zip(labels, predicted, strict=True))
    true_pos = sum(label == "yes" and guess == "yes" for label, guess in pairs)
    false_pos = sum(label == "no" and guess == "yes" for label, guess in pairs)
    false_neg = sum(label == "yes" and guess == "no" for label, guess in pairs)
    true_neg = sum(label == "no" and guess == "no" for label, guess in pairs)
    total = len(pairs)
    precision = true_pos / (true_pos + false_pos) if true_pos + false_pos else 0.0
    recall = true_pos / (true_pos + false_neg) if true_pos + false_neg else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (true_pos + true_neg) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (true_pos + false_pos) / total if total else 0.0,
    }


class POPE:
    """POPE with LLaVA-1.5's prompts; :attr:`Score.score` is the mean F1 over splits x 100."""

    name = "pope"
    score_name = "F1 (mean of splits)"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """One item per question, its label and split in ``reference``."""
        folder = root / "pope"
        question_file = folder / "llava_pope_test.jsonl"
        labels: dict[str, _Labels] = {}
        items = []
        seen: set[str] = set()
        for number, record in read_jsonl(question_file):
            require_fields(record, ("question_id", "image", "text", "category"), f"{question_file}:{number}")
            question_id, split = str(record["question_id"]), record["category"]
            if split not in SPLITS:
                raise EvalDataError(f"{question_file}:{number}: question {question_id}: unknown category {split!r}")
            if question_id in seen:
                raise EvalDataError(f"{question_file}:{number}: question {question_id} appears twice")
            seen.add(question_id)
            image = existing_image(folder / "val2014", str(record["image"]), question_file, question_id)
            if split not in labels:
                labels[split] = _Labels(folder / "coco" / f"coco_pope_{split}.json")
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=record["text"],
                    image=image,
                    max_new_tokens=128,
                    reference={"split": split, "label": labels[split].label(record)},
                )
            )
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str]) -> Score:
        """Per-split measures (``<split>/<measure>``), their means over splits, and the mean F1 x 100."""
        by_split: dict[str, tuple[list[str], list[str]]] = {}
        num_scored = 0
        for item in items:
            if item.question_id not in predictions:
                continue
            num_scored += 1
            labels, predicted = by_split.setdefault(item.reference["split"], ([], []))
            labels.append(item.reference["label"])
            predicted.append(parse_yes_no_pope(predictions[item.question_id]))
        metrics: dict[str, float] = {}
        per_split = {split: split_metrics(*by_split[split]) for split in SPLITS if split in by_split}
        for split, measures in per_split.items():
            metrics.update({f"{split}/{name}": value for name, value in measures.items()})
        for name in MEASURES:
            values = [measures[name] for measures in per_split.values()]
            metrics[name] = sum(values) / len(values) if values else 0.0
        return Score(score=100.0 * metrics["f1"], metrics=metrics, num_scored=num_scored, num_questions=len(items))
