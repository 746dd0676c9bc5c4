"""Question and answer wording shared by the playground's image, video and scene data.

Holds the short-answer suffix, number words and English helpers, the LLaVA conversation layout
(``{"from": "human" | "gpt", "value": ...}`` turns, the media tag in round one), and the two kinds of
conversation that both the image and the video data sets contain: VQA about one image
(:func:`image_conversation`) and text-only chat (:func:`text_conversation`). Every random choice
goes through the ``rng`` passed in, in a fixed order, so a seed gives the same text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from llava.constants import IMAGE_TAG
from llava.playground.drawing import COLORS, SHAPES, ImageSpec, ShapeSpec

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
"""LLaVA-1.5's prompt for one-word answers (mix665k's VQA data)."""
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
DETAIL_PROMPTS: tuple[str, ...] = (
    "Describe the image in detail.",
    "What do you see in this picture? Please be detailed.",
    "Can you describe everything that is drawn in this image?",
)

Turns = list[tuple[str, str]]
"""(question, answer) rounds of a conversation, before the LLaVA layout."""
Conversation = list[dict[str, str]]
"""LLaVA conversation: alternating ``human`` / ``gpt`` turns."""


# --------------------------------------------------------------------------------------------
# English
# --------------------------------------------------------------------------------------------


def article(word: str) -> str:
    """``a`` or ``an`` for ``word`` (by its first letter: enough for the playground's vocabulary)."""
    return "an" if word[0] in "aeiou" else "a"


def phrase(s: ShapeSpec) -> str:
    """``a red circle``: a shape with its article and colour."""
    return f"{article(s.color)} {s.color} {s.shape}"


def where(position: str) -> str:
    """Where a shape at ``position`` sits, as a phrase (``in the top left corner``, ``in the center``)."""
    return "in the center" if position == "center" else f"in the {position} corner"


def cap(text: str) -> str:
    """``text`` with its first letter upper-cased (the rest unchanged, unlike ``str.capitalize``)."""
    return text[0].upper() + text[1:]


# --------------------------------------------------------------------------------------------
# Conversation layout
# --------------------------------------------------------------------------------------------


def plain_conversation(turns: Turns) -> Conversation:
    """``turns`` in the LLaVA layout, with no media tag."""
    conv: Conversation = []
    for question, answer in turns:
        conv.append({"from": "human", "value": question})
        conv.append({"from": "gpt", "value": answer})
    return conv


def tagged_conversation(turns: Turns, tag: str, rng: random.Random) -> Conversation:
    """``turns`` in the LLaVA layout with ``tag`` in round one: before the question 80% of the time, else after."""
    if turns:
        question, answer = turns[0]
        question = f"{tag}\n{question}" if rng.random() < 0.8 else f"{question}\n{tag}"
        turns = [(question, answer), *turns[1:]]
    return plain_conversation(turns)


def caption_request(prompts: Sequence[str], tag: str, rng: random.Random) -> str:
    """A caption request (LCS-558K style): one of ``prompts`` with ``tag`` before or after it, half and half."""
    prompt = rng.choice(prompts)
    return f"{tag}\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n{tag}"


def demo_request(request_id: str, media: str, file: str, question: str, expected: str) -> dict[str, str]:
    """One ``llava.tools.generate`` request (``media`` is ``image`` or ``video``) with its ``expected`` short
    answer, for checking a trained playground model on held-out data."""
    return {"id": request_id, media: file, "prompt": f"{question}\n{SHORT_ANSWER_SUFFIX}", "expected": expected}


# --------------------------------------------------------------------------------------------
# Image and text-only conversations (in both the image and the video data)
# --------------------------------------------------------------------------------------------


def describe_detail(spec: ImageSpec) -> str:
    """Longer multi-sentence description (shape count, layout, orientation) for detail questions."""
    n = len(spec.shapes)
    orientation = "wider than it is tall" if spec.width > spec.height else "taller than it is wide"
    noun = "shape" if n == 1 else "shapes"
    sentences = [f"The image is {orientation} and shows {NUMBER_WORDS[n]} {noun} on a light background."]
    for s in spec.shapes:
        sentences.append(f"There is {phrase(s)} {where(s.position)}.")
    if n == 2:
        a, b = spec.shapes
        sentences.append(f"The {a.shape} is {a.color}, while the {b.shape} is {b.color}.")
    sentences.append("Nothing else is drawn in the picture.")
    return " ".join(sentences)


def _vqa_pool(spec: ImageSpec, rng: random.Random) -> Turns:
    """All candidate (question, short answer) pairs for one image."""
    qa: Turns = []
    n = len(spec.shapes)
    for s in spec.shapes:
        qa.append((f"What color is the {s.shape}?", cap(s.color)))
        qa.append((f"What shape is the {s.color} object?", cap(s.shape)))
        qa.append((f"Where is the {s.color} {s.shape}?", cap(s.position)))
        qa.append((f"Which shape is {where(s.position)} of the image?", cap(s.shape)))
    qa.append(("How many shapes are in the image?", cap(NUMBER_WORDS[n])))
    present = {(s.color, s.shape) for s in spec.shapes}
    s = rng.choice(spec.shapes)
    qa.append((f"Is there {phrase(s)} in the image?", "Yes"))
    for _ in range(10):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in present:
            qa.append((f"Is there {article(color)} {color} {shape} in the image?", "No"))
            break
    absent_colors = [c for c in sorted(COLORS) if c not in {s.color for s in spec.shapes}]
    qa.append((f"Is anything {rng.choice(absent_colors)} drawn in the picture?", "No"))
    return qa


def vqa_conversation(
    pool: list[tuple[str, str, str]], detail_prompts: Sequence[str], detail: str, tag: str, rng: random.Random
) -> Conversation:
    """Multi-turn (1-3 rounds) QA drawn from ``pool`` ((question, short answer, sentence answer) triples,
    shuffled in place), mix665k style, with ``tag`` in round one.

    60% of conversations ask for one-word answers (with the short-answer suffix) and the rest answer in
    sentences; ~20% open with one of ``detail_prompts`` answered by ``detail``. Images and videos share it so
    that both data sets mix answers the same way.
    """
    rng.shuffle(pool)
    rounds = rng.choice((1, 2, 2, 3))
    turns: Turns = []
    if rng.random() < 0.2:
        turns.append((rng.choice(detail_prompts), detail))
    short_suffix = rng.random() < 0.6
    for question, short, sentence in pool[: rounds - len(turns)]:
        turns.append((f"{question}\n{SHORT_ANSWER_SUFFIX}", short) if short_suffix else (question, sentence))
    return tagged_conversation(turns, tag, rng)


def image_conversation(spec: ImageSpec, rng: random.Random) -> Conversation:
    """Multi-turn (1-3 rounds) VQA about one image, mix665k style; the tag goes in round one."""
    pool = [(q, a, a if a in ("Yes", "No") else f"{a}.") for q, a in _vqa_pool(spec, rng)]
    return vqa_conversation(pool, DETAIL_PROMPTS, describe_detail(spec), IMAGE_TAG, rng)


_OPPOSITES = {
    "big": "small", "hot": "cold", "up": "down", "left": "right", "fast": "slow",
    "light": "dark", "open": "closed", "old": "new", "happy": "sad", "early": "late",
}  # fmt: skip
_WORDS = ("cat", "tree", "house", "river", "apple", "light", "shape", "green", "music", "cloud")


def text_conversation(rng: random.Random) -> Conversation:
    """Text-only multi-turn chat (arithmetic and word questions), with no media tag."""
    turns: Turns = []
    for _ in range(rng.choice((1, 1, 2))):
        kind = rng.randrange(4)
        if kind == 0:
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            turns.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        elif kind == 1:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            turns.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
        elif kind == 2:
            word = rng.choice(sorted(_OPPOSITES))
            turns.append(
                (
                    f'What is the opposite of the word "{word}"?',
                    f'The opposite of "{word}" is "{_OPPOSITES[word]}".',
                )
            )
        else:
            word = rng.choice(_WORDS)
            turns.append(
                (
                    f'How many letters are in the word "{word}"?',
                    f'The word "{word}" has {NUMBER_WORDS[len(word)]} letters.',
                )
            )
    return plain_conversation(turns)
