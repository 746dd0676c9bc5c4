"""Two "nodes" of one rank each on this machine, launched the way multi-node jobs without ssh are (one DeepSpeed
launcher per node, ``NODE_RANK`` + ``HOSTFILE`` + ``MASTER_ADDR``): training, checkpoints and resume across
nodes, and a node whose rank is SIGKILLed (the other must fail fast, naming the lost peer, not hang)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava.training.exit_codes import EXIT_LOST_PEER
from tests.test_distributed import REPO, finetune_env, free_port, losses

NODE_LIMIT_S = 300
"""Longest a node may take before the test kills it (a hang fails the test instead of the CI run)."""
COLLECTIVE_TIMEOUT_S = 60
"""``COLLECTIVE_TIMEOUT`` of these runs: a survivor must exit well within it."""


def node_env(playground: Path, output_dir: Path, hostfile: Path, node_rank: int, **overrides: str) -> dict[str, str]:
    env = finetune_env(playground, output_dir, **overrides)
    env.update(
        HOSTFILE=str(hostfile),
        MASTER_ADDR="127.0.0.1",
        NODE_RANK=str(node_rank),
        NUM_GPUS="1",
        COLLECTIVE_TIMEOUT=str(COLLECTIVE_TIMEOUT_S),
    )
    return env


def start_nodes(
    playground: Path, output_dir: Path, tmp_path: Path, label: str, *args: str, **overrides: str
) -> list[tuple[subprocess.Popen, Path]]:
    """Both nodes' launchers, started together (same MASTER_PORT); each in its own session, its output in
    ``tmp_path/<label>-node<rank>.log``."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")
    port = None
    processes = []
    for node_rank in (0, 1):
        env = node_env(playground, output_dir, hostfile, node_rank, **overrides)
        if port is None:
            port = env["MASTER_PORT"]
        env["MASTER_PORT"] = port
        log_path = tmp_path / f"{label}-node{node_rank}.log"
        command = ["bash", str(REPO / "scripts" / "v1_5" / "finetune.sh"), *args]
        with log_path.open("w") as log:
            process = subprocess.Popen(
                command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        processes.append((process, log_path))
    return processes


def wait_nodes(processes: list[tuple[subprocess.Popen, Path]]) -> list[tuple[int, str, float]]:
    """(exit code, output, seconds until exit) of each node; kills both when one outlives ``NODE_LIMIT_S``."""
    start = time.monotonic()
    results = []
    for process, log_path in processes:
        remaining = max(1.0, NODE_LIMIT_S - (time.monotonic() - start))
        try:
            process.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            for other, _ in processes:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            process.wait()
        results.append((process.returncode, log_path.read_text(), time.monotonic() - start))
    return results


def rank_pids(launcher_pid: int) -> list[int]:
    """PIDs of the training ranks under a launcher: processes of its session started as ``-m llava.training.train``
    whose parent is not one (a data-loader worker is a fork of its rank)."""
    commands: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if os.getsid(int(entry.name)) == launcher_pid:
                commands[int(entry.name)] = (command, parent)
        except (OSError, ProcessLookupError, ValueError):
            continue

    def is_rank(pid: int) -> bool:
        return pid in commands and " -m llava.training.train " in commands[pid][0]

    return [pid for pid, (_, parent) in commands.items() if is_rank(pid) and not is_rank(parent)]


def markers(output_dir: Path) -> dict[str, int]:
    return {path.parent.name: 1 for path in output_dir.glob("checkpoint-*/checkpoint_complete.json")}


def test_two_nodes_checkpoint_once_verify_per_node_survive_a_killed_node_and_resume(playground, tmp_path):
    """One chain (each launch costs two model loads): train, refuse a damaged checkpoint on each node, resume and
    lose node 1's rank (SIGKILL), resume again."""
    out = tmp_path / "run"
    results = wait_nodes(start_nodes(playground, out, tmp_path, "first", "--max_steps", "4"))
    assert [code for code, _, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert markers(out) == {"checkpoint-2": 1, "checkpoint-4": 1}
    # One process in the whole job writes each marker (global rank 0, on node 0), not one per node.
    for step in (2, 4):
        marker = json.loads((out / f"checkpoint-{step}" / "checkpoint_complete.json").read_text())
        assert marker["writer"]["rank"] == 0, marker["writer"]
        assert results[0][1].count(f"checkpoint-{step} marked complete") == 1
    assert json.loads((out / "run_config.json").read_text())["world_size"] == 2

    # Resume on both nodes: each node's local rank 0 verifies the checkpoint's checksums. Damage one file, and
    # both nodes refuse it by name (so the check ran on each node).
    weights = sorted((out / "checkpoint-4").rglob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    damaged = wait_nodes(start_nodes(playground, out, tmp_path, "damaged", "--max_steps", "6", RESUME="auto"))
    for code, output, _ in damaged:
        assert code != 0 and "is corrupted: file content changed" in output, output[-3000:]
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    # Resumed, then node 1's rank dies (SIGKILL) once a newer checkpoint is complete: node 0's rank must stop on
    # its own, fast, naming the lost peer and the checkpoint to resume from.
    processes = start_nodes(playground, out, tmp_path, "killed", "--max_steps", "40", RESUME="auto")
    deadline = time.monotonic() + NODE_LIMIT_S
    while "checkpoint-6" not in markers(out):
        assert time.monotonic() < deadline and processes[0][0].poll() is None, "checkpoint-6 was never completed"
        time.sleep(0.5)
    victims = rank_pids(processes[1][0].pid)
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.monotonic()
    results = wait_nodes(processes)
    seconds_to_exit = time.monotonic() - killed_at
    survivor_code, survivor_log, _ = results[0]
    (tmp_path / "observed.json").write_text(  # kept with the logs, for the record
        json.dumps({"exit codes": [code for code, _, _ in results], "seconds from kill to exit": seconds_to_exit})
    )
    assert "Resuming from checkpoint" in survivor_log
    assert results[1][0] != 0  # the killed node's launcher reports the death
    assert survivor_code == EXIT_LOST_PEER, survivor_log[-3000:]
    assert seconds_to_exit < COLLECTIVE_TIMEOUT_S, seconds_to_exit
    assert "rank 0 lost a peer: a collective operation failed" in survivor_log, survivor_log[-3000:]
    assert "--resume_from_checkpoint auto resumes from it" in survivor_log

    before = max(int(name.split("-")[1]) for name in markers(out))
    processes = start_nodes(playground, out, tmp_path, "resumed", "--max_steps", str(before + 2), RESUME="auto")
    resumed = wait_nodes(processes)
    assert [code for code, _, _ in resumed] == [0, 0], resumed[0][1][-3000:] + resumed[1][1][-3000:]
    assert f"Resuming from checkpoint {out / f'checkpoint-{before}'}" in resumed[0][1]
    assert max(losses(out)) == before + 2


@pytest.mark.parametrize("argv", [["--ddp_timeout", "0"], ["--ddp_timeout=soon"]])
def test_collective_timeout_is_checked(argv: list[str]) -> None:
    from llava.training.cluster import collective_timeout

    with pytest.raises(ValueError, match="--ddp_timeout must be"):
        collective_timeout(argv)


def test_collective_timeout_default_and_value() -> None:
    from llava.training.cluster import collective_timeout

    assert collective_timeout([]).total_seconds() == 1800
    assert collective_timeout(["--x", "1", "--ddp_timeout", "90"]).total_seconds() == 90
    assert collective_timeout(["--ddp_timeout=45"]).total_seconds() == 45


def test_a_lost_peer_becomes_a_named_stop(tmp_path: Path) -> None:
    import torch

    from llava.training.cluster import LostPeerError, is_lost_peer, lost_peers_end_the_run

    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:3")
    assert is_lost_peer(gloo) and is_lost_peer(torch.distributed.DistBackendError("NCCL error"))
    assert not is_lost_peer(RuntimeError("CUDA out of memory")) and not is_lost_peer(ValueError("timed out"))
    with pytest.raises(LostPeerError) as stopped, lost_peers_end_the_run(tmp_path, rank=1):
        raise gloo
    assert stopped.value.exit_code == EXIT_LOST_PEER == 69
    assert str(stopped.value).startswith("rank 1 lost a peer: a collective operation failed ([../third_party/gloo")
    assert f"There is no complete checkpoint in {tmp_path} yet." in str(stopped.value)
    with pytest.raises(RuntimeError, match="CUDA out of memory"), lost_peers_end_the_run(tmp_path, rank=0):
        raise RuntimeError("CUDA out of memory")


LOST_PEER_RANK = """
import atexit, os, sys
from datetime import timedelta
from pathlib import Path

import torch

from llava.training import train as train_module
from llava.training.cluster import lost_peers_end_the_run

rank, output_dir = int(sys.argv[1]), Path(sys.argv[2])
train_module.SHM_DIR = output_dir / "shm"
atexit.register(lambda: print("interpreter teardown ran", flush=True))


def train(argv):  # a job whose rank 1 dies (SIGKILL) mid-collective
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    values = torch.ones(1 << 16)
    with lost_peers_end_the_run(output_dir, rank):
        for step in range(10_000):
            torch.distributed.all_reduce(values)
            if rank == 1 and step == 5:
                os.kill(os.getpid(), 9)


train_module.train = train
train_module.main()
"""


def test_a_rank_that_lost_its_peer_exits_with_the_code_not_a_crash(tmp_path: Path) -> None:
    """The survivor of a real gloo job whose peer was SIGKILLed goes through ``main``: it names the loss, removes
    its shared-memory buffers and exits with EXIT_LOST_PEER, without tearing the broken group down (gloo's
    destructors aborted or segfaulted now and then, so the job reported -6/-11 instead of 69)."""
    (tmp_path / "shm").mkdir()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    buffer = tmp_path / "shm" / f"deepspeed_allreduce_buffer_0_127.0.0.1_{env['MASTER_PORT']}_0"
    buffer.write_bytes(b"x")
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", LOST_PEER_RANK, str(rank), str(tmp_path)],
            env={**env, "RANK": str(rank)}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = [process.communicate(timeout=120)[0] for process in ranks]
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode == EXIT_LOST_PEER, outputs[0][-3000:]
    assert "rank 0 lost a peer: a collective operation failed" in outputs[0]
    assert "terminate called" not in outputs[0] and "interpreter teardown ran" not in outputs[0]
    assert not buffer.exists()


def test_a_lost_peer_exit_closes_the_wandb_run_as_failed(monkeypatch, caplog) -> None:
    from types import SimpleNamespace

    from llava.training.train import finish_wandb_run

    finished: list[int] = []
    monkeypatch.setitem(
        sys.modules, "wandb", SimpleNamespace(run=object(), finish=lambda exit_code: finished.append(exit_code))
    )
    finish_wandb_run(EXIT_LOST_PEER)
    assert finished == [EXIT_LOST_PEER]
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=None, finish=lambda exit_code: finished.append(0)))
    finish_wandb_run(EXIT_LOST_PEER)  # no open run: nothing to close
    assert finished == [EXIT_LOST_PEER]

    def broken_finish(exit_code: int) -> None:
        raise ConnectionError("wandb service gone")

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(run=object(), finish=broken_finish))
    finish_wandb_run(EXIT_LOST_PEER)  # logged, not raised: the exit code still reaches the scheduler
    assert "Could not finish the wandb run before exiting: wandb service gone" in caplog.text
