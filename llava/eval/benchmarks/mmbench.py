"""MMBench dev (English): multiple-choice questions scored with CircularEval.

Questions come from ``mmbench/mmbench_dev_20230712.tsv`` (columns index, question, hint, A-D, answer,
category, l2-category, source, split, image as base64). Rows with ``index >= 1_000_000`` are copies of
``index % 1_000_000`` with the options shifted; a question counts as right only if every copy is. The
images are decoded once into the cache folder. LLaVA uploads its answers to OpenCompass, which applies
the same rule (plus a GPT matcher for free-form answers, not used here: an unparseable answer is wrong).
"""

from __future__ import annotations

import base64
import binascii
import csv
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from llava.eval.base import OPTION_LETTER, EvalDataError, EvalItem, Score
from llava.eval.benchmarks.choice import parse_option_letter, percent

COPY_OFFSET = 1_000_000
OPTIONS = "ABCD"
COLUMNS = ("index", "question", "A", "B", "answer", "category", "image")


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

    def score(self, items: Sequence[EvalItem], predictions: Mapping[str, str]) -> Score:
        """CircularEval accuracy x 100; ``metrics`` adds per-row accuracy and per-category circular
        accuracy (``category/<name>``, ``l2_category/<name>``)."""
        groups: dict[int, list[bool | None]] = defaultdict(list)
        group_items: dict[int, EvalItem] = {}
        right_rows = scored_rows = 0
        for item in items:
            group = int(item.reference["group"])
            group_items.setdefault(group, item)
            if item.question_id not in predictions:
                groups[group].append(None)
                continue
            guess = parse_option_letter(predictions[item.question_id], item.reference["options"])
            right = guess == item.reference["answer"]
            groups[group].append(right)
            right_rows += right
            scored_rows += 1
        complete = {group: all(flags) for group, flags in groups.items() if None not in flags}
        metrics: dict[str, float] = {
            "circular_accuracy": percent(sum(complete.values()), len(complete)),
            "plain_accuracy": percent(right_rows, scored_rows),
            "questions_scored": len(complete),
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
            score=metrics["circular_accuracy"],
            metrics=metrics,
            num_scored=scored_rows,
            num_questions=len(items),
        )
