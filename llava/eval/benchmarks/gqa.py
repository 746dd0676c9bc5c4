"""GQA test-dev balanced (12,578 questions) in LLaVA-1.5's layout, scored by exact match.

Files under ``<root>/gqa``: ``llava_gqa_testdev_balanced.jsonl`` (``question_id``, ``image`` relative to
``data/images/``, ``text`` with the short answer suffix) and ``data/testdev_balanced_questions.json``
(``{qid: {imageId, question, answer, types?}}``). As LLaVA's ``convert_gqa_for_eval.py`` does, the
prediction loses trailing periods and is lower-cased, then must equal the answer (the official
``eval.py`` accuracy).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava.eval.base import (
    EvalDataError,
    EvalItem,
    Score,
    check_protocol,
    llava_questions,
    read_json,
    with_protocol,
    write_export,
)
from llava.eval.benchmarks.vqa_metric import mean_accuracy

logger = logging.getLogger(__name__)

QUESTIONS_FILE = "llava_gqa_testdev_balanced.jsonl"
ANNOTATIONS_FILE = "data/testdev_balanced_questions.json"
IMAGE_FOLDER = "data/images"
EXPORT_FILE = "testdev_balanced_predictions.json"


def gqa_answer(prediction: str) -> str:
    """A generated answer in the form GQA's answers use: no trailing period, lower case."""
    return prediction.strip().rstrip(".").lower()


def exact_match(prediction: str, item: EvalItem) -> float:
    """1.0 when :func:`gqa_answer` of ``prediction`` equals the item's ``answer`` reference, else 0.0."""
    return float(gqa_answer(prediction) == item.reference["answer"])


class GQA:
    """GQA test-dev balanced, LLaVA-1.5 protocol."""

    name = "gqa"
    score_name = "accuracy"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """Every question of the LLaVA JSONL with its answer (and GQA types when the annotation has
        them); :class:`EvalDataError` for a missing image or a question absent from the annotations."""
        folder = Path(root) / "gqa"
        questions_path = folder / QUESTIONS_FILE
        annotations_path = folder / ANNOTATIONS_FILE
        annotations = read_json(annotations_path)
        if not isinstance(annotations, dict):
            raise EvalDataError(f"{annotations_path}: expected an object of question id -> annotation")
        items = []
        for question_id, record, image, where in llava_questions(questions_path, folder / IMAGE_FOLDER):
            annotation = annotations.get(question_id)
            if not isinstance(annotation, dict) or "answer" not in annotation:
                raise EvalDataError(f"{where}: no ground truth in {annotations_path}")
            reference = {"answer": str(annotation["answer"]).lower()}
            types = annotation.get("types")
            if isinstance(types, dict):
                reference.update({key: types[key] for key in ("structural", "semantic") if key in types})
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=record["text"],
                    image=image,
                    max_new_tokens=128,
                    reference=reference,
                )
            )
        logger.info("%s: %d questions from %s", self.name, len(items), questions_path)
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """Exact-match accuracy x 100 (the same under every protocol: it already is GQA's); ``metrics`` adds
        ``structural/<type>`` and ``semantic/<type>`` accuracies when the annotations carry GQA's question
        types, and the protocol."""
        check_protocol(protocol)
        score = mean_accuracy(items, predictions, exact_match, group_by=("structural", "semantic"))
        return with_protocol(score, protocol)

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """Write the predictions file GQA's ``eval.py`` reads, as LLaVA's ``convert_gqa_for_eval.py`` makes
        it: a JSON list of ``{"questionId", "prediction"}`` (the answer without trailing periods, lower
        case), answered questions in file order. Returns the file."""
        entries = [
            {"questionId": item.question_id, "prediction": predictions[item.question_id].rstrip(".").lower()}
            for item in items
            if item.question_id in predictions
        ]
        return [write_export(out_dir, EXPORT_FILE, entries, self.name, json_lines=False)]
