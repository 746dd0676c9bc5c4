"""Stage B (T2V): text-guided dropping of visual tokens inside the LLM, at stage boundaries.

At a boundary layer the visual tokens are scored by how much the query text tokens attend to
them, with a separate computation for the query rows only (the layer's own input norm, q/k
projections and RoPE, causal mask, fp32 softmax, mean over heads and queries, no gradient). The
decoder layers themselves keep their SDPA/FlashAttention kernels. The top-k visual tokens are
kept in their original order; everything else about the sequence is compacted around them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from llava.constants import IGNORE_INDEX
from llava.hf_adapter import flat_rotary_tables, rotary_embed

logger = logging.getLogger(__name__)

QUERY_MODES = ("last", "instruction", "salient")

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves please answer question using single word phrase image picture photo shown
    describe tell give provide briefly detail detailed user assistant""".split()  # noqa: SIM905
)
"""Function words and prompt boilerplate: never salient. Content words (nouns, verbs, adjectives,
numbers) remain, which is what a POS filter would keep, without needing spaCy."""


def content_token_table(tokenizer) -> torch.Tensor:
    """Bool ``[vocab]``: True for tokens that carry content (not stop words, punctuation or specials)."""
    vocab_size = len(tokenizer)
    table = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids)
    for token, index in tokenizer.get_vocab().items():
        if index >= vocab_size or index in special:
            continue
        word = token.replace("▁", "").replace("Ġ", "").strip().lower()
        is_word = len(word) >= 2 and any(ch.isalnum() for ch in word) and word not in STOP_WORDS
        table[index] = is_word or word.isdigit()
    return table


@dataclass
class SequenceState:
    """The decoder's state of every token of a batch, kept aligned through drops: hidden states, padding mask,
    RoPE positions, which tokens are visual, which act as T2V queries, and the labels."""

    hidden: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L], or [B, L, 3] for M-RoPE (temporal, height, width)
    visual_mask: torch.Tensor  # [B, L] bool
    query_mask: torch.Tensor  # [B, L] bool
    labels: torch.Tensor | None = None  # [B, L]

    def compact(
        self, keep: torch.Tensor, left_align: bool, recompute_positions: bool, length: int | None = None
    ) -> SequenceState:
        """Keep the ``keep`` positions of every tensor, in order; pad rows to ``length``.

        ``length`` must be the largest number of kept positions of any row; when the caller knows it
        (see :func:`compacted_extents`) no host synchronisation happens here. Vectorised: one cumsum
        gives every kept token its destination column, one scatter inverts that into a source column
        per destination, and the hidden states and the stacked integer fields are each gathered with one
        flat ``index_select``.
        """
        batch, old_length = keep.shape
        device = keep.device
        counts = keep.sum(dim=1)
        if length is None:
            length = int(counts.max()) if counts.numel() else 0
        positions = torch.arange(old_length, device=device)
        dest = keep.long().cumsum(dim=1) - 1
        if left_align:
            dest = dest + (length - counts).unsqueeze(1)
        # Dropped positions land in spare columns past the end (distinct ones: no duplicate indices).
        dest = torch.where(keep, dest, length + positions)
        source = torch.full((batch, length + old_length), -1, dtype=torch.long, device=device)
        source = source.scatter(1, dest, positions.expand(batch, old_length))[:, :length]
        filled = (source >= 0).unsqueeze(-1)
        flat_source = (source.clamp(min=0) + torch.arange(batch, device=device).unsqueeze(1) * old_length).view(-1)

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(batch * old_length, -1).index_select(0, flat_source).view(batch, length, -1)

        # The per-token integer fields travel together: one gather and one fill for all of them.
        names = [item.name for item in fields(self) if item.name != "hidden" and getattr(self, item.name) is not None]
        columns = [getattr(self, name).long().reshape(batch, old_length, -1) for name in names]
        widths = [column.shape[-1] for column in columns]
        # Padding columns get 0, labels IGNORE_INDEX: filled on the device, not copied from a host list (that
        # would be a blocking host-to-device copy on a GPU at every boundary).
        fills = torch.zeros(sum(widths), dtype=torch.long, device=device)
        if "labels" in names:
            first = sum(widths[: names.index("labels")])
            fills[first : first + widths[names.index("labels")]].fill_(IGNORE_INDEX)
        picked = torch.where(filled, gather(torch.cat(columns, dim=-1)), fills).split(widths, dim=-1)
        out = {name: None for name in ("labels",)}
        for name, values in zip(names, picked, strict=True):
            original = getattr(self, name)
            out[name] = values.reshape(batch, length, *original.shape[2:]).to(original.dtype)
        out["hidden"] = torch.where(filled, gather(self.hidden), 0).view(batch, length, *self.hidden.shape[2:])
        compacted = SequenceState(**out)
        if recompute_positions:
            if self.position_ids.dim() == 3:
                raise ValueError("M-RoPE positions are kept through drops; position_mode 'compact' does not apply")
            compacted = replace(compacted, position_ids=(compacted.attention_mask.cumsum(dim=1) - 1).clamp(min=0))
        return compacted


