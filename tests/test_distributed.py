"""The real launch path: the shell scripts start 2 DeepSpeed CPU ranks (ZeRO-2 and ZeRO-3).

Includes the preemption test: a ZeRO-3 run is SIGKILLed part-way, resumed with
``RESUME=auto``, and its per-step losses after the resume equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from llava.inference import LlavaPipeline, load_pipeline
from llava.model.loading import load_pretrained_model

REPO = Path(__file__).resolve().parents[1]
STEP_LIMIT_S = 420


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_env(playground: Path, output_dir: Path, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(
        DS_ACCELERATOR="cpu",
        NUM_GPUS="2",
        MASTER_PORT=str(free_port()),
        MODEL=str(playground / "llm"),
        VISION_TOWER=str(playground / "vision_tower"),
        IMAGE_FOLDER=str(playground / "images"),
        OUTPUT_DIR=str(output_dir),
        BATCH_SIZE="2",
        GRAD_ACCUM="1",
        NUM_WORKERS="1",
        REPORT_TO="none",
        OMP_NUM_THREADS="1",
    )
    env.update(overrides)  # every launch asks llava.families.names for MODEL's family, as a user's does
    return env


def run_script_to_exit(
    script: str, env: dict[str, str], *args: str, folder: str = "v1_5"
) -> subprocess.CompletedProcess:
    """Run a launch script to its exit, whatever its exit code; on timeout kill its whole process group (the
    DeepSpeed ranks too), so a hung run cannot outlive the test and hold CPU or ports."""
    command = ["bash", str(REPO / "scripts" / folder / script), *args]
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=STEP_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{script} did not finish in {STEP_LIMIT_S} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_script(script: str, env: dict[str, str], *args: str, folder: str = "v1_5") -> subprocess.CompletedProcess:
    """:func:`run_script_to_exit`, which must succeed and leave no shared-memory buffers behind."""
    result = run_script_to_exit(script, env, *args, folder=folder)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    port = env.get("MASTER_PORT")
    if port and Path("/dev/shm").is_dir():  # every rank removed its DeepSpeed shared-memory buffer at exit
        assert not list(Path("/dev/shm").glob(f"deepspeed_*_{port}_*")), f"{script} left /dev/shm buffers"
    return result


def losses(output_dir: Path) -> dict[int, float]:
    """Per-step loss; a step logged twice (before and after a resume) keeps its last value."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def finetune_env(playground: Path, output_dir: Path, **overrides: str) -> dict[str, str]:
    settings = {
        "DATA_PATH": str(playground / "finetune.json"),
        "PRETRAINED_PROJECTOR": "none",
        "SAVE_STEPS": "2",
        "SAVE_TOTAL_LIMIT": "2",
        **overrides,
    }
    return script_env(playground, output_dir, **settings)


