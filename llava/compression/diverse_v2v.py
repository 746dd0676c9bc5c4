"""Diversity-based Stage A (V2V) selectors: DivPrune and VisPruner, written from their papers.

Both keep ``k`` tokens per image (``V2VConfig.dominant``, CLS included; ``contextual`` must be 0, as for the
``random`` baseline) and merge nothing: the output is CLS followed by ``k - 1`` of the image's patches in
ascending patch (raster) order. They plug into the :class:`~llava.compression.v2v.VisualTokenMerger` interface
and are registered in :data:`~llava.compression.v2v.MERGERS` as ``"divprune"`` and ``"vispruner"``.

Convention shared with the repo's other V2V plug-ins: CLS is always kept and is not a candidate, so the rules
below run over the ``P = T - 1`` patches with a patch budget of ``k - 1``. Similarities are cosine similarities
of the feature-layer outputs (the tokens the projector receives), computed in fp32 whatever the tower's dtype.

Everything is batched over images: the greedy loops run over the budget (DivPrune) or over removal rounds
(VisPruner), whose lengths depend only on ``P`` and ``k``; every step is vectorised over the batch, and no value
is read back to the host. The selection runs under ``torch.no_grad()``; the kept tokens are gathered from
``features`` with autograd on, so training backpropagates through them into the tower.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = ["DivPruneSelector", "VisPrunerSelector", "cosine_similarity_matrix"]


def cosine_similarity_matrix(patches: torch.Tensor) -> torch.Tensor:
    """``[N, P, P]`` fp32 cosine similarities between the ``[N, P, D]`` tokens of each image (a zero vector has
    similarity 0 with everything)."""
    normed = F.normalize(patches.float(), dim=-1)
    return normed @ normed.transpose(1, 2)


class _DiverseSelector:
    """Shared part: validation, the budget, and CLS + selected patches gathered in raster order."""

    method = ""

    def __init__(self, dominant: int, contextual: int = 0, cluster_width: int = 4) -> None:
        if dominant < 1:
            raise ValueError(f"{self.method} V2V dominant (k1) counts CLS and must be >= 1, got {dominant}")
        if contextual != 0:
            raise ValueError(
                f"{self.method} V2V keeps k1 selected tokens and merges nothing: contextual must be 0, got {contextual}"
            )
        self.dominant = dominant
        self.contextual = 0
        self.cluster_width = cluster_width  # unused: accepted because build_merger passes it to every method

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dominant={self.dominant})"

    def num_output_tokens(self, num_tokens_in: int) -> int:
        """``k1`` (CLS included); raises when the image has fewer tokens than that."""
        if self.dominant > num_tokens_in:
            raise ValueError(
                f"{self.method} V2V keeps k1 = {self.dominant} tokens (CLS included), but the tower yields only "
                f"{num_tokens_in} tokens per image (CLS included)"
            )
        return self.dominant

    def token_indices(self, features: torch.Tensor, cls_attention: torch.Tensor) -> torch.Tensor:
        """``[N, k1]`` token indices into ``features`` [N, T, D]: 0 (CLS) first, then the chosen patches ascending."""
        num_images, num_tokens, _ = features.shape
        self.num_output_tokens(num_tokens)
        if cls_attention.shape != (num_images, num_tokens - 1):
            raise ValueError(
                f"cls_attention must be [N, T-1] = [{num_images}, {num_tokens - 1}], got {list(cls_attention.shape)}"
            )
        with torch.no_grad():
            patches = self.select_patches(features[:, 1:].detach(), cls_attention.detach(), self.dominant - 1)
            cls_index = torch.zeros(num_images, 1, dtype=torch.long, device=features.device)
            return torch.cat([cls_index, patches.sort(dim=1).values + 1], dim=1)

    def __call__(self, features: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``[N, k1, D]``: CLS and the selected patches of ``features`` [N, T, D], raster order (``keys`` unused)."""
        num_images, num_tokens, _ = features.shape
        if keys.shape[:2] != (num_images, num_tokens):
            raise ValueError(f"keys must be [N, T, d] with N, T = {num_images}, {num_tokens}; got {list(keys.shape)}")
        index = self.token_indices(features, cls_attention)
        return features.gather(1, index.unsqueeze(-1).expand(-1, -1, features.shape[-1]))

    def select_patches(self, patches: torch.Tensor, cls_attention: torch.Tensor, budget: int) -> torch.Tensor:
        """``[N, budget]`` distinct patch indices (0-based, any order) from ``patches`` [N, P, D]."""
        raise NotImplementedError


