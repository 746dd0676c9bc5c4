"""Run a HF decoder-only LM layer by layer, in stages separated by visual-token drops.

The layers are the model's own modules (so SDPA/FlashAttention, gradient checkpointing and ZeRO
hooks all apply); this loop only owns what happens *between* layers: at each T2V boundary the
visual tokens are scored and the sequence is compacted, so later layers run on fewer tokens and,
during generation, hold shorter KV caches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.profiler import record_function

from llava.compression.config import T2VConfig
from llava.compression.dpp import cdpruner_keep
from llava.compression.t2v import (
    SequenceState,
    compacted_extents,
    compacted_row_lengths,
    keep_counts_for,
    keep_top_visual,
    score_visual_tokens,
)
from llava.hf_adapter import (
    Cache,
    call_decoder_layer,
    call_decoder_layer_on_groups,
    causal_mask,
    decode_step_mask,
    packs_into_one_row,
    rotary_tables,
)
from llava.model.packing import PackedRows
from llava.model.static_cache import StaticStageCache
from llava.utils.profiling import PROFILE_REGIONS

logger = logging.getLogger(__name__)

POSITION_MODES = ("keep", "compact")
SELECTORS = ("attention", "dpp")
ROW_LAYOUTS = ("right", "left", "packed")
"""How :func:`run_decoder` lays out rows: right-padded (training), left-padded (generation: rows stay
right-aligned after a drop) or packed (training without padding, :mod:`llava.model.packing`)."""


def decoder_of(language_model: nn.Module) -> nn.Module:
    """The base decoder (embeddings, layers, final norm, rotary embedding) of a causal LM (or the decoder
    itself, as Qwen2.5-VL's text model)."""
    decoder = language_model if hasattr(language_model, "layers") else language_model.get_decoder()
    for attribute in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, attribute):
            raise TypeError(
                f"{type(language_model).__name__} has no decoder.{attribute}; only LLaMA-style decoders "
                "(embed_tokens, layers, norm, rotary_emb) are supported"
            )
    return decoder


