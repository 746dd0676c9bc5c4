"""LLaVA-format supervised dataset, parsed once and stored compactly, tokenized lazily.

Samples are validated at init and re-serialized into ONE numpy byte buffer with int64 offsets
(plus numpy arrays of per-sample metadata) instead of a list of Python dicts: dataloader workers
fork the dataset, and touching millions of dicts would copy every page they live on into each
worker (refcount copy-on-write). Items are decoded, templated and tokenized in ``__getitem__``.

Rules for images, videos and tags: ``image`` may be a string or a list of strings, relative to
``image_folder``; ``video`` (Video-LLaVA) likewise, relative to ``video_folder``. The i-th ``<image>``
tag in the conversation is the i-th image, the i-th ``<video>`` tag the i-th video. A sample with
images but no tag gets one ``"<image>\\n"`` per image prepended to its first user turn (as LLaVA
does), and one ``"<video>\\n"`` per untagged video before those (Video-LLaVA puts the video first);
a sample with some tags but fewer than its images (videos) is ambiguous and is an error, as is a
sample with more tags than images (videos).

Errors raise :class:`DataError` naming the JSON file, sample id and index. With
``skip_bad_samples=True`` structurally invalid samples are dropped (counted and logged) at init,
and a sample that fails in ``__getitem__`` (bad image, nothing learnable) returns a
:class:`SkippedSample` marker that the collator drops and counts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from llava.constants import IMAGE_TAG, IMAGE_TOKEN_ID, VIDEO_TAG, VIDEO_TOKEN_ID
from llava.data.images import ASPECT_RATIOS, ImageError, load_and_preprocess
from llava.data.templates import (
    USER_ROLES,
    ConversationError,
    ConversationTemplate,
    conversation_to_turns,
    get_template,
)
from llava.data.tokenization import NoLearnableTokensError, tokenize_conversation
from llava.data.video import VIDEO_BACKENDS, VideoError, load_and_preprocess_videos

logger = logging.getLogger(__name__)

MAX_KEPT_PROBLEMS = 100
"""How many init-time problems are kept (with their messages) for reports; all are counted."""


class DataError(ValueError):
    """A data file or sample is invalid; the message names the file, sample id and index."""


@dataclass
class DataArguments:
    """Where the data lives and how samples become model inputs."""

    data_path: list[str] = field(
        default_factory=list, metadata={"help": "LLaVA JSON or JSONL files (several allowed)."}
    )
    image_folder: str | None = field(default=None, metadata={"help": "Root for relative image paths."})
    video_folder: str | None = field(default=None, metadata={"help": "Root for relative video paths."})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "'pad' (LLaVA-1.5) or 'square'."})
    version: str = field(
        default="v1",
        metadata={
            "help": "Conversation template: plain, v1/vicuna_v1; chat_template (the checkpoint's own: Qwen2.5-VL, "
            "LLaVA-NeXT)."
        },
    )
    model_max_length: int = field(default=2048, metadata={"help": "Max tokens, images expanded."})
    tokens_per_image: int = field(default=576, metadata={"help": "Visual tokens one image occupies."})
    num_frames: int = field(default=8, metadata={"help": "Frames sampled uniformly from each video."})
    tokens_per_video: int = field(
        default=8 * 257, metadata={"help": "Visual tokens one video occupies (frames x tokens per frame)."}
    )
    min_pixels: int | None = field(
        default=None, metadata={"help": "Qwen2.5-VL: fewest pixels an image is resized to (default: the checkpoint's)."}
    )
    max_pixels: int | None = field(
        default=None, metadata={"help": "Qwen2.5-VL: most pixels an image is resized to (default: the checkpoint's)."}
    )
    video_max_pixels: int | None = field(
        default=None, metadata={"help": "Qwen2.5-VL: most pixels per video frame (default 768 x 28 x 28, Qwen's)."}
    )
    video_backend: str = field(default="pyav", metadata={"help": "Video decoder: pyav | decord | auto."})
    skip_bad_samples: bool = field(default=False, metadata={"help": "Skip (and count) bad samples."})
    allow_outside_paths: bool = field(
        default=False,
        metadata={
            "help": "Trusted data only: let samples name absolute paths or paths outside --image_folder/--video_folder "
            "(by default a sample may only name files under its folder, symbolic links resolved)."
        },
    )
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "Batch image and text-only samples separately, by length."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.data_path, str):
            self.data_path = [self.data_path]
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {ASPECT_RATIOS}, got {self.image_aspect_ratio!r}")
        if min(self.tokens_per_image, self.tokens_per_video, self.model_max_length, self.num_frames) < 1:
            raise ValueError("tokens_per_image, tokens_per_video, num_frames and model_max_length must be positive")
        for name in ("min_pixels", "max_pixels", "video_max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if self.video_backend not in VIDEO_BACKENDS:
            raise ValueError(f"video_backend must be one of {VIDEO_BACKENDS}, got {self.video_backend!r}")


@dataclass(frozen=True)
class SkippedSample:
    """Marker returned by ``__getitem__`` in skip mode instead of a bad sample."""

    index: int
    sample_id: str
    reason: str


class SampleProblem(NamedTuple):
    """One invalid sample found while loading: where it is and what is wrong."""

    file: str
    index: int
    sample_id: str
    message: str

    def __str__(self) -> str:
        return f"{self.file} sample id={self.sample_id!r} (index {self.index}): {self.message}"


def _path_list(value: Any, key: str) -> list[str]:
    """``image``/``video`` as a list of paths; accepts a missing value, a string or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(path, str) and path for path in value):
        raise DataError(f"'{key}' must be a non-empty string or a list of non-empty strings")
    return value


