"""Preemption: a signal makes the ranks save a complete checkpoint at an optimizer-step boundary and exit with 75.

Fault cases on 2 DeepSpeed CPU ranks through ``scripts/v1_5/finetune.sh`` (ZeRO-3, ``GRAD_ACCUM=2``), one chain
sharing one uninterrupted reference run: (b) SIGUSR1 to both ranks mid-run, then (a) SIGTERM to rank 1 only in
the resumed run; each time exit code 75 reaches the shell, and the last ``RESUME=auto`` rerun skips a checkpoint a
kill left half-written and ends with every step's loss equal to the reference's. Then
``scripts/slurm/train.sbatch`` with a fake ``scontrol`` and a fake stage script, and unit tests of the argument,
the signal flag and the callback's decision.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
import torch.distributed as dist
from transformers import HfArgumentParser, TrainerControl, TrainerState

from llava.arguments import LlavaTrainingArguments, parse_signal_names
from llava.training.checkpoints import checkpoint_problem
from llava.training.cluster import collective_device
from llava.training.preemption import (
    PREEMPTED_EXIT_CODE,
    SaveOnSignalCallback,
    SignalFlag,
    TrainingPreempted,
    any_rank,
)
from tests.test_distributed import REPO, STEP_LIMIT_S, finetune_env, losses

MAX_STEPS = 6
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"


# ---- 2 DeepSpeed CPU ranks through finetune.sh -------------------------------------------------------------------


def start_finetune(env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``finetune.sh --max_steps 6`` in its own session, its output into ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            ["bash", str(REPO / "scripts" / "v1_5" / "finetune.sh"), "--max_steps", str(MAX_STEPS)],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def finish(process: subprocess.Popen, log: Path, port: str) -> tuple[int, str]:
    """Wait for the run (killing its whole session after ``STEP_LIMIT_S``); its exit code and output. Every rank,
    preempted or not, removed its DeepSpeed shared-memory buffers."""
    try:
        process.wait(timeout=STEP_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"finetune.sh did not finish in {STEP_LIMIT_S} s:\n{log.read_text()[-6000:]}")
    if Path("/dev/shm").is_dir():
        assert not list(Path("/dev/shm").glob(f"deepspeed_*_{port}_*")), "a rank left its /dev/shm buffer"
    return process.returncode, log.read_text()


def rank_processes(root: int) -> dict[int, psutil.Process]:
    """The DeepSpeed ranks under process ``root`` by local rank: processes running ``-m llava.training.train``
    whose parent does not (a rank's data-loader workers)."""

    def is_rank(process: psutil.Process) -> bool:
        command = process.cmdline()
        return any(command[i : i + 2] == ["-m", "llava.training.train"] for i in range(len(command)))

    ranks = {}
    for process in psutil.Process(root).children(recursive=True):
        try:
            if is_rank(process) and not is_rank(process.parent()):
                local_rank = next(arg for arg in process.cmdline() if arg.startswith("--local_rank="))
                ranks[int(local_rank.split("=")[1])] = process
        except psutil.Error:  # a short-lived process (e.g. a worker) ended while being looked at
            continue
    return ranks


def last_logged_step(output_dir: Path) -> int:
    """The highest step ``metrics.jsonl`` holds a loss for (0 before any), its complete lines only."""
    metrics = output_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True) if metrics.exists() else []
    rows = [json.loads(line) for line in lines if line.endswith("\n")]
    return max([0, *(row["step"] for row in rows if "loss" in row)])


def signal_after_step(process: subprocess.Popen, output_dir: Path, step: int, signum: int, local_ranks: list[int]):
    """Once ``metrics.jsonl`` shows ``step``, send ``signum`` to the ranks ``local_ranks`` (never the launcher)."""
    deadline = time.monotonic() + STEP_LIMIT_S
    while last_logged_step(output_dir) < step:
        assert process.poll() is None, f"the run ended before step {step} could be interrupted"
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.05)
    ranks = rank_processes(process.pid)
    assert sorted(ranks) == [0, 1], ranks
    for local_rank in local_ranks:
        ranks[local_rank].send_signal(signum)


