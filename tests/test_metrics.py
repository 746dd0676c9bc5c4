"""Metrics JSONL rows, throughput injection, resumed append, and non-interactive wandb."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from llava.training.metrics import (
    METRICS_FILENAME,
    MetricsCallback,
    RunConfigCallback,
    add_metrics_callback,
    batch_counts,
    build_run_config,
    configure_wandb_env,
)
from tests.toy import ToyData, ToyLM

SEQ_LEN, PADDING, BATCH = 6, 2, 4


class CountingTrainer(Trainer):
    """How the lead's Trainer subclass reports counts: once per training micro-batch."""

    def __init__(self, *args, metrics_callback: MetricsCallback, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_callback = add_metrics_callback(self, metrics_callback)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.metrics_callback.record_batch(*batch_counts(inputs))
        return super().training_step(model, inputs, num_items_in_batch)


def run_toy(output_dir: Path, max_steps: int, report_to: list[str], resume: str | None = None, **kw):
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=2,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=report_to,
        run_name="toy-run",
        use_cpu=True,
        **kw,
    )
    trainer = CountingTrainer(
        model=ToyLM(),
        args=args,
        train_dataset=ToyData(n=32, length=SEQ_LEN, padding=PADDING),
        metrics_callback=MetricsCallback(),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_counts_uses_attention_mask() -> None:
    batch = ToyData(n=32, length=SEQ_LEN, padding=PADDING)[0]
    batch = {k: v.unsqueeze(0).repeat(3, 1) for k, v in batch.items()}
    assert batch_counts(batch) == (3, 3 * (SEQ_LEN - PADDING))
    assert batch_counts({"input_ids": batch["input_ids"]}) == (3, 3 * SEQ_LEN)


def test_jsonl_rows_have_step_loss_lr_and_throughput(tmp_path: Path) -> None:
    trainer = run_toy(tmp_path, max_steps=3, report_to=[])
    rows = read_rows(tmp_path / METRICS_FILENAME)
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [1, 2, 3]
    for row in step_rows:
        for key in ("epoch", "learning_rate", "grad_norm", "step_time_s", "wall_time", "elapsed_s"):
            assert key in row, key
        assert row["step_time_s"] > 0
        # one optimizer step = 2 micro-batches of BATCH samples, (SEQ_LEN - PADDING) real tokens each
        ratio = row["tokens_per_s"] / row["samples_per_s"]
        assert ratio == pytest.approx(SEQ_LEN - PADDING)
        assert row["samples_per_s"] == pytest.approx(2 * BATCH / row["step_time_s"])
    # the final Trainer summary (train_runtime, ...) is kept as an extra row
    assert any("train_runtime" in r for r in rows)
    # registered first, so reporting integrations see the timing keys in the logs dict
    assert isinstance(trainer.callback_handler.callbacks[0], MetricsCallback)


def test_resumed_run_appends_to_the_same_file(tmp_path: Path) -> None:
    run_toy(tmp_path, max_steps=3, report_to=[])
    first = read_rows(tmp_path / METRICS_FILENAME)
    run_toy(tmp_path, max_steps=4, report_to=[], resume=str(tmp_path / "checkpoint-2"))
    rows = read_rows(tmp_path / METRICS_FILENAME)
    assert rows[: len(first)] == first
    resumed_steps = [r["step"] for r in rows[len(first) :] if "loss" in r]
    assert resumed_steps == [3, 4]  # step 3 is logged twice; readers keep the last one


def test_callback_adds_timing_to_logs_before_reporters(tmp_path: Path) -> None:
    callback = MetricsCallback(metrics_file=tmp_path / "m.jsonl")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control)
    callback.on_step_begin(args, state, control)
    callback.record_batch(torch.tensor(4), torch.tensor(40))
    callback.record_batch(4, 40)
    callback.on_step_end(args, state, control)
    state.global_step = 1
    logs = {"loss": torch.tensor(1.5), "learning_rate": 1e-3}
    callback.on_log(args, state, control, logs=logs)
    assert logs["tokens_per_s"] / logs["samples_per_s"] == pytest.approx(10)
    (row,) = read_rows(tmp_path / "m.jsonl")
    assert row["loss"] == 1.5 and row["step"] == 1


@pytest.fixture
def clean_wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No key, no netrc, runs written under tmp_path."""
    for key in list(os.environ):
        if key.startswith("WANDB_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    return home


def test_configure_wandb_env_goes_offline_without_credentials(clean_wandb_env: Path) -> None:
    env = configure_wandb_env(run_name="r1", group="g1")
    assert env["WANDB_MODE"] == "offline"
    assert env["WANDB_PROJECT"] == "duet-vlm"
    assert env["WANDB_RUN_GROUP"] == "g1" and env["WANDB_NAME"] == "r1"


def test_configure_wandb_env_keeps_online_with_key_or_netrc(
    clean_wandb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "dummy")
    assert "WANDB_MODE" not in configure_wandb_env(project="p")
    assert os.environ["WANDB_PROJECT"] == "p"
    monkeypatch.delenv("WANDB_API_KEY")
    netrc_file = clean_wandb_env / ".netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password dummy\n")
    netrc_file.chmod(0o600)
    assert "WANDB_MODE" not in configure_wandb_env()
    monkeypatch.setenv("WANDB_MODE", "disabled")  # an explicit user choice wins
    assert configure_wandb_env()["WANDB_MODE"] == "disabled"


def test_wandb_offline_run_with_trainer_needs_no_prompt(
    tmp_path: Path, clean_wandb_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    configure_wandb_env(run_name="toy-run", group="tests")
    # An interactive key prompt would read stdin; make that fail loudly instead of hanging.
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # noqa: SIM115
    config = build_run_config({"model": "toy"}, world_size=1)
    out = tmp_path / "out"
    try:
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=2,
            per_device_train_batch_size=BATCH,
            logging_steps=1,
            save_strategy="no",
            report_to=["wandb"],
            run_name="toy-run",
            use_cpu=True,
        )
        trainer = CountingTrainer(
            model=ToyLM(),
            args=args,
            train_dataset=ToyData(n=32, length=SEQ_LEN, padding=PADDING),
            metrics_callback=MetricsCallback(),
            callbacks=[RunConfigCallback(config)],
        )
        names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
        assert names.index("MetricsCallback") < names.index("WandbCallback")
        trainer.train()
        assert wandb.run is not None and wandb.run.config["model"] == "toy"
        assert wandb.run.summary["train/tokens_per_s"] > 0
    finally:
        wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 1
    assert any("tokens_per_s" in r for r in read_rows(out / METRICS_FILENAME))
