"""Conversation templates and tokenization: what is learned, what is masked, how truncation cuts."""

from __future__ import annotations

import numpy as np
import pytest

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from llava.data.templates import (
    VICUNA_SYSTEM,
    ConversationError,
    conversation_to_turns,
    generation_turns,
    get_template,
    render_text,
)
from llava.data.tokenization import (
    NoLearnableTokensError,
    tokenize_conversation,
    tokenize_prompt,
    truncate,
)
from llava.playground.tokenizer import train_playground_tokenizer

CORPUS = [
    VICUNA_SYSTEM,
    "USER: What is in the picture? ASSISTANT: A cat sits on a red mat.",
    "Is it sleeping? Yes, the cat is asleep. Describe the scene in detail.",
    "A dog runs in the park. Compare the two images. The first is brighter.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_playground_tokenizer(CORPUS * 4, vocab_size=400)


def learned_spans(tokenizer, labels: list[int]) -> list[str]:
    """Decode every contiguous run of learned labels."""
    labels_array = np.asarray(labels)
    learned = np.concatenate([[False], labels_array != IGNORE_INDEX, [False]])
    edges = np.flatnonzero(np.diff(learned.astype(np.int8)))
    return [tokenizer.decode(labels[start:end]) for start, end in zip(edges[::2], edges[1::2], strict=True)]


def two_turn_conversation() -> list[dict]:
    return [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": "A cat sits on a red mat."},
        {"from": "human", "value": "Is it sleeping?"},
        {"from": "gpt", "value": "Yes, the cat is asleep."},
    ]


def test_registry_aliases_and_unknown_names():
    assert get_template("vicuna_v1") is get_template("v1")
    with pytest.raises(KeyError, match="unknown conversation template"):
        get_template("llama_2")


def test_v1_renders_the_llava_prompt_string():
    template = get_template("v1")
    turns = conversation_to_turns(template, two_turn_conversation())
    assert render_text(template, turns) == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is in the picture? ASSISTANT: A cat sits on a red mat.</s>"
        "USER: Is it sleeping? ASSISTANT: Yes, the cat is asleep.</s>"
    )


def test_v1_learns_exactly_the_answers_and_their_eos(tokenizer):
    template = get_template("v1")
    tokenized = tokenize_conversation(tokenizer, template, conversation_to_turns(template, two_turn_conversation()))
    ids, labels = tokenized["input_ids"], tokenized["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids.count(IMAGE_TOKEN_ID) == 1
    assert labels[ids.index(IMAGE_TOKEN_ID)] == IGNORE_INDEX
    assert learned_spans(tokenizer, labels) == ["A cat sits on a red mat.</s>", "Yes, the cat is asleep.</s>"]
    assert [label for label in labels if label == tokenizer.eos_token_id] == [tokenizer.eos_token_id] * 2


def test_plain_keeps_only_the_image_and_learns_the_caption(tokenizer):
    template = get_template("plain")
    conversation = [
        {"from": "human", "value": "<image>\nDescribe the scene in detail."},
        {"from": "gpt", "value": "A dog runs in the park."},
    ]
    tokenized = tokenize_conversation(tokenizer, template, conversation_to_turns(template, conversation))
    assert tokenized["input_ids"][:2] == [tokenizer.bos_token_id, IMAGE_TOKEN_ID]
    assert learned_spans(tokenizer, tokenized["labels"]) == ["A dog runs in the park.\n"]
    assert tokenizer.eos_token_id not in tokenized["input_ids"]


def test_plain_rejects_multi_turn():
    with pytest.raises(ConversationError, match="one user/assistant pair"):
        conversation_to_turns(get_template("plain"), two_turn_conversation())


def test_image_tags_stay_where_they_are(tokenizer):
    template = get_template("v1")
    conversation = [
        {"from": "user", "value": "Compare <image> and <image> please."},
        {"from": "assistant", "value": "The first is brighter."},
    ]
    ids = tokenize_conversation(tokenizer, template, conversation_to_turns(template, conversation))["input_ids"]
    first, second = np.flatnonzero(np.asarray(ids) == IMAGE_TOKEN_ID)
    assert tokenizer.decode(ids[first + 1 : second]).strip() == "and"


def test_system_turn_replaces_the_default_system_prompt():
    template = get_template("v1")
    turns = conversation_to_turns(
        template,
        [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    )
    assert render_text(template, turns) == "Be brief. USER: Hi ASSISTANT: Hello</s>"


def test_leading_assistant_turn_is_dropped():
    template = get_template("v1")
    turns = conversation_to_turns(template, [{"from": "gpt", "value": "Hi!"}, *two_turn_conversation()])
    assert turns == conversation_to_turns(template, two_turn_conversation())


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ([{"from": "gpt", "value": "<image>"}, *two_turn_conversation()], "leading assistant turn"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "alternate"),
        ([{"from": "human", "value": "a"}], "end with an assistant turn"),
        ([{"from": "robot", "value": "a"}], "unknown role"),
        ([{"from": "human", "value": "a"}, {"from": "system", "value": "s"}], "system turn is only allowed first"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], "must be a string"),
        ([], "non-empty list"),
    ],
)
def test_invalid_conversations_are_rejected(conversation, message):
    with pytest.raises(ConversationError, match=message):
        conversation_to_turns(get_template("v1"), conversation)


@pytest.mark.parametrize("name", ["v1", "plain"])
def test_generation_prompt_is_the_training_prefix(tokenizer, name):
    """Training and inference share the prompt builder: the generation prompt is exactly the
    training ids up to where the final answer begins."""
    template = get_template(name)
    conversation = two_turn_conversation() if name == "v1" else two_turn_conversation()[:2]
    training = tokenize_conversation(tokenizer, template, conversation_to_turns(template, conversation))
    prompt_ids = tokenize_prompt(tokenizer, template, generation_turns(template, conversation[:-1]))
    final_answer_start = max(np.flatnonzero(np.asarray(training["labels"]) == IGNORE_INDEX)) + 1
    assert prompt_ids == training["input_ids"][:final_answer_start]
    with pytest.raises(ConversationError, match="end with the user turn"):
        generation_turns(template, conversation)


def test_truncation_never_splits_an_image():
    ids = [1, IMAGE_TOKEN_ID, 5, 6, IMAGE_TOKEN_ID, 7, 8]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, 8]
    # expanded lengths: 1 + 10 + 1 + 1 + 10 + 1 + 1 = 25; 20 ends inside the second image
    cut = truncate(ids, labels, max_length=20, tokens_per_image=10)
    assert cut["input_ids"] == [1, IMAGE_TOKEN_ID, 5, 6]
    assert cut["labels"] == [IGNORE_INDEX, IGNORE_INDEX, 5, 6]
    assert cut["num_dropped_images"] == 1
    assert truncate(ids, labels, max_length=25, tokens_per_image=10)["num_dropped_images"] == 0


def test_all_masked_after_truncation_raises(tokenizer):
    template = get_template("v1")
    turns = conversation_to_turns(template, two_turn_conversation())
    with pytest.raises(NoLearnableTokensError, match="no learnable label"):
        tokenize_conversation(tokenizer, template, turns, max_length=40, tokens_per_image=576)
