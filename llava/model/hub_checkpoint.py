"""Write a state dict as the Hub's checkpoint files: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``
shards plus ``model.safetensors.index.json`` when it is larger than one shard (what ``from_pretrained`` reads).

Used where transformers' own ``save_pretrained`` cannot be trusted to name the weights: it renames keys by the
conversions recorded at load time, and a model loaded under ZeRO-3 records extra ones whose reversal garbles
Qwen2.5-VL's names (``model.model.embed_tokens``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

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
