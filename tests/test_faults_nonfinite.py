"""Fault cases of issue 25: a non-finite loss (c) and a disk-full checkpoint save (e).

The DeepSpeed tests run the real launch script on 2 CPU ranks with a test-only fault armed through
``DUET_INJECT_FAULT`` (:mod:`llava.training.fault_injection`); the others check the pieces without DeepSpeed:
the fault specification, the stop/skip policy, the guard's messages, the ids that travel with a batch and the
save-failure translation.
"""

from __future__ import annotations

import ast
import errno
import json
import logging
import math
import os
import re
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import TrainerControl, TrainerState

from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.dataset import DataArguments, LazySupervisedDataset
from llava.data.sampler import ModalityLengthGroupedSampler
from llava.playground.tokenizer import train_playground_tokenizer
from llava.training.checkpoints import (
    COMPLETE_MARKER,
    checkpoint_problem,
    find_latest_complete_checkpoint,
    mark_checkpoint_complete,
)
from llava.training.exit_codes import EXIT_NONFINITE, EXIT_SAVE_FAILED
from llava.training.fault_injection import (
    ENOSPC_ON_SAVE,
    FAULT_ENV,
    NONFINITE_LOSS,
    Fault,
    FaultSpecError,
    armed_faults,
    corrupt_loss,
    fail_save,
    parse_faults,
)
from llava.training.nonfinite import (
    SKIP,
    SKIPPED_STEPS_KEY,
    STOP,
    NonFiniteError,
    NonFiniteGuard,
    RankReport,
    describe_step,
    must_stop,
)
from llava.training.save_failure import SaveFailedError, SaveWatch, is_write_failure
from llava.training.train import parse_args
from tests.run_args import finetune_args
from tests.test_distributed import REPO, finetune_env, run_script_to_exit

# --- fault specification ---------------------------------------------------------------------------------------


def test_fault_specs_parse_and_bad_ones_say_what_is_wrong():
    assert parse_faults("") == ()
    assert parse_faults("nonfinite_loss@step=3") == (Fault(NONFINITE_LOSS, 3),)
    assert parse_faults(" enospc_on_save@step=4, rank=1 ;nonfinite_loss@step=2") == (
        Fault(ENOSPC_ON_SAVE, 4, 1),
        Fault(NONFINITE_LOSS, 2),
    )
    for bad, message in [
        ("nan_loss@step=3", "unknown fault 'nan_loss'"),
        ("nonfinite_loss", "needs step=N"),
        ("nonfinite_loss@step=0", "needs step=N"),
        ("nonfinite_loss@step=three", "needs an integer"),
        ("nonfinite_loss@step=3,device=1", "is not step=N or rank=R"),
        ("nonfinite_loss@step=3,step=4", "is not step=N or rank=R"),
    ]:
        with pytest.raises(FaultSpecError, match=re.escape(message)):
            parse_faults(bad)


def test_armed_faults_warn_loudly_and_are_empty_when_unset(caplog):
    with caplog.at_level(logging.WARNING, logger="llava.training.fault_injection"):
        assert armed_faults({}) == ()
        assert not caplog.records
        assert armed_faults({FAULT_ENV: "nonfinite_loss@step=3,rank=1"}) == (Fault(NONFINITE_LOSS, 3, 1),)
    assert "TEST-ONLY FAULT INJECTION IS ACTIVE" in caplog.text


def test_injected_nan_loss_fires_at_its_step_and_rank_only_and_makes_the_gradients_nan():
    faults = parse_faults("nonfinite_loss@step=3,rank=1")
    weight = torch.ones(3, requires_grad=True)
    loss = (weight * 2).sum()
    assert corrupt_loss(loss, faults, step=3, rank=0) is loss
    assert corrupt_loss(loss, faults, step=2, rank=1) is loss
    corrupted = corrupt_loss(loss, faults, step=3, rank=1)
    corrupted.backward()
    assert math.isnan(corrupted.item()) and torch.isnan(weight.grad).all()


def test_injected_enospc_names_the_folder(tmp_path):
    faults = parse_faults("enospc_on_save@step=4")
    fail_save(tmp_path, faults, step=3, rank=0)  # another step: nothing happens
    with pytest.raises(OSError, match="No space left on device") as error:
        fail_save(tmp_path / "checkpoint-4", faults, step=4, rank=1)
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(tmp_path / "checkpoint-4")


# --- policy and messages -----------------------------------------------------------------------------------------