def assert_preempted(output_dir: Path, code: int, log: str, steps_before: int) -> int:
    """The run exited with 75 after saving one complete checkpoint at a whole optimizer step and logging that step
    last; the final save was skipped. Returns the checkpoint's step."""
    assert code == PREEMPTED_EXIT_CODE, log[-6000:]
    logged = sorted(losses(output_dir))
    step = logged[-1]
    assert steps_before < step < MAX_STEPS, logged
    checkpoint = output_dir / f"checkpoint-{step}"
    assert checkpoint_problem(checkpoint, verify_content=True) is None
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert f"saving {checkpoint} after step {step}, then exiting with code 75" in log
    assert f"checkpoint {checkpoint} is complete; the final model is not saved" in log
    assert not (output_dir / "mm_projector.safetensors").exists() and not (output_dir / "model.safetensors").exists()
    return step


def test_signals_save_at_a_step_boundary_exit_75_and_resume_matches_uninterrupted_run(playground, tmp_path):
    settings = {"GRAD_ACCUM": "2", "SAVE_STEPS": "100"}  # only the signals save
    # The uninterrupted reference runs side by side with (b): independent runs (own port, own folder), so one's
    # single-process phases (launcher start, exit) overlap the other's ranks.
    reference_dir = tmp_path / "reference"
    reference_env = finetune_env(playground, reference_dir, **settings)
    reference_run = start_finetune(reference_env, tmp_path / "reference.log")

    # (b) SIGUSR1 to both ranks (as scripts/slurm/train.sbatch forwards it) while step 2 accumulates.
    run_dir = tmp_path / "preempted"
    env = finetune_env(playground, run_dir, **settings)
    try:
        process = start_finetune(env, tmp_path / "usr1.log")
        signal_after_step(process, run_dir, 1, signal.SIGUSR1, [0, 1])
        code, log = finish(process, tmp_path / "usr1.log", env["MASTER_PORT"])
    except BaseException:
        os.killpg(reference_run.pid, signal.SIGKILL)  # a failed (b) must not leave the reference running
        raise
    first_stop = assert_preempted(run_dir, code, log, 0)
    code, reference_log = finish(reference_run, tmp_path / "reference.log", reference_env["MASTER_PORT"])
    assert code == 0, reference_log[-6000:]
    reference = losses(reference_dir)
    assert sorted(reference) == list(range(1, MAX_STEPS + 1))
    assert "Rank 0 received SIGUSR1" in log and "Rank 1 received SIGUSR1" in log

    # (a) The resumed run: SIGTERM to rank 1 only; rank 0 learns it through the collective.
    env = {**finetune_env(playground, run_dir, **settings), "RESUME": "auto"}
    process = start_finetune(env, tmp_path / "term.log")
    signal_after_step(process, run_dir, first_stop + 1, signal.SIGTERM, [1])
    code, log = finish(process, tmp_path / "term.log", env["MASTER_PORT"])
    assert f"Resuming from checkpoint {run_dir / f'checkpoint-{first_stop}'}" in log
    second_stop = assert_preempted(run_dir, code, log, first_stop)
    assert "Rank 1 received SIGTERM" in log and "Rank 0 received" not in log

    # A checkpoint a kill left half-written (no completion marker) must be skipped, not resumed from.
    half_written = run_dir / f"checkpoint-{second_stop + 1}"
    half_written.mkdir()
    (half_written / "trainer_state.json").write_text("{")
    env = {**finetune_env(playground, run_dir, **settings), "RESUME": "auto"}
    code, log = finish(start_finetune(env, tmp_path / "rest.log"), tmp_path / "rest.log", env["MASTER_PORT"])
    assert code == 0, log[-6000:]
    assert f"Skipping incomplete checkpoint {half_written}" in log
    assert f"Resuming from checkpoint {run_dir / f'checkpoint-{second_stop}'}" in log
    assert (run_dir / "mm_projector.safetensors").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Every step was trained exactly once over the three runs (none lost, none repeated), with the same loss.
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, MAX_STEPS + 1))
    assert losses(run_dir) == reference


# ---- scripts/slurm/train.sbatch with fakes --------------------------------------------------------------------