def keep_counts_for(initial_visual: torch.Tensor, ratio: float) -> torch.Tensor:
    """Visual tokens each row keeps at a boundary: ``floor(ratio * N0)``, relative to the row's initial
    count N0 (never compounding over stages)."""
    return torch.floor(initial_visual.double() * ratio + 1e-9).long().clamp(max=initial_visual)


def compacted_extents(sequence: SequenceState, keep_ratios: tuple[float, ...]) -> torch.Tensor:
    """Shortest and longest row after each boundary, ``[len(keep_ratios), 2]`` on the device.

    Every real text token is kept and each row keeps ``keep_counts_for(N0, ratio)`` visual tokens, so
    the lengths follow from counts alone; the caller reads them with one host transfer for all stages
    instead of one synchronisation per boundary. The longest row is the padded length after the drop;
    rows are padding-free when both are equal.
    """
    device = sequence.attention_mask.device
    if not keep_ratios or sequence.attention_mask.shape[0] == 0:
        return torch.zeros(len(keep_ratios), 2, dtype=torch.long, device=device)
    rows = compacted_row_lengths(sequence, keep_ratios)
    return torch.stack([rows.amin(dim=1), rows.amax(dim=1)], dim=1)


def compacted_row_lengths(sequence: SequenceState, keep_ratios: tuple[float, ...]) -> torch.Tensor:
    """Real tokens of every row after each boundary, ``[len(keep_ratios), B]`` on the device."""
    initial_visual = sequence.visual_mask.sum(dim=1)
    text = sequence.attention_mask.sum(dim=1) - initial_visual
    if not keep_ratios:
        return text.new_zeros(0, text.shape[0])
    return torch.stack([text + keep_counts_for(initial_visual, ratio) for ratio in keep_ratios])