@dataclass(frozen=True)
class StagePlan:
    """Where the LLM drops visual tokens: before each of ``boundaries`` (layer indices, strictly increasing),
    keeping ``floor(ratio * N0)`` of each sample's N0 visual tokens, chosen by ``selector``.

    A boundary 0 (selector ``dpp`` only) drops at the LLM input, before layer 0, on the input embeddings: it
    starts no stage of its own, the first stage simply runs on the selected tokens.
    """

    boundaries: tuple[int, ...] = ()
    keep_ratios: tuple[float, ...] = ()
    position_mode: str = "keep"
    query: str = "instruction"
    selector: str = "attention"

    def __post_init__(self) -> None:
        if len(self.boundaries) != len(self.keep_ratios):
            raise ValueError(f"{len(self.boundaries)} boundaries but {len(self.keep_ratios)} keep ratios")
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {self.selector!r}")
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:], strict=False)) or any(
            b < 0 for b in self.boundaries
        ):
            raise ValueError(f"boundaries must be non-negative and strictly increasing, got {self.boundaries}")
        if self.drops_at_input and self.selector != "dpp":
            raise ValueError("a drop at layer 0 (the LLM input) needs selector 'dpp': attention scores need a layer")

    @property
    def drops_at_input(self) -> int:
        """1 when the first boundary is layer 0 (a selection before any layer), else 0."""
        return int(bool(self.boundaries) and self.boundaries[0] == 0)

    def stage_starts(self) -> tuple[int, ...]:
        """First layer of each stage (a boundary at layer 0 is not a stage of its own)."""
        return (0, *self.boundaries[self.drops_at_input :])


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
class TokenGroups:
    """DyMU's virtual token unmerging: positions of the sequence that share one merged token.

    ``starts`` ``[B, L]`` marks the first position of every group (a text or padding position is a group
    of one); ``count`` is the number of groups of the row that has most (known on the host).
    """

    starts: torch.Tensor
    count: int

    def run(
        self,
        layers: list[nn.Module],
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """``layers`` on one hidden state per group (attention at full length), expanded back to ``[B, L, D]``."""
        groups = self.starts.long().cumsum(dim=1) - 1
        representatives = torch.argsort((~self.starts).to(torch.int8), dim=1, stable=True)[:, : self.count]
        sizes = torch.zeros(groups.shape[0], self.count, device=groups.device).scatter_add(
            1, groups, torch.ones_like(groups, dtype=torch.float)
        )
        width = hidden.shape[-1]
        unique = hidden.gather(1, representatives.unsqueeze(-1).expand(-1, -1, width))
        for layer in layers:
            unique = call_decoder_layer_on_groups(
                layer, unique, groups, sizes, attention_mask=mask, position_embeddings=position_embeddings,
                cache=cache, attention_kwargs=attention_kwargs,
            )  # fmt: skip
        return unique.gather(1, groups.unsqueeze(-1).expand(-1, -1, width))


@dataclass
class DecoderResult:
    hidden: torch.Tensor
    sequence: SequenceState
    decode_state: DecodeState
    visual_tokens_per_layer: list[float] = field(default_factory=list)
    visual_tokens_per_row: list[list[int]] = field(default_factory=list)
    compression_time_s: float = 0.0


def _run_layers(
    layers: list[nn.Module],
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Cache | None,
    use_cache: bool,
    attention_kwargs: dict[str, Any] | None = None,
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
            attention_kwargs=attention_kwargs,
        )
    return hidden


def _next_positions(sequence: SequenceState) -> torch.Tensor:
    """Each row's next RoPE position: one past its largest (over M-RoPE's components too, where text after
    an image continues from the image's largest position, as transformers' ``rope_deltas`` do)."""
    positions = sequence.position_ids
    mask = sequence.attention_mask if positions.dim() == 2 else sequence.attention_mask.unsqueeze(-1)
    largest = (positions * mask).amax(dim=1)
    return (largest if largest.dim() == 1 else largest.amax(dim=-1)) + 1


def rotary_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions as the decoder's rotary embedding takes them: ``[B, L]``, or M-RoPE's ``[B, L, 3]`` (kept
    per token so drops compact them like any field) as ``[3, B, L]``."""
    return position_ids.permute(2, 0, 1) if position_ids.dim() == 3 else position_ids


def run_decoder(
    decoder: nn.Module,
    sequence: SequenceState,
    plan: StagePlan | None = None,
    cache: Cache | None = None,
    use_cache: bool = False,
    layout: str = "right",
    num_segments: int = 0,
    groups: TokenGroups | None = None,
) -> DecoderResult:
    """Prefill/training pass over the whole sequence, dropping visual tokens at the plan's boundaries.

    ``layout`` (:data:`ROW_LAYOUTS`): ``left`` keeps rows right-aligned after a drop (left padding, for
    generation); training batches are ``right``-padded; ``packed`` runs each stage's layers on the real tokens
    only, packed into rows (:mod:`llava.model.packing`; training and prefills without a cache): the same
    result without computing padding. ``num_segments`` (images plus videos in the batch) turns the reported
    visual tokens per layer into a per-image/per-video count. Returns the final-normed hidden states and
    the compacted sequence (its labels stay aligned with the hidden states). ``groups`` (DyMU's VTU, no
    T2V boundaries) runs every layer once per group of positions that share a merged token.
    """
    plan = plan or StagePlan()
    if groups is not None and plan.boundaries:
        raise ValueError("virtual token unmerging keeps every position; it does not combine with T2V boundaries")
    if layout not in ROW_LAYOUTS:
        raise ValueError(f"layout must be one of {ROW_LAYOUTS}, got {layout!r}")
    packed, left_align = layout == "packed", layout == "left"
    if packed and cache is not None:
        raise ValueError("packed sequences are for training and cache-free prefills; a KV cache needs padded rows")
    starts = plan.stage_starts()
    num_layers = len(decoder.layers)
    initial_visual = sequence.visual_mask.sum(dim=1)
    per_segment = max(num_segments, 1)
    # Everything the stages need to know on the host, read back in one transfer instead of one
    # synchronisation per boundary: each stage's shortest and longest row (its padded length, and whether
    # it has padding at all), how many query rows to score (DPP: how many greedy steps), and, packed, every
    # row's length at every stage.
    row_lengths = sequence.attention_mask.sum(dim=1)
    first_stage = torch.stack([row_lengths.amin(), row_lengths.amax()]) if row_lengths.numel() else row_lengths
    known = [first_stage.reshape(-1)]
    dpp = plan.selector == "dpp"
    if plan.boundaries:
        known.append(compacted_extents(sequence, plan.keep_ratios).reshape(-1))
        if dpp:
            known += [keep_counts_for(initial_visual, ratio).amax(0, True) for ratio in plan.keep_ratios]
        known.append(sequence.query_mask.sum(dim=1).amax(0, True))
    batch = sequence.attention_mask.shape[0]
    if packed:  # every row's length at every stage (the packing plan), and its VTU groups
        known.append(row_lengths)
        if plan.boundaries:
            known.append(compacted_row_lengths(sequence, plan.keep_ratios).reshape(-1))
        if groups is not None:  # the groups of the real tokens (padding positions are groups of one)
            known.append((groups.starts & sequence.attention_mask.bool()).sum(dim=1))
    values = torch.cat(known).tolist()

    def take_rows() -> list[int]:  # the last ``batch`` values, removed
        rows = values[len(values) - batch :]
        del values[len(values) - batch :]
        return rows

    if packed:
        group_counts = take_rows() if groups is not None else []
        stage_rows = [take_rows() for _ in range(len(plan.boundaries) + 1)][::-1]
    max_queries = values.pop() if plan.boundaries else 0
    greedy_steps = [values.pop() for _ in plan.boundaries][::-1] if dpp else []
    # Extents, padded lengths and padding per boundary index: before any drop, then after each boundary. A stage
    # runs on what follows its boundary; with a drop at the input (boundary 0) stage 0 runs on the dropped rows.
    extents = [values[index : index + 2] for index in range(0, len(values), 2)]
    padded_lengths = [sequence.attention_mask.shape[1]] + [longest for _, longest in extents[1:]]
    padding_free = [
        bool(extent) and extent[0] == padded for extent, padded in zip(extents, padded_lengths, strict=False)
    ]
    skip = plan.drops_at_input
    if packed:
        stage_rows = stage_rows[skip:]
    masks: list[torch.Tensor] = []
    next_positions: list[torch.Tensor] = []
    visual_per_stage: list[torch.Tensor] = []
    compression_time = 0.0
    position_embeddings = None
    for stage, start in enumerate(starts):
        end = starts[stage + 1] if stage + 1 < len(starts) else num_layers
        drop = stage - 1 + skip  # the boundary this stage starts at, if any (-1: none)
        if drop >= 0:
            began = time.perf_counter()
            keep_counts = keep_counts_for(initial_visual, plan.keep_ratios[drop])
            with record_function(PROFILE_REGIONS["t2v_scoring"]):
                if dpp:  # CDPruner: the keep mask straight from the conditional DPP on this layer's input
                    keep = cdpruner_keep(sequence, keep_counts, greedy_steps[drop])
                else:
                    scores = score_visual_tokens(decoder.layers[start], sequence, position_embeddings, max_queries)
            with record_function(PROFILE_REGIONS["t2v_compaction"]):
                if not dpp:
                    keep = keep_top_visual(scores, sequence, keep_counts)
                compact = plan.position_mode == "compact"
                sequence = sequence.compact(keep, left_align, compact, padded_lengths[drop + 1])
            compression_time += time.perf_counter() - began
        if not packed or stage + 1 < len(starts):  # packed: only the next boundary's scoring reads them
            position_embeddings = rotary_tables(decoder, sequence.hidden, rotary_positions(sequence.position_ids))
        layers = list(decoder.layers[start:end])
        with record_function(PROFILE_REGIONS["llm"]):
            if packed:
                rows = PackedRows.of(sequence.attention_mask, stage_rows[stage], packs_into_one_row(decoder.config))
                hidden = _run_packed(decoder, layers, sequence, rows, groups, group_counts)
            else:
                # A prefill starts from an empty cache, so its mask is the cache-free one (any cache type works).
                mask = causal_mask(
                    decoder.config, sequence.hidden, sequence.attention_mask, None, start, padding_free[stage + skip]
                )
                if groups is not None:
                    hidden = groups.run(
                        layers, sequence.hidden, mask, position_embeddings, cache if use_cache else None
                    )
                else:
                    hidden = _run_layers(
                        layers, sequence.hidden, mask, sequence.position_ids, position_embeddings, cache, use_cache
                    )
        sequence = replace(sequence, hidden=hidden)
        masks.append(sequence.attention_mask)
        next_positions.append(_next_positions(sequence))
        visual_tokens = sequence.visual_mask if groups is None else sequence.visual_mask & groups.starts
        visual_per_stage.append(visual_tokens.sum(dim=1))  # with VTU: the distinct tokens the linear layers see
    ends = (*starts[1:], num_layers)
    row_counts = torch.stack(visual_per_stage).tolist()  # [stages][B]: the prefill's one read-back of the counts
    visual_counts = [sum(stage) / per_segment for stage in row_counts]
    layers_per_stage = [end - start for start, end in zip(starts, ends, strict=True)]
    tokens_per_layer = [
        count for count, layers in zip(visual_counts, layers_per_stage, strict=True) for _ in range(layers)
    ]
    tokens_per_row = [
        [count for count, layers in zip(row, layers_per_stage, strict=True) for _ in range(layers)]
        for row in zip(*row_counts, strict=True)
    ]
    return DecoderResult(
        hidden=decoder.norm(sequence.hidden),
        sequence=sequence,
        decode_state=DecodeState(starts, masks, next_positions),
        visual_tokens_per_layer=tokens_per_layer,
        visual_tokens_per_row=tokens_per_row,
        compression_time_s=compression_time,
    )


def _run_packed(
    decoder: nn.Module,
    layers: list[nn.Module],
    sequence: SequenceState,
    rows: PackedRows,
    groups: TokenGroups | None,
    group_counts: list[int],
) -> torch.Tensor:
    """One stage's ``layers`` on the real tokens of ``sequence``, packed (:class:`PackedRows`); back as ``[B, L, D]``.

    With VTU ``groups`` (``group_counts``: each sample's groups, on the host) a padding slot is a group of one."""
    hidden = rows.pack(sequence.hidden)
    positions = rows.pack(sequence.position_ids)
    position_embeddings = rotary_tables(decoder, hidden, rotary_positions(positions))
    mask, attention_kwargs = rows.attention(decoder.config, hidden.dtype)
    if groups is not None:
        starts = rows.pack(groups.starts) | (rows.segment_ids < 0)
        packed_groups = TokenGroups(starts, rows.most_groups(group_counts))
        hidden = packed_groups.run(layers, hidden, mask, position_embeddings, None, attention_kwargs)
    else:
        hidden = _run_layers(layers, hidden, mask, positions, position_embeddings, None, False, attention_kwargs)
    return rows.unpack(hidden)


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
        position_embeddings = rotary_tables(decoder, hidden, positions)
        causal = causal_mask(decoder.config, hidden, mask, cache, start)
        hidden = _run_layers(
            list(decoder.layers[start:end]), hidden, causal, positions, position_embeddings,
            cache, True,
        )  # fmt: skip
    return decoder.norm(hidden)


@dataclass
class StaticDecodeState:
    """Fixed-address tensors a static-cache decode step reads and advances in place (graph-capturable).

    ``attendable[s]`` ``[B, capacity_s]`` marks the cache columns of stage ``s`` a new token may see,
    ``positions`` ``[stages, B]`` the next RoPE position per stage and row, ``write_columns`` ``[stages]``
    the cache column the next token goes to in each stage (shared with the cache's ``update``).
    """

    stage_starts: tuple[int, ...]
    attendable: list[torch.Tensor]
    positions: torch.Tensor
    write_columns: torch.Tensor

    def load(self, state: DecodeState) -> None:
        """Start from a prefill's state: its masks, next positions and lengths (device ops, no sync)."""
        for stage, prompt_mask in enumerate(state.attention_masks):
            rows, columns = self.attendable[stage].shape
            if prompt_mask.shape[0] != rows or prompt_mask.shape[1] > columns:
                raise ValueError(
                    f"stage {stage}: a prefill of {prompt_mask.shape[0]} rows x {prompt_mask.shape[1]} tokens does "
                    f"not fit a decode state of {rows} rows x {columns} cache columns (a [1, L] mask would be "
                    "broadcast over every row)"
                )
            self.attendable[stage].zero_()
            self.attendable[stage][:, : prompt_mask.shape[1]].copy_(prompt_mask.bool())
            self.write_columns[stage].fill_(prompt_mask.shape[1])
            self.positions[stage].copy_(state.next_positions[stage])

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of every tensor, to undo warm-up steps."""
        return [tensor.clone() for tensor in (*self.attendable, self.positions, self.write_columns)]

    def restore(self, saved: list[torch.Tensor]) -> None:
        """Copy a :meth:`snapshot` back in place (addresses unchanged)."""
        for tensor, copy in zip((*self.attendable, self.positions, self.write_columns), saved, strict=True):
            tensor.copy_(copy)


def run_static_decoder_step(
    decoder: nn.Module, hidden: torch.Tensor, state: StaticDecodeState, cache: StaticStageCache
) -> torch.Tensor:
    """One new token per row over static per-stage caches; advances ``state`` in place.

    Fixed shapes, no host synchronisation and no data-dependent control flow, so a CUDA graph can
    capture it. ``cache`` is the :class:`~llava.model.static_cache.StaticStageCache` in decoding mode,
    reading ``state.write_columns``. Per step the rotary tables are computed once for every stage's
    position (one call; in ``keep`` mode the stages share one position, in ``compact`` mode each stage
    reads its own column) and each stage's mask once, in the form its layers' kernel uses as is.
    """
    num_layers = len(decoder.layers)
    # [B, stages] positions -> tables [..., B, stages, head_dim]; stage s takes column s (a view).
    cos, sin = rotary_tables(decoder, hidden, state.positions.t())
    for stage, start in enumerate(state.stage_starts):
        end = state.stage_starts[stage + 1] if stage + 1 < len(state.stage_starts) else num_layers
        attendable = state.attendable[stage]
        attendable.index_fill_(1, state.write_columns[stage : stage + 1], True)
        positions = state.positions[stage].unsqueeze(1)
        position_embeddings = (cos[..., stage : stage + 1, :], sin[..., stage : stage + 1, :])
        mask = decode_step_mask(decoder.config, attendable, hidden.dtype)
        hidden = _run_layers(list(decoder.layers[start:end]), hidden, mask, positions, position_embeddings, cache, True)
    state.positions.add_(1)
    state.write_columns.add_(1)
    return decoder.norm(hidden)


class CompiledDecodeStep:
    """Opt-in: :func:`run_static_decoder_step` for one decoder under ``torch.compile`` (one graph, no breaks), so
    its elementwise kernels fuse (RMSNorm's eight, RoPE's five per tensor): about 450 launches per LLaVA-7B step
    instead of about 1,300. It makes no CUDA graphs of its own (no ``reduce-overhead``): the caller captures it in
    its own graph, as it captures the eager step.

    Called like the eager step without the decoder: ``step(hidden, state, cache)``. Each new shape (batch,
    per-stage capacities, dtype) compiles once, at its first call (run that call before a capture, as the
    warm-up does); :attr:`compile_time_s` sums those first calls. ``options`` go to ``torch.compile``
    (``backend``, ``mode``, ``dynamic``); numerics differ from the eager step by the fusion's rounding.
    """

    def __init__(self, decoder: nn.Module, **options: Any) -> None:
        self.decoder = decoder
        self.compile_time_s = 0.0
        self.compiled_shapes: set[tuple] = set()

        def step(hidden: torch.Tensor, state: StaticDecodeState, cache: StaticStageCache) -> torch.Tensor:
            return run_static_decoder_step(decoder, hidden, state, cache)

        self._step = torch.compile(step, fullgraph=True, **options)

    def __call__(self, hidden: torch.Tensor, state: StaticDecodeState, cache: StaticStageCache) -> torch.Tensor:
        """One decode step (see :func:`run_static_decoder_step`); the first call of a shape compiles it."""
        shape = (tuple(hidden.shape), hidden.dtype, hidden.device, tuple(mask.shape for mask in state.attendable))
        if shape in self.compiled_shapes:
            return self._step(hidden, state, cache)
        began = time.perf_counter()
        hidden = self._step(hidden, state, cache)
        self.compile_time_s += time.perf_counter() - began
        self.compiled_shapes.add(shape)
        logger.info("compiled the decode step for %s in %.1f s", shape, time.perf_counter() - began)
        return hidden


def stage_plan_from_config(t2v_config: T2VConfig | None, num_layers: int) -> StagePlan | None:
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
        t2v_config.selector,
    )
