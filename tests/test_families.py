"""The model-family registry: which family a checkpoint, a Hub id or a model belongs to, and what each decides."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from llava.arguments import DataArguments
from llava.families import names
from llava.families.llava import LLAVA_MODEL_TYPES, LlavaFamily, LlavaPipeline
from llava.families.qwen import QwenVLFamily
from llava.families.registry import FAMILIES, family_for, family_named, family_of_model, main
from llava.inference import load_pipeline
from llava.model.config import DuetLlavaConfig
from llava.model.llava_next import ANYRES_MODEL_TYPES, LLAVA_NEXT_MODEL_TYPES, LLAVA_ONEVISION_MODEL_TYPES
from llava.model.qwen_vl import QWEN_MODEL_TYPES, DuetQwenVL

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def llava_dir(tiny_model, tmp_path: Path) -> Path:
    tiny_model.save_pretrained(tmp_path / "llava")
    return tmp_path / "llava"


@pytest.fixture(autouse=True)
def no_family_override(monkeypatch) -> None:
    monkeypatch.delenv("MODEL_FAMILY", raising=False)


def test_family_follows_the_checkpoint(llava_dir: Path, qwen_checkpoint: Path) -> None:
    assert isinstance(family_for(llava_dir), LlavaFamily)
    assert isinstance(family_for(qwen_checkpoint), QwenVLFamily)


def test_a_plain_language_model_and_a_folder_without_config_are_llava(tmp_path: Path) -> None:
    language_model = tmp_path / "llm"
    language_model.mkdir()
    (language_model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapter_only = tmp_path / "adapter"
    adapter_only.mkdir()
    assert family_for(language_model).name == "llava"
    assert family_for(adapter_only).name == "llava"


def test_override_by_argument_and_environment(llava_dir: Path, monkeypatch) -> None:
    assert family_for(llava_dir, family="qwen2_5_vl").name == "qwen2_5_vl"
    monkeypatch.setenv("MODEL_FAMILY", "qwen2_5_vl")
    assert family_for(llava_dir).name == "qwen2_5_vl"
    monkeypatch.setenv("MODEL_FAMILY", "gpt")
    with pytest.raises(ValueError, match="unknown model family 'gpt'; known: llava, qwen2_5_vl"):
        family_for(llava_dir)


def test_offline_a_hub_id_is_named_by_its_name() -> None:
    assert family_for("Qwen/Qwen2.5-VL-7B-Instruct", offline=True).name == "qwen2_5_vl"
    assert family_for("lmsys/vicuna-7b-v1.5", offline=True).name == "llava"


def test_a_config_without_model_type_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config\.json has no 'model_type'"):
        family_for(tmp_path)


def test_cli_prints_the_family(qwen_checkpoint: Path, capsys) -> None:
    assert main([str(qwen_checkpoint)]) == 0
    assert capsys.readouterr().out.strip() == "qwen2_5_vl"


def test_family_of_a_model(tiny_model) -> None:
    assert family_of_model(tiny_model).name == "llava"
    with pytest.raises(TypeError, match="Linear belongs to no model family"):
        family_of_model(nn.Linear(2, 2))


def test_every_family_names_its_model_class_and_modules() -> None:
    names = [family.name for family in FAMILIES]
    assert len(set(names)) == len(names)
    for family in FAMILIES:
        assert family_named(family.name) is family
        assert issubclass(family.model_class, nn.Module)
        assert family.modules and all(module.startswith("llava.") for module in family.modules)


def test_load_pipeline_picks_the_family_and_the_llava_pipeline_refuses_others(qwen_checkpoint: Path) -> None:
    assert isinstance(load_pipeline(qwen_checkpoint, device="cpu").model, DuetQwenVL)
    with pytest.raises(ValueError, match="'qwen2_5_vl' checkpoint, not a LLaVA one: load it with"):
        LlavaPipeline.from_pretrained(qwen_checkpoint, device="cpu")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_pipeline(qwen_checkpoint / "missing")


def test_data_arguments_are_a_new_object(tiny_model) -> None:
    data_args = DataArguments(data_path="x.json")
    filled = LlavaFamily().data_arguments(data_args, tiny_model)
    assert filled is not data_args and data_args == DataArguments(data_path="x.json")
    assert filled.tokens_per_image == tiny_model.config.llm_tokens_per_image
    assert dataclasses.replace(filled, tokens_per_image=data_args.tokens_per_image) == data_args


def test_visual_tokens_a_batch_adds(tiny_model) -> None:
    config = tiny_model.config
    batch = {"input_ids": torch.zeros(2, 5), "pixel_values": torch.zeros(3, 3, 56, 56)}
    assert LlavaFamily().visual_tokens_added(batch, config) == 3 * (config.tokens_per_image - 1)
    qwen_batch = {**batch, "image_grid_thw": torch.ones(3, 3, dtype=torch.long)}
    assert QwenVLFamily().visual_tokens_added(qwen_batch, config) == 0


def test_random_models_of_both_families() -> None:
    from tests.conftest import tiny_qwen_config, tiny_text_config, tiny_vision_config

    llava = family_named("llava").random_model(
        {"vision_config": tiny_vision_config(), "text_config": tiny_text_config()}, torch.bfloat16, None, "sdpa"
    )
    assert next(llava.parameters()).dtype == torch.bfloat16
    assert llava.language_model.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE stays float32
    qwen = family_named("qwen2_5_vl").random_model(tiny_qwen_config().to_dict(), torch.float32, None, "sdpa")
    assert isinstance(qwen, DuetQwenVL)


def test_the_names_module_imports_neither_torch_nor_transformers() -> None:
    check = "import sys, llava.families.names; assert not {'torch', 'transformers', 'peft'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", check], cwd=REPOSITORY, check=True)


def test_the_families_take_their_names_from_the_table() -> None:
    assert [family.name for family in FAMILIES] == [entry.name for entry in names.FAMILY_NAMES]
    for family, entry in zip(FAMILIES, names.FAMILY_NAMES, strict=True):
        assert (family.model_types, family.hub_names) == (entry.model_types, entry.hub_names)
    assert DuetLlavaConfig.model_type in names.LLAVA_NAMES.model_types
    constants = (LLAVA_MODEL_TYPES, QWEN_MODEL_TYPES, LLAVA_NEXT_MODEL_TYPES, LLAVA_ONEVISION_MODEL_TYPES)
    assert constants == tuple(entry.model_types for entry in names.FAMILY_NAMES)
    assert set(ANYRES_MODEL_TYPES) == {*LLAVA_NEXT_MODEL_TYPES, *LLAVA_ONEVISION_MODEL_TYPES}
    assert names.DEFAULT_FAMILY == "llava" and names.FAMILY_ENV == "MODEL_FAMILY"


def run_both(model: str, capsys, offline: bool = True) -> tuple[int, str, str]:
    """``llava.families.names``' answer, checked equal to the registry's (offline, and online for a local dir)."""
    argv = ["--offline", model] if offline else [model]
    answer = (names.main(argv), *capsys.readouterr())
    assert (main(argv), *capsys.readouterr()) == answer
    return answer


@pytest.mark.parametrize(
    ("model_type", "family"),
    [
        ("duet_llava", "llava"),
        ("llava", "llava"),
        ("llava_llama", "llava"),
        ("video_llava", "llava"),
        ("qwen2_5_vl", "qwen2_5_vl"),
        ("llava_next", "llava_next"),
        ("llava_onevision", "llava_onevision"),
        ("llama", "llava"),  # a plain language model: training pairs it with a CLIP tower
    ],
)
@pytest.mark.parametrize("offline", [True, False])
def test_cli_names_a_local_directory_by_its_model_type(
    model_type: str, family: str, offline: bool, tmp_path: Path, capsys
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert run_both(str(tmp_path), capsys, offline) == (0, f"{family}\n", "")


def test_cli_on_a_directory_without_config_or_with_a_broken_one(tmp_path: Path, capsys) -> None:
    assert run_both(str(tmp_path), capsys) == (0, "llava\n", "")
    (tmp_path / "config.json").write_text("{}")
    assert run_both(str(tmp_path), capsys) == (2, "", f"error: {tmp_path / 'config.json'} has no 'model_type'\n")
    (tmp_path / "config.json").write_text("{")
    code, out, err = run_both(str(tmp_path), capsys)
    assert (code, out) == (2, "") and err.startswith(f"error: {tmp_path / 'config.json'}: malformed JSON at line 1")


@pytest.mark.parametrize(
    ("hub_id", "family"),
    [
        ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl"),
        ("someone/qwen2_5_vl-finetune", "qwen2_5_vl"),
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava_next"),
        ("llava-hf/llava-next-72b-hf", "llava_next"),
        ("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision"),
        ("liuhaotian/llava-v1.5-7b", "llava"),
        ("lmsys/vicuna-7b-v1.5", "llava"),
    ],
)
def test_cli_names_a_hub_id_by_its_name(hub_id: str, family: str, capsys) -> None:
    assert run_both(hub_id, capsys) == (0, f"{family}\n", "")


def test_cli_override_by_environment(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    monkeypatch.setenv("MODEL_FAMILY", "llava_next")
    assert run_both(str(tmp_path), capsys) == (0, "llava_next\n", "")
    assert run_both("Qwen/Qwen2.5-VL-7B-Instruct", capsys) == (0, "llava_next\n", "")
    monkeypatch.setenv("MODEL_FAMILY", "gpt")
    refused = "error: unknown model family 'gpt'; known: llava, qwen2_5_vl, llava_next, llava_onevision\n"
    assert run_both("Qwen/Qwen2.5-VL-7B-Instruct", capsys) == (2, "", refused)
    assert run_both(str(tmp_path), capsys) == (2, "", refused)


def test_the_launch_scripts_command(tmp_path: Path) -> None:
    def launch(model: str, **env: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "llava.families.names", "--offline", model]
        return subprocess.run(command, cwd=REPOSITORY, env={**os.environ, **env}, capture_output=True, text=True)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    assert launch(str(tmp_path)).stdout == "llava_onevision\n"
    answer = launch("Qwen/Qwen2.5-VL-7B-Instruct", MODEL_FAMILY="nope")
    assert (answer.returncode, answer.stdout) == (2, "") and answer.stderr.startswith("error: unknown model family")
