"""Pick the attention kernel once: FlashAttention-2 when it imports and a GPU is present, else SDPA."""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)
_announced: set[str] = set()


def default_attn_implementation() -> str:
    """Return ``flash_attention_2`` if usable here, otherwise ``sdpa``; logs the choice once.

    Only an importable ``flash_attn`` with CUDA counts: a broken install is reported, never hidden.
    """
    choice = "sdpa"
    reason = "flash_attn not installed"
    if importlib.util.find_spec("flash_attn") is not None:
        if torch.cuda.is_available():
            try:
                import flash_attn  # noqa: F401
            except ImportError as err:  # a broken build: say so instead of silently degrading
                reason = f"flash_attn is installed but failed to import ({err})"
            else:
                choice, reason = "flash_attention_2", "flash_attn importable and CUDA available"
        else:
            reason = "no CUDA device"
    if choice not in _announced:
        logger.info("attention implementation: %s (%s)", choice, reason)
        _announced.add(choice)
    return choice
