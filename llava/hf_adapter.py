"""Every call into transformers internals, in one place.

The model drives HF decoder and CLIP layers one by one (to drop visual tokens between layers), so it
relies on things transformers does not promise to keep: decoder-layer keyword arguments, the
masking utilities, cache classes, ``ModelOutput`` behaviour, RoPE helpers, the attention-kernel field
of configs and the Trainer's sampler hook. When a release renames one of them, this file is the one
to change; the rest of the project imports these names from here.

Checked against transformers 5.14.1 (the lowest supported release, see :mod:`llava.versions`) and
5.24.0 (the whole suite), and 5.23.0 (the suite before this module existed). Differences handled here:

* 5.14-5.17 cannot load a ``CLIPImageProcessor`` config without torchvision (5.18 falls back to PIL).
* 5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` and the training
  arguments ``gradient_checkpointing(_kwargs)`` to ``activation_checkpointing(_kwargs)`` (the old names
  warn from 5.24 on).
* 5.24 renamed ``past_key_values`` to ``cache`` in decoder layers, ``create_causal_mask`` and model
  outputs (the old name still works there with a deprecation warning until 5.40). Detected from
  the signatures, not from version numbers, so remote-code layers keep whichever name they use.

Also relied on, without a call site here: decoder layers write their keys and values through
``cache.update(key_states, value_states, layer_idx, ...)`` and read the returned tensors (the static
per-stage cache of :mod:`llava.model.static_cache` implements only that); the Trainer's ``_get_train_sampler`` hook
(:class:`llava.training.trainer.LlavaTrainer`) and the module layout of LLaMA-style decoders
(``embed_tokens``/``layers``/``norm``/``rotary_emb``, ``self_attn.{q,k,v,o}_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``mlp``, the attention-function registry; see :func:`call_decoder_layer_on_groups`) and
CLIP encoder layers (``self_attn.{q,k}_proj``, ``layer_norm1``, ``layer_norm2``, ``mlp``; the attention takes an
additive float mask).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import transformers
from torch import nn
from transformers import (
    AutoImageProcessor,
    Cache,
    DynamicCache,
    PreTrainedConfig,
    PreTrainedModel,
    TrainingArguments,
)
from transformers.image_processing_base import ImageProcessingMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward, rotate_half
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

__all__ = [
    "STATIC_DECODE_KERNELS",
    "AnyResViewFeatures",
    "Cache",
    "ModelOutput",
    "activation_checkpointing_requested",
    "attn_implementation_of",
    "cache_kwarg_of",
    "call_clip_attention",
    "call_clip_layer",
    "call_clip_mlp",
    "call_decoder_layer",
    "call_decoder_layer_on_groups",
    "causal_lm_from_parts",
    "causal_mask",
    "clip_image_processor_class",
    "current_training_argv",
    "decode_step_mask",
    "enable_activation_checkpointing",
    "flat_rotary_tables",
    "llava_next_anyres_layout",
    "llava_next_hub_state_dict",
    "llava_next_image_features",
    "llava_next_image_newline",
    "llava_next_module_state_dict",
    "llava_next_projector",
    "llava_next_text_model",
    "llava_next_view_features",
    "llava_next_views_per_image",
    "llava_next_vision_tower",
    "load_image_processor",
    "new_dynamic_cache",
    "packed_attention",
    "packs_into_one_row",
    "qwen_hub_state_dict",
    "qwen_merger",
    "qwen_module_state_dict",
    "qwen_rope_index",
    "qwen_text_model",
    "qwen_vision_layout",
    "qwen_vision_rotary",
    "qwen_visual_embeddings",
    "rotary_embed",
    "rotary_tables",
    "set_attn_implementation",
]

_CACHE_NAMES = ("cache", "past_key_values")


@functools.cache
def cache_kwarg_of(function: Any) -> str:
    """The name under which ``function`` (a layer ``forward`` or a masking helper) takes the KV cache.

    ``cache`` from transformers 5.24 on, ``past_key_values`` before. Deprecation wrappers keep the
    wrapped signature (``functools.wraps``), so ``inspect`` sees the current name.
    """
    parameters = inspect.signature(function).parameters
    for name in _CACHE_NAMES:
        if name in parameters:
            return name
    raise TypeError(f"{getattr(function, '__qualname__', function)} takes no KV cache argument ({_CACHE_NAMES})")


def causal_mask(
    config: PreTrainedConfig,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    cache: Cache | None,
    layer_idx: int,
    padding_free: bool | None = None,
) -> torch.Tensor | None:
    """The 4D mask (or ``None`` = plain causal) the configured attention kernel expects.

    For SDPA, transformers reads the padding mask back from the device to decide whether the mask can be
    skipped (a synchronisation per call). ``padding_free`` (every row holds only real tokens, known on the
    host) makes that decision here instead: ``True`` gives ``None`` (SDPA's causal kernel), ``False``
    builds the mask without the check. Only for a prefill without a cache.
    """
    if padding_free is not None and cache is None and attn_implementation_of(config) == "sdpa":
        if padding_free:
            return None
        if _takes_argument(create_causal_mask, "allow_is_causal_skip"):
            return create_causal_mask(
                config=config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                layer_idx=layer_idx,
                allow_is_causal_skip=False,
                **{cache_kwarg_of(create_causal_mask): None},
            )
        # Releases without the switch: the same causal + padding mask, built here (a padding query attends
        # to itself, so no row is empty).
        length = attention_mask.shape[1]
        device = attention_mask.device
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask = (causal & attention_mask.bool()[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)
        return mask[:, None]
    return create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        layer_idx=layer_idx,
        **{cache_kwarg_of(create_causal_mask): cache},
    )


@functools.cache
def _takes_argument(function: Any, name: str) -> bool:
    return name in inspect.signature(function).parameters


def packs_into_one_row(config: PreTrainedConfig) -> bool:
    """Whether ``config``'s attention kernel isolates packed samples by their boundaries alone (FlashAttention's
    variable-length path: ``flash_attention_2``/``_3`` and hub kernels named ``*flash*``), so one packed row
    costs nothing extra; mask-based kernels (SDPA, eager) compute every pair of a row."""
    return "flash" in (attn_implementation_of(config) or "")


def packed_attention(
    config: PreTrainedConfig,
    segment_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    longest: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The attention inputs of packed rows ``[K, C]`` holding several samples each.

    FlashAttention kernels (:func:`packs_into_one_row`; ``K`` must be 1) get no mask and the variable-length
    keywords transformers' flash path reads (``cu_seq_lens_q/k``, ``max_length_q/k``): each sample attends only
    to itself. SDPA and eager get a block-diagonal causal mask ``[K, 1, C, C]`` from ``segment_ids`` (sample of
    each slot, ``-1`` for padding slots, which attend only to themselves): boolean (True = attend) for SDPA,
    additive float for eager. ``longest`` is the longest sample (known on the host).
    """
    implementation = attn_implementation_of(config) or "sdpa"
    if packs_into_one_row(config):
        if segment_ids.shape[0] != 1:
            raise ValueError(f"FlashAttention's variable-length path takes one packed row, got {segment_ids.shape[0]}")
        boundaries = cu_seqlens.to(torch.int32)
        return None, {
            "cu_seq_lens_q": boundaries,
            "cu_seq_lens_k": boundaries,
            "max_length_q": int(longest),
            "max_length_k": int(longest),
        }
    if implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"packed sequences need an attention kernel that takes a mask or variable lengths (sdpa, eager, "
            f"flash_attention_2/3); {implementation!r} is not supported"
        )
    capacity = segment_ids.shape[1]
    device = segment_ids.device
    causal = torch.ones(capacity, capacity, dtype=torch.bool, device=device).tril()
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    allowed = causal & same & (segment_ids >= 0).unsqueeze(2)
    allowed = (allowed | torch.eye(capacity, dtype=torch.bool, device=device)).unsqueeze(1)
    if implementation == "sdpa":
        return allowed, {}
    additive = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min), {}


