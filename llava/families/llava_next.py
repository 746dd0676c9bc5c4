"""The LLaVA-NeXT family (LLaVA-1.6, AnyRes; ``llava-hf/llava-v1.6-*-hf`` layout): transformers'
``LlavaNextForConditionalGeneration`` run as :class:`~llava.model.llava_next.DuetLlavaNext` (T2V compression,
fast decoding), for training and inference.

Inference: prompts are rendered with the checkpoint's own chat template (the processor's) from the same user
content as the other families (:func:`~llava.pipeline.build_prompt_text`: images where their ``<image>`` tags
are, else first), and the checkpoint's own ``LlavaNextProcessor`` tiles the images (AnyRes) and expands each
image placeholder to its token count, left-padded. Images only: video requests are refused.

Training (``--version chat_template``): LLaVA-format conversations rendered with the checkpoint's chat template
(every message's content as a list, as llava-hf's templates read it), after the ids the tokenizer adds at
inference (e.g. BOS), with labels on the assistant answers only, each ended with the tokenizer's EOS when the
template writes none (:class:`~llava.data.chat_template.ChatTemplateEncoder`). Each image goes through the
checkpoint's ``LlavaNextImageProcessor`` on its own: its AnyRes views (the base view and the tiles) are
concatenated over the batch (``pixel_values`` ``[sum views, 3, H, W]``, ``image_sizes`` ``[images, 2]``) and its
placeholder is expanded to exactly its AnyRes token count (the processor's ``replace_image_token``). Stages as
for Qwen2.5-VL: finetuning trains the decoder, the projector, ``image_newline`` and the LM head; LoRA adapters
on the decoder's linear layers + the full projector (``image_newline`` stays frozen then); the CLIP tower is
always frozen. Every full save is a plain LLaVA-NeXT checkpoint in transformers' own layout (loadable by
transformers and :func:`llava.inference.load_pipeline`), with the checkpoint's processor files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoProcessor, LlavaNextConfig, LlavaNextForConditionalGeneration

from llava.arguments import LlavaTrainingArguments, ModelArguments
from llava.data.chat_template import (
    ChatTemplateEncoder,
    ImageInputs,
    special_prefix,
)
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.data.images import load_image
from llava.families.base import PipelineOptions, Processors, build_from_checkpoint, random_wrapped_model
from llava.families.names import LLAVA_NEXT_NAMES
from llava.model.hub_checkpoint import load_hf_checkpoint
from llava.model.llava_next import LLAVA_NEXT_MODEL_TYPES, DuetLlavaNext
from llava.model.stages import LORA_TARGETS
from llava.pipeline import (
    GenerationPipeline,
    MissingComponentError,
    Request,
    chat_request,
    default_device,
)

logger = logging.getLogger(__name__)

PROCESSOR_FILES = ("chat_template.json", "chat_template.jinja", "processor_config.json", "preprocessor_config.json")
"""Files of a local LLaVA-NeXT checkpoint that every save copies, so ``AutoProcessor`` finds them there too."""


def load_llava_next(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    compression: Any = None,
    attn: str = "sdpa",
) -> DuetLlavaNext:
    """A LLaVA-NeXT checkpoint (local directory or Hub id) as :class:`DuetLlavaNext` (safetensors, no remote
    code); under an active ZeRO-3 config
    transformers partitions the weights as they load."""
    hf_model = load_hf_checkpoint(LlavaNextForConditionalGeneration, path, dtype, attn)
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
        for request in map(chat_request, requests):
            if request.videos:
                raise ValueError("LLaVA-NeXT answers about images only; this request has a video")
            texts.append(
                self.processor.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=False)
            )
            images.extend(load_image(path) for path in request.images)
        encoded = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        return {
            key: encoded[key]
            for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes")
            if key in encoded
        }


class AnyResImages:
    """The checkpoint's ``LlavaNextImageProcessor`` for training: saved as itself, and :meth:`inputs` gives a
    sample's images in the layout the training batch takes."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.image_processor = processor.image_processor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.image_processor(*args, **kwargs)

    def save_pretrained(self, output_dir: str | os.PathLike[str]) -> Any:
        """Save the whole processor (its ``processor_config.json`` holds the image processor and the AnyRes
        settings: patch size, feature select strategy), so every save and LoRA merge loads with ``AutoProcessor``."""
        return self.processor.save_pretrained(output_dir)

    def inputs(self, images: list[Any]) -> ImageInputs:
        """Each image through the image processor on its own: ``pixel_values`` its AnyRes views (base view, then
        the tiles; no padding views), concatenated ``[sum views, 3, H, W]``, ``image_sizes`` ``[images, 2]``, and
        each image's placeholder count as the checkpoint's processor expands it (``replace_image_token``)."""
        pixels, sizes, tokens = [], [], []
        token_length = len(self.processor.image_token)
        for image in images:
            processed = self.image_processor(images=[image], return_tensors="pt")
            pixels.append(processed["pixel_values"][0])
            sizes.append(processed["image_sizes"])
            tokens.append(len(self.processor.replace_image_token(processed, 0)) // token_length)
        views = np.asarray([len(view) for view in pixels], dtype=np.int64)
        tensors = {"pixel_values": torch.cat(pixels), "image_sizes": torch.cat(sizes).long()}
        return ImageInputs(tensors, np.asarray(tokens, dtype=np.int64), views)


class LlavaNextFamily:
    """LLaVA-NeXT checkpoints (``model_type`` ``llava_next``)."""

    name = LLAVA_NEXT_NAMES.name
    model_types = LLAVA_NEXT_MODEL_TYPES
    hub_names = LLAVA_NEXT_NAMES.hub_names
    model_class = DuetLlavaNext
    modules = ("llava.families.llava_next", "llava.model.llava_next")
    projector_name = "multi_modal_projector"
    lora_targets = LORA_TARGETS  # the decoder's linear layers (its modules sit under ``language_model``)

    def build_model(
        self, model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
    ) -> DuetLlavaNext:
        """The checkpoint as :class:`DuetLlavaNext` in the training dtype, compression set; ``--version`` must
        be ``chat_template`` and the LLaVA-1.5 tower settings are refused (the checkpoint has its own)."""
        return build_from_checkpoint("LLaVA-NeXT", load_llava_next, model_args, data_args, args)

    def load_processors(self, model_args: ModelArguments, data_args: DataArguments, model: nn.Module) -> Processors:
        """The checkpoint's ``LlavaNextProcessor``: its tokenizer (right-padded, with the chat template) and its
        ``LlavaNextImageProcessor``; the processor files are copied on every save."""
        source = model_args.model_name_or_path
        processor = AutoProcessor.from_pretrained(source)
        tokenizer = processor.tokenizer
        tokenizer.model_max_length = data_args.model_max_length
        tokenizer.padding_side = "right"
        if not getattr(tokenizer, "chat_template", None):
            template = getattr(processor, "chat_template", None)
            if not template:
                raise MissingComponentError(f"{source} has no chat template (the processor's or the tokenizer's)")
            tokenizer.chat_template = template
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        kept = [Path(source) / name for name in PROCESSOR_FILES]  # what the Hub's processor also reads
        return Processors(tokenizer, AnyResImages(processor), extra_files=tuple(p for p in kept if p.is_file()))

    def prepare(self, model: nn.Module, processors: Processors) -> None:
        """Nothing to tie: the placeholders are expanded in the data."""

    def data_arguments(self, data_args: DataArguments, model: nn.Module) -> DataArguments:
        """As given: length grouping estimates each image at ``--tokens_per_image`` (a constant; AnyRes counts
        depend on each image's size, known only once read)."""
        return data_args

    def dataset(self, data_args: DataArguments, processors: Processors, model: nn.Module) -> LazySupervisedDataset:
        """LLaVA JSON through the checkpoint's chat template, images as AnyRes views (see the module docstring)."""
        tokenizer = processors.tokenizer
        image_token_id = model.config.image_token_id
        processor_token_id = processors.image_processor.processor.image_token_id
        if processor_token_id != image_token_id:
            raise ValueError(
                f"the processor's image token {processors.image_processor.processor.image_token!r} (id "
                f"{processor_token_id}) is not the model's image_token_id {image_token_id}: config.json and the "
                "processor files come from different checkpoints"
            )
        encoder = ChatTemplateEncoder(
            tokenizer,
            processors.image_processor,
            image_token_id=image_token_id,
            max_length=data_args.model_max_length,
            image_inputs=processors.image_processor.inputs,
            content_lists=True,
            prefix_ids=special_prefix(tokenizer),
            answer_end_id=tokenizer.eos_token_id,
        )
        return LazySupervisedDataset(data_args, tokenizer, processors.image_processor, image_token_id, encoder=encoder)

    def visual_tokens_added(self, batch: dict[str, Any], config: Any) -> int:
        """None: each image's placeholders are expanded in ``input_ids`` already."""
        return 0

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
        return random_wrapped_model(
            LlavaNextForConditionalGeneration, LlavaNextConfig(**config_fields), DuetLlavaNext, dtype, device, attn
        )
