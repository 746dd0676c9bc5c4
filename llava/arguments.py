"""Typed command-line arguments of training, one dataclass per concern (model, data, training): every layer that
builds a model for a stage reads them, so they sit below the model code."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from transformers import TrainingArguments

from llava.data.dataset import DataArguments

__all__ = ["DataArguments", "LlavaTrainingArguments", "ModelArguments", "parse_signal_names"]

UNCATCHABLE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSTOP})


def parse_signal_names(spec: str | None) -> tuple[signal.Signals, ...]:
    """``--save_on_signal``'s comma list (``TERM,USR1``; the ``SIG`` prefix and case are optional) as signals, in
    order and without repeats; ``none`` or an empty value gives none. An unknown name, or one no process can catch
    (KILL, STOP), is a ``ValueError``: a typo must not leave a run that ignores its preemption signal."""
    text = (spec or "").strip()
    if text.lower() in ("", "none"):
        return ()
    found: list[signal.Signals] = []
    for word in text.split(","):
        name = word.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name not in signal.Signals.__members__:
            raise ValueError(f"--save_on_signal: unknown signal {word.strip()!r} in {spec!r} (e.g. TERM,USR1 or none)")
        number = signal.Signals[name]
        if number in UNCATCHABLE_SIGNALS:
            raise ValueError(f"--save_on_signal: {name} cannot be caught; use TERM, USR1 or another catchable one")
        if number not in found:
            found.append(number)
    return tuple(found)


@dataclass
class ModelArguments:
    """What to build: language model, vision tower, projector, compression."""

    model_name_or_path: str = field(
        default="lmsys/vicuna-7b-v1.5",
        metadata={"help": "Language model (HF causal LM) or a full LLaVA checkpoint (duet/llava-hf/original)."},
    )
    vision_tower: str | None = field(
        default=None, metadata={"help": "CLIP vision model path/id (required unless starting from a LLaVA checkpoint)."}
    )
    video_tower: str | None = field(
        default=None,
        metadata={"help": "CLIP vision model for videos (Video-LLaVA layout: a second tower, same projector)."},
    )
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "linear | mlp{N}x_gelu | identity"})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "Tower hidden-state index used as features."})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch (drop CLS) | cls_patch"})
    mm_video_select_feature: str = field(
        default="cls_patch", metadata={"help": "Per-frame tokens of the video tower: cls_patch (Video-LLaVA) | patch"}
    )
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Pretraining stage: train the projector only (LLM and tower frozen)."}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "Projector weights from pretraining (mm_projector.safetensors or .bin)."}
    )
    compression: str = field(default="none", metadata={"help": "Visual-token compression preset name or YAML file."})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa | flash_attention_2 | eager (default: fastest available)."}
    )


@dataclass
class LlavaTrainingArguments(TrainingArguments):
    """HF ``TrainingArguments`` plus LLaVA's LoRA/projector options and run bookkeeping."""

    mm_projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector (default: --learning_rate)."}
    )
    lora_enable: bool = field(default=False, metadata={"help": "Finetune the LLM with LoRA adapters (peft)."})
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    run_group: str | None = field(default=None, metadata={"help": "wandb group (e.g. the experiment name)."})
    metrics_file: str | None = field(
        default=None, metadata={"help": "JSONL metrics file (default: <output_dir>/metrics.jsonl)."}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "LLaVA-style warmup fraction; transformers 5 takes it as a float --warmup_steps."},
    )
    nonfinite: str = field(
        default="stop",
        metadata={
            "help": "A non-finite loss or gradient norm: stop (exit 65, naming the step, ranks and sample ids; that "
            "step is not saved) | skip (drop that update, as DeepSpeed's ZeRO optimizers do; needs --deepspeed)."
        },
    )
    max_nonfinite_skips: int = field(
        default=3, metadata={"help": "--nonfinite skip: most consecutive skipped steps; one more stops the run."}
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Padding-free batches: the LLM layers run on the real tokens of each micro-batch only, packed "
            "into rows with each sample's attention isolated (FlashAttention's variable-length path, else a "
            "block-diagonal mask); T2V still drops per sample. Same loss and gradients as padded batches."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Kept False: the collator picks the model inputs itself, and each sample's 'sample_id' (not a "
            "model input) must reach it so a non-finite loss can name its samples."
        },
    )
    save_on_signal: str = field(
        default="TERM,USR1",
        metadata={
            "help": "Signals that mean preemption (comma list, e.g. TERM,USR1; none: off): on one reaching any rank, "
            "all ranks save a checkpoint at the next optimizer-step boundary and exit with code 75 for a requeue."
        },
    )

    def __post_init__(self) -> None:
        parse_signal_names(self.save_on_signal)  # an unknown name fails at start-up, not at the first preemption
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"--nonfinite must be stop or skip, got {self.nonfinite!r}")
        if self.max_nonfinite_skips < 0:
            raise ValueError(f"--max_nonfinite_skips must be >= 0, got {self.max_nonfinite_skips}")
        if self.nonfinite == "skip" and not self.deepspeed:
            raise ValueError(
                "--nonfinite skip needs --deepspeed: its ZeRO optimizers drop a non-finite update whole (optimizer "
                "and LR scheduler); without DeepSpeed nothing can. Use --nonfinite stop, or train with DeepSpeed."
            )
