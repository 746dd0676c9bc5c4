"""Qwen2.5-VL with DUET compression (V2V after the patch merger, T2V in the Qwen2 decoder), by composition.

The HF model (``Qwen2_5_VLForConditionalGeneration``) supplies everything but the decoder loop: its
vision transformer and patch merger give the visual tokens (spliced into the placeholder positions, one
per merged token), ``get_rope_index`` gives the M-RoPE positions ``(t, h, w)`` of every token of a
left-padded batch, and the lm_head gives logits. The decoder layers then run through this project's
stage loop (:func:`llava.model.decoder.run_decoder`), which drops visual tokens at the T2V boundaries:
each boundary scores with the next layer's norm, q/k projections and M-RoPE at the tokens' own
positions, the causal mask and an fp32 softmax, keeps ``floor(ratio * N0)`` of every sample's N0 visual
tokens (never compounding), and keeps every survivor's 3-D position. Decoding continues after each row's
largest position, as transformers' ``rope_deltas`` do, with one KV cache length per stage.

V2V (DUET's dominant + contextual tokens, :mod:`llava.compression.qwen_v2v`) runs on the merged tokens
after the patch merger, scored in the vision transformer's last full-attention block; the dropped tokens
leave the sequence after the positions were laid out, so the survivors keep their (t, h, w).

Training: ``labels`` aligned with ``input_ids`` give the loss over the label positions that survive; the
Trainer's activation checkpointing and the stages' ``projector`` (the patch merger) work as for LLaVA.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from llava.compression.config import load_compression
from llava.compression.qwen_v2v import select_tokens, token_scores
from llava.compression.t2v import SequenceState, build_query_mask
from llava.families.names import QWEN2_5_VL_NAMES
from llava.hf_adapter import (
    Cache,
    enable_activation_checkpointing,
    qwen_hub_state_dict,
    qwen_merger,
    qwen_module_state_dict,
    qwen_rope_index,
    qwen_text_model,
    qwen_vision_layout,
    qwen_visual_embeddings,
)
from llava.model.contract import DuetOutput, decode_step_if_given, prefill_output, require_grads_from
from llava.model.decoder import DecodeState, decoder_of, run_decoder, stage_plan_from_config
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

QWEN_MODEL_TYPES = QWEN2_5_VL_NAMES.model_types
"""``model_type`` values of the checkpoints this module runs (:mod:`llava.families.names` lists them)."""
QWEN_QUERY_MODES = ("last", "instruction")
QWEN_CHECKPOINT_NAMES = CheckpointNames(qwen_hub_state_dict, qwen_module_state_dict, "lm_head.weight")
"""The Hub checkpoint's names of Qwen2.5-VL's weights (the 3B's tied LM head is stored once)."""


class DuetQwenVL(nn.Module):
    """A ``Qwen2_5_VLForConditionalGeneration`` run with DUET's V2V and T2V stages; the same ``forward``/``generate``
    contract as :class:`~llava.model.modeling.DuetLlavaForCausalLM`, the
    :class:`~llava.model.contract.VisionLanguageModel` (prefill, decode steps with a ``decode_state``, per-stage
    caches, the fast decode path)."""

    base_model_prefix = WRAPPED_PREFIX.removesuffix(".")  # read by peft's weight-conversion lookup, as on HF models

    def __init__(self, hf_model: nn.Module, compression: Any = None) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.config = hf_model.config
        self.stage_plan = None
        self.v2v = None
        self.set_compression(compression)

    @property
    def language_model(self) -> nn.Module:
        """The Qwen2 text decoder (embeddings, layers, norm, M-RoPE rotary embedding)."""
        return qwen_text_model(self.hf_model)

    def save_pretrained(
        self,
        output_dir: str | os.PathLike[str],
        state_dict: dict[str, torch.Tensor] | None = None,
        max_shard_bytes: int = MAX_SHARD_BYTES,
    ) -> None:
        """Save as a plain Qwen2.5-VL checkpoint (the Hub's layout and names: loadable by transformers and the
        pipeline); see :func:`~llava.model.hub_checkpoint.save_wrapped_checkpoint`."""
        save_wrapped_checkpoint(self, output_dir, QWEN_CHECKPOINT_NAMES, state_dict, max_shard_bytes)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load this wrapper's state dict or a Qwen2.5-VL checkpoint's (what :meth:`save_pretrained` writes)."""
        return load_wrapped_state_dict(self, state_dict, QWEN_CHECKPOINT_NAMES, strict, assign)

    @property
    def projector(self) -> nn.Module:
        """The patch merger: Qwen's vision-to-language projector (what LLaVA's stages call the projector)."""
        return qwen_merger(self.hf_model)

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

    def enable_input_require_grads(self) -> None:
        """Token embeddings that require grad, so checkpointed layers over frozen embeddings get gradients."""
        require_grads_from(self.get_input_embeddings())

    def get_input_embeddings(self) -> nn.Module:
        return self.hf_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.hf_model.get_output_embeddings()

    def set_compression(self, spec: Any) -> None:
        """Switch the compression preset (DUET's V2V after the patch merger and T2V; positions are kept)."""
        compression = load_compression(spec)
        if compression.dymu is not None:
            raise ValueError(
                f"compression {compression.name!r}: DyMU is not available for Qwen2.5-VL's vision transformer"
            )
        if compression.v2v is not None and compression.v2v.method != "duet":
            raise ValueError(f"Qwen2.5-VL's V2V is DUET's (dominant + contextual), not {compression.v2v.method!r}")
        self.v2v = compression.v2v
        if compression.t2v is not None:
            if compression.t2v.position_mode != "keep":
                raise ValueError("Qwen2.5-VL keeps every token's M-RoPE position: t2v.position_mode must be 'keep'")
            if compression.t2v.query not in QWEN_QUERY_MODES:
                raise ValueError(
                    f"Qwen2.5-VL T2V queries: {', '.join(QWEN_QUERY_MODES)}; got {compression.t2v.query!r}"
                )
        self.stage_plan = stage_plan_from_config(compression.t2v, self.config.text_config.num_hidden_layers)

    def set_query_vocabulary(self, tokenizer: Any) -> None:
        """Nothing to mark: Qwen2.5-VL's T2V queries (``last``, ``instruction``) need no content-word table
        (the :class:`~llava.model.contract.VisionLanguageModel` contract every family meets)."""

    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        types = (input_ids == self.config.image_token_id).int()
        return types + 2 * (input_ids == self.config.video_token_id).int()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        left_padding: bool | None = None,
        logits_to_keep: int = 0,
        decode_state: DecodeState | None = None,
        query_end: int | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        pack_sequences: bool = False,
        **unused: Any,
    ) -> DuetOutput:
        """Prefill (the whole prompt, visual tokens dropped at the T2V boundaries) or, with a
        ``decode_state``, decode steps; see :meth:`DuetLlavaForCausalLM.forward`. ``labels`` (aligned with
        ``input_ids``, placeholders included) give the training loss, as there. Videos: ``pixel_values_videos``
        and ``video_grid_thw`` as Qwen's processor makes them, ``second_per_grid_ts`` the seconds each temporal
        patch spans (temporal M-RoPE positions). ``pack_sequences``: padding-free decoder layers, as there."""
        step = decode_step_if_given(
            self, input_ids, decode_state, cache, logits_to_keep, (pixel_values, pixel_values_videos)
        )
        if step is not None:
            return step
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        left = detect_left_padding(attention_mask) if left_padding is None else bool(left_padding)
        token_types = self._token_types(input_ids)
        embeds = self.get_input_embeddings()(input_ids)
        kept = attention_mask.bool()
        embeds, kept, v2v_seconds = self._insert_visual_tokens(
            embeds, token_types, kept, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
        )
        positions = qwen_rope_index(
            self.hf_model, input_ids, token_types, image_grid_thw, video_grid_thw, attention_mask, second_per_grid_ts
        )
        visual_mask = token_types > 0
        plan = self.stage_plan
        query_mask = torch.zeros_like(visual_mask)
        if plan is not None and plan.boundaries:
            # In training the prompt ends before the first supervised token: answers never act as queries,
            # so the visual tokens kept are the ones the same prompt keeps at generation.
            query_mask = build_query_mask(plan.query, attention_mask, visual_mask, labels, query_end=query_end)
        sequence = SequenceState(
            hidden=embeds,
            attention_mask=attention_mask,
            position_ids=positions.permute(1, 2, 0),
            visual_mask=visual_mask,
            query_mask=query_mask,
            labels=labels,
        )
        if self.v2v is not None and not bool(kept.all()):
            # V2V drops tokens after the positions were laid out: the survivors keep their (t, h, w).
            sequence = sequence.compact(kept, left_align=left, recompute_positions=False)
        segments = sum(0 if grid is None else int(grid.shape[0]) for grid in (image_grid_thw, video_grid_thw))
        layout = "packed" if pack_sequences else "left" if left else "right"
        result = run_decoder(decoder_of(self.language_model), sequence, plan, cache, use_cache, layout, segments)
        return prefill_output(
            self, result, labels, num_items_in_batch, logits_to_keep, cache if use_cache else None,
            input_ids.shape[1], v2v_seconds,
        )  # fmt: skip

    def _insert_visual_tokens(
        self,
        embeds: torch.Tensor,
        token_types: torch.Tensor,
        kept: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        pixel_values_videos: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Visual tokens in their placeholder positions (and, with V2V, which of them stay), from ONE pass of the
        vision transformer over every image and video of the batch (its segments are per image and video).

        One pass whatever the batch holds: under ZeRO-3 every rank must gather the same parameters as often as
        the others (and under ZeRO-2/DDP reduce the merger's gradients), so a training batch without any image
        or video runs a blank image whose tokens are then left out.
        """
        parts = [
            (pixels, grid, kind)
            for pixels, grid, kind in ((pixel_values, image_grid_thw, 1), (pixel_values_videos, video_grid_thw, 2))
            if pixels is not None
        ]
        idle = not parts
        if idle:
            if not (self.training and torch.is_grad_enabled()):
                return embeds, kept, 0.0
            parts = [(*self._blank_image(embeds.device, embeds.dtype), 0)]
        pixels = torch.cat([part[0].to(embeds.dtype) for part in parts])
        grid = torch.cat([part[1] for part in parts])
        # Merged tokens per image and video, read once: they split the vision output and size V2V's budgets.
        counts = (grid.prod(dim=-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        seconds = 0.0
        if self.v2v is None:
            visual, _ = qwen_visual_embeddings(self.hf_model, pixels, grid)
        else:
            keep, visual, seconds = self._v2v(pixels, grid, counts)
        if idle:
            return embeds + visual[:0].sum().to(embeds.dtype), kept, seconds  # zero, but part of the graph
        ends = list(itertools.accumulate(len(part[1]) for part in parts))
        tokens = [sum(counts[end - len(part[1]) : end]) for part, end in zip(parts, ends, strict=True)]
        flags = keep.split(tokens) if self.v2v is not None else [None] * len(parts)
        for (_, _, kind), values, part_keep in zip(parts, visual.split(tokens), flags, strict=True):
            slots = token_types == kind
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), values.to(embeds.dtype))
            if part_keep is not None:
                kept = kept.masked_scatter(slots, part_keep)
        return embeds, kept, seconds

    def _blank_image(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest image the vision transformer takes (one merged token), all zeros, and its grid."""
        vision = self.config.vision_config
        merge = vision.spatial_merge_size
        features = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        grid = torch.tensor([[1, merge, merge]], device=device)
        return torch.zeros(merge * merge, features, device=device, dtype=dtype), grid

    def _v2v(
        self, pixels: torch.Tensor, grid: torch.Tensor, counts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Which merged visual tokens V2V keeps, the tokens (anchors holding their merged values), and the host
        seconds its scoring and merging took; ``counts`` are the merged tokens of each image and video."""
        window_index, merge_unit, block_index, block = qwen_vision_layout(self.hf_model, grid)
        visual, captured = qwen_visual_embeddings(self.hf_model, pixels, grid, capture_block=block_index)
        began = time.perf_counter()
        scores, keys = token_scores(block, captured, window_index, merge_unit)
        keep, values = select_tokens(visual, scores, keys, counts, self.v2v)
        return keep, values, time.perf_counter() - began

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Greedy or sampled decoding of left-padded prompts with images and videos; options as
        :meth:`DuetLlavaForCausalLM.generate`: ``sampling`` (a :class:`~llava.model.sampling.SamplingOptions`),
        its fields as keywords (``max_new_tokens``, 64 when neither gives it; ``fast``, ``use_cache``, sampling,
        EOS/pad ids), ``fast_decoder``."""
        fast_decoder = options.pop("fast_decoder", None)
        if max_new_tokens is not None:
            options["max_new_tokens"] = max_new_tokens
        sampling = SamplingOptions.from_keywords(options.pop("sampling", None), **options)
        visual_inputs = {
            "pixel_values": pixel_values,
            "pixel_values_videos": pixel_values_videos,
            "image_grid_thw": image_grid_thw,
            "video_grid_thw": video_grid_thw,
            "second_per_grid_ts": second_per_grid_ts,
        }
        return greedy_or_sample(self, input_ids, attention_mask, visual_inputs, sampling, fast_decoder)
