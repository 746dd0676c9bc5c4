"""Zero-shot video QA (MSVD-QA, MSRVTT-QA, TGIF-QA, ActivityNet-QA) in the Video-ChatGPT / Video-LLaVA layout.

Files, under ``root/GPT_Zero_Shot_QA/<Dataset>_Zero_Shot_QA/``:

- ``test_q.json``: ``[{video_name, question, question_id}]``;
- ``test_a.json``: ``[{answer, type, question_id}]``;
- the videos: MSVD ``videos/<name>.avi``, MSRVTT ``videos/all/<name>.mp4``, TGIF ``mp4/<name>.mp4``,
  ActivityNet ``all_test/v_<name>.mp4`` (other containers are tried when the listed one is absent).

Questions and answers are paired by ``question_id``, never by position: Video-LLaVA reads the answers with a
per-chunk counter, which pairs them wrongly as soon as inference is split across GPUs (Video-LLaVA #36).

The published metric is a GPT judge (:mod:`llava.eval.judge`). :meth:`VideoQA.score` is the offline
stand-in: after normalisation (lower case, punctuation and the articles a/an/the removed, whitespace
collapsed) a prediction is correct when it equals the reference or contains it as a whole word or phrase.
It gives no credit for synonyms or paraphrases, so it is stricter than the judge and its numbers are lower:
compare a model only with a baseline scored the same way. It is the same under both protocols; the
protocol (``--protocol``) changes the judge (:mod:`llava.eval.judge`: Video-ChatGPT's prompts and reading
under ``official``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava.eval.base import (
    EvalDataError,
    EvalItem,
    Score,
    check_protocol,
    read_json,
    require_fields,
    resolve_inside,
    write_export,
)

logger = logging.getLogger(__name__)

EXPORT_FILE = "video_chatgpt_predictions.json"
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm")
"""Containers tried, after the dataset's own, when a ``video_name`` has no extension."""


@dataclass(frozen=True)
class _Layout:
    """Where one dataset keeps its videos and how a ``video_name`` becomes a file name."""

    name: str
    video_dir: str
    extension: str
    prefix: str = ""


_LAYOUTS: dict[str, _Layout] = {
    "MSVD": _Layout("msvd", "videos", ".avi"),
    "MSRVTT": _Layout("msrvtt", "videos/all", ".mp4"),
    "TGIF": _Layout("tgif", "mp4", ".mp4"),
    "Activitynet": _Layout("activitynet", "all_test", ".mp4", prefix="v_"),
}

