"""Splice visual tokens into the text embeddings with one vectorised scatter (no per-sample loop)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llava.constants import IGNORE_INDEX


@dataclass
class SplicedInputs:
    """The LLM's input sequence after every image or video slot was replaced by its visual tokens."""

    inputs_embeds: torch.Tensor  # [B, L', D]
    attention_mask: torch.Tensor  # [B, L'] long, 1 = real token
    position_ids: torch.Tensor  # [B, L'] RoPE positions (0 at each sample's first real token)
    visual_mask: torch.Tensor  # [B, L'] bool, True on visual tokens
    labels: torch.Tensor | None  # [B, L'] with IGNORE_INDEX on visual tokens and padding
    token_ids: torch.Tensor  # [B, L'] text token ids, -1 on visual tokens and added padding
    v2v_time_s: float = 0.0  # host seconds spent on V2V scoring and merging
    group_starts: torch.Tensor | None = None  # [B, L'] bool, VTU only: first position of each token's group
    num_groups: int | None = None  # VTU only: groups in the row that has most


@dataclass(frozen=True)
class VisualSegments:
    """The visual tokens to splice into a batch: every segment's (image's or video's), in slot order.

    ``embeds`` ``[sum(counts), D]``: the segments' tokens concatenated in the row-major order of their slots
    (see :func:`order_visual_segments`); ``counts`` ``[num_segments]``: tokens per segment (may differ per
    segment). ``num_slots`` and ``new_length`` (the spliced length): when the caller knows them on the host;
    then nothing is read back from the device (no synchronisation on a GPU) and the counts are trusted.
    Otherwise they are read and checked.
    """

    embeds: torch.Tensor
    counts: torch.Tensor
    num_slots: int | None = None
    new_length: int | None = None


def detect_left_padding(attention_mask: torch.Tensor) -> bool:
    """True when the batch is left-padded (all rows end with a real token, some start with padding)."""
    return bool(attention_mask[:, -1].all()) and not bool(attention_mask[:, 0].all())


def matches_any(values: torch.Tensor, ids: int | Sequence[int]) -> torch.Tensor:
    """Bool mask of the entries of ``values`` equal to any of ``ids`` (host integers).

    Compares against each id as a kernel argument, so no id tensor is copied from the host to the device
    (``torch.isin`` with ``torch.tensor(ids, device=...)`` would be a blocking copy on a GPU).
    """
    id_list = [ids] if isinstance(ids, int) else list(ids)
    if not id_list:
        return torch.zeros_like(values, dtype=torch.bool)
    matches = values == id_list[0]
    for other in id_list[1:]:
        matches |= values == other
    return matches