def call_decoder_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Cache | None,
    use_cache: bool,
    attention_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """One decoder layer (its own attention kernel, checkpointing and ZeRO hooks apply); the new hidden states.

    ``attention_kwargs`` go through the layer to its attention function (the variable-length keywords of
    :func:`packed_attention`)."""
    output = layer(
        hidden,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **{cache_kwarg_of(type(layer).forward): cache},
        **(attention_kwargs or {}),
    )
    return output[0] if isinstance(output, tuple) else output


def call_decoder_layer_on_groups(
    layer: nn.Module,
    unique: torch.Tensor,
    groups: torch.Tensor,
    group_sizes: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Cache | None,
    attention_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """A LLaMA-style decoder layer with DyMU's virtual token unmerging (VTU).

    ``unique`` ``[B, U, D]`` holds one hidden state per group of positions that share a token; ``groups``
    ``[B, N]`` names the group of each of the N sequence positions and ``group_sizes`` ``[B, U]`` counts
    them. q, k and v are projected for the U unique tokens, copied out to the N positions, rotated at the
    true positions and attended at full length (the layer's own kernel and mask; the full-length keys and
    values go to the cache, so decoding afterwards is the ordinary path); the attention output is averaged
    back per group, and ``o_proj`` and the MLP run on U tokens. Mirrors the layer's own forward (pre-norm,
    attention, residual, post-norm, MLP, residual), module by module.
    """
    attention = layer.self_attn
    batch = unique.shape[0]
    positions = groups.shape[1]
    head_dim = attention.head_dim

    def expand(projected: torch.Tensor) -> torch.Tensor:
        heads = projected.shape[-1] // head_dim
        index = groups[:, :, None].expand(batch, positions, projected.shape[-1])
        return projected.gather(1, index).view(batch, positions, heads, head_dim).transpose(1, 2)

    normed = layer.input_layernorm(unique)
    query = expand(attention.q_proj(normed))
    key = expand(attention.k_proj(normed))
    value = expand(attention.v_proj(normed))
    cos, sin = position_embeddings
    query, key = rotary_embed(query, cos, sin), rotary_embed(key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, attention.layer_idx)
    kernel = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation_of(attention.config), eager_attention_forward)
    attended, _ = kernel(
        attention, query, key, value, attention_mask, dropout=0.0, scaling=attention.scaling, **(attention_kwargs or {})
    )
    attended = attended.reshape(batch, positions, -1)
    sums = attended.new_zeros(batch, unique.shape[1], attended.shape[-1])
    sums = sums.scatter_add(1, groups[:, :, None].expand_as(attended), attended)
    averaged = sums / group_sizes.clamp(min=1).unsqueeze(-1).to(sums.dtype)
    hidden = unique + attention.o_proj(averaged)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def llava_next_text_model(model: PreTrainedModel) -> nn.Module:
    """LLaVA-NeXT's text decoder (``model.model.language_model``: embeddings, layers, norm, rotary embedding)."""
    return model.model.language_model


