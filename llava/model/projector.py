"""Multimodal projector factory: maps vision features to the language model's width."""

from __future__ import annotations

import re

from torch import nn

_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(projector_type: str, vision_hidden_size: int, text_hidden_size: int) -> nn.Module:
    """Build ``linear``, ``mlp{N}x_gelu`` (N linear layers with GELU between) or ``identity``.

    ``mlp2x_gelu`` is LLaVA-1.5's ``Linear-GELU-Linear``; its parameter names (``0.*``, ``2.*``)
    match the original checkpoints' ``mm_projector.0/2`` so they load without renaming.
    """
    if projector_type == "linear":
        return nn.Linear(vision_hidden_size, text_hidden_size)
    if projector_type == "identity":
        if vision_hidden_size != text_hidden_size:
            raise ValueError(
                f"identity projector needs equal widths, got vision {vision_hidden_size} and text {text_hidden_size}"
            )
        return nn.Identity()
    match = _MLP_PATTERN.match(projector_type)
    if match is None:
        raise ValueError(f"unknown projector_type {projector_type!r}; expected 'linear', 'identity' or 'mlp<N>x_gelu'")
    depth = int(match.group(1))
    if depth < 1:
        raise ValueError(f"projector_type {projector_type!r} needs at least one layer")
    layers: list[nn.Module] = [nn.Linear(vision_hidden_size, text_hidden_size)]
    for _ in range(1, depth):
        layers += [nn.GELU(), nn.Linear(text_hidden_size, text_hidden_size)]
    return nn.Sequential(*layers)
