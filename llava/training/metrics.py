"""Training metrics: per-step timing and throughput to JSONL (and wandb), plus wandb setup.

:class:`MetricsCallback` times every optimizer step, turns the sample/token counts the Trainer
reports through :meth:`MetricsCallback.record_batch` into throughput, adds ``step_time_s``,
``samples_per_s`` and ``tokens_per_s`` to the Trainer's log dict (so wandb records them too) and
appends one JSON line per log event to ``<output_dir>/metrics.jsonl``. The file is opened in
append mode, so a resumed run continues it; steps repeated after a resume appear twice and
readers (``llava.tools.plot_curves``) keep the last value.

:func:`configure_wandb_env` makes wandb safe in batch jobs: without credentials it switches to
offline mode instead of prompting for a key (LLaVA pain point: wandb blocking non-interactive jobs).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import netrc
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
DEFAULT_WANDB_PROJECT = "duet-vlm"
_DEFAULT_WANDB_HOST = "api.wandb.ai"

# Keys the callback computes; a Trainer-logged key of the same name is left untouched.
_TIMING_KEYS = ("step_time_s", "samples_per_s", "tokens_per_s")


def _cuda_sync() -> None:
    """Wait for queued GPU work so host timestamps cover it; a no-op without CUDA."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _to_number(value: Any) -> Any:
    """JSON-friendly copy of a logged value (tensors and numpy scalars become Python numbers)."""
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def batch_counts(inputs: Mapping[str, Any]) -> tuple[int, int]:
    """``(num_samples, num_text_tokens)`` of one collated micro-batch.

    Tokens are the non-padding positions of ``attention_mask`` (all of ``input_ids`` when there is no
    mask). Visual tokens added inside the model are not included; add them yourself when
    tokens/s should count the LLM's full sequence.
    """
    input_ids = inputs.get("input_ids")
    mask = inputs.get("attention_mask")
    ref = input_ids if input_ids is not None else mask
    if ref is None:
        raise KeyError("batch_counts needs 'input_ids' or 'attention_mask' in the batch.")
    num_samples = int(ref.shape[0])
    num_tokens = int(mask.sum().item()) if mask is not None else int(input_ids.numel())
    return num_samples, num_tokens