FAKES = {
    # Stands in for scripts/v1_5/<stage>.sh: FAKE_EXIT=N exits N at once; otherwise it execs the "launcher", as
    # common.sh execs `deepspeed ... --module llava.training.train`.
    "stage.sh": r"""set -euo pipefail
echo "RESUME=${RESUME-} ARGS=$*" >"$FAKE_DIR/stage"
[[ -z "${FAKE_EXIT:-}" ]] || exit "$FAKE_EXIT"
exec bash "$FAKE_DIR/launcher.sh" --module llava.training.train
""",
    # The DeepSpeed launcher, with its command line and without a USR1 trap (a USR1 sent to it kills it): it starts
    # one rank and exits with the rank's code.
    "launcher.sh": r"""bash "$FAKE_DIR/rank.sh" -m llava.training.train --local_rank=0 &
wait $!
""",
    # A rank: its forked "data-loader worker" has the same command line (and notes any USR1 it gets); on USR1 the
    # rank notes it and exits 75, as a preempted rank does.
    "rank.sh": r"""( trap 'echo $BASHPID >"$FAKE_DIR/worker_got_usr1"' USR1; while :; do sleep 0.1; done ) &
worker=$!
trap 'echo $$ >"$FAKE_DIR/rank_got_usr1"; kill $worker; exit 75' USR1
echo $$ >"$FAKE_DIR/rank_ready"
wait $worker
""",
}


def sbatch(tmp_path: Path, **env: str) -> subprocess.Popen:
    """Start ``train.sbatch`` as SLURM would run the batch shell: fake stage script, fake ``scontrol`` on PATH."""
    bin_dir, fake_dir = tmp_path / "bin", tmp_path / "fake"
    bin_dir.mkdir(exist_ok=True)
    fake_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/usr/bin/env bash\necho "$*" >>"{fake_dir / "scontrol"}"\n')
    scontrol.chmod(0o755)
    for name, text in FAKES.items():
        (fake_dir / name).write_text(text)
    full_env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "STAGE_SCRIPT": str(fake_dir / "stage.sh"),
        "FAKE_DIR": str(fake_dir),
        "OUTPUT_DIR": str(tmp_path / "run"),
        **env,
    }
    full_env.pop("RESUME", None)
    return subprocess.Popen(
        ["bash", str(SBATCH), "--max_steps", "9"], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def finish_sbatch(process: subprocess.Popen) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"train.sbatch did not finish: {stderr}")
    return process.returncode, stderr


def test_sbatch_requeues_on_exit_75_and_resumes_from_a_complete_checkpoint(tmp_path):
    marker = tmp_path / "run" / "checkpoint-4" / "checkpoint_complete.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    code, stderr = finish_sbatch(sbatch(tmp_path, FAKE_EXIT="75", SLURM_JOB_ID="4242"))
    assert code == PREEMPTED_EXIT_CODE, stderr
    assert (tmp_path / "fake" / "scontrol").read_text() == "requeue 4242\n"
    assert (tmp_path / "fake" / "stage").read_text() == "RESUME=auto ARGS=--max_steps 9\n"


@pytest.mark.parametrize(("exit_code", "job_id"), [(0, "4242"), (3, "4242"), (75, "")])
def test_sbatch_passes_other_exit_codes_through_without_requeue(tmp_path, exit_code, job_id):
    """Success, a failure, and 75 outside SLURM (a Kubernetes pod): the code passes through, nothing requeues; with
    no complete checkpoint (only an unfinished one) the stage starts fresh."""
    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    code, stderr = finish_sbatch(sbatch(tmp_path, FAKE_EXIT=str(exit_code), SLURM_JOB_ID=job_id))
    assert code == exit_code, stderr
    assert not (tmp_path / "fake" / "scontrol").exists()
    assert (tmp_path / "fake" / "stage").read_text() == "RESUME= ARGS=--max_steps 9\n"


def test_sbatch_forwards_usr1_to_the_rank_only_then_requeues(tmp_path):
    """USR1 to the batch shell (``--signal=B:USR1``) reaches the rank, not the launcher (it would die of it) nor the
    rank's worker, and the rank's 75 requeues the job."""
    process = sbatch(tmp_path, SLURM_JOB_ID="77")
    ready = tmp_path / "fake" / "rank_ready"
    deadline = time.monotonic() + 30
    while not ready.exists() or not ready.read_text().strip():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    rank_pid = ready.read_text().strip()
    process.send_signal(signal.SIGUSR1)
    code, stderr = finish_sbatch(process)
    assert code == PREEMPTED_EXIT_CODE, stderr
    assert f"SIGUSR1: forwarding to the training ranks {rank_pid} (" in stderr
    assert (tmp_path / "fake" / "rank_got_usr1").read_text().strip() == rank_pid
    assert not (tmp_path / "fake" / "worker_got_usr1").exists()
    assert (tmp_path / "fake" / "scontrol").read_text() == "requeue 77\n"


