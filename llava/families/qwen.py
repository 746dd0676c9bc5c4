"""The Qwen2.5-VL family (``Qwen/Qwen2.5-VL-7B-Instruct`` layout): the checkpoint's own vision transformer, patch
merger (the projector) and Qwen2 decoder, with DUET compression, for training and inference.

Inference: prompts are built with the checkpoint's own chat template (the tokenizer's) and images are processed
by Qwen's own image processor (dynamic resolution between ``min_pixels`` and ``max_pixels``); each image's
``<|image_pad|>`` placeholder is repeated once per merged visual token (``t * h * w / merge^2``), as Qwen's
processor does. Batches are left-padded and run through :class:`~llava.model.qwen_vl.DuetQwenVL` (T2V
compression, fast decoding). User content is built as in training (:func:`~llava.pipeline.build_prompt_text`,
as LLaVA prompts: images and videos where their tags are, else first).

Training: samples are LLaVA-format conversations rendered with the checkpoint's chat template, with labels on
the assistant answers only (:class:`~llava.data.chat_template.ChatTemplateEncoder`), and images processed by
Qwen's own image processor (``--min_pixels``/``--max_pixels`` bound it). Stages as for LLaVA:
``--tune_mm_mlp_adapter`` trains the merger only, finetuning the decoder + merger + LM head, LoRA adapters on the
decoder's linear layers + the full merger; the vision transformer stays frozen. Every full save is a plain
Qwen2.5-VL checkpoint (loadable by transformers and :func:`llava.inference.load_pipeline`).

Videos (``"video"`` samples, ``--video_folder``; ``"video"`` requests): uniformly sampled frames in Qwen's video
layout (:mod:`llava.data.qwen_video`), ``--video_max_pixels`` per frame.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from llava.arguments import LlavaTrainingArguments, ModelArguments
from llava.data.chat_template import ChatTemplateEncoder, processor_chat_template
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.data.images import load_image
from llava.data.qwen_video import (
    DEFAULT_VIDEO_FRAMES,
    DEFAULT_VIDEO_MAX_PIXELS,
    QwenVideo,
    batch_videos,
    load_qwen_video,
)
from llava.families.base import PipelineOptions, Processors, build_from_checkpoint, random_wrapped_model
from llava.families.names import QWEN2_5_VL_NAMES
from llava.hf_adapter import load_image_processor
from llava.model.hub_checkpoint import load_hf_checkpoint
from llava.model.qwen_vl import QWEN_MODEL_TYPES, DuetQwenVL
from llava.model.stages import LORA_TARGETS
from llava.pipeline import (
    GenerationPipeline,
    MissingComponentError,
    Request,
    chat_request,
    default_device,
    expand_placeholders,
)

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("chat_template.json", "video_preprocessor_config.json", "processor_config.json")
"""Files of a local Qwen2.5-VL checkpoint that every save copies, so ``AutoProcessor`` finds them there too."""


def load_qwen_vl(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None, compression: Any = None, attn: str = "sdpa"
) -> DuetQwenVL:
    """A Qwen2.5-VL checkpoint (local directory or Hub id) as :class:`DuetQwenVL` (safetensors weights, no
    remote code); under an active ZeRO-3 config transformers partitions the weights as they load."""
    hf_model = load_hf_checkpoint(Qwen2_5_VLForConditionalGeneration, path, dtype, attn)
    return DuetQwenVL(hf_model, compression)


def attach_chat_template(tokenizer: Any, model_dir: Path) -> None:
    """Qwen ships the template as the processor's ``chat_template.json``; give it to the tokenizer."""
    if getattr(tokenizer, "chat_template", None):
        return
    template = processor_chat_template(model_dir)
    if template is None:
        raise MissingComponentError(f"{model_dir} has no chat template (tokenizer_config.json or chat_template.json)")
    tokenizer.chat_template = template


