"""Vision tower wrapper: runs a HF CLIP vision model up to the feature layer and selects tokens.

With V2V compression configured (DUET-VLM Stage A), the tower also merges the feature layer's
tokens into ``k1 + k2`` tokens per image. The CLS-to-patch scores the merger needs are computed from
the feature layer's own q/k projections for the CLS query row only, so every layer keeps its
SDPA/FlashAttention kernel (no eager attention, no ``output_attentions``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.profiler import record_function
from transformers import CLIPVisionModel

from llava.compression.dtome import MergeState, head_mean_keys, merge_above
from llava.compression.v2v import VisualTokenMerger, build_merger, cls_attention_and_keys
from llava.hf_adapter import attn_implementation_of, call_clip_attention, call_clip_layer, call_clip_mlp
from llava.model.config import DuetLlavaConfig
from llava.utils.profiling import PROFILE_REGIONS

logger = logging.getLogger(__name__)


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


def _compression_settings(compression: Any) -> Any:
    if compression is None or (isinstance(compression, str) and compression.lower() == "none"):
        return None
    from llava.compression.config import load_compression

    return load_compression(compression)


def build_dymu(compression: Any) -> Any:
    """The :class:`~llava.compression.config.DyMUConfig` of a model config's ``compression`` field, or ``None``."""
    settings = _compression_settings(compression)
    return getattr(settings, "dymu", None) if settings is not None else None


def build_tower_merger(compression: Any) -> VisualTokenMerger | None:
    """The V2V merger described by a model config's ``compression`` field, or ``None`` without V2V.

    ``compression`` may be ``None``, a preset name or a dict as saved in ``config.json``; it is parsed by
    :func:`llava.compression.config.load_compression` (imported here, so models without compression
    never depend on it).
    """
    settings = _compression_settings(compression)
    v2v = getattr(settings, "v2v", None) if settings is not None else None
    return build_merger(v2v) if v2v is not None else None


class DynamicFeatures(NamedTuple):
    """A DyMU tower's output for ``N`` images of ``P`` positions (patches, plus CLS when kept)."""

    features: torch.Tensor  # [N, P, D]: each row's live tokens first, padded to P
    counts: torch.Tensor  # [N]: live tokens per image
    groups: torch.Tensor  # [N, P]: the token (row slot) that stands for each original position
    seconds: float  # host seconds in DToMe


