"""Run a HF decoder-only LM layer by layer, in stages separated by visual-token drops.

The layers are the model's own modules (so SDPA/FlashAttention, gradient checkpointing and ZeRO
hooks all apply); this loop only owns what happens *between* layers: at each T2V boundary the
visual tokens are scored and the sequence is compacted, so later layers run on fewer tokens and,
during generation, hold shorter KV caches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from llava.compression.t2v import Sequence, keep_top_visual, score_visual_tokens
from llava.hf_adapter import Cache, call_decoder_layer, causal_mask

POSITION_MODES = ("keep", "compact")


def decoder_of(language_model: nn.Module) -> nn.Module:
    """The base decoder (embeddings, layers, final norm, rotary embedding) of a causal LM."""
    decoder = language_model.get_decoder()
    for attribute in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, attribute):
            raise TypeError(
                f"{type(language_model).__name__} has no decoder.{attribute}; only LLaMA-style decoders "
                "(embed_tokens, layers, norm, rotary_emb) are supported"
            )
    return decoder


@dataclass(frozen=True)
class StagePlan:
    """Where the LLM drops visual tokens: before each of ``boundaries`` (layer indices), keeping
    ``floor(ratio * N0)`` of each sample's N0 visual tokens."""

    boundaries: tuple[int, ...] = ()
    keep_ratios: tuple[float, ...] = ()
    position_mode: str = "keep"
    query: str = "instruction"

    def __post_init__(self) -> None:
        if len(self.boundaries) != len(self.keep_ratios):
            raise ValueError(f"{len(self.boundaries)} boundaries but {len(self.keep_ratios)} keep ratios")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")

    def stage_starts(self) -> tuple[int, ...]:
        return (0, *self.boundaries)


@dataclass
class DecodeState:
    """What decode steps need after a compressed prefill; held by the caller like the KV cache.

    Each stage has its own attention mask (its caches have their own length) and its own next
    RoPE position (identical across stages in ``keep`` mode, per-stage in ``compact`` mode).
    """

    stage_starts: tuple[int, ...]
    attention_masks: list[torch.Tensor]
    next_positions: list[torch.Tensor]


@dataclass
class DecoderResult:
    hidden: torch.Tensor
    sequence: Sequence
    decode_state: DecodeState
    visual_tokens_per_layer: list[float] = field(default_factory=list)
    compression_time_s: float = 0.0


def _run_layers(
    layers: list[nn.Module],
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Cache | None,
    use_cache: bool,
) -> torch.Tensor:
    for layer in layers:
        hidden = call_decoder_layer(
            layer,
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            cache=cache,
            use_cache=use_cache,
        )
    return hidden


def _next_positions(sequence: Sequence) -> torch.Tensor:
    return (sequence.position_ids * sequence.attention_mask).amax(dim=1) + 1


def run_decoder(
    decoder: nn.Module,
    sequence: Sequence,
    plan: StagePlan | None = None,
    cache: Cache | None = None,
    use_cache: bool = False,
    left_align: bool = False,
    num_segments: int = 0,
) -> DecoderResult:
    """Prefill/training pass over the whole sequence, dropping visual tokens at the plan's boundaries.

    ``left_align`` keeps rows right-aligned after a drop (left padding, for generation); training
    batches are right-padded. ``num_segments`` (images plus videos in the batch) turns the reported
    visual tokens per layer into a per-image/per-video count. Returns the final-normed hidden states and
    the compacted sequence (its labels stay aligned with the hidden states).
    """
    plan = plan or StagePlan()
    starts = plan.stage_starts()
    num_layers = len(decoder.layers)
    initial_visual = sequence.visual_mask.sum(dim=1)
    per_segment = max(num_segments, 1)
    masks: list[torch.Tensor] = []
    next_positions: list[torch.Tensor] = []
    tokens_per_layer: list[float] = []
    compression_time = 0.0
    position_embeddings = None
    for stage, start in enumerate(starts):
        end = starts[stage + 1] if stage + 1 < len(starts) else num_layers
        if stage > 0:
            began = time.perf_counter()
            ratio = plan.keep_ratios[stage - 1]
            keep_counts = torch.floor(initial_visual.double() * ratio + 1e-9).long()
            scores = score_visual_tokens(decoder.layers[start], sequence, position_embeddings)
            keep = keep_top_visual(scores, sequence, keep_counts)
            sequence = sequence.compact(keep, left_align, recompute_positions=plan.position_mode == "compact")
            compression_time += time.perf_counter() - began
        position_embeddings = decoder.rotary_emb(sequence.hidden, position_ids=sequence.position_ids)
        mask = causal_mask(decoder.config, sequence.hidden, sequence.attention_mask, cache, start)
        hidden = _run_layers(
            list(decoder.layers[start:end]),
            sequence.hidden,
            mask,
            sequence.position_ids,
            position_embeddings,
            cache,
            use_cache,
        )
        sequence = replace(sequence, hidden=hidden)
        masks.append(sequence.attention_mask)
        next_positions.append(_next_positions(sequence))
        visual_now = float(sequence.visual_mask.sum()) / per_segment
        tokens_per_layer += [visual_now] * (end - start)
    return DecoderResult(
        hidden=decoder.norm(sequence.hidden),
        sequence=sequence,
        decode_state=DecodeState(starts, masks, next_positions),
        visual_tokens_per_layer=tokens_per_layer,
        compression_time_s=compression_time,
    )


def run_decoder_step(decoder: nn.Module, hidden: torch.Tensor, state: DecodeState, cache: Cache) -> torch.Tensor:
    """One or more new tokens after a (possibly compressed) prefill; updates ``state`` in place."""
    num_layers = len(decoder.layers)
    batch, new_tokens = hidden.shape[:2]
    steps = torch.arange(new_tokens, device=hidden.device)
    for stage, start in enumerate(state.stage_starts):
        end = state.stage_starts[stage + 1] if stage + 1 < len(state.stage_starts) else num_layers
        mask = torch.cat([state.attention_masks[stage], state.attention_masks[stage].new_ones(batch, new_tokens)], 1)
        state.attention_masks[stage] = mask
        positions = state.next_positions[stage].unsqueeze(1) + steps
        state.next_positions[stage] = state.next_positions[stage] + new_tokens
        position_embeddings = decoder.rotary_emb(hidden, position_ids=positions)
        causal = causal_mask(decoder.config, hidden, mask, cache, start)
        hidden = _run_layers(
            list(decoder.layers[start:end]), hidden, causal, positions, position_embeddings,
            cache, True,
        )  # fmt: skip
    return decoder.norm(hidden)


def stage_plan_from_config(t2v_config, num_layers: int) -> StagePlan | None:
    """Turn a :class:`~llava.compression.config.T2VConfig` into layer indices for this model's depth.

    A boundary at or past the last layer drops nothing any layer sees and is left out.
    """
    if t2v_config is None:
        return None
    layers = t2v_config.boundary_layers(num_layers)
    ratios = t2v_config.stage_ratios(num_layers)
    stages = [(layer, ratio) for layer, ratio in zip(layers, ratios, strict=True) if layer < num_layers]
    return StagePlan(
        tuple(layer for layer, _ in stages),
        tuple(ratio for _, ratio in stages),
        t2v_config.position_mode,
        t2v_config.query,
    )
