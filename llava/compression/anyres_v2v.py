"""DUET's V2V on LLaVA-NeXT's AnyRes views: the base view and every tile, each reduced on its own.

Per view, the patches scored are the ones that survive transformers' unpadding (every patch of the base view;
of a tile, those inside the image's aspect ratio), ``n`` of them. A fractional :class:`V2VConfig` budget is
applied to each view's ``n`` (:meth:`V2VConfig.budget`, so an image's budget is split over its views in
proportion to their surviving patches; a view with no surviving patch keeps nothing). Scores and keys are
LLaVA-1.5's: the CLS query's attention to each patch and the head-averaged keys at the feature layer
(:func:`llava.compression.v2v.cls_attention_and_keys`); there is no CLS among the tokens (the ``default``
select strategy drops it), so all ``k1`` dominant tokens are patches. Methods, as :mod:`llava.compression.v2v`:

* ``duet``: the top ``k1`` patches by score stay; ``k2`` anchors evenly spaced by rank over the next
  ``cluster_width * k2`` patches absorb their most key-similar pool members (anchor + mean of its members); the
  rest of the view is dropped.
* ``visionzip``: the same dominant patches; ``k2`` anchors evenly spaced by position over all remaining
  patches, every other remaining patch merged into one of them.
* ``random``: ``k1`` uniformly random surviving patches, nothing merged.

Survivors stay at their own grid positions, so unpadding and the newline tokens keep their meaning: the
anchors hold their merged CLIP features (merged before the projector, as DUET does), every view is projected,
and the tokens are gathered in transformers' packed order (:func:`llava.hf_adapter.llava_next_anyres_layout`).

Newline rule: every row of the stitched, unpadded tile grid ends in one ``image_newline`` token; that token
stays iff at least one token of its row survives V2V, and is dropped with the row when none does. (When an
image has a base view only, transformers closes it with one newline token, which then stays, since the base
view keeps at least one token.) The base view has no newline tokens.

Everything on the device is batched over all views of all images (one sort, one merge, one projection, one
gather); the per-view budgets, anchor slots and the layout are a host-side plan built from the image sizes
alone, so nothing is read back from the device.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from llava.compression.config import V2VConfig
from llava.compression.v2v import cls_attention_and_keys, merge_into_anchors
from llava.hf_adapter import (
    llava_next_anyres_layout,
    llava_next_image_newline,
    llava_next_projector,
    llava_next_view_features,
    llava_next_views_per_image,
)
from llava.utils.profiling import PROFILE_REGIONS

ANYRES_V2V_METHODS = ("duet", "visionzip", "random")
ScoreFunction = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""V2V methods this module runs."""


class AnyResTokens(NamedTuple):
    """The AnyRes tokens of a batch of images after V2V, one per image placeholder, in input order."""

    tokens: torch.Tensor  # [placeholders, hidden]: values of dropped placeholders are meaningless
    keep: torch.Tensor  # [placeholders] bool: which placeholders keep a token
    seconds: float  # host seconds spent scoring and selecting