def llava_next_vision_tower(model: PreTrainedModel) -> nn.Module:
    """LLaVA-NeXT's (LLaVA-OneVision's) vision tower: CLIP (SigLIP) as transformers holds it."""
    return model.model.vision_tower


def llava_next_image_newline(model: PreTrainedModel) -> nn.Parameter:
    """The learned token closing every row of an AnyRes tile grid (LLaVA-NeXT and OneVision)."""
    return model.model.image_newline


def llava_next_projector(model: PreTrainedModel) -> nn.Module:
    """LLaVA-NeXT's multimodal projector (the MLP from CLIP features to the LLM width)."""
    return model.model.multi_modal_projector


def llava_next_image_features(
    model: PreTrainedModel, pixel_values: torch.Tensor, image_sizes: torch.Tensor
) -> list[torch.Tensor]:
    """Each image's AnyRes tokens ``[n_i, hidden]``, in input order, exactly as transformers splices them: the
    model's own ``get_image_features`` (CLIP over the base view and every tile, the configured feature layer and
    select strategy, the projector) and its ``pack_image_features`` (tiles stitched, unpadded to the image's
    aspect ratio, one ``image_newline`` token after every row of the tile grid, the base view first).
    ``pixel_values``: ``[images, tiles, C, H, W]`` (padded, as the processor makes them) or the tiles of every
    image concatenated ``[sum tiles, C, H, W]``, cast to the vision tower's dtype; ``image_sizes``:
    ``[images, 2]`` original (height, width)."""
    pixels = pixel_values.to(model.model.vision_tower.dtype)
    output = model.model.get_image_features(pixels, image_sizes, return_dict=True)
    return list(output.pooler_output)


def llava_next_hub_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Module-tree names (``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``) to the checkpoint
    names transformers writes and reads for LLaVA-NeXT (``language_model.model.*``, ``vision_tower.*``,
    ``language_model.lm_head.*``): tested against transformers' own ``save_pretrained``."""

    def hub_key(key: str) -> str:
        if key.startswith("model.language_model."):
            return "language_model.model." + key.removeprefix("model.language_model.")
        if key.startswith("lm_head."):
            return "language_model." + key
        return key.removeprefix("model.")

    return {hub_key(key): value for key, value in state_dict.items()}


def llava_next_module_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`llava_next_hub_state_dict`: checkpoint names to the module tree's."""

    def module_key(key: str) -> str:
        if key.startswith("language_model.model."):
            return "model.language_model." + key.removeprefix("language_model.model.")
        if key.startswith("language_model.lm_head."):
            return key.removeprefix("language_model.")
        return "model." + key

    return {module_key(key): value for key, value in state_dict.items()}


def llava_next_views_per_image(model: PreTrainedModel, image_sizes: torch.Tensor) -> list[int]:
    """Views (the base view plus the AnyRes tiles) the processor makes for each image of ``image_sizes``
    (``[images, 2]`` original height, width), from the model's grid pinpoints and view size."""
    config = model.config
    return [
        int(image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size))
        for size in image_sizes.tolist()
    ]


class AnyResViewFeatures(NamedTuple):
    """The CLIP features of every view (base view and tiles) of a batch of LLaVA-NeXT images, before the projector."""

    features: torch.Tensor  # [views, patches, vision width]: the feature layer's patch tokens (CLS left out)
    cls_attention: torch.Tensor | None  # [views, patches]: what ``score`` returned for the patches, if given
    keys: torch.Tensor | None  # [views, patches, d]
    views: list[int]  # views of each image, in input order


