"""DyMU's dynamic token merging (DToMe) inside the vision tower, batched over images.

In every encoder block, between the attention residual and the MLP, the tokens are split into A (even
positions, CLS first) and B (odd positions); each A token finds its most similar B token by the cosine
of the block's keys averaged over heads, and every A token whose best similarity exceeds the layer's
threshold merges into that B token (size-weighted mean; CLS never merges). Afterwards the surviving A
tokens come first, then the B tokens (DyMU's order). The next block's attention adds ``log(size)`` to the
key logits (proportional attention), so a merged token weighs as much as the tokens it stands for.

Images merge different numbers of tokens, so a batch keeps a fixed length: each row's live tokens are
a prefix and the emptied slots (size 0, hence ``log 0 = -inf`` in the bias) follow. ``owner`` maps every
original token (CLS at 0) to the slot that now holds it, which is DyMU's position map.

Threshold calibration (DyMU's offline step, :func:`merge_top_edges`) merges a fixed number of edges per
layer over the whole batch and records the similarity of the first edge it did not merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NO_MERGE = 1.0
"""A threshold no cosine similarity exceeds: the layer merges nothing."""


@dataclass
class MergeState:
    """A batch of images' tokens during DToMe; live tokens form a prefix of every row."""

    hidden: torch.Tensor  # [N, T, D]
    sizes: torch.Tensor  # [N, T] fp32: original tokens each slot stands for; 0 = empty slot
    owner: torch.Tensor  # [N, T0] long: slot holding each original token (CLS = original token 0)
    counts: torch.Tensor  # [N] long: live tokens per row

    @classmethod
    def start(cls, hidden: torch.Tensor) -> MergeState:
        """Every token its own slot."""
        num_images, num_tokens, _ = hidden.shape
        device = hidden.device
        return cls(
            hidden=hidden,
            sizes=torch.ones(num_images, num_tokens, device=device),
            owner=torch.arange(num_tokens, device=device).expand(num_images, num_tokens).clone(),
            counts=torch.full((num_images,), num_tokens, dtype=torch.long, device=device),
        )

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``[N, 1, 1, T]`` additive key bias: ``log(size)``, ``-inf`` on empty slots (proportional attention)."""
        return self.sizes.log().to(dtype)[:, None, None, :]

    def raster_order(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Live tokens sorted by the first original token each covers (CLS first, then patch raster order),
        empty slots last: ``(hidden [N, T, D], sizes [N, T], owner [N, T0])``, ``owner`` remapped to the new
        slots (so slot ``j`` is the token that first appears at original position ``j``'s rank)."""
        num_images, num_tokens = self.sizes.shape
        first = torch.full((num_images, num_tokens), self.owner.shape[1], dtype=torch.long, device=self.owner.device)
        originals = torch.arange(self.owner.shape[1], device=self.owner.device).expand_as(self.owner)
        first = first.scatter_reduce(1, self.owner, originals, reduce="amin")
        order = first.argsort(dim=1, stable=True)
        hidden = self.hidden.gather(1, order.unsqueeze(-1).expand_as(self.hidden))
        new_slot = torch.empty_like(order).scatter_(
            1, order, torch.arange(num_tokens, device=order.device).expand_as(order)
        )
        return hidden, self.sizes.gather(1, order), new_slot.gather(1, self.owner)


