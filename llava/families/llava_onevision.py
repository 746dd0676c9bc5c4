"""The LLaVA-OneVision family (``llava-hf/llava-onevision-*-hf`` layout: SigLIP, ``anyres_max_9``, Qwen2):
transformers' ``LlavaOnevisionForConditionalGeneration`` run as :class:`~llava.model.llava_next.DuetLlavaNext`
(T2V compression over image and video tokens, fast decoding), for training and inference.

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

Training (``--version chat_template``): LLaVA-format conversations rendered with the processor's chat template
(every message's content as a list; no ids before it, as the pipeline tokenizes), labels on the assistant answers
only, each learned through the template's end-of-turn marker (plus the tokenizer's EOS when the template writes
none). The Hub checkpoints' template (written by transformers' conversion script) renders an answered turn as its
generation prompt ``<|im_start|>assistant\n`` + answer + ``<|im_end|>``, as LLaVA-OneVision's own ``qwen_1_5``
training format does; a template whose answered turns start otherwise (e.g. ``<|im_start|>assistant \n`` in
transformers' processor tests) gets every answer trained after its generation prompt, as inference asks for it. A
sample's images go through the image processor together, as at inference (:class:`OnevisionImages`): one image gets
its AnyRes views, several get their base views only (``batch_num_images``); the views are concatenated over the
batch (``pixel_values`` ``[sum views, 3, H, W]``, ``image_sizes`` ``[images, 2]``, ``batch_num_images``
``[samples with images]``) and each placeholder is expanded to the model's own token count. ``"video"`` samples
(under ``--video_folder``): each video ``--num_frames`` uniformly sampled frames laid out as the pipeline does
(``pixel_values_videos`` ``[videos, frames, 3, H, W]``), its placeholder expanded to the model's per-video count.
Truncation keeps images and videos whole (when it drops some of a sample's images, the kept ones are processed
again, so their views and counts follow ``batch_num_images``). Stages as for LLaVA-NeXT: finetuning trains the
decoder, the projector, ``image_newline`` and the LM head (tied to the embeddings in Qwen2-0.5B checkpoints: saved
once, as transformers does); LoRA adapters on the decoder's linear layers + the full projector; the SigLIP tower is
always frozen. Every full save is a plain LLaVA-OneVision checkpoint in transformers' own layout with the image
processor, the chat template and the video settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from llava.arguments import LlavaTrainingArguments, ModelArguments
from llava.data.chat_template import ChatTemplateEncoder, ImageInputs, processor_chat_template
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.data.images import load_image
from llava.data.video import read_video_frames
from llava.families.base import PipelineOptions, Processors, build_from_checkpoint, random_wrapped_model
from llava.families.names import LLAVA_ONEVISION_NAMES
from llava.hf_adapter import (
    llava_next_views_per_image,
    llava_onevision_frame_processor,
    llava_onevision_tokens_per_image,
    llava_onevision_video_tokens,
    load_image_processor,
)
from llava.model.hub_checkpoint import load_hf_checkpoint
from llava.model.llava_next import LLAVA_ONEVISION_MODEL_TYPES, DuetLlavaNext
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

ONEVISION_VIDEO_FRAMES = 32
"""Frames sampled per video: LLaVA-OneVision's video evaluation setting (32 uniformly sampled frames)."""
CHAT_TEMPLATE_FILE = "chat_template.jinja"
VIDEO_SETTINGS_FILE = "video_preprocessor_config.json"
CHECKPOINT_FILES = ("*.json", "*.jinja", "*.txt", "*.model")
"""What a Hub checkpoint's processor files match (tokenizer, image processor, chat template, video settings)."""


def load_llava_onevision(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None, compression: Any = None, attn: str = "sdpa"
) -> DuetLlavaNext:
    """A LLaVA-OneVision checkpoint (local directory or Hub id) as :class:`DuetLlavaNext` (safetensors, no
    remote code)."""
    hf_model = load_hf_checkpoint(LlavaOnevisionForConditionalGeneration, path, dtype, attn)
    return DuetLlavaNext(hf_model, compression)


def checkpoint_chat_template(model_dir: Path) -> str:
    """The processor's chat template of a checkpoint directory; the tokenizer's own (Qwen2's) does not place
    images and videos."""
    template = processor_chat_template(model_dir)
    if template is None:
        raise MissingComponentError(f"{model_dir} has no chat template (chat_template.jinja or chat_template.json)")
    return template