def test_sbatch_script_is_valid_and_shellcheck_clean():
    text = SBATCH.read_text()
    for directive in ("#SBATCH --signal=B:USR1@120", "#SBATCH --requeue"):
        assert directive in text
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    shellcheck = Path(sys.executable).parent / "shellcheck"
    subprocess.run([str(shellcheck), "-x", str(SBATCH)], check=True, cwd=REPO)


# ---- unit tests: the argument, the flag, the decision -----------------------------------------------------------


def test_parse_signal_names():
    assert parse_signal_names("TERM,USR1") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signal_names(" sigusr1 , term,USR1") == (signal.SIGUSR1, signal.SIGTERM)
    assert parse_signal_names("none") == parse_signal_names("") == parse_signal_names(None) == ()
    for bad in ("TERM,FOO", "KILL", "STOP", "TERM,,USR1"):
        with pytest.raises(ValueError, match="--save_on_signal"):
            parse_signal_names(bad)


def test_save_on_signal_argument(tmp_path):
    parser = HfArgumentParser(LlavaTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path)])
    assert args.save_on_signal == "TERM,USR1"
    (args,) = parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--save_on_signal", "none"])
    assert parse_signal_names(args.save_on_signal) == ()
    with pytest.raises(ValueError, match="unknown signal 'HUP2'"):
        parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--save_on_signal", "TERM,HUP2"])


def test_signal_flag_records_the_first_signal_and_restores_the_previous_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with SignalFlag((signal.SIGUSR1, signal.SIGUSR2)) as flag:
        assert not flag.received and flag.name is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal (e.g. during the save) changes nothing
        assert flag.received and flag.name == "SIGUSR2" and flag.count == 2
    assert signal.getsignal(signal.SIGUSR1) is before

    with pytest.raises(TrainingPreempted), SignalFlag((signal.SIGUSR1,)) as flag:
        raise TrainingPreempted(3, Path("checkpoint-3"))
    try:  # leaving for a requeue keeps it installed: the launcher's SIGTERM must not kill a rank tearing down
        assert signal.getsignal(signal.SIGUSR1) == flag._handle
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) is before


def step_end(callback: SaveOnSignalCallback, step: int, output_dir: Path) -> TrainerControl:
    state, control = TrainerState(global_step=step), TrainerControl()
    callback.on_step_end(SimpleNamespace(output_dir=str(output_dir), process_index=0), state, control)
    return control


def test_callback_stops_and_saves_at_the_step_after_a_signal(tmp_path, caplog):
    flag = SignalFlag((signal.SIGTERM,))
    callback = SaveOnSignalCallback(flag)
    control = step_end(callback, 1, tmp_path)
    assert not control.should_save and not control.should_training_stop
    callback.raise_if_stopped(SimpleNamespace(process_index=1))  # not stopped: returns

    flag._handle(signal.SIGTERM, None)  # what the installed handler does
    control = step_end(callback, 2, tmp_path)
    assert control.should_save and control.should_training_stop
    assert callback.stopped_step == 2 and callback.checkpoint == tmp_path / "checkpoint-2"
    epoch_end = TrainerControl(should_save=True)  # --save_strategy epoch: the step's save is enough
    callback.on_epoch_end(SimpleNamespace(), TrainerState(global_step=2), epoch_end)
    assert not epoch_end.should_save
    with pytest.raises(TrainingPreempted) as stopped:
        callback.raise_if_stopped(SimpleNamespace(process_index=1))
    assert (stopped.value.step, stopped.value.exit_code, stopped.value.checkpoint) == (2, 75, tmp_path / "checkpoint-2")
    with caplog.at_level(logging.ERROR, logger="llava.training.preemption"), pytest.raises(TrainingPreempted):
        callback.raise_if_stopped(SimpleNamespace(process_index=0))  # rank 0 checks the (here missing) checkpoint
    assert f"{tmp_path / 'checkpoint-2'} has no completion marker" in caplog.text


def test_callback_is_inert_without_signals(tmp_path):
    flag = SignalFlag(())
    flag._handle(signal.SIGTERM, None)
    control = step_end(SaveOnSignalCallback(flag), 1, tmp_path)
    assert not control.should_save and not control.should_training_stop


def test_any_rank_all_reduces_on_the_cpu_for_gloo():
    assert collective_device("gloo") == torch.device("cpu")
    assert any_rank(True) and not any_rank(False)  # no process group: the local flag
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert any_rank(True) and not any_rank(False)
    finally:
        dist.destroy_process_group()
