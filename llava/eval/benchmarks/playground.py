"""The scenes playground's held-out benchmark: one-word answers scored by exact match.

Files under ``<root>/playground`` (written by ``python -m llava.tools.make_playground --task scenes``):
``questions.jsonl`` (LLaVA question lines plus ``answer`` and ``category``, the question kind) and
``images/``. The prediction loses surrounding whitespace and trailing periods and is compared with the
answer case-insensitively, as GQA's accuracy does; ``metrics`` adds the accuracy per question kind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava.eval.base import EvalDataError, EvalItem, Score, check_protocol, llava_questions, with_protocol
from llava.eval.benchmarks.gqa import exact_match, gqa_answer
from llava.eval.benchmarks.vqa_metric import mean_accuracy

logger = logging.getLogger(__name__)

QUESTIONS_FILE = "questions.jsonl"
IMAGE_FOLDER = "images"


class PlaygroundScenes:
    """Held-out playground scenes; :attr:`Score.score` is exact-match accuracy x 100."""

    name = "playground"
    score_name = "accuracy"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """Every question with its answer and kind; :class:`EvalDataError` names a line without them."""
        folder = Path(root) / self.name
        items = []
        for question_id, record, image, where in llava_questions(folder / QUESTIONS_FILE, folder / IMAGE_FOLDER):
            answer = record.get("answer")
            if not isinstance(answer, str) or not answer.strip():
                raise EvalDataError(f"{where}: 'answer' must be a non-empty string")
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=record["text"],
                    image=image,
                    max_new_tokens=8,
                    reference={"answer": gqa_answer(answer), "category": str(record.get("category", "all"))},
                )
            )
        logger.info("%s: %d questions from %s", self.name, len(items), folder / QUESTIONS_FILE)
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """Exact-match accuracy x 100, with ``category/<kind>`` accuracies (one rule under every protocol)."""
        check_protocol(protocol)
        return with_protocol(mean_accuracy(items, predictions, exact_match, group_by=("category",)), protocol)
