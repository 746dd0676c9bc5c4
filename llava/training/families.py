"""Model families the trainer builds, behind one small interface (:class:`ModelFamily`).

The training stages (pretrain, finetune, LoRA), the trainer, checkpoints, resume and metrics are the
same for every family; a family says how its model, tokenizer and processors are loaded, how a sample
becomes model inputs, which module is the projector (trained in pretraining, saved by every stage) and
where LoRA goes. The family follows from ``--model_name_or_path``'s ``model_type``:
``qwen2_5_vl`` is Qwen2.5-VL (:mod:`llava.training.qwen_family`), anything else LLaVA (a language model
plus ``--vision_tower``, or a LLaVA checkpoint).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn
from transformers import AutoTokenizer

from llava.constants import VIDEO_PROCESSOR_DIR
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.hf_adapter import load_image_processor
from llava.model.loading import read_model_type
from llava.model.qwen_vl import QWEN_MODEL_TYPES
from llava.training.arguments import LlavaTrainingArguments, ModelArguments
from llava.training.model_setup import LLAVA_CHECKPOINT_TYPES, LORA_TARGETS, build_model


@dataclass
class Processors:
    """What turns raw samples into model inputs; saved next to every full checkpoint."""

    tokenizer: Any
    image_processor: Any
    video_processor: Any = None
    extra_files: tuple[Path, ...] = ()  # copied as they are (e.g. a checkpoint's processor configs)

    def save(self, output_dir: str | Path) -> None:
        """Write the tokenizer, the image processor, (in ``video_processor/``) the video processor and copies of
        ``extra_files``."""
        self.tokenizer.save_pretrained(str(output_dir))
        self.image_processor.save_pretrained(str(output_dir))
        if self.video_processor is not None:
            self.video_processor.save_pretrained(str(Path(output_dir) / VIDEO_PROCESSOR_DIR))
        for source in self.extra_files:
            shutil.copyfile(source, Path(output_dir) / source.name)


class ModelFamily(Protocol):
    """How the trainer builds, feeds and saves one kind of model."""

    name: str
    projector_name: str  # the module trained in pretraining, saved as mm_projector.safetensors
    lora_targets: str  # peft target_modules regex (the language model's linear layers)

    def build_model(
        self, model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
    ) -> nn.Module:
        """The model with compression set (weights partitioned as they load under ZeRO-3)."""

    def load_processors(self, model_args: ModelArguments, data_args: DataArguments, model: nn.Module) -> Processors:
        """Tokenizer (right-padded for training) and the image (and video) processors."""

    def prepare(self, model: nn.Module, processors: Processors, data_args: DataArguments) -> None:
        """Settings that tie the model, the tokenizer and the data arguments together."""

    def dataset(self, data_args: DataArguments, processors: Processors, model: nn.Module) -> LazySupervisedDataset:
        """The training data set."""


class LlavaFamily:
    """LLaVA-1.5 / Video-LLaVA: CLIP tower(s) + projector + a causal LM, or a LLaVA checkpoint."""

    name = "llava"
    projector_name = "projector"
    lora_targets = LORA_TARGETS

    def build_model(
        self, model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
    ) -> nn.Module:
        return build_model(model_args, data_args, args)

    def load_processors(self, model_args: ModelArguments, data_args: DataArguments, model: nn.Module) -> Processors:
        tokenizer, image_processor = load_processors(model_args, data_args)
        video_processor = load_video_processor(model_args, image_processor, model.config.has_video_tower)
        return Processors(tokenizer, image_processor, video_processor)

    def prepare(self, model: nn.Module, processors: Processors, data_args: DataArguments) -> None:
        data_args.tokens_per_image = model.config.llm_tokens_per_image
        if model.config.has_video_tower:
            data_args.tokens_per_video = model.config.llm_tokens_per_video
        model.config.text_config.pad_token_id = processors.tokenizer.pad_token_id
        model.set_query_vocabulary(processors.tokenizer)

    def dataset(self, data_args: DataArguments, processors: Processors, model: nn.Module) -> LazySupervisedDataset:
        return LazySupervisedDataset(
            data_args,
            processors.tokenizer,
            processors.image_processor,
            model.config.image_token_id,
            video_processor=processors.video_processor,
            video_token_id=model.config.video_token_id,
        )


def load_processors(model_args: ModelArguments, data_args: DataArguments) -> tuple[Any, Any]:
    """LLaVA's tokenizer (from the LM or checkpoint) and image processor (from the tower or checkpoint)."""
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, model_max_length=data_args.model_max_length, padding_side="right"
    )
    if tokenizer.pad_token is None:  # Vicuna/LLaMA ship without one; LLaVA pads with unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    is_checkpoint = read_model_type(model_args.model_name_or_path) in LLAVA_CHECKPOINT_TYPES
    processor_source = model_args.vision_tower or model_args.model_name_or_path
    if is_checkpoint and not model_args.vision_tower:
        processor_source = model_args.model_name_or_path
    image_processor = load_image_processor(processor_source)
    return tokenizer, image_processor


def load_video_processor(model_args: ModelArguments, image_processor: Any, has_video_tower: bool) -> Any:
    """The video tower's image processor: from ``--video_tower``, else a checkpoint's ``video_processor/``
    folder, else the image processor (Video-LLaVA's towers share one 224 px preprocessing)."""
    if not has_video_tower:
        return None
    if model_args.video_tower:
        return load_image_processor(model_args.video_tower)
    saved = Path(model_args.model_name_or_path) / VIDEO_PROCESSOR_DIR
    if saved.is_dir():
        return load_image_processor(str(saved))
    return image_processor


def family_for(model_name_or_path: str) -> ModelFamily:
    """The family of a ``--model_name_or_path`` (local directory or Hub id), from its ``model_type``."""
    if read_model_type(model_name_or_path) in QWEN_MODEL_TYPES:
        from llava.training.qwen_family import QwenVLFamily

        return QwenVLFamily()
    return LlavaFamily()
