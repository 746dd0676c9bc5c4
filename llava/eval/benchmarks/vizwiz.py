"""VizWiz VQA: test (server-scored, LLaVA-1.5's reported split) and val (offline proxy).

test, under ``<root>/vizwiz``: ``llava_test.jsonl`` (8,000 LLaVA questions whose ``text`` already holds
the unanswerable hint and the short answer suffix; images in ``test/``). :meth:`VizWiz.write_submission`
writes the EvalAI file ``[{"image": file name, "answer": normalised answer}]``.

val: ``val.json``, the official annotations (``[{image, question, answers: [{answer, answer_confidence}],
answerable, answer_type}]``), images in ``val/``; the prompt is built as LLaVA's test prompts are and
scored with the VQA accuracy. Each image has one question, so the image file name is the question id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava.eval.base import (
    SHORT_ANSWER,
    EvalDataError,
    EvalItem,
    Score,
    check_protocol,
    llava_questions,
    read_json,
    require_fields,
    require_unique,
    resolve_image,
    with_protocol,
    write_export,
)
from llava.eval.benchmarks.vqa_metric import (
    human_answers,
    mean_accuracy,
    normalize_answer,
    reference_vqa_accuracy,
    server_scored,
)

logger = logging.getLogger(__name__)

UNANSWERABLE_HINT = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
"""LLaVA-1.5's VizWiz instruction, placed between the question and :data:`SHORT_ANSWER`."""
TEST_FILE = "llava_test.jsonl"
VAL_FILE = "val.json"
SPLITS = ("test", "val")


def vizwiz_prompt(question: str) -> str:
    """The LLaVA-1.5 VizWiz prompt of a question."""
    return f"{question}{UNANSWERABLE_HINT}{SHORT_ANSWER}"


class VizWiz:
    """VizWiz test (``vizwiz``, submission only) or val (``vizwiz_val``, scored here)."""

    score_name = "VQA accuracy"

    def __init__(self, split: str = "test") -> None:
        if split not in SPLITS:
            raise ValueError(f"VizWiz split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.name = "vizwiz" if split == "test" else "vizwiz_val"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """The split's questions; :class:`EvalDataError` for a missing image or a malformed entry."""
        folder = Path(root) / "vizwiz"
        items = self._load_test(folder) if self.split == "test" else self._load_val(folder)
        logger.info("%s: %d questions", self.name, len(items))
        return items

    @staticmethod
    def _load_test(folder: Path) -> list[EvalItem]:
        items = []
        for question_id, record, image, _ in llava_questions(folder / TEST_FILE, folder / "test"):
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=record["text"],
                    image=image,
                    max_new_tokens=128,
                    reference={"image": Path(record["image"]).name},
                )
            )
        return items

    @staticmethod
    def _load_val(folder: Path) -> list[EvalItem]:
        path = folder / VAL_FILE
        entries = read_json(path)
        if not isinstance(entries, list):
            raise EvalDataError(f"{path}: expected a list of annotations")
        seen: set[str] = set()
        items = []
        for index, entry in enumerate(entries):
            where = f"{path}: [{index}]"
            if not isinstance(entry, dict):
                raise EvalDataError(f"{where}: expected an object")
            require_fields(entry, ("image", "question"), where)
            if not isinstance(entry["image"], str):
                raise EvalDataError(f"{where}: 'image' must be a string")
            question_id = entry["image"]
            where = f"{where}: question {question_id}"
            require_unique(question_id, seen, where)
            answers = human_answers(entry.get("answers"))
            if answers is None:
                raise EvalDataError(f"{where}: no ground truth ('answers' must be a non-empty list of {{answer: ...}})")
            reference = {"answers": answers, "image": Path(entry["image"]).name}
            if "answer_type" in entry:
                reference["answer_type"] = entry["answer_type"]
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=vizwiz_prompt(str(entry["question"])),
                    image=resolve_image(folder / "val", entry["image"], where),
                    max_new_tokens=128,
                    reference=reference,
                )
            )
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """val: mean VQA accuracy x 100, plus ``answer_type/<type>`` accuracies (unanswerable, yes/no,
        number, other). test: NaN with ``num_scored`` 0; upload :meth:`write_submission`'s file."""
        check_protocol(protocol)
        if self.split == "test":
            return with_protocol(server_scored("VizWiz test", items, predictions), protocol)
        score = mean_accuracy(items, predictions, reference_vqa_accuracy, group_by=("answer_type",))
        return with_protocol(score, protocol)

    def write_submission(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """Write the EvalAI upload, a JSON list of ``{"image": file name, "answer": normalised answer}``
        in item order ("" where a prediction is missing, logged). Returns the written file."""
        entries = []
        for item in items:
            prediction = predictions.get(item.question_id)
            image = item.reference.get("image") or Path(str(item.image)).name
            entries.append({"image": image, "answer": normalize_answer(prediction) if prediction is not None else ""})
        missing = sum(item.question_id not in predictions for item in items)
        if missing:
            logger.warning("%s: %d of %d questions have no answer in the submission", self.name, missing, len(items))
        return [
            write_export(out_dir, f"{self.name}_{self.split}_submission.json", entries, self.name, json_lines=False)
        ]

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """The EvalAI upload of :meth:`write_submission`, written to ``out_dir`` (``--export official``)."""
        return self.write_submission(items, predictions, out_dir)
