"""Conversation templates: turn a LLaVA conversation into (prompt, answer) text pieces.

Training and inference share one builder (:func:`conversation_to_turns`), so the prompt the model
is trained on is byte-for-byte the prompt it sees at generation time. Labels are later built per
piece (prompt pieces masked, answer pieces learned), so they can never disagree with the text.

Conversation rules (validated, :class:`ConversationError` otherwise):

- roles: ``human``/``user`` and ``gpt``/``assistant``; a single leading ``system`` turn replaces
  the template's system prompt (ignored by templates without one, e.g. ``plain``);
- a leading assistant turn is dropped, as LLaVA does (it has no question to answer), unless it
  holds an ``<image>`` tag, which would then be lost: that is an error;
- after that, turns strictly alternate user/assistant; for training the conversation ends with an
  assistant turn, for generation it ends with the user turn to be answered;
- ``<image>`` and ``<video>`` tags stay wherever they are in the text (``plain`` keeps only the tags,
  in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from llava.constants import VISUAL_TAG_PATTERN

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})
SYSTEM_ROLE = "system"


class ConversationError(ValueError):
    """A conversation does not follow the rules in this module's docstring."""


@dataclass(frozen=True)
class ConversationTemplate:
    """How to render a conversation.

    ``style="plain"`` (pretraining) keeps only the image/video tags of the user turn and learns the
    caption plus ``sep``; ``style="two_sep"`` (Vicuna v1) renders
    ``{system}{sep}{user}: {q}{sep}{assistant}: {a}{sep2}`` per turn and learns each answer and
    the EOS that follows it (``sep2`` is the EOS's text, used only for display).
    """

    name: str
    style: Literal["plain", "two_sep"]
    system: str = ""
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    sep: str = " "
    sep2: str = "</s>"
    append_eos: bool = False


class Turn(NamedTuple):
    """One exchange: ``prompt`` is masked in the labels, ``answer`` is learned.

    ``answer`` is ``None`` for the final turn of a generation prompt (the model writes it).
    """

    prompt: str
    answer: str | None


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_TEMPLATES: dict[str, ConversationTemplate] = {
    "plain": ConversationTemplate(name="plain", style="plain", system="", sep="\n", sep2=""),
    "v1": ConversationTemplate(name="v1", style="two_sep", system=VICUNA_SYSTEM, append_eos=True),
}
_ALIASES = {"vicuna_v1": "v1"}


def available_templates() -> list[str]:
    """Names accepted by :func:`get_template` (aliases included)."""
    return sorted([*_TEMPLATES, *_ALIASES])


def get_template(name: str) -> ConversationTemplate:
    """Look a template up by name (``plain``, ``v1``/``vicuna_v1``)."""
    key = _ALIASES.get(name, name)
    if key not in _TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; available: {available_templates()}")
    return _TEMPLATES[key]


def normalise_conversation(
    conversation: list[dict], for_generation: bool = False
) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate roles and order; return (system override, [(role, text)]) with roles 'user'/'assistant'."""
    if not isinstance(conversation, list) or not conversation:
        raise ConversationError("conversations must be a non-empty list of turns")
    turns: list[tuple[str, str]] = []
    system: str | None = None
    for position, turn in enumerate(conversation):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"turn {position} must be a dict with 'from' and 'value'")
        role, text = turn["from"], turn["value"]
        if not isinstance(text, str):
            raise ConversationError(f"turn {position} value must be a string, got {type(text).__name__}")
        if role == SYSTEM_ROLE:
            if position != 0:
                raise ConversationError(f"a system turn is only allowed first (found at turn {position})")
            system = text
        elif role in USER_ROLES:
            turns.append(("user", text))
        elif role in ASSISTANT_ROLES:
            turns.append(("assistant", text))
        else:
            raise ConversationError(f"turn {position} has unknown role {role!r}")

    if turns and turns[0][0] == "assistant":
        tags = VISUAL_TAG_PATTERN.findall(turns[0][1])
        if tags:
            raise ConversationError(f"leading assistant turn holds {tags[0]}; it would be dropped")
        turns = turns[1:]
    if not turns:
        raise ConversationError("conversation has no user turn")
    for position, (role, _) in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(f"turns must alternate user/assistant; turn {position} is {role}")
    last_role = turns[-1][0]
    if for_generation and last_role != "user":
        raise ConversationError("a generation prompt must end with the user turn to answer")
    if not for_generation and last_role != "assistant":
        raise ConversationError("a training conversation must end with an assistant turn")
    return system, turns


def conversation_to_turns(
    template: ConversationTemplate, conversation: list[dict], for_generation: bool = False
) -> list[Turn]:
    """Render a LLaVA conversation (list of ``{"from", "value"}``) into :class:`Turn` pieces.

    With ``for_generation=True`` the conversation ends with a user turn and the last
    :class:`Turn` has ``answer=None``; its prompt ends where the model starts writing.
    """
    system, turns = normalise_conversation(conversation, for_generation)
    pairs = [(turns[i][1], turns[i + 1][1] if i + 1 < len(turns) else None) for i in range(0, len(turns), 2)]

    if template.style == "plain":
        if len(pairs) != 1:
            raise ConversationError(f"template 'plain' takes one user/assistant pair, got {len(pairs)}")
        question, caption = pairs[0]
        prompt = "".join(VISUAL_TAG_PATTERN.findall(question))
        return [Turn(prompt, None if caption is None else caption + template.sep)]

    system_text = template.system if system is None else system
    rendered: list[Turn] = []
    for position, (question, answer) in enumerate(pairs):
        head = system_text + template.sep if position == 0 and system_text else ""
        prompt = f"{head}{template.user_role}: {question}{template.sep}{template.assistant_role}:"
        rendered.append(Turn(prompt, None if answer is None else f" {answer}"))
    return rendered


def generation_turns(template: ConversationTemplate, conversation: list[dict]) -> list[Turn]:
    """Turns for inference: the conversation so far, ending with the user turn to answer."""
    return conversation_to_turns(template, conversation, for_generation=True)


def render_text(template: ConversationTemplate, turns: list[Turn]) -> str:
    """The full prompt as one string (``sep2`` standing for the EOS), for logs and debugging."""
    eos_text = template.sep2 if template.append_eos else ""
    return "".join(t.prompt + ("" if t.answer is None else t.answer + eos_text) for t in turns)
