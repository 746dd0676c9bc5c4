"""Decode videos into a few uniformly sampled RGB frames, the way Video-LLaVA feeds its tower.

Meant to run inside data-loader workers: the PyAV path decodes sequentially and converts only
the sampled frames to PIL, so at most ``num_frames`` frames are held in memory. Every failure is
raised as :class:`VideoError` naming the file, so a bad sample is easy to find in a large data set.
PyAV (``av``) is the ``video`` extra and is imported lazily; ``decord`` is an optional faster
backend.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

VIDEO_BACKENDS: tuple[str, ...] = ("pyav", "decord", "auto")
DEFAULT_NUM_FRAMES = 8
"""Frames per video, as in Video-LLaVA (8 frames x 257 tokens for a 224 px, patch-14 tower)."""

PathLike = str | os.PathLike[str]


class VideoError(ValueError):
    """A video is missing, unreadable, has no video stream, is empty or too short; names the path."""


def _import_av() -> Any:
    try:
        import av
    except ImportError as error:  # pragma: no cover - av is installed in the dev environment
        raise ImportError("reading or writing videos needs PyAV: pip install 'duet-vlm[video]' (or 'av')") from error
    return av


def _av_errors() -> tuple[type[BaseException], ...]:
    """Exceptions PyAV raises for unreadable data (its FFmpeg errors, plus OS-level read errors)."""
    return (_import_av().error.FFmpegError, OSError)


def decord_available() -> bool:
    """Whether the optional ``decord`` backend can be imported."""
    return importlib.util.find_spec("decord") is not None


def resolve_backend(backend: str) -> str:
    """Map ``auto`` to ``decord`` when it is installed, else ``pyav``; reject unknown names."""
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {VIDEO_BACKENDS}")
    if backend == "auto":
        return "decord" if decord_available() else "pyav"
    return backend


def sample_frame_indices(num_total: int, num_frames: int) -> np.ndarray:
    """Indices of ``num_frames`` frames spread uniformly over ``num_total``, both ends included.

    This is Video-LLaVA's ``np.linspace(0, num_total - 1, num_frames, dtype=int)`` (truncated, not
    rounded), so a model sees the frames it saw in Video-LLaVA's training. Raises ``ValueError`` if
    fewer than ``num_frames`` frames exist or ``num_frames < 1``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_total < num_frames:
        raise ValueError(f"cannot sample {num_frames} distinct frames from {num_total}")
    return np.linspace(0, num_total - 1, num_frames).astype(np.int64)


def _check_request(path: PathLike, num_frames: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames} (video {path})")
    if not os.path.isfile(path):
        raise VideoError(f"video file not found: {path}")


def _check_count(path: PathLike, total: int, num_frames: int) -> None:
    if total <= 0:
        raise VideoError(f"video {path} is empty: it has no frames")
    if total < num_frames:
        raise VideoError(f"video {path} is too short: has {total} frames, needs {num_frames}")


# --------------------------------------------------------------------------------------------
# PyAV
# --------------------------------------------------------------------------------------------


def _open_video_stream(container: Any, path: PathLike) -> Any:
    if not container.streams.video:
        raise VideoError(f"no video stream in {path}")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _pyav_frame_count(path: PathLike) -> int:
    """Frame count from the stream header, or by demuxing packets (no decoding) when it is unknown."""
    return _pyav_frames_and_rate(path)[0]


def _pyav_frames_and_rate(path: PathLike) -> tuple[int, float]:
    """:func:`_pyav_frame_count` and the stream's average frame rate (0 when unknown), from one open."""
    av = _import_av()
    with av.open(os.fspath(path)) as container:
        stream = _open_video_stream(container, path)
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.frames > 0:
            return int(stream.frames), rate
        return sum(1 for packet in container.demux(stream) if packet.size > 0), rate


def _pyav_decode_selected(path: PathLike, indices: np.ndarray) -> tuple[list[Image.Image | None], int]:
    """Decode up to the last wanted index, converting only the wanted frames to RGB PIL images.

    Returns the frames in ``indices`` order (``None`` where the video ended first) and how many
    frames were decoded.
    """
    av = _import_av()
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(indices.tolist()):
        slots.setdefault(index, []).append(slot)
    last = int(indices.max())
    frames: list[Image.Image | None] = [None] * len(indices)
    decoded = 0
    with av.open(os.fspath(path)) as container:
        stream = _open_video_stream(container, path)
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in slots:
                image = frame.to_image()  # rgb24
                for slot in slots[index]:
                    frames[slot] = image
            if index >= last:
                break
    return frames, decoded


def _read_pyav(path: PathLike, num_frames: int) -> list[Image.Image]:
    try:
        total = _pyav_frame_count(path)
        _check_count(path, total, num_frames)
        frames, decoded = _pyav_decode_selected(path, sample_frame_indices(total, num_frames))
        if any(frame is None for frame in frames):
            # The header promised more frames than the file holds: resample from the real count.
            logger.warning("video %s claims %d frames but only %d decode; resampling", path, total, decoded)
            _check_count(path, decoded, num_frames)
            frames, _ = _pyav_decode_selected(path, sample_frame_indices(decoded, num_frames))
            if any(frame is None for frame in frames):
                raise VideoError(f"video {path} decoded inconsistently: fewer than {decoded} frames on a second pass")
    except VideoError:
        raise
    except _av_errors() as error:
        raise VideoError(f"cannot read video {path}: {error}") from error
    return frames  # type: ignore[return-value]  # no None left


