"""ScienceQA-IMG: multiple-choice science questions; LLaVA-1.5 reports accuracy on the 2,017 test
questions that have an image.

Questions come from LLaVA's ``scienceqa/llava_test_CQM-A.json`` (a list of conversations: the human
turn holds context, question and "A. ..." option lines, the gpt turn the answer letter); images are
``scienceqa/images/test/<id>/image.png``.

Reading an answer: ``official`` (the default) follows LLaVA's ``eval_science_qa.py``
(:func:`~llava.eval.benchmarks.choice.parse_sqa_official`: "A", "A. text", "The answer is D," count; a bare
"A." does not); ``strict`` accepts "A", "A." / "A. text" and exactly one "The answer is A."
(:func:`~llava.eval.benchmarks.choice.parse_option_letter`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava.eval.base import (
    OPTION_LETTER,
    EvalDataError,
    EvalItem,
    Score,
    answered_items,
    check_protocol,
    llava_answer,
    read_json,
    require_fields,
    write_export,
)
from llava.eval.benchmarks.choice import existing_image, parse_option_letter, parse_sqa_official, percent

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
EXPORT_FILE = "llava_answers.jsonl"
_OPTION_LINE = re.compile(r"^([A-Z])\. ", re.MULTILINE)


class ScienceQA:
    """ScienceQA test set; :attr:`Score.score` is the accuracy x 100 on questions with an image.

    ``image_only`` (the default) loads just those questions, the IMG split; otherwise text-only
    questions are loaded too and reported in the metrics.
    """

    name = "sqa"
    score_name = "accuracy (image questions)"

    def __init__(self, image_only: bool = True) -> None:
        self.image_only = image_only

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """One item per question (image questions only unless ``image_only`` is off)."""
        folder = root / "scienceqa"
        question_file = folder / "llava_test_CQM-A.json"
        records = read_json(question_file)
        if not isinstance(records, list):
            raise EvalDataError(f"{question_file}: expected a list of conversations")
        items = []
        for position, record in enumerate(records):
            where = f"{question_file}: entry {position}"
            if not isinstance(record, dict):
                raise EvalDataError(f"{where}: expected a JSON object")
            require_fields(record, ("id", "conversations"), where)
            question_id = str(record["id"])
            where = f"{question_file}: question {question_id}"
            has_image = bool(record.get("image"))
            if self.image_only and not has_image:
                continue
            human, answer = self._turns(record["conversations"], where)
            text = human.replace(IMAGE_TAG, "").strip()
            letters = "".join(_OPTION_LINE.findall(text))
            reference = parse_option_letter(answer, letters or "ABCDE")
            if reference is None:
                raise EvalDataError(f"{where}: answer {answer!r} is not an option letter")
            image = None
            if has_image:
                relative = str(record["image"])
                relative = relative if "/" in relative else f"{question_id}/{relative}"
                image = existing_image(folder / "images" / "test", relative, question_file, question_id)
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=text + OPTION_LETTER,
                    image=image,
                    max_new_tokens=1024,
                    reference={"answer": reference, "options": letters, "has_image": has_image, "id": record["id"]},
                )
            )
        logger.info("ScienceQA: %d questions loaded from %s", len(items), question_file)
        return items

    @staticmethod
    def _turns(conversations: object, where: str) -> tuple[str, str]:
        if not isinstance(conversations, list) or len(conversations) < 2:
            raise EvalDataError(f"{where}: expected a human and a gpt turn")
        human, gpt = conversations[0], conversations[1]
        if not (isinstance(human, dict) and isinstance(gpt, dict)) or human.get("from") != "human":
            raise EvalDataError(f"{where}: expected a human and a gpt turn")
        return str(human.get("value", "")), str(gpt.get("value", ""))

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """Accuracy x 100 on image questions under ``protocol``; ``metrics`` adds counts, the protocol and,
        if loaded, text-only and all."""
        check_protocol(protocol)
        right = {True: 0, False: 0}
        scored = {True: 0, False: 0}
        for item in items:
            if item.question_id not in predictions:
                continue
            has_image = bool(item.reference["has_image"])
            scored[has_image] += 1
            letters = item.reference["options"] or "ABCDE"
            text = predictions[item.question_id]
            if protocol == "official":
                guess = parse_sqa_official(text, len(letters))
            else:
                guess = parse_option_letter(text, letters)
            right[has_image] += guess == item.reference["answer"]
        metrics: dict[str, float | int | str] = {
            "image_accuracy": percent(right[True], scored[True]),
            "image_scored": scored[True],
            "protocol": protocol,
        }
        if scored[False]:
            metrics["text_accuracy"] = percent(right[False], scored[False])
            metrics["all_accuracy"] = percent(right[True] + right[False], scored[True] + scored[False])
        return Score(
            score=percent(right[True], scored[True]),
            metrics=metrics,
            num_scored=scored[True] + scored[False],
            num_questions=len(items),
        )

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """Write the answers as LLaVA's ``model_vqa_science.py`` does, the ``--result-file`` of
        ``eval_science_qa.py``: one JSON line per answered question with the original ``question_id``, the
        ``prompt`` (``<image>\\n`` first for image questions: the script counts IMG accuracy by it) and the
        ``text``. Questions without an answer are left out (the script counts them as failed). Returns the
        file."""
        records = [
            {
                **llava_answer(item.reference.get("id", item.question_id), item, predictions[item.question_id]),
                "prompt": f"{IMAGE_TAG}\n{item.prompt}" if item.reference["has_image"] else item.prompt,
                "metadata": {},
            }
            for item in answered_items(items, predictions, self.name)
        ]
        return [write_export(out_dir, EXPORT_FILE, records, self.name)]