def test_two_rank_pretrain_zero2_then_finetune_zero3_with_projector_and_compression(playground, tmp_path):
    """DUET compression through the real scripts: duet_192 pretraining (ZeRO-2), duet_64 finetuning
    (ZeRO-3, whose T2V scoring calls partitioned modules), then batched compressed generation."""
    pretrain_dir = tmp_path / "pretrain"
    env = script_env(
        playground, pretrain_dir, DATA_PATH=str(playground / "pretrain.json"), SAVE_STEPS="2", SAVE_TOTAL_LIMIT="2",
        COMPRESSION="duet_192",
    )  # fmt: skip
    run_script("pretrain.sh", env, "--max_steps", "3")
    assert (pretrain_dir / "mm_projector.safetensors").exists()
    assert (pretrain_dir / "checkpoint-2" / "checkpoint_complete.json").exists()
    assert sorted(losses(pretrain_dir)) == [1, 2, 3]
    # Both ranks took part: 2 ranks x 2 samples per step.
    rows = [json.loads(line) for line in (pretrain_dir / "metrics.jsonl").read_text().splitlines()]
    last_step = [row for row in rows if "loss" in row][-1]
    assert last_step["samples_per_s"] * last_step["step_time_s"] == pytest.approx(4, rel=0.05)
    assert last_step["visual_tokens_avg"] == pytest.approx(191.75)

    finetune_dir = tmp_path / "finetune"
    env = finetune_env(
        playground, finetune_dir, PRETRAINED_PROJECTOR=str(pretrain_dir / "mm_projector.safetensors"),
        SAVE_STEPS="100", COMPRESSION="duet_64",
    )  # fmt: skip
    result = run_script("finetune.sh", env, "--max_steps", "2")
    assert "Loaded pretrained projector" in result.stderr + result.stdout
    rows = [json.loads(line) for line in (finetune_dir / "metrics.jsonl").read_text().splitlines()]
    assert {row["visual_tokens_stage0"] for row in rows if "visual_tokens_stage0" in row} == {102}
    model = load_pretrained_model(finetune_dir).eval()
    assert model.config.template == "v1" and model.config.compression["name"] == "duet_64"
    pipeline = LlavaPipeline.from_pretrained(finetune_dir)
    requests = [{"image": str(playground / "images" / f"demo_00{i}.png"), "prompt": "Which shape?"} for i in range(3)]
    assert pipeline.generate(requests, batch_size=3, max_new_tokens=4) == pipeline.generate(
        requests, batch_size=1, max_new_tokens=4
    )


@pytest.mark.parametrize("zero", ["zero2.json", "zero3.json"])
def test_rank_with_text_only_batch_while_the_other_has_an_image(bf16_text_only_runs, zero):
    """2 samples, 2 ranks, batch 1: at every step one rank is text-only. Collectives must still match. (The runs
    are conftest's ``bf16_text_only_runs``: bf16 from a HF-port checkpoint, shared with tests/test_precision.py.)"""
    out, _ = bf16_text_only_runs[zero.removesuffix(".json")]
    assert sorted(losses(out)) == [1, 2]


