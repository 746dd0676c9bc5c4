"""VQAv2: test-dev (server-scored, LLaVA-1.5's reported split) and val (offline proxy).

test-dev, under ``<root>/vqav2``: ``llava_vqav2_mscoco_test-dev2015.jsonl`` (107,394 LLaVA questions,
images in ``test2015/``). There are no public answers: :meth:`VQAv2.write_submission` writes the EvalAI
file, one normalised answer per question of ``llava_vqav2_mscoco_test2015.jsonl`` when that file is
there ("" for questions outside test-dev, as LLaVA's ``convert_vqav2_for_submission.py`` does).

val: ``v2_OpenEnded_mscoco_val2014_questions.json`` and ``v2_mscoco_val2014_annotations.json`` (the
official files), images ``val2014/COCO_val2014_<image id, 12 digits>.jpg``, scored with the VQA accuracy.
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
    read_jsonl,
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

TEST_DEV_FILE = "llava_vqav2_mscoco_test-dev2015.jsonl"
TEST_ALL_FILE = "llava_vqav2_mscoco_test2015.jsonl"
VAL_QUESTIONS_FILE = "v2_OpenEnded_mscoco_val2014_questions.json"
VAL_ANNOTATIONS_FILE = "v2_mscoco_val2014_annotations.json"
SPLITS = ("test-dev", "val")


class VQAv2:
    """VQAv2 test-dev (``vqav2``, submission only) or val (``vqav2_val``, scored here)."""

    score_name = "VQA accuracy"

    def __init__(self, split: str = "test-dev") -> None:
        if split not in SPLITS:
            raise ValueError(f"VQAv2 split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.name = "vqav2" if split == "test-dev" else "vqav2_val"
        self._root: Path | None = None

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """The split's questions; :class:`EvalDataError` for a missing image or (val) a question without
        annotation. Remembers ``root`` so :meth:`write_submission` can find the full test2015 list."""
        self._root = Path(root)
        folder = Path(root) / "vqav2"
        items = self._load_test_dev(folder) if self.split == "test-dev" else self._load_val(folder)
        logger.info("%s: %d questions", self.name, len(items))
        return items

    @staticmethod
    def _load_test_dev(folder: Path) -> list[EvalItem]:
        items = []
        for question_id, record, image, _ in llava_questions(folder / TEST_DEV_FILE, folder / "test2015"):
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=record["text"],
                    image=image,
                    max_new_tokens=128,
                )
            )
        return items

    @staticmethod
    def _load_val(folder: Path) -> list[EvalItem]:
        questions_path = folder / VAL_QUESTIONS_FILE
        annotations_path = folder / VAL_ANNOTATIONS_FILE
        annotations = _read_val_annotations(annotations_path)
        questions = read_json(questions_path)
        if not isinstance(questions, dict) or not isinstance(questions.get("questions"), list):
            raise EvalDataError(f"{questions_path}: expected an object with a 'questions' list")
        seen: set[str] = set()
        items = []
        for index, entry in enumerate(questions["questions"]):
            where = f"{questions_path}: questions[{index}]"
            if not isinstance(entry, dict):
                raise EvalDataError(f"{where}: expected an object")
            require_fields(entry, ("question_id", "image_id", "question"), where)
            question_id = str(entry["question_id"])
            where = f"{where}: question {question_id}"
            require_unique(question_id, seen, where)
            annotation = annotations.get(question_id)
            if annotation is None:
                raise EvalDataError(f"{where}: no ground truth in {annotations_path}")
            try:
                image_name = f"COCO_val2014_{int(entry['image_id']):012d}.jpg"
            except (TypeError, ValueError):
                raise EvalDataError(f"{where}: image_id {entry['image_id']!r} is not an integer") from None
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=f"{entry['question']}{SHORT_ANSWER}",
                    image=resolve_image(folder / "val2014", image_name, where),
                    max_new_tokens=128,
                    reference=annotation,
                )
            )
        return items

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """val: mean VQA accuracy x 100, plus ``answer_type/<type>`` accuracies (yes/no, number, other).
        test-dev: NaN with ``num_scored`` 0; upload :meth:`write_submission`'s file to EvalAI instead."""
        check_protocol(protocol)
        if self.split == "test-dev":
            return with_protocol(server_scored("VQAv2 test-dev", items, predictions), protocol)
        score = mean_accuracy(items, predictions, reference_vqa_accuracy, group_by=("answer_type",))
        return with_protocol(score, protocol)

    def write_submission(
        self,
        items: Sequence[EvalItem],
        predictions: Mapping[str, str],
        out_dir: Path,
        root: Path | None = None,
    ) -> list[Path]:
        """Write the EvalAI upload, a JSON list of ``{"question_id": int, "answer": normalised answer}``.

        It covers every question of ``llava_vqav2_mscoco_test2015.jsonl`` under ``root`` (default: the
        root of the last :meth:`load`) when that file exists, "" for questions without a prediction;
        otherwise just ``items``. Returns the written file.
        """
        root = Path(root) if root is not None else self._root
        all_questions = root / "vqav2" / TEST_ALL_FILE if root is not None else None
        if all_questions is not None and all_questions.is_file():
            question_ids = []
            for line_number, record in read_jsonl(all_questions):
                require_fields(record, ("question_id",), f"{all_questions}:{line_number}")
                question_ids.append(record["question_id"])
        else:
            logger.warning(
                "%s: no %s; the submission covers the %d loaded questions", self.name, TEST_ALL_FILE, len(items)
            )
            question_ids = [item.question_id for item in items]
        entries = []
        for question_id in question_ids:
            prediction = predictions.get(str(question_id))
            answer = normalize_answer(prediction) if prediction is not None else ""
            entries.append({"question_id": _as_int(question_id), "answer": answer})
        missing = sum(entry["answer"] == "" for entry in entries)
        if missing:
            logger.warning("%s: %d of %d questions have no answer in the submission", self.name, missing, len(entries))
        return [
            write_export(out_dir, f"{self.name}_{self.split}_submission.json", entries, self.name, json_lines=False)
        ]


def _as_int(question_id: object) -> int:
    """EvalAI wants integer question ids; the JSONL and items may hold them as strings."""
    try:
        return int(question_id)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise EvalDataError(f"VQAv2 question id {question_id!r} is not an integer") from None


def _read_val_annotations(path: Path) -> dict[str, dict[str, object]]:
    """question id -> ``{"answers": [...], "answer_type": ...}`` from the official annotation file."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise EvalDataError(f"{path}: expected an object with an 'annotations' list")
    annotations: dict[str, dict[str, object]] = {}
    for index, entry in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        if not isinstance(entry, dict):
            raise EvalDataError(f"{where}: expected an object")
        require_fields(entry, ("question_id", "answers"), where)
        answers = human_answers(entry["answers"])
        if answers is None:
            raise EvalDataError(f"{where}: 'answers' must be a non-empty list of {{answer: ...}}")
        reference: dict[str, object] = {"answers": answers}
        if "answer_type" in entry:
            reference["answer_type"] = entry["answer_type"]
        annotations[str(entry["question_id"])] = reference
    return annotations

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """The EvalAI upload of :meth:`write_submission`, written to ``out_dir`` (``--export official``)."""
        return self.write_submission(items, predictions, out_dir)
