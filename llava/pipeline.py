"""What every model family's inference pipeline shares: requests, prompt text and ids, left padding and the
batched decode loop (:class:`GenerationPipeline`).

Prompts are built by the same code as training (:func:`~llava.data.templates.generation_turns` +
:func:`~llava.data.tokenization.tokenize_prompt`) so the model sees the prompt format it was trained
on. Batches are LEFT-padded: right padding puts pad tokens between the prompt and the generated
text and makes answers depend on the batch size (LLaVA #1928). Load a pipeline with
:func:`llava.inference.load_pipeline`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypedDict

import torch
from transformers import PreTrainedTokenizerBase

from llava.constants import IMAGE_TAG, VIDEO_TAG, VISUAL_TAG_PATTERN
from llava.data.chat_template import chat_content
from llava.data.templates import ConversationTemplate, generation_turns
from llava.data.tokenization import tokenize_prompt
from llava.model.fast_generation import FastDecoder
from llava.model.generation import use_fast_path
from llava.model.sampling import SamplingOptions

logger = logging.getLogger(__name__)

ImageSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None


class Request(TypedDict, total=False):
    """One generation request: ``image`` and ``video`` (each a path, a list of paths or ``None``) and
    ``prompt``; for a chat, ``history``: the earlier turns as ``(user text, answer)`` pairs, oldest first.

    The files are the whole conversation's, in the order of their tags: a history turn's ``<image>`` /
    ``<video>`` tags take the first files, and the ``prompt`` the rest (its tags placed as
    :func:`build_prompt_text` places them)."""

    image: ImageSpec
    video: ImageSpec
    prompt: str
    history: Sequence[tuple[str, str]]


class MissingComponentError(FileNotFoundError):
    """A model directory lacks the tokenizer or image processor needed for inference."""


def image_paths(image: ImageSpec, key: str = "image") -> list[str]:
    """Normalise a request's ``image`` (or ``video``) field to a list of path strings (empty if none)."""
    if image is None:
        return []
    if isinstance(image, str | os.PathLike):
        return [os.fspath(image)]
    if isinstance(image, Sequence):
        for index, path in enumerate(image):
            if not isinstance(path, str | os.PathLike):
                raise TypeError(f"'{key}'[{index}] must be a path, got {type(path).__name__} {path!r}")
        return [os.fspath(path) for path in image]
    raise TypeError(f"'{key}' must be a path, a list of paths or None, got {type(image).__name__}")


def _with_tags(prompt: str, tag: str, count: int, what: str) -> str:
    num_tags = prompt.count(tag)
    if num_tags == 0:
        return f"{tag}\n" * count + prompt
    if num_tags != count:
        raise ValueError(f"prompt holds {num_tags} {tag} tags but {count} {what} were given")
    return prompt


def build_prompt_text(prompt: str, num_images: int, num_videos: int = 0) -> str:
    """The user turn: ``prompt`` with one ``<image>\\n`` per image prepended when it has no image tag,
    and one ``<video>\\n`` per video before that when it has no video tag (as training data does).

    A prompt that already holds tags must hold exactly one per image (video): the tag decides where
    it goes, otherwise files and sentinels could not be matched.
    """
    prompt = _with_tags(prompt, IMAGE_TAG, num_images, "images")
    return _with_tags(prompt, VIDEO_TAG, num_videos, "videos")


class Conversation(NamedTuple):
    """A request's turns with every visual tag placed, and the files the tags stand for, in order."""

    turns: list[tuple[str, str]]  # (role "user" | "assistant", text), ending with the user turn to answer
    images: list[str]
    videos: list[str]


