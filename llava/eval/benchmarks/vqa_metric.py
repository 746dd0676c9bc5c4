"""The VQA answer normalisation and accuracy, and what the short-answer VQA benchmarks share.

:func:`normalize_answer` reproduces the EvalAI answer processing LLaVA uses for TextVQA, and for the
VQAv2 and VizWiz submission files (the ``EvalAIAnswerProcessor`` of the m4c evaluator): it is applied to
the prediction *and* to every human answer, so both sides are compared in the same form.
:func:`vqa_accuracy` is the official soft accuracy: an answer that 3 of the other 9 annotators gave is
fully right, averaged over the 10 leave-one-out subsets.

Known quirks of the official processing kept on purpose, so numbers match published ones: the period
rule keeps a period only when a *digit follows it* ("1.5" and ".5" stay, "end." and "5." lose it), and
the contraction table maps a few odd keys (``somebody'd`` -> ``somebodyd``) exactly as EvalAI does, and
has no entry for "im"/"ive" (EvalAI's are capitalised, so never match lower-cased text).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from llava.eval.base import EvalItem, Score

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")

# Spellings without the apostrophe (as annotators and models type them) -> the canonical contraction.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic: EvalAI's table
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _strip_punctuation(text: str) -> str:
    """EvalAI's punctuation rule: a mark next to a space (or any text with a comma between digits) is
    deleted, otherwise it becomes a space; then periods not followed by a digit are deleted."""
    delete = re.search(_COMMA_BETWEEN_DIGITS, text) is not None
    out = text
    for mark in _PUNCTUATION:
        next_to_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete or next_to_space else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _canonical_words(text: str) -> str:
    """Number words to digits, articles dropped, apostrophe-less contractions fixed, single spaces."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """An answer in EvalAI's canonical form, so that "Two dogs." and "2 dogs" compare equal.

    Lower-cases, drops commas and "?", splits "'s" off its word, handles punctuation and periods as
    EvalAI does, maps zero..ten (and "none") to digits, drops a/an/the and restores contractions.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _canonical_words(_strip_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA soft accuracy (0-1) of one prediction against the human answers (10 in the datasets).

    Both sides are normalised. For each annotator i, acc_i = min(1, matches among the *other* answers
    / 3); the result is the mean of the acc_i, so an answer given by 3 or more people scores 1 and one
    given by a single person 0.3. Raises ``ValueError`` without answers: there is nothing to score.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - own) / 3) for own in matches) / len(matches)


def mean_accuracy(
    items: Sequence[EvalItem],
    predictions: Mapping[str, str],
    accuracy: Callable[[str, EvalItem], float],
    group_by: Sequence[str] = (),
) -> Score:
    """A :class:`Score` of per-question ``accuracy(prediction, item)`` (0-1) averaged x 100.

    Items without a prediction are skipped (``num_scored`` counts the rest); with none scored the
    score is NaN. ``metrics`` holds ``accuracy`` and, for each reference key in ``group_by`` that an
    item has, ``"<key>/<value>"`` -> the accuracy x 100 of that group (e.g. ``answer_type/yes/no``).
    """
    total = 0.0
    scored = 0
    groups: dict[str, list[float]] = defaultdict(list)
    for item in items:
        prediction = predictions.get(item.question_id)
        if prediction is None:
            continue
        value = accuracy(prediction, item)
        total += value
        scored += 1
        for key in group_by:
            if item.reference.get(key) is not None:
                groups[f"{key}/{item.reference[key]}"].append(value)
    score = 100.0 * total / scored if scored else math.nan
    metrics: dict[str, float] = {"accuracy": score}
    metrics.update({name: 100.0 * sum(values) / len(values) for name, values in sorted(groups.items())})
    return Score(score=score, metrics=metrics, num_scored=scored, num_questions=len(items))


def reference_vqa_accuracy(prediction: str, item: EvalItem) -> float:
    """:func:`vqa_accuracy` against the ``answers`` list in the item's reference."""
    return vqa_accuracy(prediction, item.reference["answers"])


def human_answers(answers: object) -> list[str] | None:
    """The answer strings of an official ``[{"answer": ...}, ...]`` list (VQAv2, VizWiz), or ``None``
    when it is not a non-empty list of such objects."""
    if not isinstance(answers, list) or not answers:
        return None
    if not all(isinstance(answer, dict) and "answer" in answer for answer in answers):
        return None
    return [str(answer["answer"]) for answer in answers]


def server_scored(benchmark: str, items: Sequence[EvalItem], predictions: Mapping[str, str]) -> Score:
    """The :class:`Score` of a split only the evaluation server can score: NaN, nothing scored locally."""
    metrics = {
        "note": f"{benchmark} is scored by the EvalAI server; upload write_submission's file",
        "num_predictions": sum(item.question_id in predictions for item in items),
    }
    return Score(score=math.nan, metrics=metrics, num_scored=0, num_questions=len(items))
