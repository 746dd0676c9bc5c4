"""Save on a preemption signal, then exit so the job is requeued.

Clusters announce a preemption with a signal: SLURM sends the one ``#SBATCH --signal=B:USR1@120`` names two
minutes before the time limit (``scripts/slurm/train.sbatch`` forwards it to the ranks), Kubernetes sends SIGTERM
and SIGKILLs after ``terminationGracePeriodSeconds``. ``--save_on_signal`` (default ``TERM,USR1``) lists them.

* :class:`SignalFlag`: the handler only records the signal (no I/O, no locks, nothing a half-finished
  operation could trip over); it stays installed while the checkpoint is saved, so a second signal changes nothing.
* :class:`SaveOnSignalCallback`: at each optimizer-step boundary (``on_step_end``: after gradient accumulation)
  all ranks agree with one all-reduce (MAX of 0/1) whether a signal reached any of them, so a signal that reached
  one rank only still stops all; then the Trainer saves a normal checkpoint (marked complete by
  :class:`~llava.training.checkpoints.CheckpointCompletionCallback`) and stops.
* ``train()`` then skips the final save and raises :class:`TrainingPreempted`; ``main()`` leaves with every rank
  and exits with :data:`PREEMPTED_EXIT_CODE` (75), which the DeepSpeed launcher passes on (it exits with the
  first non-zero rank exit code). A rerun with ``--resume_from_checkpoint auto`` continues from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llava.training.checkpoints import CHECKPOINT_PREFIX, is_checkpoint_complete
from llava.training.cluster import collective_device
from llava.training.exit_codes import EXIT_PREEMPTED

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = EXIT_PREEMPTED
"""75, ``EX_TEMPFAIL`` ("temporary failure, try again"): ``scripts/slurm/train.sbatch`` requeues the job on it."""

Handler = Any  # what signal.signal returns: a callable, SIG_DFL, SIG_IGN or None


class SignalFlag:
    """Records the first of ``signals`` to arrive (its number and when) and how many arrived; nothing else.

    Use as a context manager around a training run: entering installs the handlers, leaving restores the
    previous ones, except when leaving by :class:`TrainingPreempted`: that process is on its way out, and the
    DeepSpeed launcher SIGTERMs ranks still tearing down once a peer has exited, which must not kill them.
    """

    def __init__(self, signals: tuple[signal.Signals, ...]) -> None:
        self.signals = signals
        self.signum: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.count = 0
        self._previous: dict[signal.Signals, Handler] = {}

    @property
    def received(self) -> bool:
        """Whether one of the signals has arrived."""
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """Name of the first signal that arrived (``SIGTERM``), ``None`` before."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self.received_at = signum, time.monotonic()
        self.count += 1

    def install(self) -> SignalFlag:
        """Install the handlers (main thread only), keeping the previous ones for :meth:`restore`."""
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
            # Restart interrupted system calls: a socket read inside a collective must not fail with EINTR.
            signal.siginterrupt(signum, False)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def __enter__(self) -> SignalFlag:
        return self.install()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if not isinstance(error, TrainingPreempted):
            self.restore()


class TrainingPreempted(Exception):  # noqa: N818 (a requested stop, not an error)
    """Raised by ``train()`` after a preemption signal: a complete checkpoint is saved, the final model is not."""

    exit_code = PREEMPTED_EXIT_CODE

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by a preemption signal after step {step}; resume from {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank: one all-reduce (MAX) of a 0/1 tensor; ``flag`` itself without a
    process group. Every rank must call it at the same point."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32, device=collective_device(str(dist.get_backend())))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class SaveOnSignalCallback(TrainerCallback):
    """Turn a preemption signal on any rank into a checkpoint at the next optimizer-step boundary and a stop.

    Register it before :class:`~llava.training.checkpoints.CheckpointCompletionCallback`, whose ``on_step_end``
    must see the ``should_save`` set here (it drops a stale marker before a save into an existing folder).
    """

    def __init__(self, flag: SignalFlag) -> None:
        self.flag = flag
        self.stopped_step: int | None = None
        self.checkpoint: Path | None = None
        self._reported = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Agree across ranks whether to stop; if so, ask the Trainer to save now and stop."""
        if not self.flag.signals or self.stopped_step is not None:
            return
        if self.flag.received and not self._reported:
            self._reported = True
            logger.warning(
                "Rank %d received %s %.1f s ago, before the end of step %d: saving a checkpoint after this step.",
                args.process_index,
                self.flag.name,
                time.monotonic() - (self.flag.received_at or 0.0),
                state.global_step,
            )
        if not any_rank(self.flag.received):
            return
        self.stopped_step = state.global_step
        self.checkpoint = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        control.should_save = True
        control.should_training_stop = True
        if state.is_world_process_zero:
            logger.warning(
                "Preemption signal on at least one rank: saving %s after step %d, then exiting with code %d.",
                self.checkpoint,
                state.global_step,
                PREEMPTED_EXIT_CODE,
            )

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """The stop breaks the epoch: no second save of the same step for ``--save_strategy epoch``."""
        if self.stopped_step == state.global_step:
            control.should_save = False

    def raise_if_stopped(self, args: TrainingArguments) -> None:
        """After ``trainer.train()``: raise :class:`TrainingPreempted` if a signal stopped the run."""
        if self.stopped_step is None or self.checkpoint is None:
            if self.flag.received:
                logger.warning("%s arrived after the last optimizer step: the run finishes normally.", self.flag.name)
            return
        if args.process_index == 0 and not is_checkpoint_complete(self.checkpoint):  # a failed save raised already
            logger.error("Stopped for preemption, but %s has no completion marker: a resume skips it.", self.checkpoint)
        elif args.process_index == 0:
            logger.warning(
                "Stopped for preemption after step %d: checkpoint %s is complete; the final model is not saved. "
                "Exiting with code %d; rerun with --resume_from_checkpoint auto to continue.",
                self.stopped_step,
                self.checkpoint,
                PREEMPTED_EXIT_CODE,
            )
        raise TrainingPreempted(self.stopped_step, self.checkpoint)
