"""CDPruner: visual-token selection by a conditional determinantal point process (DPP).

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs"
(2025). The kept set is the (approximate) MAP of a DPP whose kernel is conditioned on the instruction::

    S_ij = cos(x_i, x_j)                    similarity of visual tokens i and j
    r_i  = minmax_i( mean_j cos(x_i, t_j) )  relevance of visual token i to the instruction tokens t_j, in [0, 1]
    L    = diag(r) . S . diag(r)            so det(L_Y) = prod_{i in Y} r_i^2 . det(S_Y)

and ``k`` tokens are chosen by the fast greedy MAP inference of Chen et al., "Fast Greedy MAP Inference for
Determinantal Point Process to Improve Recommendation Diversity" (NeurIPS 2018): each step takes the item of
largest marginal gain ``d_i^2`` (the squared residual of its Cholesky row), then updates every ``c_i``/``d_i``
incrementally in ``O(N t)``.

Deviation from the paper (also stated in the presets, ``configs/compression/cdpruner_*.yaml``): the paper
selects on the vision encoder's output, with CLIP's text encoder embedding the instruction. This repository has
no CLIP text tower, so the selection runs at a T2V boundary of the LLM (``selector: dpp``; the presets use
boundary 0.0, the LLM input, so every layer sees ``k`` tokens as in the paper), on the hidden states there: the
projected visual tokens, with relevance from the T2V query rows (``query: instruction``: the instruction's input
embeddings, the same space). Relevance is min-max normalised per *row* (a row with several images is one
selection of ``floor(ratio * N0)`` tokens). No ``theta`` / ``exp(alpha r)`` relevance-diversity trade-off is
applied: ``r`` enters the kernel as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava.compression.t2v import SequenceState

__all__ = ["cdpruner_keep", "conditional_dpp_kernel", "greedy_dpp_map", "normalise_relevance"]

EXHAUSTED_TOLERANCE = 1e-5
"""A marginal gain at or below this fraction of the row's largest initial gain counts as zero: the item adds no
volume (rank exhausted); such items are then taken in ``fallback`` order (default: position), never by
rounding noise."""


def conditional_dpp_kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """CDPruner's conditional kernel ``diag(r) . S . diag(r)``, ``[B, N, N]`` in fp32 (fp64 stays fp64).

    ``features`` ``[B, N, D]``: the tokens' features (``S`` is their cosine similarity); ``relevance``
    ``[B, N]``: each token's relevance to the instruction, in [0, 1] (:func:`normalise_relevance`).
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    unit = F.normalize(features.to(dtype), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)
    r = relevance.to(dtype)
    return r.unsqueeze(-1) * similarity * r.unsqueeze(-2)


