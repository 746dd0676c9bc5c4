"""MME: yes/no questions, two per image, over 14 subtasks; the headline is the perception sum.

Questions come from LLaVA's ``MME/llava_mme.jsonl``; the ground truth from the release folder
``MME/MME_Benchmark_release_version/<subtask>/``, either images next to same-stem ``.txt`` files or
``images/`` plus ``questions_answers_YN/``, each ``.txt`` line ``question<TAB>Yes|No``. Answers are
matched by (subtask, image, question text), as LLaVA's ``convert_answer_to_mme.py`` does.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava.eval.base import EvalDataError, EvalItem, Score, read_jsonl, require_fields
from llava.eval.benchmarks.choice import existing_image, parse_yes_no_mme, percent

logger = logging.getLogger(__name__)

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _normalise_question(text: str) -> str:
    return " ".join(text.split())


class MME:
    """MME with LLaVA-1.5's prompts; :attr:`Score.score` is the perception total (max 2000)."""

    name = "mme"
    score_name = "perception (max 2000)"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """One item per question; ids are ``<subtask>/<file>#<n>`` since two questions share an image."""
        question_file = root / "MME" / "llava_mme.jsonl"
        release = root / "MME" / "MME_Benchmark_release_version"
        answer_cache: dict[Path, dict[str, str]] = {}
        seen: dict[str, int] = defaultdict(int)
        items = []
        for number, record in read_jsonl(question_file):
            require_fields(record, ("question_id", "image", "text"), f"{question_file}:{number}")
            image_id = str(record["question_id"])
            subtask, _, file_name = str(record["image"]).partition("/")
            if not file_name:
                raise EvalDataError(f"{question_file}:{number}: question {image_id}: image is not <subtask>/<file>")
            image = self._image(release, subtask, file_name, question_file, image_id)
            answer_file = self._answer_file(release, subtask, Path(file_name).name)
            if answer_file not in answer_cache:
                answer_cache[answer_file] = self._read_answers(answer_file, question_file, image_id)
            answer = answer_cache[answer_file].get(_normalise_question(record["text"]))
            if answer is None:
                raise EvalDataError(f"{answer_file}: no answer for question {image_id} ({record['text']!r})")
            items.append(
                EvalItem(
                    question_id=f"{image_id}#{seen[image_id]}",
                    prompt=record["text"],
                    image=image,
                    max_new_tokens=128,
                    reference={"subtask": subtask, "image": image_id, "answer": answer},
                )
            )
            seen[image_id] += 1
        return items

    @staticmethod
    def _image(release: Path, subtask: str, file_name: str, source: Path, question_id: str) -> str:
        flat = f"{subtask}/{file_name}"
        nested = f"{subtask}/images/{Path(file_name).name}"
        if (release / subtask / "images").is_dir() and not (release / flat).is_file():
            return existing_image(release, nested, source, question_id)
        return existing_image(release, flat, source, question_id)

    @staticmethod
    def _answer_file(release: Path, subtask: str, image_name: str) -> Path:
        folder = release / subtask
        if (folder / "questions_answers_YN").is_dir():
            folder = folder / "questions_answers_YN"
        return folder / f"{Path(image_name).stem}.txt"

    @staticmethod
    def _read_answers(path: Path, source: Path, question_id: str) -> dict[str, str]:
        if not path.is_file():
            raise EvalDataError(f"{source}: question {question_id}: ground-truth file {path} not found")
        answers = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            question, tab, answer = line.rstrip("\n").rpartition("\t")
            answer = answer.strip().lower()
            if not tab or answer not in ("yes", "no"):
                raise EvalDataError(f"{path}:{number}: expected 'question<TAB>Yes|No', got {line!r}")
            answers[_normalise_question(question)] = answer
        return answers

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str]) -> Score:
        """Per subtask acc + acc+ (max 200); perception, cognition and total sums."""
        correct: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        unanswered_images: set[tuple[str, str]] = set()
        num_scored = 0
        for item in items:
            subtask, image = item.reference["subtask"], item.reference["image"]
            if item.question_id not in predictions:
                unanswered_images.add((subtask, image))
                continue
            num_scored += 1
            right = parse_yes_no_mme(predictions[item.question_id]) == item.reference["answer"]
            correct[subtask][image].append(right)
        metrics: dict[str, float] = {}
        subtask_scores: dict[str, float] = {}
        for subtask, images in correct.items():
            answers = [right for flags in images.values() for right in flags]
            complete = [flags for image, flags in images.items() if (subtask, image) not in unanswered_images]
            acc = percent(sum(answers), len(answers))
            acc_plus = percent(sum(all(flags) for flags in complete), len(complete))
            metrics[f"{subtask}/acc"] = acc
            metrics[f"{subtask}/acc+"] = acc_plus
            metrics[f"{subtask}/score"] = subtask_scores[subtask] = acc + acc_plus
            if subtask not in PERCEPTION and subtask not in COGNITION:
                logger.warning("MME subtask %r is neither perception nor cognition; left out of the totals", subtask)
        perception = sum(subtask_scores.get(subtask, 0.0) for subtask in PERCEPTION)
        cognition = sum(subtask_scores.get(subtask, 0.0) for subtask in COGNITION)
        metrics.update(perception=perception, cognition=cognition, total=perception + cognition)
        return Score(score=perception, metrics=metrics, num_scored=num_scored, num_questions=len(items))
