"""Vision tower wrapper: runs a HF CLIP vision model up to the feature layer and selects tokens."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel

from llava.model.config import DuetLlavaConfig


def layers_to_run(num_hidden_layers: int, feature_layer: int) -> int:
    """Number of encoder layers needed to produce ``hidden_states[feature_layer]``.

    ``hidden_states`` has ``num_hidden_layers + 1`` entries (embeddings first), so layer -2 of a
    24-layer CLIP needs 23 layers: the last layer is never computed.
    """
    index = feature_layer if feature_layer >= 0 else num_hidden_layers + 1 + feature_layer
    if not 0 <= index <= num_hidden_layers:
        raise ValueError(
            f"vision_feature_layer {feature_layer} is out of range for a tower with {num_hidden_layers} layers"
        )
    return index


class VisionTower(nn.Module):
    """Owns a ``CLIPVisionModel`` and returns LLaVA's image features (before the projector).

    The encoder layers are called one by one, each with the model's own attention kernel
    (SDPA/FlashAttention), and only as many as the feature layer needs.
    """

    def __init__(self, config: DuetLlavaConfig, vision_model: CLIPVisionModel | None = None) -> None:
        super().__init__()
        self.vision_model = vision_model if vision_model is not None else CLIPVisionModel(config.vision_config)
        self.num_layers = layers_to_run(config.vision_config.num_hidden_layers, config.vision_feature_layer)
        self.keep_cls = config.vision_feature_select_strategy == "cls_patch"

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    def run_layers(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Hidden states after the embeddings, pre-norm and the first ``num_layers`` encoder layers."""
        hidden = self.vision_model.embeddings(pixel_values.to(self.dtype))
        hidden = self.vision_model.pre_layrnorm(hidden)
        for layer in self.vision_model.encoder.layers[:num_layers]:
            hidden = layer(hidden, None)
        return hidden

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features ``[num_images, tokens, vision_width]``: CLS + patches or patches only."""
        hidden = self.run_layers(pixel_values, self.num_layers)
        return hidden if self.keep_cls else hidden[:, 1:]
