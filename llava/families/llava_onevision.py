"""The LLaVA-OneVision family (``llava-hf/llava-onevision-*-hf`` layout: SigLIP, ``anyres_max_9``, Qwen2):
transformers' ``LlavaOnevisionForConditionalGeneration`` run as :class:`~llava.model.llava_next.DuetLlavaNext`
(T2V compression over image and video tokens, fast decoding). Inference only for now: the training members raise
``NotImplementedError``.

Inference: prompts are rendered with the checkpoint's own chat template (the processor's ``chat_template.jinja``
or ``chat_template.json``) from the same user content as the other families
(:func:`~llava.pipeline.build_prompt_text`: images and videos where their tags are, else first). Images go
through the checkpoint's own image processor (AnyRes tiles; ``batch_num_images``: a sample with several images
gets their base views only, as OneVision's processor does). Videos are ``video_frames`` uniformly sampled frames
(:func:`llava.data.video.read_video_frames`, PyAV), laid out with the settings of the checkpoint's
``video_preprocessor_config.json`` (:func:`llava.hf_adapter.llava_onevision_frame_processor`: transformers'
``LlavaOnevisionVideoProcessor`` and so ``LlavaOnevisionProcessor`` need torchvision, which this project does
not). Each ``<image>``/``<video>`` tag is expanded to the model's own token count for it
(:func:`llava.hf_adapter.llava_onevision_tokens_per_image`, :func:`llava.hf_adapter.llava_onevision_video_tokens`).
Checked once against ``LlavaOnevisionProcessor`` with torchvision installed (tiny checkpoint, images alone and
together, text only, videos): the same ``input_ids``, ``batch_num_images``, ``image_sizes`` and image pixels;
video pixels within one 8-bit level (PIL's bicubic resize here, torchvision's there).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from transformers import AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from llava.arguments import LlavaTrainingArguments, ModelArguments
from llava.data.chat_template import chat_content
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.data.images import load_image
from llava.data.video import read_video_frames
from llava.families.base import PipelineOptions, Processors
from llava.hf_adapter import (
    llava_onevision_frame_processor,
    llava_onevision_tokens_per_image,
    llava_onevision_video_tokens,
    load_image_processor,
    set_attn_implementation,
)
from llava.model.hub_checkpoint import check_weight_files, read_config_json
from llava.model.llava_next import LLAVA_ONEVISION_MODEL_TYPES, DuetLlavaNext
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

ONEVISION_VIDEO_FRAMES = 32
"""Frames sampled per video: LLaVA-OneVision's video evaluation setting (32 uniformly sampled frames)."""
NO_TRAINING = "LLaVA-OneVision training is not supported yet (inference only: DuetLlavaNext, {what})"


def _no_training(what: str) -> NoReturn:
    raise NotImplementedError(NO_TRAINING.format(what=what))


def load_llava_onevision(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None, compression: Any = None, attn: str = "sdpa"
) -> DuetLlavaNext:
    """A LLaVA-OneVision checkpoint (local directory or Hub id) as :class:`DuetLlavaNext` (safetensors, no
    remote code)."""
    model_dir = Path(path)
    if model_dir.is_dir():
        read_config_json(model_dir / "config.json")
        check_weight_files(model_dir)
    hf_model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn, use_safetensors=True
    )
    return DuetLlavaNext(hf_model, compression)


