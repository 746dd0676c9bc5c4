"""MMBench dev (English): multiple-choice questions scored with CircularEval.

Questions come from ``mmbench/mmbench_dev_20230712.tsv`` (columns index, question, hint, A-D, answer,
category, l2-category, source, split, image as base64). Rows with ``index >= 1_000_000`` are copies of
``index % 1_000_000`` with the options shifted; a question counts as right only if every copy is. The
images are decoded once into the cache folder.

Reading an answer. LLaVA uploads its answers to the MMBench server, which (like VLMEvalKit) first tries
exact matching and then asks a GPT model to map a free-form answer to an option. The ``official``
protocol reproduces the exact-matching stage, VLMEvalKit's ``can_infer`` (as of commit 18fc37a, without
the later "letter near the end" and answer-length guards): punctuation ``.()[],:;!*#{}`` becomes spaces and
the answer counts when exactly one option letter appears as a word ("(C)", "Answer: A", "A cat" -> A), else
when exactly one option text appears in the lower-cased answer. The GPT stage is not run: an answer it
would have matched scores as wrong, so a model that answers with letters (LLaVA-1.5's suffix asks for
them) gets the server's number and a chattier one a lower bound. ``strict`` accepts only "B", "B." /
"B. text" and one "The answer is B." (:func:`~llava.eval.benchmarks.choice.parse_option_letter`).

Intervals (:meth:`MMBench.resampling_units`, used by :mod:`llava.eval.compare`): CircularEval accuracy is
the mean over question groups (a row and its circular copies) of 100 when every copy is right, else 0, so
the groups are the units and their 0/100 scores are compared like per-question scores (bootstrap of the
mean over groups, exact McNemar over groups).
"""

from __future__ import annotations

import base64
import binascii
import csv
import logging
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from llava.eval.base import OPTION_LETTER, EvalDataError, EvalItem, Score, check_protocol
from llava.eval.benchmarks.choice import parse_option_letter, percent
from llava.eval.stats import UnitStatistic

logger = logging.getLogger(__name__)

COPY_OFFSET = 1_000_000
OPTIONS = "ABCD"
COLUMNS = ("index", "question", "A", "B", "answer", "category", "image")
UPLOAD_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
"""Columns LLaVA's ``convert_mmbench_for_submission.py`` drops from the TSV before adding ``prediction``."""
UPLOAD_PREDICTION_COLUMN = 6
"""Where that script inserts the ``prediction`` column (0-based)."""
UPLOAD_FILE = "mmbench_dev_upload.tsv"

_PUNCTUATION = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
"""Answers VLMEvalKit maps to the non-option "Z" (scored wrong) before any other matching."""
_API_FAILURE = "Failed to obtain answer via API"


