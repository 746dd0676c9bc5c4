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
from typing import Any

import torch
from torch import nn

from llava.compression.config import V2VConfig
from llava.compression.v2v import merge_into_anchors, split_anchors
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
    tokens to keep (in place) and the visual tokens with each anchor replaced by its merged value."""
    keep = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    values = embeds.clone()
    for start, count in zip(torch.tensor(counts).cumsum(0).sub(torch.tensor(counts)).tolist(), counts, strict=True):
        dominant, contextual = v2v.budget(count)
        ranked = scores[start : start + count].argsort(descending=True, stable=True)
        keep[start + ranked[:dominant]] = True
        pool = ranked[dominant : dominant + min(v2v.cluster_width * contextual, count - dominant)]
        if contextual == 0 or pool.numel() == 0:
            continue
        anchor_ranks, member_ranks = split_anchors(pool.numel(), contextual, pool.device)
        anchors, members = pool[anchor_ranks], pool[member_ranks]
        image = slice(start, start + count)
        merged = merge_into_anchors(
            embeds[image].unsqueeze(0), keys[image].unsqueeze(0), anchors.unsqueeze(0), members.unsqueeze(0)
        )
        values[start + anchors] = merged[0].to(values.dtype)
        keep[start + anchors] = True
    return keep, values
