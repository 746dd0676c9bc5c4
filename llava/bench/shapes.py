"""Model shapes for benchmarks: the dimensions the FLOP model needs, and random-weight models built from them.

A :class:`ModelShape` names a vision tower (CLIP), a decoder-only LLM (LLaMA/Vicuna) and the text lengths of a
typical training sample, so that the analytic FLOP model (:mod:`llava.bench.flops`) and the measured speed
benchmarks talk about the same model. Shapes:

* ``tiny``: seconds-fast unit-test model (16 patches, 2+2 layers).
* ``small``: CPU benchmark model with LLaVA-1.5's real token geometry (336 px / patch 14 = 576 patches + CLS,
  about 100 text tokens) but reduced width and depth (tower 4 layers of 128, 3 run; LLM 8 layers of 320): about
  0.27 TFLOPs per batch-4 finetune step, a few seconds on a small CPU, and the LLM dominates the cost (about
  97 %), as in the real model. Its narrow width makes attention a larger share of a layer than in Vicuna-7B.
* ``llava-7b`` / ``llava-13b``: CLIP-L/14-336 with Vicuna-7B / Vicuna-13B (LLaVA-1.5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import CLIPVisionConfig, LlamaConfig

from llava.compression.config import CompressionConfig
from llava.model.vision_tower import layers_to_run

if TYPE_CHECKING:
    from llava.model.modeling import DuetLlavaForCausalLM

__all__ = ["SHAPES", "LLMShape", "ModelShape", "VisionShape", "build_model", "get_shape"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisionShape:
    """CLIP vision tower dimensions; ``feature_layer`` indexes its hidden states as LLaVA does (-2)."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    image_size: int = 336
    patch_size: int = 14
    feature_layer: int = -2

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (576 for CLIP-L/14-336); the tower also carries one CLS token."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_run(self) -> int:
        """Encoder layers actually computed to reach the feature layer (24 layers, -2 -> 23)."""
        return layers_to_run(self.num_layers, self.feature_layer)


@dataclass(frozen=True)
class LLMShape:
    """LLaMA decoder dimensions (``kv_heads < heads`` means grouped-query attention)."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads


@dataclass(frozen=True)
class ModelShape:
    """A whole LLaVA model plus the text lengths of a typical sample.

    ``text_tokens``: finetune prompt + answer text tokens per sample (system prompt, question, answer);
    ``answer_tokens``: the supervised part of them; ``pretrain_text_tokens``: text tokens of a ``plain``
    pretraining sample (BOS + caption + separator), all supervised but the BOS.
    """

    name: str
    vision: VisionShape
    llm: LLMShape
    projector: str = "mlp2x_gelu"
    text_tokens: int = 100
    answer_tokens: int = 30
    pretrain_text_tokens: int = 30


_CLIP_L_336 = VisionShape(num_layers=24, hidden=1024, intermediate=4096, heads=16)

SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(
        name="tiny",
        vision=VisionShape(num_layers=2, hidden=32, intermediate=64, heads=4, image_size=56, patch_size=14),
        llm=LLMShape(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128),
        text_tokens=16,
        answer_tokens=6,
        pretrain_text_tokens=8,
    ),
    "small": ModelShape(
        name="small",
        vision=VisionShape(num_layers=4, hidden=128, intermediate=512, heads=4),
        # 8 layers keep the presets' boundaries (0.5, 0.75) on whole layers (4, 6) as on the 32-layer Vicuna.
        llm=LLMShape(num_layers=8, hidden=320, intermediate=864, heads=5, kv_heads=5, vocab=32000),
    ),
    "llava-7b": ModelShape(
        name="llava-7b",
        vision=_CLIP_L_336,
        llm=LLMShape(num_layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    ),
    "llava-13b": ModelShape(
        name="llava-13b",
        vision=_CLIP_L_336,
        llm=LLMShape(num_layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40, vocab=32000),
    ),
}


def get_shape(name: str | ModelShape) -> ModelShape:
    """The shape called ``name`` (a :class:`ModelShape` is returned as is)."""
    if isinstance(name, ModelShape):
        return name
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown model shape {name!r}; available: {sorted(SHAPES)}") from None


def vision_config(shape: ModelShape, attn_implementation: str = "sdpa") -> CLIPVisionConfig:
    """HF ``CLIPVisionConfig`` for the shape's tower."""
    vision = shape.vision
    config = CLIPVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=vision.intermediate,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
    )
    config._attn_implementation = attn_implementation
    return config


def text_config(shape: ModelShape, attn_implementation: str = "sdpa") -> LlamaConfig:
    """HF ``LlamaConfig`` for the shape's LLM (Vicuna token ids: pad 0, BOS 1, EOS 2)."""
    llm = shape.llm
    config = LlamaConfig(
        hidden_size=llm.hidden,
        intermediate_size=llm.intermediate,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.heads,
        num_key_value_heads=llm.kv_heads,
        vocab_size=llm.vocab,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = attn_implementation
    return config


def build_model(
    shape: ModelShape | str,
    compression: CompressionConfig | str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
) -> DuetLlavaForCausalLM:
    """A :class:`~llava.model.modeling.DuetLlavaForCausalLM` with random weights and the shape's dimensions.

    The parameters are created directly in ``dtype`` (and on ``device`` when given), so a 7B model never
    exists in fp32 on the host. Benchmarks need speed, not quality: nothing is loaded from disk.
    """
    from llava.model.config import DuetLlavaConfig
    from llava.model.modeling import DuetLlavaForCausalLM

    shape = get_shape(shape)
    config = DuetLlavaConfig(
        vision_config=vision_config(shape, attn_implementation),
        text_config=text_config(shape, attn_implementation),
        projector_type=shape.projector,
        vision_feature_layer=shape.vision.feature_layer,
        compression=compression,
    )
    config.vision_config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if device is not None:
            with torch.device(device):
                model = DuetLlavaForCausalLM(config)
        else:
            model = DuetLlavaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype=dtype)
    logger.info(
        "built %s (compression %s): %.1fM parameters, %s",
        shape.name,
        config.compression["name"] if config.compression else "none",
        sum(p.numel() for p in model.parameters()) / 1e6,
        dtype,
    )
    return model
