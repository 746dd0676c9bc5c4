"""The composite LLaVA model: vision tower -> projector -> decoder-only language model."""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.profiler import record_function
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel, PreTrainedModel

from llava.compression.config import load_compression
from llava.compression.t2v import SequenceState, build_query_mask, content_token_table
from llava.hf_adapter import Cache
from llava.model.config import DuetLlavaConfig
from llava.model.contract import DuetOutput, decode_step_if_given, prefill_output, require_grads_from
from llava.model.decoder import DecodeState, TokenGroups, decoder_of, run_decoder, stage_plan_from_config
from llava.model.fast_generation import FastDecoder
from llava.model.generation import greedy_or_sample
from llava.model.projector import build_projector
from llava.model.sampling import SamplingOptions
from llava.model.splice import (
    SplicedInputs,
    VisualSegments,
    detect_left_padding,
    order_visual_segments,
    slot_positions,
    splice_visual_tokens,
)
from llava.model.vision_tower import VisionTower
from llava.utils.profiling import PROFILE_REGIONS

logger = logging.getLogger(__name__)


DuetLlavaOutput = DuetOutput
"""The forward output, under the name users of this model know (:class:`~llava.model.contract.DuetOutput`)."""


@functools.cache
def _warn_salient_fallback() -> None:
    logger.warning("salient T2V queries need set_query_vocabulary(tokenizer); using 'instruction' queries")


class VisualParts(NamedTuple):
    """Visual tokens of several images or videos: concatenated ``[sum(counts), D]``, their ``counts`` on the
    device and on the host (so the splice needs no read-back), and the host seconds V2V/DToMe took.

    With DyMU's VTU the tokens are copied back to every position they cover (``counts`` are the full
    counts); ``group_starts`` ``[sum(counts)]`` marks each token's first position and ``unique_counts`` the
    distinct tokens per segment.
    """

    embeds: torch.Tensor
    counts: torch.Tensor
    seconds: float
    host_counts: list[int]
    group_starts: torch.Tensor | None = None
    unique_counts: list[int] | None = None


def spliced_row_lengths(
    length: int,
    images_per_row: list[int],
    videos_per_row: list[int],
    image_counts: list[int],
    video_counts: list[int],
) -> list[int]:
    """Length of each row of a ``length``-long batch once every slot is replaced by its segment's tokens.

    Images (videos) are numbered in row-major slot order, so row ``r`` holds the next
    ``images_per_row[r]`` image counts and the next ``videos_per_row[r]`` video counts. Host arithmetic only.
    """
    lengths = []
    next_image = next_video = 0
    for images, videos in zip(images_per_row, videos_per_row, strict=True):
        image_tokens = sum(image_counts[next_image : next_image + images])
        video_tokens = sum(video_counts[next_video : next_video + videos])
        next_image += images
        next_video += videos
        lengths.append(length - images - videos + image_tokens + video_tokens)
    return lengths


class DuetLlavaPreTrainedModel(PreTrainedModel):
    config_class = DuetLlavaConfig
    config: DuetLlavaConfig
    base_model_prefix = "duet_llava"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    _skip_keys_device_placement = ["cache"]

    def _init_weights(self, module: nn.Module) -> None:
        # Only our own modules (the projector) land here; the HF sub-models initialise themselves.
        if isinstance(module, nn.Linear):
            module.reset_parameters()


