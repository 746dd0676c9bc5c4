"""MME: yes/no questions, two per image, over 14 subtasks; the headline is the perception sum.

Questions come from LLaVA's ``MME/llava_mme.jsonl`` (``question_id`` = ``image`` = ``<subtask>/<file>``,
``text`` = ``<question>\nAnswer the question using a single word or phrase.``); the ground truth from the
release folder ``MME/MME_Benchmark_release_version/<subtask>/``, either images next to same-stem ``.txt``
files or ``images/`` plus ``questions_answers_YN/``, each ``.txt`` line ``<question> Please answer yes or
no.<TAB>Yes|No`` (some with two spaces before "Please"). As LLaVA's ``convert_answer_to_mme.py`` does, a
question is joined with its line by (subtask, file, question) after swapping LLaVA's short-answer suffix
for MME's (either spacing); a question that still has no line is an :class:`EvalDataError` naming it.

Protocols. ``official`` scores as MME's ``eval_tool/calculation.py`` reads the files
``convert_answer_to_mme.py`` writes: the answer lower-cased and nothing else (no stripping, periods kept),
"yes"/"no" when it is exactly that, else "yes" when the first four characters contain "yes", "no" when
they contain "no", otherwise "other" (wrong); acc+ counts consecutive question pairs of a subtask in file
order (the tool's chunks of two lines, one image each in the real files). ``strict`` is this project's
earlier reading (:func:`llava.eval.benchmarks.choice.parse_yes_no_mme`: stripped and every "." dropped,
as lmms-eval does) with acc+ grouped by image. Per subtask the score is acc + acc+ (max 200).

Intervals (:meth:`MME.resampling_units`, used by :mod:`llava.eval.compare`): the perception sum is not a
mean over questions, so the units acc+ counts (``official``: consecutive question pairs, one image each in
the real files; ``strict``: images) are resampled within their subtask (each subtask keeps its size) and
acc + acc+ of every perception subtask recomputed from the resampled counts.
"""

from __future__ import annotations

import logging
from collections import defaultdict
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
from llava.eval.benchmarks.choice import existing_image, parse_calculation, parse_yes_no_mme, percent
from llava.eval.stats import UnitStatistic

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


MME_SUFFIX = " Please answer yes or no."
"""MME's own instruction, appended to the question in the ground-truth files (sometimes after two spaces)."""
ANSWERS_FILE = "llava_mme_answers.jsonl"
"""LLaVA's answer JSONL (``convert_answer_to_mme.py``'s input), written by :meth:`MME.export_official`."""
EVAL_TOOL_FOLDER = "mme_eval_tool"
"""Where :meth:`MME.export_official` writes the per-subtask ``.txt`` files ``calculation.py`` reads."""


def _normalise_question(text: str) -> str:
    return " ".join(text.split())


def mme_questions(text: str) -> list[str]:
    """The ground-truth questions LLaVA's ``text`` may stand for, in the order ``convert_answer_to_mme.py``
    tries them: LLaVA's short-answer instruction removed, MME's appended with one space, then with two."""
    question = text
    if SHORT_ANSWER.strip() in question:
        question = question.replace(SHORT_ANSWER.strip(), "").strip()
    if MME_SUFFIX.strip() in question:
        return [question]
    return [question + MME_SUFFIX, question + " " + MME_SUFFIX]


class _GroundTruth:
    """One ground-truth ``.txt`` file: exact and whitespace-normalised question -> (question, answer)."""

    def __init__(self, path: Path, source: Path, question_id: str) -> None:
        if not path.is_file():
            raise EvalDataError(f"{source}: question {question_id}: ground-truth file {path} not found")
        self.path = path
        self.exact: dict[str, tuple[str, str]] = {}
        self.normalised: dict[str, tuple[str, str]] = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            question, tab, answer = line.strip().rpartition("\t")
            if not tab or answer.strip().lower() not in ("yes", "no"):
                raise EvalDataError(f"{path}:{number}: expected 'question<TAB>Yes|No', got {line!r}")
            entry = (question, answer.strip())
            key = _normalise_question(question)
            previous = self.normalised.get(key)
            if previous is not None and previous[1].lower() != entry[1].lower():
                raise EvalDataError(f"{path}:{number}: {question!r} is answered both yes and no")
            self.exact.setdefault(question, entry)
            self.normalised.setdefault(key, entry)

    def find(self, text: str) -> tuple[str, str] | None:
        """``(ground-truth question, answer)`` for LLaVA's question ``text``, or None."""
        candidates = mme_questions(text)
        for candidate in candidates:
            if candidate in self.exact:
                return self.exact[candidate]
        for candidate in candidates:
            if _normalise_question(candidate) in self.normalised:
                return self.normalised[_normalise_question(candidate)]
        return None


