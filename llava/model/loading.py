"""Load a model from any supported checkpoint layout, dispatching on ``config.json``'s model_type.

Supported: this project's own format (``duet_llava``), the HF port
(``LlavaForConditionalGeneration``, model_type ``llava``, e.g. llava-hf/llava-1.5-7b-hf) and the
original LLaVA-1.5 release (model_type ``llava_llama``, ``mm_projector.*`` keys, tower named by
``mm_vision_tower``), and the HF port of Video-LLaVA (``VideoLlavaForConditionalGeneration``,
model_type ``video_llava``, e.g. LanguageBind/Video-LLaVA-7B-hf). The decision never looks at the model's name or path.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    VideoLlavaForConditionalGeneration,
)

from llava.constants import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.hf_adapter import causal_lm_from_parts, set_attn_implementation
from llava.model.config import DuetLlavaConfig
from llava.model.hub_checkpoint import check_weight_files, checkpoint_config, read_config_json
from llava.model.modeling import DuetLlavaForCausalLM
from llava.model.precision import cast_model
from llava.utils.attention import default_attn_implementation

logger = logging.getLogger(__name__)

_HF_STRATEGY = {"default": "patch", "full": "cls_patch"}
_ORIGINAL_STRATEGY = {"patch": "patch", "cls_patch": "cls_patch"}


def read_model_type(path: str | Path) -> str:
    """``model_type`` of a local checkpoint's config.json or of a Hub config (which LLaVA layout it is)."""
    config = checkpoint_config(path)
    if "model_type" not in config:
        raise ValueError(f"{Path(path) / 'config.json'} has no 'model_type'")
    return config["model_type"]


def load_pretrained_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    vision_tower: str | None = None,
    attn_implementation: str | None = None,
) -> DuetLlavaForCausalLM:
    """Load any supported checkpoint as a :class:`DuetLlavaForCausalLM`.

    Args:
        path: local directory or Hub id.
        dtype: parameter dtype (default: float32).
        vision_tower: for original LLaVA checkpoints, a path overriding ``mm_vision_tower``
            (e.g. a local copy of openai/clip-vit-large-patch14-336).
        attn_implementation: ``sdpa``/``flash_attention_2``/``eager``; default picks the fastest available.
    """
    attn = attn_implementation or default_attn_implementation()
    dtype = dtype or torch.float32
    model_type = read_model_type(path)
    if Path(path).is_dir():
        check_weight_files(Path(path))
    if model_type == DuetLlavaConfig.model_type:
        return DuetLlavaForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
    if model_type == "llava":
        return convert_hf_llava(
            LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
        )
    if model_type == "video_llava":
        return convert_hf_video_llava(
            VideoLlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype, attn_implementation=attn)
        )
    if model_type == "llava_llama":
        return load_original_llava(path, dtype=dtype, vision_tower=vision_tower, attn_implementation=attn)
    raise ValueError(
        f"{path}: unsupported model_type {model_type!r}; expected 'duet_llava', 'llava' (HF port), "
        "'video_llava' (HF port of Video-LLaVA) or 'llava_llama' (original LLaVA-1.5)"
    )


def _check_hf_projector(hf_config: Any) -> int:
    """The feature layer of a HF (Video-)LLaVA config, after checking we support its projector."""
    feature_layer = hf_config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(f"multi-layer vision features {feature_layer!r} are not supported")
    if hf_config.projector_hidden_act != "gelu" or not getattr(hf_config, "multimodal_projector_bias", True):
        raise ValueError(
            f"only LLaVA-1.5's GELU projector with bias is supported, got act={hf_config.projector_hidden_act!r}"
        )
    return feature_layer


def _rehome_hf_modules(
    hf_model: Any, config: DuetLlavaConfig, image_tower: nn.Module, video_tower: nn.Module | None = None
) -> DuetLlavaForCausalLM:
    """Move a HF port's towers, LM and projector layers into our composition.

    The modules themselves move (nothing is copied): they keep the port's dtype, its float32 RoPE buffers and,
    when transformers loaded them under ZeRO-3, their partitioned parameters, and no second copy of a 7B
    model is ever held.
    """
    hf_config = hf_model.config
    language_model = causal_lm_from_parts(
        hf_config.text_config, hf_model.model.language_model, hf_model.get_output_embeddings()
    )
    model = DuetLlavaForCausalLM(
        config, language_model=language_model, vision_model=image_tower, video_model=video_tower
    )
    source = hf_model.model.multi_modal_projector
    model.projector[0] = source.linear_1
    model.projector[2] = source.linear_2
    return cast_model(model, hf_model.dtype)


