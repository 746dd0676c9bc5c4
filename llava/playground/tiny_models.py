"""Tiny randomly initialised models with real-model geometry, built offline for the playground.

The vision tower keeps CLIP ViT-L/14-336's token geometry (336 px, patch 14, so 576 patches + CLS
= 577 tokens) so that token-reduction code sees realistic shapes, while width and depth are tiny so
everything runs on a CPU in seconds. The video tower is the same model at Video-LLaVA's frame
geometry (224 px, patch 14: 256 patches + CLS = 257 tokens per frame). The LLM is a tiny LLaMA
sized to the playground tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from llava.hf_adapter import clip_image_processor_class

logger = logging.getLogger(__name__)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

VISION_DEFAULTS: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 64,
}
VIDEO_TOWER_IMAGE_SIZE = 224
"""Frame size of the video tower (Video-LLaVA's LanguageBind/CLIP-L/14 at 224 px: 256 patches + CLS)."""
LLM_DEFAULTS: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}


def build_tiny_vision_tower(seed: int = 0, **overrides: int) -> CLIPVisionModel:
    """Random tiny ``CLIPVisionModel`` with CLIP-L/14-336 token geometry (577 tokens per image)."""
    config = CLIPVisionConfig(**{**VISION_DEFAULTS, **overrides}, hidden_act="quick_gelu")
    torch.manual_seed(seed)
    return CLIPVisionModel(config).eval()


def build_clip_image_processor(image_size: int = 336):
    """CLIP image processor: resize shortest edge to ``image_size``, centre-crop, CLIP mean/std."""
    return clip_image_processor_class()(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
    )


def build_tiny_llama(
    tokenizer: PreTrainedTokenizerBase, seed: int = 0, initializer_range: float = 0.02, **overrides: int
) -> LlamaForCausalLM:
    """Random tiny ``LlamaForCausalLM`` whose vocab and bos/eos/pad ids match ``tokenizer``."""
    config = LlamaConfig(
        **{**LLM_DEFAULTS, **overrides},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_vision_tower(out_dir: Path, seed: int = 0, image_size: int | None = None) -> CLIPVisionModel:
    """Build and save the tiny tower plus its image processor (safetensors) into ``out_dir``.

    ``image_size`` overrides the default 336 px (e.g. 224 for the Video-LLaVA-geometry video tower).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_tiny_vision_tower(seed, **({} if image_size is None else {"image_size": image_size}))
    model.save_pretrained(out_dir, safe_serialization=True)
    build_clip_image_processor(model.config.image_size).save_pretrained(out_dir)
    logger.info(
        "saved tiny vision tower (%d px, %d params) to %s", model.config.image_size, model.num_parameters(), out_dir
    )
    return model


def save_video_tower(out_dir: Path, seed: int = 0) -> CLIPVisionModel:
    """Save a tiny tower with Video-LLaVA's per-frame geometry (224 px, patch 14: 257 tokens a frame).

    Same width and depth as the image tower; only the input size (hence position embeddings) differs.
    """
    return save_vision_tower(out_dir, seed=seed, image_size=VIDEO_TOWER_IMAGE_SIZE)


def ensure_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make ``tokenizer(text)`` start with ``<s>`` like the LLaMA/Vicuna tokenizer.

    LLaVA's conversation preprocessing masks targets assuming a leading BOS; without it the
    label masks shift by one token. No-op if the tokenizer already adds BOS.
    """
    ids = tokenizer("a").input_ids
    if ids and ids[0] == tokenizer.bos_token_id:
        return
    tokenizer.add_bos_token = True
    if tokenizer("a").input_ids[0] != tokenizer.bos_token_id:
        raise ValueError(f"could not make {type(tokenizer).__name__} prepend the BOS token")
    logger.info("enabled add_bos_token on the playground tokenizer")


def save_llm(out_dir: Path, tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides: int) -> LlamaForCausalLM:
    """Build and save the tiny LLaMA (``overrides`` change :data:`LLM_DEFAULTS`) and its tokenizer
    (safetensors) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_bos(tokenizer)
    model = build_tiny_llama(tokenizer, seed, **overrides)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    logger.info("saved tiny LLaMA (%d params, vocab %d) to %s", model.num_parameters(), len(tokenizer), out_dir)
    return model
