"""Training entry point: ``deepspeed --module llava.training.train`` (or plain ``python -m``).

Stages: pretrain (``--tune_mm_mlp_adapter``: projector only), finetune (LLM + projector) and LoRA
finetune (``--lora_enable``). Resume is explicit: ``--resume_from_checkpoint auto|PATH``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser, set_seed

from llava.arguments import DataArguments, LlavaTrainingArguments, ModelArguments, parse_signal_names
from llava.data.collator import DataCollatorForSupervisedDataset
from llava.families.base import Processors
from llava.families.registry import family_for
from llava.hf_adapter import current_training_argv
from llava.model.stages import PROJECTOR_FILENAME, configure_trainable, save_projector
from llava.training.checkpoints import CheckpointCompletionCallback, resolve_resume_checkpoint
from llava.training.cluster import collective_timeout, lost_peers_end_the_run
from llava.training.exit_codes import TrainingStoppedError
from llava.training.metrics import (
    MetricsCallback,
    RunConfigCallback,
    add_metrics_callback,
    build_run_config,
    configure_wandb_env,
)
from llava.training.precision_guard import BufferPrecisionCallback
from llava.training.preemption import SaveOnSignalCallback, SignalFlag, TrainingPreempted
from llava.training.save_failure import SaveWatch
from llava.training.trainer import LlavaTrainer

logger = logging.getLogger("llava.training")


def configure_cpu_deepspeed(argv: list[str]) -> list[str]:
    """Make DeepSpeed on CPU ranks (``DS_ACCELERATOR=cpu``) see every rank.

    ``TrainingArguments`` passes no communication backend to accelerate when DeepSpeed is on;
    without CUDA accelerate then finds none and counts a single process, so the batch-size check
    of a 2-rank run fails. Here the distributed state is set up with ``gloo`` (and ``--ddp_timeout``, which
    transformers gives the GPU path itself) before the arguments are parsed, and the Trainer is told to use that
    configured state.
    """
    launched = "LOCAL_RANK" in os.environ
    wants_deepspeed = any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv)
    if torch.cuda.is_available() or not launched or not wants_deepspeed:
        return argv
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo", timeout=collective_timeout(argv))
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return [*argv, "--accelerator_config", json.dumps({"use_configured_state": True})]


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LlavaTrainingArguments]:
    """Parse command-line flags (LLaVA names) into the three argument dataclasses."""
    argv = configure_cpu_deepspeed(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser((ModelArguments, DataArguments, LlavaTrainingArguments))
    return parser.parse_args_into_dataclasses(args=current_training_argv(argv))


def train(argv: list[str] | None = None) -> Path:
    """Run one training stage; returns the output directory. A ``--save_on_signal`` signal stops it after saving a
    checkpoint, without the final save: :class:`~llava.training.preemption.TrainingPreempted` is raised then."""
    model_args, data_args, args = parse_args(argv)
    # Installed before the model loads: a signal during start-up stops the run after its first step.
    with SignalFlag(parse_signal_names(args.save_on_signal)) as signals:
        return run_stage(model_args, data_args, args, signals)


def run_stage(
    model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments, signals: SignalFlag
) -> Path:
    """:func:`train` after the arguments are parsed and the preemption signals are caught into ``signals``."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if args.process_index == 0 else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity_warning()
    if "wandb" in (args.report_to or []):
        configure_wandb_env(run_name=args.run_name, group=args.run_group)

    set_seed(args.seed)
    family = family_for(model_args.model_name_or_path)
    model = family.build_model(model_args, data_args, args)
    processors = family.load_processors(model_args, data_args, model)
    family.prepare(model, processors)
    data_args = family.data_arguments(data_args, model)
    model = configure_trainable(model, model_args, args, family.projector_name, family.lora_targets)
    dataset = family.dataset(data_args, processors, model)
    run_config = build_run_config(model_args, data_args, args, world_size=args.world_size)
    # The CRC-32 verification reads every file: one process per node does it (a mismatch stops that rank,
    # and the launcher stops the others), not every rank.
    resume = resolve_resume_checkpoint(
        args.output_dir, args.resume_from_checkpoint, run_config, verify_content=args.local_process_index == 0
    )

    keep_last, args.save_total_limit = args.save_total_limit, None  # rotated after completion instead
    metrics = MetricsCallback(args.metrics_file)
    save_watch = SaveWatch()  # a failed write during a save ends the run with exit code 74, naming what is valid
    preemption = SaveOnSignalCallback(signals)
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(processors.tokenizer),
        processing_class=processors.tokenizer,
        callbacks=[
            preemption,  # before CheckpointCompletionCallback: that one must see the save this one asks for
            CheckpointCompletionCallback(run_config, keep_last),
            save_watch,
            RunConfigCallback(run_config),
            BufferPrecisionCallback(),
        ],
        group_by_modality_length=data_args.group_by_modality_length,
        metrics=metrics,
        processors=processors,
        family=family,
    )
    add_metrics_callback(trainer, metrics)
    with (
        save_watch.failures_end_the_run(args.output_dir, args.process_index),
        lost_peers_end_the_run(args.output_dir, args.process_index),
    ):
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_state()
        preemption.raise_if_stopped(args)  # the checkpoint holds the state: no final save, exit for the requeue
        finish(trainer, model_args, processors, family.projector_name)
    if trainer.num_skipped_samples or dataset.num_invalid_samples:
        logger.warning(
            "Skipped %d bad samples during training and %d invalid samples at load time (--skip_bad_samples)",
            trainer.num_skipped_samples,
            dataset.num_invalid_samples,
        )
    return Path(args.output_dir)