@dataclass(kw_only=True)
class QwenVLPipeline(GenerationPipeline):
    """Qwen2.5-VL model + tokenizer (with its chat template) + Qwen's image processor."""

    model: DuetQwenVL
    image_processor: Any
    video_frames: int = DEFAULT_VIDEO_FRAMES
    video_max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS
    video_backend: str = "pyav"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        compression: Any = None,
        fast_decoding: bool | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_frames: int = DEFAULT_VIDEO_FRAMES,
        video_max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS,
        video_backend: str = "pyav",
    ) -> QwenVLPipeline:
        """Load a Qwen2.5-VL directory; ``min_pixels``/``max_pixels`` bound each image's resolution,
        ``video_max_pixels`` each video frame's; videos are ``video_frames`` uniformly sampled frames."""
        model_dir = Path(path)
        model = load_qwen_vl(model_dir, dtype=dtype, compression=compression)
        device = torch.device(device) if device is not None else default_device()
        model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        tokenizer.padding_side = "left"
        attach_chat_template(tokenizer, model_dir)
        overrides = {key: value for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if value}
        image_processor = load_image_processor(str(model_dir), **overrides)
        logger.info("Loaded Qwen2.5-VL %s on %s", model_dir, device)
        return cls(
            model=model, tokenizer=tokenizer, image_processor=image_processor, fast_decoding=fast_decoding,
            video_frames=video_frames, video_max_pixels=video_max_pixels, video_backend=video_backend,
        )  # fmt: skip

    def _eos_ids(self) -> list[int]:
        configured = self.model.hf_model.generation_config.eos_token_id
        ids = [configured] if isinstance(configured, int) else list(configured or [])
        return ids or super()._eos_ids()

    def _load_video(self, path: str) -> QwenVideo:
        return load_qwen_video(path, self.image_processor, self.video_frames, self.video_max_pixels, self.video_backend)

    def prepare(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Chat-templated, left-padded ``input_ids``/``attention_mask`` and, when the batch has them, Qwen's
        image inputs (``pixel_values``, ``image_grid_thw``) and video inputs (``pixel_values_videos``,
        ``video_grid_thw``, ``second_per_grid_ts``)."""
        config = self.model.config
        texts, images, videos = [], [], []
        for request in map(chat_request, requests):
            texts.append(
                self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            )
            images.extend(load_image(path) for path in request.images)
            videos.extend(self._load_video(path) for path in request.videos)
        batch: dict[str, torch.Tensor] = {}
        merge_unit = self.image_processor.merge_size**2
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = processed["pixel_values"]
            batch["image_grid_thw"] = processed["image_grid_thw"]
        batch.update(batch_videos(videos))
        for grid_key, token_id in (
            ("image_grid_thw", config.image_token_id),
            ("video_grid_thw", config.video_token_id),
        ):
            if grid_key in batch:
                pad = self.tokenizer.convert_ids_to_tokens(token_id)
                counts = iter((batch[grid_key].prod(dim=-1) // merge_unit).tolist())
                texts = [expand_placeholders(text, pad, counts) for text in texts]
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **batch}


class QwenVLFamily:
    """Qwen2.5-VL checkpoints (``model_type`` ``qwen2_5_vl``)."""

    name = QWEN2_5_VL_NAMES.name
    model_types = QWEN_MODEL_TYPES
    hub_names = QWEN2_5_VL_NAMES.hub_names
    model_class = DuetQwenVL
    modules = ("llava.families.qwen", "llava.model.qwen_vl")
    projector_name = "merger"
    lora_targets = LORA_TARGETS  # the decoder's linear layers (its modules sit under ``language_model``)

    def build_model(
        self, model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
    ) -> DuetQwenVL:
        return build_from_checkpoint("Qwen2.5-VL", load_qwen_vl, model_args, data_args, args)

    def load_processors(self, model_args: ModelArguments, data_args: DataArguments, model: nn.Module) -> Processors:
        source = model_args.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(
            source, model_max_length=data_args.model_max_length, padding_side="right"
        )
        attach_chat_template(tokenizer, Path(source))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        bounds = {"min_pixels": data_args.min_pixels, "max_pixels": data_args.max_pixels}
        image_processor = load_image_processor(source, **{key: value for key, value in bounds.items() if value})
        kept = [Path(source) / name for name in PROCESSOR_FILES]  # what the Hub's processor also reads
        return Processors(tokenizer, image_processor, extra_files=tuple(path for path in kept if path.is_file()))

    def prepare(self, model: nn.Module, processors: Processors) -> None:
        """Nothing to tie: the placeholders are expanded in the data."""

    def data_arguments(self, data_args: DataArguments, model: nn.Module) -> DataArguments:
        """As given: length grouping estimates each image at ``--tokens_per_image`` (a constant; Qwen's counts
        depend on each image's size, known only once read)."""
        return data_args

    def dataset(self, data_args: DataArguments, processors: Processors, model: nn.Module) -> LazySupervisedDataset:
        config = model.config
        video_loader = functools.partial(
            load_qwen_video,
            image_processor=processors.image_processor,
            num_frames=data_args.num_frames,
            max_pixels=data_args.video_max_pixels or DEFAULT_VIDEO_MAX_PIXELS,
            backend=data_args.video_backend,
        )
        encoder = ChatTemplateEncoder(
            processors.tokenizer,
            processors.image_processor,
            image_token_id=config.image_token_id,
            vision_start_id=config.vision_start_token_id,
            max_length=data_args.model_max_length,
            video_token_id=config.video_token_id,
            video_loader=video_loader,
        )
        return LazySupervisedDataset(
            data_args,
            processors.tokenizer,
            processors.image_processor,
            config.image_token_id,
            video_token_id=config.video_token_id,
            encoder=encoder,
        )

    def visual_tokens_added(self, batch: dict[str, Any], config: Any) -> int:
        """None: each image's (video's) placeholders are expanded in ``input_ids`` already."""
        return 0

    def load_pipeline(self, path: str | os.PathLike[str], options: PipelineOptions) -> GenerationPipeline:
        """See :meth:`QwenVLPipeline.from_pretrained` (``options.vision_tower`` does not apply: the checkpoint
        holds its vision transformer)."""
        if options.vision_tower:
            logger.warning("%s is a Qwen2.5-VL checkpoint with its own vision transformer: ignoring vision_tower", path)
        return QwenVLPipeline.from_pretrained(path, **options.loading_keywords())

    def random_model(
        self, config_fields: dict[str, Any], dtype: torch.dtype, device: str | torch.device | None, attn: str
    ) -> nn.Module:
        """A :class:`DuetQwenVL` around ``Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_fields))``
        with random weights."""
        return random_wrapped_model(
            Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(**config_fields), DuetQwenVL, dtype, device, attn
        )
