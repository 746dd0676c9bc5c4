"""Padding-free training: the decoder layers run on the real tokens of a batch only, packed into one row.

The stage loop keeps its per-sample ``[B, L]`` layout between layers (T2V scoring, per-sample keep counts
relative to each sample's N0, compaction, positions and labels stay exactly what they are in a padded
batch); for each stage the real tokens are gathered into one row ``[1, T]`` (``T`` = real tokens of the
batch at that stage), the stage's layers run on it with each sample's attention isolated
(FlashAttention's variable-length path, or a block-diagonal causal mask for SDPA/eager, see
:func:`llava.hf_adapter.packed_attention`), and the result is scattered back. After each T2V boundary
the survivors are therefore repacked. Positions are the samples' own (they restart at 0 per sample), so
the packed row computes what the padded batch computes, without the padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llava.hf_adapter import packed_attention


@dataclass(frozen=True)
class PackedRows:
    """Where the real tokens of a ``[B, L]`` batch sit in the packed row ``[1, T]``.

    ``flat_index`` ``[T]`` holds ``row * L + column`` of every real token in row-major order (so each
    sample is one contiguous block), ``segment_ids`` ``[T]`` the row of each, ``cu_seqlens`` ``[B + 1]`` the
    block boundaries; ``longest`` is the longest sample (host int, for FlashAttention's ``max_length``).
    """

    flat_index: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    rows: int
    width: int
    longest: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor, total: int, longest: int) -> PackedRows:
        """The layout of ``attention_mask``'s real tokens; ``total`` (their number) and ``longest`` are known on
        the host, so building it needs no synchronisation. Any padding side works."""
        rows, width = attention_mask.shape
        real = attention_mask.reshape(-1).bool()
        flat_index = torch.argsort((~real).to(torch.int8), stable=True)[:total]
        lengths = attention_mask.sum(dim=1)
        cu_seqlens = F.pad(lengths.cumsum(dim=0), (1, 0))
        return cls(flat_index, flat_index // width, cu_seqlens, rows, width, int(longest))

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` -> ``[1, T, ...]``: the real tokens' entries, sample after sample."""
        flat = tensor.reshape(self.rows * self.width, *tensor.shape[2:])
        return flat.index_select(0, self.flat_index).unsqueeze(0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, T, ...]`` -> ``[B, L, ...]`` with zeros at padding positions (differentiable)."""
        flat = packed.new_zeros(self.rows * self.width, *packed.shape[2:])
        return flat.index_copy(0, self.flat_index, packed[0]).view(self.rows, self.width, *packed.shape[2:])

    def attention(self, config: Any, dtype: torch.dtype) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """The packed row's attention mask and extra attention keywords for ``config``'s kernel."""
        return packed_attention(config, self.segment_ids, self.cu_seqlens, self.longest, dtype)
