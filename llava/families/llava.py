"""The LLaVA-1.5 / Video-LLaVA family: CLIP tower(s) + projector + a causal LM, or a LLaVA checkpoint in any
layout :func:`~llava.model.loading.load_pretrained_model` reads (``duet_llava``, the HF ports ``llava`` and
``video_llava``, the original ``llava_llama``). Training from a plain language model (plus ``--vision_tower``)
builds this family too, so it is the registry's default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from llava.arguments import LlavaTrainingArguments, ModelArguments
from llava.constants import VIDEO_PROCESSOR_DIR
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.data.images import load_and_preprocess
from llava.data.templates import ConversationTemplate, get_template
from llava.data.video import load_and_preprocess_videos
from llava.families.base import PipelineOptions, Processors
from llava.families.names import LLAVA_NAMES
from llava.hf_adapter import load_image_processor, set_attn_implementation
from llava.model.config import DuetLlavaConfig
from llava.model.loading import load_pretrained_model, read_config_json, read_model_type
from llava.model.modeling import DuetLlavaForCausalLM
from llava.model.precision import random_init
from llava.model.stages import LORA_TARGETS, load_projector, training_dtype
from llava.pipeline import (
    GenerationPipeline,
    MissingComponentError,
    Request,
    build_conversation_ids,
    conversation_of,
    default_device,
    left_pad,
)
from llava.utils.attention import default_attn_implementation

logger = logging.getLogger(__name__)

LLAVA_MODEL_TYPES = LLAVA_NAMES.model_types
"""``model_type`` of the checkpoints this family loads for inference (``duet_llava``, :class:`DuetLlavaConfig`'s,
among them)."""
LLAVA_CHECKPOINT_TYPES = {DuetLlavaConfig.model_type, "llava", "llava_llama"}
"""``model_type`` of the checkpoints training starts from as they are (anything else is a plain language model)."""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def build_model(
    model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
) -> DuetLlavaForCausalLM:
    """Load or assemble the model. Under ZeRO-3 the HF loaders partition weights as they load."""
    dtype = training_dtype(args)
    attn = model_args.attn_implementation or default_attn_implementation()
    source_type = read_model_type(model_args.model_name_or_path)
    if source_type in LLAVA_CHECKPOINT_TYPES:
        logger.info("Starting from LLaVA checkpoint %s (%s)", model_args.model_name_or_path, source_type)
        model = load_pretrained_model(
            model_args.model_name_or_path, dtype=dtype, vision_tower=model_args.vision_tower, attn_implementation=attn
        )
        if model_args.video_tower and model.video_tower is None:
            raise ValueError(
                f"--video_tower was given but the checkpoint {model_args.model_name_or_path} has no video tower; "
                "start video training from a language model (plus --vision_tower/--video_tower) or a video checkpoint"
            )
    else:
        if not model_args.vision_tower:
            raise ValueError(
                f"--vision_tower is required when --model_name_or_path ({model_args.model_name_or_path}) "
                "is a plain language model"
            )
        language_model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, dtype=dtype, attn_implementation=attn
        )
        vision_model = CLIPVisionModel.from_pretrained(model_args.vision_tower, dtype=dtype, attn_implementation=attn)
        video_model = None
        if model_args.video_tower:
            video_model = CLIPVisionModel.from_pretrained(model_args.video_tower, dtype=dtype, attn_implementation=attn)
        model = DuetLlavaForCausalLM.from_components(
            language_model,
            vision_model,
            video_model=video_model,
            projector_type=model_args.mm_projector_type,
            vision_feature_layer=model_args.mm_vision_select_layer,
            vision_feature_select_strategy=model_args.mm_vision_select_feature,
            video_feature_select_strategy=model_args.mm_video_select_feature,
        )
    model.config.image_aspect_ratio = data_args.image_aspect_ratio
    model.config.template = data_args.version
    model.config.num_frames = data_args.num_frames
    model.set_compression(model_args.compression)
    model.config.use_cache = False
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    return model


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
    ) -> LlavaPipeline:
        """Load a LLaVA checkpoint directory (any layout :func:`load_pretrained_model` accepts).

        ``compression`` (a preset name, YAML path or dict) overrides the visual-token compression
        the checkpoint was trained with; ``"none"`` turns it off.

        The tokenizer and image processor are read from ``path`` (training's final save writes
        them there); for original LLaVA checkpoints the image processor comes from
        ``vision_tower``. A missing component raises :class:`MissingComponentError` naming it.
        ``dtype`` defaults to float32; ``device`` to CUDA when available. ``fast_decoding``: see the field.
        Checkpoints of any family load with :func:`llava.inference.load_pipeline`.
        """
        model_dir = Path(path)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        if not (model_dir / "config.json").is_file():
            hint = ""
            if (model_dir / "adapter_config.json").is_file():
                hint = " It holds a LoRA adapter: merge it first with `python -m llava.tools.merge_lora`."
            raise MissingComponentError(f"{model_dir} has no config.json, so it is not a model checkpoint.{hint}")
        checkpoint_type = read_model_type(model_dir)
        if checkpoint_type not in LLAVA_MODEL_TYPES:
            raise ValueError(
                f"{model_dir} is a {checkpoint_type!r} checkpoint, not a LLaVA one: load it with "
                "llava.inference.load_pipeline, which picks its model family"
            )
        if not _has_any(model_dir, _TOKENIZER_FILES):
            raise MissingComponentError(
                f"{model_dir} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
                "save one there with tokenizer.save_pretrained()"
            )
        processor_dir = model_dir
        if not _has_any(model_dir, _PROCESSOR_FILES):
            if vision_tower is None and checkpoint_type == "llava_llama":
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

    def sequence_lengths(self, inputs: dict[str, torch.Tensor]) -> list[int]:
        """Text tokens plus, per image (video) slot, the visual tokens it becomes after the V2V stage."""
        config = self.model.config
        ids = inputs["input_ids"] * inputs["attention_mask"]
        lengths = inputs["attention_mask"].sum(dim=-1)
        lengths += (ids == config.image_token_id).sum(dim=-1) * (config.llm_tokens_per_image - 1)
        if config.has_video_tower:
            lengths += (ids == config.video_token_id).sum(dim=-1) * (config.llm_tokens_per_video - 1)
        return lengths.tolist()

    def prepare(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Tokenize and left-pad a batch: ``input_ids``, ``attention_mask`` and, when the batch has any,
        ``pixel_values`` / ``pixel_values_videos`` stacked in the order their sentinels appear."""
        config = self.model.config
        ids: list[list[int]] = []
        images: list[str] = []
        videos: list[str] = []
        for request in requests:
            turns, request_images, request_videos = conversation_of(request)
            if request_videos and not config.has_video_tower:
                raise ValueError(f"request has videos but this model has no video tower: {request!r}")
            ids.append(
                build_conversation_ids(
                    self.tokenizer, self.template, turns, config.image_token_id, config.video_token_id
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


def _has_any(path: Path, names: Sequence[str]) -> bool:
    return any((path / name).is_file() for name in names)


def _original_tower(model_dir: Path) -> str | None:
    """``mm_vision_tower`` of an original LLaVA config (where its image processor lives)."""
    return read_config_json(model_dir / "config.json").get("mm_vision_tower")


def _visual_tokens_added(batch: dict[str, Any], config: DuetLlavaConfig) -> int:
    """Each image slot becomes ``tokens_per_image`` tokens, each video slot frames x ``tokens_per_frame``."""
    added = 0
    if (images := batch.get("pixel_values")) is not None:
        added += int(images.shape[0]) * (config.tokens_per_image - 1)
    if (videos := batch.get("pixel_values_videos")) is not None:
        added += int(videos.shape[0]) * (int(videos.shape[1]) * config.tokens_per_frame - 1)
    return added


class LlavaFamily:
    """LLaVA-1.5 / Video-LLaVA: CLIP tower(s) + projector + a causal LM, or a LLaVA checkpoint."""

    name = LLAVA_NAMES.name
    model_types = LLAVA_MODEL_TYPES
    hub_names = LLAVA_NAMES.hub_names  # none: the default family, of anything no other family names
    model_class = DuetLlavaForCausalLM
    modules = ("llava.families.llava", "llava.model.modeling", "llava.model.config", "llava.model.loading")
    projector_name = "projector"
    lora_targets = LORA_TARGETS

    def build_model(
        self, model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
    ) -> nn.Module:
        """See :func:`build_model`."""
        return build_model(model_args, data_args, args)

    def load_processors(self, model_args: ModelArguments, data_args: DataArguments, model: nn.Module) -> Processors:
        """The LM's (checkpoint's) tokenizer, the tower's (checkpoint's) image processor and the video tower's."""
        tokenizer, image_processor = load_processors(model_args, data_args)
        video_processor = load_video_processor(model_args, image_processor, model.config.has_video_tower)
        return Processors(tokenizer, image_processor, video_processor)

    def prepare(self, model: nn.Module, processors: Processors) -> None:
        """The pad token and the query vocabulary of T2V compression come from the tokenizer."""
        model.config.text_config.pad_token_id = processors.tokenizer.pad_token_id
        model.set_query_vocabulary(processors.tokenizer)

    def data_arguments(self, data_args: DataArguments, model: nn.Module) -> DataArguments:
        """The visual tokens one image (video) occupies in the LLM sequence, as the model's tower and
        compression make them (the length grouping's estimate)."""
        tokens = {"tokens_per_image": model.config.llm_tokens_per_image}
        if model.config.has_video_tower:
            tokens["tokens_per_video"] = model.config.llm_tokens_per_video
        return dataclasses.replace(data_args, **tokens)

    def dataset(self, data_args: DataArguments, processors: Processors, model: nn.Module) -> LazySupervisedDataset:
        """LLaVA conversations with ``<image>``/``<video>`` slots, one per picture or clip."""
        return LazySupervisedDataset(
            data_args,
            processors.tokenizer,
            processors.image_processor,
            model.config.image_token_id,
            video_processor=processors.video_processor,
            video_token_id=model.config.video_token_id,
        )

    def visual_tokens_added(self, batch: dict[str, Any], config: Any) -> int:
        """Each image (video) slot of ``input_ids`` is replaced by its visual tokens in the forward pass."""
        return _visual_tokens_added(batch, config)

    def load_pipeline(self, path: str | os.PathLike[str], options: PipelineOptions) -> GenerationPipeline:
        """See :meth:`LlavaPipeline.from_pretrained`."""
        return LlavaPipeline.from_pretrained(path, vision_tower=options.vision_tower, **options.loading_keywords())

    def random_model(
        self, config_fields: dict[str, Any], dtype: torch.dtype, device: str | torch.device | None, attn: str
    ) -> nn.Module:
        """A :class:`DuetLlavaForCausalLM` of ``DuetLlavaConfig(**config_fields)`` with random weights."""
        config = DuetLlavaConfig(**config_fields)
        for sub_config in (config.vision_config, config.text_config, config.video_config):
            if sub_config is not None:
                set_attn_implementation(sub_config, attn)
        return random_init(DuetLlavaForCausalLM, config, dtype, device)