def test_policy_stop_always_stops_and_skip_stops_after_max_consecutive_skips():
    assert must_stop(STOP, consecutive_skips=0, max_skips=3)
    assert [must_stop(SKIP, consecutive_skips=n, max_skips=3) for n in range(5)] == [False, False, False, True, True]
    assert must_stop(SKIP, consecutive_skips=0, max_skips=0)
    with pytest.raises(ValueError, match="stop"):
        must_stop("ignore", 0, 3)


def test_step_description_names_ranks_losses_and_the_offending_micro_batch_ids():
    reports = [
        RankReport(0, (1.5, 2.0), (("a", "b"), ("c", "d")), float("inf")),
        RankReport(1, (1.5, float("nan")), (("e", "f"), ("g", "h")), float("inf")),
    ]
    text = describe_step(3, reports, ["data.json"])
    assert text.startswith("non-finite loss at step 3 on rank 1, gradient norm inf (rank 1: loss nan, sample ids ")
    assert "['g', 'h']" in text and "'e'" not in text and "'a'" not in text and text.endswith("in data.json")
    both = describe_step(5, [RankReport(0, (float("inf"),), (("a",),)), RankReport(1, (float("nan"),), (None,))])
    assert "on ranks 0, 1" in both and "rank 0: loss inf, sample ids ['a']" in both and "unknown" in both
    gradient_only = describe_step(7, [RankReport(0, (1.0,), (("a",),), float("nan")), RankReport(1, (2.0,), (("b",),))])
    assert gradient_only.startswith("non-finite gradient norm at step 7, gradient norm nan, every loss finite")
    assert "rank 0: sample ids ['a']; rank 1: sample ids ['b']" in gradient_only


class FakeEngine:
    """What the guard reads from a DeepSpeed engine: the skipped-step count and the global gradient norm."""

    def __init__(self, discards: bool = True) -> None:
        self.skipped_steps = 0
        self.grad_norm = 1.0
        self.discards = discards

    def get_global_grad_norm(self) -> float:
        return self.grad_norm

    def step(self, loss: float) -> None:
        """Like ZeRO's step: a non-finite gradient norm (from a non-finite loss) is discarded and counted."""
        self.grad_norm = loss if not math.isfinite(loss) else 1.0
        if not math.isfinite(loss) and self.discards:
            self.skipped_steps += 1


def run_steps(guard: NonFiniteGuard, engine: FakeEngine | None, losses: list[float], tmp_path, fp16=False) -> None:
    args = SimpleNamespace(fp16=fp16, process_index=0, world_size=1, output_dir=str(tmp_path))
    state, control = TrainerState(), TrainerControl()
    for loss in losses:
        guard.on_step_begin(args, state, control)
        guard.record(torch.tensor(loss), [f"id{state.global_step}"])
        if engine is not None:
            engine.step(loss)
        state.global_step += 1
        guard.on_step_end(args, state, control)