# --------------------------------------------------------------------------------------------
# decord
# --------------------------------------------------------------------------------------------


def _read_decord(path: PathLike, num_frames: int) -> list[Image.Image]:
    import decord

    errors = (decord.DECORDError, RuntimeError, OSError)
    try:
        reader = decord.VideoReader(os.fspath(path), num_threads=1)
    except errors as error:
        if "cannot find video stream" in str(error):
            raise VideoError(f"no video stream in {path}") from error
        raise VideoError(f"cannot read video {path}: {error}") from error
    try:
        total = len(reader)
        _check_count(path, total, num_frames)
        batch = reader.get_batch(sample_frame_indices(total, num_frames).tolist()).asnumpy()
    except errors as error:
        raise VideoError(f"cannot decode video {path}: {error}") from error
    finally:
        del reader
    return [Image.fromarray(frame) for frame in batch]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def read_video_frames(path: PathLike, num_frames: int = DEFAULT_NUM_FRAMES, backend: str = "pyav") -> list[Image.Image]:
    """Decode ``num_frames`` uniformly sampled frames of ``path`` as RGB PIL images.

    ``backend`` is ``pyav``, ``decord`` or ``auto`` (decord when installed). Raises
    :class:`VideoError` naming the path if the file is missing, unreadable, has no video stream,
    no frames, or fewer than ``num_frames`` frames.
    """
    backend = resolve_backend(backend)
    _check_request(path, num_frames)
    if backend == "decord":
        return _read_decord(path, num_frames)
    return _read_pyav(path, num_frames)


def video_duration_s(path: PathLike, backend: str = "pyav") -> float:
    """Length of ``path`` in seconds (frame count over the average frame rate), for time-aware positions
    (Qwen2.5-VL's temporal M-RoPE); :class:`VideoError` naming the path when it cannot be told."""
    backend = resolve_backend(backend)
    _check_request(path, 1)
    try:
        if backend == "decord":
            import decord

            reader = decord.VideoReader(os.fspath(path), num_threads=1)
            frames, rate = len(reader), float(reader.get_avg_fps())
        else:
            frames, rate = _pyav_frames_and_rate(path)
    except VideoError:
        raise
    except (*_av_errors(), RuntimeError, OSError) as error:
        raise VideoError(f"cannot read video {path}: {error}") from error
    if rate <= 0 or frames <= 0:
        raise VideoError(f"video {path} has no usable frame rate ({rate}) or frame count ({frames})")
    return frames / rate


def preprocess_frames(frames: Sequence[Image.Image], processor: Any) -> torch.Tensor:
    """Run the HF CLIP image processor on one video's frames; returns float ``[F, 3, H, W]``.

    As in Video-LLaVA, frames are resized (shortest edge) and centre-cropped, not padded to square.
    """
    if not frames:
        raise ValueError("preprocess_frames needs at least one frame")
    return processor(images=list(frames), return_tensors="pt")["pixel_values"]


def load_and_preprocess_videos(
    paths: Sequence[PathLike],
    processor: Any,
    num_frames: int = DEFAULT_NUM_FRAMES,
    backend: str = "pyav",
) -> torch.Tensor:
    """Read and preprocess several videos; returns float ``[V, F, 3, H, W]``."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise ValueError("load_and_preprocess_videos needs at least one path")
    return torch.stack([preprocess_frames(read_video_frames(p, num_frames, backend), processor) for p in paths])


def _as_rgb_array(frame: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(frame, Image.Image):
        frame = frame if frame.mode == "RGB" else frame.convert("RGB")
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"frames must be RGB (H, W, 3), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.uint8)


def write_video(
    path: PathLike,
    frames: Sequence[np.ndarray | Image.Image],
    fps: int = 8,
    codec: str = "mpeg4",
    bit_rate: int = 1_000_000,
) -> None:
    """Encode RGB frames (uint8 ``H x W x 3`` arrays or PIL images) into a video file with PyAV.

    The container follows the suffix (``.mp4``, ``.avi``, ``.mkv`` ...). Frames must share one even
    size (yuv420p). The encoder runs single-threaded so the same frames give the same bytes.
    """
    av = _import_av()
    if not frames:
        raise ValueError(f"write_video needs at least one frame ({path})")
    arrays = [_as_rgb_array(frame) for frame in frames]
    height, width = arrays[0].shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"video frames need even width and height for yuv420p, got {width}x{height} ({path})")
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"all frames of {path} must have the same size")
    if codec not in av.codecs_available:
        raise ValueError(f"codec {codec!r} is not available in this PyAV build ({path})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bit_rate
        stream.codec_context.thread_count = 1
        for array in arrays:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
