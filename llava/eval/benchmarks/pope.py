"""POPE: object-hallucination yes/no questions on COCO val2014 in three splits (adversarial, popular,
random); the headline is the F1 averaged over the splits, as in LLaVA-1.5's paper.

Files under ``<root>/pope``: LLaVA's ``llava_pope_test.jsonl`` (``question_id``, ``image``, ``text`` =
POPE's question + LLaVA's short-answer suffix, ``category`` = split; the splits are numbered 1-3000
(adversarial), 10000001+ (random) and 20000001+ (popular)), POPE's label files
``coco/coco_pope_<split>.json`` (JSON lines ``question_id``, ``image``, ``text`` = the bare question,
``label``; each split numbered from 1) and the images in ``val2014/``.

Pairing. LLaVA's ``eval_pope.py`` pairs the answers of a split with the label file by line order, so a
label file that does not belong to the question file gives a silently wrong score. Here each question is
paired with the label of the same split, image and bare question (LLaVA's suffix removed, whitespace
normalised), which does not depend on either file's numbering or order; a question without such a label
means the label file belongs to other questions and is an :class:`EvalDataError` naming both files.

Label version. POPE regenerated its random split in October 2023. LLaVA-1.5's question file and
published POPE numbers (mean F1 over the three splits, 85.9 for LLaVA-1.5-7B) come from the label files of
POPE commit ``e3e39262c85a6a83f26cf5094022a782cb0df58d`` (``output/coco/coco_pope_{adversarial,popular,
random}.json``; its random split has 2,910 questions, the regenerated one 3,000). With the regenerated
random file LLaVA's own script, pairing by position, silently reports a random-split F1 of about 46. Here
a label file is used only if every question of its split finds a label with the same image and question
in it; otherwise the run stops naming both files instead of misaligning.

Protocols. Answers are read as ``eval_pope.py`` reads them
(:func:`llava.eval.benchmarks.choice.parse_yes_no_pope`: first sentence, commas dropped, "no" when a
space-separated word is ``No``, ``no`` or ``not``, else "yes"), scored with its per-split accuracy,
precision, recall, F1 and yes-ratio; this project's parser always read them that way, so ``official`` and
``strict`` give the same numbers. Where ``eval_pope.py`` divides by zero (no predicted or no true "yes"
in a split) both report 0.

Intervals (:meth:`POPE.resampling_units`, used by :mod:`llava.eval.compare`): the mean F1 is not a mean
over questions, so questions are resampled within their split (each split keeps its size) and the F1 of
every split recomputed from the resampled TP, FP and FN counts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava.eval.base import (
    SHORT_ANSWER,
    EvalDataError,
    EvalItem,
    Score,
    answered_items,
    check_protocol,
    llava_answer,
    read_jsonl,
    require_fields,
    write_export,
)
from llava.eval.benchmarks.choice import existing_image, parse_yes_no_pope
from llava.eval.stats import UnitStatistic

logger = logging.getLogger(__name__)

SPLITS = ("adversarial", "popular", "random")
MEASURES = ("accuracy", "precision", "recall", "f1", "yes_ratio")
QUESTION_FILE = "llava_pope_test.jsonl"
ANSWERS_FILE = "llava_pope_answers.jsonl"
"""What :meth:`POPE.export_official` writes: LLaVA's answer JSONL, the ``--result-file`` of ``eval_pope.py``."""


def bare_question(text: str) -> str:
    """POPE's question from LLaVA's ``text``: the short-answer suffix removed, whitespace normalised."""
    if text.endswith(SHORT_ANSWER):
        text = text[: -len(SHORT_ANSWER)]
    return " ".join(text.split())