def test_guard_stop_raises_naming_step_ids_and_last_checkpoint(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    mark_checkpoint_complete(tmp_path / "checkpoint-1", 1)
    guard = NonFiniteGuard(STOP)
    with pytest.raises(NonFiniteError) as error:
        run_steps(guard, None, [1.0, 2.0, float("nan")], tmp_path)
    message = str(error.value)
    assert error.value.exit_code == EXIT_NONFINITE == 65 and error.value.report
    assert "non-finite loss at step 3 on rank 0 (rank 0: loss nan, sample ids ['id2'])" in message
    assert f"The last complete checkpoint is {tmp_path / 'checkpoint-1'}" in message


def test_guard_skip_counts_verified_skips_and_stops_after_too_many(tmp_path):
    engine = FakeEngine()
    guard = NonFiniteGuard(SKIP, max_skips=2, engine=lambda: engine)
    run_steps(guard, engine, [1.0, float("nan"), 1.0, float("inf"), float("nan"), 1.0], tmp_path)
    assert guard.skipped_steps == 3 and guard.consecutive_skips == 0
    assert math.isnan(guard.take_logged_loss()) and guard.take_logged_loss() is None  # nan + inf + nan
    with pytest.raises(NonFiniteError, match=r"step 3 .*3 consecutive non-finite steps, --max_nonfinite_skips 2"):
        run_steps(guard, engine, [float("nan")] * 3, tmp_path)


def test_guard_skip_stops_when_deepspeed_applied_the_update(tmp_path):
    engine = FakeEngine(discards=False)  # e.g. ZeRO stage 0: no overflow check
    guard = NonFiniteGuard(SKIP, engine=lambda: engine)
    with pytest.raises(NonFiniteError, match=r"DeepSpeed applied this update anyway \(engine.skipped_steps stayed"):
        run_steps(guard, engine, [1.0, float("nan")], tmp_path)


def test_guard_checks_the_gradient_norm_except_under_fp16_loss_scaling(tmp_path):
    engine = FakeEngine()
    engine.step = lambda loss: setattr(engine, "grad_norm", float("inf"))  # finite loss, overflowing gradients
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 1, gradient norm inf, every loss"):
        run_steps(NonFiniteGuard(STOP, engine=lambda: engine), engine, [1.0], tmp_path)
    run_steps(NonFiniteGuard(STOP, engine=lambda: engine), engine, [1.0], tmp_path, fp16=True)  # DeepSpeed's job


def test_skip_without_deepspeed_fails_at_start(playground, tmp_path):
    with pytest.raises(ValueError, match="--nonfinite skip needs --deepspeed"):
        parse_args(finetune_args(playground, tmp_path, "--nonfinite", "skip"))


# --- sample ids travel with the batch ------------------------------------------------------------------------------


def test_items_and_batches_carry_the_data_files_ids(tmp_path):
    tokenizer = train_playground_tokenizer(["USER: hello there ASSISTANT: hello"] * 8, vocab_size=300)
    chat = [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hello"}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "first", "conversations": chat}, {"conversations": chat}]))
    dataset = LazySupervisedDataset(DataArguments(data_path=[str(data)]), tokenizer)
    items = [dataset[0], dataset[1]]
    assert [item["sample_id"] for item in items] == ["first", "1"]  # the id, else the index in the file
    batch = DataCollatorForSupervisedDataset(tokenizer)(items[::-1])
    assert batch["sample_ids"] == ["1", "first"]
    without = DataCollatorForSupervisedDataset(tokenizer)([{k: v for k, v in items[0].items() if k != "sample_id"}])
    assert "sample_ids" not in without


# --- save failures ---------------------------------------------------------------------------------------------------


@contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past ``size`` bytes fail (EFBIG) in this process: a disk that fills up mid-file, without root."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_writers_that_fail_mid_file_are_write_failures(tmp_path):
    """torch.save reports a failed write as RuntimeError, safetensors as SafetensorError: neither is an OSError."""
    with file_size_limit(100), pytest.raises(RuntimeError) as torch_error:
        torch.save({"weights": torch.zeros(1000)}, tmp_path / "a.pt")
    with file_size_limit(100), pytest.raises(SafetensorError) as safetensors_error:
        save_file({"weights": torch.zeros(1000)}, str(tmp_path / "a.safetensors"))
    for error in (torch_error.value, safetensors_error.value):
        assert not isinstance(error, OSError) and is_write_failure(error), repr(error)
    assert not is_write_failure(ValueError("bad batch size"))


def test_save_watch_turns_a_failed_checkpoint_write_into_exit_74(tmp_path):
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    mark_checkpoint_complete(tmp_path / "checkpoint-2", 2)
    watch = SaveWatch()
    args = SimpleNamespace(output_dir=str(tmp_path))
    with pytest.raises(OSError), watch.failures_end_the_run(tmp_path, rank=0):  # no save in progress: unchanged
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "elsewhere")
    watch.on_step_end(args, SimpleNamespace(global_step=4), TrainerControl(should_save=True))
    with pytest.raises(ValueError), watch.failures_end_the_run(tmp_path, rank=0):  # not a write failure
        raise ValueError("something else")
    with pytest.raises(SaveFailedError) as error, watch.failures_end_the_run(tmp_path, rank=1):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "checkpoint-4" / "model.safetensors"))
    message = str(error.value)
    assert error.value.exit_code == EXIT_SAVE_FAILED == 74
    assert message.startswith(f"Saving checkpoint {tmp_path / 'checkpoint-4'} failed on rank 1: [Errno 28] No space")
    assert f"The last complete checkpoint is {tmp_path / 'checkpoint-2'}" in message
    watch.on_train_end(args, None, None)
    final = re.escape(f"final model to {tmp_path} failed on rank 0: RuntimeError")
    with pytest.raises(SaveFailedError, match=final), watch.failures_end_the_run(tmp_path, 0), file_size_limit(100):
        torch.save({"weights": torch.zeros(1000)}, tmp_path / "final.pt")