def normalise_relevance(raw: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
    """Min-max normalise ``raw`` ``[B, N]`` over each row's valid positions to [0, 1]; 0 elsewhere.

    A row whose valid values are all equal (nothing to prefer) gets relevance 1: a plain diversity DPP.
    """
    lowest = raw.masked_fill(~valid_mask, float("inf")).amin(dim=1, keepdim=True)
    highest = raw.masked_fill(~valid_mask, float("-inf")).amax(dim=1, keepdim=True)
    span = highest - lowest
    flat = ~(span > 1e-6)  # also catches rows without valid positions (inf - inf = nan)
    scaled = (raw - lowest.masked_fill(flat, 0.0)) / span.masked_fill(flat, 1.0)
    scaled = torch.where(flat, torch.ones_like(raw), scaled)
    return scaled.masked_fill(~valid_mask, 0.0)


@torch.no_grad()
def greedy_dpp_map(
    kernel: torch.Tensor, k: int, valid_mask: torch.Tensor, fallback: torch.Tensor | None = None
) -> torch.Tensor:
    """Fast greedy MAP inference (Chen et al. 2018) of the DPP ``kernel`` ``[B, N, N]``: ``[B, k]`` indices.

    Each row selects among its ``valid_mask`` ``[B, N]`` items in greedy order: step ``t`` takes
    ``j = argmax_i d_i^2`` (ties: the lowest index), then for every ``i``
    ``e_i = (L_ji - <c_j, c_i>) / d_j``, ``c_i <- [c_i, e_i]``, ``d_i^2 <- d_i^2 - e_i^2``. Once a row's
    gains are exhausted (rank of the kernel reached, see :data:`EXHAUSTED_TOLERANCE`) its remaining items
    follow in descending ``fallback`` ``[B, N]`` order (values in [0, 1]; default: by position). A row with
    fewer than ``k`` valid items pads its indices with -1. The loop is over ``k``; each step is vectorised
    over the batch and reads nothing back from the device.
    """
    batch, n, _ = kernel.shape
    dtype = torch.float64 if kernel.dtype == torch.float64 else torch.float32
    kernel = kernel.to(dtype)
    device = kernel.device
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d_i^2
    tolerance = EXHAUSTED_TOLERANCE * gains.masked_fill(~valid_mask, 0.0).amax(dim=1, keepdim=True)
    rest = torch.zeros(batch, n, dtype=dtype, device=device) if fallback is None else fallback.to(dtype)
    available = valid_mask.clone()
    cholesky = torch.zeros(batch, max(k, 1), n, dtype=dtype, device=device)  # c_i, one row per step
    selected = torch.full((batch, k), -1, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    for step in range(k):
        live = gains > tolerance
        priority = torch.where(live, gains, rest - 2.0).masked_fill(~available, float("-inf"))
        pick = priority.argmax(dim=1)  # first maximum: ties go to the lowest index
        has_item = available.any(dim=1)
        selected[:, step] = torch.where(has_item, pick, -1)
        picked_live = live[rows, pick] & has_item
        norm = gains[rows, pick].clamp(min=0.0).sqrt()
        kernel_row = kernel[rows, pick]  # [B, N]: L_j.
        previous = cholesky[:, :step]  # [B, t, N]
        overlap = torch.einsum("bt,btn->bn", previous[rows, :, pick], previous)
        update = (kernel_row - overlap) / torch.where(picked_live, norm, 1.0).unsqueeze(1)
        update = update * picked_live.unsqueeze(1)  # an exhausted pick adds no volume: nothing to remove
        cholesky[:, step] = update
        gains = gains - update.square()
        available[rows, pick] = available[rows, pick] & ~has_item
    return selected


@torch.no_grad()
def cdpruner_keep(sequence: SequenceState, keep_counts: torch.Tensor, max_keep: int) -> torch.Tensor:
    """Positions to keep, ``[B, L]`` bool: every real text token plus each row's ``keep_counts`` visual tokens
    chosen by CDPruner on ``sequence.hidden``, relevance from the ``sequence.query_mask`` rows.

    ``max_keep`` (the largest of ``keep_counts``, known on the host) is the number of greedy steps. The kept
    visual tokens are the first ``keep_counts[b]`` greedy picks of row ``b`` (greedy picks are nested), in their
    original order after compaction. The same keep mask as :func:`~llava.compression.t2v.keep_top_visual`.
    """
    visual = sequence.visual_mask & sequence.attention_mask.bool()
    unit = F.normalize(sequence.hidden.float(), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)  # [B, L, L], visual-visual and visual-text at once
    queries = sequence.query_mask.to(similarity.dtype)
    raw = (similarity * queries.unsqueeze(1)).sum(dim=-1) / queries.sum(dim=1, keepdim=True).clamp(min=1.0)
    relevance = normalise_relevance(raw, visual)
    kernel = relevance.unsqueeze(-1) * similarity * relevance.unsqueeze(-2)
    picks = greedy_dpp_map(kernel, max_keep, visual, fallback=relevance)
    batch, length = visual.shape
    wanted = torch.arange(max_keep, device=picks.device).unsqueeze(0) < keep_counts.unsqueeze(1)
    targets = torch.where(wanted & (picks >= 0), picks, length)
    kept = torch.zeros(batch, length + 1, dtype=torch.bool, device=visual.device)
    kept = kept.scatter(1, targets, True)[:, :length]
    real_text = sequence.attention_mask.bool() & ~sequence.visual_mask
    return real_text | (kept & visual)
