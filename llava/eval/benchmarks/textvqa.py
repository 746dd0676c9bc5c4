"""TextVQA val (5,000 questions) in LLaVA-1.5's layout, scored with the VQA accuracy.

Files under ``<root>/textvqa``: ``llava_textvqa_val_v051_ocr.jsonl`` (LLaVA's questions: ``question_id``,
``image`` relative to ``train_images/``, ``text`` = question + "\\nReference OCR token: ..." + the short
answer suffix) and ``TextVQA_0.5.1_val.json`` (``{"data": [{question, image_id, answers[10]}]}``).

As in LLaVA's ``eval_textvqa.py`` a question finds its ground truth by (image id, lower-cased question):
the JSONL's ``question_id`` *is* the image id, so it repeats for every question about one image. Each
item's id is therefore ``"<question_id>#<k>"``, k counting that id's occurrences in file order (1, 2,
...): unique, stable for a given file (blank lines or edits elsewhere do not shift it) and still
readable as the image id.

Protocols: ``official`` and ``strict`` are the same here (the VQA accuracy of LLaVA's ``m4c_evaluator.py``,
which this module's scores already match); ``score`` accepts either and records which. For a cross-check
with LLaVA's ``eval_textvqa.py``, :meth:`TextVQA.export_official` writes the answers with the original
question ids and prompts.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava.eval.base import (
    SHORT_ANSWER,
    EvalDataError,
    EvalItem,
    Score,
    answered_items,
    check_llava_question,
    llava_answer,
    read_json,
    read_jsonl,
    require_fields,
    resolve_image,
    with_protocol,
    write_export,
)
from llava.eval.benchmarks.vqa_metric import mean_accuracy, reference_vqa_accuracy

logger = logging.getLogger(__name__)

QUESTIONS_FILE = "llava_textvqa_val_v051_ocr.jsonl"
ANNOTATIONS_FILE = "TextVQA_0.5.1_val.json"
IMAGE_FOLDER = "train_images"
ANSWERS_FILE = "llava_textvqa_answers.jsonl"
"""What :meth:`TextVQA.export_official` writes: the ``--result-file`` of LLaVA's ``eval_textvqa.py``."""
OCR_PREFIX = "Reference OCR token:"


def split_prompt(text: str) -> tuple[str, str]:
    """``(question, prompt without the OCR line)`` of a LLaVA TextVQA ``text``.

    The question (what the ground truth is matched on) is the text minus the OCR line and the short
    answer suffix; the OCR-free prompt keeps everything else, suffix included, in order.
    """
    lines = text.split("\n")
    without_ocr = [line for line in lines if not line.startswith(OCR_PREFIX)]
    question_lines = [line for line in without_ocr if f"\n{line}" != SHORT_ANSWER]
    return "\n".join(question_lines).strip(), "\n".join(without_ocr)


class TextVQA:
    """TextVQA val with (LLaVA-1.5's default) or without the reference OCR tokens in the prompt."""

    score_name = "VQA accuracy"

    def __init__(self, with_ocr: bool = True) -> None:
        self.with_ocr = with_ocr
        self.name = "textvqa" if with_ocr else "textvqa_noocr"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """Every question of the LLaVA JSONL with its 10 human answers; :class:`EvalDataError` for a
        missing image or a question absent from the annotations."""
        folder = Path(root) / "textvqa"
        questions_path = folder / QUESTIONS_FILE
        annotations_path = folder / ANNOTATIONS_FILE
        ground_truth = self._read_annotations(annotations_path)
        occurrences: Counter[str] = Counter()
        items = []
        for line_number, record in read_jsonl(questions_path):
            # LLaVA's TextVQA question_id is the image id and repeats, so not llava_questions (unique ids).
            image_id, where = check_llava_question(record, f"{questions_path}:{line_number}")
            occurrences[image_id] += 1
            question, prompt_without_ocr = split_prompt(record["text"])
            answers = ground_truth.get((image_id, question.lower()))
            if answers is None:
                raise EvalDataError(f"{where}: no ground truth for {question!r} in {annotations_path}")
            items.append(
                EvalItem(
                    question_id=f"{image_id}#{occurrences[image_id]}",
                    prompt=record["text"] if self.with_ocr else prompt_without_ocr,
                    image=resolve_image(folder / IMAGE_FOLDER, record["image"], where),
                    max_new_tokens=128,
                    reference={
                        "answers": answers,
                        "image_id": image_id,
                        "question": question,
                        "llava_id": record["question_id"],
                    },
                )
            )
        logger.info("%s: %d questions from %s", self.name, len(items), questions_path)
        return items

    @staticmethod
    def _read_annotations(path: Path) -> dict[tuple[str, str], list[str]]:
        """(image id, lower-cased question) -> human answers, from the official val JSON."""
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise EvalDataError(f"{path}: expected an object with a 'data' list")
        answers: dict[tuple[str, str], list[str]] = {}
        for index, entry in enumerate(data["data"]):
            where = f"{path}: data[{index}]"
            if not isinstance(entry, dict):
                raise EvalDataError(f"{where}: expected an object")
            require_fields(entry, ("question", "image_id", "answers"), where)
            if not isinstance(entry["answers"], list) or not entry["answers"]:
                raise EvalDataError(f"{where}: 'answers' must be a non-empty list")
            answers[(str(entry["image_id"]), str(entry["question"]).lower())] = [str(a) for a in entry["answers"]]
        return answers

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """Mean VQA accuracy x 100 over the questions with a prediction (``metrics['accuracy']`` too)."""
        return with_protocol(mean_accuracy(items, predictions, reference_vqa_accuracy), protocol)

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """LLaVA's answer JSONL for ``eval_textvqa.py --result-file``: ``question_id`` as in the question file
        (the image id, repeated per question), ``prompt`` = the text the model was asked (from which that
        script recovers the question), ``text`` = the answer; one line per answered question, in order."""
        records = [
            llava_answer(
                item.reference.get("llava_id", item.reference["image_id"]),
                item,
                predictions[item.question_id],
                answer_id=item.question_id,
                model_id="duet-vlm",
                metadata={},
            )
            for item in answered_items(items, predictions, self.name)
        ]
        return [write_export(out_dir, ANSWERS_FILE, records, self.name)]
