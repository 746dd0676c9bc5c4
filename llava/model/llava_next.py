"""LLaVA-NeXT (LLaVA-1.6, AnyRes) with DUET's V2V (per view) and T2V compression, by composition.

The HF model (``LlavaNextForConditionalGeneration``) supplies everything but the decoder loop: its CLIP tower,
projector and ``pack_image_features`` give each image's AnyRes tokens (the base view, then the tiles stitched
and unpadded to the image's aspect ratio with one ``image_newline`` token closing every row), spliced into the
image placeholder positions in order, exactly as transformers does (:func:`llava.hf_adapter.llava_next_image_features`);
its lm_head gives logits. The decoder layers run through this project's stage loop
(:func:`llava.model.decoder.run_decoder`), which drops visual tokens at the T2V boundaries, keeping
``floor(ratio * N0)`` of each sample's N0 visual tokens.

``visual_mask`` marks every image placeholder position, the newline tokens included: they sit among the image
tokens, come out of the same splice, and T2V scores and drops them like any other visual token (so N0 counts
them too). Positions are 1-D RoPE positions counted over each row's real tokens (left padding gets none).

V2V (``self.v2v``; :mod:`llava.compression.anyres_v2v`): DUET's dominant + contextual tokens (or VisionZip's,
or random ones) chosen per view (the base view and every tile) among the patches that survive unpadding, with
budgets as fractions of each view's patches (so an image's budget splits over its views in proportion to their
tokens; token counts are refused). The survivors keep their grid positions, anchors hold their merged CLIP
features before the projector, and the tokens come out in transformers' packed order with a keep flag per
placeholder; a newline token stays iff at least one token of its row does. Dropped placeholders leave the
sequence before the decoder (positions recounted), so T2V's N0 is what V2V kept. LLaVA-OneVision
(:mod:`llava.compression.onevision_v2v`): SigLIP has no CLS token and its tile grid may be downsized after the
projector, so V2V selects on the packed tokens (per view group: the base view, the packed tile grid), scored by
the attention each patch receives within its view, anchors merged after the projector, the same newline rule;
videos are not reduced by V2V. DyMU is not available for either.

Training runs the same forward with ``labels`` (V2V keeps the projector, ``image_newline`` and the tower in the
graph); a text-only training batch runs one blank image through the same path as images (ZeRO-safe).

LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``: SigLIP, ``anyres_max_9``, a Qwen2 decoder with plain
1-D RoPE) runs through the same class: its images through its own ``get_image_features`` with ``batch_num_images``
(images per sample, as its image processor returns them; an image of a multi-image sample gets only its base view
and one newline token, see :func:`llava.hf_adapter.llava_onevision_image_features`), its videos
(``pixel_values_videos``, ``video_token_id`` placeholders) through its own ``get_video_features`` (2 x 2 pooling
per frame, one newline token closing each video; :meth:`DuetLlavaNext._insert_videos`). ``visual_mask`` marks
image and video placeholders alike, so T2V scores and drops both (N0 counts both).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from llava.compression.anyres_v2v import AnyResTokens, anyres_v2v_tokens, check_method
from llava.compression.config import V2VConfig, load_compression
from llava.compression.onevision_v2v import onevision_v2v_tokens
from llava.compression.t2v import SequenceState, build_query_mask
from llava.families.names import LLAVA_NEXT_NAMES, LLAVA_ONEVISION_NAMES
from llava.hf_adapter import (
    Cache,
    enable_activation_checkpointing,
    llava_next_hub_state_dict,
    llava_next_image_features,
    llava_next_image_newline,
    llava_next_module_state_dict,
    llava_next_projector,
    llava_next_text_model,
    llava_next_views_per_image,
    llava_onevision_hub_state_dict,
    llava_onevision_image_features,
    llava_onevision_module_state_dict,
    llava_onevision_video_features,
)
from llava.model.contract import DuetOutput, decode_step_if_given, prefill_output, require_grads_from
from llava.model.decoder import DecodeState, decoder_of, run_decoder, stage_plan_from_config
from llava.model.fast_generation import FastDecoder
from llava.model.generation import greedy_or_sample
from llava.model.hub_checkpoint import (
    MAX_SHARD_BYTES,
    WRAPPED_PREFIX,
    CheckpointNames,
    load_wrapped_state_dict,
    save_wrapped_checkpoint,
)
from llava.model.sampling import SamplingOptions
from llava.model.splice import detect_left_padding

LLAVA_NEXT_MODEL_TYPES = LLAVA_NEXT_NAMES.model_types
"""``model_type`` values of LLaVA-NeXT checkpoints (the ``llava_next`` family's, from :mod:`llava.families.names`)."""
LLAVA_ONEVISION_MODEL_TYPES = LLAVA_ONEVISION_NAMES.model_types
"""``model_type`` values of LLaVA-OneVision checkpoints (the ``llava_onevision`` family's; images and videos)."""
ANYRES_MODEL_TYPES = LLAVA_NEXT_MODEL_TYPES + LLAVA_ONEVISION_MODEL_TYPES
"""``model_type`` values of the checkpoints :class:`DuetLlavaNext` runs (the AnyRes lineage)."""
LLAVA_NEXT_QUERY_MODES = ("last", "instruction")
"""T2V queries this family supports (``salient`` needs LLaVA-1.5's content-word table; not wired here)."""


LLAVA_NEXT_CHECKPOINT_NAMES = CheckpointNames(
    llava_next_hub_state_dict, llava_next_module_state_dict, "language_model.lm_head.weight"
)
"""The names transformers writes and reads for LLaVA-NeXT's weights."""
CHECKPOINT_NAMES = {
    **dict.fromkeys(LLAVA_NEXT_MODEL_TYPES, LLAVA_NEXT_CHECKPOINT_NAMES),
    **dict.fromkeys(
        LLAVA_ONEVISION_MODEL_TYPES,
        CheckpointNames(
            llava_onevision_hub_state_dict, llava_onevision_module_state_dict, "language_model.lm_head.weight"
        ),
    ),
}
"""The checkpoint names of each ``model_type`` :class:`DuetLlavaNext` runs (LLaVA-OneVision's layout is NeXT's)."""


class DuetLlavaNext(nn.Module):
    """A ``LlavaNextForConditionalGeneration`` run with DUET's T2V stages; the
    :class:`~llava.model.contract.VisionLanguageModel` contract (prefill, decode steps with a ``decode_state``,
    per-stage caches, the fast decode path), as :class:`~llava.model.qwen_vl.DuetQwenVL`."""

    base_model_prefix = WRAPPED_PREFIX.removesuffix(".")  # read by peft's weight-conversion lookup, as on HF models

    def __init__(self, hf_model: nn.Module, compression: Any = None) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.config = hf_model.config
        self.stage_plan = None
        self.v2v: V2VConfig | None = None
        self.set_compression(compression)

    def save_pretrained(
        self,
        output_dir: str | os.PathLike[str],
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
    ) -> None:
        """Save as a plain LLaVA-NeXT checkpoint in transformers' own layout (loadable by transformers and the
        pipeline); see :func:`~llava.model.hub_checkpoint.save_wrapped_checkpoint`."""
        save_wrapped_checkpoint(self, output_dir, self._checkpoint_names(), state_dict, max_shard_bytes)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load this wrapper's state dict or a LLaVA-NeXT checkpoint's (what :meth:`save_pretrained` writes)."""
        return load_wrapped_state_dict(self, state_dict, self._checkpoint_names(), strict, assign)

    def _checkpoint_names(self) -> CheckpointNames:
        names = CHECKPOINT_NAMES.get(self.config.model_type)
        if names is None:
            raise NotImplementedError(f"saving a {self.config.model_type} model is not supported")
        return names

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        """Checkpoint every layer of the wrapped model (the Trainer's ``--gradient_checkpointing``)."""
        enable_activation_checkpointing(self.hf_model, **(activation_checkpointing_kwargs or {}))

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> None:
        """The name transformers before 5.23 call."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    @property
    def language_model(self) -> nn.Module:
        """The text decoder (embeddings, layers, norm, rotary embedding)."""
        return llava_next_text_model(self.hf_model)

    @property
    def projector(self) -> nn.Module:
        """The multimodal projector (CLIP features to the LLM width); ``image_newline`` is a separate parameter."""
        return llava_next_projector(self.hf_model)

    def finetuned_extras(self) -> list[nn.Parameter]:
        """Parameters finetuning trains beside the LLM and the projector: the ``image_newline`` token."""
        return [llava_next_image_newline(self.hf_model)]

    def get_input_embeddings(self) -> nn.Module:
        return self.hf_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    def enable_input_require_grads(self) -> None:
        """Token embeddings that require grad (the contract's; adapters over frozen embeddings)."""
        require_grads_from(self.get_input_embeddings())

    def set_compression(self, spec: Any) -> None:
        """Switch the compression preset: V2V per AnyRes view (LLaVA-NeXT: :mod:`llava.compression.anyres_v2v`;
        LLaVA-OneVision, per view group of its packed tokens: :mod:`llava.compression.onevision_v2v`; budgets as
        fractions of each view's tokens) and/or T2V; DyMU is not available for this family."""
        compression = load_compression(spec)
        if compression.dymu is not None:
            raise ValueError(
                f"compression {compression.name!r}: DyMU is not yet available for this family (LLaVA-NeXT, "
                "LLaVA-OneVision); use a V2V and/or T2V preset"
            )
        v2v = compression.v2v
        if v2v is not None:
            check_method(v2v)
            if not v2v.is_fraction:
                raise ValueError(
                    f"compression {compression.name!r}: AnyRes views keep different numbers of tokens "
                    "(unpadding, downsizing), so V2V budgets must be fractions of each view's tokens (e.g. dominant "
                    f"0.25, contextual 0.08), not token counts ({v2v.dominant}, {v2v.contextual})"
                )
            strategy = getattr(self.config, "vision_feature_select_strategy", "full")
            if self.is_onevision and strategy != "full":
                raise ValueError(
                    f"compression {compression.name!r}: LLaVA-OneVision's V2V scores every SigLIP patch (the 'full' "
                    f"vision_feature_select_strategy), got {strategy!r}"
                )
        if compression.t2v is not None and compression.t2v.query not in LLAVA_NEXT_QUERY_MODES:
            raise ValueError(
                f"LLaVA-NeXT T2V queries: {', '.join(LLAVA_NEXT_QUERY_MODES)}; got {compression.t2v.query!r}"
            )
        self.v2v = v2v
        self.stage_plan = stage_plan_from_config(compression.t2v, self.config.text_config.num_hidden_layers)

    def set_query_vocabulary(self, tokenizer: Any) -> None:
        """Nothing to mark: this family's T2V queries (``last``, ``instruction``) need no content-word table."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        left_padding: bool | None = None,
        logits_to_keep: int = 0,
        decode_state: DecodeState | None = None,
        query_end: int | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        pack_sequences: bool = False,
        batch_num_images: torch.Tensor | None = None,
        **unused: Any,
    ) -> DuetOutput:
        """Prefill (the whole prompt, visual tokens dropped at the T2V boundaries) or, with a ``decode_state``,
        decode steps; see :meth:`DuetLlavaForCausalLM.forward`. ``input_ids`` hold one image placeholder per
        AnyRes token (as LLaVA-NeXT's processor expands them); ``pixel_values``/``image_sizes`` as the processor
        makes them. ``labels`` give the loss over the surviving label positions (the shared prefill output);
        ``pack_sequences``: padding-free decoder layers (:mod:`llava.model.packing`). LLaVA-OneVision also takes
        ``batch_num_images`` (images per sample with images, as its image processor returns it; ``None``: every
        image alone, as transformers defaults to) and ``pixel_values_videos`` (``[videos, frames, C, H, W]``, one
        run of ``video_token_id`` placeholders per video, in order)."""
        step = decode_step_if_given(
            self, input_ids, decode_state, cache, logits_to_keep, (pixel_values, pixel_values_videos)
        )
        if step is not None:
            return step
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        left = detect_left_padding(attention_mask) if left_padding is None else bool(left_padding)
        visual_mask = input_ids == self.config.image_token_id
        embeds, kept, v2v_seconds = self._insert_visual_tokens(
            self.get_input_embeddings()(input_ids), visual_mask, pixel_values, image_sizes,
            batch_num_images=batch_num_images,
        )  # fmt: skip
        embeds, video_mask = self._insert_videos(input_ids, embeds, pixel_values_videos)
        visual_mask = visual_mask | video_mask
        plan = self.stage_plan
        query_mask = torch.zeros_like(visual_mask)
        if plan is not None and plan.boundaries:
            query_mask = build_query_mask(plan.query, attention_mask, visual_mask, labels, query_end=query_end)
        sequence = SequenceState(
            hidden=embeds,
            attention_mask=attention_mask,
            position_ids=(attention_mask.long().cumsum(dim=1) - 1).clamp(min=0),
            visual_mask=visual_mask,
            query_mask=query_mask,
            labels=labels,
        )
        if kept is not None and not bool(kept.all()):
            # V2V left some placeholders without a token: they leave the sequence, positions are recounted.
            sequence = sequence.compact(kept, left, recompute_positions=True)
        images = 0 if image_sizes is None or pixel_values is None else int(image_sizes.shape[0])
        images += 0 if pixel_values_videos is None else int(pixel_values_videos.shape[0])
        layout = "packed" if pack_sequences else "left" if left else "right"
        result = run_decoder(decoder_of(self.language_model), sequence, plan, cache, use_cache, layout, images)
        return prefill_output(
            self, result, labels, num_items_in_batch, logits_to_keep, cache if use_cache else None,
            input_ids.shape[1], v2v_seconds,
        )  # fmt: skip

    def _insert_visual_tokens(
        self,
        embeds: torch.Tensor,
        visual_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor | None,
        batch_num_images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """The text embeddings with every image's AnyRes tokens in its placeholder positions, in order; which
        positions stay (``[B, L]`` bool: every position but the placeholders V2V left empty, padding included;
        ``None`` without V2V: all of them) and V2V's host seconds.

        One pass of the vision tower whatever the batch holds: under ZeRO-3 every rank must gather the same
        parameters as often as the others (and under ZeRO-2/DDP reduce the projector's gradients), so a training
        batch without images runs one blank view whose tokens are then left out (zero, but in the graph), through
        the same path as images (V2V's, which runs the tower only up to the feature layer, when it is on).
        """
        placeholders = int(visual_mask.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if placeholders:
                raise ValueError(f"input_ids hold {placeholders} image placeholders but no pixel_values were given")
            if self.training and torch.is_grad_enabled():
                blank_pixels, blank_size = self._blank_image(embeds.device, embeds.dtype)
                if self.v2v is not None:
                    blank = self._v2v_tokens(blank_pixels, blank_size).tokens
                else:
                    blank = torch.cat(self._image_features(blank_pixels, blank_size))
                return embeds + blank[:0].sum().to(embeds.dtype), None, 0.0
            return embeds, None, 0.0
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes (each image's original height, width) with pixel_values")
        if self.v2v is not None:
            return self._insert_v2v_tokens(embeds, visual_mask, pixel_values, image_sizes, batch_num_images)
        features = self._image_features(pixel_values, image_sizes, batch_num_images)
        tokens = torch.cat(features).to(embeds.dtype)
        if tokens.shape[0] != placeholders:
            raise ValueError(
                f"input_ids hold {placeholders} image placeholders but the {len(features)} images give "
                f"{tokens.shape[0]} AnyRes tokens ({[int(part.shape[0]) for part in features]} per image)"
            )
        return embeds.masked_scatter(visual_mask.unsqueeze(-1), tokens), None, 0.0

    def _insert_v2v_tokens(
        self,
        embeds: torch.Tensor,
        visual_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        batch_num_images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """:meth:`_insert_visual_tokens` with V2V per AnyRes view (:meth:`_v2v_tokens`): every placeholder gets its
        token (dropped ones too, left out by the caller's compaction) and a keep flag. Videos are not V2V's."""
        compressed = self._v2v_tokens(pixel_values, image_sizes, batch_num_images)
        placeholders = int(visual_mask.sum())
        if compressed.tokens.shape[0] != placeholders:
            raise ValueError(
                f"input_ids hold {placeholders} image placeholders but the {int(image_sizes.shape[0])} images give "
                f"{compressed.tokens.shape[0]} AnyRes tokens"
            )
        embeds = embeds.masked_scatter(visual_mask.unsqueeze(-1), compressed.tokens.to(embeds.dtype))
        kept = (~visual_mask).masked_scatter(visual_mask, compressed.keep)
        return embeds, kept, compressed.seconds

    def _v2v_tokens(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None
    ) -> AnyResTokens:
        """V2V's token and keep flag per image placeholder: per AnyRes view before the projector (LLaVA-NeXT), or
        per view group of the packed tokens after it (LLaVA-OneVision, with ``batch_num_images``)."""
        if self.is_onevision:
            return onevision_v2v_tokens(self.hf_model, pixel_values, image_sizes, self.v2v, batch_num_images)
        return anyres_v2v_tokens(self.hf_model, pixel_values, image_sizes, self.v2v)

    def _blank_image(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One all-zero image of one view's size (``[1, views, C, H, W]``: the base view and its tiles, as the
        processor lays them out) and its size ``[[H, W]]``."""
        vision = self.config.vision_config
        side = vision.image_size
        size = torch.tensor([[side, side]], device=device)
        views = llava_next_views_per_image(self.hf_model, size)[0]
        return torch.zeros(1, views, vision.num_channels, side, side, device=device, dtype=dtype), size

    @property
    def is_onevision(self) -> bool:
        """Whether the wrapped model is LLaVA-OneVision (images per sample matter; videos are taken)."""
        return getattr(self.config, "model_type", None) in LLAVA_ONEVISION_MODEL_TYPES

    def _image_features(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Each image's tokens through the HF model's own feature path: LLaVA-NeXT's, or LLaVA-OneVision's with
        ``batch_num_images`` (images per sample; ``None``: each image alone, as transformers defaults to).
        LLaVA-NeXT has no such argument: every image gets its AnyRes tokens."""
        if self.is_onevision:
            return llava_onevision_image_features(self.hf_model, pixel_values, image_sizes, batch_num_images)
        return llava_next_image_features(self.hf_model, pixel_values, image_sizes)

    def _insert_videos(
        self, input_ids: torch.Tensor, embeds: torch.Tensor, pixel_values_videos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings with every video's tokens (LLaVA-OneVision: pooled frames, then one newline token) in its
        ``video_token_id`` placeholders, in order, as transformers splices them; and those positions (``[B, L]``
        bool; none for LLaVA-NeXT, which takes no videos). A LLaVA-OneVision training batch without videos runs a
        blank one-frame video through the same path (tokens left out), so every rank runs the tower as often as
        the others whatever its batch holds (ZeRO-3)."""
        if not self.is_onevision:
            if pixel_values_videos is not None:
                raise ValueError("LLaVA-NeXT takes images only; videos are not supported by this family")
            return embeds, torch.zeros_like(input_ids, dtype=torch.bool)
        video_mask = input_ids == self.config.video_token_id
        placeholders = int(video_mask.sum())
        if pixel_values_videos is None or pixel_values_videos.shape[0] == 0:
            if placeholders:
                raise ValueError(f"input_ids hold {placeholders} video placeholders but no pixel_values_videos")
            if self.training and torch.is_grad_enabled():
                # ZeRO-safe, as for images: every training batch runs the tower once for videos too.
                vision = self.config.vision_config
                blank_video = embeds.new_zeros(1, 1, vision.num_channels, vision.image_size, vision.image_size)
                blank = llava_onevision_video_features(self.hf_model, blank_video)
                embeds = embeds + blank[:, :0].sum().to(embeds.dtype)
            return embeds, video_mask
        tokens = llava_onevision_video_features(self.hf_model, pixel_values_videos).flatten(0, 1).to(embeds.dtype)
        if tokens.shape[0] != placeholders:
            raise ValueError(
                f"input_ids hold {placeholders} video placeholders but the {pixel_values_videos.shape[0]} videos "
                f"of {pixel_values_videos.shape[1]} frames give {tokens.shape[0]} tokens"
            )
        return embeds.masked_scatter(video_mask.unsqueeze(-1), tokens), video_mask

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        batch_num_images: torch.Tensor | None = None,
        *,
        sampling: SamplingOptions | None = None,
        fast_decoder: FastDecoder | None = None,
        **sampling_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy or sampled decoding of left-padded prompts with images (and, for LLaVA-OneVision, videos and
        ``batch_num_images``); options as :meth:`DuetLlavaForCausalLM.generate` (``sampling`` and/or its fields as
        keywords, ``fast_decoder``)."""
        visual_inputs = {"pixel_values": pixel_values, "image_sizes": image_sizes}
        if pixel_values_videos is not None:
            visual_inputs["pixel_values_videos"] = pixel_values_videos
        if batch_num_images is not None:
            visual_inputs["batch_num_images"] = batch_num_images
        options = SamplingOptions.from_keywords(sampling, **sampling_kwargs)
        return greedy_or_sample(self, input_ids, attention_mask, visual_inputs, options, fast_decoder)