def finish(
    trainer: LlavaTrainer, model_args: ModelArguments, processors: Processors, projector_name: str = "projector"
) -> None:
    """Save the stage's result: the projector always; the full model (with its processors) unless pretraining."""
    output_dir = Path(trainer.args.output_dir)
    save_projector(trainer.model, output_dir / PROJECTOR_FILENAME, projector_name)
    if model_args.tune_mm_mlp_adapter:
        if trainer.is_world_process_zero():
            trainer.model.config.save_pretrained(output_dir)
        return
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero() and not trainer.saves_own_layout():  # else written with the model already
        processors.save(output_dir)


SHM_DIR = Path("/dev/shm")


def remove_shared_memory_buffers(environ: dict[str, str] | None = None) -> list[Path]:
    """Delete this rank's DeepSpeed CPU all-reduce buffers from ``/dev/shm``; returns what was removed.

    DeepSpeed's CPU communication op (``DS_ACCELERATOR=cpu``) creates one shared-memory file per rank
    (``deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank>``, 66 MB) and never unlinks it, so every run on
    CPU ranks left its buffers behind until ``/dev/shm`` (RAM) filled up. By exit every rank has mapped
    its peers' buffers, so unlinking its own name is safe.
    """
    environ = os.environ if environ is None else environ
    address, port, rank = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT"), environ.get("RANK")
    if not (address and port and rank) or not SHM_DIR.is_dir():
        return []
    removed = sorted(SHM_DIR.glob(f"deepspeed_*_{address}_{port}_{rank}"))
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def finish_wandb_run(exit_code: int) -> None:
    """Close this process's wandb run (if one is open) as failed with ``exit_code``, so its last metrics are
    kept when the process leaves without the interpreter's exit hooks."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    try:
        wandb.finish(exit_code=exit_code)
    except Exception as error:  # the exit code matters more than the wandb upload
        logger.warning("Could not finish the wandb run before exiting: %s", error)


def exit_without_teardown(exit_code: int) -> None:
    """Leave at once with ``exit_code`` after a peer was lost: close wandb, remove this rank's shared-memory
    buffers, flush the logs, then ``os._exit``. Neither ``destroy_process_group`` nor the interpreter's shutdown
    runs: with a dead peer, gloo's destructors abort ("terminate called without an active exception") or segfault
    now and then, and the job would report a crash (-6/-11) instead of ``EXIT_LOST_PEER``."""
    finish_wandb_run(exit_code)
    remove_shared_memory_buffers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(exit_code)


def main() -> None:
    """Console entry point; tears the process group down before exit (no communication threads left to
    be killed by the interpreter's shutdown) and removes the rank's shared-memory buffers. Exits with
    ``PREEMPTED_EXIT_CODE`` (75) after a preemption signal stopped the run (a complete checkpoint is saved), and
    with a stop's own code otherwise; a rank whose peer was lost (69) leaves through :func:`exit_without_teardown`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    distributed = torch.distributed.is_available()
    exit_code = 0
    try:
        try:
            train(sys.argv[1:])
        except TrainingPreempted as stopped:  # every rank agreed to stop and saved: leave together, for a requeue
            exit_code = stopped.exit_code
        except TrainingStoppedError as stopped:  # non-finite step (65), failed save (74): a peer may never arrive
            if stopped.report:
                logger.error("%s", stopped)
            if stopped.group_is_broken:
                exit_without_teardown(stopped.exit_code)
            raise SystemExit(stopped.exit_code) from None
        if distributed and torch.distributed.is_initialized():
            # All ranks leave together (after a successful or preempted run only: a failed peer would never
            # arrive); a rank tearing down while another was still saving has aborted at exit.
            torch.distributed.barrier()
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        remove_shared_memory_buffers()
    if exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    main()
