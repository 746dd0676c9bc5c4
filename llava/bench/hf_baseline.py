"""Baseline rows: transformers' own ``LlavaForConditionalGeneration`` at a benchmark shape.

What a user would otherwise run: the same shape (tower, projector, LLM), batch and stage freezing as
our model's rows, random weights created directly in the run's dtype. HF's model takes one
``<image>`` token per visual token in ``input_ids``, so each image slot of our batch is expanded to the
tower's patch count (the same sequence our ``none`` preset builds inside the model). It computes
logits for every position (ours only at label positions), which is part of what it costs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from llava.bench.shapes import ModelShape, text_config, vision_config
from llava.constants import IMAGE_TOKEN_ID
from llava.hf_adapter import set_attn_implementation
from llava.model.precision import random_init

BASELINE_LABEL = "hf-llava"
"""The row label of the baseline in benchmark tables."""


def hf_image_token_id(shape: ModelShape) -> int:
    """The vocabulary id HF's model reads as an image token: the last id of the shape's vocabulary."""
    return shape.llm.vocab - 1


def check_baseline_shape(shape: ModelShape) -> None:
    """Fail with a clear message for shapes the HF LLaVA baseline cannot represent."""
    if shape.is_video:
        raise ValueError(f"the {BASELINE_LABEL} baseline covers image shapes; {shape.name!r} is a video shape")
    if shape.anyres is not None:
        raise ValueError(f"the {BASELINE_LABEL} baseline is LLaVA-1.5's model; {shape.name!r} is an AnyRes shape")
    if shape.projector != "mlp2x_gelu":
        raise ValueError(f"HF LLaVA has a 2-layer GELU projector; shape {shape.name!r} uses {shape.projector!r}")


def build_hf_llava(
    shape: ModelShape,
    dtype: torch.dtype,
    attn_implementation: str,
    device: str | torch.device | None,
    use_cache: bool = False,
) -> LlavaForConditionalGeneration:
    """Random-weight HF LLaVA-1.5 with the shape's tower, projector and LLM (patch features of layer -2).

    ``use_cache`` False for training steps (as in our rows), True for generation.
    """
    check_baseline_shape(shape)
    config = LlavaConfig(
        vision_config=vision_config(shape, attn_implementation),
        text_config=text_config(shape, attn_implementation),
        image_token_index=hf_image_token_id(shape),
        projector_hidden_act="gelu",
        vision_feature_layer=shape.vision.feature_layer,
        vision_feature_select_strategy="default",
    )
    set_attn_implementation(config, attn_implementation)
    config.text_config.use_cache = use_cache
    return random_init(LlavaForConditionalGeneration, config, dtype, device)


def freeze_hf_for_stage(model: LlavaForConditionalGeneration, stage: str) -> list[nn.Parameter]:
    """The stage freezing of our rows: pretrain trains the projector, finetune projector + LLM + LM head."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if stage == "finetune":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def to_hf_batch(batch: dict[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Our batch with each image slot expanded to ``num_patches`` HF image tokens (labels ignored there).

    Every row must hold the same number of image slots (benchmark batches hold one each), so rows keep
    one length and their padding. Random text ids that equal HF's image id are moved one id down.
    """
    input_ids = batch["input_ids"]
    slots = input_ids == IMAGE_TOKEN_ID
    per_row = slots.sum(dim=1)
    if not bool((per_row == per_row[0]).all()):
        raise ValueError(f"every row needs the same number of image slots, got {per_row.tolist()}")
    image_id = hf_image_token_id(shape)
    text_ids = input_ids.masked_fill(input_ids == image_id, image_id - 1).masked_fill(slots, image_id)
    repeats = torch.where(slots, shape.vision.num_patches, 1).flatten()
    rows = input_ids.shape[0]

    def expand(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.flatten().repeat_interleave(repeats).view(rows, -1)

    hf_batch = {
        "input_ids": expand(text_ids),
        "attention_mask": expand(batch["attention_mask"]),
        "pixel_values": batch["pixel_values"],
    }
    if "labels" in batch:
        hf_batch["labels"] = expand(batch["labels"])
    return hf_batch