def build_query_mask(
    mode: str,
    attention_mask: torch.Tensor,
    visual_mask: torch.Tensor,
    labels: torch.Tensor | None,
    token_ids: torch.Tensor | None = None,
    content_table: torch.Tensor | None = None,
    query_end: int | None = None,
) -> torch.Tensor:
    """Which positions act as queries when scoring visual tokens, ``[B, L]`` bool.

    The prompt ends before the first supervised token (training) or at ``query_end`` / the end
    of the sequence (generation); answer tokens never act as queries.

    * ``last``: the last prompt token (PyramidDrop/FastV).
    * ``instruction``: prompt tokens after the last visual token (DUET's code).
    * ``salient``: content-word instruction tokens plus the last prompt token (the paper).

    Fallback (documented): a sample with no instruction tokens after its image, such as the
    ``plain`` pretraining template where the caption follows the image directly, uses its last
    prompt token (there the last visual token, which attends causally to all visual tokens).
    The query set is therefore never empty for a sample with any visual token.
    """
    if mode not in QUERY_MODES:
        raise ValueError(f"unknown T2V query mode {mode!r}; expected one of {QUERY_MODES}")
    batch, length = attention_mask.shape
    device = attention_mask.device
    positions = torch.arange(length, device=device).expand(batch, length)
    real = attention_mask.bool()
    last_real = torch.where(real, positions, -1).amax(dim=1)
    prompt_end = last_real + 1
    if labels is not None:
        supervised = labels != IGNORE_INDEX
        first_answer = torch.where(supervised, positions, length).amin(dim=1)
        prompt_end = torch.minimum(prompt_end, first_answer)
    if query_end is not None:
        prompt_end = torch.clamp(prompt_end, max=query_end)
    last_visual = torch.where(visual_mask, positions, -1).amax(dim=1)
    last_prompt = positions == (prompt_end - 1).unsqueeze(1)
    instruction = real & ~visual_mask & (positions > last_visual.unsqueeze(1)) & (positions < prompt_end.unsqueeze(1))
    if mode == "last":
        query = last_prompt
    elif mode == "instruction":
        query = instruction | last_prompt
    else:
        if content_table is None or token_ids is None:
            raise ValueError("salient queries need token ids and a content-token table (set_query_vocabulary)")
        ids = token_ids.clamp(min=0, max=content_table.numel() - 1)
        query = (instruction & content_table.to(device)[ids] & (token_ids >= 0)) | last_prompt
    return query & real


@torch.no_grad()
def score_visual_tokens(
    layer: nn.Module, sequence: SequenceState, position_embeddings: tuple, max_queries: int | None = None
) -> torch.Tensor:
    """Mean attention each position receives from the query rows at ``layer``, ``[B, L]`` fp32.

    Only the query rows are computed: q for the queries, k for all positions, the layer's own
    input norm and projections, RoPE at the tokens' positions, causal + padding mask.
    ``max_queries`` (at least the largest number of query rows of any sample) avoids reading that
    number back from the device.
    """
    attention = layer.self_attn
    hidden = layer.input_layernorm(sequence.hidden)
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    cos, sin = flat_rotary_tables(attention.config, *position_embeddings)

    query_count = sequence.query_mask.sum(dim=1)
    if max_queries is None:
        max_queries = int(query_count.max()) if query_count.numel() else 0
    max_queries = max(max_queries, 1)
    # Query positions per row, first max_queries of them (rows with fewer are padded with 0).
    order = torch.argsort((~sequence.query_mask).to(torch.int8), dim=1, stable=True)[:, :max_queries]
    valid_query = torch.arange(max_queries, device=hidden.device).unsqueeze(0) < query_count.unsqueeze(1)
    query_hidden = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    q = attention.q_proj(query_hidden).view(batch, max_queries, -1, head_dim).transpose(1, 2)
    k = attention.k_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
    index = order.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
    q = rotary_embed(q, cos.gather(1, index), sin.gather(1, index))
    k = rotary_embed(k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)

    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attention.scaling
    key_positions = torch.arange(length, device=hidden.device)
    allowed = (key_positions.view(1, 1, -1) <= order.unsqueeze(-1)) & sequence.attention_mask.bool().unsqueeze(1)
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    probs = probs * valid_query.view(batch, 1, max_queries, 1)
    return probs.sum(dim=(1, 2)) / (query_count.clamp(min=1).float() * probs.shape[1]).unsqueeze(1)


def keep_top_visual(scores: torch.Tensor, sequence: SequenceState, keep_counts: torch.Tensor) -> torch.Tensor:
    """Positions to keep: every real text token plus each row's ``keep_counts`` best visual tokens."""
    visual = sequence.visual_mask
    masked = scores.masked_fill(~visual, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    kept_visual = visual & (rank < keep_counts.unsqueeze(1))
    real_text = sequence.attention_mask.bool() & ~visual
    return real_text | kept_visual
