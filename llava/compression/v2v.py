"""Stage A of DUET-VLM: visual-to-visual (V2V) token merging inside the vision tower.

A merger turns the feature-layer hidden states of each image (CLS + patches) into ``k1 + k2`` tokens:
``k1`` dominant tokens (CLS and the patches the CLS query attends to most, raster order) followed by
``k2`` contextual tokens (anchors plus the mean of the patches that are most key-similar to them).
Three plug-ins share one interface and are chosen by ``V2VConfig.method``:

* ``duet``: contextual anchors are spread over the score ranking of a candidate pool (the top
  ``cluster_width * k2`` remaining patches); patches outside the pool are dropped.
* ``visionzip``: anchors are spread by position over all remaining patches and every remaining patch
  is merged into one of them.

Everything is batched over images: indices come from ``argsort``/``gather`` and groups are reduced
with ``scatter_add``, so there is no per-image Python loop. Selection uses a stable descending sort so
ties resolve to the lower patch index, identically for every batch size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from llava.compression.diverse_v2v import DivPruneSelector, VisPrunerSelector

if TYPE_CHECKING:
    from llava.compression.config import V2VConfig

logger = logging.getLogger(__name__)


@torch.no_grad()
def cls_attention_and_keys(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS-query attention to each patch (summed over heads) and head-averaged keys of one CLIP layer.

    ``hidden`` [N, T, D] is the layer's input. Only the CLS query row is projected, and the softmax over
    all T keys runs in fp32, so this equals row 0 of the layer's eager attention map at a fraction of
    its cost. Returns ``([N, T - 1], [N, T, head_dim])``; no autograd graph is built (scores only pick
    indices).
    """
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    num_images, num_tokens, _ = normed.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(normed[:, :1]).view(num_images, 1, heads, head_dim).transpose(1, 2)
    keys = attention.k_proj(normed).view(num_images, num_tokens, heads, head_dim).transpose(1, 2)
    logits = query.float() @ keys.float().transpose(-1, -2) * attention.scale  # [N, heads, 1, T]
    cls_attention = logits.softmax(dim=-1).sum(dim=1)[:, 0, 1:]
    return cls_attention, keys.float().mean(dim=1)