def _views_through_feature_layer(
    model: PreTrainedModel,
    pixel_values: torch.Tensor,
    views: list[int],
    score: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The output of the AnyRes tower's ``vision_feature_layer`` for every view (``views`` per image), in ONE pass
    over the layers it needs, and ``score(layer, its input)`` when given. ``pixel_values``: ``[images, views, C, H,
    W]`` (padded past each image's views) or the views concatenated ``[views, C, H, W]``."""
    layer_index = model.config.vision_feature_layer
    if not isinstance(layer_index, int) or isinstance(layer_index, bool):
        raise ValueError(f"per-view features need one vision_feature_layer, got {layer_index!r}")
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)  # flattened in 5.x
    layers = tower.encoder.layers
    depth = layer_index if layer_index >= 0 else len(layers) + 1 + layer_index
    if not 1 <= depth <= len(layers):
        raise ValueError(f"vision_feature_layer {layer_index} selects no encoder layer of a {len(layers)}-layer tower")
    if pixel_values.dim() == 5:
        pixel_values = torch.cat([pixels[:count] for pixels, count in zip(pixel_values, views, strict=True)])
    elif pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [images, views, C, H, W] or [views, C, H, W], got {pixel_values.shape}")
    hidden = tower.embeddings(pixel_values.to(model.model.vision_tower.dtype))
    pre_norm = getattr(tower, "pre_layrnorm", None)  # CLIP's; SigLIP has none
    if pre_norm is not None:
        hidden = pre_norm(hidden)
    for layer in layers[: depth - 1]:
        hidden = call_clip_layer(layer, hidden)
    scored = score(layers[depth - 1], hidden) if score is not None else None
    return call_clip_layer(layers[depth - 1], hidden), scored


def llava_next_view_features(
    model: PreTrainedModel,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    score: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> AnyResViewFeatures:
    """Every view's patch features at the configured ``vision_feature_layer`` (``default`` select strategy: CLS
    left out), equal to transformers' ``hidden_states[vision_feature_layer][:, 1:]``, in ONE pass of the tower
    over all views of all images (only the layers the feature layer needs). ``score(layer, hidden)``, when given,
    is called on the feature layer and its input (``[views, 1 + patches, D]``) and must return the CLS attention
    ``[views, patches]`` and keys ``[views, 1 + patches, d]`` (as
    :func:`llava.compression.v2v.cls_attention_and_keys` does); the keys are returned for the patches
    only. ``pixel_values``/``image_sizes`` as for :func:`llava_next_image_features`."""
    config = model.config
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            "per-view features follow the 'default' vision_feature_select_strategy (patches without CLS), got "
            f"{config.vision_feature_select_strategy!r}"
        )
    views = llava_next_views_per_image(model, image_sizes)
    hidden, scored = _views_through_feature_layer(model, pixel_values, views, score)
    cls_attention, keys = scored if scored is not None else (None, None)
    keys = keys[:, 1:] if keys is not None else None
    return AnyResViewFeatures(hidden[:, 1:], cls_attention, keys, views)


def llava_next_anyres_layout(model: PreTrainedModel, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Each image's packed AnyRes token order (as :func:`llava_next_image_features` packs it), as indices into that
    image's flat ``[views * patches_per_view]`` feature rows (the base view's rows first, then the tiles'), with -1
    where an ``image_newline`` token goes. Built by running transformers' own ``get_anyres_image_grid_shape`` and
    ``unpad_image`` on index tensors, so the layout is exactly theirs. Host tensors (``long``)."""
    config = model.config
    vision = config.vision_config
    pinpoints = tuple(tuple(int(side) for side in point) for point in config.image_grid_pinpoints)
    return [
        _anyres_layout(tuple(size), views, pinpoints, vision.image_size, vision.patch_size)
        for size, views in zip(image_sizes.tolist(), llava_next_views_per_image(model, image_sizes), strict=True)
    ]


@functools.lru_cache(maxsize=4096)
def _anyres_layout(
    size: tuple[int, int], views: int, pinpoints: tuple[tuple[int, ...], ...], view_side: int, patch_size: int
) -> torch.Tensor:
    """:func:`llava_next_anyres_layout` of one image (cached: sizes repeat); callers must not write into it."""
    per_side = view_side // patch_size
    patches = per_side * per_side
    base = torch.arange(patches)
    newline = torch.tensor([-1])
    if views == 1:  # transformers closes a lone base view with one newline token
        return torch.cat([base, newline])
    rows, cols = get_anyres_image_grid_shape(list(size), [list(point) for point in pinpoints], view_side)
    grid = torch.arange(patches, views * patches).view(rows, cols, per_side, per_side, 1)
    grid = grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [1, rows * side, cols * side]
    grid = unpad_image(grid, list(size))
    grid = torch.cat([grid, newline.view(1, 1, 1).expand(*grid.shape[:-1], 1)], dim=-1)
    return torch.cat([base, grid.flatten(1, 2).transpose(0, 1).reshape(-1)])


def qwen_text_model(model: PreTrainedModel) -> nn.Module:
    """Qwen2.5-VL's text decoder (``model.model.language_model`` since transformers 4.52's layout)."""
    return model.model.language_model


def qwen_module_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A Hub-layout Qwen2.5-VL state dict (what ``save_pretrained`` writes: ``visual.*``, ``model.*`` for the
    decoder, ``lm_head.*``) under the module tree's names (``model.visual.*``, ``model.language_model.*``).

    ``from_pretrained`` renames these itself, but a plain ``load_state_dict`` (the Trainer's resume of a
    non-DeepSpeed run) does not, and with ``strict=False`` it would silently load nothing.
    """

    def module_key(key: str) -> str:
        if key.startswith("visual."):
            return "model." + key
        if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
            return "model.language_model." + key.removeprefix("model.")
        return key

    return {module_key(key): value for key, value in state_dict.items()}


def qwen_hub_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`qwen_module_state_dict`: module-tree names to the Hub checkpoint's."""

    def hub_key(key: str) -> str:
        if key.startswith("model.visual."):
            return key.removeprefix("model.")
        if key.startswith("model.language_model."):
            return "model." + key.removeprefix("model.language_model.")
        return key

    return {hub_key(key): value for key, value in state_dict.items()}


def qwen_merger(model: PreTrainedModel) -> nn.Module:
    """Qwen2.5-VL's patch merger (vision tokens -> LLM width), the model's projector."""
    return model.model.visual.merger


def qwen_visual_embeddings(
    model: PreTrainedModel,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    capture_block: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any] | None]:
    """Qwen2.5-VL's merged visual tokens (after the patch merger) of all images and videos, concatenated in
    input order, ``[sum(t * h * w / merge^2), hidden]``: one pass of the vision transformer, whose attention is
    per segment (image or video) as ``grid_thw`` lays them out (transformers' image and video feature
    functions differ only in their names). With ``capture_block`` also that vision block's inputs
    (``hidden_states`` in window order, ``cu_seqlens``, ``position_embeddings``), caught by a pre-hook that
    lives for this call only."""
    inner = model.model
    captured: dict[str, Any] = {}
    handle = None
    if capture_block is not None:

        def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden_states"] = args[0] if args else kwargs["hidden_states"]
            captured["cu_seqlens"] = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
            captured["position_embeddings"] = kwargs.get("position_embeddings")

        handle = inner.visual.blocks[capture_block].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        output = inner.get_image_features(pixel_values, grid_thw, return_dict=True)
    finally:
        if handle is not None:
            handle.remove()
    return torch.cat(list(output.pooler_output), dim=0), (captured if capture_block is not None else None)


