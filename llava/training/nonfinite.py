"""Non-finite guard: a NaN/inf loss or gradient norm stops the run (or drops that update), naming the batch.

The HF Trainer filters NaN/inf out of the logged loss (``logging_nan_inf_filter``), so a diverged run logged
plausible numbers and kept training on garbage. :class:`NonFiniteGuard` checks every optimizer step, on every
rank, before the Trainer logs or saves that step:

* the loss of every micro-batch (recorded by ``LlavaTrainer.compute_loss`` as it is computed, no host sync),
* the global gradient norm where DeepSpeed reports it (``engine.get_global_grad_norm()``; not with fp16,
  whose dynamic loss scaling overflows on purpose and DeepSpeed handles that itself),

and agrees across ranks with one small ``all_reduce`` per step (a second collective, gathering the offending
batch's sample ids, runs only when something was non-finite). Then, by ``--nonfinite``:

* ``stop`` (default): raise :class:`NonFiniteError` (exit code :data:`EXIT_NONFINITE`) naming the step, the
  rank(s), the loss values and the sample ids of the offending micro-batches (the data file's ``"id"``, or
  the sample's index in its file when it has none). The step is neither logged nor saved.
* ``skip``: the update is dropped. DeepSpeed's ZeRO optimizers already discard a step whose gradient norm is
  not finite (no optimizer step, no LR-scheduler step, gradients cleared, ``engine.skipped_steps`` + 1); the
  guard checks that ``skipped_steps`` grew and stops if it did not (e.g. ZeRO stage 0, or bf16 with
  ``check_grad_overflow: false``). More than ``--max_nonfinite_skips`` consecutive skipped steps stop the run.
  Without DeepSpeed nothing can drop the update cleanly, so ``skip`` requires ``--deepspeed``.

The non-finite loss is logged as what it was (``LlavaTrainer.log`` puts it back into the interval's ``loss``,
which the Trainer's filter would have replaced), and ``nonfinite_skipped_steps`` counts the skipped steps of
this process (metrics.jsonl, wandb).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llava.training.cluster import collective_device
from llava.training.exit_codes import EXIT_NONFINITE, TrainingStoppedError, resume_hint

logger = logging.getLogger(__name__)

STOP = "stop"
SKIP = "skip"
POLICIES = (STOP, SKIP)
"""Values of ``--nonfinite``."""

SKIPPED_STEPS_KEY = "nonfinite_skipped_steps"
"""Logged count of steps skipped for a non-finite loss or gradient norm (since this process started)."""


class NonFiniteError(TrainingStoppedError):
    """A non-finite loss or gradient norm stopped the run; the message names step, ranks and sample ids."""

    exit_code = EXIT_NONFINITE


@dataclass(frozen=True)
class RankReport:
    """What one rank saw in the step: each micro-batch's loss and sample ids, and the gradient norm."""

    rank: int
    losses: tuple[float, ...]
    sample_ids: tuple[tuple[str, ...] | None, ...]
    grad_norm: float | None = None

    def bad_micro_batches(self) -> list[int]:
        """Indices of the micro-batches whose loss is not finite."""
        return [index for index, loss in enumerate(self.losses) if not math.isfinite(loss)]


def must_stop(policy: str, consecutive_skips: int, max_skips: int) -> bool:
    """Whether a non-finite step stops the run: always under ``stop``; under ``skip`` once ``max_skips``
    consecutive steps were already skipped (``consecutive_skips`` counts those before this one)."""
    if policy not in POLICIES:
        raise ValueError(f"--nonfinite must be one of {POLICIES}, got {policy!r}")
    return policy == STOP or consecutive_skips >= max_skips


def _ids_text(ids: Sequence[str] | None) -> str:
    return "unknown (the batch carries no sample ids)" if ids is None else repr(list(ids))


