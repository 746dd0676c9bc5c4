"""LLaVA conversations through a tokenizer's own chat template (Qwen2.5-VL), with assistant-only labels.

A LLaVA sample (``human``/``gpt`` turns, ``<image>`` tags) becomes chat messages whose content lists put
``{"type": "image"}`` where the tags were (:func:`chat_content`, shared with inference so training and
generation prompts are the same text). The template renders the whole conversation once; the text is
cut into prompt and answer pieces by rendering each prefix that ends before an assistant message (with
the generation prompt) and each prefix that ends after it, so the pieces are exactly the template's text
and the learned spans are exactly what the model writes after ``add_generation_prompt``: the answer and
its end-of-turn token, not the whitespace the template puts after it. Each piece is tokenized on its
own, so ids and labels cannot disagree.

Images go through the model's own image processor (Qwen: dynamic resolution); each image's single
placeholder token is repeated once per merged visual token (``t * h * w / merge^2``), as Qwen's processor
does. Truncation never splits an image: an image that does not fit is dropped with its vision markers
and everything after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from llava.constants import IGNORE_INDEX, IMAGE_TAG, VIDEO_TAG, VISUAL_TAG_PATTERN
from llava.data.images import load_image
from llava.data.templates import ConversationError, normalise_conversation
from llava.data.tokenization import NoLearnableTokensError

CHAT_TEMPLATE_VERSION = "chat_template"
"""``--version`` naming the tokenizer's own chat template (Qwen2.5-VL) instead of a LLaVA template."""


def chat_content(text: str) -> list[dict[str, str]]:
    """A user turn's content list: ``{"type": "image"}`` at each ``<image>`` tag, text pieces stripped (the
    newline LLaVA puts after a tag belongs to the tag), empty pieces dropped."""
    content: list[dict[str, str]] = []
    for chunk in VISUAL_TAG_PATTERN.split(text):
        if chunk == IMAGE_TAG:
            content.append({"type": "image"})
        elif chunk == VIDEO_TAG:
            raise ConversationError("videos are not supported with chat templates (Qwen2.5-VL) yet")
        elif chunk.strip():
            content.append({"type": "text", "text": chunk.strip()})
    return content


def chat_messages(conversation: list[dict]) -> list[dict[str, Any]]:
    """A LLaVA training conversation as chat messages (roles ``system``/``user``/``assistant``)."""
    system, turns = normalise_conversation(conversation, for_generation=False)
    messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": system}]
    for role, text in turns:
        if role == "assistant" and VISUAL_TAG_PATTERN.search(text):
            raise ConversationError("an assistant turn holds an <image> or <video> tag")
        messages.append({"role": role, "content": chat_content(text) if role == "user" else text})
    return messages


def template_pieces(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, learned)`` pieces; the learned ones are the assistant answers.

    Raises :class:`ConversationError` when the template does not render prefixes as prefixes of the whole
    (a template that rewrites earlier turns cannot give per-turn labels).
    """

    def render(prefix: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(messages)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], generation_prompt=True)
        turn = render(messages[: index + 1])
        answer_start = len(prompt)
        if not full.startswith(turn) or not full.startswith(prompt):
            raise ConversationError("the chat template does not render a conversation's prefixes as its prefixes")
        answer = full[answer_start : len(turn)]
        learned = answer.rstrip()
        pieces += [(full[done:answer_start], False), (learned, True), (answer[len(learned) :], False)]
        done = len(turn)
    pieces.append((full[done:], False))
    return [(text, learned) for text, learned in pieces if text]


class ChatTemplateEncoder:
    """Builds ``{"input_ids", "labels"[, "pixel_values", "image_grid_thw"]}`` items for a chat-template model.

    ``image_token_id`` is the model's placeholder (``<|image_pad|>``); ``vision_start_id`` its opening
    marker, dropped together with an image that truncation removes.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        image_token_id: int,
        vision_start_id: int | None = None,
        max_length: int | None = None,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.vision_start_id = vision_start_id
        self.max_length = max_length

    def validate(self, conversation: list[dict]) -> None:
        """Raise :class:`ConversationError` for a conversation this encoder cannot train on."""
        chat_messages(conversation)

    def tokenize(self, conversation: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and labels with one placeholder per image (not expanded yet); placeholders are never learned."""
        ids: list[int] = []
        labels: list[int] = []
        for text, learned in template_pieces(self.tokenizer, chat_messages(conversation)):
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
        ids_array = np.asarray(ids, dtype=np.int64)
        return ids_array, np.where(ids_array == self.image_token_id, IGNORE_INDEX, np.asarray(labels, dtype=np.int64))

    def encode(
        self, conversation: list[dict], image_paths: Sequence[str], video_paths: Sequence[str] = ()
    ) -> dict[str, torch.Tensor]:
        """Token ids with expanded image placeholders, assistant-only labels and the kept images' pixels."""
        if video_paths:
            raise ConversationError("videos are not supported with chat templates (Qwen2.5-VL) yet")
        ids_array, labels_array = self.tokenize(conversation)
        slots = np.flatnonzero(ids_array == self.image_token_id)
        if len(slots) != len(image_paths):
            raise ConversationError(f"{len(slots)} image placeholders after templating but {len(image_paths)} images")
        pixels = grid = None
        counts = np.zeros(0, dtype=np.int64)
        if image_paths:
            processed = self.image_processor(images=[load_image(path) for path in image_paths], return_tensors="pt")
            pixels, grid = processed["pixel_values"], processed["image_grid_thw"]
            counts = (grid.prod(dim=-1) // self.image_processor.merge_size**2).numpy()
        num_ids = len(ids_array)
        keep_ids, kept_images = self._truncate(ids_array, slots, counts)
        ids_array, labels_array = ids_array[:keep_ids], labels_array[:keep_ids]
        if not np.any(labels_array != IGNORE_INDEX):
            raise NoLearnableTokensError(
                f"no learnable label left ({num_ids} ids before expansion, max_length {self.max_length}, images of "
                f"{counts.tolist()} tokens): answers are empty or truncated away"
            )
        repeats = np.ones(len(ids_array), dtype=np.int64)
        repeats[slots[:kept_images]] = counts[:kept_images]
        item = {
            "input_ids": torch.from_numpy(np.repeat(ids_array, repeats)),
            "labels": torch.from_numpy(np.repeat(labels_array, repeats)),
        }
        if kept_images:
            patches = int(grid[:kept_images].prod(dim=-1).sum())
            item["pixel_values"] = pixels[:patches]
            item["image_grid_thw"] = grid[:kept_images]
        return item

    def _truncate(self, ids: np.ndarray, slots: np.ndarray, counts: np.ndarray) -> tuple[int, int]:
        """How many ids (before expansion) and images fit ``max_length`` once each placeholder is expanded."""
        if self.max_length is None:
            return len(ids), len(slots)
        lengths = np.ones(len(ids), dtype=np.int64)
        lengths[slots] = counts
        keep = int(np.searchsorted(np.cumsum(lengths), self.max_length, side="right"))
        kept_images = int(np.count_nonzero(slots < keep))
        # The dropped image's opening marker goes with it.
        if kept_images < len(slots) and keep > 0 and ids[keep - 1] == self.vision_start_id:
            keep -= 1
        return keep, kept_images