def head_mean_keys(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[N, T, heads * d]`` keys (a block's ``k_proj`` output) averaged over heads: ``[N, T, d]``."""
    num_images, num_tokens, width = keys.shape
    return keys.view(num_images, num_tokens, num_heads, width // num_heads).mean(dim=2)


def best_matches(keys: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every A slot (even positions) its best B slot (odd positions) by key cosine.

    Returns ``(similarity [N, T_A] fp32, match [N, T_A])``; CLS, empty A slots and rows with no live B
    slot get ``-inf`` (they never merge).
    """
    normed = F.normalize(keys.float(), dim=-1)
    similarity = normed[:, 0::2] @ normed[:, 1::2].transpose(1, 2)  # [N, T_A, T_B]
    device = keys.device
    a_slots = torch.arange(0, keys.shape[1], 2, device=device)
    b_slots = torch.arange(1, keys.shape[1], 2, device=device)
    live_b = b_slots.unsqueeze(0) < counts.unsqueeze(1)
    similarity = similarity.masked_fill(~live_b.unsqueeze(1), float("-inf"))
    best, match = similarity.max(dim=-1)
    live_a = (a_slots.unsqueeze(0) < counts.unsqueeze(1)) & (a_slots.unsqueeze(0) > 0)
    return best.masked_fill(~live_a, float("-inf")), match


def apply_merges(state: MergeState, merged: torch.Tensor, match: torch.Tensor) -> MergeState:
    """Merge every A slot flagged in ``merged`` ``[N, T_A]`` into its B slot ``match``; reorder to
    (surviving A, B, empty). Vectorised over the batch; no host synchronisation."""
    hidden, sizes = state.hidden, state.sizes
    num_images, num_tokens, width = hidden.shape
    device = hidden.device
    a_sizes, b_sizes = sizes[:, 0::2], sizes[:, 1::2]
    moving = a_sizes * merged  # size that leaves each A slot
    # Size-weighted sums in fp32: B_new = (s_b x_b + sum s_a x_a) / (s_b + sum s_a).
    b_sums = hidden[:, 1::2].float() * b_sizes.unsqueeze(-1)
    b_sums = b_sums.scatter_add(
        1, match.unsqueeze(-1).expand(-1, -1, width), hidden[:, 0::2].float() * moving.unsqueeze(-1)
    )
    new_b_sizes = b_sizes.scatter_add(1, match, moving)
    new_b = (b_sums / new_b_sizes.clamp(min=1e-6).unsqueeze(-1)).to(hidden.dtype)

    slots = torch.arange(num_tokens, device=device)
    live = slots.unsqueeze(0) < state.counts.unsqueeze(1)
    keep_a = live[:, 0::2] & ~merged
    live_b = live[:, 1::2]
    kept_a = keep_a.sum(dim=1, keepdim=True)
    new_counts = kept_a.squeeze(1) + live_b.sum(dim=1)
    # Destination of every old slot: kept A first, then live B, then the rest (merged A and empty slots).
    dest_a = torch.where(keep_a, keep_a.long().cumsum(1) - 1, 0)
    dest_b = torch.where(live_b, kept_a + live_b.long().cumsum(1) - 1, 0)
    dest = torch.zeros(num_images, num_tokens, dtype=torch.long, device=device)
    dest[:, 0::2] = dest_a
    dest[:, 1::2] = dest_b
    stays = torch.zeros_like(live)
    stays[:, 0::2] = keep_a
    stays[:, 1::2] = live_b
    leaving = ~stays
    dest = torch.where(stays, dest, new_counts.unsqueeze(1) + leaving.long().cumsum(1) - 1)

    merged_values = hidden.clone()
    merged_values[:, 1::2] = new_b
    new_sizes = sizes.clone()
    new_sizes[:, 1::2] = new_b_sizes
    new_sizes = new_sizes * stays
    out_hidden = torch.empty_like(hidden).scatter(1, dest.unsqueeze(-1).expand_as(hidden), merged_values)
    out_sizes = torch.empty_like(sizes).scatter(1, dest, new_sizes)
    # Where each old slot's content ends up: a merged A slot's goes to its B token's new slot.
    b_dest_of_match = dest_b.gather(1, match)
    final = dest.clone()
    final[:, 0::2] = torch.where(merged, b_dest_of_match, dest_a)
    return MergeState(out_hidden, out_sizes, final.gather(1, state.owner), new_counts)


def merge_above(state: MergeState, keys: torch.Tensor, threshold: float) -> MergeState:
    """DToMe at inference: every A token whose best similarity exceeds ``threshold`` merges."""
    best, match = best_matches(keys, state.counts)
    return apply_merges(state, best > threshold, match)


def merge_top_edges(state: MergeState, keys: torch.Tensor, per_image: int) -> tuple[MergeState, torch.Tensor]:
    """Calibration: merge the ``per_image * N`` most similar A->B edges of the whole batch.

    Returns the merged state and the similarity of the best edge left unmerged, floored at 0 (DyMU's
    threshold estimate for this layer and batch; 0 when every candidate merged), as a 0-d tensor.
    """
    best, match = best_matches(keys, state.counts)
    flat = best.flatten()
    wanted = min(per_image * best.shape[0], flat.numel())
    order = flat.argsort(descending=True)
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order[:wanted]] = True
    chosen &= torch.isfinite(flat)
    threshold = flat[order[wanted]].clamp(min=0.0) if wanted < flat.numel() else flat.new_zeros(())
    threshold = torch.where(torch.isfinite(threshold), threshold, 0.0)
    return apply_merges(state, chosen.view_as(best), match), threshold
