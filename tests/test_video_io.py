"""Tests for video decoding (llava.data.video): frame sampling, both backends, errors, preprocessing."""

from __future__ import annotations

import struct
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from llava.data.video import (
    VideoError,
    decord_available,
    load_and_preprocess_videos,
    preprocess_frames,
    read_video_frames,
    resolve_backend,
    sample_frame_indices,
    write_video,
)
from llava.playground.tiny_models import build_clip_image_processor

WIDTH, HEIGHT = 64, 48
TOLERANCE = 12  # per-channel codec error on flat colours (yuv420p + mpeg4)
BACKENDS = ["pyav", pytest.param("decord", marks=pytest.mark.skipif(not decord_available(), reason="no decord"))]


def index_colour(i: int) -> tuple[int, int, int]:
    """A distinct, codec-robust colour for frame ``i`` (channels far apart, away from 0/255)."""
    return (16 + 12 * i, 200 - 9 * i, 40 + (37 * i) % 160)


def index_frames(n: int) -> list[np.ndarray]:
    return [np.full((HEIGHT, WIDTH, 3), index_colour(i), np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def video16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vid") / "index16.mp4"
    write_video(path, index_frames(16), fps=8)
    return path


def frame_index(image: Image.Image, n: int) -> int:
    """Which frame ``image`` shows: the index whose colour is nearest to its mean colour."""
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
    dists = [np.abs(mean - np.array(index_colour(i))).max() for i in range(n)]
    assert min(dists) <= TOLERANCE, (mean, min(dists))
    return int(np.argmin(dists))


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sample_frame_indices_uniform_with_endpoints() -> None:
    assert sample_frame_indices(16, 4).tolist() == [0, 5, 10, 15]
    assert sample_frame_indices(8, 8).tolist() == list(range(8))
    assert sample_frame_indices(100, 8).tolist() == [0, 14, 28, 42, 56, 70, 84, 99]  # Video-LLaVA truncates
    assert sample_frame_indices(9, 1).tolist() == [0]
    for total, n in [(13, 8), (300, 8), (17, 5)]:
        idx = sample_frame_indices(total, n)
        assert idx[0] == 0 and idx[-1] == total - 1 and len(idx) == n
        assert (np.diff(idx) >= 1).all()  # distinct and increasing
        expected = np.linspace(0, total - 1, n)
        assert ((expected - idx) >= 0).all() and ((expected - idx) < 1).all()


def test_sample_frame_indices_errors() -> None:
    with pytest.raises(ValueError, match="cannot sample 8"):
        sample_frame_indices(7, 8)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        sample_frame_indices(10, 0)


def test_unknown_backend_lists_choices(video16: Path) -> None:
    with pytest.raises(ValueError, match=r"'pyav', 'decord', 'auto'"):
        read_video_frames(video16, 4, backend="opencv")
    assert resolve_backend("auto") == ("decord" if decord_available() else "pyav")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_the_sampled_frames(video16: Path, backend: str) -> None:
    frames = read_video_frames(video16, num_frames=4, backend=backend)
    assert len(frames) == 4
    assert all(f.mode == "RGB" and f.size == (WIDTH, HEIGHT) for f in frames)
    assert [frame_index(f, 16) for f in frames] == [0, 5, 10, 15]


@pytest.mark.skipif(not decord_available(), reason="no decord")
def test_decord_matches_pyav(video16: Path) -> None:
    a = read_video_frames(video16, 8, backend="pyav")
    b = read_video_frames(video16, 8, backend="decord")
    diff = np.abs(np.stack([np.asarray(x, np.int16) for x in a]) - np.stack([np.asarray(x, np.int16) for x in b]))
    assert diff.max() <= 3, diff.max()


@pytest.mark.parametrize("suffix", [".mkv", ".avi"])
def test_other_containers(tmp_path: Path, suffix: str) -> None:
    """Matroska has no frame count in its header (so frames are counted); AVI has one."""
    path = tmp_path / f"v{suffix}"
    write_video(path, index_frames(10))
    with av.open(str(path)) as container:
        header_frames = container.streams.video[0].frames
    assert (header_frames == 0) == (suffix == ".mkv")
    frames = read_video_frames(path, num_frames=3)
    assert [frame_index(f, 10) for f in frames] == [0, 4, 9]  # rint(4.5) == 4


def _set_avi_length(path: Path, length: int) -> None:
    """Overwrite the video stream header's frame count (strh dwLength) of an AVI file."""
    data = bytearray(path.read_bytes())
    pos = data.find(b"strh")
    assert pos > 0
    struct.pack_into("<I", data, pos + 8 + 32, length)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", BACKENDS)
def test_overstated_frame_count_is_resampled(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "over.avi"
    write_video(path, index_frames(12))
    _set_avi_length(path, 40)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 40  # the header now lies
    frames = read_video_frames(path, num_frames=4, backend=backend)
    assert [frame_index(f, 12) for f in frames] == [0, 3, 7, 11]  # sampled from the real 12


def test_write_video_accepts_pil_and_is_deterministic(tmp_path: Path) -> None:
    images = [Image.fromarray(f) for f in index_frames(5)]
    write_video(tmp_path / "a.mp4", images)
    write_video(tmp_path / "b.mp4", index_frames(5))
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    assert [frame_index(f, 5) for f in read_video_frames(tmp_path / "a.mp4", 5)] == [0, 1, 2, 3, 4]


def test_write_video_rejects_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even width and height"):
        write_video(tmp_path / "odd.mp4", [np.zeros((47, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="at least one frame"):
        write_video(tmp_path / "none.mp4", [])
    with pytest.raises(ValueError, match="same size"):
        write_video(tmp_path / "mixed.mp4", [np.zeros((48, 64, 3), np.uint8), np.zeros((48, 32, 3), np.uint8)])
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match="not found") as info:
        read_video_frames(path, backend=backend)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_file(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VideoError, match="cannot read") as info:
        read_video_frames(path, backend=backend)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_short(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "short.mp4"
    write_video(path, index_frames(5))
    with pytest.raises(VideoError, match="too short: has 5 frames, needs 8") as info:
        read_video_frames(path, num_frames=8, backend=backend)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_video_stream(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "audio.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(VideoError, match="no video stream") as info:
        read_video_frames(path, backend=backend)
    assert str(path) in str(info.value)


def test_empty_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "empty.avi"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoError, match="is empty") as info:
        read_video_frames(path)
    assert str(path) in str(info.value)


def test_video_error_is_a_value_error() -> None:
    assert issubclass(VideoError, ValueError)


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def test_preprocess_shapes_and_values(video16: Path, tmp_path: Path) -> None:
    processor = build_clip_image_processor(224)
    other = tmp_path / "other.mp4"
    write_video(other, index_frames(12)[::-1])
    pixels = load_and_preprocess_videos([video16, other], processor, num_frames=8)
    assert pixels.shape == (2, 8, 3, 224, 224)
    assert pixels.dtype == torch.float32
    single = preprocess_frames(read_video_frames(video16, 8), processor)
    assert single.shape == (8, 3, 224, 224)
    assert torch.equal(single, pixels[0])
    # flat frames normalise to a flat tensor whose value is (colour/255 - mean) / std
    expected_r = (index_colour(0)[0] / 255 - processor.image_mean[0]) / processor.image_std[0]
    assert abs(pixels[0, 0, 0].mean().item() - expected_r) < 0.1
    assert not torch.allclose(pixels[0, 0], pixels[0, -1])
    with pytest.raises(VideoError, match=r"missing\.mp4"):
        load_and_preprocess_videos([video16, tmp_path / "missing.mp4"], processor)
