"""DUET's V2V on LLaVA-OneVision's packed AnyRes tokens: the base view and the packed tile grid, each reduced on
its own, selected AFTER packing, on the grid of tokens the LLM receives.

LLaVA-OneVision (SigLIP, ``anyres_max_9``) stitches an image's tiles, unpads them to its aspect ratio and, when
the grid exceeds ``vision_aspect_ratio``'s cap, downsizes it bilinearly AFTER the projector: a final token can
be a blend of four neighbouring patches, so patches cannot be chosen before packing without changing what the
survivors hold. V2V therefore works on the final tokens:

1. **Scores and keys per view.** One SigLIP pass over every view of every image up to the feature layer
   (:func:`llava.hf_adapter.llava_onevision_view_features`). SigLIP has no CLS token, so, as for Qwen2.5-VL
   (:mod:`llava.compression.qwen_v2v`), a patch's score is the attention it RECEIVES at the feature layer from
   the queries of its own view: that layer's ``layer_norm1``, ``q_proj``/``k_proj`` on its input, softmax over
   the view's patches in fp32, summed over the view's queries and averaged over heads, computed in query chunks
   (:func:`received_attention_and_keys`). Keys are that layer's ``k_proj`` output averaged over heads.
2. **The same layout as the features.** The score map and the keys of every view are packed by the model's own
   ``pack_image_features`` with ``image_newline=None`` (:func:`llava.hf_adapter.llava_onevision_pack`): the
   packing treats channels alike (unpadding slices, downsizing interpolates each channel), so every final token
   gets a score and a key (interpolated where the features are) at exactly its own position. The projected
   features are packed the same way, so the tokens are transformers' own, bit for bit.
3. **Selection per view group, in place.** An image alone in its sample has two view groups: its base view
   (``patches`` tokens) and its packed tile grid (the unpadded, possibly downsized rows); an image of a
   multi-image sample has its base view only (transformers gives it nothing else). A fractional budget
   (:meth:`V2VConfig.budget`) applies to each group's token count, so an image's budget splits over its base
   view and its grid in proportion to their tokens. Methods as in :mod:`llava.compression.anyres_v2v`
   (:func:`~llava.compression.anyres_v2v.choose_view_tokens`; :func:`select_group_tokens`): ``duet`` keeps the
   top ``k1`` tokens by score (stable: ties go to the earlier packed token) and ``k2`` anchors evenly spaced by
   rank over the next ``cluster_width * k2``, each absorbing its most key-similar pool members (anchor + mean of
   its members); ``visionzip`` spreads the anchors by position over all remaining tokens and merges every one
   of them; ``random`` keeps ``k1`` uniformly random tokens. Everything else is dropped; survivors stay at
   their own positions. Anchors hold merged PROJECTED token values (the merge runs after the projector, since
   downsizing does; DUET on LLaVA-1.5 and on LLaVA-NeXT merges before it).
4. **Newline rule.** transformers closes every row of the final tile grid with one ``image_newline`` token (and
   a lone base view, as an image of a multi-image sample has, with one). That token stays iff at least one token
   of its row survives V2V (the lone base view's newline stays iff the base view keeps a token, which a
   fractional budget always does). The base view of a tiled image has no newline tokens.
5. **Out.** A token and a keep flag per image placeholder, in transformers' order
   (:class:`~llava.compression.anyres_v2v.AnyResTokens`); the AnyRes family's model
   (:mod:`llava.model.llava_next`) drops the unkept placeholders before the decoder.

Videos are left to transformers' own path (pooled frames; V2V does not apply to them; T2V does). On the device,
the tower, the scoring, the selection, the merge and the gather run once over all views of all images; the
packing is transformers' own (a loop over images inside ``pack_image_features``, as its uncompressed path). The
view groups, budgets, anchor slots and newline rows are a host-side plan from the image sizes alone.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from llava.compression.anyres_v2v import (
    AnyResPlan,
    AnyResTokens,
    V2VClock,
    check_method,
    choose_view_tokens,
    pack_views,
)
from llava.compression.config import V2VConfig
from llava.compression.v2v import merge_into_anchors
from llava.hf_adapter import (
    llava_next_image_newline,
    llava_next_projector,
    llava_onevision_newline_layout,
    llava_onevision_pack,
    llava_onevision_view_features,
    llava_onevision_views_per_image,
)

SCORE_CHUNK_ELEMENTS = 1 << 26
"""Most fp32 attention logits held at once while scoring (256 MiB): the query chunk shrinks as views grow."""


@torch.no_grad()
def received_attention_and_keys(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch of each view, the attention it receives at SigLIP ``layer`` from its view's queries (softmax in
    fp32, summed over queries, averaged over heads; ``[views, patches]``) and its key averaged over heads
    (``[views, patches, head_dim]`` fp32). ``hidden`` ``[views, patches, D]`` is the layer's input; the logits
    are computed in query chunks, so no ``[views, heads, patches, patches]`` map is held at once."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    num_views, patches, _ = normed.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(normed).view(num_views, patches, heads, head_dim).transpose(1, 2).float()
    keys = attention.k_proj(normed).view(num_views, patches, heads, head_dim).transpose(1, 2).float()
    received = torch.zeros(num_views, heads, patches, device=hidden.device)
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, num_views * heads * patches))
    for start in range(0, patches, chunk):
        logits = query[:, :, start : start + chunk] @ keys.transpose(-1, -2) * attention.scale
        received += logits.softmax(dim=-1).sum(dim=2)
    return received.mean(dim=1), keys.mean(dim=1)


class OneVisionPlan(NamedTuple):
    """Host-side plan of V2V over LLaVA-OneVision's view groups (from the image sizes and the budget alone)."""

    groups: AnyResPlan  # "views" = view groups (base view, packed tile grid), "patches" = the longest group;
    # its layout reads the packed tokens (newlines left out) in order: [tokens], -1 for a newline
    views: list[int]  # views the tower runs per image
    slots: torch.Tensor  # [tokens]: slot of every packed token in the padded [groups, longest] score grid
    starts: torch.Tensor  # [groups]: first packed token of each group (groups are contiguous, in order)

    @classmethod
    def build(
        cls, model: nn.Module, image_sizes: torch.Tensor, batch_num_images: torch.Tensor | None, v2v: V2VConfig
    ) -> OneVisionPlan:
        """The plan for ``image_sizes`` (``[images, 2]``) and ``batch_num_images`` (as the image processor gives
        it; ``None``: every image alone) of transformers' LLaVA-OneVision model."""
        vision = model.config.vision_config
        base = (vision.image_size // vision.patch_size) ** 2
        views = llava_onevision_views_per_image(model, image_sizes, batch_num_images)
        newlines = [mask.numpy() for mask in llava_onevision_newline_layout(model, image_sizes, batch_num_images)]
        groups_of = [2 if count > 1 else 1 for count in views]  # base view (+ packed tile grid)
        sizes: list[int] = []
        for mask, groups in zip(newlines, groups_of, strict=True):
            tokens = int((~mask).sum())
            sizes += [base, tokens - base] if groups > 1 else [tokens]
        longest = max(sizes, default=1)
        layouts, rows, first_row, first_group = [], [], 0, 0
        for mask, groups in zip(newlines, groups_of, strict=True):
            token = np.cumsum(~mask) - 1  # index of each non-newline placeholder among the image's tokens
            in_grid = token >= base if groups > 1 else np.zeros_like(mask)
            slot = (first_group + in_grid) * longest + np.where(in_grid, token - base, token)
            layouts.append(np.where(mask, -1, slot))
            row = np.cumsum(mask) - mask + first_row  # newlines before a token; a newline closes its row
            if groups > 1:
                row[:base] = -1  # the base view of a tiled image has no rows
            rows.append(row)
            first_row += int(mask.sum())
            first_group += groups
        layout = np.concatenate(layouts) if layouts else np.zeros(0, dtype=np.int64)
        row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        plan = AnyResPlan.from_layout(groups_of, longest, layout, row, first_row, first_group, v2v)
        is_token = layout >= 0
        token_layout = np.full(len(layout), -1, dtype=np.int64)
        token_layout[is_token] = np.arange(int(is_token.sum()))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else np.zeros(0, np.int64)
        return cls(
            plan._replace(layout=torch.from_numpy(token_layout)),
            views,
            torch.from_numpy(layout[is_token]),
            torch.from_numpy(starts),
        )


def select_group_tokens(
    tokens: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, plan: OneVisionPlan, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view group, which packed tokens stay (``[tokens]`` bool) and the tokens with each anchor holding its
    merged value (``[tokens, D]``, the other rows unchanged). ``tokens`` ``[tokens, D]``, ``scores``
    ``[tokens]`` and ``keys`` ``[tokens, d]`` in packed order (newlines left out). Only the scores are laid out
    in the padded ``[groups, longest]`` grid to rank them; the merge reads the flat token rows in place (a
    broadcast view, no padded copy of the tokens)."""
    device = tokens.device
    groups = plan.groups
    num_groups, longest = groups.surviving.shape
    slots = plan.slots.to(device, non_blocking=True)
    grid = scores.float().new_zeros(num_groups * longest).index_copy(0, slots, scores.float())
    choice = choose_view_tokens(grid.view(num_groups, longest), groups, method, device)
    keep = choice.keep.view(-1).index_select(0, slots)
    if choice.anchors is None:
        return keep, tokens
    last = tokens.shape[0] - 1
    starts = plan.starts.to(device, non_blocking=True).unsqueeze(1)
    anchors = (choice.anchors + starts).clamp(max=last)  # padded entries may point past their group: any real row
    members = (choice.members + starts).clamp(max=last)
    flat = [tensor.unsqueeze(0).expand(num_groups, -1, -1) for tensor in (tokens, keys)]
    merged = merge_into_anchors(*flat, anchors, members, groups.anchor_valid.to(device), groups.member_valid.to(device))
    real = groups.real_anchors.to(device)
    width = tokens.shape[-1]
    values = tokens.index_copy(
        0, anchors.view(-1).index_select(0, real), merged.view(-1, width).index_select(0, real).to(tokens.dtype)
    )
    return keep, values


def onevision_v2v_tokens(
    model: nn.Module,
    pixel_values: torch.Tensor,
    image_sizes: torch.Tensor,
    v2v: V2VConfig,
    batch_num_images: torch.Tensor | None = None,
) -> AnyResTokens:
    """V2V over the view groups of every image of transformers' LLaVA-OneVision model (one tower pass, then the
    projector, transformers' packing, the selection and the gather): a token and a keep flag for every image
    placeholder, in input order. Arguments as for :func:`llava.hf_adapter.llava_onevision_image_features`."""
    check_method(v2v)
    clock = V2VClock()
    plan = OneVisionPlan.build(model, image_sizes, batch_num_images, v2v)
    score = clock.timed(received_attention_and_keys)
    views = llava_onevision_view_features(model, pixel_values, image_sizes, batch_num_images, score)
    projected = llava_next_projector(model)(views.features)
    tokens = torch.cat(llava_onevision_pack(model, projected.split(views.views), image_sizes))
    with clock.timing():
        maps = torch.cat([views.scores.unsqueeze(-1), views.keys], dim=-1).split(views.views)
        maps = torch.cat(llava_onevision_pack(model, maps, image_sizes))
        keep, values = select_group_tokens(tokens, maps[:, 0], maps[:, 1:], plan, v2v.method)
    return pack_views(
        values.unsqueeze(0), keep.unsqueeze(0), plan.groups, llava_next_image_newline(model), clock.seconds
    )


def onevision_v2v_counts(
    model: nn.Module, image_sizes: torch.Tensor, v2v: V2VConfig, batch_num_images: torch.Tensor | None = None
) -> list[tuple[int, int]]:
    """Per image, from the plan alone (no pixels): the tokens V2V keeps (newlines left out; exact) and the image's
    newline tokens (those kept are at most this: a row left without a token loses its newline), for accounting."""
    plan = OneVisionPlan.build(model, image_sizes, batch_num_images, v2v)
    kept = plan.groups.tokens_per_view()
    newlines = llava_onevision_newline_layout(model, image_sizes, batch_num_images)
    counts, first = [], 0
    for views, mask in zip(plan.views, newlines, strict=True):
        groups = 2 if views > 1 else 1
        counts.append((sum(kept[first : first + groups]), int(mask.sum())))
        first += groups
    return counts