def perception_sum(sums: np.ndarray) -> np.ndarray:
    """``sum_s [acc_s + acc+_s]`` per row of ``(R, 4 S)`` summed ``(answered, right, complete, all_right)``
    of ``S`` subtasks: ``acc_s = right_s / answered_s * 100``, ``acc+_s = all_right_s / complete_s * 100``
    (0 when no unit is complete); a subtask with nothing answered adds 0."""
    counts = sums.reshape(sums.shape[0], -1, 4)
    answered, right, complete, all_right = (counts[..., column] for column in range(4))
    acc = np.divide(right, answered, out=np.zeros_like(right), where=answered > 0) * 100
    acc_plus = np.divide(all_right, complete, out=np.zeros_like(all_right), where=complete > 0) * 100
    return np.where(answered > 0, acc + acc_plus, 0.0).sum(axis=1)


class MME:
    """MME with LLaVA-1.5's prompts; :attr:`Score.score` is the perception total (max 2000)."""

    name = "mme"
    score_name = "perception (max 2000)"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """One item per question; ids are ``<subtask>/<file>#<n>`` since two questions share an image."""
        question_file = root / "MME" / "llava_mme.jsonl"
        release = root / "MME" / "MME_Benchmark_release_version"
        truth_cache: dict[Path, _GroundTruth] = {}
        seen: dict[str, int] = defaultdict(int)
        items = []
        for number, record in read_jsonl(question_file):
            require_fields(record, ("question_id", "image", "text"), f"{question_file}:{number}")
            image_id = str(record["question_id"])
            where = f"{question_file}:{number}: question {image_id}"
            subtask, _, file_name = str(record["image"]).partition("/")
            if not file_name:
                raise EvalDataError(f"{where}: image is not <subtask>/<file>")
            image = self._image(release, subtask, file_name, question_file, image_id)
            answer_file = self._answer_file(release, subtask, Path(file_name).name)
            if answer_file not in truth_cache:
                truth_cache[answer_file] = _GroundTruth(answer_file, question_file, image_id)
            found = truth_cache[answer_file].find(str(record["text"]))
            if found is None:
                raise EvalDataError(
                    f"{where}: no line of {answer_file} asks {record['text']!r} "
                    f"(looked for {' or '.join(repr(q) for q in mme_questions(str(record['text'])))})"
                )
            question, answer = found
            items.append(
                EvalItem(
                    question_id=f"{image_id}#{seen[image_id]}",
                    prompt=record["text"],
                    image=image,
                    max_new_tokens=128,
                    reference={
                        "subtask": subtask,
                        "image": image_id,
                        "answer": answer.lower(),
                        "mme_question": question,
                        "mme_answer": answer,
                    },
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

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """Per subtask acc, acc+ and their sum (max 200); perception, cognition and total sums."""
        check_protocol(protocol)
        by_subtask: dict[str, list[EvalItem]] = defaultdict(list)
        for item in items:
            by_subtask[item.reference["subtask"]].append(item)
        metrics: dict[str, Any] = {"protocol": protocol}
        subtask_scores: dict[str, float] = {}
        for subtask, subtask_items in by_subtask.items():
            answered = [item for item in subtask_items if item.question_id in predictions]
            if not answered:
                continue
            if protocol == "official":
                acc, acc_plus = self._official(subtask_items, predictions)
            else:
                acc, acc_plus = self._strict(subtask_items, predictions)
            metrics[f"{subtask}/acc"] = acc
            metrics[f"{subtask}/acc+"] = acc_plus
            metrics[f"{subtask}/score"] = subtask_scores[subtask] = acc + acc_plus
            if subtask not in PERCEPTION and subtask not in COGNITION:
                logger.warning("MME subtask %r is neither perception nor cognition; left out of the totals", subtask)
        perception = sum(subtask_scores.get(subtask, 0.0) for subtask in PERCEPTION)
        cognition = sum(subtask_scores.get(subtask, 0.0) for subtask in COGNITION)
        metrics.update(perception=perception, cognition=cognition, total=perception + cognition)
        num_scored = sum(item.question_id in predictions for item in items)
        return Score(score=perception, metrics=metrics, num_scored=num_scored, num_questions=len(items))

    @staticmethod
    def _official(items: Sequence[EvalItem], predictions: Mapping[str, str]) -> tuple[float, float]:
        """``calculation.py``: acc over the answered questions, acc+ over consecutive pairs (both answered),
        each a fraction times 100 as the tool computes it."""
        right = [
            parse_calculation(predictions[item.question_id]) == item.reference["answer"]
            for item in items
            if item.question_id in predictions
        ]
        pairs = [items[start : start + 2] for start in range(0, len(items), 2)]
        for pair in pairs:
            if len({item.reference["image"] for item in pair}) > 1 or len(pair) != 2:
                logger.warning(
                    "MME: questions %s are not a pair about one image, yet calculation.py scores them as one",
                    ", ".join(item.question_id for item in pair),
                )
        complete = [pair for pair in pairs if all(item.question_id in predictions for item in pair)]
        both_right = sum(
            all(parse_calculation(predictions[item.question_id]) == item.reference["answer"] for item in pair)
            for pair in complete
        )
        acc = sum(right) / len(right) * 100
        acc_plus = both_right / len(complete) * 100 if complete else 0.0
        return acc, acc_plus

    @staticmethod
    def _strict(items: Sequence[EvalItem], predictions: Mapping[str, str]) -> tuple[float, float]:
        """This project's earlier scoring: periods dropped, acc+ over the images with every question answered."""
        correct: dict[str, list[bool]] = defaultdict(list)
        unanswered: set[str] = set()
        for item in items:
            if item.question_id not in predictions:
                unanswered.add(item.reference["image"])
                continue
            correct[item.reference["image"]].append(
                parse_yes_no_mme(predictions[item.question_id]) == item.reference["answer"]
            )
        answers = [right for flags in correct.values() for right in flags]
        complete = [flags for image, flags in correct.items() if image not in unanswered]
        return percent(sum(answers), len(answers)), percent(sum(all(flags) for flags in complete), len(complete))

    def resampling_units(
        self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official"
    ) -> UnitStatistic | None:
        """The headline on resampling units: the groups acc+ counts of every perception subtask (``official``:
        consecutive question pairs in file order, id the questions joined by ``+``; ``strict``: images), those
        with an answered question, stratified by subtask. A unit carries ``(answered, right, complete,
        all_right)`` in its subtask's four columns; :func:`perception_sum` of the sums is :meth:`score`'s
        headline. ``None`` when no perception question is answered."""
        check_protocol(protocol)
        by_subtask: dict[str, list[EvalItem]] = defaultdict(list)
        for item in items:
            if item.reference["subtask"] in PERCEPTION:
                by_subtask[item.reference["subtask"]].append(item)
        parse = parse_calculation if protocol == "official" else parse_yes_no_mme
        units: list[tuple[str, str, list[float]]] = []
        for subtask in by_subtask:
            subtask_items = by_subtask[subtask]
            if protocol == "official":
                groups = [subtask_items[start : start + 2] for start in range(0, len(subtask_items), 2)]
                named = [("+".join(item.question_id for item in group), group) for group in groups]
            else:
                images: dict[str, list[EvalItem]] = defaultdict(list)
                for item in subtask_items:
                    images[item.reference["image"]].append(item)
                named = list(images.items())
            for unit_id, group in named:
                answered = [item for item in group if item.question_id in predictions]
                if not answered:
                    continue
                right = sum(parse(predictions[item.question_id]) == item.reference["answer"] for item in answered)
                complete = len(answered) == len(group)
                counts = [len(answered), right, float(complete), float(complete and right == len(group))]
                units.append((unit_id, subtask, counts))
        if not units:
            return None
        subtasks = [subtask for subtask in PERCEPTION if subtask in {subtask for _, subtask, _ in units}]
        values = np.zeros((len(units), 4 * len(subtasks)))
        for row, (_, subtask, counts) in enumerate(units):
            column = 4 * subtasks.index(subtask)
            values[row, column : column + 4] = counts
        return UnitStatistic(
            ids=tuple(unit_id for unit_id, _, _ in units),
            values=values,
            headline=perception_sum,
            strata=tuple(subtask for _, subtask, _ in units),
            unit="image" if protocol == "strict" else "question pair",
            stratum="subtask",
            description=f"{'images' if protocol == 'strict' else 'question pairs (one image each)'} resampled "
            "within each perception subtask, acc + acc+ recomputed",
        )

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """LLaVA's answer JSONL (``question_id`` = ``<subtask>/<file>`` as in ``llava_mme.jsonl``, ``prompt``,
        ``text``) and, in ``mme_eval_tool/``, the ``<subtask>.txt`` files ``convert_answer_to_mme.py`` writes
        from it (``<file>.txt<TAB>question<TAB>Yes|No<TAB>answer``), which MME's ``calculation.py
        --results_dir`` reads. Tabs and newlines in an answer become spaces (the tool splits on them); its
        yes/no reading is unchanged by that."""
        answered = answered_items(items, predictions, self.name, "calculation.py expects both questions of every image")
        answers = [llava_answer(item.reference["image"], item, predictions[item.question_id]) for item in answered]
        answers_path = write_export(out_dir, ANSWERS_FILE, answers, self.name)
        lines: dict[str, list[str]] = defaultdict(list)
        for item in answered:
            text = predictions[item.question_id]
            flat = text.replace("\t", " ").replace("\r", " ").replace("\n", " ")
            if flat != text:
                logger.warning("mme: answer to %s has tabs or line breaks, written with spaces", item.question_id)
            txt_name = item.reference["image"].split("/")[-1].split(".")[0] + ".txt"
            fields = (txt_name, item.reference["mme_question"], item.reference["mme_answer"], flat)
            lines[item.reference["subtask"]].append("\t".join(fields) + "\n")
        tool_dir = out_dir / EVAL_TOOL_FOLDER
        tool_dir.mkdir(exist_ok=True)
        written = [answers_path]
        for subtask, subtask_lines in lines.items():
            path = tool_dir / f"{subtask}.txt"
            path.write_text("".join(subtask_lines), encoding="utf-8")
            written.append(path)
        return written
