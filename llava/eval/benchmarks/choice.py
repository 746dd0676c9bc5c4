"""Helpers shared by the multiple-choice and yes/no benchmarks (MME, POPE, ScienceQA, MMBench, SEED):
answer parsing as LLaVA-1.5's scripts do it, and image paths checked at load time."""

from __future__ import annotations

import re
from pathlib import Path

from llava.eval.base import resolve_image

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")


def parse_option_letter(text: str, letters: str = LETTERS) -> str | None:
    """The option letter in ``text`` ("B", "B. text" or "... The answer is B."), or ``None``.

    Follows LLaVA's ScienceQA scorer: anything else, or a letter not among ``letters``, is unparseable
    and scores as wrong.
    """
    text = text.strip()
    if len(text) == 1:
        return text if text in letters else None
    if len(text) >= 2 and text[0] in letters and text[1] == ".":
        return text[0]
    found = _ANSWER_IS.findall(text)
    if len(found) == 1 and found[0] in letters:
        return found[0]
    return None


def parse_yes_no_mme(text: str) -> str:
    """MME's reading of an answer: "yes", "no" or "other" (lower-cased, periods dropped; an exact
    yes/no, else yes/no within the first four characters)."""
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def parse_yes_no_pope(text: str) -> str:
    """POPE's reading of an answer: "no" when the first sentence (commas dropped) has the word
    "No", "no" or "not", else "yes"."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def existing_image(root: Path, relative: str, source: Path, question_id: object) -> str:
    """``root / relative`` as an absolute path that stays inside ``root`` and exists; otherwise an
    :class:`EvalDataError` naming the question file ``source`` and the question id."""
    return resolve_image(root, relative, f"{source}: question {question_id}")


def percent(part: int, whole: int) -> float:
    """``part / whole`` in percent, 0 for an empty ``whole``."""
    return 100.0 * part / whole if whole else 0.0