def _place_tags(conversations: list[dict[str, str]], tag: str, count: int, what: str) -> list[dict[str, str]]:
    """Check the ``tag`` count against ``count`` files; prepend one tag per file to the first user turn
    when the conversation has none."""
    num_tags = sum(turn["value"].count(tag) for turn in conversations)
    if num_tags > count:
        raise DataError(f"{num_tags} {tag} tags but {count} {what}")
    if 0 < num_tags < count:
        raise DataError(f"{num_tags} {tag} tags for {count} {what}: cannot tell which is which")
    if count and num_tags == 0:
        first_user = next(i for i, turn in enumerate(conversations) if turn["from"] in USER_ROLES)
        conversations = [dict(turn) for turn in conversations]
        conversations[first_user]["value"] = (tag + "\n") * count + conversations[first_user]["value"]
    return conversations


def normalise_sample(
    raw: Any, template: ConversationTemplate | None, validate: Callable[[list[dict]], Any] | None = None
) -> dict[str, Any]:
    """Validate one raw LLaVA sample and return ``{"images", "videos", "conversations"}`` with tags in place.

    ``validate`` checks the conversation instead of ``template`` (a chat-template encoder's own rules).
    Raises :class:`DataError` (or :class:`ConversationError`) describing what is wrong.
    """
    if not isinstance(raw, dict):
        raise DataError(f"sample must be a JSON object, got {type(raw).__name__}")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError("sample has no 'conversations' list")
    images = _path_list(raw.get("image"), "image")
    videos = _path_list(raw.get("video"), "video")
    if validate is None:
        conversation_to_turns(template, conversations)  # validates roles, order and template rules
    conversations = _place_tags(conversations, IMAGE_TAG, len(images), "images")
    conversations = _place_tags(conversations, VIDEO_TAG, len(videos), "videos")
    if validate is not None:
        validate(conversations)
    return {"images": images, "videos": videos, "conversations": conversations}


class _MalformedLine(NamedTuple):
    """Placeholder for an unparseable JSONL line kept in skip mode, so indices stay aligned."""

    message: str


