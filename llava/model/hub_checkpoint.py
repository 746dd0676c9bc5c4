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
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

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


def read_config_json(config_file: str | Path) -> dict[str, Any]:
    """A model directory's ``config.json`` as a dict; ValueError naming the file when it is not UTF-8 JSON
    of an object (instead of a bare decoder traceback)."""
    try:
        raw = json.loads(Path(config_file).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{config_file}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{config_file}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    return raw


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
