"""SEED-Bench: multiple-choice questions on images and videos (video questions see the middle frame);
LLaVA-1.5's headline is the image accuracy.

Questions come from ``seed_bench/llava-seed-bench.jsonl`` (text with options and the option-letter
suffix already in it), the answers from ``seed_bench/SEED-Bench.json``, matched by question id.

Reading an answer: ``official`` (the default) follows LLaVA's ``convert_seed_for_submission.py``, which
counts an answer only when it is exactly the letter ("B"; "B." or "B. text" are wrong); ``strict`` also
reads "B.", "C. text" and one "The answer is A." (:func:`~llava.eval.benchmarks.choice.parse_option_letter`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llava.eval.base import (
    EvalDataError,
    EvalItem,
    Score,
    answered_items,
    check_protocol,
    llava_answer,
    read_json,
    read_jsonl,
    require_fields,
    write_export,
)
from llava.eval.benchmarks.choice import existing_image, parse_option_letter, parse_seed_official, percent

logger = logging.getLogger(__name__)

OPTIONS = "ABCD"
ANSWERS_FILE = "llava_answers.jsonl"
UPLOAD_FILE = "seed_upload.jsonl"


class SEEDBench:
    """SEED-Bench; :attr:`Score.score` is the accuracy x 100 on image questions."""

    name = "seed"
    score_name = "accuracy (image)"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """One item per question of the LLaVA question file, its answer and type in ``reference``."""
        folder = root / "seed_bench"
        question_file = folder / "llava-seed-bench.jsonl"
        truth_file = folder / "SEED-Bench.json"
        truth, type_names = self._read_truth(truth_file)
        positions = {question_id: position for position, question_id in enumerate(truth)}
        items = []
        for number, record in read_jsonl(question_file):
            require_fields(record, ("question_id", "image", "text"), f"{question_file}:{number}")
            question_id = str(record["question_id"])
            answer = truth.get(question_id)
            if answer is None:
                raise EvalDataError(f"{truth_file}: no answer for question {question_id} of {question_file}")
            type_id = str(answer["question_type_id"])
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=record["text"],
                    image=existing_image(folder, str(record["image"]), question_file, question_id),
                    max_new_tokens=128,
                    reference={
                        "answer": str(answer["answer"]),
                        "data_type": str(answer["data_type"]),
                        "question_type": type_names.get(type_id, type_id),
                        "llava_id": record["question_id"],
                        "seed_id": answer["question_id"],
                        "seed_position": positions[question_id],
                    },
                )
            )
        return items

    @staticmethod
    def _read_truth(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
            raise EvalDataError(f"{path}: expected an object with a 'questions' list")
        truth = {}
        for position, question in enumerate(data["questions"]):
            where = f"{path}: questions[{position}]"
            if not isinstance(question, dict):
                raise EvalDataError(f"{where}: expected a JSON object")
            require_fields(question, ("question_id", "data_type", "answer", "question_type_id"), where)
            if question["answer"] not in OPTIONS:
                raise EvalDataError(f"{where}: answer {question['answer']!r} is not one of {OPTIONS}")
            truth[str(question["question_id"])] = question
        names = data.get("question_type", {})
        type_names = {str(type_id): name for name, type_id in names.items()} if isinstance(names, dict) else {}
        return truth, type_names

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """Accuracy per question type (``type/<name>``) and for ``image``, ``video`` and ``all``, answers read
        under ``protocol`` (recorded in ``metrics``)."""
        check_protocol(protocol)
        parse = parse_seed_official if protocol == "official" else parse_option_letter
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for item in items:
            if item.question_id not in predictions:
                continue
            right = parse(predictions[item.question_id], OPTIONS) == item.reference["answer"]
            for key in ("all", item.reference["data_type"], f"type/{item.reference['question_type']}"):
                counts[key][0] += right
                counts[key][1] += 1
        metrics: dict[str, float | str] = {key: percent(*counts[key]) for key in ("image", "video", "all")}
        metrics.update({key: percent(*value) for key, value in sorted(counts.items()) if key.startswith("type/")})
        metrics["protocol"] = protocol
        return Score(
            score=percent(*counts["image"]), metrics=metrics, num_scored=counts["all"][1], num_questions=len(items)
        )

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """Write LLaVA's answer file (``question_id`` as in ``llava-seed-bench.jsonl``, ``prompt``, ``text``:
        the ``--result-file`` of ``convert_seed_for_submission.py``) and the upload file that script writes
        (``{"question_id": id of SEED-Bench.json, "prediction": text}`` per line, in SEED-Bench.json order).
        Unanswered questions are left out of both (LLaVA's script stops on them); the count is logged.
        Returns both files."""
        answered = answered_items(items, predictions, self.name, "left out of the export")
        answers = [llava_answer(item.reference["llava_id"], item, predictions[item.question_id]) for item in answered]
        upload = [
            {"question_id": item.reference["seed_id"], "prediction": predictions[item.question_id]}
            for item in sorted(answered, key=lambda entry: entry.reference["seed_position"])
        ]
        return [
            write_export(out_dir, ANSWERS_FILE, answers, self.name),
            write_export(out_dir, UPLOAD_FILE, upload, self.name),
        ]
