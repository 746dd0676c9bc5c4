"""A checkpoint save that fails (disk full, quota, I/O error) ends the run with one clear message.

What stays valid: a checkpoint is marked complete only after every file of it was written (see
:mod:`llava.training.checkpoints`), so the folder a failed save leaves behind has no completion marker and
``--resume_from_checkpoint auto`` skips it for the previous complete checkpoint. :class:`SaveWatch` knows
which save is in progress (from the Trainer's decision to save until ``on_save``, and the final save after
``on_train_end``); :meth:`SaveWatch.failures_end_the_run` turns a write failure raised meanwhile into
:class:`SaveFailedError` (exit code :data:`EXIT_SAVE_FAILED`) naming the folder, the failure and the last
complete checkpoint. Under the DeepSpeed launcher, a rank exiting non-zero makes the launcher stop the others,
so ranks still waiting in a collective of the save do not hang.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llava.training.checkpoints import CHECKPOINT_PREFIX, COMPLETE_MARKER
from llava.training.exit_codes import EXIT_SAVE_FAILED, TrainingStoppedError, resume_hint

logger = logging.getLogger(__name__)

WRITE_FAILURE_MARKERS = ("PytorchStreamWriter failed", "file write failed", "unexpected pos", "I/O error", "os error")
"""How writers that do not raise ``OSError`` report one: ``torch.save`` raises ``RuntimeError`` ("[enforce fail
at inline_container.cc] unexpected pos ..." on a full disk), safetensors ``SafetensorError`` ("I/O error: ...
(os error 28)")."""


class SaveFailedError(TrainingStoppedError):
    """Writing a checkpoint or the final model failed; the message names the folder and the last complete one."""

    exit_code = EXIT_SAVE_FAILED


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed write: an ``OSError``, or a writer's error that says so."""
    return isinstance(error, OSError) or any(marker in str(error) for marker in WRITE_FAILURE_MARKERS)


def save_failure_message(target: Path, error: BaseException, output_dir: str | os.PathLike[str], rank: int) -> str:
    """What failed (``target``: a checkpoint folder or the final output folder), why, and what remains valid."""
    cause = str(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error} (a write failed)"
    if target.name.startswith(f"{CHECKPOINT_PREFIX}-"):
        what = f"Saving checkpoint {target} failed on rank {rank}: {cause}."
        left = f"{target} has no {COMPLETE_MARKER}, so it is never resumed from."
    else:
        what = f"Saving the final model to {target} failed on rank {rank}: {cause}."
        left = "The files written there are incomplete; the checkpoints are unaffected."
    return f"{what} {left} {resume_hint(output_dir)} Free space (or fix the write error) and resume."


class SaveWatch(TrainerCallback):
    """Tracks which save is in progress, so a write failure during it ends the run as :class:`SaveFailedError`."""

    def __init__(self) -> None:
        self.saving: Path | None = None

    def _note_checkpoint(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        # DefaultFlowCallback (registered first) has already decided control.should_save.
        if control.should_save:
            self.saving = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """A checkpoint save of this step starts after the step's logging."""
        self._note_checkpoint(args, state, control)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Same for an epoch-end save."""
        self._note_checkpoint(args, state, control)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """The checkpoint was written (and marked complete by the completion callback, registered before)."""
        self.saving = None

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """What follows ``trainer.train()`` is the final save into ``output_dir``."""
        self.saving = Path(args.output_dir)

    @contextmanager
    def failures_end_the_run(self, output_dir: str | os.PathLike[str], rank: int) -> Iterator[None]:
        """Re-raise a write failure during a save as :class:`SaveFailedError`; anything else unchanged."""
        try:
            yield
        except Exception as error:
            if self.saving is None or isinstance(error, TrainingStoppedError) or not is_write_failure(error):
                raise
            raise SaveFailedError(save_failure_message(self.saving, error, output_dir, rank)) from error
