"""DUET's V2V on Qwen2.5-VL's merged visual tokens (after the patch merger).

Qwen has no CLS token, so a token's score is the attention it receives in the vision transformer's last
full-attention block: that block's own norm, qkv projection and 2-D RoPE on its captured input, softmax
over each image's patches only (the images' ``cu_seqlens`` segments), averaged over heads and summed over
the image's queries, computed in query chunks so no ``[heads, n, n]`` map of a large image is held. A
merged token's score and key are the means over its ``merge^2`` patches (keys averaged over heads), and the
window order of the vision transformer is undone so both follow the LLM's raster order. Per image:
the top ``k1`` tokens by score stay; ``k2`` anchors evenly spaced by rank over the next ``cluster_width * k2``
absorb their most key-similar pool members (anchor + mean of members), written at the anchor's own
position; everything else is dropped and the order is kept, so every survivor keeps its M-RoPE position.
Budgets may be fractions of each image's count (:meth:`V2VConfig.budget`).
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from llava.compression.config import V2VConfig
from llava.compression.v2v import merge_into_anchors
from llava.hf_adapter import qwen_vision_rotary

QUERY_CHUNK = 1024


@torch.no_grad()
def patch_scores(block: nn.Module, captured: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch, in the vision transformer's (window) order: the attention it receives within its image,
    mean over heads (``[P]`` fp32), and its RoPE'd key averaged over heads (``[P, head_dim]`` fp32)."""
    attention = block.attn
    hidden = block.norm1(captured["hidden_states"])
    patches = hidden.shape[0]
    qkv = attention.qkv(hidden).reshape(patches, 3, attention.num_heads, -1).permute(1, 0, 2, 3)
    cos, sin = captured["position_embeddings"]
    query, key = qwen_vision_rotary(qkv[0], qkv[1], cos, sin)
    query, key = query.float().transpose(0, 1), key.float().transpose(0, 1)  # [heads, P, d]
    scores = torch.zeros(patches, device=hidden.device)
    for start, end in pairwise(captured["cu_seqlens"].tolist()):
        image_keys = key[:, start:end]
        received = torch.zeros(image_keys.shape[:2], device=hidden.device)
        for chunk in range(start, end, QUERY_CHUNK):
            logits = query[:, chunk : min(end, chunk + QUERY_CHUNK)] @ image_keys.transpose(1, 2) * attention.scaling
            received += logits.softmax(dim=-1).sum(dim=1)
        scores[start:end] = received.mean(dim=0)
    return scores, key.mean(dim=0)


