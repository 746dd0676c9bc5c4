"""What a model family decides, as one interface (:class:`ModelFamily`), and the processors it hands out.

Training stages, the trainer, checkpoints, resume, metrics, generation and evaluation are the same for every
family. A family says how its model is built for training and loaded for inference, how a sample becomes
model inputs, which module is the projector (trained in pretraining, saved by every stage), where LoRA goes
and how many visual tokens a batch adds to the language model's sequence. Families are picked by
:func:`llava.families.registry.family_for`, never by the code that uses them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from llava.arguments import LlavaTrainingArguments, ModelArguments
from llava.constants import VIDEO_PROCESSOR_DIR
from llava.data.chat_template import CHAT_TEMPLATE_VERSION
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.hf_adapter import set_attn_implementation
from llava.model.precision import random_init
from llava.model.stages import load_projector, training_dtype
from llava.pipeline import GenerationPipeline
from llava.utils.attention import default_attn_implementation

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class PipelineOptions:
    """How to load a checkpoint for inference: ``dtype`` (default float32), ``device`` (default CUDA when
    available), ``compression`` (a preset name, YAML path or dict overriding the checkpoint's; ``"none"`` turns
    it off), ``fast_decoding`` (see :class:`~llava.pipeline.GenerationPipeline`) and ``vision_tower`` (where
    an original LLaVA checkpoint's image processor lives; other families ignore it)."""

    dtype: torch.dtype | None = None
    device: str | torch.device | None = None
    compression: Any = None
    fast_decoding: bool | None = None
    vision_tower: str | None = None

    def loading_keywords(self) -> dict[str, Any]:
        """The options every family's ``from_pretrained`` takes, as keywords (not ``vision_tower``)."""
        return {
            "dtype": self.dtype,
            "device": self.device,
            "compression": self.compression,
            "fast_decoding": self.fast_decoding,
        }


class ModelFamily(Protocol):
    """Everything that differs between model families."""

    name: str  # what ``MODEL_FAMILY`` / ``--model_family`` call it
    model_types: tuple[str, ...]  # the ``model_type`` values of config.json this family loads
    hub_names: tuple[str, ...]  # lowercase parts of a Hub id that name this family (offline guesses only)
    model_class: type[nn.Module]  # what its builders return (what LoRA merging must give back)
    modules: tuple[str, ...]  # the modules that belong to this family (only they and the registry name it)
    projector_name: str  # the module trained in pretraining, saved as mm_projector.safetensors
    lora_targets: str  # peft target_modules regex (the language model's linear layers)

    def build_model(
        self, model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
    ) -> nn.Module:
        """The model with compression set (weights partitioned as they load under ZeRO-3)."""

    def load_processors(self, model_args: ModelArguments, data_args: DataArguments, model: nn.Module) -> Processors:
        """Tokenizer (right-padded for training) and the image (and video) processors."""

    def prepare(self, model: nn.Module, processors: Processors) -> None:
        """Settings that tie the model and the tokenizer together (pad token, query vocabulary)."""

    def data_arguments(self, data_args: DataArguments, model: nn.Module) -> DataArguments:
        """``data_args`` with what the model decides filled in (a new object; ``data_args`` is not changed)."""

    def dataset(self, data_args: DataArguments, processors: Processors, model: nn.Module) -> LazySupervisedDataset:
        """The training data set."""

    def visual_tokens_added(self, batch: dict[str, Any], config: Any) -> int:
        """Visual tokens ``batch`` adds to the language model's sequence before compression, beyond its
        ``input_ids`` (0 when the placeholders are expanded in the ids already)."""

    def load_pipeline(self, path: str | os.PathLike[str], options: PipelineOptions) -> GenerationPipeline:
        """A checkpoint directory ready to answer requests."""

    def random_model(
        self, config_fields: dict[str, Any], dtype: torch.dtype, device: str | torch.device | None, attn: str
    ) -> nn.Module:
        """A model with random weights of the given config fields, created in ``dtype`` on ``device``
        (benchmarks: speed, not quality)."""


def build_from_checkpoint(
    label: str,
    load: Callable[..., nn.Module],
    model_args: ModelArguments,
    data_args: DataArguments,
    args: LlavaTrainingArguments,
) -> nn.Module:
    """The training model of a family that starts from a whole checkpoint with its own vision tower and chat
    template (Qwen2.5-VL, LLaVA-NeXT, LLaVA-OneVision): ``load(source, dtype=, compression=, attn=)`` in the
    training dtype with the compression set, a ``--pretrain_mm_mlp_adapter`` projector loaded over it. LLaVA-1.5's
    tower flags and any ``--version`` but ``chat_template`` are refused, naming the ``label`` checkpoint."""
    source = model_args.model_name_or_path
    for flag, value in (("--vision_tower", model_args.vision_tower), ("--video_tower", model_args.video_tower)):
        if value:
            raise ValueError(f"{source} is a {label} checkpoint with its own vision tower: drop {flag}")
    if data_args.version != CHAT_TEMPLATE_VERSION:
        raise ValueError(
            f"{source} is a {label} checkpoint: it trains with its own chat template, pass "
            f"--version {CHAT_TEMPLATE_VERSION} (got --version {data_args.version})"
        )
    attn = model_args.attn_implementation or default_attn_implementation()
    logger.info("Starting from %s checkpoint %s", label, source)
    model = load(source, dtype=training_dtype(args), compression=model_args.compression, attn=attn)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    return model


def random_wrapped_model(
    hf_class: type[nn.Module],
    config: Any,
    wrapper: Callable[[nn.Module], nn.Module],
    dtype: torch.dtype,
    device: str | torch.device | None,
    attn: str,
) -> nn.Module:
    """A whole-checkpoint family's model with random weights (benchmarks): ``hf_class(config)`` with ``attn`` on
    the config and its text and vision parts, created in ``dtype`` on ``device``, wrapped by ``wrapper``."""
    for part in (config, config.text_config, config.vision_config):
        set_attn_implementation(part, attn)
    return wrapper(random_init(hf_class, config, dtype, device))
