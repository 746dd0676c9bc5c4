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
from typing import Any

import torch
import transformers
from transformers import AutoTokenizer, HfArgumentParser, set_seed

from llava.constants import VIDEO_PROCESSOR_DIR
from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.dataset import LazySupervisedDataset
from llava.hf_adapter import current_training_argv, load_image_processor
from llava.model.loading import read_model_type
from llava.training.arguments import DataArguments, LlavaTrainingArguments, ModelArguments
from llava.training.checkpoints import CheckpointCompletionCallback, resolve_resume_checkpoint
from llava.training.metrics import (
    MetricsCallback,
    RunConfigCallback,
    add_metrics_callback,
    build_run_config,
    configure_wandb_env,
)
from llava.training.model_setup import (
    LLAVA_CHECKPOINT_TYPES,
    PROJECTOR_FILENAME,
    build_model,
    configure_trainable,
    save_projector,
)
from llava.training.trainer import LlavaTrainer

logger = logging.getLogger("llava.training")


def configure_cpu_deepspeed(argv: list[str]) -> list[str]:
    """Make DeepSpeed on CPU ranks (``DS_ACCELERATOR=cpu``) see every rank.

    ``TrainingArguments`` passes no communication backend to accelerate when DeepSpeed is on;
    without CUDA accelerate then finds none and counts a single process, so the batch-size check
    of a 2-rank run fails. Here the distributed state is set up with ``gloo`` before the arguments
    are parsed, and the Trainer is told to use that configured state.
    """
    launched = "LOCAL_RANK" in os.environ
    wants_deepspeed = any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv)
    if torch.cuda.is_available() or not launched or not wants_deepspeed:
        return argv
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]
    return [*argv, "--accelerator_config", json.dumps({"use_configured_state": True})]


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, LlavaTrainingArguments]:
    """Parse command-line flags (LLaVA names) into the three argument dataclasses."""
    argv = configure_cpu_deepspeed(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser((ModelArguments, DataArguments, LlavaTrainingArguments))
    return parser.parse_args_into_dataclasses(args=current_training_argv(argv))


def load_processors(model_args: ModelArguments, data_args: DataArguments):
    """Tokenizer (from the LM or checkpoint) and image processor (from the tower or checkpoint)."""
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, model_max_length=data_args.model_max_length, padding_side="right"
    )
    if tokenizer.pad_token is None:  # Vicuna/LLaMA ship without one; LLaVA pads with unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    is_checkpoint = read_model_type(model_args.model_name_or_path) in LLAVA_CHECKPOINT_TYPES
    processor_source = model_args.vision_tower or model_args.model_name_or_path
    if is_checkpoint and not model_args.vision_tower:
        processor_source = model_args.model_name_or_path
    image_processor = load_image_processor(processor_source)
    return tokenizer, image_processor


def load_video_processor(model_args: ModelArguments, image_processor: Any, has_video_tower: bool) -> Any:
    """The video tower's image processor: from ``--video_tower``, else a checkpoint's ``video_processor/``
    folder, else the image processor (Video-LLaVA's towers share one 224 px preprocessing)."""
    if not has_video_tower:
        return None
    if model_args.video_tower:
        return load_image_processor(model_args.video_tower)
    saved = Path(model_args.model_name_or_path) / VIDEO_PROCESSOR_DIR
    if saved.is_dir():
        return load_image_processor(str(saved))
    return image_processor


def train(argv: list[str] | None = None) -> Path:
    """Run one training stage; returns the output directory."""
    model_args, data_args, args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if args.process_index == 0 else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity_warning()
    if "wandb" in (args.report_to or []):
        configure_wandb_env(run_name=args.run_name, group=args.run_group)

    set_seed(args.seed)
    model = build_model(model_args, data_args, args)
    tokenizer, image_processor = load_processors(model_args, data_args)
    video_processor = load_video_processor(model_args, image_processor, model.config.has_video_tower)
    data_args.tokens_per_image = model.config.llm_tokens_per_image
    if model.config.has_video_tower:
        data_args.tokens_per_video = model.config.llm_tokens_per_video
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.set_query_vocabulary(tokenizer)
    model = configure_trainable(model, model_args, args)

    dataset = LazySupervisedDataset(
        data_args,
        tokenizer,
        image_processor,
        model.config.image_token_id,
        video_processor=video_processor,
        video_token_id=model.config.video_token_id,
    )
    run_config = build_run_config(model_args, data_args, args, world_size=args.world_size)
    # The CRC-32 verification reads every file: one process per node does it (a mismatch stops that rank,
    # and the launcher stops the others), not every rank.
    resume = resolve_resume_checkpoint(
        args.output_dir, args.resume_from_checkpoint, run_config, verify_content=args.local_process_index == 0
    )

    keep_last, args.save_total_limit = args.save_total_limit, None  # rotated after completion instead
    metrics = MetricsCallback(args.metrics_file)
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(tokenizer),
        processing_class=tokenizer,
        callbacks=[CheckpointCompletionCallback(run_config, keep_last), RunConfigCallback(run_config)],
        group_by_modality_length=data_args.group_by_modality_length,
        metrics=metrics,
    )
    add_metrics_callback(trainer, metrics)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    finish(trainer, model_args, image_processor, video_processor)
    if trainer.num_skipped_samples or dataset.num_invalid_samples:
        logger.warning(
            "Skipped %d bad samples during training and %d invalid samples at load time (--skip_bad_samples)",
            trainer.num_skipped_samples,
            dataset.num_invalid_samples,
        )
    return Path(args.output_dir)


def finish(
    trainer: LlavaTrainer, model_args: ModelArguments, image_processor: Any, video_processor: Any = None
) -> None:
    """Save the stage's result: the projector always; the full model (with its processors) unless pretraining."""
    output_dir = Path(trainer.args.output_dir)
    model = trainer.model
    save_projector(model, output_dir / PROJECTOR_FILENAME)
    if model_args.tune_mm_mlp_adapter:
        if trainer.is_world_process_zero():
            trainer.model.config.save_pretrained(output_dir)
        return
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        image_processor.save_pretrained(output_dir)
        if video_processor is not None:
            video_processor.save_pretrained(output_dir / VIDEO_PROCESSOR_DIR)


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


def main() -> None:
    """Console entry point; tears the process group down before exit (no communication threads left to
    be killed by the interpreter's shutdown) and removes the rank's shared-memory buffers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    distributed = torch.distributed.is_available()
    try:
        train(sys.argv[1:])
        if distributed and torch.distributed.is_initialized():
            # All ranks leave together (after a successful run only: a failed peer would never arrive); a rank
            # tearing down while another was still saving has aborted at exit.
            torch.distributed.barrier()
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        remove_shared_memory_buffers()


if __name__ == "__main__":
    main()
