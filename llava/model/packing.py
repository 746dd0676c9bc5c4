"""Padding-free training: the decoder layers run on the real tokens of a batch, packed, not on padded rows.

The stage loop keeps its per-sample ``[B, L]`` layout between layers (T2V scoring, per-sample keep counts
relative to each sample's N0, compaction, positions and labels stay exactly what they are in a padded
batch); for each stage the real tokens are gathered into packed rows, the stage's layers run on them with
each sample's attention isolated, and the result is scattered back, so after each T2V boundary the
survivors are repacked. Positions are the samples' own (they restart at 0 per sample): the packed rows
compute what the padded batch computes, without the padding.

Two layouts, chosen by the attention kernel (:func:`llava.hf_adapter.packs_into_one_row`):

* **One row** ``[1, T]`` (``T`` = real tokens of the batch) for FlashAttention, whose variable-length path
  isolates the samples from their boundaries (``cu_seqlens``) at no cost for the other samples.
* **Bins** ``[K, C]`` for SDPA and eager, which need a mask and compute every query/key pair of a row: the
  samples are dealt, longest first, over ``K`` rows in snake order (a balanced deal; ``K`` chosen between
  ``ceil(T / longest)`` and ``B`` for the fewest slots ``K x C``, never more than the padded batch's), and each
  row gets a block-diagonal causal mask. Attention then costs about ``K x C x C`` instead of the padded
  ``B x L x L`` (one row of everything would cost ``T x T``); the linear layers see ``K x C`` tokens.

The deal is planned on the host from row lengths the stage loop has already read back (its one transfer),
with vectorised CPU tensor operations; only small index tensors go to the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llava.hf_adapter import packed_attention


def _deal(sizes: torch.Tensor, rank: torch.Tensor, total: int, longest: int) -> tuple[int, torch.Tensor]:
    """Deal samples (``rank`` 0 = longest) over ``K`` rows in snake order (0..K-1, K-1..0, ...), for every ``K``
    from ``ceil(total / longest)`` to ``B`` at once, and keep the ``K`` with the fewest slots (``K`` times the
    fullest row's load); ties go to more rows (shorter ones: less attention). ``K = B`` is the padded batch's
    layout, so the packed rows never hold more slots than the padded batch. Returns ``K`` and each sample's row."""
    batch = sizes.shape[0]
    counts = torch.arange(-(-total // longest), batch + 1).unsqueeze(1)  # [candidates, 1]
    turn, seat = rank // counts, rank % counts
    bins = torch.where(turn % 2 == 0, seat, counts - 1 - seat)  # [candidates, B]
    loads = torch.zeros(counts.shape[0], batch, dtype=torch.long).scatter_add(1, bins, sizes.expand_as(bins))
    slots = counts.squeeze(1) * loads.amax(dim=1)
    best = int(torch.nonzero(slots == slots.min()).max())
    return int(counts[best]), bins[best]


@dataclass(frozen=True)
class PackedRows:
    """Where the real tokens of a ``[B, L]`` batch sit in the packed rows ``[K, C]``.

    ``source`` ``[T]`` holds ``b * L + column`` of every real token (row-major, so each sample's tokens are in
    order) and ``slots`` ``[T]`` its slot ``k * C + offset`` in the packed rows; ``slot_source`` ``[K * C]`` is the
    inverse (``-1`` for a padding slot) and ``segment_ids`` ``[K, C]`` the sample of each slot (``-1`` padding).
    ``cu_seqlens`` ``[B + 1]`` (one-row layout) are the sample boundaries for FlashAttention, ``longest`` the
    longest sample; ``sizes`` and ``bin_of`` ``[B]`` (host) each sample's real tokens and packed row.
    """

    source: torch.Tensor
    slots: torch.Tensor
    slot_source: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    batch: int
    width: int
    longest: int
    sizes: torch.Tensor
    bin_of: torch.Tensor

    @classmethod
    def of(cls, attention_mask: torch.Tensor, lengths: list[int], one_row: bool) -> PackedRows:
        """The packed layout of ``attention_mask``'s real tokens; ``lengths`` are its row sums, known on the
        host (any padding side). ``one_row``: a single ``[1, T]`` row in batch order, else balanced bins."""
        batch, width = attention_mask.shape
        device = attention_mask.device
        sizes = torch.tensor(lengths, dtype=torch.long)
        total, longest = int(sizes.sum()), int(sizes.max()) if lengths else 0
        rank = torch.empty_like(sizes)
        rank[torch.argsort(-sizes, stable=True)] = torch.arange(batch)
        bins, bin_of = (1, torch.zeros_like(sizes)) if one_row or longest == 0 else _deal(sizes, rank, total, longest)
        # Inside a bin, samples follow their deal order; each one's first slot is the sizes before it.
        order = torch.argsort(bin_of * batch + (rank if not one_row else torch.arange(batch)), stable=True)
        before = torch.cumsum(sizes[order], 0) - sizes[order]
        loads = torch.zeros(bins, dtype=torch.long).scatter_add(0, bin_of, sizes)
        bin_start = torch.cumsum(loads, 0) - loads
        offset = torch.empty_like(sizes)
        offset[order] = before - bin_start[bin_of[order]]
        capacity = int(loads.max()) if lengths else 0
        first_slot = (bin_of * capacity + offset).to(device, non_blocking=True)

        real = attention_mask.reshape(-1).bool()
        source = torch.argsort((~real).to(torch.int8), stable=True)[:total]
        sample = source // width
        within = attention_mask.long().cumsum(dim=1).reshape(-1).index_select(0, source) - 1
        slots = first_slot.index_select(0, sample) + within
        slot_source = torch.full((bins * capacity,), -1, dtype=torch.long, device=device).index_copy(0, slots, source)
        segment_ids = torch.where(slot_source >= 0, slot_source // width, -1).view(bins, capacity)
        cu_seqlens = F.pad(attention_mask.sum(dim=1).cumsum(dim=0), (1, 0))
        return cls(source, slots, slot_source, segment_ids, cu_seqlens, batch, width, longest, sizes, bin_of)

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, C)``: packed rows and their capacity."""
        return tuple(self.segment_ids.shape)

    def most_groups(self, group_counts: list[int]) -> int:
        """VTU: the groups of the packed row that has most, given each sample's (a padding slot is one)."""
        bins, capacity = self.shape
        counts = torch.tensor(group_counts, dtype=torch.long)
        per_bin = torch.zeros(bins, dtype=torch.long).scatter_add(0, self.bin_of, counts)
        padding = capacity - torch.zeros(bins, dtype=torch.long).scatter_add(0, self.bin_of, self.sizes)
        return int((per_bin + padding).max())

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` -> ``[K, C, ...]``: the real tokens' entries; padding slots repeat entry 0 (masked)."""
        flat = tensor.reshape(self.batch * self.width, *tensor.shape[2:])
        return flat.index_select(0, self.slot_source.clamp(min=0)).view(*self.shape, *tensor.shape[2:])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[K, C, ...]`` -> ``[B, L, ...]`` with zeros at padding positions (differentiable)."""
        trailing = packed.shape[2:]
        real = packed.reshape(-1, *trailing).index_select(0, self.slots)
        flat = packed.new_zeros(self.batch * self.width, *trailing).index_copy(0, self.source, real)
        return flat.view(self.batch, self.width, *trailing)

    def attention(self, config: Any, dtype: torch.dtype) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """The packed rows' attention mask and extra attention keywords for ``config``'s kernel."""
        return packed_attention(config, self.segment_ids, self.cu_seqlens, self.longest, dtype)
