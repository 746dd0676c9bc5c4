"""Training stages in-process (single CPU process): freezing, projector loading, LR groups, resume errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava.families.llava import build_model
from llava.model.stages import configure_trainable, find_projector
from llava.training.checkpoints import CheckpointResumeError
from llava.training.train import parse_args, train
from tests.run_args import finetune_args, pretrain_args


def read_metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss" in row}


def test_pretrain_trains_only_the_projector_and_saves_it(playground, tmp_path):
    out = tmp_path / "pretrain"
    model_args, data_args, args = parse_args(pretrain_args(playground, out))
    model = configure_trainable(build_model(model_args, data_args, args), model_args, args)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("projector.") for name in trainable)

    train(pretrain_args(playground, out, "--max_steps", "3", "--save_steps", "2"))
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3]
    assert all(row["tokens_per_s"] > 0 and row["step_time_s"] > 0 for row in metrics.values())
    projector = load_file(str(out / "mm_projector.safetensors"))
    assert set(projector) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    checkpoint = out / "checkpoint-2"
    for needed in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "checkpoint_complete.json"):
        assert (checkpoint / needed).exists(), needed


def test_finetune_loads_projector_and_trains_llm_not_tower(playground, tmp_path):
    torch.manual_seed(0)
    projector_file = tmp_path / "mm_projector.safetensors"
    state = {
        "0.weight": torch.randn(64, 64), "0.bias": torch.randn(64),
        "2.weight": torch.randn(64, 64), "2.bias": torch.randn(64),
    }  # fmt: skip
    save_file(state, str(projector_file))
    argv = finetune_args(playground, tmp_path / "ft", "--pretrain_mm_mlp_adapter", str(projector_file))
    model_args, data_args, args = parse_args(argv)
    model = configure_trainable(build_model(model_args, data_args, args), model_args, args)
    assert torch.equal(model.projector[0].weight, state["0.weight"])
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector", "language_model"}


def test_wrong_projector_shape_is_a_clear_error(playground, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"0.weight": torch.zeros(3, 3)}, str(bad))
    model_args, data_args, args = parse_args(finetune_args(playground, tmp_path, "--pretrain_mm_mlp_adapter", str(bad)))
    with pytest.raises(ValueError, match="do not fit"):
        build_model(model_args, data_args, args)


def test_lora_trains_adapters_and_projector_with_its_own_lr(playground, tmp_path):
    out = tmp_path / "lora"
    extra = ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--mm_projector_lr", "5e-5")
    train(finetune_args(playground, out, *extra, "--max_steps", "2", "--save_steps", "2"))
    model_args, data_args, args = parse_args(finetune_args(playground, out, *extra))
    model = configure_trainable(build_model(model_args, data_args, args), model_args, args)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable)
    assert all("lora_" in name or "projector" in name for name in trainable)
    assert not any("vision_tower" in name for name in trainable)
    assert find_projector(model).weight.requires_grad if hasattr(find_projector(model), "weight") else True
    assert (out / "checkpoint-2" / "adapter_model.safetensors").exists()
    from llava.training.trainer import LlavaTrainer

    trainer = LlavaTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    lrs = {group.get("lr", args.learning_rate) for group in optimizer.param_groups}
    assert lrs == {5e-5, args.learning_rate}


def test_resume_auto_without_checkpoint_is_a_clear_error(playground, tmp_path):
    with pytest.raises(CheckpointResumeError, match="no complete checkpoint"):
        train(pretrain_args(playground, tmp_path / "empty", "--max_steps", "1", "--resume_from_checkpoint", "auto"))


def test_in_process_resume_reproduces_losses(playground, tmp_path):
    full = tmp_path / "full"
    train(finetune_args(playground, full, "--max_steps", "4", "--save_steps", "2"))
    part = tmp_path / "part"
    train(finetune_args(playground, part, "--max_steps", "4", "--save_steps", "2"))
    # Pretend the run died after checkpoint-2: drop what came later, then resume.
    import shutil

    shutil.rmtree(part / "checkpoint-4")
    train(finetune_args(playground, part, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "auto"))
    reference, resumed = read_metrics(full), read_metrics(part)
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6, abs=1e-7)


def test_shared_memory_buffers_of_this_rank_are_removed(tmp_path, monkeypatch):
    from llava.training import train as train_module

    monkeypatch.setattr(train_module, "SHM_DIR", tmp_path)
    names = ["deepspeed_allreduce_buffer_0_127.0.0.1_4321_0", "deepspeed_allreduce_buffer_0_127.0.0.1_4321_1",
             "deepspeed_allreduce_buffer_0_127.0.0.1_9999_0", "unrelated_127.0.0.1_4321_0"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    environ = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "4321", "RANK": "0"}
    removed = train_module.remove_shared_memory_buffers(environ)
    assert [path.name for path in removed] == [names[0]]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(names[1:])
    assert train_module.remove_shared_memory_buffers({}) == []  # not launched by DeepSpeed: nothing to do


def test_text_only_batches_are_logged_as_such(playground, tmp_path):
    """Modality-grouped batching gives whole text-only steps (the loss jumps of the playground curves):
    ``text_only_fraction`` is 1 exactly on those steps and 0 on image-only ones."""
    samples = json.loads((playground / "finetune.json").read_text())
    text_only = sum("image" not in sample and "video" not in sample for sample in samples)
    out = tmp_path / "ft"
    train(finetune_args(playground, out, "--num_train_epochs", "1"))
    fractions = [row["text_only_fraction"] for row in read_metrics(out).values()]
    assert len(fractions) == -(-len(samples) // 4)
    assert fractions.count(1.0) == text_only // 4  # one full megabatch of 4 per 4 text-only samples
    assert all(0.0 <= value <= 1.0 for value in fractions) and fractions.count(0.0) >= len(fractions) - 2