class VisionTower(nn.Module):
    """Owns a ``CLIPVisionModel`` and returns LLaVA's image features (before the projector).

    The encoder layers are called one by one, each with the model's own attention kernel
    (SDPA/FlashAttention), and only as many as the feature layer needs. When the config's compression
    has V2V, the feature layer's output (CLS included) is merged into ``k1 + k2`` tokens whatever the
    feature strategy: DUET keeps CLS as a dominant token. ``for_video`` builds the video tower of a
    Video-LLaVA model (``config.video_config``, ``video_feature_select_strategy``); it encodes frames
    like images, so V2V runs per frame with the same per-frame budget.
    """

    def __init__(
        self, config: DuetLlavaConfig, vision_model: CLIPVisionModel | None = None, for_video: bool = False
    ) -> None:
        super().__init__()
        vision_config = config.video_config if for_video else config.vision_config
        if vision_config is None:
            raise ValueError("a video tower needs config.video_config")
        strategy = config.video_feature_select_strategy if for_video else config.vision_feature_select_strategy
        self.vision_model = vision_model if vision_model is not None else CLIPVisionModel(vision_config)
        self.num_layers = layers_to_run(vision_config.num_hidden_layers, config.vision_feature_layer)
        self.keep_cls = strategy == "cls_patch"
        self.merger = build_tower_merger(getattr(config, "compression", None))
        dymu = build_dymu(getattr(config, "compression", None))
        self.dymu_thresholds = None if dymu is None else dymu.thresholds
        self.virtual_unmerging = dymu is not None and dymu.vtu
        num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
        if self.dymu_thresholds is not None:
            if len(self.dymu_thresholds) != self.num_layers:
                raise ValueError(
                    f"DyMU needs one threshold per vision-tower layer run: this tower runs {self.num_layers} layers "
                    f"but the preset has {len(self.dymu_thresholds)} thresholds (calibrate them for this tower with "
                    "`python -m llava.tools.calibrate_dymu`)"
                )
            kernel = attn_implementation_of(vision_config)
            if kernel not in ("sdpa", "eager", None):
                raise ValueError(
                    f"DyMU's proportional attention needs the sdpa or eager kernel in the tower, not {kernel!r}"
                )
            # The most tokens an image can keep (nothing merged); the actual count follows the image.
            self.num_output_tokens = num_patches + (1 if self.keep_cls else 0)
        elif self.merger is None:
            self.num_output_tokens = num_patches + (1 if self.keep_cls else 0)
        else:
            if self.num_layers == 0:
                raise ValueError("V2V merging needs an encoder layer: vision_feature_layer must not be 0")
            self.num_output_tokens = self.merger.num_output_tokens(num_patches + 1)
            logger.info(
                "%s tower merges %d tokens per %s into %d",
                "video" if for_video else "vision",
                num_patches + 1,
                "frame" if for_video else "image",
                self.num_output_tokens,
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    def run_layers(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Hidden states after the embeddings, pre-norm and the first ``num_layers`` encoder layers."""
        hidden = self.vision_model.embeddings(pixel_values.to(self.dtype))
        hidden = self.vision_model.pre_layrnorm(hidden)
        for layer in self.vision_model.encoder.layers[:num_layers]:
            hidden = call_clip_layer(layer, hidden)
        return hidden

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Features ``[num_images, tokens, vision_width]``: CLS + patches, patches only, or merged tokens."""
        return self.encode(pixel_values)[0]

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Features plus the host seconds spent on V2V scoring and merging (0 without a merger).

        With DyMU use :meth:`encode_dynamic` (images keep different numbers of tokens).
        """
        if self.dymu_thresholds is not None:
            raise RuntimeError("a DyMU tower yields a different token count per image: call encode_dynamic")
        if self.merger is None:
            hidden = self.run_layers(pixel_values, self.num_layers)
            return (hidden if self.keep_cls else hidden[:, 1:]), 0.0
        hidden = self.run_layers(pixel_values, self.num_layers - 1)
        feature_layer = self.vision_model.encoder.layers[self.num_layers - 1]
        began = time.perf_counter()
        with record_function(PROFILE_REGIONS["v2v"]):
            cls_attention, keys = cls_attention_and_keys(feature_layer, hidden)
        scoring = time.perf_counter() - began
        features = call_clip_layer(feature_layer, hidden)
        began = time.perf_counter()
        with record_function(PROFILE_REGIONS["v2v"]):
            merged = self.merger(features, cls_attention, keys)
        return merged, scoring + time.perf_counter() - began

    def encode_dynamic(self, pixel_values: torch.Tensor) -> DynamicFeatures:
        """DyMU's tokens per image, see :class:`DynamicFeatures`.

        Every block runs attention (with proportional attention from the second block on), then DToMe,
        then its MLP. Each row's live tokens come first, in raster order of the first patch they cover
        (CLS first); rows are padded to the longest. The thresholds are fixed: nothing here depends on
        train or eval mode.
        """
        thresholds = self.dymu_thresholds
        seconds = [0.0]

        def merge(index: int, state: MergeState, keys: torch.Tensor) -> MergeState:
            began = time.perf_counter()
            with record_function(PROFILE_REGIONS["v2v"]):
                merged = merge_above(state, keys, thresholds[index])
            seconds[0] += time.perf_counter() - began
            return merged

        state = run_dtome(self.vision_model, pixel_values, self.num_layers, merge)
        features, _, groups = state.raster_order()
        counts = state.counts
        if not self.keep_cls:  # CLS is slot 0 and never merges: drop it and shift the patches' slots
            features, counts, groups = features[:, 1:], counts - 1, groups[:, 1:] - 1
        return DynamicFeatures(features, counts, groups, seconds[0])


def run_dtome(
    vision_model: CLIPVisionModel,
    pixel_values: torch.Tensor,
    num_layers: int,
    merge: Callable[[int, MergeState, torch.Tensor], MergeState],
) -> MergeState:
    """The first ``num_layers`` CLIP blocks with DToMe between each block's attention and MLP.

    ``merge(layer_index, state, keys)`` merges tokens given the block's head-averaged keys ``[N, T, d]``
    (thresholds at inference, a fixed count per layer during calibration). Attention gets the
    proportional-attention bias of the current token sizes; each block runs its own submodules.
    """
    dtype = vision_model.embeddings.patch_embedding.weight.dtype
    hidden = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values.to(dtype)))
    state = MergeState.start(hidden)
    for index, layer in enumerate(vision_model.encoder.layers[:num_layers]):
        attended, keys = call_clip_attention(layer, state.hidden, state.attention_bias(state.hidden.dtype))
        state = merge(index, replace(state, hidden=attended), head_mean_keys(keys, layer.self_attn.num_heads))
        state = replace(state, hidden=call_clip_mlp(layer, state.hidden))
    return state
