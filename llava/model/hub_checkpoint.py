"""A checkpoint's files as the Hub lays them out: read a checkpoint's ``config.json`` and check its weight files
(any family), and write a state dict as ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
shards plus ``model.safetensors.index.json`` when it is larger than one shard (what ``from_pretrained`` reads).

The writer is used where transformers' own ``save_pretrained`` cannot be trusted to name the weights: it renames
keys by the conversions recorded at load time, and a model loaded under ZeRO-3 records extra ones whose reversal garbles
Qwen2.5-VL's names (``model.model.embed_tokens``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from llava.model.config_json import read_config_json  # here too: callers import it from this module

MAX_SHARD_BYTES = 5 * 1024**3
INDEX_FILENAME = "model.safetensors.index.json"


def write_safetensors(
    state_dict: dict[str, torch.Tensor], output_dir: str | os.PathLike[str], max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[Path]:
    """Save ``state_dict`` (contiguous CPU copies) in shards of at most ``max_shard_bytes`` (a larger tensor gets
    its own); returns the files written. Stale shards of an earlier save in ``output_dir`` are removed first."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    for stale in [*output.glob("model-*-of-*.safetensors"), output / INDEX_FILENAME, output / "model.safetensors"]:
        stale.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        shard_bytes += size
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{index:05d}-of-{len(shards):05d}.safetensors" for index in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(output / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key in shard}
        total = sum(tensor.numel() * tensor.element_size() for tensor in state_dict.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (output / INDEX_FILENAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [output / name for name in names]


def checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The config of a checkpoint: a local directory's ``config.json``, else the Hub config of ``path``."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        return read_config_json(config_file)
    return AutoConfig.from_pretrained(str(path)).to_dict()


def check_weight_files(directory: Path) -> None:
    """Open every ``*.safetensors`` header of a local checkpoint (cheap: no tensor is read), so a truncated or
    damaged file fails with its path instead of a bare safetensors error deep inside a loader."""
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file}: unreadable safetensors file ({error}); re-download or re-save it") from None


WRAPPED_PREFIX = "hf_model."
"""Where a wrapper model (a family's model around a transformers one) keeps its HF model's parameters."""

NameMap = Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class CheckpointNames:
    """How a wrapped HF model's module-tree names relate to its checkpoint's (what transformers writes and
    reads): ``to_hub`` and its inverse ``to_module``, and the checkpoint name of the LM head, left out when the
    embeddings are tied (stored once, as transformers does)."""

    to_hub: NameMap
    to_module: NameMap
    lm_head: str


def save_wrapped_checkpoint(
    wrapper: nn.Module,
    output_dir: str | os.PathLike[str],
    names: CheckpointNames,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Save ``wrapper.hf_model`` as a plain checkpoint of its family (config, generation config, safetensors
    shards under the checkpoint's names). ``state_dict`` may be the wrapper's (a gathered ZeRO-3 one) or the HF
    model's; by default the model's own."""
    hf_model = wrapper.hf_model
    if state_dict is None:
        state_dict = hf_model.state_dict()
    weights = names.to_hub({key.removeprefix(WRAPPED_PREFIX): value for key, value in state_dict.items()})
    config = hf_model.config
    text_config = getattr(config, "text_config", config)
    if getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False):
        weights.pop(names.lm_head, None)
    config.save_pretrained(output_dir)
    if hf_model.generation_config is not None:
        hf_model.generation_config.save_pretrained(output_dir)
    write_safetensors(weights, output_dir, max_shard_bytes)


def load_wrapped_state_dict(
    wrapper: nn.Module, state_dict: Mapping[str, Any], names: CheckpointNames, strict: bool, assign: bool
) -> Any:
    """Load the wrapper's own state dict or a checkpoint's (what :func:`save_wrapped_checkpoint` writes, e.g. a
    resume without DeepSpeed); ``from_pretrained`` renames checkpoint names itself, a plain
    ``load_state_dict`` does not, and with ``strict=False`` it would silently load nothing."""
    if state_dict and not any(key.startswith(WRAPPED_PREFIX) for key in state_dict):
        return wrapper.hf_model.load_state_dict(names.to_module(state_dict), strict=strict, assign=assign)
    return nn.Module.load_state_dict(wrapper, state_dict, strict=strict, assign=assign)


def load_hf_checkpoint(
    model_class: type[PreTrainedModel], path: str | os.PathLike[str], dtype: torch.dtype | None, attn: str
) -> PreTrainedModel:
    """A whole checkpoint (local directory, checked first, or Hub id) as ``model_class``: safetensors weights, no
    remote code; under an active ZeRO-3 config transformers partitions the weights as they load."""
    model_dir = Path(path)
    if model_dir.is_dir():
        read_config_json(model_dir / "config.json")
        check_weight_files(model_dir)
    return model_class.from_pretrained(str(path), dtype=dtype, attn_implementation=attn, use_safetensors=True)
