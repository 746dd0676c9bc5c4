"""Batched greedy/sampled decoding with a KV cache, for left-padded multimodal prompts."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch

from llava.hf_adapter import new_dynamic_cache
from llava.model.fast_generation import FastDecoder, prefill, static_decode_supported
from llava.model.merge import matches_any

if TYPE_CHECKING:
    from llava.model.modeling import DuetLlavaForCausalLM

logger = logging.getLogger(__name__)


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def use_fast_path(
    model: DuetLlavaForCausalLM,
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


def pick_next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Argmax, or a sample from the temperature-scaled, nucleus-filtered distribution."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        outside_nucleus = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside_nucleus, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, sorted_ids, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


ONE_OFF_GRAPH_MIN_TOKENS = 32
"""New tokens from which a call without a caller-held :class:`FastDecoder` still captures a CUDA graph: capture
costs about three decode steps, which a shorter answer does not win back within the call."""


def _one_off_decoder(model: DuetLlavaForCausalLM, max_new_tokens: int) -> FastDecoder:
    """A decoder for one call, when the caller holds none (graphs die with it; pipelines and the evaluation
    runner hold one, so their graphs are captured once per shape)."""
    logger.debug("fast decoding without a caller-held FastDecoder: buffers and graphs last for this call only")
    return FastDecoder(model, use_cuda_graph=None if max_new_tokens >= ONE_OFF_GRAPH_MIN_TOKENS else False)


def greedy_or_sample(
    model: DuetLlavaForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    fast: bool | None = None,
    fast_decoder: FastDecoder | None = None,
    visual_inputs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Decode up to ``max_new_tokens`` tokens per prompt; see :meth:`DuetLlavaForCausalLM.generate`.

    ``visual_inputs``: further keyword tensors the model's prefill takes (Qwen2.5-VL's ``image_grid_thw``).
    """
    visual_inputs = dict(visual_inputs or {})
    text_config = model.config.text_config
    eos_ids = _as_id_list(eos_token_id if eos_token_id is not None else text_config.eos_token_id)
    if pad_token_id is None:
        pad_token_id = text_config.pad_token_id if text_config.pad_token_id is not None else (eos_ids or [0])[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = input_ids.shape[0]
    device = input_ids.device
    if use_fast_path(model, input_ids.device, use_cache, fast, fast_decoder):
        decoder = fast_decoder if fast_decoder is not None else _one_off_decoder(model, max_new_tokens)
        return decoder.generate(
            input_ids,
            attention_mask,
            pixel_values,
            pixel_values_videos,
            max_new_tokens,
            lambda logits: pick_next_token(logits, do_sample, temperature, top_p, generator),
            eos_ids,
            pad_token_id,
            visual_inputs,
        )
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []

    cache = new_dynamic_cache(model.language_model.config) if use_cache else None
    out = prefill(model, input_ids, attention_mask, pixel_values, pixel_values_videos, cache, visual_inputs)
    decode_state = out.decode_state
    prompt_length = out.prompt_length
    for step in range(max_new_tokens):
        token = pick_next_token(out.logits[:, -1], do_sample, temperature, top_p, generator)
        token = token.masked_fill(finished, pad_token_id)
        new_tokens.append(token)
        finished |= matches_any(token, eos_ids)
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
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                left_padding=True,
                logits_to_keep=1,
                query_end=prompt_length,
                **visual_inputs,
            )
    return torch.stack(new_tokens, dim=1)