def token_scores(
    block: nn.Module, captured: dict[str, Any], window_index: torch.Tensor, merge_unit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[T]`` and keys ``[T, d]`` of the merged tokens of all images, in the LLM's (raster) order."""
    scores, keys = patch_scores(block, captured)
    merged_scores = scores.view(-1, merge_unit).mean(dim=1)
    merged_keys = keys.view(-1, merge_unit, keys.shape[-1]).mean(dim=1)
    raster = torch.empty_like(window_index).scatter_(
        0, window_index, torch.arange(len(window_index), device=window_index.device)
    )
    return merged_scores[raster], merged_keys[raster]


def select_tokens(
    embeds: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, counts: list[int], v2v: V2VConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """DUET's dominant + contextual tokens per image. Returns ``(keep [T] bool, values [T, D])``: the merged
    tokens to keep (in place) and the visual tokens with each anchor replaced by its merged value.

    Batched over the images: their scores are laid out in a padded ``[images, longest]`` grid and ranked with
    one stable sort; the anchors and members of every image are merged in one call that reads the token rows
    in place (no padded copy of the features). The budgets and the rank slots of anchors and members follow
    from the host-side ``counts`` alone, so nothing is read back.
    """
    device = embeds.device
    plan = _SelectionPlan.build(counts, v2v)
    image_of, offset_of = plan.token_image.to(device), plan.token_offset.to(device)
    scores = scores.float()
    padded_scores = scores.new_full((len(counts), plan.longest), float("-inf"))
    padded_scores[image_of, offset_of] = scores
    ranked = padded_scores.argsort(dim=1, descending=True, stable=True)  # offsets by rank; padding ranks last
    rank_slots = torch.arange(plan.longest, device=device).expand(len(counts), -1)
    dominant = rank_slots < plan.dominant.to(device).unsqueeze(1)
    keep_padded = torch.zeros_like(dominant).scatter(1, ranked, dominant)
    values = embeds.clone()
    if plan.anchor_slots.shape[1] > 0:
        anchor_valid, member_valid = plan.anchor_valid.to(device), plan.member_valid.to(device)
        starts = plan.starts.to(device).unsqueeze(1)
        anchors = ranked.gather(1, plan.anchor_slots.to(device))
        members = ranked.gather(1, plan.member_slots.to(device))
        # Every image reads the flat token rows (a broadcast view, no copy) at its own flat indices.
        views = [tensor.unsqueeze(0).expand(len(counts), -1, -1) for tensor in (embeds, keys)]
        merged = merge_into_anchors(*views, anchors + starts, members + starts, anchor_valid, member_valid)
        keep_padded = keep_padded.scatter(1, anchors, anchor_valid | keep_padded.gather(1, anchors))
        real = plan.real_anchors.to(device)  # flat positions of the real anchors in the padded [images, K] grid
        flat_anchor = (anchors + starts).view(-1).index_select(0, real)
        merged = merged.view(-1, merged.shape[-1]).index_select(0, real)
        values.index_copy_(0, flat_anchor, merged.to(values.dtype))
    return keep_padded[image_of, offset_of], values


class _SelectionPlan(NamedTuple):
    """Host-side layout of :func:`select_tokens` for images of ``counts`` tokens (no device work)."""

    longest: int
    starts: torch.Tensor  # [images] first flat token of each image
    token_image: torch.Tensor  # [T] image of each flat token
    token_offset: torch.Tensor  # [T] position of each flat token within its image
    dominant: torch.Tensor  # [images] k1
    anchor_slots: torch.Tensor  # [images, K] rank slots of the anchors (padded with 0)
    anchor_valid: torch.Tensor  # [images, K]
    member_slots: torch.Tensor  # [images, M] rank slots of the pool's other tokens (padded with 0)
    member_valid: torch.Tensor  # [images, M]
    real_anchors: torch.Tensor  # flat indices of the valid entries of [images, K]

    @classmethod
    def build(cls, counts: list[int], v2v: V2VConfig) -> _SelectionPlan:
        sizes = np.asarray(counts, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        anchor_rows, member_rows, dominants = [], [], []
        for count in counts:
            dominant, contextual = v2v.budget(count)
            pool = min(v2v.cluster_width * contextual, count - dominant) if contextual else 0
            step = max(1, pool // contextual) if contextual else 1
            anchor_ranks = np.arange(0, pool, step)[:contextual]
            anchor_rows.append(dominant + anchor_ranks)
            member_rows.append(dominant + np.setdiff1d(np.arange(pool), anchor_ranks))
            dominants.append(dominant)

        def padded(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
            width = max((len(row) for row in rows), default=0)
            slots = np.zeros((len(rows), width), dtype=np.int64)
            valid = np.zeros((len(rows), width), dtype=bool)
            for index, row in enumerate(rows):
                slots[index, : len(row)], valid[index, : len(row)] = row, True
            return torch.from_numpy(slots), torch.from_numpy(valid)

        anchor_slots, anchor_valid = padded(anchor_rows)
        member_slots, member_valid = padded(member_rows)
        image_of = np.repeat(np.arange(len(counts)), sizes)
        return cls(
            longest=int(sizes.max(initial=0)),
            starts=torch.from_numpy(starts),
            token_image=torch.from_numpy(image_of),
            token_offset=torch.from_numpy(np.arange(int(sizes.sum())) - starts[image_of]),
            dominant=torch.tensor(dominants),
            anchor_slots=anchor_slots,
            anchor_valid=anchor_valid,
            member_slots=member_slots,
            member_valid=member_valid,
            real_anchors=torch.from_numpy(np.flatnonzero(anchor_valid.numpy().reshape(-1))),
        )