class MetricsCallback(TrainerCallback):
    """Per-step wall time, samples/s and tokens/s, written to JSONL and injected into the logs.

    Wiring (in the Trainer subclass)::

        metrics_cb = MetricsCallback()
        trainer = LlavaTrainer(..., callbacks=[...])
        add_metrics_callback(trainer, metrics_cb)      # must run before WandbCallback.on_log
        # in LlavaTrainer.training_step (runs once per micro-batch, training only):
        metrics_cb.record_batch(*batch_counts(inputs))

    Counts are per rank and summed over micro-batches; at each log event they are all-reduced
    over ``torch.distributed`` (when initialised) so samples/s and tokens/s are job-wide. Timing
    covers ``on_step_begin`` -> ``on_step_end`` (forward, backward, optimizer step; the HF Trainer
    fetches the micro-batches before ``on_step_begin``), so throughput is compute throughput
    excluding data loading, evaluation and checkpoint saving. ``step_time_s`` is the mean over
    the steps since the previous log event.
    """

    def __init__(self, metrics_file: str | os.PathLike[str] | None = None) -> None:
        """``metrics_file`` defaults to ``<output_dir>/metrics.jsonl`` (resolved at train begin)."""
        self.metrics_file: Path | None = Path(metrics_file) if metrics_file is not None else None
        self._step_start: float | None = None
        self._train_start: float | None = None
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._interval_steps = 0
        self._interval_time = 0.0
        self._interval_samples: int | torch.Tensor = 0
        self._interval_tokens: int | torch.Tensor = 0

    def record_batch(self, num_samples: int | torch.Tensor, num_tokens: int | torch.Tensor) -> None:
        """Add one micro-batch's sample and non-padding token counts (this rank only).

        Tensors are accumulated without a host sync; they are read at the next log event.
        """
        if isinstance(num_samples, torch.Tensor):
            num_samples = num_samples.detach()
        if isinstance(num_tokens, torch.Tensor):
            num_tokens = num_tokens.detach()
        self._interval_samples = self._interval_samples + num_samples
        self._interval_tokens = self._interval_tokens + num_tokens

    # --- Trainer events -------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Resolve the metrics file and start the run clock."""
        if self.metrics_file is None:
            self.metrics_file = Path(args.output_dir) / METRICS_FILENAME
        if state.is_world_process_zero:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        self._train_start = time.time()
        self._reset_interval()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start timing one optimizer step (all its micro-batches)."""
        _cuda_sync()
        self._step_start = time.perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Stop timing the optimizer step."""
        if self._step_start is None:
            return
        _cuda_sync()
        self._interval_time += time.perf_counter() - self._step_start
        self._interval_steps += 1
        self._step_start = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add timing/throughput to ``logs`` and append the row to the JSONL file (rank 0)."""
        if logs is None:
            return
        if self._interval_steps > 0:
            samples, tokens = self._global_counts()
            step_time = self._interval_time / self._interval_steps
            timing = {"step_time_s": step_time}
            if self._interval_time > 0:
                timing["samples_per_s"] = samples / self._interval_time
                if tokens > 0:
                    timing["tokens_per_s"] = tokens / self._interval_time
            for key, value in timing.items():
                logs.setdefault(key, value)
            self._reset_interval()
        if state.is_world_process_zero:
            self._write_row(state, logs)

    def _global_counts(self) -> tuple[int, int]:
        """Interval sample/token counts summed over all ranks (a collective when distributed)."""
        import torch.distributed as dist

        local = [self._interval_samples, self._interval_tokens]
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cpu")
            if dist.get_backend() == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            counts = torch.tensor([float(_to_number(x)) for x in local], dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            return int(counts[0].item()), int(counts[1].item())
        return int(_to_number(local[0])), int(_to_number(local[1]))

    def _write_row(self, state: TrainerState, logs: Mapping[str, Any]) -> None:
        """Append one JSON line: step, epoch, logged values, timing and wall-clock time."""
        assert self.metrics_file is not None, "on_train_begin resolves metrics_file"
        now = time.time()
        row: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
        row.update({key: _to_number(value) for key, value in logs.items()})
        row["wall_time"] = now
        if self._train_start is not None:
            row["elapsed_s"] = now - self._train_start
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")


def add_metrics_callback(trainer: Trainer, callback: MetricsCallback) -> MetricsCallback:
    """Register ``callback`` ahead of the reporting integrations (wandb, tensorboard, ...).

    ``Trainer`` runs callbacks in list order and puts reporting callbacks before user ones, so a
    plain ``callbacks=[...]`` would let wandb see the log dict before the timing keys are added.
    """
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


# --- wandb ---------------------------------------------------------------------------------


def _wandb_netrc_has_key() -> bool:
    """Whether ``wandb login`` stored a key for the configured wandb host in the netrc file."""
    host = urlparse(os.environ.get("WANDB_BASE_URL", f"https://{_DEFAULT_WANDB_HOST}")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not os.path.isfile(path):
        return False
    try:
        auth = netrc.netrc(path).authenticators(host or _DEFAULT_WANDB_HOST)
    except (OSError, netrc.NetrcParseError) as err:
        logger.warning("Could not read %s: %s", path, err)
        return False
    return bool(auth and auth[2])


def wandb_has_credentials() -> bool:
    """Whether wandb can authenticate without asking: ``WANDB_API_KEY`` or a netrc entry."""
    return bool(os.environ.get("WANDB_API_KEY")) or _wandb_netrc_has_key()


def configure_wandb_env(
    run_name: str | None = None,
    group: str | None = None,
    project: str | None = None,
) -> dict[str, str]:
    """Set the ``WANDB_*`` environment so the HF ``WandbCallback`` never prompts; return what is set.

    * ``WANDB_MODE=offline`` when no credentials exist (and the user did not choose a mode); runs
      land in ``$WANDB_DIR/wandb/offline-run-*`` and can be uploaded later with ``wandb sync``.
    * ``WANDB_PROJECT`` defaults to ``"duet-vlm"`` (``project`` overrides an unset variable).
    * ``WANDB_RUN_GROUP`` / ``WANDB_NAME`` from ``group`` / ``run_name`` when given.

    Call it in every process (env vars do not travel to other nodes with the DeepSpeed launcher).
    """
    if not os.environ.get("WANDB_MODE") and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        logger.info("No wandb credentials (WANDB_API_KEY or netrc): logging to wandb in offline mode.")
    os.environ.setdefault("WANDB_PROJECT", project or DEFAULT_WANDB_PROJECT)
    if group:
        os.environ["WANDB_RUN_GROUP"] = group
    if run_name:
        os.environ["WANDB_NAME"] = run_name
    keys = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_DIR")
    return {key: os.environ[key] for key in keys if key in os.environ}


def build_run_config(*arg_groups: Any, **extra: Any) -> dict[str, Any]:
    """One flat, JSON-serialisable dict of everything that defines a run, for wandb and files.

    ``arg_groups`` are dataclass instances (model/data/training arguments) or mappings; later
    groups win on duplicate keys. ``extra`` adds free-form entries (e.g. ``world_size``, git commit).
    """
    config: dict[str, Any] = {}
    for group in arg_groups:
        if group is None:
            continue
        if hasattr(group, "to_dict") and callable(group.to_dict):
            items = group.to_dict()  # TrainingArguments redacts tokens in to_dict()
        elif dataclasses.is_dataclass(group) and not isinstance(group, type):
            items = dataclasses.asdict(group)
        elif isinstance(group, Mapping):
            items = dict(group)
        else:
            raise TypeError(f"build_run_config expects dataclasses or mappings, got {type(group).__name__}")
        config.update(items)
    config.update(extra)
    return json.loads(json.dumps(config, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


class RunConfigCallback(TrainerCallback):
    """Record the run config: ``<output_dir>/run_config.json`` and, if a wandb run is active, its config.

    Register it with plain ``callbacks=[...]`` so it runs after ``WandbCallback`` has started the run.
    """

    def __init__(self, config: Mapping[str, Any], filename: str = "run_config.json") -> None:
        """``config`` as returned by :func:`build_run_config`."""
        self.config = dict(config)
        self.filename = filename

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Write the config file and update the wandb config (world-process-zero only)."""
        if not state.is_world_process_zero:
            return
        path = Path(args.output_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.config, indent=2, sort_keys=True, default=str), encoding="utf-8")
        if "wandb" in (args.report_to or []):
            import wandb

            if wandb.run is not None:
                wandb.run.config.update(self.config, allow_val_change=True)