def convert_hf_llava(hf_model: LlavaForConditionalGeneration) -> DuetLlavaForCausalLM:
    """Re-home the modules of a HF ``LlavaForConditionalGeneration`` into our composition.

    The image token id becomes our sentinel because our data pipeline inserts one slot per image
    instead of expanding ``<image>`` to 576 ids.
    """
    hf_config = hf_model.config
    config = DuetLlavaConfig(
        vision_config=hf_config.vision_config,
        text_config=hf_config.text_config,
        projector_type="mlp2x_gelu",
        vision_feature_layer=_check_hf_projector(hf_config),
        vision_feature_select_strategy=_HF_STRATEGY[hf_config.vision_feature_select_strategy],
        image_token_id=IMAGE_TOKEN_ID,
    )
    return _rehome_hf_modules(hf_model, config, hf_model.model.vision_tower)


def convert_hf_video_llava(hf_model: VideoLlavaForConditionalGeneration, num_frames: int = 8) -> DuetLlavaForCausalLM:
    """Re-home a HF ``VideoLlavaForConditionalGeneration``: image and video towers (one shared CLIP
    config), one projector, the LLM.

    HF selects image features by ``vision_feature_select_strategy`` and keeps every token of a frame
    (CLS included: 257 per frame at 224 px), which our ``video_feature_select_strategy="cls_patch"``
    reproduces. Our sentinels replace HF's expanded ``<image>``/``<video>`` ids (one slot per image or
    video). Video-LLaVA pads images to squares and samples 8 frames.
    """
    hf_config = hf_model.config
    config = DuetLlavaConfig(
        vision_config=hf_config.vision_config,
        text_config=hf_config.text_config,
        video_config=hf_config.vision_config,
        projector_type="mlp2x_gelu",
        vision_feature_layer=_check_hf_projector(hf_config),
        vision_feature_select_strategy=_HF_STRATEGY[hf_config.vision_feature_select_strategy],
        video_feature_select_strategy="cls_patch",
        num_frames=num_frames,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
    )
    return _rehome_hf_modules(hf_model, config, hf_model.model.image_tower, hf_model.model.video_tower)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) checkpoint: safetensors, else ``.bin`` with weights_only."""
    tensors: dict[str, torch.Tensor] = {}
    safetensor_files = sorted(path.glob("*.safetensors"))
    if safetensor_files:
        for file in safetensor_files:
            tensors.update(load_file(str(file)))
        return tensors
    bin_files = sorted(path.glob("pytorch_model*.bin"))
    if not bin_files:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weight files")
    for file in bin_files:
        tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    return tensors


def load_original_llava(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    vision_tower: str | None = None,
    attn_implementation: str = "sdpa",
) -> DuetLlavaForCausalLM:
    """Import an original LLaVA-1.5 checkpoint (``llava_llama``): LLaMA weights + ``mm_projector``.

    The tower is loaded from ``vision_tower`` or the checkpoint's ``mm_vision_tower``.
    """
    path = Path(path)
    raw = read_config_json(path / "config.json")
    tower_path = vision_tower or raw.get("mm_vision_tower")
    if not tower_path:
        raise ValueError(f"{path}/config.json has no 'mm_vision_tower'; pass vision_tower=")
    text_fields = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in _ORIGINAL_ONLY_KEYS}
    text_fields["model_type"] = "llama"
    text_config = AutoConfig.for_model(**text_fields)
    set_attn_implementation(text_config, attn_implementation)

    state = _read_state_dict(path)
    projector_state = {
        re.sub(r"^model\.mm_projector\.", "", key): value
        for key, value in state.items()
        if key.startswith("model.mm_projector.")
    }
    language_state = {
        key: value for key, value in state.items() if not key.startswith(("model.mm_projector.", "model.vision_tower."))
    }
    vision_model = CLIPVisionModel.from_pretrained(tower_path, dtype=dtype, attn_implementation=attn_implementation)
    language_model = AutoModelForCausalLM.from_config(text_config, dtype=dtype)
    missing, unexpected = language_model.load_state_dict(language_state, strict=False)
    missing = [key for key in missing if "rotary_emb" not in key]
    if missing or unexpected:
        raise ValueError(
            f"{path}: language-model weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    config = DuetLlavaConfig(
        vision_config=vision_model.config,
        text_config=text_config,
        projector_type=raw.get("mm_projector_type", "linear"),
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=_ORIGINAL_STRATEGY[raw.get("mm_vision_select_feature", "patch")],
        image_aspect_ratio=raw.get("image_aspect_ratio", "square"),
    )
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        raise ValueError(f"{path}: mm_use_im_start_end / mm_use_im_patch_token checkpoints are not supported")
    model = DuetLlavaForCausalLM(config, language_model=language_model, vision_model=vision_model)
    model.projector.load_state_dict(projector_state)
    return cast_model(model, dtype)


_ORIGINAL_ONLY_KEYS = {
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "freeze_mm_mlp_adapter",
    "tune_mm_mlp_adapter",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "use_mm_proj",
    "unfreeze_mm_vision_tower",
    "architectures",
}
