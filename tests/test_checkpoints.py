"""Resume resolution: only complete checkpoints are resumed, and only when asked."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from llava.training.checkpoints import (
    COMPLETE_MARKER,
    CheckpointCompletionCallback,
    CheckpointResumeError,
    checkpoint_problem,
    find_latest_complete_checkpoint,
    is_checkpoint_complete,
    list_checkpoints,
    mark_checkpoint_complete,
    resolve_resume_checkpoint,
)
from tests.toy import ToyData, ToyLM


def make_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    """A fake ``checkpoint-<step>`` with a DeepSpeed-like subfolder; marked complete if asked."""
    ckpt = output_dir / f"checkpoint-{step}"
    (ckpt / f"global_step{step}").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    if complete:
        mark_checkpoint_complete(ckpt, step)
    return ckpt


def test_marker_lists_files_and_step(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path, 5)
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    assert marker["step"] == 5
    paths = {f["path"] for f in marker["files"]}
    assert paths == {"trainer_state.json", "global_step5/mp_rank_00_model_states.pt"}
    assert is_checkpoint_complete(ckpt)


def test_checkpoint_without_marker_is_incomplete(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path, 5, complete=False)
    assert not is_checkpoint_complete(ckpt)
    assert COMPLETE_MARKER in checkpoint_problem(ckpt)


def test_checkpoint_with_missing_or_truncated_file_is_incomplete(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path, 5)
    shard = ckpt / "global_step5" / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"x")
    assert "size changed" in checkpoint_problem(ckpt)
    shard.unlink()
    assert "missing" in checkpoint_problem(ckpt)


def test_same_size_corruption_is_refused_on_resume_naming_the_file(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path, 5)
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    assert all(len(entry["crc32"]) == 8 for entry in marker["files"])
    shard = ckpt / "global_step5" / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"x" * 9 + b"y")  # same size, one byte changed
    assert checkpoint_problem(ckpt) is None  # the cheap check (rotation) sees sizes only
    problem = checkpoint_problem(ckpt, verify_content=True)
    assert "content changed" in problem and str(shard) in problem
    with pytest.raises(CheckpointResumeError, match=r"mp_rank_00_model_states\.pt"):
        resolve_resume_checkpoint(tmp_path, str(ckpt))
    older = make_checkpoint(tmp_path, 3)
    with pytest.raises(CheckpointResumeError, match=r"checkpoint-5 \(step 5\) is corrupted"):
        resolve_resume_checkpoint(tmp_path, "auto")  # never a silent fall-back to an older state
    assert resolve_resume_checkpoint(tmp_path, str(older)) == str(older)


def test_markers_without_checksums_are_still_accepted(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path, 5)
    marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    for entry in marker["files"]:
        del entry["crc32"]
    (ckpt / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert checkpoint_problem(ckpt, verify_content=True) is None


def test_list_sorts_by_step_number_not_name(tmp_path: Path) -> None:
    for step in (999, 1000, 50):
        make_checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-notastep").mkdir()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [50, 999, 1000]


def test_auto_picks_newest_complete_and_logs_skipped(tmp_path: Path, caplog) -> None:
    make_checkpoint(tmp_path, 10)
    newest_complete = make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)
    with caplog.at_level(logging.WARNING):
        resolved = resolve_resume_checkpoint(tmp_path, "auto")
    assert resolved == str(newest_complete)
    assert "checkpoint-30" in caplog.text and "Skipping incomplete" in caplog.text
    assert find_latest_complete_checkpoint(tmp_path) == newest_complete


def test_auto_without_checkpoints_names_output_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointResumeError, match=str(tmp_path)):
        resolve_resume_checkpoint(tmp_path, "auto")
    with pytest.raises(CheckpointResumeError, match="does not exist"):
        resolve_resume_checkpoint(tmp_path / "missing", "auto")


def test_auto_with_only_incomplete_checkpoints_says_so(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 10, complete=False)
    with pytest.raises(CheckpointResumeError, match="none is complete"):
        resolve_resume_checkpoint(tmp_path, "auto")


def test_explicit_path_must_exist_and_be_complete(tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path, 10)
    bad = make_checkpoint(tmp_path, 20, complete=False)
    assert resolve_resume_checkpoint(tmp_path, str(good)) == str(good)
    with pytest.raises(CheckpointResumeError, match=r"no checkpoint_complete\.json"):
        resolve_resume_checkpoint(tmp_path, str(bad))
    with pytest.raises(CheckpointResumeError, match="does not exist"):
        resolve_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-99"))


@pytest.mark.parametrize("arg", [None, ""])
def test_no_resume_arg_is_fresh_start_and_warns_about_existing(tmp_path: Path, caplog, arg) -> None:
    make_checkpoint(tmp_path, 10)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_checkpoint(tmp_path, arg) is None
    assert "NOT resumed implicitly" in caplog.text


def test_no_resume_arg_on_empty_dir_is_silent(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        assert resolve_resume_checkpoint(tmp_path / "new", None) is None
    assert caplog.text == ""


def test_config_change_is_reported_on_resume(tmp_path: Path, caplog) -> None:
    ckpt = make_checkpoint(tmp_path, 10, complete=False)
    mark_checkpoint_complete(ckpt, 10, run_config={"learning_rate": 1e-3, "version": "plain"})
    with caplog.at_level(logging.WARNING):
        resolve_resume_checkpoint(tmp_path, "auto", run_config={"learning_rate": 2e-5, "version": "plain"})
    assert "learning_rate" in caplog.text and "version" not in caplog.text


def test_callback_marks_trainer_checkpoints_and_resume_works(tmp_path: Path) -> None:
    def make_trainer(max_steps: int) -> Trainer:
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
        )
        return Trainer(model=ToyLM(), args=args, train_dataset=ToyData(), callbacks=[CheckpointCompletionCallback()])

    make_trainer(4).train()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert all(is_checkpoint_complete(path) for _, path in list_checkpoints(tmp_path))
    marker = json.loads((tmp_path / "checkpoint-4" / COMPLETE_MARKER).read_text())
    assert "trainer_state.json" in {f["path"] for f in marker["files"]}

    resume = resolve_resume_checkpoint(tmp_path, "auto")
    assert resume == str(tmp_path / "checkpoint-4")
    trainer = make_trainer(6)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == 6
    assert is_checkpoint_complete(tmp_path / "checkpoint-6")


def test_rerun_into_existing_checkpoint_drops_stale_marker_before_saving(tmp_path: Path) -> None:
    stale = make_checkpoint(tmp_path, 2)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state, control = TrainerState(global_step=2), TrainerControl(should_save=True)
    CheckpointCompletionCallback().on_step_end(args, state, control)
    assert not is_checkpoint_complete(stale)  # a crash during the re-save now leaves it incomplete


def test_checksum_cost_benchmark_runs_and_verifies(tmp_path: Path) -> None:
    from llava.bench import checksum_cost

    result = checksum_cost.main(["--size-gb", "0.01", "--files", "2", "--out", str(tmp_path)])
    assert result["files"] == 2 and result["checksum_s"] > 0 and result["checksum_gb_per_s"] > 0
    assert not (tmp_path / "checkpoint-1").exists()  # scratch cleaned up
