"""Reusable inference API: load a checkpoint once, answer batches of (image(s)/video(s), prompt) requests.

Prompts are built by the same code as training (:func:`~llava.data.templates.generation_turns` +
:func:`~llava.data.tokenization.tokenize_prompt`) so the model sees the prompt format it was trained
on. Batches are LEFT-padded: right padding puts pad tokens between the prompt and the generated
text and makes answers depend on the batch size (LLaVA #1928).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llava.constants import IMAGE_TAG, VIDEO_PROCESSOR_DIR, VIDEO_TAG
from llava.data.images import load_and_preprocess
from llava.data.templates import ConversationTemplate, generation_turns, get_template
from llava.data.tokenization import tokenize_prompt
from llava.data.video import load_and_preprocess_videos
from llava.hf_adapter import load_image_processor
from llava.model.fast_generation import FastDecoder
from llava.model.generation import use_fast_path
from llava.model.loading import load_pretrained_model, read_config_json, read_model_type
from llava.model.modeling import DuetLlavaForCausalLM
from llava.model.qwen_vl import QWEN_MODEL_TYPES

logger = logging.getLogger(__name__)

ImageSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class Request(TypedDict, total=False):
    """One generation request: ``image`` and ``video`` (each a path, a list of paths or ``None``) and
    ``prompt``."""

    image: ImageSpec
    video: ImageSpec
    prompt: str


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
    conversation = [{"from": "human", "value": build_prompt_text(prompt, num_images, num_videos)}]
    turns = generation_turns(template, conversation)
    if video_token_id is None:
        return tokenize_prompt(tokenizer, template, turns, image_token_id)
    return tokenize_prompt(tokenizer, template, turns, image_token_id, video_token_id)


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


def _has_any(path: Path, names: Sequence[str]) -> bool:
    return any((path / name).is_file() for name in names)


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
        answers: list[str] = []
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            inputs = self.to_device(self.prepare(batch))
            new_tokens = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                eos_token_id=eos_ids,
                pad_token_id=self._pad_id(),
                generator=generator,
                fast=self.fast_decoding if fast_decoder is None else True,
                fast_decoder=fast_decoder,
            )
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


@dataclass(kw_only=True)
class LlavaPipeline(GenerationPipeline):
    """Model + tokenizer + image (and video) processor + conversation template, ready to answer requests."""

    model: DuetLlavaForCausalLM
    image_processor: Any
    template: ConversationTemplate
    image_aspect_ratio: str = "pad"
    video_processor: Any = None
    video_backend: str = "pyav"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        vision_tower: str | None = None,
        compression: Any = None,
        fast_decoding: bool | None = None,
    ) -> GenerationPipeline:
        """Load a checkpoint directory (any layout :func:`load_pretrained_model` accepts).

        ``compression`` (a preset name, YAML path or dict) overrides the visual-token compression
        the checkpoint was trained with; ``"none"`` turns it off.

        The tokenizer and image processor are read from ``path`` (training's final save writes
        them there); for original LLaVA checkpoints the image processor comes from
        ``vision_tower``. A missing component raises :class:`MissingComponentError` naming it.
        ``dtype`` defaults to float32; ``device`` to CUDA when available. ``fast_decoding``: see the field.
        A Qwen2.5-VL checkpoint (``model_type`` ``qwen2_5_vl``) gives a
        :class:`~llava.inference_qwen.QwenVLPipeline` with the same ``generate``.
        """
        model_dir = Path(path)
        if (model_dir / "config.json").is_file() and read_model_type(model_dir) in QWEN_MODEL_TYPES:
            from llava.inference_qwen import QwenVLPipeline

            return QwenVLPipeline.from_pretrained(
                model_dir, dtype=dtype, device=device, compression=compression, fast_decoding=fast_decoding
            )
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        if not (model_dir / "config.json").is_file():
            hint = ""
            if (model_dir / "adapter_config.json").is_file():
                hint = " It holds a LoRA adapter: merge it first with `python -m llava.tools.merge_lora`."
            raise MissingComponentError(f"{model_dir} has no config.json, so it is not a model checkpoint.{hint}")
        if not _has_any(model_dir, _TOKENIZER_FILES):
            raise MissingComponentError(
                f"{model_dir} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                "save one there with tokenizer.save_pretrained()"
            )
        processor_dir = model_dir
        if not _has_any(model_dir, _PROCESSOR_FILES):
            if vision_tower is None and read_model_type(model_dir) == "llava_llama":
                vision_tower = _original_tower(model_dir)
            if vision_tower is None:
                raise MissingComponentError(
                    f"{model_dir} has no image processor (preprocessor_config.json); save one there with "
                    "image_processor.save_pretrained() or pass vision_tower= (a CLIP dir that has one)"
                )
            processor_dir = Path(vision_tower)
        device = torch.device(device) if device is not None else default_device()
        model = load_pretrained_model(model_dir, dtype=dtype, vision_tower=vision_tower)
        model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if compression is not None:
            model.set_compression(compression)
        model.set_query_vocabulary(tokenizer)
        try:
            image_processor = load_image_processor(str(processor_dir))
        except OSError as error:
            raise MissingComponentError(f"cannot load an image processor from {processor_dir}: {error}") from error
        video_processor = None
        if model.config.has_video_tower:
            video_dir = model_dir / VIDEO_PROCESSOR_DIR
            video_processor = load_image_processor(str(video_dir)) if video_dir.is_dir() else None
        logger.info("Loaded %s on %s (template %s)", model_dir, device, model.config.template)
        return cls(
            model=model,
            tokenizer=tokenizer,
            image_processor=image_processor,
            template=get_template(model.config.template),
            image_aspect_ratio=model.config.image_aspect_ratio,
            video_processor=video_processor or image_processor if model.config.has_video_tower else None,
            fast_decoding=fast_decoding,
        )

    def pixel_dtype(self) -> torch.dtype:
        """The dtype pixel inputs are cast to (the vision tower's)."""
        return self.model.vision_tower.dtype

    def prepare(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Tokenize and left-pad a batch: ``input_ids``, ``attention_mask`` and, when the batch has any,
        ``pixel_values`` / ``pixel_values_videos`` stacked in the order their sentinels appear."""
        config = self.model.config
        ids: list[list[int]] = []
        images: list[str] = []
        videos: list[str] = []
        for request in requests:
            if "prompt" not in request or not isinstance(request["prompt"], str):
                raise ValueError(f"request needs a string 'prompt': {request!r}")
            request_images = image_paths(request.get("image"))
            request_videos = image_paths(request.get("video"), "video")
            if request_videos and not config.has_video_tower:
                raise ValueError(f"request has videos but this model has no video tower: {request!r}")
            ids.append(
                build_prompt_ids(
                    self.tokenizer,
                    self.template,
                    request["prompt"],
                    len(request_images),
                    config.image_token_id,
                    len(request_videos),
                    config.video_token_id,
                )
            )
            images.extend(request_images)
            videos.extend(request_videos)
        input_ids, attention_mask = left_pad(ids, self._pad_id())
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if images:
            batch["pixel_values"] = load_and_preprocess(images, self.image_processor, self.image_aspect_ratio)
        if videos:
            batch["pixel_values_videos"] = load_and_preprocess_videos(
                videos, self.video_processor, config.num_frames, self.video_backend
            )
        return batch


def _original_tower(model_dir: Path) -> str | None:
    """``mm_vision_tower`` of an original LLaVA config (where its image processor lives)."""
    return read_config_json(model_dir / "config.json").get("mm_vision_tower")
