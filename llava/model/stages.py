"""What trains in each stage, for every model family: the parameter dtype, the projector (loaded, saved and found
under ZeRO-3 too) and the freezing rules of pretraining, finetuning and LoRA."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llava.arguments import LlavaTrainingArguments, ModelArguments
from llava.hf_adapter import activation_checkpointing_requested

logger = logging.getLogger(__name__)

PROJECTOR_FILENAME = "mm_projector.safetensors"
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def training_dtype(args: LlavaTrainingArguments) -> torch.dtype:
    """Parameter dtype implied by ``--bf16``/``--fp16`` (fp32 otherwise)."""
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


@contextlib.contextmanager
def gathered(parameters: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full (un-partitioned) parameters inside the block under ZeRO-3; a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=modifier_rank):
            yield
    else:
        yield


def _read_projector_file(path: str) -> dict[str, torch.Tensor]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter: no such file {path}")
    if file.suffix == ".safetensors":
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    # Original LLaVA files name keys "model.mm_projector.0.weight"; ours "0.weight".
    return {key.split("mm_projector.")[-1]: value for key, value in state.items()}


def load_projector(model: nn.Module, path: str) -> None:
    """Load pretrained projector weights, also into a ZeRO-3 partitioned model.

    Partitioned parameters have shape ``[0]``: loading into them directly is LLaVA's
    size-mismatch bug. The parameters are gathered first, rank 0 writes, ZeRO re-partitions.
    """
    state = _read_projector_file(path)
    parameters = list(model.projector.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in parameters)
    with gathered(parameters, modifier_rank=0):
        expected = {name: tuple(p.shape) for name, p in model.projector.named_parameters()}
        got = {name: tuple(t.shape) for name, t in state.items()}
        if expected != got:
            raise ValueError(f"{path}: projector weights {got} do not fit this model's projector {expected}")
        if not partitioned or _rank() == 0:
            model.projector.load_state_dict(state)
    logger.info("Loaded pretrained projector from %s%s", path, " (ZeRO-3 partitioned)" if partitioned else "")


def save_projector(model: nn.Module, path: str | Path, projector_name: str = "projector") -> None:
    """Write the projector weights (gathered under ZeRO-3) to a safetensors file on rank 0."""
    projector = find_projector(model, projector_name)
    parameters = list(projector.parameters())
    with gathered(parameters):
        if _rank() == 0:
            state = {name: tensor.detach().cpu().contiguous() for name, tensor in projector.state_dict().items()}
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(path))


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def find_projector(model: nn.Module, projector_name: str = "projector") -> nn.Module:
    """The projector module (named ``projector_name``: Qwen's is ``merger``) of a (possibly peft-wrapped) model."""
    for name, module in model.named_modules():
        if name.endswith(projector_name) and not name.endswith(f"modules_to_save.{projector_name}"):
            if hasattr(module, "modules_to_save"):  # peft ModulesToSaveWrapper: the trained copy
                return module.modules_to_save["default"]
            return module
    raise ValueError(f"model has no {projector_name} module")


STAGES = ("pretrain", "finetune")


def freeze_for_stage(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """Freeze all but what ``stage`` trains; returns the trainable parameters.

    pretrain: the projector. finetune: the projector and the LLM with its LM head (the head sits outside the
    decoder in Qwen2.5-VL), and what a model's optional ``finetuned_extras()`` names (LLaVA-NeXT's
    ``image_newline``, trained with the LLM as LLaVA-NeXT's own finetuning does). The vision tower(s) stay
    frozen. LoRA is :func:`configure_trainable`'s.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    if stage == "finetune":
        model.language_model.requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
        extras = getattr(model, "finetuned_extras", None)
        for parameter in extras() if extras is not None else ():
            parameter.requires_grad_(True)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def configure_trainable(
    model: nn.Module,
    model_args: ModelArguments,
    args: LlavaTrainingArguments,
    projector_name: str = "projector",
    lora_targets: str = LORA_TARGETS,
) -> nn.Module:
    """Freeze per stage; returns the model to train (peft-wrapped for LoRA).

    pretrain (``--tune_mm_mlp_adapter``): projector only. finetune: LLM (with its LM head) + projector.
    LoRA: adapters on the LLM's linear layers (``lora_targets``) + the full projector (the module named
    ``projector_name``, ``model.projector``). The towers are always frozen.
    """
    if model_args.tune_mm_mlp_adapter:
        if args.lora_enable:
            raise ValueError("--tune_mm_mlp_adapter (pretraining) and --lora_enable cannot be combined")
        freeze_for_stage(model, "pretrain")
    elif args.lora_enable:
        model.requires_grad_(False)
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=lora_targets,
            modules_to_save=[projector_name],
            bias="none",
        )
        model = get_peft_model(model, lora_config)
    else:
        freeze_for_stage(model, "finetune")
    if activation_checkpointing_requested(args):
        model.enable_input_require_grads()

    def count(parameter: nn.Parameter) -> int:  # a ZeRO-3 partitioned parameter is empty on this rank
        return parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    logger.info("Trainable parameters: %d of %d", trainable, total)
    return model