# --- DeepSpeed ranks through the real script -----------------------------------------------------------------------


def run_to_exit(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """scripts/v1_5/finetune.sh run to its exit (a hung rank fails the test), and its seconds; every rank must have
    removed its shared-memory buffer, whatever the exit code."""
    start = time.monotonic()
    result = run_script_to_exit("finetune.sh", env, *args)
    seconds = time.monotonic() - start
    assert not list(Path("/dev/shm").glob(f"deepspeed_*_{env['MASTER_PORT']}_*")), "left /dev/shm buffers"
    return result, seconds


def logged_rows(output_dir: Path) -> dict[int, dict]:
    """Per step the last logged training row of metrics.jsonl (a step logged again after a resume keeps the last)."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss" in row}


def sampled_ids(output_dir: Path, step: int, rank: int) -> list[str]:
    """The data file's ids of the samples ``rank`` trains on at optimizer ``step``, recomputed from the run's config
    with the same sampler (grouped by modality and length; each megabatch lays out rank 0's batch, then rank 1's)."""
    config = json.loads((output_dir / "run_config.json").read_text())
    data_file = Path(config["data_path"][0])
    arguments = DataArguments(
        data_path=[str(data_file)], tokens_per_image=config["tokens_per_image"],
        tokens_per_video=config["tokens_per_video"],
    )  # fmt: skip
    dataset = LazySupervisedDataset(arguments, tokenizer=None)
    batch, world = config["per_device_train_batch_size"], config["world_size"]
    assert config["group_by_modality_length"] and config["gradient_accumulation_steps"] == 1
    order = list(ModalityLengthGroupedSampler(batch, world, dataset.modality_lengths, seed=config["seed"]))
    start = (step - 1) * batch * world + rank * batch
    samples = json.loads(data_file.read_text())
    return [str(samples[index].get("id", index)) for index in order[start : start + batch]]


def test_nonfinite_loss_with_stop_exits_65_naming_step_rank_and_sample_ids(playground, tmp_path):
    """(c, stop; ZeRO-2) Rank 1's loss of step 3 is NaN: both ranks stop before step 3 is logged or saved (a
    checkpoint every step), the job exits 65, and the one message names step 3, rank 1 and that batch's ids."""
    out = tmp_path / "stop"
    env = finetune_env(
        playground, out, SAVE_STEPS="1", ZERO=str(REPO / "scripts" / "zero2.json"),
        **{FAULT_ENV: "nonfinite_loss@step=3,rank=1"},
    )  # fmt: skip
    result, seconds = run_to_exit(env, "--max_steps", "4")
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_NONFINITE, output[-5000:]
    messages = re.findall(r"ERROR llava\.training: (Stopped: .*)", output)
    assert len(messages) == 1, messages
    match = re.match(r"Stopped: non-finite loss at step 3 on rank 1, gradient norm inf \(rank 1: loss nan, "
                     r"sample ids (\[[^\]]*\])\)", messages[0])  # fmt: skip
    assert match, messages[0]
    assert ast.literal_eval(match.group(1)) == sampled_ids(out, step=3, rank=1)
    assert f"The last complete checkpoint is {out / 'checkpoint-2'}" in messages[0]
    assert checkpoint_problem(out / "checkpoint-2", verify_content=True) is None
    assert not (out / "checkpoint-3").exists() and sorted(logged_rows(out)) == [1, 2]
    print(f"stop: exit {result.returncode} after {seconds:.1f} s: {messages[0]}")


def assert_same_training_state(before: Path, after: Path) -> None:
    """Weights, each rank's ZeRO-3 optimizer partition (fp32 master weights, AdamW moments and step counts, LR)
    and the LR scheduler are bit-identical in the two checkpoints."""
    first, second = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[name], second[name]) for name in first)
    tag_before, tag_after = ((path / "latest").read_text().strip() for path in (before, after))
    for rank in (0, 1):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        old = torch.load(before / tag_before / name, weights_only=False)["optimizer_state_dict"]
        new = torch.load(after / tag_after / name, weights_only=False)["optimizer_state_dict"]
        assert all(torch.equal(a, b) for a, b in zip(old["fp32_flat_groups"], new["fp32_flat_groups"], strict=True))
        inner_old, inner_new = old["optimizer_state_dict"], new["optimizer_state_dict"]
        assert inner_old["param_groups"] == inner_new["param_groups"]  # learning rates included
        for index, state in inner_old["state"].items():
            assert sorted(state) == sorted(inner_new["state"][index]) == ["exp_avg", "exp_avg_sq", "step"]
            assert all(torch.equal(state[key], inner_new["state"][index][key]) for key in state), (rank, index)
    scheduler = [torch.load(path / "scheduler.pt", weights_only=False) for path in (before, after)]
    assert scheduler[0] == scheduler[1]