class DivPruneSelector(_DiverseSelector):
    """DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
    CVPR 2025): keep the patches that (greedily) maximise the minimum pairwise distance (Max-Min Diversity).

    Rule, over the patches with ``d(i, j) = 1 - cos(x_i, x_j)`` (cosine of the feature-layer outputs):

    1. First pick: the patch whose minimum distance to all *other* patches is largest,
       ``argmax_i min_{j != i} d(i, j)`` (the paper's initialisation, as we recall it: its greedy MMDP solver
       starts from the element farthest from its nearest neighbour rather than from a fixed or random one).
    2. Then, ``budget - 1`` times: the unselected patch whose minimum distance to the selected set is largest,
       ``argmax_{i not in S} min_{j in S} d(i, j)`` (farthest-point greedy); a running ``[N, P]`` minimum is
       updated with the new pick's row of distances.

    Ties go to the lower patch index (``argmax`` returns the first maximum). The CLS query's attention is not
    used. Differences from the paper: it prunes the *projected* tokens at the LLM input (no CLS in LLaVA-1.5);
    here the selection runs in the vision tower on the feature-layer outputs, before the projector, and CLS is
    kept outside the selection (the repo's V2V convention), so the budget ``k`` buys CLS + ``k - 1`` patches.
    """

    method = "divprune"

    def select_patches(self, patches: torch.Tensor, cls_attention: torch.Tensor, budget: int) -> torch.Tensor:
        num_images, num_patches, _ = patches.shape
        picks = torch.empty(num_images, budget, dtype=torch.long, device=patches.device)
        if budget == 0:
            return picks
        distance = 1.0 - cosine_similarity_matrix(patches)
        # A patch is never its own neighbour: +inf on the diagonal leaves every row minimum over the others.
        distance.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        min_distance = distance.amin(dim=2)  # step 1: distance of each patch to its nearest other patch
        chosen = torch.zeros(num_images, num_patches, dtype=torch.bool, device=patches.device)
        for step in range(budget):
            pick = min_distance.argmax(dim=1)  # first maximum: ties to the lower index
            picks[:, step] = pick
            chosen.scatter_(1, pick.unsqueeze(1), True)
            to_pick = distance.gather(1, pick.view(num_images, 1, 1).expand(-1, 1, num_patches)).squeeze(1)
            min_distance = to_pick if step == 0 else torch.minimum(min_distance, to_pick)
            min_distance = min_distance.masked_fill(chosen, float("-inf"))
        return picks


