"""LLaVA conversations through a tokenizer's own chat template (Qwen2.5-VL, LLaVA-NeXT), with assistant-only labels.

A LLaVA sample (``human``/``gpt`` turns, ``<image>`` tags) becomes chat messages whose content lists put
``{"type": "image"}`` where the tags were (:func:`chat_content`, shared with inference so training and
generation prompts are the same text). The template renders the whole conversation once; the text is
cut into prompt and answer pieces by rendering each prefix that ends before an assistant message (with
the generation prompt) and each prefix that ends after it, so the pieces are exactly the template's text
and the learned spans are exactly what the model writes after ``add_generation_prompt``: the answer and
its end-of-turn token, not the whitespace the template puts after it. Each piece is tokenized on its
own, so ids and labels cannot disagree.

Images go through the model's own image processor. By default (Qwen: dynamic resolution) each image's single
placeholder token is repeated once per merged visual token (``t * h * w / merge^2``), as Qwen's processor
does; a family with another layout passes ``image_inputs`` (LLaVA-NeXT: AnyRes views and each image's AnyRes
token count), and ``video_inputs`` likewise for videos (LLaVA-OneVision: frames and each video's token count).
Truncation never splits an image: an image that does not fit is dropped with its vision markers and everything
after it (with ``recount_kept_images``, the images kept are processed again on their own, for layouts where an
image's tokens depend on how many images its sample has).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from llava.constants import IGNORE_INDEX, IMAGE_TAG, VIDEO_TAG, VISUAL_TAG_PATTERN
from llava.data.images import load_image
from llava.data.qwen_video import batch_videos
from llava.data.templates import ConversationError, normalise_conversation
from llava.data.tokenization import NoLearnableTokensError

CHAT_TEMPLATE_VERSION = "chat_template"
"""``--version`` naming the tokenizer's own chat template (Qwen2.5-VL) instead of a LLaVA template."""


def chat_content(text: str) -> list[dict[str, str]]:
    """A user turn's content list: ``{"type": "image"}`` (``"video"``) at each ``<image>`` (``<video>``) tag,
    text pieces stripped (the newline LLaVA puts after a tag belongs to the tag), empty pieces dropped."""
    content: list[dict[str, str]] = []
    for chunk in VISUAL_TAG_PATTERN.split(text):
        if chunk in (IMAGE_TAG, VIDEO_TAG):
            content.append({"type": "image" if chunk == IMAGE_TAG else "video"})
        elif chunk.strip():
            content.append({"type": "text", "text": chunk.strip()})
    return content


def chat_messages(conversation: list[dict], content_lists: bool = False) -> list[dict[str, Any]]:
    """A LLaVA training conversation as chat messages (roles ``system``/``user``/``assistant``).

    User turns' content is a list of typed items (:func:`chat_content`); system and assistant turns' content is
    a string, or with ``content_lists`` a one-item list ``[{"type": "text", "text": ...}]`` (llava-hf's
    templates read every message's content as a list)."""
    system, turns = normalise_conversation(conversation, for_generation=False)

    def text_content(text: str) -> str | list[dict[str, str]]:
        return [{"type": "text", "text": text}] if content_lists else text

    messages: list[dict[str, Any]] = [] if system is None else [{"role": "system", "content": text_content(system)}]
    for role, text in turns:
        if role == "assistant" and VISUAL_TAG_PATTERN.search(text):
            raise ConversationError("an assistant turn holds an <image> or <video> tag")
        messages.append({"role": role, "content": chat_content(text) if role == "user" else text_content(text)})
    return messages


CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
"""Where a checkpoint keeps its processor's chat template (llava-hf, Qwen2.5-VL), newest format first."""
_PROBE_TEXT = "chat template probe"


