"""Merge a LoRA checkpoint (final output dir or an intermediate ``checkpoint-N``) into a plain model.

A LoRA checkpoint holds only the peft adapter (LoRA matrices + the trained projector); the base
model is rebuilt exactly as training built it, from the run's ``run_config.json``, so that any
checkpoint of the run can be merged, not only the final one (LLaVA #922).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from torch import nn
from transformers import set_seed

from llava.arguments import DataArguments, LlavaTrainingArguments, ModelArguments
from llava.families.base import Processors
from llava.families.registry import family_for, family_of_model

logger = logging.getLogger(__name__)

RUN_CONFIG_FILENAME = "run_config.json"
ADAPTER_CONFIG_FILENAME = "adapter_config.json"


class LoraCheckpointError(FileNotFoundError):
    """A directory is not a LoRA checkpoint, or its run config cannot be found or used."""


def find_run_config(
    checkpoint_dir: str | os.PathLike[str], run_config_path: str | os.PathLike[str] | None = None
) -> Path:
    """``run_config_path`` if given, else ``run_config.json`` in the checkpoint dir or its parent."""
    if run_config_path is not None:
        path = Path(run_config_path)
        if not path.is_file():
            raise LoraCheckpointError(f"run config not found: {path}")
        return path
    checkpoint_dir = Path(checkpoint_dir)
    candidates = [checkpoint_dir / RUN_CONFIG_FILENAME, checkpoint_dir.resolve().parent / RUN_CONFIG_FILENAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise LoraCheckpointError(
        f"no {RUN_CONFIG_FILENAME} in {candidates[0].parent} or {candidates[1].parent}; pass its path explicitly "
        "(--run-config)"
    )


def _fields_of(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    names = {field.name for field in dataclasses.fields(cls) if field.init}
    return {key: value for key, value in values.items() if key in names}


def arguments_from_run_config(
    run_config: dict[str, Any],
) -> tuple[ModelArguments, DataArguments, LlavaTrainingArguments]:
    """Model/data arguments of the run, and the training flags :func:`build_model` reads (dtype).

    The full ``TrainingArguments`` are not re-created: their validation depends on the machine
    (e.g. bf16 support) and only ``bf16``/``fp16`` matter for building the model.
    """
    model_args = ModelArguments(**_fields_of(ModelArguments, run_config))
    data_args = DataArguments(**_fields_of(DataArguments, run_config))
    training_flags = SimpleNamespace(
        bf16=bool(run_config.get("bf16", False)),
        fp16=bool(run_config.get("fp16", False)),
        lora_enable=bool(run_config.get("lora_enable", False)),
    )
    return model_args, data_args, cast(LlavaTrainingArguments, training_flags)


def load_run_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``run_config.json`` (flat dict of the run's arguments)."""
    with Path(path).open(encoding="utf-8") as handle:
        config = json.load(handle)
    if not isinstance(config, dict):
        raise LoraCheckpointError(f"{path}: expected a JSON object")
    return config


def build_base_model(run_config: dict[str, Any]) -> tuple[nn.Module, Processors]:
    """Rebuild the pre-LoRA model and its processors exactly as training did (the run's model family)."""
    model_args, data_args, args = arguments_from_run_config(run_config)
    set_seed(int(run_config.get("seed", 42)))  # train() seeds before building (fresh projector init)
    family = family_for(model_args.model_name_or_path)
    model = family.build_model(model_args, data_args, args)
    processors = family.load_processors(model_args, data_args, model)
    family.prepare(model, processors)  # e.g. the pad token id, as train() sets it
    return model, processors


def load_lora_model(
    checkpoint_dir: str | os.PathLike[str], run_config_path: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, Any, Any, Any]:
    """The peft model (base rebuilt from the run config + this checkpoint's adapter), in eval mode.

    Returns ``(peft_model, tokenizer, image_processor, video_processor)``; the last is ``None`` without
    a video tower.
    """
    from peft import LoraConfig, PeftModel

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / ADAPTER_CONFIG_FILENAME).is_file():
        kind = "a full (non-LoRA) checkpoint" if (checkpoint_dir / "config.json").is_file() else "not a checkpoint"
        raise LoraCheckpointError(f"{checkpoint_dir} has no {ADAPTER_CONFIG_FILENAME}: {kind}, nothing to merge")
    config_path = find_run_config(checkpoint_dir, run_config_path)
    run_config = load_run_config(config_path)
    if not run_config.get("lora_enable", False):
        logger.warning("%s says lora_enable=False; merging the adapter in %s anyway", config_path, checkpoint_dir)
    logger.info("Rebuilding the base model from %s", config_path)
    base, processors = build_base_model(run_config)
    lora_config = LoraConfig.from_pretrained(str(checkpoint_dir))
    # The task type only adds generation plumbing to the wrapper; merging does not depend on it, and
    # a plain PeftModel works whether or not the base model is a GenerationMixin.
    lora_config.task_type = None
    model = PeftModel.from_pretrained(base, str(checkpoint_dir), config=lora_config, is_trainable=False)
    model.eval()
    return model, processors.tokenizer, processors.image_processor, processors.video_processor


def merge_lora_checkpoint(
    checkpoint_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    run_config_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Merge the adapter of ``checkpoint_dir`` into its base model and save a plain checkpoint.

    ``out_dir`` receives a plain checkpoint of the run's family (a DuetLlava or a Qwen2.5-VL one: config.json +
    safetensors), the tokenizer and the processors, loadable with :func:`~llava.inference.load_pipeline`.
    """
    checkpoint_dir, out = Path(checkpoint_dir), Path(out_dir)
    if out.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--out must differ from the checkpoint directory ({checkpoint_dir})")
    model, tokenizer, image_processor, video_processor = load_lora_model(checkpoint_dir, run_config_path)
    merged = model.merge_and_unload()
    family_of_model(merged)  # TypeError when merging gave something no family saves
    merged.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))  # safetensors (the only format transformers 5 writes)
    Processors(tokenizer, image_processor, video_processor).save(out)
    logger.info("Merged %s into %s", checkpoint_dir, out)
    return out
