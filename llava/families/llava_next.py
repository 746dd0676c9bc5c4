"""The LLaVA-NeXT family (LLaVA-1.6, AnyRes; ``llava-hf/llava-v1.6-*-hf`` layout): transformers'
``LlavaNextForConditionalGeneration`` run as :class:`~llava.model.llava_next.DuetLlavaNext` (T2V compression,
fast decoding). Inference only for now: the training members raise ``NotImplementedError``.

Inference: prompts are rendered with the checkpoint's own chat template (the processor's) from the same user
content as the other families (:func:`~llava.pipeline.build_prompt_text`: images where their ``<image>`` tags
are, else first), and the checkpoint's own ``LlavaNextProcessor`` tiles the images (AnyRes) and expands each
image placeholder to its token count, left-padded. Images only: video requests are refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from transformers import AutoProcessor, LlavaNextConfig, LlavaNextForConditionalGeneration

from llava.arguments import LlavaTrainingArguments, ModelArguments
from llava.data.chat_template import chat_content
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.data.images import load_image
from llava.families.base import PipelineOptions, Processors
from llava.hf_adapter import set_attn_implementation
from llava.model.hub_checkpoint import check_weight_files, read_config_json
from llava.model.llava_next import LLAVA_NEXT_MODEL_TYPES, DuetLlavaNext
from llava.model.precision import random_init
from llava.model.stages import LORA_TARGETS
from llava.pipeline import (
    GenerationPipeline,
    MissingComponentError,
    Request,
    build_prompt_text,
    default_device,
    image_paths,
)

logger = logging.getLogger(__name__)

NO_TRAINING = "LLaVA-NeXT training is not supported yet (inference only: DuetLlavaNext, {what})"


def _no_training(what: str) -> NoReturn:
    raise NotImplementedError(NO_TRAINING.format(what=what))


def load_llava_next(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None, compression: Any = None, attn: str = "sdpa"
) -> DuetLlavaNext:
    """A LLaVA-NeXT checkpoint (local directory or Hub id) as :class:`DuetLlavaNext` (safetensors, no remote code)."""
    model_dir = Path(path)
    if model_dir.is_dir():
        read_config_json(model_dir / "config.json")
        check_weight_files(model_dir)
    hf_model = LlavaNextForConditionalGeneration.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn, use_safetensors=True
    )
    return DuetLlavaNext(hf_model, compression)


@dataclass(kw_only=True)
class LlavaNextPipeline(GenerationPipeline):
    """LLaVA-NeXT model + the checkpoint's ``LlavaNextProcessor`` (tokenizer, chat template, AnyRes tiling)."""

    model: DuetLlavaNext
    processor: Any

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        compression: Any = None,
        fast_decoding: bool | None = None,
    ) -> LlavaNextPipeline:
        """Load a LLaVA-NeXT directory (weights, processor with its chat template) on ``device``."""
        model_dir = Path(path)
        model = load_llava_next(model_dir, dtype=dtype, compression=compression)
        device = torch.device(device) if device is not None else default_device()
        model.to(device).eval()
        processor = AutoProcessor.from_pretrained(str(model_dir))
        if not getattr(processor, "chat_template", None):
            raise MissingComponentError(f"{model_dir} has no chat template (the processor's chat_template)")
        processor.tokenizer.padding_side = "left"
        logger.info("Loaded LLaVA-NeXT %s on %s", model_dir, device)
        return cls(model=model, tokenizer=processor.tokenizer, processor=processor, fast_decoding=fast_decoding)

    def prepare(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Chat-templated, left-padded ``input_ids``/``attention_mask`` with each image's placeholder expanded to
        its AnyRes token count and, when the batch has images, ``pixel_values``/``image_sizes`` (the processor's)."""
        texts, images = [], []
        for request in requests:
            if "prompt" not in request or not isinstance(request["prompt"], str):
                raise ValueError(f"request needs a string 'prompt': {request!r}")
            if image_paths(request.get("video"), key="video"):
                raise ValueError("LLaVA-NeXT answers about images only; this request has a video")
            files = image_paths(request.get("image"))
            content = chat_content(build_prompt_text(request["prompt"], len(files)))
            texts.append(
                self.processor.apply_chat_template(
                    [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
                )
            )
            images.extend(load_image(path) for path in files)
        encoded = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        return {
            key: encoded[key]
            for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes")
            if key in encoded
        }


class LlavaNextFamily:
    """LLaVA-NeXT checkpoints (``model_type`` ``llava_next``)."""

    name = "llava_next"
    model_types = LLAVA_NEXT_MODEL_TYPES
    hub_names = ("llava-v1.6", "llava-next", "llava_next")
    model_class = DuetLlavaNext
    modules = ("llava.families.llava_next", "llava.model.llava_next")
    projector_name = "projector"
    lora_targets = LORA_TARGETS

    def build_model(
        self, model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
    ) -> nn.Module:
        _no_training("build_model")

    def load_processors(self, model_args: ModelArguments, data_args: DataArguments, model: nn.Module) -> Processors:
        _no_training("load_processors")

    def prepare(self, model: nn.Module, processors: Processors) -> None:
        _no_training("prepare")

    def data_arguments(self, data_args: DataArguments, model: nn.Module) -> DataArguments:
        _no_training("data_arguments")

    def dataset(self, data_args: DataArguments, processors: Processors, model: nn.Module) -> LazySupervisedDataset:
        _no_training("dataset")

    def visual_tokens_added(self, batch: dict[str, Any], config: Any) -> int:
        _no_training("visual_tokens_added")

    def load_pipeline(self, path: str | os.PathLike[str], options: PipelineOptions) -> GenerationPipeline:
        """See :meth:`LlavaNextPipeline.from_pretrained` (``options.vision_tower`` does not apply: the checkpoint
        holds its CLIP tower)."""
        if options.vision_tower:
            logger.warning("%s is a LLaVA-NeXT checkpoint with its own vision tower: ignoring vision_tower", path)
        return LlavaNextPipeline.from_pretrained(path, **options.loading_keywords())

    def random_model(
        self, config_fields: dict[str, Any], dtype: torch.dtype, device: str | torch.device | None, attn: str
    ) -> nn.Module:
        """A :class:`DuetLlavaNext` around ``LlavaNextForConditionalGeneration(LlavaNextConfig(**config_fields))``
        with random weights."""
        config = LlavaNextConfig(**config_fields)
        for part in (config, config.text_config, config.vision_config):
            set_attn_implementation(part, attn)
        return DuetLlavaNext(random_init(LlavaNextForConditionalGeneration, config, dtype, device))
