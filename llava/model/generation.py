"""Batched greedy/sampled decoding with a KV cache, for left-padded multimodal prompts of any model family."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import torch

from llava.hf_adapter import new_dynamic_cache
from llava.model.contract import VisionLanguageModel
from llava.model.fast_generation import FastDecoder, prefill, static_decode_supported
from llava.model.sampling import SamplingOptions
from llava.model.splice import matches_any

logger = logging.getLogger(__name__)


def use_fast_path(
    model: VisionLanguageModel,
    device: torch.device,
    use_cache: bool,
    fast: bool | None,
    fast_decoder: FastDecoder | None,
) -> bool:
    """Whether to decode with static caches and CUDA graphs.

    ``fast=None`` (the default) picks it on CUDA when the attention kernel allows it (or when a
    ``fast_decoder`` is passed); ``False`` keeps the eager reference loop; ``True`` insists and fails
    with the reason when it cannot run.
    """
    if fast is False:
        return False
    if not use_cache:
        if fast:
            raise ValueError("fast decoding needs the KV cache; use_cache=False is the recomputation reference")
        return False
    reason = static_decode_supported(model)
    if fast:
        if reason is not None:
            raise ValueError(f"fast decoding is not available: {reason}")
        return True
    if reason is not None:
        if device.type == "cuda":
            _log_eager_fallback(reason)
        return False
    return fast_decoder is not None or device.type == "cuda"


@functools.cache
def _log_eager_fallback(reason: str) -> None:
    logger.info("generating with the eager decode loop: %s", reason)


ONE_OFF_GRAPH_MIN_TOKENS = 32
"""New tokens from which a call without a caller-held :class:`FastDecoder` still captures a CUDA graph: capture
costs about three decode steps, which a shorter answer does not win back within the call."""


def _one_off_decoder(model: VisionLanguageModel, max_new_tokens: int) -> FastDecoder:
    """A decoder for one call, when the caller holds none (graphs die with it; pipelines and the evaluation
    runner hold one, so their graphs are captured once per shape)."""
    logger.debug("fast decoding without a caller-held FastDecoder: buffers and graphs last for this call only")
    return FastDecoder(model, use_cuda_graph=None if max_new_tokens >= ONE_OFF_GRAPH_MIN_TOKENS else False)


def greedy_or_sample(
    model: VisionLanguageModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    visual_inputs: Mapping[str, torch.Tensor | None] | None = None,
    sampling: SamplingOptions | None = None,
    fast_decoder: FastDecoder | None = None,
) -> torch.Tensor:
    """Decode up to ``sampling.max_new_tokens`` tokens per prompt; what every family's ``generate`` runs.

    ``visual_inputs``: the keyword tensors the model's prefill takes besides the text (``pixel_values``,
    ``pixel_values_videos``, Qwen2.5-VL's ``image_grid_thw``...). Returns the new tokens
    ``[B, <= max_new_tokens]``, padded after each row's EOS. Pass a :class:`FastDecoder` as ``fast_decoder``
    to reuse its buffers and captured graphs across calls; without one each fast call captures anew.
    """
    sampling = sampling if sampling is not None else SamplingOptions()
    visual_inputs = dict(visual_inputs or {})
    max_new_tokens = sampling.max_new_tokens
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if use_fast_path(model, input_ids.device, sampling.use_cache, sampling.fast, fast_decoder):
        decoder = fast_decoder if fast_decoder is not None else _one_off_decoder(model, max_new_tokens)
        return decoder.generate(input_ids, attention_mask, visual_inputs, sampling)
    text_config = model.config.text_config
    eos_ids = sampling.stop_ids(text_config)
    pad_token_id = sampling.padding_id(text_config, eos_ids)
    use_cache = sampling.use_cache
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    new_tokens: list[torch.Tensor] = []

    cache = new_dynamic_cache(model.language_model.config) if use_cache else None
    out = prefill(model, input_ids, attention_mask, visual_inputs, cache)
    decode_state = out.decode_state
    prompt_length = out.prompt_length
    for step in range(max_new_tokens):
        token = sampling.pick(out.logits[:, -1], step)
        token = token.masked_fill(finished, pad_token_id)
        new_tokens.append(token)
        finished |= matches_any(token, eos_ids)
        stop = sampling.stop_rows(step, token)
        if stop is not None:
            finished |= stop
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if use_cache:
            out = model(
                token.unsqueeze(1),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                decode_state=decode_state,
            )
        else:
            # Reference path: recompute everything; queries stay within the prompt, so the
            # same visual tokens are kept as at the cached prefill.
            generated = torch.stack(new_tokens, dim=1)
            out = model(
                torch.cat([input_ids, generated], dim=1),
                attention_mask=torch.cat([attention_mask, torch.ones_like(generated)], dim=1),
                left_padding=True,
                logits_to_keep=1,
                query_end=prompt_length,
                **visual_inputs,
            )
    return torch.stack(new_tokens, dim=1)