def conversation_of(request: Request) -> Conversation:
    """``request``'s history and prompt as turns; the prompt gets the tags of the files its history's tags do
    not take (:func:`build_prompt_text`). Raises ``ValueError`` on a malformed request or more tags than files."""
    if "prompt" not in request or not isinstance(request["prompt"], str):
        raise ValueError(f"request needs a string 'prompt': {request!r}")
    images, videos = image_paths(request.get("image")), image_paths(request.get("video"), key="video")
    turns: list[tuple[str, str]] = []
    for index, pair in enumerate(request.get("history") or ()):
        if not (isinstance(pair, Sequence) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise ValueError(f"history[{index}] must be a (user text, answer) pair of strings, got {pair!r}")
        if VISUAL_TAG_PATTERN.search(pair[1]):
            raise ValueError(f"history[{index}]: an answer holds an {IMAGE_TAG} or {VIDEO_TAG} tag")
        turns += [("user", pair[0]), ("assistant", pair[1])]
    history_images = sum(text.count(IMAGE_TAG) for _, text in turns)
    history_videos = sum(text.count(VIDEO_TAG) for _, text in turns)
    if history_images > len(images) or history_videos > len(videos):
        raise ValueError(
            f"the history holds {history_images} {IMAGE_TAG} and {history_videos} {VIDEO_TAG} tags but the request "
            f"has {len(images)} images and {len(videos)} videos"
        )
    prompt = build_prompt_text(request["prompt"], len(images) - history_images, len(videos) - history_videos)
    return Conversation([*turns, ("user", prompt)], images, videos)


class ChatRequest(NamedTuple):
    """A request as a chat-template model reads it: its messages and the files they name."""

    messages: list[dict[str, Any]]  # user content items typed, images and videos where their tags are
    images: list[str]
    videos: list[str]


def chat_request(request: Request) -> ChatRequest:
    """``request`` as messages for a checkpoint's chat template (images and videos where their tags are, else
    first, as :func:`build_prompt_text` places them) with its image and video files. Every content is a list
    of typed items: llava-hf's templates read lists, Qwen2.5-VL's read both."""
    turns, images, videos = conversation_of(request)
    messages = [
        {"role": role, "content": chat_content(text) if role == "user" else [{"type": "text", "text": text}]}
        for role, text in turns
    ]
    return ChatRequest(messages, images, videos)


def expand_placeholders(text: str, placeholder: str, counts: Iterator[int]) -> str:
    """``text`` with each ``placeholder`` repeated as many times as the next of ``counts`` says, in order (one
    placeholder per image or video in the rendered prompt, one per visual token in the model's input)."""
    parts = text.split(placeholder)
    return parts[0] + "".join(placeholder * next(counts) + part for part in parts[1:])


def build_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    template: ConversationTemplate,
    prompt: str,
    num_images: int,
    image_token_id: int,
    num_videos: int = 0,
    video_token_id: int | None = None,
) -> list[int]:
    """Token ids of a single-turn generation prompt, built exactly as training builds prompts."""
    conversation = [("user", build_prompt_text(prompt, num_images, num_videos))]
    return build_conversation_ids(tokenizer, template, conversation, image_token_id, video_token_id)