def processor_chat_template(model_dir: Path) -> str:
    """The processor's chat template of a checkpoint directory (``chat_template.jinja``, or the older
    ``chat_template.json``); the tokenizer's own (Qwen2's) does not place images and videos."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = model_dir / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text(encoding="utf-8"))["chat_template"]
    raise MissingComponentError(f"{model_dir} has no chat template (chat_template.jinja or chat_template.json)")


def video_settings(model_dir: Path, image_processor: Any) -> dict[str, Any]:
    """How the checkpoint lays out video frames: its ``video_preprocessor_config.json``; without one, the image
    processor's normalisation at one view's size."""
    path = model_dir / "video_preprocessor_config.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    logger.warning("%s has no video_preprocessor_config.json: video frames use the image processor's settings", path)
    fields = ("size", "resample", "rescale_factor", "image_mean", "image_std")
    return {field: getattr(image_processor, field, None) for field in fields}


def expand_placeholders(text: str, placeholder: str, counts: Iterator[int]) -> str:
    """``text`` with each ``placeholder`` repeated as many times as the next of ``counts`` says, in order."""
    parts = text.split(placeholder)
    return parts[0] + "".join(placeholder * next(counts) + part for part in parts[1:])


@dataclass(kw_only=True)
class LlavaOnevisionPipeline(GenerationPipeline):
    """LLaVA-OneVision model + tokenizer, the processor's chat template, the image processor and a frame
    processor for videos (see the module docstring)."""

    model: DuetLlavaNext
    image_processor: Any
    frame_processor: Any
    chat_template: str
    video_frames: int = ONEVISION_VIDEO_FRAMES
    video_backend: str = "pyav"

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        compression: Any = None,
        fast_decoding: bool | None = None,
        video_frames: int = ONEVISION_VIDEO_FRAMES,
        video_backend: str = "pyav",
    ) -> LlavaOnevisionPipeline:
        """Load a LLaVA-OneVision directory (weights, tokenizer, processor files) on ``device``; videos are
        ``video_frames`` uniformly sampled frames read with ``video_backend``."""
        model_dir = Path(path)
        model = load_llava_onevision(model_dir, dtype=dtype, compression=compression)
        device = torch.device(device) if device is not None else default_device()
        model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        tokenizer.padding_side = "left"
        image_processor = load_image_processor(str(model_dir))
        logger.info("Loaded LLaVA-OneVision %s on %s", model_dir, device)
        return cls(
            model=model, tokenizer=tokenizer, fast_decoding=fast_decoding, image_processor=image_processor,
            frame_processor=llava_onevision_frame_processor(video_settings(model_dir, image_processor)),
            chat_template=processor_chat_template(model_dir), video_frames=video_frames, video_backend=video_backend,
        )  # fmt: skip

    def _eos_ids(self) -> list[int]:
        configured = self.model.hf_model.generation_config.eos_token_id
        ids = [configured] if isinstance(configured, int) else list(configured or [])
        return ids or super()._eos_ids()

    def prepare(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Chat-templated, left-padded ``input_ids``/``attention_mask`` with every image and video placeholder
        expanded to its token count and, when the batch has them, ``pixel_values``/``image_sizes``/
        ``batch_num_images`` (the image processor's) and ``pixel_values_videos`` (``[videos, frames, C, H, W]``)."""
        texts, images, videos = [], [], []
        for request in requests:
            if "prompt" not in request or not isinstance(request["prompt"], str):
                raise ValueError(f"request needs a string 'prompt': {request!r}")
            image_files, video_files = image_paths(request.get("image")), image_paths(request.get("video"), "video")
            content = chat_content(build_prompt_text(request["prompt"], len(image_files), len(video_files)))
            message = [{"role": "user", "content": content}]
            options = {"chat_template": self.chat_template, "add_generation_prompt": True, "tokenize": False}
            texts.append(self.tokenizer.apply_chat_template(message, **options))
            images.append([load_image(path) for path in image_files])
            videos.extend(read_video_frames(path, self.video_frames, self.video_backend) for path in video_files)
        batch: dict[str, torch.Tensor] = {}
        config, hf_model = self.model.config, self.model.hf_model
        if any(images):
            processed = self.image_processor(images=images, return_tensors="pt")
            batch_num_images = torch.as_tensor(processed["batch_num_images"])
            batch.update(
                pixel_values=processed["pixel_values"], image_sizes=processed["image_sizes"],
                batch_num_images=batch_num_images,
            )  # fmt: skip
            counts = iter(llava_onevision_tokens_per_image(hf_model, processed["image_sizes"], batch_num_images))
            image_token = self.tokenizer.convert_ids_to_tokens(config.image_token_id)
            texts = [expand_placeholders(text, image_token, counts) for text in texts]
        if videos:
            frames = [self.frame_processor(images=video, return_tensors="pt")["pixel_values"] for video in videos]
            batch["pixel_values_videos"] = torch.stack(frames)
            video_token = self.tokenizer.convert_ids_to_tokens(config.video_token_id)
            counts = iter([llava_onevision_video_tokens(hf_model, self.video_frames)] * len(videos))
            texts = [expand_placeholders(text, video_token, counts) for text in texts]
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **batch}


class LlavaOnevisionFamily:
    """LLaVA-OneVision checkpoints (``model_type`` ``llava_onevision``)."""

    name = "llava_onevision"
    model_types = LLAVA_ONEVISION_MODEL_TYPES
    hub_names = ("llava-onevision", "llava_onevision")
    model_class = DuetLlavaNext
    modules = ("llava.families.llava_onevision",)
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
        """See :meth:`LlavaOnevisionPipeline.from_pretrained` (``options.vision_tower`` does not apply: the
        checkpoint holds its SigLIP tower)."""
        if options.vision_tower:
            logger.warning("%s is a LLaVA-OneVision checkpoint with its own vision tower: ignoring vision_tower", path)
        return LlavaOnevisionPipeline.from_pretrained(path, **options.loading_keywords())

    def random_model(
        self, config_fields: dict[str, Any], dtype: torch.dtype, device: str | torch.device | None, attn: str
    ) -> nn.Module:
        """A :class:`DuetLlavaNext` around ``LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(
        **config_fields))`` with random weights."""
        config = LlavaOnevisionConfig(**config_fields)
        for part in (config, config.text_config, config.vision_config):
            set_attn_implementation(part, attn)
        return DuetLlavaNext(random_init(LlavaOnevisionForConditionalGeneration, config, dtype, device))
