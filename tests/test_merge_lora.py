"""Merging LoRA checkpoints (intermediate ones included, LLaVA #922) on a tiny playground run."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llava.inference import LlavaPipeline
from llava.model.loading import load_pretrained_model
from llava.model.modeling import DuetLlavaForCausalLM
from llava.playground.builder import build_playground
from llava.tools import merge_lora as merge_cli
from llava.training.lora import LoraCheckpointError, load_lora_model, merge_lora_checkpoint
from llava.training.train import train
from tests.run_args import finetune_args


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pg_lora") / "playground"
    build_playground(out, num_pretrain=2, num_finetune=12, seed=0)
    return out


@pytest.fixture(scope="module")
def lora_run(playground: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 2-step LoRA run saving checkpoint-1 (intermediate) and checkpoint-2; high LR so the adapter matters."""
    out = tmp_path_factory.mktemp("run") / "lora"
    train(
        finetune_args(
            playground, out, "--per_device_train_batch_size", "2", "--max_steps", "2", "--save_steps", "1",
            "--learning_rate", "1e-2", "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
            "--group_by_modality_length", "False",
        )
    )  # fmt: skip
    yield out


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.tensor([[1, 25, 40, -200, 7, 8, 9, 30], [0, 0, 1, 12, -200, 13, 14, 15]])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([[1] * 8, [0, 0] + [1] * 6]),
        "pixel_values": torch.randn(2, 3, 336, 336, generator=generator),
    }


def test_merge_intermediate_checkpoint_matches_peft_model(lora_run: Path, tmp_path: Path) -> None:
    checkpoint = lora_run / "checkpoint-1"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "config.json").exists()
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as adapter:
        lora_b = [adapter.get_tensor(key) for key in adapter.keys() if "lora_B" in key]  # noqa: SIM118
    assert lora_b and max(float(t.abs().max()) for t in lora_b) > 0  # the adapter is not a no-op

    out = tmp_path / "merged"
    assert merge_cli.main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0

    peft_model, _, _, video_processor = load_lora_model(checkpoint)
    assert video_processor is None  # an image-only run
    merged = load_pretrained_model(out)
    assert isinstance(merged, DuetLlavaForCausalLM)
    merged.eval()
    with torch.no_grad():
        expected = peft_model(**_inputs()).logits
        got = merged(**_inputs()).logits
        with peft_model.disable_adapter():
            without_lora = peft_model(**_inputs()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (without_lora - expected).abs().max() > 1e-3


def test_merged_dir_is_a_plain_checkpoint(lora_run: Path, tmp_path: Path) -> None:
    out = merge_lora_checkpoint(lora_run / "checkpoint-1", tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "duet_llava" and config["template"] == "v1"
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    assert not (out / "adapter_config.json").exists()
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        assert (out / name).is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        leftovers = ("lora_", "base_layer", "modules_to_save")
        assert not [key for key in weights.keys() if any(part in key for part in leftovers)]  # noqa: SIM118
    pipeline = LlavaPipeline.from_pretrained(out, device="cpu")
    (answer,) = pipeline.generate([{"image": None, "prompt": "Hi"}], max_new_tokens=3)
    assert isinstance(answer, str)


def test_final_and_intermediate_checkpoints_differ(lora_run: Path, tmp_path: Path) -> None:
    first = load_pretrained_model(merge_lora_checkpoint(lora_run / "checkpoint-1", tmp_path / "one")).eval()
    final = load_pretrained_model(merge_lora_checkpoint(lora_run, tmp_path / "final")).eval()
    with torch.no_grad():
        assert (first(**_inputs()).logits - final(**_inputs()).logits).abs().max() > 1e-4


def test_moved_checkpoint_needs_explicit_run_config(lora_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "checkpoint-1"
    shutil.copytree(lora_run / "checkpoint-1", moved)
    with pytest.raises(LoraCheckpointError, match=r"run_config\.json"):
        merge_lora_checkpoint(moved, tmp_path / "merged")
    out = merge_lora_checkpoint(moved, tmp_path / "merged", run_config_path=lora_run / "run_config.json")
    assert (out / "config.json").is_file()


def test_non_lora_dir_is_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert merge_cli.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_bf16_merge_keeps_rope_in_fp32_and_saves_bf16_weights(lora_run: Path, tmp_path: Path) -> None:
    """A bf16 run's merge rebuilds its base in bf16: weights in bf16, the RoPE frequencies still float32 (a
    blanket cast would round them), and the saved checkpoint loads back the same way."""
    run_config = json.loads((lora_run / "run_config.json").read_text())
    run_config["bf16"] = True
    config_path = tmp_path / "run_config.json"
    config_path.write_text(json.dumps(run_config))
    model, *_ = load_lora_model(lora_run / "checkpoint-2", run_config_path=config_path)
    merged = model.merge_and_unload()
    rope = {name: buffer.dtype for name, buffer in merged.named_buffers() if name.endswith("inv_freq")}
    assert rope and set(rope.values()) == {torch.float32}
    assert merged.projector[0].weight.dtype == torch.bfloat16
    out = merge_lora_checkpoint(lora_run / "checkpoint-2", tmp_path / "merged", run_config_path=config_path)
    loaded = load_pretrained_model(out, dtype=torch.bfloat16)
    assert {buffer.dtype for name, buffer in loaded.named_buffers() if name.endswith("inv_freq")} == {torch.float32}
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("projector.0.weight").dtype == torch.bfloat16