def qwen_vision_layout(model: PreTrainedModel, grid_thw: torch.Tensor) -> tuple[torch.Tensor, int, int, nn.Module]:
    """Where Qwen2.5-VL's vision transformer keeps its tokens: the window order of the merged tokens
    (``window_index[j]`` = raster index of the j-th merged token in window order), the patches per merged
    token, and the index and module of the last full-attention block (each image attends to all of itself
    there)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    visual = model.model.visual
    window_index, _ = modeling_qwen2_5_vl.get_vision_window_index(
        grid_thw,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    last_full = visual.fullatt_block_indexes[-1]
    return window_index, visual.spatial_merge_size**2, last_full, visual.blocks[last_full]


def qwen_vision_rotary(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision transformer's 2-D RoPE on ``[tokens, heads, head_dim]`` queries and keys."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    return modeling_qwen2_5_vl.apply_rotary_pos_emb_vision(query, key, cos, sin)


def qwen_rope_index(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    token_types: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor,
    second_per_grid_ts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Qwen2.5-VL's M-RoPE positions ``[3, B, L]`` (temporal, height, width) of a left- or right-padded
    batch; ``token_types`` marks text 0, image 1, video 2 tokens; ``second_per_grid_ts`` (per video) spaces
    the temporal positions of videos (``tokens_per_second`` per second)."""
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=token_types,
        image_grid_thw=image_grid_thw,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
        attention_mask=attention_mask,
    )
    return positions


def call_clip_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One CLIP encoder layer without a padding mask (every image has all its patches)."""
    output = layer(hidden, attention_mask=None)
    return output[0] if isinstance(output, tuple) else output


def call_clip_attention(
    layer: nn.Module, hidden: torch.Tensor, key_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention half of a CLIP encoder layer (pre-norm, attention, residual) and the block's keys.

    ``key_bias`` ``[N, 1, 1, T]`` is added to the attention logits of every query (SDPA and eager take it
    as the additive mask); DyMU uses it for proportional attention (``log`` of each token's size, ``-inf``
    on empty slots). The keys (``k_proj`` output, ``[N, T, heads * head_dim]``) are caught by a forward
    hook that lives for this call only, so nothing is computed twice.
    """
    captured: list[torch.Tensor] = []
    handle = layer.self_attn.k_proj.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        output = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=key_bias)
    finally:
        handle.remove()
    attended = output[0] if isinstance(output, tuple) else output
    return hidden + attended, captured[0]


def call_clip_mlp(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The MLP half of a CLIP encoder layer (pre-norm, MLP, residual)."""
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def enable_activation_checkpointing(model: PreTrainedModel, **checkpoint_kwargs: Any) -> None:
    """Activation (gradient) checkpointing of every layer that supports it, as the Trainer enables it.

    5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name
    is a deprecated alias there); the Trainer calls the new name when it exists, and so do we. No keyword
    arguments means transformers' defaults (``None``; an empty dict would drop its ``use_reentrant`` choice).
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs or None)


_RENAMED_TRAINING_ARGUMENTS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}
"""Old -> new ``TrainingArguments`` names (5.23; the old names warn from 5.24 on and go in v6)."""


def current_training_argv(argv: list[str]) -> list[str]:
    """Command-line training arguments under the names the installed ``TrainingArguments`` uses.

    The launch scripts say ``--gradient_checkpointing True``, which releases before 5.23 require and newer
    ones deprecate in favour of ``--activation_checkpointing``; either spelling is accepted and renamed
    to the installed release's (``--name value`` and ``--name=value`` forms).
    """
    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in names:
        renames = _RENAMED_TRAINING_ARGUMENTS
    else:
        renames = {new: old for old, new in _RENAMED_TRAINING_ARGUMENTS.items()}
    renamed = []
    for token in argv:
        flag, equals, value = token.partition("=")
        if flag.startswith("--") and flag[2:] in renames:
            token = f"--{renames[flag[2:]]}{equals}{value}"
        renamed.append(token)
    return renamed