def video_settings(model_dir: Path, image_processor: Any) -> dict[str, Any]:
    """How the checkpoint lays out video frames: its ``video_preprocessor_config.json``; without one, the image
    processor's normalisation at one view's size."""
    path = model_dir / VIDEO_SETTINGS_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    logger.warning("%s has no video_preprocessor_config.json: video frames use the image processor's settings", path)
    fields = ("size", "resample", "rescale_factor", "image_mean", "image_std")
    return {field: getattr(image_processor, field, None) for field in fields}


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
            chat_template=checkpoint_chat_template(model_dir), video_frames=video_frames, video_backend=video_backend,
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
        options = {"chat_template": self.chat_template, "add_generation_prompt": True, "tokenize": False}
        for request in map(chat_request, requests):
            texts.append(self.tokenizer.apply_chat_template(request.messages, **options))
            images.append([load_image(path) for path in request.images])
            videos.extend(read_video_frames(path, self.video_frames, self.video_backend) for path in request.videos)
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


def checkpoint_directory(source: str) -> Path:
    """``source`` as a local directory: itself, or a Hub id's processor files (no weights) in the Hub cache."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=list(CHECKPOINT_FILES)))


class OnevisionImages:
    """LLaVA-OneVision's data path for training: the checkpoint's image processor (saved as itself, with the
    processor's chat template and the video settings beside it), a sample's images (:meth:`inputs`) and videos
    (:meth:`videos`) in the layout the training batch takes, with each one's placeholder count from the model's
    own feature layout (``hf_model``; only its config and packing rules are used, no weights)."""

    def __init__(
        self, image_processor: Any, chat_template: str, settings: dict[str, Any], hf_model: nn.Module | None = None
    ) -> None:
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.settings = settings
        self.frame_processor = llava_onevision_frame_processor(settings)
        self.hf_model = hf_model
        self.num_frames = ONEVISION_VIDEO_FRAMES
        self.video_backend = "pyav"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.image_processor(*args, **kwargs)

    def save_pretrained(self, output_dir: str | os.PathLike[str]) -> Any:
        """The image processor, ``chat_template.jinja`` and ``video_preprocessor_config.json``: what
        :class:`LlavaOnevisionPipeline` reads (also after a LoRA merge, which saves only this and the tokenizer)."""
        output = Path(output_dir)
        saved = self.image_processor.save_pretrained(str(output))
        (output / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")
        (output / VIDEO_SETTINGS_FILE).write_text(json.dumps(self.settings, indent=2) + "\n", encoding="utf-8")
        return saved

    def _model(self) -> nn.Module:
        if self.hf_model is None:
            raise ValueError("OnevisionImages needs the model (hf_model) to count placeholders")
        return self.hf_model

    def inputs(self, images: list[Any]) -> ImageInputs:
        """A sample's images through the image processor together (as the pipeline's batch of one): one image gets
        its AnyRes views, each of several its base view only; ``pixel_values`` those views concatenated
        ``[sum views, 3, H, W]``, ``image_sizes`` ``[images, 2]``, ``batch_num_images`` ``[1]`` and each image's
        placeholder count (:func:`llava.hf_adapter.llava_onevision_tokens_per_image`)."""
        model = self._model()
        processed = self.image_processor(images=[images], return_tensors="pt")
        sizes = torch.as_tensor(processed["image_sizes"]).long()
        count = torch.tensor([len(images)])
        views = llava_next_views_per_image(model, sizes) if len(images) == 1 else [1] * len(images)
        pixels = torch.cat([view[:n] for view, n in zip(processed["pixel_values"], views, strict=True)])
        tokens = llava_onevision_tokens_per_image(model, sizes, count)
        tensors = {"pixel_values": pixels, "image_sizes": sizes, "batch_num_images": count}
        return ImageInputs(tensors, np.asarray(tokens, dtype=np.int64), np.asarray(views, dtype=np.int64))

    def videos(self, paths: list[str]) -> ImageInputs:
        """Each video as ``num_frames`` uniformly sampled frames laid out as the pipeline does
        (``pixel_values_videos`` ``[videos, frames, 3, H, W]``) and its placeholder count
        (:func:`llava.hf_adapter.llava_onevision_video_tokens`)."""
        frames = [
            self.frame_processor(images=read_video_frames(path, self.num_frames, self.video_backend),
                                 return_tensors="pt")["pixel_values"]
            for path in paths
        ]  # fmt: skip
        tokens = llava_onevision_video_tokens(self._model(), self.num_frames)
        ones = np.ones(len(paths), dtype=np.int64)
        return ImageInputs({"pixel_values_videos": torch.stack(frames)}, ones * tokens, ones)


def hf_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a (possibly peft-wrapped) :class:`DuetLlavaNext`."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.hf_model


class LlavaOnevisionFamily:
    """LLaVA-OneVision checkpoints (``model_type`` ``llava_onevision``)."""

    name = LLAVA_ONEVISION_NAMES.name
    model_types = LLAVA_ONEVISION_MODEL_TYPES
    hub_names = LLAVA_ONEVISION_NAMES.hub_names
    model_class = DuetLlavaNext
    modules = ("llava.families.llava_onevision",)
    projector_name = "multi_modal_projector"
    lora_targets = LORA_TARGETS  # the decoder's linear layers (under ``language_model``; not SigLIP's)

    def build_model(
        self, model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
    ) -> DuetLlavaNext:
        """The checkpoint as :class:`DuetLlavaNext` in the training dtype, compression set; ``--version`` must
        be ``chat_template`` and the LLaVA-1.5 tower settings are refused (the checkpoint has its own)."""
        return build_from_checkpoint("LLaVA-OneVision", load_llava_onevision, model_args, data_args, args)

    def load_processors(self, model_args: ModelArguments, data_args: DataArguments, model: nn.Module) -> Processors:
        """The checkpoint's tokenizer (right-padded, with the processor's chat template) and its image processor
        with the chat template and video settings (:class:`OnevisionImages`, saved with every checkpoint)."""
        model_dir = checkpoint_directory(model_args.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        tokenizer.model_max_length = data_args.model_max_length
        tokenizer.padding_side = "right"
        template = checkpoint_chat_template(model_dir)
        tokenizer.chat_template = template  # the tokenizer's own (Qwen2's) does not place images and videos
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        image_processor = load_image_processor(str(model_dir))
        settings = video_settings(model_dir, image_processor)
        images = OnevisionImages(image_processor, template, settings, hf_model_of(model) if model is not None else None)
        return Processors(tokenizer, images)

    def prepare(self, model: nn.Module, processors: Processors) -> None:
        """Nothing to tie: the placeholders are expanded in the data."""

    def data_arguments(self, data_args: DataArguments, model: nn.Module) -> DataArguments:
        """Length grouping counts each video at the model's own per-video token count for ``--num_frames``;
        each image at ``--tokens_per_image`` (a constant: AnyRes counts depend on each image's size)."""
        tokens = llava_onevision_video_tokens(hf_model_of(model), data_args.num_frames)
        return dataclasses.replace(data_args, tokens_per_video=tokens)

    def dataset(self, data_args: DataArguments, processors: Processors, model: nn.Module) -> LazySupervisedDataset:
        """LLaVA JSON through the processor's chat template, images and videos as the pipeline lays them out (see
        the module docstring)."""
        tokenizer = processors.tokenizer
        config = model.config
        images: OnevisionImages = processors.image_processor
        images.hf_model = hf_model_of(model)
        images.num_frames, images.video_backend = data_args.num_frames, data_args.video_backend
        for name, token_id in (("image", config.image_token_id), ("video", config.video_token_id)):
            token = tokenizer.convert_ids_to_tokens(token_id)
            if token is None or tokenizer.convert_tokens_to_ids(f"<{name}>") != token_id:
                raise ValueError(
                    f"the tokenizer's <{name}> is not the model's {name}_token_id {token_id}: config.json and the "
                    "tokenizer files come from different checkpoints"
                )
        encoder = ChatTemplateEncoder(
            tokenizer,
            images,
            image_token_id=config.image_token_id,
            max_length=data_args.model_max_length,
            video_token_id=config.video_token_id,
            image_inputs=images.inputs,
            video_inputs=images.videos,
            content_lists=True,
            answer_end_id=tokenizer.eos_token_id,
            recount_kept_images=True,
            answers_after_generation_prompt=True,
        )
        return LazySupervisedDataset(
            data_args, tokenizer, images, config.image_token_id, video_token_id=config.video_token_id, encoder=encoder
        )

    def visual_tokens_added(self, batch: dict[str, Any], config: Any) -> int:
        """None: each image's and video's placeholders are expanded in ``input_ids`` already."""
        return 0

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
        return random_wrapped_model(
            LlavaOnevisionForConditionalGeneration,
            LlavaOnevisionConfig(**config_fields),
            DuetLlavaNext,
            dtype,
            device,
            attn,
        )
