"""Qwen2.5-VL as a training family: the checkpoint's own vision transformer, patch merger (the projector)
and Qwen2 decoder, trained with DUET compression through the same trainer and launch scripts.

Samples are LLaVA-format conversations rendered with the checkpoint's chat template, with labels on the
assistant answers only (:class:`~llava.data.chat_template.ChatTemplateEncoder`), and images processed by
Qwen's own image processor (dynamic resolution; ``--min_pixels``/``--max_pixels`` bound it). Stages as for
LLaVA: ``--tune_mm_mlp_adapter`` trains the merger only, finetuning the decoder + merger + LM head, LoRA
adapters on the decoder's linear layers + the full merger; the vision transformer stays frozen. Every
full save is a plain Qwen2.5-VL checkpoint (loadable by transformers and :class:`~llava.inference.LlavaPipeline`).
Videos (``"video"`` samples, ``--video_folder``): ``--num_frames`` uniformly sampled frames per video in Qwen's
video layout (:mod:`llava.data.qwen_video`), ``--video_max_pixels`` per frame.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer

from llava.data.chat_template import CHAT_TEMPLATE_VERSION, ChatTemplateEncoder
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.data.qwen_video import DEFAULT_VIDEO_MAX_PIXELS, load_qwen_video
from llava.hf_adapter import load_image_processor
from llava.inference_qwen import attach_chat_template, load_qwen_vl
from llava.model.qwen_vl import DuetQwenVL
from llava.training.arguments import LlavaTrainingArguments, ModelArguments
from llava.training.families import Processors
from llava.training.model_setup import LORA_TARGETS, load_projector, training_dtype
from llava.utils.attention import default_attn_implementation

logger = logging.getLogger(__name__)


PROCESSOR_FILES = ("chat_template.json", "video_preprocessor_config.json", "processor_config.json")
"""Files of a local Qwen2.5-VL checkpoint that every save copies, so ``AutoProcessor`` finds them there too."""


class QwenVLFamily:
    """Qwen2.5-VL checkpoints (``model_type`` ``qwen2_5_vl``)."""

    name = "qwen2_5_vl"
    projector_name = "merger"
    lora_targets = LORA_TARGETS  # the decoder's linear layers (its modules sit under ``language_model``)

    def build_model(
        self, model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
    ) -> DuetQwenVL:
        source = model_args.model_name_or_path
        for flag, value in (("--vision_tower", model_args.vision_tower), ("--video_tower", model_args.video_tower)):
            if value:
                raise ValueError(f"{source} is a Qwen2.5-VL checkpoint with its own vision transformer: drop {flag}")
        if data_args.version != CHAT_TEMPLATE_VERSION:
            raise ValueError(
                f"{source} is a Qwen2.5-VL checkpoint: it trains with its own chat template, pass "
                f"--version {CHAT_TEMPLATE_VERSION} (got --version {data_args.version})"
            )
        attn = model_args.attn_implementation or default_attn_implementation()
        logger.info("Starting from Qwen2.5-VL checkpoint %s", source)
        model = load_qwen_vl(source, dtype=training_dtype(args), compression=model_args.compression, attn=attn)
        if model_args.pretrain_mm_mlp_adapter:
            load_projector(model, model_args.pretrain_mm_mlp_adapter)
        return model

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

    def prepare(self, model: nn.Module, processors: Processors, data_args: DataArguments) -> None:
        """Nothing to tie: the placeholders are expanded in the data. Length grouping still estimates each image
        at ``--tokens_per_image`` (a constant; Qwen's counts depend on each image's size, known only once read)."""

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