def processor_chat_template(directory: str | Path) -> str | None:
    """The chat template a checkpoint's processor uses (``chat_template.jinja``, or the older
    ``chat_template.json``), ``None`` when the directory has neither. Multimodal checkpoints keep it there; their
    tokenizer's own template, when they have one, may not place images (LLaVA-OneVision's Qwen2 template)."""
    for name in CHAT_TEMPLATE_FILES:
        path = Path(directory) / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def template_reads_content_lists(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template renders a message's text only when its content is a list of typed
    items (llava-hf's templates silently drop string content); tried on one probe message."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE_TEXT}], tokenize=False)
    return _PROBE_TEXT not in rendered


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before a text when it adds special tokens (e.g. LLaMA's BOS; none for Qwen):
    what a processor's own tokenization adds in front of a rendered prompt at inference."""
    marked = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(marked) - len(plain) + 1):
        if marked[start : start + len(plain)] == plain:
            return list(marked[:start])
    return []


def template_pieces(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], answers_after_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, learned)`` pieces; the learned ones are the assistant answers.

    Raises :class:`ConversationError` when the template does not render prefixes as prefixes of the whole
    (a template that rewrites earlier turns cannot give per-turn labels). With
    ``answers_after_generation_prompt``, an assistant turn the template renders with another header than its
    generation prompt (e.g. a LLaVA-OneVision template rendering ``<|im_start|>assistant \n`` + answer, but
    ``<|im_start|>assistant\n`` as the generation prompt) is written as the generation prompt, then the answer
    as the template renders it from its text on: the learned tokens follow exactly the prompt inference uses.
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
        if answers_after_generation_prompt and full.startswith(turn) and not full.startswith(prompt):
            before, header, answer = _answer_after_generation_prompt(render, messages, index)
            learned = answer.rstrip()
            pieces += [(full[done : len(before)], False), (header, False), (learned, True)]
            pieces.append((answer[len(learned) :], False))
            done = len(turn)
            continue
        if not full.startswith(turn) or not full.startswith(prompt):
            raise ConversationError("the chat template does not render a conversation's prefixes as its prefixes")
        answer = full[answer_start : len(turn)]
        learned = answer.rstrip()
        pieces += [(full[done:answer_start], False), (learned, True), (answer[len(learned) :], False)]
        done = len(turn)
    pieces.append((full[done:], False))
    return [(text, learned) for text, learned in pieces if text]


ANSWER_SENTINEL = "\x00answer\x00"
"""Stands for an answer's text when finding where a template puts it."""


def _answer_after_generation_prompt(
    render: Callable[..., str], messages: list[dict[str, Any]], index: int
) -> tuple[str, str, str]:
    """Assistant message ``index`` as the text before it, its generation prompt's header and its answer as the
    template renders it from the text on (through the end-of-turn marker and whatever follows)."""
    before = render(messages[:index])
    prompt = render(messages[:index], generation_prompt=True)
    content = messages[index]["content"]
    text = content if isinstance(content, str) else "".join(item.get("text", "") for item in content)
    marked = render([*messages[:index], _with_text(messages[index], ANSWER_SENTINEL)])
    turn = render(messages[: index + 1])
    at = marked.find(ANSWER_SENTINEL, len(before))
    answer = marked[at + len(ANSWER_SENTINEL) :]
    if at < 0 or not (prompt.startswith(before) and marked.startswith(before)) or turn != marked[:at] + text + answer:
        raise ConversationError("the chat template does not render an answer's text as it is")
    return before, prompt[len(before) :], text + answer


def _with_text(message: dict[str, Any], text: str) -> dict[str, Any]:
    """``message`` with ``text`` as its content (a one-item list when its content is a list)."""
    content = text if isinstance(message["content"], str) else [{"type": "text", "text": text}]
    return {**message, "content": content}


class ImageInputs(NamedTuple):
    """A sample's images as the model takes them: ``tensors`` keyed as the model's arguments (``pixel_values*``
    hold ``rows[i]`` rows per image, one after the other; other tensors one row per image), ``tokens[i]`` the
    placeholders image ``i`` expands to."""

    tensors: dict[str, torch.Tensor]
    tokens: np.ndarray
    rows: np.ndarray


class _Visuals(NamedTuple):
    """One modality's inputs for a sample: its placeholder positions, per-item token and pixel-row counts and
    tensors."""

    slots: np.ndarray
    tokens: np.ndarray  # placeholders each item expands to
    rows: np.ndarray  # rows each item has in the ``pixel_values*`` tensors
    tensors: dict[str, torch.Tensor]  # keyed as the model takes them; per-row pixels first, per-item rows after

    @classmethod
    def empty(cls, slots: np.ndarray) -> _Visuals:
        nothing = np.zeros(0, dtype=np.int64)
        return cls(slots, nothing, nothing, {})


class ChatTemplateEncoder:
    """Builds ``{"input_ids", "labels"[, image inputs][, video inputs]}`` items for a chat-template model.

    ``image_token_id`` (``video_token_id``) is the model's image (video) placeholder, ``vision_start_id`` the
    opening marker dropped together with an image or video that truncation removes. Images go through
    ``image_inputs`` (loaded images -> :class:`ImageInputs`), by default Qwen's: ``image_processor``
    (``pixel_values``, ``image_grid_thw``), ``t * h * w / merge^2`` tokens per image. Videos go through
    ``video_loader``, a path -> :class:`~llava.data.qwen_video.QwenVideo` function (batched by
    :func:`~llava.data.qwen_video.batch_videos`). Without ``video_token_id`` samples with videos are refused;
    without ``video_loader`` they can be checked (:meth:`tokenize`) but not encoded.

    ``content_lists``: every message's content as a list (see :func:`chat_messages`); ``prefix_ids``: unlearned
    ids before the rendered conversation (what the tokenizer adds at inference, :func:`special_prefix`);
    ``answer_end_id``: appended (and learned) after every answer the template does not end with it (an end of
    sequence for templates that write none, so the model learns to stop).

    ``video_inputs``: a family's own video layout (video paths -> :class:`ImageInputs`, ``pixel_values_videos``
    rows per video), used instead of ``video_loader``. ``recount_kept_images``: when truncation drops some of a
    sample's images, ``image_inputs`` runs again on the kept ones and the cut is recomputed (LLaVA-OneVision: an
    image alone in its sample gets all its AnyRes views, an image among several only its base view; the
    per-sample tensors, e.g. ``batch_num_images``, then count the kept images). ``answers_after_generation_prompt``:
    see :func:`template_pieces`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        image_token_id: int,
        vision_start_id: int | None = None,
        max_length: int | None = None,
        video_token_id: int | None = None,
        video_loader: Callable[[str], Any] | None = None,
        image_inputs: Callable[[list[Any]], ImageInputs] | None = None,
        content_lists: bool = False,
        prefix_ids: Sequence[int] = (),
        answer_end_id: int | None = None,
        video_inputs: Callable[[list[str]], ImageInputs] | None = None,
        recount_kept_images: bool = False,
        answers_after_generation_prompt: bool = False,
    ) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        self.image_inputs = image_inputs
        self.content_lists = content_lists
        self.prefix_ids = list(prefix_ids)
        self.answer_end_id = answer_end_id
        self.video_inputs = video_inputs
        self.recount_kept_images = recount_kept_images
        self.answers_after_generation_prompt = answers_after_generation_prompt
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.vision_start_id = vision_start_id
        self.max_length = max_length
        self.video_token_id = video_token_id
        self.video_loader = video_loader

    def validate(self, conversation: list[dict]) -> None:
        """Raise :class:`ConversationError` for a conversation this encoder cannot train on."""
        self._check_videos(chat_messages(conversation, self.content_lists))

    def _check_videos(self, messages: list[dict[str, Any]]) -> None:
        has_video = any(
            isinstance(message["content"], list) and any(item["type"] == "video" for item in message["content"])
            for message in messages
        )
        if has_video and self.video_token_id is None:
            raise ConversationError("this model's data path takes no videos")

    def tokenize(self, conversation: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and labels with one placeholder per image and video (not expanded yet); placeholders are never
        learned."""
        return self._tokenize(chat_messages(conversation, self.content_lists))

    def _tokenize(self, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = list(self.prefix_ids)
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        pieces = template_pieces(self.tokenizer, messages, self.answers_after_generation_prompt)
        for text, learned in pieces:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if learned and self.answer_end_id is not None and (not piece or piece[-1] != self.answer_end_id):
                piece = [*piece, self.answer_end_id]
            ids += piece
            labels += piece if learned else [IGNORE_INDEX] * len(piece)
        ids_array = np.asarray(ids, dtype=np.int64)
        placeholders = [token for token in (self.image_token_id, self.video_token_id) if token is not None]
        return ids_array, np.where(np.isin(ids_array, placeholders), IGNORE_INDEX, np.asarray(labels, dtype=np.int64))

    def encode(
        self, conversation: list[dict], image_paths: Sequence[str], video_paths: Sequence[str] = ()
    ) -> dict[str, torch.Tensor]:
        """Token ids with expanded placeholders, assistant-only labels and the kept images' and videos' inputs."""
        messages = chat_messages(conversation, self.content_lists)  # built once: checked, then templated
        self._check_videos(messages)
        ids, labels = self._tokenize(messages)
        visuals = [self._images(ids, image_paths)]
        if self.video_token_id is not None:
            visuals.append(self._videos(ids, video_paths))
        lengths = np.ones(len(ids), dtype=np.int64)
        for visual in visuals:
            lengths[visual.slots] = visual.tokens
        keep = self._fitting_length(ids, lengths)
        if self.recount_kept_images:
            keep = self._recount_kept_images(ids, lengths, visuals, image_paths, keep)
        if not np.any(labels[:keep] != IGNORE_INDEX):
            raise NoLearnableTokensError(
                f"no learnable label left ({len(ids)} ids before expansion, max_length {self.max_length}, "
                f"{int(lengths.sum())} tokens expanded): answers are empty or truncated away"
            )
        item = {
            "input_ids": torch.from_numpy(np.repeat(ids[:keep], lengths[:keep])),
            "labels": torch.from_numpy(np.repeat(labels[:keep], lengths[:keep])),
        }
        for visual in visuals:
            kept = int(np.count_nonzero(visual.slots < keep))
            if kept:
                rows = int(visual.rows[:kept].sum())
                for key, tensor in visual.tensors.items():
                    item[key] = tensor[:rows] if key.startswith("pixel_values") else tensor[:kept]
        return item

    def _recount_kept_images(
        self, ids: np.ndarray, lengths: np.ndarray, visuals: list[_Visuals], paths: Sequence[str], keep: int
    ) -> int:
        """The cut once the images kept by ``keep`` are processed again on their own (``visuals[0]`` and
        ``lengths`` updated in place); repeated until no further image is dropped. A dropped image's placeholder
        never fits again."""
        while True:
            images = visuals[0]
            kept = int(np.count_nonzero(images.slots < keep))
            if kept in (0, len(images.tokens)):
                return keep
            recounted = self._images(ids, paths[:kept], images.slots[:kept])
            visuals[0] = recounted
            lengths[recounted.slots] = recounted.tokens
            lengths[images.slots[kept:]] = int(self.max_length or 0) + 1
            keep = self._fitting_length(ids, lengths)

    def _images(self, ids: np.ndarray, paths: Sequence[str], slots: np.ndarray | None = None) -> _Visuals:
        """The image placeholders (``slots``: given, or all of ``ids``') and inputs."""
        if slots is None:
            slots = self._slots(ids, self.image_token_id, len(paths), "image")
        if not paths:
            return _Visuals.empty(slots)
        images = [load_image(path) for path in paths]
        inputs = self.image_inputs(images) if self.image_inputs is not None else self._qwen_images(images)
        return _Visuals(slots, inputs.tokens, inputs.rows, inputs.tensors)

    def _qwen_images(self, images: list[Any]) -> ImageInputs:
        """Qwen's layout: every image's patches concatenated, one placeholder per merged patch."""
        processed = self.image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        patches = grid.prod(dim=-1).numpy()
        tensors = {"pixel_values": processed["pixel_values"], "image_grid_thw": grid}
        return ImageInputs(tensors, patches // self.image_processor.merge_size**2, patches)

    def _videos(self, ids: np.ndarray, paths: Sequence[str]) -> _Visuals:
        """The video placeholders and inputs (``video_inputs``', else Qwen's layout: one placeholder per merged
        patch)."""
        slots = self._slots(ids, self.video_token_id, len(paths), "video")
        if not paths:
            return _Visuals.empty(slots)
        if self.video_inputs is not None:
            inputs = self.video_inputs(list(paths))
            return _Visuals(slots, inputs.tokens, inputs.rows, inputs.tensors)
        if self.video_loader is None:
            raise ValueError("this encoder was built without a video_loader: it can check video samples, not load them")
        tensors = batch_videos([self.video_loader(path) for path in paths])
        patches = tensors["video_grid_thw"].prod(dim=-1).numpy()
        return _Visuals(slots, patches // self.image_processor.merge_size**2, patches, tensors)

    @staticmethod
    def _slots(ids: np.ndarray, token_id: int | None, expected: int, what: str) -> np.ndarray:
        slots = np.flatnonzero(ids == token_id) if token_id is not None else np.zeros(0, dtype=np.int64)
        if len(slots) != expected:
            raise ConversationError(f"{len(slots)} {what} placeholders after templating but {expected} {what}s")
        return slots

    def _fitting_length(self, ids: np.ndarray, lengths: np.ndarray) -> int:
        """How many ids (before expansion) fit ``max_length`` once placeholders are expanded; an image or video
        that does not fit whole is dropped with its opening marker and everything after it."""
        if self.max_length is None:
            return len(ids)
        keep = int(np.searchsorted(np.cumsum(lengths), self.max_length, side="right"))
        if keep < len(ids) and keep > 0 and lengths[keep] > 1 and ids[keep - 1] == self.vision_start_id:
            keep -= 1
        return keep