def _word_count(conversations: list[dict[str, str]]) -> int:
    """Whitespace words of all turns, image/video tags excluded (they are counted separately)."""
    return sum(len(turn["value"].replace(IMAGE_TAG, " ").replace(VIDEO_TAG, " ").split()) for turn in conversations)


def contained_path(folder: str | os.PathLike[str], name: str, what: str = "file") -> str:
    """``folder / name`` if it stays inside ``folder`` once symbolic links are resolved, else :class:`DataError`.

    Data sets come from strangers: a sample naming ``../secret.png`` or ``/etc/...`` must not be read unless
    the user vouches for the data (``--allow_outside_paths``).
    """
    root = os.path.realpath(folder)
    path = os.path.join(folder, name)
    resolved = os.path.realpath(path)
    if os.path.commonpath([root, resolved]) != root:
        raise DataError(
            f"{what} {name!r} is outside {root} (resolved to {resolved}); pass --allow_outside_paths for trusted data"
        )
    return path


def _decode(raw: bytes, path: str, line_number: int | None = None) -> str:
    """UTF-8 text of ``raw``, or :class:`DataError` naming the file and line of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = line_number if line_number is not None else raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8 ({error.reason} at byte {error.start})") from None


def read_samples(path: str, skip_bad: bool = False) -> list[Any]:
    """Parse a JSON list or JSONL file; malformed JSON or UTF-8 raises with file and line (and column).

    In skip mode a malformed JSONL line becomes a :class:`_MalformedLine` placeholder.
    """
    with open(path, "rb") as handle:
        if not path.endswith(".jsonl"):
            try:
                samples = json.loads(_decode(handle.read(), path))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}: malformed JSON at line {error.lineno} column {error.colno} "
                    f"(char {error.pos}): {error.msg}"
                ) from error
            if not isinstance(samples, list):
                raise DataError(f"{path}: top level must be a list of samples, got {type(samples).__name__}")
            return samples
        samples = []
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = _decode(raw, path, line_number)
                if not line.strip():
                    continue
                samples.append(json.loads(line))
            except (DataError, json.JSONDecodeError) as error:
                message = (
                    str(error).removeprefix(f"{path}: ")
                    if isinstance(error, DataError)
                    else f"malformed JSON at line {line_number} column {error.colno}: {error.msg}"
                )
                if not skip_bad:
                    raise DataError(f"{path}: {message}") from None
                samples.append(_MalformedLine(message))
        return samples


class SampleEncoder(Protocol):
    """Turns a normalised sample into model inputs (e.g. :class:`~llava.data.chat_template.ChatTemplateEncoder`)."""

    def validate(self, conversation: list[dict]) -> None:
        """Raise :class:`ConversationError` or :class:`DataError` for a conversation it cannot encode."""

    def encode(
        self, conversation: list[dict], image_paths: list[str], video_paths: list[str]
    ) -> dict[str, torch.Tensor]:
        """``input_ids``, ``labels`` and the pixel tensors of one sample."""


class LazySupervisedDataset(Dataset):
    """LLaVA / Video-LLaVA conversations; each item is
    ``{"input_ids", "labels"[, "pixel_values"][, "pixel_values_videos"]}``.

    ``sample_id`` is the sample's ``"id"`` (its index in the file when it has none).
    ``input_ids``/``labels`` are 1-D LongTensors with one ``image_token_id`` per image and one
    ``video_token_id`` per video; ``pixel_values`` is ``[num_images, 3, H, W]`` and
    ``pixel_values_videos`` ``[num_videos, frames, 3, H', W']``, each in sentinel order and absent
    when the sample has none. Videos are decoded here, in the data-loader workers, frame by frame
    (only the sampled frames are kept). ``video_processor`` defaults to ``image_processor``.

    With an ``encoder`` (a model family's own format, e.g. a chat template) samples are validated and
    encoded by it instead; file reading, path checks, skipping and error messages stay the same.
    """

    def __init__(
        self,
        data_args: DataArguments,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any = None,
        image_token_id: int = IMAGE_TOKEN_ID,
        video_processor: Any = None,
        video_token_id: int = VIDEO_TOKEN_ID,
        encoder: SampleEncoder | None = None,
    ) -> None:
        if not data_args.data_path:
            raise ValueError("DataArguments.data_path names no file")
        self.data_args = data_args
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.video_processor = video_processor if video_processor is not None else image_processor
        self.video_token_id = video_token_id
        self.encoder = encoder
        self.template = None if encoder is not None else get_template(data_args.version)
        self.files: list[str] = list(data_args.data_path)
        self.problems: list[SampleProblem] = []
        self.num_invalid_samples = 0
        self._load()

    def _load(self) -> None:
        """Parse and validate every file once; keep the normalised samples as bytes + numpy arrays."""
        chunks: list[bytes] = []
        file_ids: list[int] = []
        positions: list[int] = []
        word_counts: list[int] = []
        image_counts: list[int] = []
        video_counts: list[int] = []
        skip_bad = self.data_args.skip_bad_samples
        for file_id, path in enumerate(self.files):
            file_problems: list[SampleProblem] = []
            for index, raw in enumerate(read_samples(path, skip_bad)):
                sample_id = str(raw.get("id", index)) if isinstance(raw, dict) else str(index)
                try:
                    if isinstance(raw, _MalformedLine):
                        raise DataError(raw.message)
                    sample = normalise_sample(
                        raw, self.template, None if self.encoder is None else self.encoder.validate
                    )
                except (DataError, ConversationError) as error:
                    problem = SampleProblem(path, index, sample_id, str(error))
                    if not skip_bad:
                        raise DataError(str(problem)) from error
                    file_problems.append(problem)
                    continue
                sample["id"] = sample_id
                chunks.append(json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
                file_ids.append(file_id)
                positions.append(index)
                word_counts.append(_word_count(sample["conversations"]))
                image_counts.append(len(sample["images"]))
                video_counts.append(len(sample["videos"]))
            self._record_problems(file_problems)

        if not chunks:
            raise DataError(f"no valid samples in {self.files}")
        sizes = np.fromiter((len(chunk) for chunk in chunks), dtype=np.int64, count=len(chunks))
        self._offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        self._file_ids = np.asarray(file_ids, dtype=np.int32)
        self._positions = np.asarray(positions, dtype=np.int64)
        self._num_images = np.asarray(image_counts, dtype=np.int32)
        self._num_videos = np.asarray(video_counts, dtype=np.int32)
        words = np.maximum(np.asarray(word_counts, dtype=np.int64), 1)
        visual = self.data_args.tokens_per_image * self._num_images + self.data_args.tokens_per_video * self._num_videos
        estimated = words + visual
        self._modality_lengths = np.where(visual > 0, estimated, -estimated)
        if self.num_invalid_samples:
            logger.warning("skipped %d invalid samples while loading %s", self.num_invalid_samples, self.files)
        logger.info("loaded %d samples from %d files", len(self), len(self.files))

    def _record_problems(self, problems: list[SampleProblem]) -> None:
        for problem in problems:
            if self.num_invalid_samples < 10:
                logger.warning("skipping invalid sample: %s", problem)
            if len(self.problems) < MAX_KEPT_PROBLEMS:
                self.problems.append(problem)
            self.num_invalid_samples += 1

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def modality_lengths(self) -> np.ndarray:
        """Estimated lengths (words + visual tokens of images and videos), negative for text-only samples."""
        return self._modality_lengths

    @property
    def lengths(self) -> np.ndarray:
        """Estimated lengths regardless of modality."""
        return np.abs(self._modality_lengths)

    @property
    def num_images(self) -> np.ndarray:
        """Images per sample."""
        return self._num_images

    @property
    def num_videos(self) -> np.ndarray:
        """Videos per sample."""
        return self._num_videos

    def get_record(self, index: int) -> dict[str, Any]:
        """The normalised sample ``{"id", "images", "videos", "conversations"}`` (tags already in place)."""
        start, end = self._offsets[index], self._offsets[index + 1]
        return json.loads(self._buffer[start:end].tobytes().decode("utf-8"))

    def describe(self, index: int, sample_id: str | None = None) -> str:
        """``file sample id=... (index n)`` for messages; ``index`` is the position in its file."""
        if sample_id is None:
            sample_id = self.get_record(index)["id"]
        return f"{self.files[self._file_ids[index]]} sample id={sample_id!r} (index {self._positions[index]})"

    def image_paths(self, record: dict[str, Any]) -> list[str]:
        """Paths of a record's images under ``image_folder``; :class:`DataError` for one outside it."""
        return [self._inside(self.data_args.image_folder, path, "image") for path in record["images"]]

    def video_paths(self, record: dict[str, Any]) -> list[str]:
        """Paths of a record's videos under ``video_folder``; :class:`DataError` for one outside it."""
        return [self._inside(self.data_args.video_folder, path, "video") for path in record.get("videos", [])]

    def _inside(self, folder: str | None, name: str, what: str) -> str:
        path = os.path.join(folder, name) if folder else name
        if self.data_args.allow_outside_paths:
            return path
        return contained_path(folder or os.getcwd(), name, what)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        record = self.get_record(index)
        try:
            item: dict[str, Any] = self._build(record)
        except (DataError, ConversationError, NoLearnableTokensError, ImageError, VideoError) as error:
            message = f"{self.describe(index, record['id'])}: {error}"
            if not self.data_args.skip_bad_samples:
                raise DataError(message) from error
            logger.warning("skipping sample: %s", message)
            return SkippedSample(index=index, sample_id=record["id"], reason=message)
        item["sample_id"] = record["id"]  # travels with the batch, so a non-finite loss names its samples
        return item

    def _build(self, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.encoder is not None:
            return self.encoder.encode(record["conversations"], self.image_paths(record), self.video_paths(record))
        args = self.data_args
        turns = conversation_to_turns(self.template, record["conversations"])
        tokenized = tokenize_conversation(
            self.tokenizer,
            self.template,
            turns,
            max_length=args.model_max_length,
            tokens_per_image=args.tokens_per_image,
            image_token_id=self.image_token_id,
            tokens_per_video=args.tokens_per_video,
            video_token_id=self.video_token_id,
        )
        image_paths = self.image_paths(record)
        video_paths = self.video_paths(record)
        kept_images = image_paths[: len(image_paths) - tokenized["num_dropped_images"]]
        kept_videos = video_paths[: len(video_paths) - tokenized["num_dropped_videos"]]
        input_ids = torch.tensor(tokenized["input_ids"], dtype=torch.long)
        for what, token_id, kept in (
            ("image", self.image_token_id, kept_images),
            ("video", self.video_token_id, kept_videos),
        ):
            num_sentinels = int((input_ids == token_id).sum())
            if num_sentinels != len(kept):
                raise DataError(f"{num_sentinels} {what} slots but {len(kept)} {what}s after truncation")
        item = {"input_ids": input_ids, "labels": torch.tensor(tokenized["labels"], dtype=torch.long)}
        if kept_images:
            if self.image_processor is None:
                raise DataError("sample has images but the dataset was built without an image_processor")
            item["pixel_values"] = load_and_preprocess(kept_images, self.image_processor, args.image_aspect_ratio)
        if kept_videos:
            if self.video_processor is None:
                raise DataError("sample has videos but the dataset was built without a video (or image) processor")
            item["pixel_values_videos"] = load_and_preprocess_videos(
                kept_videos, self.video_processor, args.num_frames, args.video_backend
            )
        return item
