"""Exit codes of training runs that stop on purpose, and the error that carries one to ``main``.

A job scheduler (or a wrapper script) can tell these apart from a crash (1) and react: a diverged run
(:data:`EXIT_NONFINITE`) needs a look at the data or the learning rate, a failed save (:data:`EXIT_SAVE_FAILED`)
needs disk space, after which ``--resume_from_checkpoint auto`` continues. The values follow BSD's sysexits.
Under the DeepSpeed launcher the job exits with the code of the first rank that failed.
"""

from __future__ import annotations

import os

from llava.training.checkpoints import CheckpointResumeError, find_latest_complete_checkpoint

EXIT_NONFINITE = 65
"""EX_DATAERR: a non-finite loss or gradient norm stopped the run (``--nonfinite stop``, or too many skips)."""

EXIT_SAVE_FAILED = 74
"""EX_IOERR: writing a checkpoint (or the final model) failed, e.g. ``No space left on device``."""

EXIT_LOST_PEER = 69
"""EX_UNAVAILABLE: a collective failed because another rank of the job died or stalled."""

EXIT_PREEMPTED = 75
"""EX_TEMPFAIL: a preemption signal stopped the run after a complete checkpoint; requeue it with ``auto``."""


class TrainingStoppedError(RuntimeError):
    """The run stops on purpose; ``main`` logs the message once and exits with :attr:`exit_code`."""

    exit_code = 1
    group_is_broken = False
    """Whether the process group failed under this rank (a peer died): tearing it down, or letting the
    interpreter destroy it at exit, can then crash the process (gloo aborts or segfaults in its destructors), so
    ``main`` leaves without either."""

    def __init__(self, message: str, report: bool = True) -> None:
        """``report``: whether this process logs the message (one process per event, not every rank)."""
        super().__init__(message)
        self.report = report


def resume_hint(output_dir: str | os.PathLike[str]) -> str:
    """A sentence naming the checkpoint ``--resume_from_checkpoint auto`` would resume from, for stop messages."""
    try:
        latest = find_latest_complete_checkpoint(output_dir, verify_content=False)
    except CheckpointResumeError as error:
        return str(error)
    if latest is None:
        return f"There is no complete checkpoint in {output_dir} yet."
    return f"The last complete checkpoint is {latest} (--resume_from_checkpoint auto resumes from it)."