@runtime_checkable
class VisualTokenMerger(Protocol):
    """What the vision tower needs from a Stage A merger."""

    def num_output_tokens(self, num_tokens_in: int) -> int:
        """Tokens per image after merging, for ``num_tokens_in`` tokens (CLS included) per image."""
        ...

    def __call__(self, features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Merge ``features`` [N, T, D] (CLS at index 0) into [N, k1 + k2, D].

        ``cls_attention`` [N, T - 1] is the CLS query's attention to each patch (summed over heads);
        ``keys`` [N, T, d] are the same layer's keys averaged over heads (not normalised).
        """
        ...


def _gather_tokens(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[n, index[n, i]]`` for a [N, T, C] tensor and [N, K] token indices -> [N, K, C]."""
    return tensor.gather(1, index.unsqueeze(-1).expand(-1, -1, tensor.shape[-1]))


def merge_into_anchors(
    features: torch.Tensor,
    keys: torch.Tensor,
    anchor_idx: torch.Tensor,
    member_idx: torch.Tensor,
    anchor_valid: torch.Tensor | None = None,
    member_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contextual tokens: ``anchor_j + mean(members assigned to j)`` (anchor alone when it has none).

    Each member joins the anchor whose L2-normalised key has the highest cosine similarity with its own
    (first anchor on ties). ``anchor_idx`` [N, K2] and ``member_idx`` [N, M] index tokens of ``features``;
    for images with different numbers of anchors and members, ``anchor_valid``/``member_valid`` mark the
    real entries of the padded index rows (padding neither attracts nor joins). The sums are accumulated in
    fp32 so that bf16 towers do not lose precision over large groups.
    """
    anchors = _gather_tokens(features, anchor_idx)
    num_images, num_anchors, width = anchors.shape
    if member_idx.shape[1] == 0:
        return anchors
    # Normalised after the gather (row by row, so the same values): only the anchors' and members' keys.
    member_keys = F.normalize(_gather_tokens(keys, member_idx).float(), dim=-1)
    similarity = member_keys @ F.normalize(_gather_tokens(keys, anchor_idx).float(), dim=-1).transpose(1, 2)
    if anchor_valid is not None:
        similarity = similarity.masked_fill(~anchor_valid.unsqueeze(1), float("-inf"))
    assignment = similarity.argmax(dim=-1)  # [N, M]: which anchor each member joins
    members = _gather_tokens(features, member_idx).float()
    weights = (
        torch.ones_like(assignment, dtype=members.dtype) if member_valid is None else member_valid.to(members.dtype)
    )
    sums = members.new_zeros(num_images, num_anchors, width)
    sums.scatter_add_(1, assignment.unsqueeze(-1).expand(-1, -1, width), members * weights.unsqueeze(-1))
    counts = members.new_zeros(num_images, num_anchors)
    counts.scatter_add_(1, assignment, weights)
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    return anchors + means.to(anchors.dtype)


def split_anchors(count: int, wanted: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor slots (:func:`_evenly_spaced`) of ``0..count-1`` and the other slots, both ascending.

    Built with an argsort instead of boolean indexing, so no size is read back from the device.
    """
    anchors = _evenly_spaced(count, wanted, device)
    is_anchor = torch.zeros(count, dtype=torch.bool, device=device)
    is_anchor[anchors] = True
    others = torch.argsort(is_anchor.to(torch.int8), stable=True)[: count - anchors.numel()]
    return anchors, others


def _evenly_spaced(count: int, wanted: int, device: torch.device) -> torch.Tensor:
    """``wanted`` positions of ``0..count-1`` at ``step = max(1, count // wanted)`` (VisionZip's spacing)."""
    step = max(1, count // wanted)
    return torch.arange(0, count, step, device=device)[:wanted]


class _DominantContextualMerger:
    """Shared part of both methods: validation and the dominant (CLS + top-score patches) tokens."""

    method = ""

    def __init__(self, dominant: int, contextual: int, cluster_width: int = 4) -> None:
        if dominant < 1:
            raise ValueError(f"V2V dominant (k1) counts CLS and must be >= 1, got {dominant}")
        if contextual < 0:
            raise ValueError(f"V2V contextual (k2) must be >= 0, got {contextual}")
        if cluster_width < 1:
            raise ValueError(f"V2V cluster_width must be >= 1, got {cluster_width}")
        self.dominant = dominant
        self.contextual = contextual
        self.cluster_width = cluster_width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dominant={self.dominant}, contextual={self.contextual}, "
            f"cluster_width={self.cluster_width})"
        )

    def num_output_tokens(self, num_tokens_in: int) -> int:
        """``k1 + k2``; raises when the image has fewer tokens than that."""
        wanted = self.dominant + self.contextual
        if wanted > num_tokens_in:
            raise ValueError(
                f"{self.method} V2V keeps k1 + k2 = {self.dominant} + {self.contextual} = {wanted} tokens, "
                f"but the tower yields only {num_tokens_in} tokens per image (CLS included)"
            )
        return wanted

    def __call__(self, features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Dominant tokens (CLS first, raster order) followed by the method's contextual tokens."""
        num_images, num_tokens, _ = features.shape
        self.num_output_tokens(num_tokens)
        if cls_attention.shape != (num_images, num_tokens - 1):
            raise ValueError(
                f"cls_attention must be [N, T-1] = [{num_images}, {num_tokens - 1}], got {list(cls_attention.shape)}"
            )
        if keys.shape[:2] != (num_images, num_tokens):
            raise ValueError(f"keys must be [N, T, d] with N, T = {num_images}, {num_tokens}; got {list(keys.shape)}")
        # Patch indices by descending score; stable, so ties go to the lower index for every batch size.
        ranked_patches = torch.argsort(cls_attention, dim=1, descending=True, stable=True)
        top_patches = ranked_patches[:, : self.dominant - 1].sort(dim=1).values
        cls_index = torch.zeros(num_images, 1, dtype=torch.long, device=features.device)
        dominant_idx = torch.cat([cls_index, top_patches + 1], dim=1)
        dominant_tokens = _gather_tokens(features, dominant_idx)
        if self.contextual == 0:
            return dominant_tokens
        remaining_by_score = ranked_patches[:, self.dominant - 1 :] + 1  # token indices, best first
        contextual_tokens = self.contextual_tokens(features, keys, remaining_by_score)
        return torch.cat([dominant_tokens, contextual_tokens], dim=1)

    def contextual_tokens(
        self, features: torch.Tensor, keys: torch.Tensor, remaining_by_score: torch.Tensor
    ) -> torch.Tensor:
        """[N, k2, D] contextual tokens from the non-dominant tokens (token indices, best score first)."""
        raise NotImplementedError


class DuetMerger(_DominantContextualMerger):
    """DUET-VLM Stage A: anchors evenly spaced over the score ranking of a candidate pool.

    The pool is the top ``min(cluster_width * k2, remaining)`` remaining patches by CLS score; ``k2``
    anchors are taken at ranks ``0, step, 2 * step, ...`` (``step = max(1, pool // k2)``), every other
    pool member joins its most key-similar anchor, and patches outside the pool are dropped. Output
    contextual tokens follow anchor rank order.
    """

    method = "duet"

    def contextual_tokens(
        self, features: torch.Tensor, keys: torch.Tensor, remaining_by_score: torch.Tensor
    ) -> torch.Tensor:
        pool_size = min(self.cluster_width * self.contextual, remaining_by_score.shape[1])
        pool = remaining_by_score[:, :pool_size]
        anchor_ranks, member_ranks = split_anchors(pool_size, self.contextual, pool.device)
        return merge_into_anchors(features, keys, pool[:, anchor_ranks], pool[:, member_ranks])


class VisionZipMerger(_DominantContextualMerger):
    """VisionZip's contextual tokens: anchors evenly spaced by position over ALL remaining patches.

    Every remaining (non-dominant, non-anchor) patch is merged into its most key-similar anchor;
    contextual tokens follow anchor position order.
    """

    method = "visionzip"

    def contextual_tokens(
        self, features: torch.Tensor, keys: torch.Tensor, remaining_by_score: torch.Tensor
    ) -> torch.Tensor:
        remaining = remaining_by_score.sort(dim=1).values  # raster order, as VisionZip's masked_select
        count = remaining.shape[1]
        anchor_slots, member_slots = split_anchors(count, self.contextual, remaining.device)
        return merge_into_anchors(features, keys, remaining[:, anchor_slots], remaining[:, member_slots])


class RandomMerger(_DominantContextualMerger):
    """Baseline: CLS plus ``k1 - 1`` patches drawn uniformly at random (raster order), nothing merged.

    The same budget as a CLS-ranked merger with the ranking replaced by noise, so a table can show what
    the ranking is worth. Draws from torch's global generator on the features' device (seed it for
    repeatable runs); every image of a batch gets its own draw, with no host synchronisation.
    """

    method = "random"

    def __init__(self, dominant: int, contextual: int = 0, cluster_width: int = 4) -> None:
        if contextual != 0:
            raise ValueError(f"random V2V keeps k1 tokens and merges nothing: contextual must be 0, got {contextual}")
        super().__init__(dominant, contextual, cluster_width)

    def __call__(self, features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        random_scores = torch.rand(cls_attention.shape, device=cls_attention.device)
        return super().__call__(features, random_scores, keys)


MERGERS: dict[str, Callable[..., VisualTokenMerger]] = {
    DuetMerger.method: DuetMerger,
    VisionZipMerger.method: VisionZipMerger,
    RandomMerger.method: RandomMerger,
    DivPruneSelector.method: DivPruneSelector,
    VisPrunerSelector.method: VisPrunerSelector,
}


def build_merger(v2v_config: V2VConfig) -> VisualTokenMerger:
    """The merger named by ``v2v_config.method`` with its ``k1``/``k2``/``cluster_width``."""
    if getattr(v2v_config, "is_fraction", False):
        raise ValueError(
            "V2V budgets as fractions of each image's tokens are for Qwen2.5-VL; LLaVA's tower has a fixed count: "
            "give k1 and k2 as token counts"
        )
    factory = MERGERS.get(v2v_config.method)
    if factory is None:
        raise ValueError(f"unknown V2V method {v2v_config.method!r}; expected one of {sorted(MERGERS)}")
    merger = factory(
        dominant=v2v_config.dominant,
        contextual=v2v_config.contextual,
        cluster_width=getattr(v2v_config, "cluster_width", 4),
    )
    logger.debug("built V2V merger %r", merger)
    return merger