class AnyResPlan(NamedTuple):
    """Host-side plan of V2V over the views of a batch of images (from the image sizes and the budget alone).
    LLaVA-OneVision's plan (:mod:`llava.compression.onevision_v2v`) reuses it with "views" the view groups of its
    packed tokens (an image's base view, its packed tile grid) and "patches" the longest group."""

    views: list[int]  # views of each image
    patches: int  # patches per view
    layout: torch.Tensor  # [placeholders]: flat row into [views * patches] features, -1 for a newline
    row: torch.Tensor  # [placeholders]: row of the tile grid (newlines: the row they close); -1 for base tokens
    rows: int  # rows over all images
    surviving: torch.Tensor  # [views, patches] bool: patches that survive unpadding
    dominant: torch.Tensor  # [views] k1
    remaining_slots: torch.Tensor  # [views, R] rank slots of the non-dominant survivors (padded with 0)
    remaining_valid: torch.Tensor  # [views, R]
    anchor_slots: torch.Tensor  # [views, K] slots of the anchors (duet: rank slots; visionzip: remaining slots)
    anchor_valid: torch.Tensor  # [views, K]
    member_slots: torch.Tensor  # [views, M] slots of the pool's other members, as anchor_slots
    member_valid: torch.Tensor  # [views, M]
    real_anchors: torch.Tensor  # flat indices of the valid entries of [views, K]

    @classmethod
    def build(cls, model: nn.Module, image_sizes: torch.Tensor, v2v: V2VConfig) -> AnyResPlan:
        """The plan for ``image_sizes`` (``[images, 2]``) of transformers' LLaVA-NeXT model."""
        vision = model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        views = llava_next_views_per_image(model, image_sizes)
        layouts, rows, first_row, first_view = [], [], 0, 0
        for layout, count in zip(llava_next_anyres_layout(model, image_sizes), views, strict=True):
            flat = layout.numpy()
            newline = flat < 0
            row = np.cumsum(newline) - newline + first_row  # newlines before a token; a newline closes its row
            if count > 1:
                row[:patches] = -1  # the base view has no rows
            layouts.append(np.where(newline, -1, flat + first_view * patches))
            rows.append(row)
            first_row += int(newline.sum())
            first_view += count
        layout = np.concatenate(layouts) if layouts else np.zeros(0, dtype=np.int64)
        row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return cls.from_layout(views, patches, layout, row, first_row, first_view, v2v)

    @classmethod
    def from_layout(
        cls,
        views: list[int],
        patches: int,
        layout: np.ndarray,
        row: np.ndarray,
        rows: int,
        num_views: int,
        v2v: V2VConfig,
    ) -> AnyResPlan:
        """The plan for a packed ``layout`` (flat rows into ``[num_views * patches]``, -1 for a newline) and the
        ``row`` of each placeholder (-1: in no row): a view's surviving patches are the rows the layout reads."""
        surviving = np.zeros(num_views * patches, dtype=bool)
        surviving[layout[layout >= 0]] = True
        counts = surviving.reshape(num_views, patches).sum(axis=1)
        dominants, remaining, anchors, members = zip(
            *(_view_slots(count, v2v) for count in counts.tolist()), strict=True
        )
        remaining_slots, remaining_valid = _padded(remaining)
        anchor_slots, anchor_valid = _padded(anchors)
        member_slots, member_valid = _padded(members)
        return cls(
            views=views,
            patches=patches,
            layout=torch.from_numpy(layout),
            row=torch.from_numpy(row),
            rows=rows,
            surviving=torch.from_numpy(surviving.reshape(num_views, patches)),
            dominant=torch.tensor(dominants, dtype=torch.long),
            remaining_slots=remaining_slots,
            remaining_valid=remaining_valid,
            anchor_slots=anchor_slots,
            anchor_valid=anchor_valid,
            member_slots=member_slots,
            member_valid=member_valid,
            real_anchors=torch.from_numpy(np.flatnonzero(anchor_valid.numpy().reshape(-1))),
        )

    def tokens_per_view(self) -> list[int]:
        """Tokens each view keeps (``k1 + k2`` of its surviving patches), in view order."""
        contextual = self.anchor_valid.sum(dim=1)
        return (self.dominant + contextual).tolist()


