"""Append-only answer files: every finished answer is on disk before the next batch starts.

A run writes one JSONL file per shard (``answers-<rank>of<world>.jsonl``) into its folder. A killed run
leaves at most a torn last line, which the next run cuts off before appending; answers already written
are never rewritten. Resuming reads every shard file of the folder, so a run may resume with another
number of ranks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from llava.eval.base import EvalDataError

logger = logging.getLogger(__name__)

ANSWER_GLOB = "answers-*of*.jsonl"


def shard_file(folder: Path, rank: int, world_size: int) -> Path:
    """The answer file of one shard."""
    return folder / f"answers-{rank}of{world_size}.jsonl"


def _cut_torn_tail(path: Path) -> None:
    """Drop an unterminated last line (a write interrupted by a kill), so appends start on a line boundary."""
    with open(path, "rb+") as handle:
        data = handle.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        handle.truncate(keep)
    logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", path, len(data) - keep)


def read_answers(folder: Path) -> dict[str, dict[str, Any]]:
    """Every answer recorded in ``folder`` (all shard files), by question id.

    A torn last line is ignored; any other malformed line, or one question answered twice with different
    text, is an error naming the file and line.
    """
    answers: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob(ANSWER_GLOB)):
        lines = path.read_bytes().split(b"\n")
        complete = lines[:-1]  # the last element is empty after a final newline, else a torn line
        for number, raw in enumerate(complete, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                question_id = str(record["question_id"])
                text = record["text"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
                raise EvalDataError(f"{path}:{number}: not an answer record ({error})") from None
            previous = answers.get(question_id)
            if previous is not None and previous["text"] != text:
                raise EvalDataError(f"{path}:{number}: question {question_id} answered twice with different text")
            answers[question_id] = record
    return answers


class AnswerWriter:
    """Appends answer records to one shard file, flushed and synced after every batch."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            _cut_torn_tail(path)
        self.path = path
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> AnswerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