class VisPrunerSelector(_DiverseSelector):
    """VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
    Pruning in VLMs", ICCV 2025): important patches by [CLS] attention, then diverse patches by removing
    duplicates from the rest.

    Rule, for a patch budget ``B = k - 1`` (CLS kept besides):

    1. Important: the ``floor(B * important_share)`` patches with the highest CLS attention (the vision
       encoder's CLS-to-patch attention at the feature layer; the tower sums it over heads, which ranks like
       the paper's head mean). ``important_share`` is 0.5 (for even ``k``: CLS + ``k/2 - 1`` important patches
       and ``k/2`` diverse ones).
    2. Diverse: the other patches form a list ``R`` in descending CLS-attention order. While ``|R|`` exceeds
       the diverse budget ``B - important``: split ``R`` alternately into ``A = R[0::2]`` and ``B' = R[1::2]``,
       score each ``a`` in ``A`` by ``max_{b in B'} cos(a, b)``, and remove from ``R`` the
       ``r = min(drop_per_round, |R| - target, |A|)`` members of ``A`` with the highest scores (most
       duplicated; on equal scores the later one in ``R`` goes), keeping the order of the rest.
       ``drop_per_round`` is 8.
    3. Keep important + remaining diverse patches, output in raster order after CLS.

    Ambiguities and how they are resolved here: the important/diverse split is not a config field; we use the
    fixed share 0.5 (our reading of the paper's default; ``important_share`` can be passed to the constructor).
    The duplicate removal is the bipartite (ToMe-style) matching with a bounded number of removals per round, as
    we recall the paper's description; the order of ``R`` (CLS-attention rank) decides the ``A``/``B'`` split
    and ``R`` keeps that order between rounds. Diverse candidates are compared only with each other, not with
    the important patches. Similarities use the feature-layer outputs (the tokens the projector receives).
    """

    method = "vispruner"

    def __init__(
        self,
        dominant: int,
        contextual: int = 0,
        cluster_width: int = 4,
        important_share: float = 0.5,
        drop_per_round: int = 8,
    ) -> None:
        super().__init__(dominant, contextual, cluster_width)
        if not 0.0 <= important_share <= 1.0:
            raise ValueError(f"vispruner important_share must lie in [0, 1], got {important_share}")
        if drop_per_round < 1:
            raise ValueError(f"vispruner drop_per_round must be >= 1, got {drop_per_round}")
        self.important_share = important_share
        self.drop_per_round = drop_per_round

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dominant={self.dominant}, important_share={self.important_share}, "
            f"drop_per_round={self.drop_per_round})"
        )

    def split(self, budget: int) -> tuple[int, int]:
        """``(important, diverse)`` patch counts for a patch budget (CLS not included)."""
        important = int(budget * self.important_share)
        return important, budget - important

    def select_patches(self, patches: torch.Tensor, cls_attention: torch.Tensor, budget: int) -> torch.Tensor:
        num_images = patches.shape[0]
        important_count, target = self.split(budget)
        # Stable descending sort: ties in attention rank the lower patch index first, for every batch size.
        ranked = torch.argsort(cls_attention, dim=1, descending=True, stable=True)
        important, remaining = ranked[:, :important_count], ranked[:, important_count:]
        if target == 0:
            return important
        num_patches = patches.shape[1]
        # Flat [N, P * P] view: entry (i, j) of image n is column i * P + j, so one gather per round reads the
        # |A| x |B'| block of each image (a flat gather is cheaper than 3-tensor advanced indexing, and needs no
        # [N, |A|, P] intermediate).
        similarity = cosine_similarity_matrix(patches).reshape(num_images, num_patches * num_patches)
        while remaining.shape[1] > target:
            count = remaining.shape[1]
            set_a, set_b = remaining[:, 0::2], remaining[:, 1::2]
            size_a = set_a.shape[1]
            drop = min(self.drop_per_round, count - target, size_a)
            block = (set_a[:, :, None] * num_patches + set_b[:, None, :]).reshape(num_images, -1)
            duplicate_score = similarity.gather(1, block).view(num_images, size_a, -1).amax(dim=2)
            # Ascending and stable: on equal scores the earlier member of A sorts first and survives.
            dropped_slots = torch.argsort(duplicate_score, dim=1, stable=True)[:, size_a - drop :]
            dropped = torch.zeros(num_images, count, dtype=torch.int8, device=patches.device)
            dropped.scatter_(1, 2 * dropped_slots, 1)  # slot s of A is position 2s of R
            # Kept positions first, in their order in R (a stable sort: no host sync, unlike a boolean mask).
            survivors = torch.argsort(dropped, dim=1, stable=True)[:, : count - drop]
            remaining = remaining.gather(1, survivors)
        return torch.cat([important, remaining], dim=1)