def slot_positions(is_slot: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the ``num_slots`` True entries of ``is_slot``, in row-major order.

    Like ``nonzero`` but with the count given, so nothing is read back from the device.
    """
    length = is_slot.shape[1]
    flat = torch.argsort((~is_slot).reshape(-1).to(torch.int8), stable=True)[:num_slots]
    return flat // length, flat % length


def splice_visual_tokens(
    input_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    segments: VisualSegments,
    slot_token_ids: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    left_padding: bool | None = None,
) -> SplicedInputs:
    """Replace each visual slot (an image or a video sentinel) by that segment's visual tokens.

    Args:
        input_ids: ``[B, L]`` ids with one sentinel per image or video.
        text_embeds: ``[B, L, D]`` embeddings of ``input_ids`` (sentinel rows are ignored).
        segments: the visual tokens of every segment in slot order, their counts and what the caller knows
            of the sizes on the host (:class:`VisualSegments`).
        slot_token_ids: the sentinel id(s) that mark a slot (image and video ids).
        left_padding: align the expanded rows to the right (generation). ``None`` infers it from
            ``attention_mask``.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    is_slot = matches_any(input_ids, slot_token_ids)
    visual_embeds, num_slots, new_length = segments.embeds, segments.num_slots, segments.new_length
    counts = segments.counts.to(device=device, dtype=torch.long)
    total_visual = visual_embeds.shape[0]
    if num_slots is None:
        num_slots = int(is_slot.sum())
        if num_slots == counts.numel() and int(counts.sum()) != total_visual:
            raise ValueError(f"segment counts sum to {int(counts.sum())} but the segments hold {total_visual} tokens")
    if num_slots != counts.numel():
        per_sample = is_slot.sum(dim=1).tolist()
        raise ValueError(
            f"input_ids hold {num_slots} visual slots (per sample: {per_sample}) but "
            f"{counts.numel()} images/videos were given"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if left_padding is None:
        left_padding = detect_left_padding(attention_mask)

    tokens_per_slot = torch.ones_like(input_ids).masked_scatter(is_slot, counts)
    new_lengths = tokens_per_slot.sum(dim=1)
    if new_length is None:
        new_length = int(new_lengths.max()) if batch else 0
    start = tokens_per_slot.cumsum(dim=1) - tokens_per_slot
    if left_padding:
        start = start + (new_length - new_lengths).unsqueeze(1)

    # Every source position gets a distinct destination column; slots go to spare columns past the end,
    # which are cut off, so the index puts below never see duplicate indices and never read back sizes.
    columns = torch.arange(length, device=device)
    text_dest = torch.where(is_slot, new_length + columns, start)
    rows = torch.arange(batch, device=device).unsqueeze(1).expand(batch, length)
    width = new_length + length

    slot_rows, slot_cols = slot_positions(is_slot, num_slots)
    visual_rows = slot_rows.repeat_interleave(counts, output_size=total_visual)
    first_token_of_segment = counts.cumsum(0) - counts
    offset_in_segment = torch.arange(total_visual, device=device) - first_token_of_segment.repeat_interleave(
        counts, output_size=total_visual
    )
    visual_dest = start[slot_rows, slot_cols].repeat_interleave(counts, output_size=total_visual) + offset_in_segment

    def spread(values: torch.Tensor, fill: int | float, visual_value: torch.Tensor | int | None) -> torch.Tensor:
        spliced = values.new_full((batch, width, *values.shape[2:]), fill)
        spliced = spliced.index_put((rows, text_dest), values)
        if visual_value is not None:
            # A constant is filled on the device (a tensor from a host scalar would be a blocking copy).
            if not isinstance(visual_value, torch.Tensor):
                visual_value = spliced.new_full((), visual_value)
            spliced = spliced.index_put((visual_rows, visual_dest), visual_value.to(spliced.dtype))
        return spliced[:, :new_length]

    embeds = spread(text_embeds, 0, visual_embeds.to(text_embeds.dtype))
    new_mask = spread(attention_mask, 0, 1)
    visual_mask = spread(torch.zeros_like(is_slot), False, True)
    new_labels = None if labels is None else spread(labels, IGNORE_INDEX, None)
    token_ids = spread(input_ids, -1, None)

    position_ids = (new_mask.cumsum(dim=1) - 1).clamp(min=0)
    return SplicedInputs(embeds, new_mask, position_ids, visual_mask, new_labels, token_ids)


def order_visual_segments(
    slot_is_video: torch.Tensor,
    image_embeds: torch.Tensor,
    image_counts: torch.Tensor,
    video_embeds: torch.Tensor,
    video_counts: torch.Tensor,
    num_videos: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleave image and video segments into slot order, with one gather (no per-segment loop).

    ``slot_is_video`` ``[num_slots]`` tells, in row-major slot order, which slots are videos; the
    k-th image slot takes the k-th image of ``image_embeds`` (``[sum(image_counts), D]``, images
    concatenated), the j-th video slot the j-th video. Returns ``(embeds, counts)`` in slot order,
    ready for :func:`splice_visual_tokens`. ``num_videos`` (the number of video slots, when known on the
    host) avoids reading it back from the device.
    """
    if num_videos is None:
        num_videos = int(slot_is_video.sum())
    if num_videos != video_counts.numel() or slot_is_video.numel() - num_videos != image_counts.numel():
        raise ValueError(
            f"input_ids hold {slot_is_video.numel() - num_videos} image and {num_videos} video slots but "
            f"{image_counts.numel()} images and {video_counts.numel()} videos were given"
        )
    # A modality without slots may still carry zero-row "idle" tokens that must stay in the autograd
    # graph (see DuetLlavaForCausalLM._idle_visual_tokens): concatenate them instead of dropping them.
    if num_videos == 0:
        return _with_idle_rows(image_embeds, video_embeds), image_counts
    if num_videos == slot_is_video.numel():
        return _with_idle_rows(video_embeds, image_embeds), video_counts
    is_video = slot_is_video.to(torch.bool)
    image_rank = (~is_video).long().cumsum(0) - 1
    video_rank = is_video.long().cumsum(0) - 1
    image_starts = image_counts.cumsum(0) - image_counts
    video_starts = video_counts.cumsum(0) - video_counts + image_embeds.shape[0]
    counts = torch.where(is_video, video_counts[video_rank.clamp(min=0)], image_counts[image_rank.clamp(min=0)])
    source_starts = torch.where(is_video, video_starts[video_rank.clamp(min=0)], image_starts[image_rank.clamp(min=0)])
    first_of_segment = counts.cumsum(0) - counts
    total = image_embeds.shape[0] + video_embeds.shape[0]
    offset = torch.arange(total, device=counts.device) - first_of_segment.repeat_interleave(counts, output_size=total)
    gather = source_starts.repeat_interleave(counts, output_size=total) + offset
    return torch.cat([image_embeds, video_embeds.to(image_embeds.dtype)])[gather], counts


def _with_idle_rows(embeds: torch.Tensor, idle: torch.Tensor) -> torch.Tensor:
    """``embeds``, joined with the zero-row ``idle`` tensor when that one is part of the autograd graph."""
    if idle.shape[0] or not idle.requires_grad:
        return embeds
    return torch.cat([embeds, idle.to(embeds.dtype)])
