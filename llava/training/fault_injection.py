"""Test-only fault injection: make one training step's loss non-finite, or one checkpoint save fail.

Tests of the failure handling (``tests/test_faults_nonfinite.py``) need a real training run, through the
real launch scripts and DeepSpeed ranks, to hit a fault at a known step. The environment variable
:data:`FAULT_ENV` names the faults; unset (always, outside such tests) nothing here does anything::

    DUET_INJECT_FAULT=nonfinite_loss@step=3            # every rank's loss of optimizer step 3 becomes NaN
    DUET_INJECT_FAULT=nonfinite_loss@step=3,rank=1     # only rank 1's
    DUET_INJECT_FAULT=enospc_on_save@step=4            # saving checkpoint-4 raises OSError(ENOSPC)
    DUET_INJECT_FAULT="nonfinite_loss@step=3;enospc_on_save@step=4"

Steps are optimizer steps counted from 1 (``checkpoint-<step>``); ranks are global ranks. The hooks are called
by :class:`~llava.training.trainer.LlavaTrainer` (``compute_loss``, ``save_model``), and every process logs a
loud warning when a fault is armed, so a run can never be affected without saying so.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

FAULT_ENV = "DUET_INJECT_FAULT"
"""Environment variable naming the faults to inject (test-only)."""

NONFINITE_LOSS = "nonfinite_loss"
"""Multiply the loss of the step's micro-batches by NaN before backward (the gradients become NaN too)."""

ENOSPC_ON_SAVE = "enospc_on_save"
"""Raise ``OSError(ENOSPC)`` from ``save_model`` of that step's checkpoint, after the model files are written."""

KINDS = (NONFINITE_LOSS, ENOSPC_ON_SAVE)


class FaultSpecError(ValueError):
    """:data:`FAULT_ENV` holds something that is not a fault specification."""


@dataclass(frozen=True)
class Fault:
    """One armed fault: what happens, at which optimizer step, on which rank (``None``: every rank)."""

    kind: str
    step: int
    rank: int | None = None

    def applies(self, kind: str, step: int, rank: int) -> bool:
        """Whether this fault fires for ``kind`` at optimizer ``step`` on global ``rank``."""
        return self.kind == kind and self.step == step and (self.rank is None or self.rank == rank)


def parse_faults(spec: str) -> tuple[Fault, ...]:
    """``"kind@step=N[,rank=R][;kind@...]"`` into faults; :class:`FaultSpecError` says what is wrong."""
    faults = []
    for part in filter(None, (piece.strip() for piece in spec.split(";"))):
        kind, _, settings = part.partition("@")
        kind = kind.strip()
        if kind not in KINDS:
            raise FaultSpecError(f"{FAULT_ENV}: unknown fault {kind!r} in {part!r} (known: {', '.join(KINDS)})")
        values: dict[str, int] = {}
        for setting in filter(None, (piece.strip() for piece in settings.split(","))):
            key, _, value = setting.partition("=")
            key = key.strip()
            if key not in ("step", "rank") or key in values:
                raise FaultSpecError(f"{FAULT_ENV}: {setting!r} in {part!r} is not step=N or rank=R (once each)")
            try:
                values[key] = int(value)
            except ValueError:
                raise FaultSpecError(f"{FAULT_ENV}: {setting!r} in {part!r} needs an integer") from None
        if values.get("step", 0) < 1 or values.get("rank", 0) < 0:
            raise FaultSpecError(f"{FAULT_ENV}: {part!r} needs step=N with N >= 1 (and rank=R >= 0 if given)")
        faults.append(Fault(kind, values["step"], values.get("rank")))
    return tuple(faults)


def armed_faults(environ: Mapping[str, str] | None = None) -> tuple[Fault, ...]:
    """The faults :data:`FAULT_ENV` arms (none when unset), with a loud warning when there are any."""
    spec = (os.environ if environ is None else environ).get(FAULT_ENV, "")
    faults = parse_faults(spec)
    if faults:
        logger.warning(
            "TEST-ONLY FAULT INJECTION IS ACTIVE (%s=%r): this run will fail on purpose. Unset %s for real training.",
            FAULT_ENV,
            spec,
            FAULT_ENV,
        )
    return faults


def _fires(faults: tuple[Fault, ...], kind: str, step: int, rank: int) -> bool:
    return any(fault.applies(kind, step, rank) for fault in faults)


def corrupt_loss(loss: torch.Tensor, faults: tuple[Fault, ...], step: int, rank: int) -> torch.Tensor:
    """``loss`` times NaN when a :data:`NONFINITE_LOSS` fault fires at optimizer ``step`` on ``rank``, else ``loss``."""
    if not _fires(faults, NONFINITE_LOSS, step, rank):
        return loss
    logger.warning("Injected fault: the loss of step %d on rank %d is made NaN (%s).", step, rank, FAULT_ENV)
    return loss * float("nan")


def fail_save(output_dir: str | os.PathLike[str], faults: tuple[Fault, ...], step: int, rank: int) -> None:
    """Raise ``OSError(ENOSPC)`` naming ``output_dir`` when an :data:`ENOSPC_ON_SAVE` fault fires."""
    if _fires(faults, ENOSPC_ON_SAVE, step, rank):
        logger.warning("Injected fault: saving %s fails with ENOSPC on rank %d (%s).", output_dir, rank, FAULT_ENV)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(output_dir))