@functools.lru_cache(maxsize=1024)
def _view_slots(count: int, v2v: V2VConfig) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """A view of ``count`` surviving patches: ``k1``, the rank slots of the other patches, and the slots of the
    anchors and of the pool's other members (``duet``: rank slots; ``visionzip``: slots into the remaining
    patches sorted by position). Cached (views repeat their counts); callers must not write into the arrays."""
    dominant, contextual = v2v.budget(count) if count else (0, 0)
    dominant = min(dominant, count)
    rest = count - dominant
    if v2v.method == "visionzip":
        pool, slot_base = (rest if contextual else 0), 0
    else:
        pool, slot_base = (min(v2v.cluster_width * contextual, rest) if contextual else 0), dominant
    step = max(1, pool // contextual) if contextual else 1
    anchor_slots = np.arange(0, pool, step)[:contextual]
    members = slot_base + np.setdiff1d(np.arange(pool), anchor_slots)
    return dominant, dominant + np.arange(rest), slot_base + anchor_slots, members


def _padded(rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged index rows as a ``[len(rows), longest]`` long tensor padded with 0, and the mask of real entries."""
    width = max((len(row) for row in rows), default=0)
    slots = np.zeros((len(rows), width), dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=bool)
    for index, row in enumerate(rows):
        slots[index, : len(row)], valid[index, : len(row)] = row, True
    return torch.from_numpy(slots), torch.from_numpy(valid)


class ViewChoice(NamedTuple):
    """Which tokens of each view stay and, when any view has anchors, the anchors and the pool's other members."""

    keep: torch.Tensor  # [views, patches] bool: the dominant tokens and the anchors
    anchors: torch.Tensor | None  # [views, K] patch index of each anchor slot (padding: any patch of the view)
    members: torch.Tensor | None  # [views, M] patch index of each member slot (padding, as anchors)


def choose_view_tokens(scores: torch.Tensor, plan: AnyResPlan, method: str, device: torch.device) -> ViewChoice:
    """Per view, the dominant tokens (top ``k1`` by score, stable: ties go low; ``random``: random scores) and the
    method's anchors and members (slots from ``plan``); see the module docstring. ``scores`` ``[views, patches]``
    (ignored by ``random``); patches outside ``plan.surviving`` rank last and are never chosen."""
    num_views, patches = plan.surviving.shape
    surviving = plan.surviving.to(device, non_blocking=True)
    if method == "random":
        scores = torch.rand(num_views, patches, device=device)
    # Unpadded-away patches rank last (real scores are finite, never -inf); stable: ties go low.
    ranking = scores.float().masked_fill(~surviving, float("-inf"))
    ranked = ranking.argsort(dim=1, descending=True, stable=True)  # patch index by rank
    rank_slots = torch.arange(patches, device=device)
    dominant = rank_slots < plan.dominant.to(device).unsqueeze(1)
    keep = torch.zeros_like(dominant).scatter(1, ranked, dominant)
    if plan.real_anchors.numel() == 0:
        return ViewChoice(keep, None, None)
    if method == "visionzip":
        remaining = ranked.gather(1, plan.remaining_slots.to(device))
        remaining = remaining.masked_fill(~plan.remaining_valid.to(device), patches).sort(dim=1).values
        order = remaining.clamp(max=patches - 1)  # raster order of the remaining patches; padding past the end
    else:
        order = ranked
    anchors = order.gather(1, plan.anchor_slots.to(device))
    members = order.gather(1, plan.member_slots.to(device))
    # Padded anchor entries may repeat a real patch: add flags (never overwrite) so they cannot clear one.
    flags = torch.zeros(num_views, patches, dtype=torch.long, device=device)
    keep = keep | flags.scatter_add(1, anchors, plan.anchor_valid.to(device).long()).bool()
    return ViewChoice(keep, anchors, members)


def select_view_tokens(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, plan: AnyResPlan, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per view, which patches stay (``[views, patches]`` bool) and the features with each anchor holding its
    merged value (``[views, patches, D]``, the other rows unchanged); see the module docstring. ``scores``:
    the CLS attention ``[views, patches]`` (ignored by ``random``); ``keys`` ``[views, patches, d]``."""
    device = features.device
    num_views, patches = plan.surviving.shape
    choice = choose_view_tokens(scores, plan, method, device)
    if choice.anchors is None:
        return choice.keep, features
    anchor_valid = plan.anchor_valid.to(device)
    merged = merge_into_anchors(
        features, keys, choice.anchors, choice.members, anchor_valid, plan.member_valid.to(device)
    )
    real = plan.real_anchors.to(device)
    first_rows = torch.arange(num_views, device=device).unsqueeze(1) * patches
    flat_anchor = (choice.anchors + first_rows).view(-1).index_select(0, real)
    width = features.shape[-1]
    values = features.reshape(-1, width).index_copy(
        0, flat_anchor, merged.reshape(-1, width).index_select(0, real).to(features.dtype)
    )
    return choice.keep, values.view(num_views, patches, width)


def check_method(v2v: V2VConfig) -> None:
    """Refuse a V2V method the AnyRes selections do not run."""
    if v2v.method not in ANYRES_V2V_METHODS:
        raise ValueError(f"AnyRes V2V methods: {', '.join(ANYRES_V2V_METHODS)}; got {v2v.method!r}")


class V2VClock:
    """Host seconds V2V's scoring and selection take, each timed under the profiler's ``v2v`` region."""

    def __init__(self) -> None:
        self.seconds = 0.0

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """Time the block (added to :attr:`seconds`) inside the ``v2v`` profiler region."""
        began = time.perf_counter()
        with record_function(PROFILE_REGIONS["v2v"]):
            yield
        self.seconds += time.perf_counter() - began

    def timed(self, score: ScoreFunction) -> ScoreFunction:
        """``score`` with its calls timed (the tower calls it on the feature layer)."""

        def timed_score(layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with self.timing():
                return score(layer, hidden)

        return timed_score


def anyres_v2v_tokens(
    model: nn.Module, pixel_values: torch.Tensor, image_sizes: torch.Tensor, v2v: V2VConfig
) -> AnyResTokens:
    """V2V over every view of every image of transformers' LLaVA-NeXT model in one tower pass, then
    the projector and transformers' AnyRes packing order: a token and a keep flag for every image placeholder."""
    check_method(v2v)
    clock = V2VClock()
    plan = AnyResPlan.build(model, image_sizes, v2v)
    views = llava_next_view_features(model, pixel_values, image_sizes, clock.timed(cls_attention_and_keys))
    with clock.timing():
        keep, features = select_view_tokens(views.features, views.cls_attention, views.keys, plan, v2v.method)
    projected = llava_next_projector(model)(features)
    return pack_views(projected, keep, plan, llava_next_image_newline(model), clock.seconds)


def pack_views(
    projected: torch.Tensor, keep: torch.Tensor, plan: AnyResPlan, newline: torch.Tensor, seconds: float
) -> AnyResTokens:
    """The projected views ``[views, patches, hidden]`` in transformers' packed order, newline tokens where the
    layout has them, and the keep flags (a patch's own flag; a newline's by the row rule)."""
    device = projected.device
    layout = plan.layout.to(device, non_blocking=True)
    is_newline = layout < 0
    source = layout.clamp(min=0)
    hidden = projected.shape[-1]
    tokens = projected.reshape(-1, hidden).index_select(0, source)
    tokens = torch.where(is_newline.unsqueeze(-1), newline.to(tokens.dtype), tokens)
    token_keep = keep.reshape(-1).index_select(0, source) & ~is_newline
    row = plan.row.to(device, non_blocking=True)
    in_row = row >= 0
    survivors = torch.zeros(plan.rows + 1, dtype=torch.long, device=device)
    survivors = survivors.index_add(0, torch.where(in_row, row, plan.rows), token_keep.long())
    row_alive = survivors.index_select(0, torch.where(in_row, row, plan.rows)) > 0
    return AnyResTokens(tokens, torch.where(is_newline, row_alive, token_keep), seconds)
