"""Speed benchmarks on the ``tiny`` and ``tiny-video`` shapes: they run end to end and write sane rows, a
table and a chart.

No timing is asserted: speed targets are shown by the benchmark runs, never by timed tests.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from llava.bench import infer_speed, report, train_speed, workload
from llava.bench.hf_baseline import BASELINE_LABEL, build_hf_llava, hf_image_token_id, to_hf_batch
from llava.bench.shapes import VIDEO_PRESETS, get_shape
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.model.loading import convert_hf_llava

REPO = Path(__file__).resolve().parents[1]

TRAIN_KEYS = {
    "preset", "shape", "stage", "batch_size", "avg_visual_tokens", "step_time_s", "step_time_iqr_s",
    "ratio_vs_none", "flops_ratio_vs_none", "measured_over_ideal", "optimizer_share", "compression_share",
    "peak_mem_mb", "tflops_per_s", "machine",
}  # fmt: skip
INFER_KEYS = {
    "preset", "shape", "batch_size", "avg_visual_tokens", "ttft_s", "ratio_vs_none", "prefill_speedup_vs_none",
    "flops_ratio_vs_none", "measured_over_ideal", "decode_tokens_per_s", "peak_mem_mb", "machine",
}  # fmt: skip
MACHINE_KEYS = {"device", "device_name", "torch", "transformers", "dtype", "attn_implementation", "torch_threads"}

# The tiny shape's tower has 16 patches + CLS: the real presets (k1 + k2 = 307 ...) do not fit it.
TINY_PRESET = """\
name: duet_tiny
v2v: {method: duet, dominant: 6, contextual: 2}
t2v: {boundaries: [0.5, 0.75], keep_ratios: [0.5, 0.0], query: instruction}
"""


# tiny-video: 2 frames x (16 patches + CLS) = 34 tokens per video. V2V merges each frame to 6 + 2 = 8 tokens
# (N0 = 16 per video); T2V at layer 1 of 2 keeps floor(0.5 * 16) = 8 of the video's frames jointly.
TINY_VIDEO_PRESET = """\
name: duet_tiny_video
v2v: {method: duet, dominant: 6, contextual: 2}
t2v: {boundaries: [0.5, 0.75], keep_ratios: [0.5, 0.0], query: instruction}
"""
VIDEO_FRAMES, TOKENS_PER_FRAME = 2, 17


@pytest.fixture
def tiny_preset(tmp_path: Path) -> str:
    path = tmp_path / "duet_tiny.yaml"
    path.write_text(TINY_PRESET, encoding="utf-8")
    return str(path)


@pytest.fixture
def tiny_video_preset(tmp_path: Path) -> str:
    path = tmp_path / "duet_tiny_video.yaml"
    path.write_text(TINY_VIDEO_PRESET, encoding="utf-8")
    return str(path)


def _numbers(row: dict) -> list[float]:
    return [value for key, value in row.items() if isinstance(value, float) and key != "machine"]


def _check_outputs(out: Path, rows: list[dict], keys: set[str]) -> list[dict]:
    assert out.with_suffix(".md").stat().st_size > 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.read_text())
    assert isinstance(saved, list) and len(saved) == len(rows)
    for row in saved:
        assert keys <= row.keys(), keys - row.keys()
        assert row["machine"].keys() >= MACHINE_KEYS
        assert all(math.isfinite(value) for value in _numbers(row)), row
    return saved


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_train_speed_tiny(tmp_path: Path, tiny_preset: str, stage: str) -> None:
    out = tmp_path / f"train-{stage}.json"
    rows = train_speed.main(
        ["--shape", "tiny", "--stage", stage, "--presets", f"none,{tiny_preset}", "--batch-size", "2",
         "--steps", "2", "--warmup", "1", "--device", "cpu", "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    saved = _check_outputs(out, rows, TRAIN_KEYS)
    by_preset = {row["preset"]: row for row in saved}
    assert set(by_preset) == {"none", "duet_tiny"}
    none, duet = by_preset["none"], by_preset["duet_tiny"]
    assert none["ratio_vs_none"] == 1.0 and none["flops_ratio_vs_none"] == pytest.approx(1.0)
    assert none["avg_visual_tokens"] == 16 and duet["avg_visual_tokens"] == 6  # (8 + 4) / 2: layer 2 is past the end
    assert duet["flops_ratio_vs_none"] < 1.0
    assert duet["measured_visual_tokens"] == pytest.approx(duet["avg_visual_tokens"])  # the model did compress
    assert duet["compression_share"] >= 0.0 and none["compression_share"] == 0.0
    assert 0.0 < none["optimizer_share"] < 1.0
    assert all(row["stage"] == stage and row["steps"] == 2 for row in saved)
    assert "| none |" in out.with_suffix(".md").read_text()


def test_train_speed_adds_the_baseline(tmp_path: Path, tiny_preset: str) -> None:
    out = tmp_path / "only-duet.json"
    rows = train_speed.main(
        ["--shape", "tiny", "--presets", tiny_preset, "--batch-size", "1", "--steps", "1", "--warmup", "0",
         "--no-gradient-checkpointing", "--device", "cpu", "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    assert [row["preset"] for row in rows] == ["none", "duet_tiny"]
    assert rows[0]["gradient_checkpointing"] is False


def test_hf_llava_baseline_sees_the_same_batch_as_our_model() -> None:
    # HF's model with the expanded batch and ours (converted from it) with our batch compute the same loss.
    shape = get_shape("tiny")
    torch.manual_seed(0)
    hf_model = build_hf_llava(shape, torch.float32, "sdpa", None).eval()
    ours = convert_hf_llava(hf_model).eval()
    batch = workload.build_training_batch(shape, "finetune", 3, seed=1)
    batch["input_ids"][0, -1] = hf_image_token_id(shape)  # a text token that collides with HF's image id
    hf_batch = to_hf_batch(batch, shape)
    assert hf_batch["input_ids"].shape[1] == batch["input_ids"].shape[1] + shape.vision.num_patches - 1
    assert int((hf_batch["input_ids"] == hf_image_token_id(shape)).sum()) == 3 * shape.vision.num_patches
    assert torch.equal(hf_batch["attention_mask"].sum(1), batch["attention_mask"].sum(1) + shape.vision.num_patches - 1)
    ids = batch["input_ids"]
    batch["input_ids"] = ids.masked_fill(ids == hf_image_token_id(shape), hf_image_token_id(shape) - 1)
    with torch.no_grad():
        expected = ours(**batch).loss
        got = hf_model(**hf_batch).loss
    assert got.item() == pytest.approx(expected.item(), abs=1e-5)


def test_train_speed_hf_baseline_row(tmp_path: Path) -> None:
    out = tmp_path / "hf.json"
    rows = train_speed.main(
        ["--shape", "tiny", "--presets", "none", "--batch-size", "2", "--steps", "2", "--warmup", "1",
         "--hf-baseline", "--device", "cpu", "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    saved = _check_outputs(out, rows, TRAIN_KEYS)
    assert [row["preset"] for row in saved] == ["none", BASELINE_LABEL]
    hf_row = saved[1]
    assert hf_row["steps"] == 2 and hf_row["step_time_s"] > 0 and math.isfinite(hf_row["loss"])
    assert hf_row["measured_visual_tokens"] == 16
    assert "LlavaForConditionalGeneration" in out.with_suffix(".md").read_text()


def test_infer_speed_hf_baseline_rows(tmp_path: Path) -> None:
    out = tmp_path / "hf-infer.json"
    rows = infer_speed.main(
        ["--shape", "tiny", "--presets", "none", "--batch-sizes", "1,2", "--prompt-tokens", "8", "--new-tokens", "3",
         "--repeats", "2", "--warmup", "1", "--hf-baseline", "--device", "cpu", "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    assert [(row["preset"], row["batch_size"], row["path"]) for row in rows] == [
        ("none", 1, "eager"), ("none", 1, "fast"), (BASELINE_LABEL, 1, "hf"),
        ("none", 2, "eager"), ("none", 2, "fast"), (BASELINE_LABEL, 2, "hf"),
    ]  # fmt: skip
    none_rows = [row for row in rows if row["preset"] == "none"]
    assert all(row["ratio_vs_none"] == 1.0 for row in none_rows)  # the baseline never replaces none
    assert all(row["decode_speedup_vs_eager"] == 1.0 for row in none_rows if row["path"] == "eager")
    assert all(row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0 for row in rows)


def test_hf_baseline_rejects_video_shapes() -> None:
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--shape", "tiny-video", "--hf-baseline"])
    with pytest.raises(SystemExit):
        infer_speed.parse_args(["--shape", "tiny-video", "--hf-baseline"])


def test_train_speed_rejects_presets_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="duet_192"):
        train_speed.main(["--shape", "tiny", "--presets", "none,duet_192", "--out", str(tmp_path / "x.json")])


def test_infer_speed_tiny(tmp_path: Path, tiny_preset: str) -> None:
    out = tmp_path / "infer.json"
    rows = infer_speed.main(
        ["--shape", "tiny", "--presets", f"none,{tiny_preset}", "--batch-sizes", "1,2", "--prompt-tokens", "8",
         "--new-tokens", "3", "--repeats", "2", "--warmup", "1", "--device", "cpu", "--threads", "1",
         "--out", str(out)]
    )  # fmt: skip
    saved = _check_outputs(out, rows, INFER_KEYS)
    assert [(row["preset"], row["batch_size"], row["path"]) for row in saved] == [
        ("none", 1, "eager"), ("duet_tiny", 1, "eager"), ("none", 1, "fast"), ("duet_tiny", 1, "fast"),
        ("none", 2, "eager"), ("duet_tiny", 2, "eager"), ("none", 2, "fast"), ("duet_tiny", 2, "fast"),
    ]  # fmt: skip
    assert all(row["capture_s"] == 0.0 for row in saved)  # no CUDA graph on CPU
    assert all(row["decode_speedup_vs_eager"] > 0 for row in saved)
    for row in saved:
        if row["preset"] == "none":
            assert row["ratio_vs_none"] == 1.0 and row["prefill_speedup_vs_none"] == 1.0
            assert row["flops_ratio_vs_none"] == pytest.approx(1.0)
        else:
            assert row["flops_ratio_vs_none"] < 1.0
        assert row["decode_tokens_per_s"] > 0 and row["ttft_s"] > 0


def _check_video_rows(saved: list[dict]) -> None:
    """Video rows: per-video counts are frames x tokens per frame, and the compressed preset carries fewer."""
    for row in saved:
        assert row["media"] == "video" and row["num_frames"] == VIDEO_FRAMES
        assert row["tokens_per_frame"] == TOKENS_PER_FRAME
        assert row["uncompressed_visual_tokens"] == VIDEO_FRAMES * TOKENS_PER_FRAME == 34
        if row["preset"] == "none":
            assert row["initial_visual_tokens"] == row["avg_visual_tokens"] == 34
            assert row["flops_ratio_vs_none"] == pytest.approx(1.0)
        else:
            assert row["initial_visual_tokens"] == VIDEO_FRAMES * (6 + 2)  # V2V per frame
            assert row["avg_visual_tokens"] == (16 + 8) / 2  # joint T2V: floor(0.5 * 16) from layer 1
            assert row["flops_ratio_vs_none"] < 1.0


def test_train_speed_tiny_video(tmp_path: Path, tiny_video_preset: str) -> None:
    out = tmp_path / "train-video.json"
    rows = train_speed.main(
        ["--shape", "tiny-video", "--presets", f"none,{tiny_video_preset}", "--batch-size", "2", "--steps", "1",
         "--warmup", "0", "--device", "cpu", "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    saved = _check_outputs(out, rows, TRAIN_KEYS)
    assert [row["preset"] for row in saved] == ["none", "duet_tiny_video"]
    _check_video_rows(saved)
    for row in saved:  # what the model reported in the step equals the accounting
        assert row["measured_visual_tokens"] == pytest.approx(row["avg_visual_tokens"])
    assert saved[1]["measured_visual_tokens"] < saved[0]["measured_visual_tokens"]
    markdown = out.with_suffix(".md").read_text()
    assert "one video of 2 frames per sample" in markdown and "2 frames x 17 tokens" in markdown


def test_infer_speed_tiny_video(tmp_path: Path, tiny_video_preset: str) -> None:
    out = tmp_path / "infer-video.json"
    rows = infer_speed.main(
        ["--shape", "tiny-video", "--presets", f"none,{tiny_video_preset}", "--batch-sizes", "2",
         "--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
         "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    saved = _check_outputs(out, rows, INFER_KEYS)
    assert [(row["preset"], row["path"]) for row in saved] == [
        ("none", "eager"), ("duet_tiny_video", "eager"), ("none", "fast"), ("duet_tiny_video", "fast")
    ]  # fmt: skip
    _check_video_rows(saved)
    assert all(row["decode_tokens_per_s"] > 0 and row["ttft_s"] > 0 for row in saved)
    assert "video (2 frames)" in out.with_suffix(".md").read_text()


def test_video_shapes_default_to_video_presets() -> None:
    assert train_speed.parse_args(["--shape", "small-video"]).presets == list(VIDEO_PRESETS)
    assert infer_speed.parse_args(["--shape", "video-llava-7b"]).presets == list(VIDEO_PRESETS)
    assert train_speed.parse_args([]).presets == ["none", "duet_192", "duet_128", "duet_64"]
    assert infer_speed.parse_args(["--shape", "tiny", "--presets", "none"]).presets == ["none"]


def test_image_presets_that_do_not_fit_a_video_tower_are_rejected(tmp_path: Path) -> None:
    # duet_192 keeps 307 tokens per image; a 224 px frame has only 256 patches + CLS.
    with pytest.raises(SystemExit, match="duet_192"):
        train_speed.main(["--shape", "small-video", "--presets", "none,duet_192", "--out", str(tmp_path / "x.json")])


def test_video_training_batch_and_prompts_carry_one_video_per_sample() -> None:
    shape = get_shape("tiny-video")
    size = shape.video.image_size
    for stage in ("finetune", "pretrain"):
        batch = workload.build_training_batch(shape, stage, batch_size=3, seed=1)
        assert "pixel_values" not in batch
        assert batch["pixel_values_videos"].shape == (3, VIDEO_FRAMES, 3, size, size)
        assert ((batch["input_ids"] == VIDEO_TOKEN_ID).sum(dim=1) == 1).all()
        assert not (batch["input_ids"] == IMAGE_TOKEN_ID).any()
    prompts = infer_speed.build_prompts(shape, batch_size=2, prompt_tokens=10, seed=2)
    assert prompts["pixel_values_videos"].shape == (2, VIDEO_FRAMES, 3, size, size) and "pixel_values" not in prompts
    assert ((prompts["input_ids"] == VIDEO_TOKEN_ID).sum(dim=1) == 1).all()
    moved = workload.move_batch(prompts, torch.device("cpu"), torch.bfloat16)
    assert moved["pixel_values_videos"].dtype == torch.bfloat16 and moved["input_ids"].dtype == torch.long


def test_training_batch_looks_like_the_collator() -> None:
    shape = get_shape("tiny")
    batch = workload.build_training_batch(shape, "finetune", batch_size=4, seed=1)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[1] == shape.text_tokens + 1  # sample 0 is full length: text + one image slot
    assert batch["pixel_values"].shape == (4, 3, shape.vision.image_size, shape.vision.image_size)
    assert ((ids == IMAGE_TOKEN_ID).sum(dim=1) == 1).all()
    assert (labels[0] != IGNORE_INDEX).sum() == shape.answer_tokens
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (mask[:, 0] == 1).all()  # right-padded
    supervised = labels != IGNORE_INDEX
    assert (labels[supervised] == ids[supervised]).all()

    pretrain = workload.build_training_batch(shape, "pretrain", batch_size=2)
    assert pretrain["input_ids"].shape[1] == shape.pretrain_text_tokens + 1
    assert (pretrain["input_ids"][:, 1] == IMAGE_TOKEN_ID).all()
    assert (pretrain["labels"][0] != IGNORE_INDEX).sum() == shape.pretrain_text_tokens - 1


def test_prompts_are_left_padded() -> None:
    prompts = infer_speed.build_prompts(get_shape("tiny"), batch_size=3, prompt_tokens=20, seed=2)
    mask = prompts["attention_mask"]
    assert (mask[:, -1] == 1).all() and mask[0].all()
    assert ((prompts["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1) == 1).all()
    assert mask.sum(dim=1).tolist()[0] == 21


def test_report_helpers(tmp_path: Path) -> None:
    assert report.median_iqr([3.0]) == (3.0, 0.0)
    median, iqr = report.median_iqr([1.0, 2.0, 3.0, 4.0, 5.0])
    assert median == 3.0 and iqr == 2.0
    order = [item for _, item in report.round_robin(["a", "b", "c"], 3)]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert report.preset_label("configs/x/duet_tiny.yaml") == "duet_tiny" and report.preset_label("none") == "none"
    assert report.output_paths("runs/a.json")[1:] == (Path("runs/a.md"), Path("runs/a.png"))
    table = report.markdown_table([{"a": 1.0, "b": None}], [("a", "A"), ("b", "B")])
    assert table.splitlines()[-1] == "| 1.000 | - |"
    assert report.is_noisy(1.0, 0.5) and not report.is_noisy(1.0, 0.1)
    rows = [{"preset": "none", "noisy": True, "machine": {}}, {"preset": "duet_64", "noisy": False}]
    assert "none" in report.noise_note(rows, "step-time")[0] and not report.noise_note(rows[1:], "x")
    with report.torch_threads(1):
        assert torch.get_num_threads() == 1
    report.write_json([{"x": float("nan")}], tmp_path / "nan.json")
    assert json.loads((tmp_path / "nan.json").read_text()) == [{"x": None}]


@pytest.mark.parametrize(("script", "module"), [("train_speed.sh", "train_speed"), ("infer_speed.sh", "infer_speed")])
def test_scripts_defaults_and_overrides(tmp_path: Path, script: str, module: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\nexit 9\n")  # a host without a GPU
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1"}
    for key in ("SHAPE", "STAGE", "PRESETS", "BATCH_SIZE", "BATCH_SIZES", "STEPS", "OUT"):
        env.pop(key, None)

    def argv(**extra: str) -> list[str]:
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / "bench" / script), "--seed", "3"],
            env={**env, **extra}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return shlex.split(done.stdout.strip().splitlines()[-1])

    default = argv()
    assert default[1:3] == ["-m", f"llava.bench.{module}"]
    assert default[default.index("--shape") + 1] == "small"
    assert default[-2:] == ["--seed", "3"]
    out = default[default.index("--out") + 1]
    assert out == ("runs/bench/small-finetune.json" if module == "train_speed" else "runs/bench/small-infer.json")
    custom = argv(SHAPE="tiny", STAGE="pretrain", PRESETS="none,duet_64", BATCH_SIZE="2", STEPS="7", OUT="x.json")
    assert custom[custom.index("--shape") + 1] == "tiny"
    assert custom[custom.index("--presets") + 1] == "none,duet_64"
    assert custom[custom.index("--out") + 1] == "x.json"
    if module == "train_speed":
        assert custom[custom.index("--stage") + 1] == "pretrain"
        assert custom[custom.index("--batch-size") + 1] == "2"
        assert custom[custom.index("--steps") + 1] == "7"
    else:
        assert custom[custom.index("--batch-sizes") + 1] == "2"
        assert custom[custom.index("--repeats") + 1] == "7"
    assert default[default.index("--presets") + 1] == "none,duet_192,duet_128,duet_64"
    video = argv(SHAPE="small-video")
    assert video[video.index("--shape") + 1] == "small-video"
    assert video[video.index("--presets") + 1] == ",".join(VIDEO_PRESETS)
    if module == "train_speed":
        assert video[video.index("--batch-size") + 1] == "2"
        assert video[video.index("--out") + 1] == "runs/bench/small-video-finetune.json"
    else:
        assert video[video.index("--batch-sizes") + 1] == "1,4"
        assert video[video.index("--out") + 1] == "runs/bench/small-video-infer.json"


def test_train_speed_ragged_padded_and_packed_on_the_same_samples(tmp_path: Path, tiny_preset: str) -> None:
    out = tmp_path / "ragged.json"
    rows = train_speed.main(
        ["--shape", "tiny", "--presets", f"none,{tiny_preset}", "--length-mix", "llava665k", "--packing", "both",
         "--batch-size", "4", "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    by_preset = {row["preset"]: row for row in _check_outputs(out, rows, TRAIN_KEYS)}
    assert set(by_preset) == {"none", "none packed", "duet_tiny", "duet_tiny packed"}
    for name in ("none", "duet_tiny"):
        padded, packed = by_preset[name], by_preset[f"{name} packed"]
        assert padded["packed"] is False and packed["packed"] is True and packed["padding_fraction"] == 0.0
        assert 0.0 < padded["padding_fraction"] < 1.0  # a ragged batch pads
        assert packed["flops_ratio_vs_none"] == pytest.approx(padded["flops_ratio_vs_none"])
        assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-3)  # the same samples, the same loss
    assert by_preset["duet_tiny"]["padding_fraction"] > by_preset["none"]["padding_fraction"]  # compression pads more
    assert by_preset["duet_tiny"]["flops_ratio_vs_none"] < 1.0
    assert all(row["length_mix"] == "llava665k" and row["tokens_per_s"] > 0 for row in rows)
    assert "| none packed |" in out.with_suffix(".md").read_text()


def test_train_speed_length_mix_needs_finetune() -> None:
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--shape", "tiny", "--stage", "pretrain", "--length-mix", "llava665k"])
