"""Helpers shared by the multiple-choice and yes/no benchmarks (MME, POPE, ScienceQA, MMBench, SEED):
answer parsing (the official scripts' rules and this project's stricter one), and image paths checked at
load time."""

from __future__ import annotations

import re
from pathlib import Path

from llava.eval.base import resolve_image

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")


def parse_option_letter(text: str, letters: str = LETTERS) -> str | None:
    """The option letter in ``text`` ("B", "B. text", "B." or "... The answer is B." once), or ``None``.

    The ``strict`` protocol of ScienceQA, MMBench and SEED-Bench: anything else, or a letter not among
    ``letters``, is unparseable and scores as wrong.
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


SQA_OFFICIAL_OPTIONS = ("A", "B", "C", "D", "E")
"""The letters LLaVA's ``eval_science_qa.py`` knows (its ``--options`` default)."""
_SQA_ANSWER_IS_PERIOD = re.compile(r"The answer is ([A-E])\.")
_SQA_ANSWER_IS_BARE = re.compile(r"The answer is ([A-E])")


def parse_sqa_official(text: str, num_options: int) -> str | None:
    """The option letter LLaVA's ``eval_science_qa.py`` reads from ``text``, or ``None`` (its "FAILED").

    Its rules, in order, after newlines become ". ": the whole text stripped is one letter A-E; the text
    starts with a letter and ". " (so a bare "A." fails); it contains "The answer is X." or else "The answer
    is X" (first occurrence, so "The answer is D," counts). A letter beyond the question's ``num_options``
    scores as wrong, as there.
    """
    text = text.replace("\n", ". ")
    letter: str | None = None
    if text.strip() in SQA_OFFICIAL_OPTIONS:
        letter = text.strip()
    elif len(text) >= 3 and text[0] in SQA_OFFICIAL_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    elif "The answer is " in text:
        match = _SQA_ANSWER_IS_PERIOD.search(text) or _SQA_ANSWER_IS_BARE.search(text)
        letter = match.group(1) if match else None
    return letter if letter in SQA_OFFICIAL_OPTIONS[:num_options] else None


def parse_seed_official(text: str, letters: str = "ABCD") -> str | None:
    """LLaVA's SEED-Bench rule (``convert_seed_for_submission.py``): the answer counts only when the text is
    exactly one option letter, nothing around it."""
    return text if len(text) == 1 and text in letters else None


def parse_calculation(text: str) -> str:
    """MME ``calculation.py``'s reading of an answer: lower-cased only; exactly "yes"/"no", else "yes" if
    the first four characters contain "yes", "no" if they contain "no", else "other"."""
    answer = text.lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def parse_yes_no_mme(text: str) -> str:
    """The ``strict`` reading of an MME answer: :func:`parse_calculation` after stripping and dropping every
    "." (as lmms-eval does)."""
    return parse_calculation(text.strip().replace(".", ""))


def parse_yes_no_pope(text: str) -> str:
    """POPE's reading of an answer, as LLaVA's ``eval_pope.py`` does it: "no" when the first sentence
    (commas dropped, split on single spaces) has the word "No", "no" or "not", else "yes" (so "Nope" or an
    empty answer counts as yes)."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def existing_image(root: Path, relative: str, source: Path, question_id: object) -> str:
    """``root / relative`` as an absolute path that stays inside ``root`` and exists; otherwise an
    :class:`EvalDataError` naming the question file ``source`` and the question id."""
    return resolve_image(root, relative, f"{source}: question {question_id}")


def percent(part: int, whole: int) -> float:
    """``part / whole`` in percent, 0 for an empty ``whole``."""
    return 100.0 * part / whole if whole else 0.0
