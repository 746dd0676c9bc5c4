"""Videos for Qwen2.5-VL without transformers' video processor (which needs torchvision).

Frames are sampled uniformly (:func:`~llava.data.video.read_video_frames`, PyAV or decord), padded by
repeating the last one to a multiple of the temporal patch size, and each is resized and normalised by the
checkpoint's own image processor at one per-frame pixel budget (``max_pixels``; Qwen's video default is
768 x 28 x 28). The image processor lays every frame out in Qwen's patch order with the frame repeated along
the temporal-patch axis; taking one copy per frame and putting consecutive frames on that axis gives Qwen's
video layout (``[t * h * w, C * temporal_patch * patch * patch]``, grid ``(t, h, w)``). Each temporal patch
spans ``temporal_patch * seconds_between_frames`` seconds: Qwen2.5-VL's ``second_per_grid_ts``, which
spaces the temporal M-RoPE positions by real time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from llava.data.video import read_video_frames, video_duration_s

DEFAULT_VIDEO_FRAMES = 16
DEFAULT_VIDEO_MAX_PIXELS = 768 * 28 * 28
"""Qwen2.5-VL's default per-frame pixel budget for videos."""


@dataclass(frozen=True)
class QwenVideo:
    """One video as Qwen2.5-VL's vision transformer takes it."""

    pixel_values: torch.Tensor  # [t * h * w, C * temporal_patch * patch * patch]
    grid_thw: torch.Tensor  # [3]
    second_per_grid: float


def frames_to_patches(frames: list[Image.Image], image_processor: Any, max_pixels: int | None = None) -> tuple:
    """``(pixel_values, grid_thw)`` of one video's frames in Qwen's video layout (see the module docstring)."""
    temporal = image_processor.temporal_patch_size
    frames = list(frames) + [frames[-1]] * (-len(frames) % temporal)
    shortest, longest = image_processor.size["shortest_edge"], image_processor.size["longest_edge"]
    if max_pixels is not None:
        shortest, longest = min(shortest, max_pixels), max_pixels
    size = {"shortest_edge": shortest, "longest_edge": longest}
    processed = image_processor(images=frames, return_tensors="pt", size=size)
    grids = processed["image_grid_thw"]
    if not bool((grids == grids[0]).all()):
        raise ValueError(f"the frames of one video resized to different grids: {grids.unique(dim=0).tolist()}")
    _, height, width = grids[0].tolist()
    patch = image_processor.patch_size
    per_frame = processed["pixel_values"].view(len(frames), height * width, -1, temporal, patch, patch)[:, :, :, 0]
    steps = len(frames) // temporal
    video = per_frame.view(steps, temporal, height * width, -1, patch, patch).permute(0, 2, 3, 1, 4, 5)
    return video.reshape(steps * height * width, -1), torch.tensor([steps, height, width])


def load_qwen_video(
    path: str | os.PathLike[str],
    image_processor: Any,
    num_frames: int = DEFAULT_VIDEO_FRAMES,
    max_pixels: int | None = DEFAULT_VIDEO_MAX_PIXELS,
    backend: str = "pyav",
) -> QwenVideo:
    """Decode ``num_frames`` uniformly sampled frames of ``path`` and lay them out for Qwen2.5-VL."""
    frames = read_video_frames(path, num_frames, backend)
    pixels, grid = frames_to_patches(frames, image_processor, max_pixels)
    seconds_between_frames = video_duration_s(path, backend) / num_frames
    return QwenVideo(pixels, grid, image_processor.temporal_patch_size * seconds_between_frames)


def batch_videos(videos: list[QwenVideo]) -> dict[str, torch.Tensor]:
    """The model's video inputs for several videos, in order (empty without videos)."""
    if not videos:
        return {}
    return {
        "pixel_values_videos": torch.cat([video.pixel_values for video in videos]),
        "video_grid_thw": torch.stack([video.grid_thw for video in videos]),
        "second_per_grid_ts": torch.tensor([video.second_per_grid for video in videos]),
    }