def activation_checkpointing_requested(args: TrainingArguments) -> bool:
    """Whether the training arguments turn activation (gradient) checkpointing on, under either name."""
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False))


STATIC_DECODE_KERNELS = ("sdpa", "eager")
"""Attention kernels whose decode step takes a plain 4D mask over a fixed-size cache (no data-dependent
unpadding), so it has fixed shapes and can be captured in a CUDA graph."""


def decode_step_mask(config: PreTrainedConfig, attendable: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask of a one-token decode step over a preallocated cache, in the form the kernel uses as is.

    ``attendable`` ``[B, capacity]`` bool marks the cache columns the new token may see (its row's real
    prompt tokens, earlier generated tokens and itself); unwritten columns stay False. Both kernels get an
    additive ``[B, 1, 1, capacity]`` mask in the compute ``dtype`` (0 where attendable): SDPA with ``-inf``
    elsewhere, exactly what it would make of a bool mask itself in every layer (``where`` kernels per
    call), eager attention with the dtype's minimum, as transformers' eager masks. Built once per stage
    and step, shared by the stage's layers: two kernels, no host data.
    """
    kernel = attn_implementation_of(config)
    if kernel not in STATIC_DECODE_KERNELS:
        raise ValueError(
            f"static-cache decoding supports the {' and '.join(STATIC_DECODE_KERNELS)} attention kernels, "
            f"not {kernel!r}"
        )
    blocked = float("-inf") if kernel == "sdpa" else torch.finfo(dtype).min
    mask = attendable[:, None, None, :]
    return torch.full(mask.shape, blocked, dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)


def _mrope_section(config: PreTrainedConfig) -> list[int] | None:
    for field_name in ("rope_parameters", "rope_scaling"):
        settings = getattr(config, field_name, None)
        if isinstance(settings, dict) and settings.get("mrope_section"):
            return list(settings["mrope_section"])
    return None


def rotary_tables(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The decoder's own RoPE tables for ``position_ids`` ``[B, L]`` (or M-RoPE's ``[3, B, L]``), in whatever
    form its layers take. A text-only ``[B, L]`` is given to an M-RoPE decoder as three equal rows
    (transformers before about 5.2x require the three rows)."""
    if position_ids.dim() == 2 and _mrope_section(decoder.config) is not None:
        position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    return decoder.rotary_emb(hidden, position_ids=position_ids)


def flat_rotary_tables(
    config: PreTrainedConfig, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables as ``[B, L, head_dim]``: M-RoPE's per-component ``[3, B, L, head_dim]`` tables (older
    transformers; newer ones recombine them in the rotary embedding) recombined by ``mrope_section``,
    as the attention layer does before rotating."""
    if cos.dim() != 4:
        return cos, sin
    sections = _mrope_section(config) * 2

    def combine(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([part[index % 3] for index, part in enumerate(table.split(sections, dim=-1))], dim=-1)

    return combine(cos), combine(sin)


def rotary_embed(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on one ``[B, heads, L, head_dim]`` tensor with ``cos``/``sin`` ``[B, L, head_dim]``, LLaMA's
    rotate-half convention (what ``apply_rotary_pos_emb`` does to q and to k, for one of them only)."""
    return states * cos.unsqueeze(1) + rotate_half(states) * sin.unsqueeze(1)


def new_dynamic_cache(config: PreTrainedConfig) -> Cache:
    """An empty growing KV cache for a decoder with this config."""
    return DynamicCache(config=config)


def causal_lm_from_parts(text_config: PreTrainedConfig, decoder: nn.Module, lm_head: nn.Module) -> PreTrainedModel:
    """The config's causal-LM class (``LlamaForCausalLM``, ...) around an existing decoder and LM head, which it
    takes as they are: no copy, so a HF port's parts keep their dtype, their float32 RoPE buffers and, under
    ZeRO-3, their partitioned parameters. The shell is built on the meta device; both of its parts are replaced.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with torch.device("meta"):
        shell = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)](text_config)
    setattr(shell, shell.base_model_prefix, decoder)
    shell.set_output_embeddings(lm_head)
    left_on_meta = [name for name, tensor in (*shell.named_parameters(), *shell.named_buffers()) if tensor.is_meta]
    if left_on_meta:
        raise TypeError(f"{type(shell).__name__} has parts besides its decoder and LM head: {left_on_meta[:3]}")
    return shell


def attn_implementation_of(config: PreTrainedConfig) -> str | None:
    """The attention kernel a config asks for (``sdpa``, ``eager``, ``flash_attention_2``; ``None`` = unset)."""
    return config._attn_implementation


def set_attn_implementation(config: PreTrainedConfig, implementation: str | None) -> None:
    """Choose the attention kernel of a config before a model is built from it."""
    config._attn_implementation = implementation


def load_image_processor(source: str | os.PathLike[str], **overrides: Any) -> Any:
    """``AutoImageProcessor.from_pretrained(source, **overrides)``, falling back to the PIL class without
    torchvision.

    transformers 5.14-5.17 raise an ``ImportError`` for a ``CLIPImageProcessor`` config when torchvision is
    missing instead of falling back to ``CLIPImageProcessorPil`` (5.18 does it itself); only that case is
    caught, other errors propagate.
    """
    try:
        return AutoImageProcessor.from_pretrained(source, **overrides)
    except ImportError:
        if importlib.util.find_spec("torchvision") is not None:
            raise
        config, _ = ImageProcessingMixin.get_image_processor_dict(source)
        name = str(config.get("image_processor_type") or "").removesuffix("Fast")
        pil_class = getattr(transformers, f"{name}Pil", None) if name else None
        if pil_class is None:
            raise
        return pil_class.from_pretrained(source, **overrides)


def clip_image_processor_class() -> type:
    """CLIP's image processor on the PIL backend (the plain class needs torchvision in transformers 5)."""
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def llava_onevision_image_features(
    model: PreTrainedModel,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    batch_num_images: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Each image's tokens ``[n_i, hidden]``, in input order, exactly as LLaVA-OneVision's forward splices them:
    its own ``get_image_features`` (SigLIP, the configured feature layer and select strategy, the projector,
    ``pack_image_features``). ``batch_num_images`` (images per sample, as the image processor returns it):
    an image alone in its sample gets its AnyRes tokens (the base view, then the tiles stitched, unpadded,
    bilinearly downsized past ``vision_aspect_ratio``'s cap, e.g. ``anyres_max_9``, one newline token per row);
    an image of a multi-image sample only its base view and one newline token. ``None``: every image is alone
    (transformers' default). ``pixel_values``: ``[images, views, C, H, W]`` as the processor pads them."""
    pixels = pixel_values.to(model.model.vision_tower.dtype)
    output = model.model.get_image_features(pixels, image_sizes, batch_num_images=batch_num_images, return_dict=True)
    return list(output.pooler_output)


def llava_onevision_video_features(model: PreTrainedModel, pixel_values_videos: torch.Tensor) -> torch.Tensor:
    """Each video's tokens ``[videos, frames * pooled + 1, hidden]`` as LLaVA-OneVision's forward splices them:
    its own ``get_video_features`` (every frame through SigLIP and the projector, 2 x 2 bilinear pooling per
    frame, one ``image_newline`` token after the last frame). ``pixel_values_videos``: ``[videos, frames, C, H, W]``."""
    pixels = pixel_values_videos.to(model.model.vision_tower.dtype)
    return model.model.get_video_features(pixels, return_dict=True).pooler_output


def llava_onevision_tokens_per_image(
    model: PreTrainedModel, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None
) -> list[int]:
    """Placeholders each image needs (the length of :func:`llava_onevision_image_features`' ``n_i``) without
    running the tower: the model's own ``pack_image_features`` over zero features one channel wide, so the
    unpadding and ``anyres_max`` downsizing are transformers' own. Arguments as there."""
    config = model.config
    view = config.vision_config.image_size
    side = view // config.vision_config.patch_size
    counts = [1] * len(image_sizes) if batch_num_images is None else [int(n) for n in batch_num_images.tolist()]
    alone = [count == 1 for count in counts for _ in range(count)]
    if len(alone) != len(image_sizes):
        raise ValueError(f"batch_num_images {counts} does not add up to the {len(image_sizes)} images")
    features = [
        torch.zeros(image_size_to_num_patches(size, config.image_grid_pinpoints, view) if single else 1, side**2, 1)
        for size, single in zip(image_sizes.tolist(), alone, strict=True)
    ]
    packed, _ = model.model.pack_image_features(
        features, image_sizes.cpu(), image_newline=torch.zeros(1), vision_aspect_ratio=config.vision_aspect_ratio
    )
    return [int(part.shape[0]) for part in packed]


def llava_onevision_video_tokens(model: PreTrainedModel, frames: int) -> int:
    """Placeholders a video of ``frames`` frames needs: every frame's tokens after the model's own pooling
    (``apply_pooling``), plus the one newline token closing the video."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    pooled = model.model.apply_pooling(torch.zeros(frames, side**2, 1))
    return frames * int(pooled.shape[1]) + 1


def llava_onevision_frame_processor(settings: Mapping[str, Any]) -> Any:
    """An image processor that lays out video frames as LLaVA-OneVision's video processor does (each frame
    resized to ``settings["size"]``'s height x width, rescaled, normalised; no crop, no tiles), from the fields
    of a checkpoint's ``video_preprocessor_config.json``: SigLIP's processor on the PIL backend, since
    ``LlavaOnevisionVideoProcessor`` needs torchvision."""
    processor_class = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    fields = ("size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
    return processor_class(**{key: settings[key] for key in fields if settings.get(key) is not None})


def llava_onevision_hub_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Module-tree names to the checkpoint names transformers writes and reads for LLaVA-OneVision: the same
    layout as LLaVA-NeXT's (``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``,
    ``image_newline``, ``language_model.lm_head.*``; :func:`llava_next_hub_state_dict`), tested against
    transformers' own ``save_pretrained``."""
    return llava_next_hub_state_dict(state_dict)


def llava_onevision_module_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`llava_onevision_hub_state_dict`. A checkpoint without
    ``language_model.lm_head.weight`` has tied embeddings (transformers writes the shared matrix once, as the
    embeddings; e.g. Qwen2-0.5B OneVision checkpoints): the head gets the embeddings' tensor, so a strict load
    of the module tree finds it."""
    module = llava_next_module_state_dict(state_dict)
    embeddings = module.get("model.language_model.embed_tokens.weight")
    if "lm_head.weight" not in module and embeddings is not None:
        module["lm_head.weight"] = embeddings
    return module


def processor_image_token_counts(processor: Any, image_sizes: list[tuple[int, int]]) -> list[int]:
    """Image placeholders transformers' LLaVA-NeXT or LLaVA-OneVision processor expands
    each image of ``image_sizes`` (original ``(height, width)``) to, from its own count (the one serving engines
    read, ``_get_num_multimodal_tokens``), without processing pixels."""
    counts = processor._get_num_multimodal_tokens(image_sizes=[list(size) for size in image_sizes])
    return [int(count) for count in counts.num_image_tokens]


def llava_onevision_views_per_image(
    model: PreTrainedModel, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None
) -> list[int]:
    """Views LLaVA-OneVision's ``get_image_features`` runs through the tower for each image: the base view plus
    the AnyRes tiles for an image alone in its sample, the base view only for an image of a multi-image sample
    (``batch_num_images`` as there; ``None``: every image alone)."""
    counts = [1] * len(image_sizes) if batch_num_images is None else [int(n) for n in batch_num_images.tolist()]
    alone = [count == 1 for count in counts for _ in range(count)]
    if len(alone) != len(image_sizes):
        raise ValueError(f"batch_num_images {counts} does not add up to the {len(image_sizes)} images")
    tiled = llava_next_views_per_image(model, image_sizes)
    return [views if single else 1 for views, single in zip(tiled, alone, strict=True)]


class OneVisionViewFeatures(NamedTuple):
    """The SigLIP features of every view a batch of LLaVA-OneVision images runs, before the projector."""

    features: torch.Tensor  # [views, patches, vision width]: the feature layer's tokens (every patch: no CLS)
    scores: torch.Tensor | None  # [views, patches]: what ``score`` returned, if given
    keys: torch.Tensor | None  # [views, patches, d]
    views: list[int]  # views of each image, in input order


def llava_onevision_view_features(
    model: PreTrainedModel,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    batch_num_images: torch.Tensor | None = None,
    score: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> OneVisionViewFeatures:
    """Every view's patch features at the configured ``vision_feature_layer`` (the ``full`` select strategy:
    SigLIP has no CLS token), equal to transformers' ``hidden_states[vision_feature_layer]``, in ONE pass of
    the tower over all views of all images (only the layers the feature layer needs). ``score(layer, hidden)``,
    when given, is called on the feature layer and its input (``[views, patches, D]``) and returns per-patch
    scores ``[views, patches]`` and keys ``[views, patches, d]``. Arguments as for
    :func:`llava_onevision_image_features`."""
    config = model.config
    if config.vision_feature_select_strategy != "full":
        raise ValueError(
            "LLaVA-OneVision's per-view features follow the 'full' vision_feature_select_strategy (SigLIP has no "
            f"CLS token), got {config.vision_feature_select_strategy!r}"
        )
    views = llava_onevision_views_per_image(model, image_sizes, batch_num_images)
    hidden, scored = _views_through_feature_layer(model, pixel_values, views, score)
    scores, keys = scored if scored is not None else (None, None)
    return OneVisionViewFeatures(hidden, scores, keys, views)


def llava_onevision_pack(
    model: PreTrainedModel, per_image: list[torch.Tensor] | tuple[torch.Tensor, ...], image_sizes: torch.Tensor
) -> list[torch.Tensor]:
    """Each image's ``[views_i, patches, C]`` maps laid out as LLaVA-OneVision packs its features, by the model's
    own ``pack_image_features`` WITHOUT newline tokens (``image_newline=None``): the base view, then the tiles
    stitched, unpadded and, past ``vision_aspect_ratio``'s cap, bilinearly downsized; ``[n_i, C]``. The packing
    treats channels alike, so any per-patch map (projected features, scores, keys, an index channel) lands
    where the features land."""
    packed, _ = model.model.pack_image_features(
        list(per_image), image_sizes.cpu(), image_newline=None, vision_aspect_ratio=model.config.vision_aspect_ratio
    )
    return list(packed)


def llava_onevision_newline_layout(
    model: PreTrainedModel, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Each image's placeholders (as :func:`llava_onevision_image_features` fills them) as a host bool tensor,
    True where transformers puts an ``image_newline`` token: the model's own ``pack_image_features`` over zero
    maps one channel wide with a newline of one (downsizing interpolates zeros to zeros), so the rows are its."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    views = llava_onevision_views_per_image(model, image_sizes, batch_num_images)
    packed, _ = model.model.pack_image_features(
        [torch.zeros(count, side * side, 1) for count in views],
        image_sizes.cpu(),
        image_newline=torch.ones(1),
        vision_aspect_ratio=model.config.vision_aspect_ratio,
    )
    return [part[:, 0] > 0.5 for part in packed]
