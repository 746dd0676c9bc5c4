"""Build the model for a training stage: load components, load the pretrained projector, freeze, LoRA."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel

from llava.hf_adapter import activation_checkpointing_requested
from llava.model.config import DuetLlavaConfig
from llava.model.loading import load_pretrained_model, read_model_type
from llava.model.modeling import DuetLlavaForCausalLM
from llava.training.arguments import DataArguments, LlavaTrainingArguments, ModelArguments
from llava.utils.attention import default_attn_implementation

logger = logging.getLogger(__name__)

PROJECTOR_FILENAME = "mm_projector.safetensors"
LLAVA_CHECKPOINT_TYPES = {DuetLlavaConfig.model_type, "llava", "llava_llama"}
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def training_dtype(args: LlavaTrainingArguments) -> torch.dtype:
    """Parameter dtype implied by ``--bf16``/``--fp16`` (fp32 otherwise)."""
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


def build_model(
    model_args: ModelArguments, data_args: DataArguments, args: LlavaTrainingArguments
) -> DuetLlavaForCausalLM:
    """Load or assemble the model. Under ZeRO-3 the HF loaders partition weights as they load."""
    dtype = training_dtype(args)
    attn = model_args.attn_implementation or default_attn_implementation()
    source_type = read_model_type(model_args.model_name_or_path)
    if source_type in LLAVA_CHECKPOINT_TYPES:
        logger.info("Starting from LLaVA checkpoint %s (%s)", model_args.model_name_or_path, source_type)
        model = load_pretrained_model(
            model_args.model_name_or_path, dtype=dtype, vision_tower=model_args.vision_tower, attn_implementation=attn
        )
        if model_args.video_tower and model.video_tower is None:
            raise ValueError(
                f"--video_tower was given but the checkpoint {model_args.model_name_or_path} has no video tower; "
                "start video training from a language model (plus --vision_tower/--video_tower) or a video checkpoint"
            )
    else:
        if not model_args.vision_tower:
            raise ValueError(
                f"--vision_tower is required when --model_name_or_path ({model_args.model_name_or_path}) "
                "is a plain language model"
            )
        language_model = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, dtype=dtype, attn_implementation=attn
        )
        vision_model = CLIPVisionModel.from_pretrained(model_args.vision_tower, dtype=dtype, attn_implementation=attn)
        video_model = None
        if model_args.video_tower:
            video_model = CLIPVisionModel.from_pretrained(model_args.video_tower, dtype=dtype, attn_implementation=attn)
        model = DuetLlavaForCausalLM.from_components(
            language_model,
            vision_model,
            video_model=video_model,
            projector_type=model_args.mm_projector_type,
            vision_feature_layer=model_args.mm_vision_select_layer,
            vision_feature_select_strategy=model_args.mm_vision_select_feature,
            video_feature_select_strategy=model_args.mm_video_select_feature,
        )
    model.config.image_aspect_ratio = data_args.image_aspect_ratio
    model.config.template = data_args.version
    model.config.num_frames = data_args.num_frames
    model.set_compression(model_args.compression)
    model.config.use_cache = False
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    return model


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
    model.requires_grad_(False)
    if model_args.tune_mm_mlp_adapter:
        if args.lora_enable:
            raise ValueError("--tune_mm_mlp_adapter (pretraining) and --lora_enable cannot be combined")
        model.projector.requires_grad_(True)
    elif args.lora_enable:
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
        model.language_model.requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)  # outside the decoder in Qwen2.5-VL
        model.projector.requires_grad_(True)
    if activation_checkpointing_requested(args):
        model.enable_input_require_grads()

    def count(parameter: nn.Parameter) -> int:  # a ZeRO-3 partitioned parameter is empty on this rank
        return parameter.ds_numel if hasattr(parameter, "ds_numel") else parameter.numel()

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    logger.info("Trainable parameters: %d of %d", trainable, total)
    return model
