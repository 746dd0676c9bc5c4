"""Splice visual tokens into the text embeddings with one vectorised scatter (no per-sample loop)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llava.constants import IGNORE_INDEX


@dataclass
class MergedInputs:
    """The LLM's input sequence after every image slot was replaced by its visual tokens."""

    inputs_embeds: torch.Tensor  # [B, L', D]
    attention_mask: torch.Tensor  # [B, L'] long, 1 = real token
    position_ids: torch.Tensor  # [B, L'] RoPE positions (0 at each sample's first real token)
    visual_mask: torch.Tensor  # [B, L'] bool, True on visual tokens
    labels: torch.Tensor | None  # [B, L'] with IGNORE_INDEX on visual tokens and padding
    token_ids: torch.Tensor  # [B, L'] text token ids, -1 on visual tokens and added padding
    v2v_time_s: float = 0.0  # host seconds spent on V2V scoring and merging


def detect_left_padding(attention_mask: torch.Tensor) -> bool:
    """True when the batch is left-padded (all rows end with a real token, some start with padding)."""
    return bool(attention_mask[:, -1].all()) and not bool(attention_mask[:, 0].all())


def merge_visual_tokens(
    input_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    visual_embeds: torch.Tensor,
    visual_counts: torch.Tensor,
    slot_token_ids: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    left_padding: bool | None = None,
) -> MergedInputs:
    """Replace each visual slot (an image or a video sentinel) by that segment's visual tokens.

    Args:
        input_ids: ``[B, L]`` ids with one sentinel per image or video.
        text_embeds: ``[B, L, D]`` embeddings of ``input_ids`` (sentinel rows are ignored).
        visual_embeds: ``[sum(visual_counts), D]``: the visual tokens of all segments, concatenated in
            the row-major order of their slots in ``input_ids`` (see :func:`order_visual_segments`).
        visual_counts: ``[num_segments]`` tokens per segment; may differ per segment.
        slot_token_ids: the sentinel id(s) that mark a slot (image and video ids).
        left_padding: align the expanded rows to the right (generation). ``None`` infers it from
            ``attention_mask``.
    """
    batch = input_ids.shape[0]
    device = input_ids.device
    slot_ids = torch.as_tensor(slot_token_ids, dtype=input_ids.dtype, device=device).reshape(-1)
    is_slot = torch.isin(input_ids, slot_ids)
    num_slots = int(is_slot.sum())
    if num_slots != visual_counts.numel():
        per_sample = is_slot.sum(dim=1).tolist()
        raise ValueError(
            f"input_ids hold {num_slots} visual slots (per sample: {per_sample}) but "
            f"{visual_counts.numel()} images/videos were given"
        )
    if int(visual_counts.sum()) != visual_embeds.shape[0]:
        raise ValueError(
            f"visual_counts sum to {int(visual_counts.sum())} but visual_embeds has {visual_embeds.shape[0]} rows"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if left_padding is None:
        left_padding = detect_left_padding(attention_mask)

    tokens_per_slot = torch.ones_like(input_ids)
    tokens_per_slot[is_slot] = visual_counts.to(device=device, dtype=tokens_per_slot.dtype)
    new_lengths = tokens_per_slot.sum(dim=1)
    new_length = int(new_lengths.max())
    start = tokens_per_slot.cumsum(dim=1) - tokens_per_slot
    if left_padding:
        start = start + (new_length - new_lengths).unsqueeze(1)

    is_text = ~is_slot
    text_rows, text_cols = is_text.nonzero(as_tuple=True)
    text_dest = start[text_rows, text_cols]

    slot_rows, slot_cols = is_slot.nonzero(as_tuple=True)
    counts = visual_counts.to(device)
    first_token_of_image = counts.cumsum(0) - counts
    visual_rows = slot_rows.repeat_interleave(counts)
    offset_in_image = torch.arange(visual_embeds.shape[0], device=device) - first_token_of_image.repeat_interleave(
        counts
    )
    visual_dest = start[slot_rows, slot_cols].repeat_interleave(counts) + offset_in_image

    hidden = text_embeds.shape[-1]
    embeds = text_embeds.new_zeros(batch, new_length, hidden)
    embeds = embeds.index_put((text_rows, text_dest), text_embeds[text_rows, text_cols])
    embeds = embeds.index_put((visual_rows, visual_dest), visual_embeds.to(embeds.dtype))

    new_mask = attention_mask.new_zeros(batch, new_length)
    new_mask[text_rows, text_dest] = attention_mask[text_rows, text_cols]
    new_mask[visual_rows, visual_dest] = 1
    visual_mask = torch.zeros(batch, new_length, dtype=torch.bool, device=device)
    visual_mask[visual_rows, visual_dest] = True

    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((batch, new_length), IGNORE_INDEX)
        new_labels[text_rows, text_dest] = labels[text_rows, text_cols]

    token_ids = input_ids.new_full((batch, new_length), -1)
    token_ids[text_rows, text_dest] = input_ids[text_rows, text_cols]

    position_ids = (new_mask.cumsum(dim=1) - 1).clamp(min=0)
    return MergedInputs(embeds, new_mask, position_ids, visual_mask, new_labels, token_ids)


def order_visual_segments(
    slot_is_video: torch.Tensor,
    image_embeds: torch.Tensor,
    image_counts: torch.Tensor,
    video_embeds: torch.Tensor,
    video_counts: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleave image and video segments into slot order, with one gather (no per-segment loop).

    ``slot_is_video`` ``[num_slots]`` tells, in row-major slot order, which slots are videos; the
    k-th image slot takes the k-th image of ``image_embeds`` (``[sum(image_counts), D]``, images
    concatenated), the j-th video slot the j-th video. Returns ``(embeds, counts)`` in slot order,
    ready for :func:`merge_visual_tokens`.
    """
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
    total = int(counts.sum())
    offset = torch.arange(total, device=counts.device) - first_of_segment.repeat_interleave(counts)
    gather = source_starts.repeat_interleave(counts) + offset
    return torch.cat([image_embeds, video_embeds.to(image_embeds.dtype)])[gather], counts


def _with_idle_rows(embeds: torch.Tensor, idle: torch.Tensor) -> torch.Tensor:
    """``embeds``, joined with the zero-row ``idle`` tensor when that one is part of the autograd graph."""
    if idle.shape[0] or not idle.requires_grad:
        return embeds
    return torch.cat([embeds, idle.to(embeds.dtype)])
