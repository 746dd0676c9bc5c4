"""Compression presets in real training runs (in-process) and batched generation from the checkpoint."""

from __future__ import annotations

import json

import pytest

from llava.inference import LlavaPipeline
from llava.model.loading import load_pretrained_model
from llava.training.train import train
from tests.run_args import finetune_args, pretrain_args
from tests.test_training import read_metrics


def test_pretrain_with_duet_192_logs_the_token_schedule(playground, tmp_path):
    out = tmp_path / "pretrain-duet"
    train(pretrain_args(playground, out, "--compression", "duet_192", "--max_steps", "2", "--save_steps", "100"))
    rows = read_metrics(out)
    for row in rows.values():
        assert row["loss"] == pytest.approx(row["loss"])  # not NaN: plain template uses the fallback query
        # 4-layer playground LLM: layers 0-1 see N0 = 300 + 7, layer 2 sees 153, layer 3 none.
        assert row["visual_tokens_stage0"] == 307
        assert row["visual_tokens_stage1"] == 153
        assert row["visual_tokens_stage2"] == 0
        assert row["visual_tokens_avg"] == pytest.approx(191.75)
        assert row["compression_time_s"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["compression"]["name"] == "duet_192"
    assert config["compression"]["v2v"]["dominant"] == 300
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["compression"] == "duet_192"


def test_finetune_with_duet_64_then_batched_generation(playground, tmp_path):
    out = tmp_path / "finetune-duet64"
    train(finetune_args(playground, out, "--compression", "duet_64", "--max_steps", "2", "--save_steps", "100"))
    with_images = [row for row in read_metrics(out).values() if "visual_tokens_stage0" in row]
    assert with_images, "no logged step had an image batch"
    assert all(row["visual_tokens_stage0"] == 102 for row in with_images)
    model = load_pretrained_model(out)
    assert model.config.compression["name"] == "duet_64"
    assert model.stage_plan.boundaries == (2, 3)
    pipeline = LlavaPipeline.from_pretrained(out)
    requests = [
        {"image": str(playground / "images" / f"demo_00{i}.png"), "prompt": "What color is the shape?"}
        for i in range(5)
    ] + [{"image": None, "prompt": "What is two plus two?"}]
    one_by_one = pipeline.generate(requests, max_new_tokens=6, batch_size=1)
    batched = pipeline.generate(requests, max_new_tokens=6, batch_size=6)
    assert batched == one_by_one
    # The fast path (static per-stage caches; the CUDA-graph step runs eagerly on CPU) answers the same,
    # and reuses its buffers across batches of the same shape.
    fast = LlavaPipeline.from_pretrained(out, fast_decoding=True)
    assert fast.generate(requests, max_new_tokens=6, batch_size=3) == batched
    assert len(fast.fast_decoder().runners()) == 1
    assert pipeline.fast_decoder() is None  # CPU default: the eager reference loop
    uncompressed = LlavaPipeline.from_pretrained(out, compression="none")
    assert uncompressed.model.stage_plan is None and uncompressed.model.vision_tower.merger is None


def test_finetune_with_dymu_and_t2v_then_batched_generation(playground, tmp_path):
    """Dynamic merging in the tower (thresholds calibrated on the playground) plus T2V, in training: the
    checkpoint stores the thresholds themselves, and generation batches images of different token counts."""
    from llava.tools import calibrate_dymu

    thresholds = tmp_path / "dymu.json"
    calibrate_dymu.main(
        ["--vision_tower", str(playground / "vision_tower"), "--data_path", str(playground / "finetune.json"),
         "--image_folder", str(playground / "images"), "--target", "300", "--out", str(thresholds), "--no_progress"]
    )  # fmt: skip
    preset = tmp_path / "dymu_t2v.yaml"
    preset.write_text(
        f"name: dymu_t2v\ndymu: {{thresholds_file: {thresholds}}}\n"
        "t2v: {boundaries: [0.5], keep_ratios: [0.5], query: instruction}\n"
    )
    out = tmp_path / "finetune-dymu"
    train(finetune_args(playground, out, "--compression", str(preset), "--max_steps", "2", "--save_steps", "100"))
    with_images = [row for row in read_metrics(out).values() if "visual_tokens_stage0" in row]
    assert with_images and all(200 < row["visual_tokens_stage0"] < 400 for row in with_images)
    config = json.loads((out / "config.json").read_text())
    assert config["compression"]["dymu"]["thresholds"] == json.loads(thresholds.read_text())["thresholds"]
    thresholds.unlink()  # the checkpoint needs no file
    pipeline = LlavaPipeline.from_pretrained(out)
    requests = [
        {"image": str(playground / "images" / f"demo_00{i}.png"), "prompt": "What color is the shape?"}
        for i in range(4)
    ] + [{"image": None, "prompt": "What is two plus two?"}]
    assert pipeline.generate(requests, max_new_tokens=5, batch_size=5) == pipeline.generate(
        requests, max_new_tokens=5, batch_size=1
    )


@pytest.mark.parametrize("preset", ["divprune_64", "vispruner_64", "cdpruner_64"])
def test_finetune_with_the_newer_selectors_then_batched_generation(playground, tmp_path, preset):
    """DivPrune and VisPruner (V2V) and CDPruner (a DPP at the LLM input) train like DUET: every logged image step
    shows 64 visual tokens in every layer, and the checkpoint answers batched as one by one."""
    out = tmp_path / preset
    train(finetune_args(playground, out, "--compression", preset, "--max_steps", "2", "--save_steps", "100"))
    with_images = [row for row in read_metrics(out).values() if "visual_tokens_stage0" in row]
    assert with_images and all(row["visual_tokens_avg"] == pytest.approx(64) for row in with_images)
    assert all(row["loss"] == pytest.approx(row["loss"]) for row in with_images)  # not NaN
    pipeline = LlavaPipeline.from_pretrained(out)
    assert pipeline.model.config.compression["name"] == preset
    requests = [
        {"image": str(playground / "images" / f"demo_00{i}.png"), "prompt": "What color is the shape?"}
        for i in range(3)
    ] + [{"image": None, "prompt": "What is two plus two?"}]
    assert pipeline.generate(requests, max_new_tokens=5, batch_size=4) == pipeline.generate(
        requests, max_new_tokens=5, batch_size=1
    )