@pytest.fixture(scope="module")
def zero3_llava_checkpoint_run(playground, tmp_path_factory):
    """One ZeRO-3 finetune through the scripts (2 ranks, 2 steps, learning rate 0) from a full LLaVA checkpoint with
    a new projector file, DyMU + T2V compression and padding-free (packed) batches; shared by the projector-loading
    and the DyMU tests below (one launch, not two). Returns (output dir, launch output, the projector's weights)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    from llava.hf_adapter import load_image_processor
    from llava.model.modeling import DuetLlavaForCausalLM

    tmp_path = tmp_path_factory.mktemp("zero3_llava_checkpoint")
    checkpoint = tmp_path / "llava-checkpoint"
    model = DuetLlavaForCausalLM.from_components(
        AutoModelForCausalLM.from_pretrained(playground / "llm"),
        CLIPVisionModel.from_pretrained(playground / "vision_tower"),
    )
    model.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(playground / "llm").save_pretrained(checkpoint)
    load_image_processor(playground / "vision_tower").save_pretrained(checkpoint)
    projector_file = tmp_path / "mm_projector.safetensors"
    generator = torch.Generator().manual_seed(3)
    new_weights = {
        name: 0.05 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in model.projector.state_dict().items()
    }
    save_file(new_weights, str(projector_file))
    preset = tmp_path / "dymu_t2v.yaml"
    preset.write_text(
        "name: dymu_t2v\ndymu: {thresholds: [0.95, 0.5]}\n"
        "t2v: {boundaries: [0.5], keep_ratios: [0.5], query: instruction}\n"
    )

    out = tmp_path / "from-checkpoint"
    env = finetune_env(
        playground, out, MODEL=str(checkpoint), PRETRAINED_PROJECTOR=str(projector_file), SAVE_STEPS="100",
        ZERO=str(REPO / "scripts" / "zero3.json"), COMPRESSION=str(preset), PACKING="1",
    )  # fmt: skip
    result = run_script("finetune.sh", env, "--max_steps", "2", "--learning_rate", "0")
    return out, result.stdout + result.stderr, new_weights


def test_zero3_loads_projector_into_a_partitioned_llava_checkpoint(zero3_llava_checkpoint_run):
    """Starting from a full LLaVA checkpoint, ZeRO-3 partitions the projector as it loads; the new
    projector weights must still land in it (LLaVA's size-mismatch bug). With lr 0 the saved
    projector after training equals the file exactly."""
    from safetensors.torch import load_file

    out, output, new_weights = zero3_llava_checkpoint_run
    assert "(ZeRO-3 partitioned)" in output
    saved = load_file(str(out / "mm_projector.safetensors"))
    for name, tensor in new_weights.items():
        assert (saved[name] - tensor).abs().max().item() == 0, name


def test_two_rank_video_scripts_pretrain_then_finetune_zero3_with_duet_and_generate(playground, tmp_path):
    """Video-LLaVA through scripts/video: ZeRO-2 pretrain with duet_video_53, then a ZeRO-3 finetune on the
    mixed video/image/text set with duet_video_93 (ranks see different modalities), then video answers."""
    video = dict(
        VISION_TOWER=str(playground / "video_tower"),
        VIDEO_FOLDER=str(playground / "videos"),
        NUM_FRAMES="8",
        SAVE_STEPS="100",
    )
    pretrain_dir = tmp_path / "video-pretrain"
    env = script_env(
        playground,
        pretrain_dir,
        DATA_PATH=str(playground / "video_pretrain.json"),
        COMPRESSION="duet_video_53",
        **video,
    )
    run_script("pretrain.sh", env, "--max_steps", "2", folder="video")
    assert (pretrain_dir / "mm_projector.safetensors").is_file()
    pretrain_rows = [json.loads(line) for line in (pretrain_dir / "metrics.jsonl").read_text().splitlines()]
    # duet_video_53 on a 4-layer LLM: every video enters with 8 x 192 tokens (V2V per frame).
    assert any(row.get("visual_tokens_stage0") == 8 * 192 for row in pretrain_rows), pretrain_rows[:3]

    finetune_dir = tmp_path / "video-finetune"
    env = script_env(
        playground,
        finetune_dir,
        DATA_PATH=str(playground / "video_finetune.json"),
        PRETRAINED_PROJECTOR=str(pretrain_dir / "mm_projector.safetensors"),
        ZERO=str(REPO / "scripts" / "zero3.json"),
        COMPRESSION="duet_video_93",
        **video,
    )
    run_script("finetune.sh", env, "--max_steps", "2", "--group_by_modality_length", "False", folder="video")
    model = load_pretrained_model(finetune_dir)
    assert model.video_tower is not None and model.config.compression["name"] == "duet_video_93"
    assert (finetune_dir / "video_processor" / "preprocessor_config.json").is_file()

    pipeline = LlavaPipeline.from_pretrained(finetune_dir, device="cpu")
    requests = [json.loads(line) for line in (playground / "video_demo_requests.jsonl").read_text().splitlines()][:3]
    for request in requests:
        request["video"] = str(playground / "videos" / request["video"])
    answers = pipeline.generate(requests, max_new_tokens=4, batch_size=3)
    assert len(answers) == 3 and all(isinstance(answer, str) for answer in answers)


def test_zero3_finetune_with_dymu_and_t2v_through_the_scripts(zero3_llava_checkpoint_run):
    """DyMU's tower merging (the CLIP blocks driven submodule by submodule, partitioned by ZeRO-3) and
    T2V in a 2-rank finetune with padding-free (packed) batches; ranks see different token counts per image.
    (The run is ``zero3_llava_checkpoint_run``, shared with the projector-loading test.)"""
    out, output, _ = zero3_llava_checkpoint_run
    assert "Padding-free batches (--packing)" in output  # and packed == padded in test_packing
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = [row["visual_tokens_stage0"] for row in rows if "visual_tokens_stage0" in row]
    assert counts and all(0 < count < 576 for count in counts)
    assert sorted(losses(out)) == [1, 2]
    model = load_pretrained_model(out)
    assert model.config.compression["dymu"]["thresholds"] == [0.95, 0.5]


def qwen_env(qwen_checkpoint: Path, data: Path, output_dir: Path, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(
        DS_ACCELERATOR="cpu", NUM_GPUS="2", MASTER_PORT=str(free_port()), MODEL=str(qwen_checkpoint),
        IMAGE_FOLDER=str(qwen_checkpoint), DATA_PATH=str(data), OUTPUT_DIR=str(output_dir), BATCH_SIZE="1",
        GRAD_ACCUM="1", NUM_WORKERS="1", REPORT_TO="none", OMP_NUM_THREADS="1", SAVE_STEPS="100", **overrides,
    )  # fmt: skip
    return env


def test_qwen_finetune_and_lora_through_the_scripts_with_zero3_duet_and_a_text_only_rank(qwen_checkpoint, tmp_path):
    """Qwen2.5-VL through the same scripts (MODEL= a Qwen2.5-VL checkpoint): 2 ZeRO-3 ranks, DUET's V2V + T2V,
    batch 1 of [text-only, image + video] so one rank has no visual input at every step (its collectives must
    still match the other's), then LoRA on ZeRO-3 and a merge; every result loads as a Qwen2.5-VL checkpoint."""
    from safetensors.torch import load_file

    from llava.model.qwen_vl import DuetQwenVL
    from llava.training.lora import merge_lora_checkpoint

    question = {"from": "human", "value": "<video>\n<image>\nwhat colour is the shape"}
    samples = [
        {"id": "text", "conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hello"}]},
        {"id": "visual", "image": "image_0.png", "video": "clip.mp4",
         "conversations": [question, {"from": "gpt", "value": "a red square"}]},
    ]  # fmt: skip
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(samples))
    full = tmp_path / "full"
    videos = {"VIDEO_FOLDER": str(qwen_checkpoint), "NUM_FRAMES": "4"}
    lora = tmp_path / "lora"
    full_env = qwen_env(qwen_checkpoint, data, full, COMPRESSION="qwen_duet_53", **videos)
    lora_env = qwen_env(qwen_checkpoint, data, lora, COMPRESSION="qwen_duet_67", LORA_R="4", LORA_ALPHA="8", **videos)
    steps = ("--max_steps", "2", "--group_by_modality_length", "False")
    # The two launches are independent (own port, own folder): side by side, one's single-process phases
    # (launcher start, family lookup, exit) overlap the other's ranks.
    with ThreadPoolExecutor(2) as pool:
        full_run = pool.submit(run_script, "finetune.sh", full_env, *steps)
        lora_run = pool.submit(run_script, "finetune_lora.sh", lora_env, *steps)
        result = full_run.result()
        lora_run.result()
    assert "the checkpoint's own merger (projector) is finetuned" in result.stderr
    assert json.loads((full / "run_config.json").read_text())["version"] == "chat_template"
    assert sorted(losses(full)) == [1, 2]
    original, trained = load_file(qwen_checkpoint / "model.safetensors"), load_file(full / "model.safetensors")
    assert sorted(trained) == sorted(original)
    assert not torch.equal(original["lm_head.weight"], trained["lm_head.weight"])
    assert torch.equal(original["visual.blocks.0.attn.qkv.weight"], trained["visual.blocks.0.attn.qkv.weight"])
    pipeline = load_pipeline(full, compression="qwen_duet_53")
    requests = [
        {"image": str(qwen_checkpoint / f"image_{i}.png"), "prompt": "what colour is the shape"} for i in range(3)
    ]
    assert pipeline.generate(requests, batch_size=3, max_new_tokens=4) == pipeline.generate(
        requests, batch_size=1, max_new_tokens=4
    )

    merged = merge_lora_checkpoint(lora, tmp_path / "merged")
    assert isinstance(load_pipeline(merged).model, DuetQwenVL)