class DuetLlavaForCausalLM(DuetLlavaPreTrainedModel):
    """LLaVA-1.5 / Video-LLaVA by composition: ``vision_tower``, optional ``video_tower``, one
    ``projector``, ``language_model``.

    Each image occupies one ``config.image_token_id`` slot in ``input_ids`` and each video one
    ``config.video_token_id`` slot; :meth:`forward` replaces a slot by the image's visual tokens, or by
    the video's frames x tokens-per-frame (their number may differ per image).
    """

    def __init__(
        self,
        config: DuetLlavaConfig,
        language_model: PreTrainedModel | None = None,
        vision_model: CLIPVisionModel | None = None,
        video_model: CLIPVisionModel | None = None,
    ) -> None:
        super().__init__(config)
        self.vision_tower = VisionTower(config, vision_model)
        self.video_tower = VisionTower(config, video_model, for_video=True) if config.has_video_tower else None
        self.projector = build_projector(
            config.projector_type, config.vision_config.hidden_size, config.text_config.hidden_size
        )
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        self.stage_plan = stage_plan_from_config(config.compression_config().t2v, config.text_config.num_hidden_layers)
        # Static, per-tokenizer (not per-sample): which vocabulary entries are content words.
        self.register_buffer("content_token_table", torch.zeros(0, dtype=torch.bool), persistent=False)
        self.post_init()

    def set_compression(self, spec: Any) -> None:
        """Switch the compression preset (name, YAML path, dict or config); recorded in the config."""
        compression = load_compression(spec)
        self.config.compression = compression.to_dict() if compression.enabled else None
        self.vision_tower = VisionTower(self.config, self.vision_tower.vision_model)
        if self.video_tower is not None:
            self.video_tower = VisionTower(self.config, self.video_tower.vision_model, for_video=True)
        self.stage_plan = stage_plan_from_config(compression.t2v, self.config.text_config.num_hidden_layers)

    def set_query_vocabulary(self, tokenizer: Any) -> None:
        """Mark the tokenizer's content-word tokens, used by ``salient`` T2V queries."""
        self.content_token_table = content_token_table(tokenizer).to(self.content_token_table.device)

    @classmethod
    def from_components(
        cls,
        language_model: PreTrainedModel,
        vision_model: CLIPVisionModel,
        video_model: CLIPVisionModel | None = None,
        **config_kwargs: Any,
    ) -> DuetLlavaForCausalLM:
        """Assemble a model from a pretrained LM, a pretrained CLIP tower and optionally a video tower
        (Video-LLaVA layout); only the projector is freshly initialised."""
        if video_model is not None and video_model.config.hidden_size != vision_model.config.hidden_size:
            raise ValueError(
                f"the image and video towers feed one projector, so their widths must match: "
                f"{vision_model.config.hidden_size} vs {video_model.config.hidden_size}"
            )
        config = DuetLlavaConfig(
            vision_config=vision_model.config,
            text_config=language_model.config,
            video_config=None if video_model is None else video_model.config,
            **config_kwargs,
        )
        model = cls(config, language_model=language_model, vision_model=vision_model, video_model=video_model)
        model.projector.to(dtype=language_model.dtype)
        return model

    def enable_input_require_grads(self) -> None:
        """Make the LLM's token embeddings output require grad (for checkpointing/adapters).

        Only the language model's embeddings: the base class hooks every sub-model, which would
        make the frozen CLIP tower's output require grad, so checkpointing would recompute the
        tower and back-propagate through it for nothing.
        """
        hook = require_grads_from(self.get_input_embeddings())
        self._require_grads_hooks = [hook]
        self._require_grads_hook = hook

    # ----- embeddings (delegated so resize/peft/Trainer helpers work) -----
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # ----- images and videos -----
    def encode_images(self, pixel_values: torch.Tensor) -> VisualParts:
        """Visual tokens of all images ``[num_images, 3, H, W]``, concatenated, with their counts."""
        return self._encode(self.vision_tower, pixel_values, frames_per_segment=1)

    def encode_videos(self, pixel_values_videos: torch.Tensor) -> VisualParts:
        """Visual tokens of all videos ``[num_videos, frames, 3, H, W]``: each video is one segment of
        frames x tokens-per-frame (frame-major), V2V-merged per frame when configured."""
        if self.video_tower is None:
            raise ValueError("videos were given but this model has no video tower (config.video_config is None)")
        if pixel_values_videos.dim() != 5:
            raise ValueError(
                "pixel_values_videos must be [num_videos, frames, 3, H, W], "
                f"got shape {tuple(pixel_values_videos.shape)}"
            )
        num_frames = pixel_values_videos.shape[1]
        return self._encode(self.video_tower, pixel_values_videos.flatten(0, 1), frames_per_segment=num_frames)

    def _encode(self, tower: VisionTower, pixels: torch.Tensor, frames_per_segment: int) -> VisualParts:
        """Tower, projector, and the tokens of each segment (an image, or a video's frames) concatenated."""
        if tower.dymu_thresholds is None:
            features, seconds = tower.encode(pixels)
            projected = self.projector(features.to(self._projector_dtype()))
            num_segments = projected.shape[0] // frames_per_segment
            per_segment = frames_per_segment * projected.shape[1]
            counts = torch.full((num_segments,), per_segment, dtype=torch.long, device=projected.device)
            return VisualParts(
                projected.reshape(-1, projected.shape[-1]), counts, seconds, [per_segment] * num_segments
            )
        # DyMU: every image (frame) keeps its own number of tokens; one read of the counts, then one gather.
        features, frame_counts, groups, seconds = tower.encode_dynamic(pixels)
        host_frame_counts = frame_counts.tolist()
        total = sum(host_frame_counts)
        rows = torch.repeat_interleave(
            torch.arange(len(host_frame_counts), device=pixels.device), frame_counts, output_size=total
        )
        starts = frame_counts.cumsum(0) - frame_counts
        columns = torch.arange(total, device=pixels.device) - starts.repeat_interleave(frame_counts, output_size=total)
        projected = self.projector(features[rows, columns].to(self._projector_dtype()))
        host_counts = [
            sum(host_frame_counts[start : start + frames_per_segment])
            for start in range(0, len(host_frame_counts), frames_per_segment)
        ]
        if tower.virtual_unmerging:
            return self._unmerged(projected, frame_counts, groups, frames_per_segment, seconds, host_counts)
        # The same sums on the device (no host-to-device copy of host_counts).
        segment_of_frame = torch.arange(len(host_frame_counts), device=frame_counts.device) // frames_per_segment
        counts = frame_counts.new_zeros(len(host_counts), dtype=torch.long).index_add_(
            0, segment_of_frame, frame_counts.long()
        )
        return VisualParts(projected, counts, seconds, host_counts)

    @staticmethod
    def _unmerged(
        projected: torch.Tensor,
        frame_counts: torch.Tensor,
        groups: torch.Tensor,
        frames_per_segment: int,
        seconds: float,
        unique_counts: list[int],
    ) -> VisualParts:
        """VTU: every merged token copied back to each position it covers; each group's first position marked."""
        frames, positions = groups.shape
        starts = frame_counts.cumsum(0) - frame_counts
        expanded = projected[(starts.unsqueeze(1) + groups).reshape(-1)]
        first = torch.full_like(groups, positions).scatter_reduce(
            1, groups, torch.arange(positions, device=groups.device).expand_as(groups), reduce="amin"
        )
        group_starts = (first.gather(1, groups) == torch.arange(positions, device=groups.device)).reshape(-1)
        per_segment = frames_per_segment * positions
        num_segments = frames // frames_per_segment
        counts = torch.full((num_segments,), per_segment, dtype=torch.long, device=projected.device)
        return VisualParts(expanded, counts, seconds, [per_segment] * num_segments, group_starts, unique_counts)

    def _projector_dtype(self) -> torch.dtype:
        for parameter in self.projector.parameters():
            return parameter.dtype
        return self.vision_tower.dtype

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        left_padding: bool | None = None,
        pixel_values_videos: torch.Tensor | None = None,
    ) -> SplicedInputs:
        """Embed text and splice in the visual tokens of the images and videos (one slot each)."""
        image_id, video_id = self.config.image_token_id, self.config.video_token_id
        image_slots = input_ids == image_id
        video_slots = input_ids == video_id
        is_slot = image_slots | video_slots
        # The one read-back of the splice, before the towers run (the device is idle then): slots per row.
        images_per_row, videos_per_row = torch.stack([image_slots.sum(dim=1), video_slots.sum(dim=1)]).tolist()
        num_images, num_videos = sum(images_per_row), sum(videos_per_row)
        text_embeds = self.get_input_embeddings()(input_ids.masked_fill(is_slot, 0))
        with record_function(PROFILE_REGIONS["vision"]):
            images = self._encode_or_idle("image", num_images, pixel_values, text_embeds)
            videos = self._encode_or_idle("video", num_videos, pixel_values_videos, text_embeds)
        num_slots = num_images + num_videos
        slot_rows, slot_cols = slot_positions(is_slot, num_slots)
        slot_is_video = video_slots[slot_rows, slot_cols]
        visual_embeds, counts = order_visual_segments(slot_is_video, *images[:2], *videos[:2], num_videos=num_videos)
        new_length = None
        row_lengths: list[int] = []
        if len(images.host_counts) == num_images and len(videos.host_counts) == num_videos:
            # The spliced length follows on the host from the slots per row and the tokens per segment.
            row_lengths = spliced_row_lengths(
                input_ids.shape[1], images_per_row, videos_per_row, images.host_counts, videos.host_counts
            )
            new_length = max(row_lengths, default=0)
        with record_function(PROFILE_REGIONS["merge"]):
            segments = VisualSegments(visual_embeds, counts, num_slots if new_length is not None else None, new_length)
            spliced = splice_visual_tokens(
                input_ids,
                text_embeds,
                segments,
                (image_id, video_id),
                attention_mask=attention_mask,
                labels=labels,
                left_padding=left_padding,
            )
        spliced.v2v_time_s = images.seconds + videos.seconds
        if images.group_starts is not None or videos.group_starts is not None:
            unique_row_lengths = spliced_row_lengths(
                input_ids.shape[1], images_per_row, videos_per_row, images.unique_counts or images.host_counts,
                videos.unique_counts or videos.host_counts,
            )  # fmt: skip
            self._mark_groups(spliced, images, videos, slot_is_video, row_lengths, unique_row_lengths)
        return spliced

    @staticmethod
    def _mark_groups(
        spliced: SplicedInputs,
        images: VisualParts,
        videos: VisualParts,
        slot_is_video: torch.Tensor,
        row_lengths: list[int],
        unique_row_lengths: list[int],
    ) -> None:
        """VTU: mark the first position of every group (text and padding positions are groups of one) and
        count the groups of the row that has most, on the host."""
        flags = [
            parts.group_starts
            if parts.group_starts is not None
            else torch.ones(parts.embeds.shape[0], dtype=torch.bool, device=parts.embeds.device)
            for parts in (images, videos)
        ]
        ordered, _ = order_visual_segments(
            slot_is_video,
            flags[0].unsqueeze(1).float(),
            images.counts,
            flags[1].unsqueeze(1).float(),
            videos.counts,
            num_videos=len(videos.host_counts),
        )
        # The splice places visual tokens in row-major order, so the k-th visual position takes the k-th flag.
        visual = spliced.visual_mask
        spliced.group_starts = (~visual).masked_scatter(visual, ordered.squeeze(1).bool())
        width = visual.shape[1]
        spliced.num_groups = max(
            (width - full + unique for full, unique in zip(row_lengths, unique_row_lengths, strict=True)), default=0
        )

    def _encode_or_idle(
        self, kind: str, num_slots: int, pixels: torch.Tensor | None, text_embeds: torch.Tensor
    ) -> VisualParts:
        """Encode one modality, or return zero tokens when the batch has none of it.

        In training a missing modality still runs a blank input through its tower and the projector
        (see :meth:`_idle_visual_tokens`), so every rank calls the same modules in every step.
        """
        if pixels is not None and pixels.shape[0] > 0:
            return self.encode_videos(pixels) if kind == "video" else self.encode_images(pixels)
        if num_slots:
            raise ValueError(f"input_ids hold {num_slots} {kind} slots but no {kind} pixels were given")
        counts = torch.zeros(0, dtype=torch.long, device=text_embeds.device)
        has_tower = kind == "image" or self.video_tower is not None
        if has_tower and self.training and torch.is_grad_enabled():
            return VisualParts(self._idle_visual_tokens(kind, text_embeds.device), counts, 0.0, [])
        return VisualParts(text_embeds.new_zeros(0, text_embeds.shape[-1]), counts, 0.0, [])

    # ----- forward -----
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        left_padding: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        decode_state: DecodeState | None = None,
        query_end: int | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        pack_sequences: bool = False,
        **kwargs: Any,
    ) -> DuetOutput:
        """Run the model.

        Prefill (no cache or an empty one): ``input_ids`` may hold image and video slots
        (``pixel_values`` ``[images, 3, H, W]``, ``pixel_values_videos`` ``[videos, frames, 3, H, W]``,
        each in slot order); visual tokens are
        dropped at the configured T2V boundaries. Decode steps pass the new tokens and the
        ``decode_state`` returned by the prefill, which knows each stage's cache and positions.
        ``query_end`` limits T2V queries to the first positions (a recomputation that must keep
        the same visual tokens as its prefill). Left padding is inferred from ``attention_mask``
        unless ``left_padding`` says otherwise; rows stay right-aligned after drops then.
        With ``labels`` the loss is computed on the label positions only (logits of other
        positions are never materialised) and ``logits`` is ``None``.
        ``num_items_in_batch`` (from the HF Trainer) makes the loss exact under gradient
        accumulation: the sum of token losses is divided by it instead of the local count.
        ``pack_sequences`` (training, ``--packing``) runs the decoder layers on the real tokens only, packed
        into rows with each sample's attention isolated (:mod:`llava.model.packing`).
        """
        decoder = decoder_of(self.language_model)
        step = decode_step_if_given(
            self, input_ids, decode_state, cache, logits_to_keep, (pixel_values, pixel_values_videos)
        )
        if step is not None:
            return step

        if left_padding is None:
            left_padding = attention_mask is not None and detect_left_padding(attention_mask)
        spliced = self.embed_inputs(input_ids, pixel_values, attention_mask, labels, left_padding, pixel_values_videos)
        plan = self.stage_plan
        query_mask = torch.zeros_like(spliced.visual_mask)
        if plan is not None and plan.boundaries:
            query_mask = build_query_mask(
                self._query_mode(plan.query),
                spliced.attention_mask,
                spliced.visual_mask,
                spliced.labels,
                spliced.token_ids,
                self.content_token_table if self.content_token_table.numel() else None,
                query_end=query_end,
            )
        sequence = SequenceState(
            hidden=spliced.inputs_embeds,
            attention_mask=spliced.attention_mask,
            position_ids=spliced.position_ids if position_ids is None else position_ids,
            visual_mask=spliced.visual_mask,
            query_mask=query_mask,
            labels=spliced.labels,
        )
        num_segments = sum(
            0 if pixels is None else int(pixels.shape[0]) for pixels in (pixel_values, pixel_values_videos)
        )
        groups = None if spliced.group_starts is None else TokenGroups(spliced.group_starts, spliced.num_groups)
        layout = "packed" if pack_sequences else "left" if left_padding else "right"
        result = run_decoder(decoder, sequence, plan, cache, use_cache, layout, num_segments, groups)

        return prefill_output(
            self, result, labels, num_items_in_batch, logits_to_keep, cache if use_cache else None,
            spliced.attention_mask.shape[1], spliced.v2v_time_s,
        )  # fmt: skip

    def _query_mode(self, mode: str) -> str:
        if mode == "salient" and not self.content_token_table.numel():
            _warn_salient_fallback()
            return "instruction"
        return mode

    def _idle_visual_tokens(self, kind: str, device: torch.device) -> torch.Tensor:
        """Zero visual-token rows that are still connected to the ``kind`` tower and the projector.

        In distributed training a rank whose batch lacks a modality would otherwise skip that tower:
        ZeRO-3 would miss its parameter gathers and ZeRO-2/DDP the projector's gradient reduction, and
        the ranks' collectives would no longer match (a crash or a hang). One blank image (or one blank
        frame) is encoded and its tokens sliced away, so the graph has the same shape as with real
        inputs (the projector's gradients arrive at the same point of the backward pass, as zeros)
        while the LLM sequence is unchanged.
        """
        tower_config = self.config.video_config if kind == "video" else self.config.vision_config
        size = tower_config.image_size
        tower = self.video_tower if kind == "video" else self.vision_tower
        blank = torch.zeros(1, 3, size, size, device=device, dtype=tower.dtype)
        visual = self.encode_videos(blank[None])[0] if kind == "video" else self.encode_images(blank)[0]
        return visual[:0]

    # ----- generation -----
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        *,
        sampling: SamplingOptions | None = None,
        fast_decoder: FastDecoder | None = None,
        **sampling_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy or sampled decoding for a batch of left-padded prompts.

        Returns the new tokens ``[B, <= max_new_tokens]``, padded with ``pad_token_id`` after each sample's
        EOS. The options are a :class:`~llava.model.sampling.SamplingOptions` (``sampling``) and/or its
        fields as keywords, which replace ``sampling``'s: ``max_new_tokens`` (64), ``do_sample``,
        ``temperature``, ``top_p``, ``eos_token_id``, ``pad_token_id``, ``generator``, ``use_cache``
        (``False`` recomputes the whole sequence at every step: slow, a reference for testing the cached
        path) and ``fast``, which chooses the decode loop: static per-stage caches with a CUDA-graph decode
        step (:mod:`llava.model.fast_generation`; the default on CUDA) or the eager loop (``False``; the
        default on CPU). Pass a :class:`~llava.model.fast_generation.FastDecoder` as ``fast_decoder`` to
        reuse its buffers and captured graphs across calls; without one each call captures anew.
        """
        visual_inputs = {"pixel_values": pixel_values, "pixel_values_videos": pixel_values_videos}
        options = SamplingOptions.from_keywords(sampling, **sampling_kwargs)
        return greedy_or_sample(self, input_ids, attention_mask, visual_inputs, options, fast_decoder)


AutoConfig.register(DuetLlavaConfig.model_type, DuetLlavaConfig)
AutoModelForCausalLM.register(DuetLlavaConfig, DuetLlavaForCausalLM)