_PUNCTUATION = re.compile(r"[^\w\s]")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """``text`` lower-cased, with punctuation (replaced by spaces) and the articles a/an/the removed and
    whitespace collapsed, so that "A dog." and "dog" compare equal."""
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _ARTICLES.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def answer_matches(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` is correct for ``reference`` under the offline rule: after
    :func:`normalize_answer`, equal, or the reference is a whole word or phrase of the prediction
    ("a man is cooking" is right for "cooking", "cooks" is not). An empty normalised reference only
    matches an empty prediction."""
    predicted, expected = normalize_answer(prediction), normalize_answer(reference)
    if not expected:
        return not predicted
    return predicted == expected or f" {expected} " in f" {predicted} "


class VideoQA:
    """One of the four zero-shot video QA benchmarks (``dataset`` = MSVD, MSRVTT, TGIF or Activitynet)."""

    score_name = "accuracy (normalised match)"

    def __init__(self, dataset: str, max_new_tokens: int = 1024) -> None:
        canonical = {key.lower(): key for key in _LAYOUTS}.get(dataset.lower())
        if canonical is None:
            raise ValueError(f"unknown video QA dataset {dataset!r}; expected one of {', '.join(_LAYOUTS)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.dataset = canonical
        self.layout = _LAYOUTS[canonical]
        self.name = self.layout.name
        self.max_new_tokens = max_new_tokens

    def folder(self, root: Path) -> Path:
        """The dataset's folder under the evaluation root."""
        return Path(root) / "GPT_Zero_Shot_QA" / f"{self.dataset}_Zero_Shot_QA"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """Every question of ``test_q.json``, in file order, with its answer from ``test_a.json`` (paired by
        ``question_id``) and its video. Raises :class:`EvalDataError` naming the file and question id for a
        malformed record, a duplicate id, an id found in only one file, or a missing video."""
        folder = self.folder(root)
        questions_path, answers_path = folder / "test_q.json", folder / "test_a.json"
        questions = _records_by_id(questions_path, ("video_name", "question", "question_id"))
        answers = _records_by_id(answers_path, ("answer", "question_id"))
        for question_id in questions:
            if question_id not in answers:
                raise EvalDataError(f"{answers_path}: no answer for question_id {question_id!r} of {questions_path}")
        for question_id in answers:
            if question_id not in questions:
                raise EvalDataError(f"{questions_path}: no question for question_id {question_id!r} of {answers_path}")

        video_dir = folder / self.layout.video_dir
        items = []
        for question_id, question in questions.items():
            where = f"{questions_path} (question_id {question_id!r})"
            video_name, text = question["video_name"], question["question"]
            if isinstance(video_name, int) and not isinstance(video_name, bool):
                video_name = str(video_name)
            if not isinstance(video_name, str) or not video_name:
                raise EvalDataError(f"{where}: video_name must be a non-empty string, got {video_name!r}")
            if not isinstance(text, str):
                raise EvalDataError(f"{where}: question must be a string, got {type(text).__name__}")
            answer = answers[question_id]
            items.append(
                EvalItem(
                    question_id=question_id,
                    prompt=text,
                    video=self._video_path(video_dir, video_name, where),
                    max_new_tokens=self.max_new_tokens,
                    reference={"answer": str(answer["answer"]), "type": answer.get("type"), "video_name": video_name},
                )
            )
        logger.info("%s: %d questions from %s", self.name, len(items), folder)
        return items

    def _video_path(self, video_dir: Path, video_name: str, where: str) -> str:
        """The absolute path of ``video_name``'s file inside ``video_dir``: the name as given when it has a
        video extension, else with the dataset's prefix and extension, then the other containers."""
        if Path(video_name).suffix.lower() in VIDEO_EXTENSIONS:
            candidates = [video_name]
        else:
            stem = video_name if video_name.startswith(self.layout.prefix) else self.layout.prefix + video_name
            extensions = [self.layout.extension, *(e for e in VIDEO_EXTENSIONS if e != self.layout.extension)]
            candidates = [stem + extension for extension in extensions]
        for candidate in candidates:
            path = resolve_inside(video_dir, candidate, where)
            if Path(path).is_file():
                return path
        raise EvalDataError(f"{where}: video {video_name!r} not found in {video_dir} (tried {', '.join(candidates)})")

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """Accuracy x 100 under :func:`answer_matches`, overall (``score``, ``metrics["accuracy"]``) and per
        answer type (``metrics["accuracy/<type>"]`` with ``metrics["num_scored/<type>"]``), the same under
        every ``protocol`` (recorded in ``metrics``). Questions without a prediction are left out."""
        check_protocol(protocol)
        scored: Counter[str] = Counter()
        correct: Counter[str] = Counter()
        for item in items:
            if item.question_id not in predictions:
                continue
            answer_type = str(item.reference.get("type"))
            scored[answer_type] += 1
            correct[answer_type] += answer_matches(str(predictions[item.question_id]), item.reference["answer"])
        num_scored, num_correct = sum(scored.values()), sum(correct.values())
        accuracy = 100.0 * num_correct / num_scored if num_scored else 0.0
        metrics: dict[str, Any] = {"accuracy": accuracy, "num_correct": num_correct, "protocol": protocol}
        for answer_type in sorted(scored):
            metrics[f"accuracy/{answer_type}"] = 100.0 * correct[answer_type] / scored[answer_type]
            metrics[f"num_scored/{answer_type}"] = scored[answer_type]
        if num_scored < len(items):
            logger.warning("%s: %d of %d questions have no prediction", self.name, len(items) - num_scored, len(items))
        return Score(score=accuracy, metrics=metrics, num_scored=num_scored, num_questions=len(items))

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """Write the ``--pred_path`` file of Video-ChatGPT's ``evaluate_*_qa.py`` judge: a JSON list of
        ``{"video_name", "Q", "A", "pred"}``, answered questions in file order. Returns the file."""
        entries = [
            {
                "video_name": item.reference.get("video_name", item.question_id),
                "Q": item.prompt,
                "A": item.reference["answer"],
                "pred": predictions[item.question_id],
            }
            for item in items
            if item.question_id in predictions
        ]
        return [write_export(out_dir, EXPORT_FILE, entries, self.name, json_lines=False)]


def _records_by_id(path: Path, fields: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The records of a JSON list keyed by ``str(question_id)``, in file order; :class:`EvalDataError` for a
    file that is not a list of objects, a missing field or a duplicate id."""
    records = read_json(path)
    if not isinstance(records, list):
        raise EvalDataError(f"{path}: expected a JSON list, got {type(records).__name__}")
    by_id: dict[str, dict[str, Any]] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise EvalDataError(f"{path}[{index}]: expected a JSON object, got {type(record).__name__}")
        require_fields(record, ("question_id",), f"{path}[{index}]")
        question_id = str(record["question_id"])
        require_fields(record, fields, f"{path}[{index}] (question_id {question_id!r})")
        if question_id in by_id:
            raise EvalDataError(f"{path}: duplicate question_id {question_id!r} (entry {index})")
        by_id[question_id] = record
    return by_id