def describe_step(step: int, reports: Sequence[RankReport], data_files: Sequence[str] = ()) -> str:
    """One line naming what was non-finite at ``step``: the rank(s), their losses and the offending sample ids.

    With every loss finite (only the gradient norm is not) all ranks' ids of the step are listed.
    """
    bad = [report for report in reports if report.bad_micro_batches()]
    grad_norm = next((report.grad_norm for report in reports if report.grad_norm is not None), None)
    grad_text = "" if grad_norm is None else f", gradient norm {grad_norm}"
    if bad:
        ranks = ", ".join(str(report.rank) for report in bad)
        parts = [
            f"rank {report.rank}: loss {report.losses[index]}, sample ids {_ids_text(report.sample_ids[index])}"
            for report in bad
            for index in report.bad_micro_batches()
        ]
        plural = "s" if len(bad) > 1 else ""
        text = f"non-finite loss at step {step} on rank{plural} {ranks}{grad_text} ({'; '.join(parts)})"
    else:
        parts = [
            f"rank {report.rank}: sample ids {_ids_text([i for ids in report.sample_ids for i in (ids or ())])}"
            for report in reports
        ]
        text = f"non-finite gradient norm at step {step}{grad_text}, every loss finite ({'; '.join(parts)})"
    if data_files:
        text += f"; sample ids are the 'id' fields (or indices) in {', '.join(data_files)}"
    return text


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class NonFiniteGuard(TrainerCallback):
    """Checks each optimizer step for a non-finite loss or gradient norm and applies ``--nonfinite``.

    ``LlavaTrainer`` calls :meth:`record` from ``compute_loss`` for every training micro-batch and registers the
    guard as a callback; ``on_step_end`` runs after the optimizer step and before the Trainer logs and saves.
    ``engine`` returns the DeepSpeed engine (``None`` without DeepSpeed).
    """

    def __init__(
        self,
        policy: str = STOP,
        max_skips: int = 3,
        engine: Callable[[], Any] | None = None,
        data_files: Sequence[str] = (),
    ) -> None:
        must_stop(policy, 0, max_skips)  # validates the policy
        self.policy = policy
        self.max_skips = max_skips
        self.engine = engine or (lambda: None)
        self.data_files = tuple(data_files)
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self._losses: list[torch.Tensor] = []
        self._sample_ids: list[tuple[str, ...] | None] = []
        self._engine_skipped_before = 0
        self._unlogged_loss: float | None = None

    def record(self, loss: torch.Tensor, sample_ids: Sequence[str] | None) -> None:
        """Keep one micro-batch's loss (detached, no host sync) and its sample ids until the step ends."""
        self._losses.append(loss.detach().reshape(-1)[:1])
        self._sample_ids.append(None if sample_ids is None else tuple(sample_ids))

    def take_logged_loss(self) -> float | None:
        """The non-finite loss to log for the interval since the last log (``None``: all were finite)."""
        value, self._unlogged_loss = self._unlogged_loss, None
        return value

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Note DeepSpeed's skipped-step count, to verify later that a skipped step really was skipped."""
        engine = self.engine()
        self._engine_skipped_before = int(getattr(engine, "skipped_steps", 0))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Agree across ranks whether the step was finite; stop or skip per ``--nonfinite`` if not."""
        losses, sample_ids = self._losses, self._sample_ids
        self._losses, self._sample_ids = [], []
        engine = self.engine()
        grad_norm = engine.get_global_grad_norm() if engine is not None and not args.fp16 else None
        flags = self._agreed_flags(losses, grad_norm)
        if not any(flags):
            self.consecutive_skips = 0
            return
        reports = self._gather_reports(losses, sample_ids, _as_float(grad_norm), args.process_index)
        what = describe_step(state.global_step, reports, self.data_files)
        report = args.process_index == 0
        if must_stop(self.policy, self.consecutive_skips, self.max_skips):
            raise NonFiniteError(self._stop_message(what, args), report=report)
        skipped_now = int(getattr(engine, "skipped_steps", 0))
        if skipped_now <= self._engine_skipped_before:
            raise NonFiniteError(
                f"{what}. --nonfinite skip: DeepSpeed applied this update anyway (engine.skipped_steps stayed at "
                f"{skipped_now}); this configuration does not discard non-finite steps (ZeRO stage 0, or bf16 with "
                f'"check_grad_overflow": false), so the run stops. {resume_hint(args.output_dir)}',
                report=report,
            )
        self.consecutive_skips += 1
        self.skipped_steps += 1
        bad_losses = [loss for rank_report in reports for loss in rank_report.losses if not math.isfinite(loss)]
        if bad_losses:  # the interval's mean loss is non-finite: logged as such, not filtered
            self._unlogged_loss = sum(bad_losses) + (self._unlogged_loss or 0.0)
        if report:
            logger.warning(
                "Skipped the update of %s (--nonfinite skip: DeepSpeed discarded it, skipped steps %d -> %d); "
                "%d consecutive skip(s) of at most %d.",
                what,
                self._engine_skipped_before,
                skipped_now,
                self.consecutive_skips,
                self.max_skips,
            )

    def _agreed_flags(self, losses: list[torch.Tensor], grad_norm: Any) -> list[float]:
        """Per rank: 1 when its loss or the gradient norm was non-finite; one all_reduce, one host sync."""
        distributed = _distributed()
        device = collective_device(str(dist.get_backend())) if distributed else torch.device("cpu")
        bad = torch.zeros((), dtype=torch.bool, device=device)
        if losses:
            bad = bad | ~torch.isfinite(torch.cat(losses).float()).all().to(device)
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32)).to(device)
        if not distributed:
            return [float(bad)]
        flags = torch.zeros(dist.get_world_size(), dtype=torch.float32, device=device)
        flags[dist.get_rank()] = bad.float()
        dist.all_reduce(flags)
        return flags.tolist()

    def _gather_reports(
        self,
        losses: list[torch.Tensor],
        sample_ids: list[tuple[str, ...] | None],
        grad_norm: float | None,
        rank: int,
    ) -> list[RankReport]:
        """Every rank's losses and sample ids of the step (a collective: only after a non-finite step)."""
        values = tuple(float(value) for value in torch.cat(losses).float().tolist()) if losses else ()
        own = RankReport(rank, values, tuple(sample_ids), grad_norm)
        if not _distributed():
            return [own]
        reports: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(reports, own)
        return reports

    def _stop_message(self, what: str, args: TrainingArguments) -> str:
        reason = (
            "--nonfinite stop"
            if self.policy == STOP
            else f"{self.consecutive_skips + 1} consecutive non-finite steps, --max_nonfinite_skips {self.max_skips}"
        )
        return f"Stopped: {what}. Nothing of this step was saved ({reason}). {resume_hint(args.output_dir)}"
