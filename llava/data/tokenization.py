"""Tokenize template turns into ``input_ids``/``labels`` with one sentinel id per image or video.

Every text piece is tokenized on its own and labels are built from the same pieces as the ids
(prompt pieces -> IGNORE_INDEX, answer pieces -> their ids), so the two cannot disagree: there is
no "tokenization mismatch" path that silently masks a sample. Truncation counts each sentinel as
the visual tokens the model will put in its place (``tokens_per_image``, ``tokens_per_video``), and
never splits an image or a video.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np
from transformers import PreTrainedTokenizerBase

from llava.constants import IGNORE_INDEX, IMAGE_TAG, IMAGE_TOKEN_ID, VIDEO_TAG, VIDEO_TOKEN_ID, VISUAL_TAG_PATTERN
from llava.data.templates import ConversationTemplate, Turn


class NoLearnableTokensError(ValueError):
    """Every label is IGNORE_INDEX (e.g. the answers were truncated away): the sample would train nothing."""


class TokenizedConversation(TypedDict):
    """Token ids and labels of one sample, plus how many trailing images and videos truncation removed."""

    input_ids: list[int]
    labels: list[int]
    num_dropped_images: int
    num_dropped_videos: int


def tokenize_text_with_images(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
) -> list[int]:
    """Tokenize ``text`` without special tokens, replacing each ``<image>`` tag by ``image_token_id``
    and each ``<video>`` tag by ``video_token_id``."""
    ids: list[int] = []
    for chunk in VISUAL_TAG_PATTERN.split(text):
        if chunk == IMAGE_TAG:
            ids.append(image_token_id)
        elif chunk == VIDEO_TAG:
            ids.append(video_token_id)
        elif chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _eos(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the template appends EOS after answers but the tokenizer has no eos_token_id")
    return tokenizer.eos_token_id


def visual_lengths(
    input_ids: list[int] | np.ndarray,
    tokens_per_image: int,
    image_token_id: int = IMAGE_TOKEN_ID,
    tokens_per_video: int = 1,
    video_token_id: int = VIDEO_TOKEN_ID,
) -> np.ndarray:
    """Per-position length once the model expands sentinels: ``tokens_per_image`` for an image
    sentinel, ``tokens_per_video`` for a video sentinel, else 1."""
    ids = np.asarray(input_ids, dtype=np.int64)
    lengths = np.where(ids == image_token_id, tokens_per_image, 1)
    return np.where(ids == video_token_id, tokens_per_video, lengths)


def truncate(
    input_ids: list[int],
    labels: list[int],
    max_length: int,
    tokens_per_image: int,
    image_token_id: int = IMAGE_TOKEN_ID,
    tokens_per_video: int = 1,
    video_token_id: int = VIDEO_TOKEN_ID,
) -> TokenizedConversation:
    """Cut from the end so the expanded length fits ``max_length``; an image or video that does not fit
    whole is dropped with everything after it, and the numbers of dropped images and videos are reported."""
    ids = np.asarray(input_ids, dtype=np.int64)
    lengths = visual_lengths(ids, tokens_per_image, image_token_id, tokens_per_video, video_token_id)
    keep = int(np.searchsorted(np.cumsum(lengths), max_length, side="right"))
    return TokenizedConversation(
        input_ids=list(input_ids[:keep]),
        labels=list(labels[:keep]),
        num_dropped_images=int(np.count_nonzero(ids[keep:] == image_token_id)),
        num_dropped_videos=int(np.count_nonzero(ids[keep:] == video_token_id)),
    )


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: ConversationTemplate,
    turns: list[Turn],
    max_length: int | None = None,
    tokens_per_image: int = 1,
    image_token_id: int = IMAGE_TOKEN_ID,
    tokens_per_video: int = 1,
    video_token_id: int = VIDEO_TOKEN_ID,
) -> TokenizedConversation:
    """Build ``input_ids`` and ``labels`` for training from :func:`conversation_to_turns` output.

    BOS is prepended explicitly; with ``template.append_eos`` the tokenizer's EOS id follows every
    answer and is learned. ``max_length`` (in expanded tokens) truncates via :func:`truncate`.
    Raises :class:`NoLearnableTokensError` if nothing is left to learn.
    """
    input_ids = _bos(tokenizer)
    labels = [IGNORE_INDEX] * len(input_ids)
    for turn in turns:
        if turn.answer is None:
            raise ValueError("training turns need an answer; use tokenize_prompt for generation")
        prompt_ids = tokenize_text_with_images(tokenizer, turn.prompt, image_token_id, video_token_id)
        answer_ids = tokenize_text_with_images(tokenizer, turn.answer, image_token_id, video_token_id)
        if template.append_eos:
            answer_ids.append(_eos(tokenizer))
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids)
        labels += [IGNORE_INDEX if i in (image_token_id, video_token_id) else i for i in answer_ids]

    result = TokenizedConversation(input_ids=input_ids, labels=labels, num_dropped_images=0, num_dropped_videos=0)
    if max_length is not None:
        result = truncate(
            input_ids, labels, max_length, tokens_per_image, image_token_id, tokens_per_video, video_token_id
        )
    if not np.any(np.asarray(result["labels"], dtype=np.int64) != IGNORE_INDEX):
        raise NoLearnableTokensError(
            f"no learnable label left (length {len(input_ids)} ids, max_length {max_length}, "
            f"{tokens_per_image} tokens per image, {tokens_per_video} per video): answers are empty or truncated away"
        )
    return result


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase,
    template: ConversationTemplate,
    turns: list[Turn],
    image_token_id: int = IMAGE_TOKEN_ID,
    video_token_id: int = VIDEO_TOKEN_ID,
) -> list[int]:
    """Token ids of a generation prompt (:func:`generation_turns` output), built exactly as in training."""
    input_ids = _bos(tokenizer)
    for turn in turns:
        input_ids += tokenize_text_with_images(tokenizer, turn.prompt, image_token_id, video_token_id)
        if turn.answer is not None:
            input_ids += tokenize_text_with_images(tokenizer, turn.answer, image_token_id, video_token_id)
            if template.append_eos:
                input_ids.append(_eos(tokenizer))
    return input_ids