def engine_skipped_steps(checkpoint: Path) -> int:
    tag = (checkpoint / "latest").read_text().strip()
    return torch.load(checkpoint / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)[
        "skipped_steps"
    ]


def test_disk_full_save_keeps_the_last_checkpoint_then_auto_resumes_and_skip_drops_exactly_that_update(
    playground, tmp_path
):
    """(e, then c with skip; ZeRO-3; one test so that the resume is the skip run: 2 launches instead of 3.)

    Saving checkpoint-4 hits ENOSPC after its model files are written: exit 74, a message naming the folder,
    the failure and checkpoint-3, which stays the newest complete one. ``RESUME=auto`` resumes from checkpoint-3
    and finishes, with every rank's loss of step 4 NaN under ``--nonfinite skip``: the state after step 4
    (checkpoint-4) is bit-identical to the state after step 3 (checkpoint-3) - weights, optimizer, scheduler - so
    the rest of the run is exactly a run in which step 4's update was dropped."""
    out = tmp_path / "run"
    env = finetune_env(
        playground, out, SAVE_STEPS="1", SAVE_TOTAL_LIMIT="5", ZERO=str(REPO / "scripts" / "zero3.json")
    )  # fmt: skip
    result, seconds = run_to_exit({**env, FAULT_ENV: "enospc_on_save@step=4"}, "--max_steps", "5")
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_SAVE_FAILED, output[-5000:]
    messages = re.findall(r"ERROR llava\.training: (Saving checkpoint .*)", output)
    assert messages, output[-5000:]
    for message in messages:  # one per failing rank (the fault hits every rank)
        assert re.match(
            rf"Saving checkpoint {re.escape(str(out / 'checkpoint-4'))} failed on rank [01]: \[Errno 28\] No space "
            rf"left on device: '{re.escape(str(out / 'checkpoint-4'))}'\. .* The last complete checkpoint is "
            rf"{re.escape(str(out / 'checkpoint-3'))} \(--resume_from_checkpoint auto resumes from it\)",
            message,
        ), message
    print(f"disk full: exit {result.returncode} after {seconds:.1f} s: {messages[0]}")
    assert (out / "checkpoint-4" / "model.safetensors").is_file()  # partly written ...
    assert checkpoint_problem(out / "checkpoint-4").startswith(f"no {COMPLETE_MARKER}")
    assert checkpoint_problem(out / "checkpoint-3", verify_content=True) is None  # ... and the previous one intact
    assert find_latest_complete_checkpoint(out) == out / "checkpoint-3"

    resume = {**env, "RESUME": "auto", FAULT_ENV: "nonfinite_loss@step=4"}
    result, seconds = run_to_exit(resume, "--max_steps", "5", "--nonfinite", "skip")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert f"Resuming from checkpoint {out / 'checkpoint-3'}." in output
    assert f"Skipping incomplete checkpoint {out / 'checkpoint-4'}" in output
    rows = logged_rows(out)
    assert {step: row[SKIPPED_STEPS_KEY] for step, row in rows.items()} == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    assert math.isnan(rows[4]["loss"]) and math.isinf(rows[4]["grad_norm"]) and math.isfinite(rows[5]["loss"])
    assert rows[5]["learning_rate"] == rows[4]["learning_rate"] != rows[3]["learning_rate"]  # no scheduler step
    for step in (3, 4, 5):
        assert checkpoint_problem(out / f"checkpoint-{step}", verify_content=True) is None, step
    assert_same_training_state(out / "checkpoint-3", out / "checkpoint-4")
    assert [engine_skipped_steps(out / f"checkpoint-{step}") for step in (3, 4, 5)] == [0, 1, 1]
    final, before = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(final[name], before[name]) for name in final)  # step 5 trained again
    assert all(torch.isfinite(tensor).all() for tensor in final.values())
    print(f"resume with skip: exit 0 after {seconds:.1f} s")
