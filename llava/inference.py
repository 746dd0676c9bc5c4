"""Reusable inference API: load a checkpoint once, answer batches of (image(s)/video(s), prompt) requests.

``load_pipeline(path)`` asks the model-family registry which family the checkpoint is (from its ``config.json``)
and returns that family's pipeline; every pipeline has the same
:meth:`~llava.pipeline.GenerationPipeline.generate`. What they share (requests, prompts, left padding, the
decode loop) is in :mod:`llava.pipeline`; what differs, in each family's module under :mod:`llava.families`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from llava.families.base import PipelineOptions
from llava.families.llava import LlavaPipeline
from llava.families.registry import family_for
from llava.pipeline import (
    GenerationPipeline,
    ImageSpec,
    MissingComponentError,
    Request,
    build_prompt_ids,
    build_prompt_text,
    default_device,
    image_paths,
    left_pad,
)

__all__ = [
    "GenerationPipeline",
    "ImageSpec",
    "LlavaPipeline",
    "MissingComponentError",
    "PipelineOptions",
    "Request",
    "build_prompt_ids",
    "build_prompt_text",
    "default_device",
    "image_paths",
    "left_pad",
    "load_pipeline",
]


def load_pipeline(
    path: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    vision_tower: str | None = None,
    compression: Any = None,
    fast_decoding: bool | None = None,
    family: str | None = None,
) -> GenerationPipeline:
    """The pipeline of the checkpoint directory ``path``, whichever family it is.

    ``dtype`` defaults to float32, ``device`` to CUDA when available; ``compression`` (a preset name, YAML path
    or dict; ``"none"`` turns it off) overrides the checkpoint's; ``fast_decoding``: see
    :class:`~llava.pipeline.GenerationPipeline`; ``vision_tower``: where an original LLaVA checkpoint's image
    processor lives. ``family`` (else ``MODEL_FAMILY``) overrides the family ``config.json`` implies.
    """
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    options = PipelineOptions(
        dtype=dtype, device=device, compression=compression, fast_decoding=fast_decoding, vision_tower=vision_tower
    )
    return family_for(path, family).load_pipeline(path, options)