def _infer_letter(text: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's option-letter stage: "Z" for a refusal or a lone "Z", the one option letter that
    appears as a word, else ``None``."""
    if _API_FAILURE in text:
        return None
    if any(refusal in text for refusal in _REFUSALS):
        return "Z"
    words = text.translate(_PUNCTUATION).split()
    found = [letter for letter in options if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return "Z"
    return None


def _infer_text(text: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's option-text stage: the one option whose lower-cased text is in the lower-cased answer."""
    lowered = text.lower()
    found = [letter for letter, option in options.items() if option.lower() in lowered]
    return found[0] if len(found) == 1 else None


def parse_mmbench_official(text: str, options: Mapping[str, str]) -> str | None:
    """The option VLMEvalKit's exact matching reads from ``text`` (``options``: letter -> option text of the
    row), "Z" for what it treats as a refusal, ``None`` where it would hand over to its GPT matcher."""
    return _infer_letter(text, options) or _infer_text(text, options)


def _cell(row: Mapping[str, str | None], column: str) -> str:
    """A TSV cell with pandas' empty markers ("", "nan") read as empty."""
    value = (row.get(column) or "").strip()
    return "" if value.lower() == "nan" else value


def _image_suffix(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return ".gif"
    return ".jpg"


class MMBench:
    """MMBench dev; :attr:`Score.score` is the CircularEval accuracy x 100."""

    name = "mmbench"
    score_name = "CircularEval accuracy"

    def load(self, root: Path, cache_dir: Path) -> list[EvalItem]:
        """One item per TSV row; images are written to ``cache_dir/mmbench/<index>.<ext>`` once."""
        tsv = root / "mmbench" / "mmbench_dev_20230712.tsv"
        image_dir = cache_dir / "mmbench"
        image_dir.mkdir(parents=True, exist_ok=True)
        csv.field_size_limit(sys.maxsize)
        try:
            handle = open(tsv, encoding="utf-8", newline="")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise EvalDataError(f"{tsv}: file not found") from None
        images: dict[str, str] = {}
        items = []
        with handle:
            reader = csv.DictReader(handle, delimiter="\t")
            missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
            if missing:
                raise EvalDataError(f"{tsv}: missing column(s) {', '.join(missing)}")
            rows = list(reader)
            header = list(reader.fieldnames or [])
        cells = {_cell(row, "index"): _cell(row, "image") for row in rows}
        if len(cells) != len(rows):
            raise EvalDataError(f"{tsv}: an index appears more than once")
        for row in rows:
            index = _cell(row, "index")
            where = f"{tsv}: question {index}"
            if not index.isdigit():
                raise EvalDataError(f"{where}: index is not a number")
            options = {letter: _cell(row, letter) for letter in OPTIONS if _cell(row, letter)}
            answer = _cell(row, "answer")
            if answer not in options:
                raise EvalDataError(f"{where}: answer {answer!r} is not one of the options {sorted(options)}")
            image = self._image(index, cells, images, image_dir, where)
            upload_row = {column: _cell(row, column) for column in header if column not in UPLOAD_DROPPED}
            hint, question = _cell(row, "hint"), _cell(row, "question")
            lines = [f"{hint}\n{question}" if hint else question]
            lines += [f"{letter}. {text}" for letter, text in options.items()]
            items.append(
                EvalItem(
                    question_id=index,
                    prompt="\n".join(lines) + OPTION_LETTER,
                    image=image,
                    max_new_tokens=1024,
                    reference={
                        "answer": answer,
                        "options": "".join(options),
                        "option_text": options,
                        "upload_row": upload_row,
                        "group": int(index) % COPY_OFFSET,
                        "category": _cell(row, "category"),
                        "l2_category": _cell(row, "l2-category"),
                    },
                )
            )
        return items

    @staticmethod
    def _image(index: str, cells: Mapping[str, str], images: dict[str, str], image_dir: Path, where: str) -> str:
        """The decoded image of a row; a short numeric cell refers to another row's image."""
        if index in images:
            return images[index]
        value = cells[index]
        if value.isdigit() and len(value) <= 8:
            if value == index or cells.get(value, "").isdigit() or value not in cells:
                raise EvalDataError(f"{where}: image refers to row {value}, which has no image")
            images[index] = MMBench._image(value, cells, images, image_dir, where)
            return images[index]
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise EvalDataError(f"{where}: image is not valid base64") from None
        if not data:
            raise EvalDataError(f"{where}: image is empty")
        path = image_dir / f"{index}{_image_suffix(data)}"
        if not path.is_file() or path.stat().st_size != len(data):
            path.write_bytes(data)
        images[index] = str(path.resolve())
        return images[index]

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official") -> Score:
        """CircularEval accuracy x 100, answers read by :func:`parse_mmbench_official` (``official``) or
        :func:`~llava.eval.benchmarks.choice.parse_option_letter` (``strict``); ``metrics`` adds per-row
        accuracy, per-category circular accuracy (``category/<name>``, ``l2_category/<name>``) and the
        protocol."""
        groups, group_items = self._groups(items, predictions, protocol)
        right_rows = sum(bool(flag) for flags in groups.values() for flag in flags)
        scored_rows = sum(flag is not None for flags in groups.values() for flag in flags)
        complete = {group: all(flags) for group, flags in groups.items() if None not in flags}
        metrics: dict[str, float | str] = {
            "circular_accuracy": percent(sum(complete.values()), len(complete)),
            "plain_accuracy": percent(right_rows, scored_rows),
            "questions_scored": len(complete),
            "protocol": protocol,
        }
        for key in ("category", "l2_category"):
            totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for group, right in complete.items():
                name = group_items[group].reference[key]
                if name:
                    totals[name][0] += right
                    totals[name][1] += 1
            metrics.update({f"{key}/{name}": percent(*counts) for name, counts in sorted(totals.items())})
        return Score(
            score=percent(sum(complete.values()), len(complete)),
            metrics=metrics,
            num_scored=scored_rows,
            num_questions=len(items),
        )

    @staticmethod
    def _groups(
        items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str
    ) -> tuple[dict[int, list[bool | None]], dict[int, EvalItem]]:
        """Per question group (a row and its circular copies) whether each row is right (``None``: unanswered),
        and the group's first item."""
        check_protocol(protocol)
        groups: dict[int, list[bool | None]] = defaultdict(list)
        group_items: dict[int, EvalItem] = {}
        for item in items:
            group = int(item.reference["group"])
            group_items.setdefault(group, item)
            if item.question_id not in predictions:
                groups[group].append(None)
                continue
            text = predictions[item.question_id]
            if protocol == "official":
                guess = parse_mmbench_official(text, item.reference["option_text"])
            else:
                guess = parse_option_letter(text, item.reference["options"])
            groups[group].append(guess == item.reference["answer"])
        return groups, group_items

    def resampling_units(
        self, items: Sequence[EvalItem], predictions: Mapping[str, str], protocol: str = "official"
    ) -> UnitStatistic | None:
        """The headline on resampling units: every question group whose rows are all answered scores 100 when
        all are right, else 0; their plain mean (``headline=None``) is :meth:`score`'s CircularEval accuracy.
        ``None`` when no group is complete."""
        groups, _ = self._groups(items, predictions, protocol)
        complete = {group: all(flags) for group, flags in groups.items() if None not in flags}
        if not complete:
            return None
        return UnitStatistic(
            ids=tuple(str(group) for group in complete),
            values=np.asarray([[100.0 if right else 0.0] for right in complete.values()]),
            unit="question group",
            description="question groups (a question and its circular copies) resampled, scored 100 when every "
            "copy is right",
        )

    def export_official(self, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: Path) -> list[Path]:
        """Write the MMBench upload table LLaVA's ``convert_mmbench_for_submission.py`` builds: the TSV's
        columns without hint, category, source, image, comment and l2-category, a ``prediction`` column
        (the raw answer, empty where there is none) inserted as the 7th, one row per question in file
        order. LLaVA writes it as .xlsx with pandas/openpyxl, which this project does not depend on, so it
        is written as TSV (``pandas.read_table(path).to_excel(...)`` converts it). Returns the file."""
        rows = []
        for item in items:
            row = dict(item.reference["upload_row"])
            columns = list(row)
            position = min(UPLOAD_PREDICTION_COLUMN, len(columns))
            columns.insert(position, "prediction")
            row["prediction"] = predictions.get(item.question_id, "")
            rows.append((columns, row))
        missing = sum(item.question_id not in predictions for item in items)
        if missing:
            logger.warning("%s: %d of %d questions have no prediction in the upload", self.name, missing, len(items))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / UPLOAD_FILE
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            if rows:
                writer.writerow(rows[0][0])
            for columns, row in rows:
                writer.writerow([row.get(column, "") for column in columns])
        logger.info("%s: wrote %d rows to %s", self.name, len(rows), path)
        return [path]