class _Labels:
    """One split's label file, indexed by (image, bare question), with each label's line position."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_key: dict[tuple[str, str], tuple[int, str]] = {}
        for position, (number, record) in enumerate(read_jsonl(path)):
            where = f"{path}:{number}"
            require_fields(record, ("question_id", "image", "text", "label"), where)
            label = str(record["label"]).lower()
            if label not in ("yes", "no"):
                raise EvalDataError(f"{where}: label {record['label']!r} is not yes/no")
            key = (str(record["image"]), bare_question(str(record["text"])))
            previous = self.by_key.get(key)
            if previous is not None and previous[1] != label:
                raise EvalDataError(f"{where}: {key[0]} / {key[1]!r} is labelled both yes and no")
            if previous is None:
                self.by_key[key] = (position, label)

    def __len__(self) -> int:
        return len(self.by_key)


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


def mean_f1(sums: np.ndarray) -> np.ndarray:
    """``100 * (1/S) sum_s F1_s`` per row of ``(R, 3 S)`` summed ``(TP, FP, FN)`` of ``S`` splits, with
    ``F1_s = 2 TP_s / (2 TP_s + FP_s + FN_s)`` (= ``2 P R / (P + R)``; 0 when the split has no TP, as
    :func:`split_metrics` reports it)."""
    counts = sums.reshape(sums.shape[0], -1, 3)
    true_pos, false_pos, false_neg = counts[..., 0], counts[..., 1], counts[..., 2]
    denominator = 2 * true_pos + false_pos + false_neg
    f1 = np.divide(2 * true_pos, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return 100.0 * f1.mean(axis=1)


class POPE:
    """POPE with LLaVA-1.5's prompts; :attr:`Score.score` is the mean F1 over splits x 100."""

    name = "pope"
    score_name = "F1 (mean of splits)"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """One item per question (id = LLaVA's ``question_id``), its label, split and label position in
        ``reference``; :class:`EvalDataError` naming both files when a label file does not belong to the
        question file."""
        folder = root / "pope"
        question_file = folder / QUESTION_FILE
        labels: dict[str, _Labels] = {}
        used: dict[str, dict[tuple[str, str], str]] = {}
        positions: dict[str, list[int]] = {}
        items = []
        seen: set[str] = set()
        for number, record in read_jsonl(question_file):
            require_fields(record, ("question_id", "image", "text", "category"), f"{question_file}:{number}")
            question_id, split = str(record["question_id"]), record["category"]
            where = f"{question_file}:{number}: question {question_id}"
            if split not in SPLITS:
                raise EvalDataError(f"{where}: unknown category {split!r}")
            if question_id in seen:
                raise EvalDataError(f"{where}: appears twice")
            seen.add(question_id)
            image = existing_image(folder / "val2014", str(record["image"]), question_file, question_id)
            if split not in labels:
                labels[split] = _Labels(folder / "coco" / f"coco_pope_{split}.json")
            split_labels = labels[split]
            key = (str(record["image"]), bare_question(str(record["text"])))
            found = split_labels.by_key.get(key)
            if found is None:
                raise EvalDataError(
                    f"{split_labels.path} does not belong to {question_file}: no label with the image and question "
                    f"of {where} ({key[0]}, {key[1]!r}); use POPE's label files of commit "
                    "e3e39262c85a6a83f26cf5094022a782cb0df58d, the ones LLaVA-1.5's question file was built from"
                )
            earlier = used.setdefault(split, {}).get(key)
            if earlier is not None:
                raise EvalDataError(f"{where}: asks the same as question {earlier} ({key[0]}, {key[1]!r})")
            used[split][key] = question_id
            position, label = found
            positions.setdefault(split, []).append(position)
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=record["text"],
                    image=image,
                    max_new_tokens=128,
                    reference={
                        "split": split,
                        "label": label,
                        "label_position": position,
                        "llava_id": record["question_id"],
                    },
                )
            )
        for split, order in positions.items():
            if order != sorted(order) or len(order) != len(labels[split]):
                logger.warning(
                    "%s: the %s questions of %s are not the label file's lines in order (%d questions, %d labels): "
                    "paired here by image and question, but LLaVA's eval_pope.py (which pairs by order) would "
                    "misalign them",
                    labels[split].path,
                    split,
                    question_file,
                    len(order),
                    len(labels[split]),
                )
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """Per-split measures (``<split>/<measure>``), their means over splits, and the mean F1 x 100."""
        check_protocol(protocol)
        by_split: dict[str, tuple[list[str], list[str]]] = {}
        num_scored = 0
        for item in items:
            if item.question_id not in predictions:
                continue
            num_scored += 1
            labels, predicted = by_split.setdefault(item.reference["split"], ([], []))
            labels.append(item.reference["label"])
            predicted.append(parse_yes_no_pope(predictions[item.question_id]))
        metrics: dict[str, Any] = {"protocol": protocol}
        per_split = {split: split_metrics(*by_split[split]) for split in SPLITS if split in by_split}
        for split, measures in per_split.items():
            metrics.update({f"{split}/{name}": value for name, value in measures.items()})
        for name in MEASURES:
            values = [measures[name] for measures in per_split.values()]
            metrics[name] = sum(values) / len(values) if values else 0.0
        return Score(score=100.0 * metrics["f1"], metrics=metrics, num_scored=num_scored, num_questions=len(items))

    def resampling_units(
        self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official"
    ) -> UnitStatistic | None:
        """The headline on resampling units: each answered question, stratified by split, carries a one-hot
        ``(TP, FP, FN)`` in its split's three columns; :func:`mean_f1` of the sums is :meth:`score`'s
        headline. ``None`` when nothing is answered."""
        check_protocol(protocol)
        answered = [item for item in items if item.question_id in predictions]
        splits = [split for split in SPLITS if any(item.reference["split"] == split for item in answered)]
        if not answered:
            return None
        values = np.zeros((len(answered), 3 * len(splits)))
        for row, item in enumerate(answered):
            column = 3 * splits.index(item.reference["split"])
            said_yes = parse_yes_no_pope(predictions[item.question_id]) == "yes"
            is_yes = item.reference["label"] == "yes"
            if said_yes:
                values[row, column + (0 if is_yes else 1)] = 1.0  # TP or FP
            elif is_yes:
                values[row, column + 2] = 1.0  # FN
        return UnitStatistic(
            ids=tuple(item.question_id for item in answered),
            values=values,
            headline=mean_f1,
            strata=tuple(item.reference["split"] for item in answered),
            unit="question",
            stratum="split",
            description="questions resampled within each split, each split's F1 recomputed from TP/FP/FN",
        )

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """LLaVA's answer JSONL for ``eval_pope.py --result-file`` (with ``--question-file`` the original
        ``llava_pope_test.jsonl`` and ``--annotation-dir`` the label folder): the original question ids, and
        each split's answers in its label file's order, since that script pairs them by position."""
        answered = answered_items(
            items, predictions, self.name, "eval_pope.py pairs answers with labels by position and will misalign "
            "this file",
        )  # fmt: skip
        answered.sort(key=lambda item: (SPLITS.index(item.reference["split"]), item.reference["label_position"]))
        records = [
            llava_answer(
                item.reference["llava_id"],
                item,
                predictions[item.question_id],
                answer_id=item.question_id,
                model_id="duet-vlm",
                metadata={},
            )
            for item in answered
        ]
        return [write_export(out_dir, ANSWERS_FILE, records, self.name)]
