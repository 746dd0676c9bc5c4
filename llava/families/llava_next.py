"""The LLaVA-NeXT family (LLaVA-1.6, AnyRes; ``llava-hf/llava-v1.6-*-hf`` layout): transformers'
``LlavaNextForConditionalGeneration`` run as :class:`~llava.model.llava_next.DuetLlavaNext` (T2V compression,
fast decoding). Inference only for now: the training members raise ``NotImplementedError``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from llava.arguments import LlavaTrainingArguments, ModelArguments
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.families.base import PipelineOptions, Processors
from llava.hf_adapter import set_attn_implementation
from llava.model.hub_checkpoint import check_weight_files, read_config_json
from llava.model.llava_next import LLAVA_NEXT_MODEL_TYPES, DuetLlavaNext
from llava.model.precision import random_init
from llava.model.stages import LORA_TARGETS
from llava.pipeline import GenerationPipeline

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
        raise NotImplementedError(
            f"{path}: a LLaVA-NeXT pipeline (chat template + AnyRes processor) is not implemented yet; load the "
            "model with llava.families.llava_next.load_llava_next and call its generate"
        )

    def random_model(
        self, config_fields: dict[str, Any], dtype: torch.dtype, device: str | torch.device | None, attn: str
    ) -> nn.Module:
        """A :class:`DuetLlavaNext` around ``LlavaNextForConditionalGeneration(LlavaNextConfig(**config_fields))``
        with random weights."""
        config = LlavaNextConfig(**config_fields)
        for part in (config, config.text_config, config.vision_config):
            set_attn_implementation(part, attn)
        return DuetLlavaNext(random_init(LlavaNextForConditionalGeneration, config, dtype, device))
