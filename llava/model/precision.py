"""Cast models to a compute dtype without rounding the buffers whose precision sets the token positions.

transformers' ``from_pretrained(..., dtype=torch.bfloat16)`` builds parameters in bf16 but leaves the
rotary embeddings' inverse frequencies (``rotary_emb.inv_freq``/``original_inv_freq`` of the LLM, of
Qwen2.5-VL's M-RoPE decoder and of its vision transformer) in float32: they are non-persistent buffers
computed in float32 at construction. A blanket ``Module.to(torch.bfloat16)`` rounds them too, which shifts
the rotary angle of a 128-wide head by up to ~0.9 rad at position 700 (a LLaVA-1.5 prompt) and by more at
Video-LLaVA's ~2,100 positions. Every dtype cast this project makes goes through :func:`cast_model`, which
casts parameters and persistent buffers and keeps non-persistent floating buffers as they were built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _kept_buffers(model: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of every non-persistent floating-point buffer: computed at construction (RoPE
    tables), never loaded from a checkpoint, so their precision is whatever they were built in."""
    kept = []
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and name in module._non_persistent_buffers_set:
                kept.append((module, name, buffer))
    return kept


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with parameters and persistent buffers in ``dtype`` and its computed buffers (RoPE inverse
    frequencies) untouched, as ``from_pretrained(dtype=...)`` leaves a model; returns the same module."""
    kept = _kept_buffers(model)
    model.to(dtype)
    for module, name, buffer in kept:
        setattr(module, name, buffer.to(device=getattr(module, name).device))
    return model


def reduced_precision_buffers(model: nn.Module) -> list[str]:
    """Names of the computed floating-point buffers (RoPE inverse frequencies) that are not float32: each
    one means positions computed from rounded frequencies."""
    names = {id(buffer): name for name, buffer in model.named_buffers()}
    return [
        names.get(id(buffer), f"{type(module).__name__}.{name}")
        for module, name, buffer in _kept_buffers(model)
        if buffer.dtype != torch.float32
    ]


def check_buffer_precision(model: nn.Module, where: str) -> None:
    """Fail fast when ``model``'s RoPE buffers were rounded below float32 (``where`` names the stage)."""
    rounded = reduced_precision_buffers(model)
    if rounded:
        shown = ", ".join(rounded[:4]) + (f" and {len(rounded) - 4} more" if len(rounded) > 4 else "")
        raise RuntimeError(
            f"{where}: rotary buffers {shown} are not float32, so every token position would be computed from "
            "rounded frequencies. Something cast the whole model (Module.to/half/bfloat16, or DeepSpeed's "
            "data_types.buffer_dtype); cast with llava.model.precision.cast_model, or load with dtype=."
        )


def random_init(
    model_class: Callable[[Any], nn.Module], config: Any, dtype: torch.dtype, device: str | torch.device | None
) -> nn.Module:
    """``model_class(config)`` with random weights created directly in ``dtype`` on ``device`` (a 7B model never
    exists in fp32 on the host); the RoPE frequencies stay float32, as ``from_pretrained`` keeps them."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return cast_model(model, dtype)
