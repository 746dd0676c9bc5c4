"""What a rank does when the job around it fails: collectives wait a bounded time, and a rank whose peer died
stops with a message that says so (and where to resume) instead of hanging or dying with a bare backend error.

A killed peer usually fails the next collective at once (its connections close); a stalled one fails it after
``--ddp_timeout`` seconds (transformers' default, 1800; the launch scripts' ``COLLECTIVE_TIMEOUT``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta

import torch
from transformers import TrainingArguments

from llava.training.exit_codes import EXIT_LOST_PEER, TrainingStoppedError, resume_hint

LOST_PEER_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "timed out",
    "Watchdog caught collective operation timeout",
    "NCCL communicator was aborted",
)
"""Text of the gloo/NCCL errors a collective raises when a peer is gone (when the backend raises a plain
``RuntimeError`` rather than a ``torch.distributed.DistError``)."""


class LostPeerError(TrainingStoppedError):
    """A collective failed because a peer rank is gone; the job cannot go on."""

    exit_code = EXIT_LOST_PEER
    group_is_broken = True


def collective_timeout(argv: list[str]) -> timedelta:
    """``--ddp_timeout`` of ``argv`` (seconds; transformers' default, 1800, when absent): how long a rank waits in
    a collective for its peers before it fails instead of hanging."""
    value = str(TrainingArguments.ddp_timeout)
    for index, arg in enumerate(argv):
        if arg == "--ddp_timeout" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--ddp_timeout="):
            value = arg.split("=", 1)[1]
    try:
        seconds = int(value)
    except ValueError:
        raise ValueError(f"--ddp_timeout must be a whole number of seconds, got {value!r}") from None
    if seconds < 1:
        raise ValueError(f"--ddp_timeout must be >= 1 second, got {seconds}")
    return timedelta(seconds=seconds)


def collective_device(backend: str) -> torch.device:
    """Where a tensor for a collective of ``backend`` must live: the current CUDA device for NCCL, else the CPU
    (gloo, and DeepSpeed's CPU ranks)."""
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a peer died or stalled."""
    if isinstance(error, torch.distributed.DistError):
        return True
    return isinstance(error, RuntimeError) and any(sign in str(error) for sign in LOST_PEER_SIGNS)


@contextlib.contextmanager
def lost_peers_end_the_run(output_dir: str | os.PathLike[str], rank: int) -> Iterator[None]:
    """Turn a collective that failed on a lost peer into a :class:`LostPeerError` naming this rank, the failed
    operation and the checkpoint to resume from (other errors pass unchanged)."""
    try:
        yield
    except RuntimeError as error:
        if isinstance(error, TrainingStoppedError) or not is_lost_peer(error):
            raise
        what = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LostPeerError(
            f"rank {rank} lost a peer: a collective operation failed ({what}). Another rank of this job died or "
            f"stalled (killed, out of memory, node lost); this rank stops instead of waiting. {resume_hint(output_dir)}"
        ) from error