def build_conversation_ids(
    tokenizer: PreTrainedTokenizerBase,
    template: ConversationTemplate,
    turns: Sequence[tuple[str, str]],
    image_token_id: int,
    video_token_id: int | None = None,
) -> list[int]:
    """Token ids of a chat's generation prompt (``(role, text)`` turns ending with the user's, tags placed: see
    :func:`conversation_of`), built exactly as training builds multi-turn prompts."""
    conversation = [{"from": "human" if role == "user" else "gpt", "value": text} for role, text in turns]
    rendered = generation_turns(template, conversation)
    if video_token_id is None:
        return tokenize_prompt(tokenizer, template, rendered, image_token_id)
    return tokenize_prompt(tokenizer, template, rendered, image_token_id, video_token_id)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into ``(input_ids, attention_mask)`` of shape ``[B, max_len]`` (vectorised)."""
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
    if bool((lengths == 0).any()):
        raise ValueError("cannot pad an empty prompt")
    max_len = int(lengths.max())
    mask = torch.arange(max_len).unsqueeze(0) >= (max_len - lengths).unsqueeze(1)
    input_ids = torch.full((len(sequences), max_len), pad_id, dtype=torch.long)
    input_ids[mask] = torch.tensor([token for seq in sequences for token in seq], dtype=torch.long)
    return input_ids, mask.long()


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(kw_only=True)
class GenerationPipeline:
    """What every model family's pipeline shares: batching, device placement, the decode loop (eager or
    fast, with one :class:`FastDecoder` kept across batches) and turning tokens into text. A family
    supplies :meth:`prepare` (requests to model inputs) and its loader."""

    model: Any
    tokenizer: PreTrainedTokenizerBase
    fast_decoding: bool | None = None
    """Decode with static per-stage caches and CUDA graphs (``None``: on CUDA when the attention kernel
    allows it; ``False``: the eager loop). See :mod:`llava.model.fast_generation`."""
    _fast_decoder: FastDecoder | None = field(default=None, init=False, repr=False)

    def prepare(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Model inputs of a batch of requests (left-padded)."""
        raise NotImplementedError

    def sequence_lengths(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        """Each row's length in the language model's sequence at its first layer (text and visual tokens), of
        :meth:`prepare`'s output: what a context-length check compares. Families whose ids hold one slot per
        image (LLaVA-1.5) add the visual tokens a slot becomes; chat-template families expand them in the ids."""
        return inputs["attention_mask"].sum(dim=-1).tolist()

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.model.parameters()).device

    def fast_decoder(self) -> FastDecoder | None:
        """The decoder whose buffers and CUDA graphs are reused across batches, when fast decoding is on."""
        if not use_fast_path(self.model, self.device, True, self.fast_decoding, None):
            return None
        if self._fast_decoder is None or self._fast_decoder.model is not self.model:
            self._fast_decoder = FastDecoder(self.model)
        return self._fast_decoder

    def pad_id(self) -> int:
        """The id left padding and finished rows hold: the tokenizer's pad token, the config's, EOS or 0."""
        return self._pad_id()

    def eos_ids(self) -> list[int]:
        """The ids that end an answer (the tokenizer's EOS)."""
        return self._eos_ids()

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.model.config.text_config.pad_token_id):
            if candidate is not None:
                return candidate
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0

    def _eos_ids(self) -> list[int]:
        return [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

    def pixel_dtype(self) -> torch.dtype:
        """The dtype pixel inputs are cast to (the vision side's)."""
        return next(self.model.parameters()).dtype

    def to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model inputs on the model's device, pixels in :meth:`pixel_dtype`."""
        device = self.device
        return {
            key: value.to(device=device, dtype=self.pixel_dtype())
            if key.startswith("pixel_values")
            else value.to(device)
            for key, value in inputs.items()
        }

    def generate(
        self,
        requests: Sequence[Request],
        max_new_tokens: int = 64,
        batch_size: int = 8,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        progress: Any = None,
    ) -> list[str]:
        """Answer ``requests`` (``{"image": path | [paths] | None, "video": ..., "prompt": str}``) in order.

        Greedy answers do not depend on ``batch_size``. ``seed`` seeds the sampling generator
        (one per call). ``progress`` (optional) is called with the number of requests done per batch,
        e.g. a tqdm bar's ``update``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        device = self.device
        generator = None
        if do_sample and seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        eos_ids = self._eos_ids()
        fast_decoder = self.fast_decoder()
        sampling = SamplingOptions(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            eos_token_id=eos_ids,
            pad_token_id=self._pad_id(),
            generator=generator,
            fast=self.fast_decoding if fast_decoder is None else True,
        )
        answers: list[str] = []
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            inputs = self.to_device(self.prepare(batch))
            new_tokens = self.model.generate(**inputs, sampling=sampling, fast_decoder=fast_decoder)
            answers.extend(self._decode(new_tokens.cpu(), eos_ids))
            if progress is not None:
                progress(len(batch))
        return answers

    def _decode(self, new_tokens: torch.Tensor, eos_ids: Sequence[int]) -> list[str]:
        """Text of each row up to (excluding) its first EOS, special tokens skipped."""
        stops = set(eos_ids)
        rows = []
        for row in new_tokens.tolist():
            cut = next((index for index, token in enumerate(row) if token in stops), len(row))
            rows.append(row[:cut])
        return [text.strip() for text in self.tokenizer.batch_decode(rows, skip_special_tokens=True)]
