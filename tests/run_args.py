"""Command lines for in-process training runs on the test playground."""

from __future__ import annotations


def base_args(playground, out, *extra):
    return [
        "--model_name_or_path", str(playground / "llm"),
        "--vision_tower", str(playground / "vision_tower"),
        "--image_folder", str(playground / "images"),
        "--output_dir", str(out),
        "--per_device_train_batch_size", "4",
        "--logging_steps", "1",
        "--report_to", "none",
        "--dataloader_num_workers", "0",
        "--seed", "7",
        *extra,
    ]  # fmt: skip


def pretrain_args(playground, out, *extra):
    return base_args(
        playground, out, "--version", "plain", "--data_path", str(playground / "pretrain.json"),
        "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-3", *extra,
    )  # fmt: skip


def finetune_args(playground, out, *extra):
    return base_args(
        playground, out, "--version", "v1", "--data_path", str(playground / "finetune.json"),
        "--learning_rate", "1e-4", "--group_by_modality_length", "True", *extra,
    )  # fmt: skip
