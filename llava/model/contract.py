"""What every model family shares: the output of ``forward``, the pieces both families' forwards build it from,
and :class:`VisionLanguageModel`, the protocol generation, the fast decoder and the trainer type against.

A family (LLaVA's :mod:`llava.model.modeling`, the Qwen2.5-VL wrapper) imports from here; generation and the
decoders import no family's class, so the families can import generation without an import circle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from transformers import PretrainedConfig

from llava.constants import IGNORE_INDEX
from llava.hf_adapter import Cache, ModelOutput
from llava.model.decoder import DecoderResult, DecodeState, StagePlan, decoder_of, run_decoder_step
from llava.utils.profiling import PROFILE_REGIONS


@dataclass
class DuetOutput(ModelOutput):
    """Forward output of every family. ``attention_mask``/``position_ids`` describe the sequence after the
    visual tokens were spliced in (and, at a prefill, after the last stage's drops), so that generation can
    continue from it; ``decode_state`` is what decode steps need after a (possibly compressed) prefill."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    num_label_tokens: torch.Tensor | None = None
    decode_state: DecodeState | None = None
    prompt_length: int | None = None
    visual_tokens_per_layer: list[float] | None = None
    visual_tokens_per_row: list[list[int]] | None = None
    compression_time_s: float | None = None


@runtime_checkable
class VisionLanguageModel(Protocol):
    """What generation (:mod:`llava.model.generation`), the fast decoder (:mod:`llava.model.fast_generation`)
    and the trainer use of a model, whatever its family.

    * ``config.text_config``: the language model's config (``eos_token_id``/``pad_token_id`` are generation's
      defaults); ``language_model``: the decoder-only LM (:func:`~llava.model.decoder.decoder_of` finds its
      layers; its ``config`` sizes caches and names the attention kernel); ``projector``: the vision-to-language
      projector (trained alone in stage 1); ``stage_plan``: where the decoder drops visual tokens (the
      fast decoder lays its per-stage caches out by it).
    * Calling the model is its ``forward`` (keywords: :data:`FORWARD_KEYWORDS`): a prefill of ``input_ids``
      with the family's visual keywords (``labels``: the training loss, no logits), or, with the prefill's
      ``decode_state`` and ``cache``, decode steps.
    * ``generate``: greedy or sampled decoding (:func:`llava.model.generation.greedy_or_sample`).
    * ``set_compression`` / ``set_query_vocabulary``: switch the compression preset; give ``salient`` T2V
      queries the tokenizer's content words (a no-op for a family without such queries).
    * ``training`` and ``enable_input_require_grads``: as on any ``nn.Module`` / HF model under the Trainer.
    """

    training: bool
    stage_plan: StagePlan | None

    @property
    def config(self) -> PretrainedConfig: ...

    @property
    def language_model(self) -> nn.Module: ...

    @property
    def projector(self) -> nn.Module: ...

    def get_input_embeddings(self) -> nn.Module: ...

    def get_output_embeddings(self) -> nn.Module: ...

    def set_compression(self, spec: Any) -> None: ...

    def set_query_vocabulary(self, tokenizer: Any) -> None: ...

    def enable_input_require_grads(self) -> None: ...

    def __call__(self, input_ids: torch.Tensor, **keywords: Any) -> DuetOutput:
        """The model's ``forward``: every family's takes the :data:`FORWARD_KEYWORDS`."""
        ...

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """New tokens ``[B, <= max_new_tokens]`` of left-padded prompts (sampling options as keywords)."""
        ...


FORWARD_KEYWORDS = (
    "attention_mask",
    "pixel_values",
    "pixel_values_videos",
    "cache",
    "use_cache",
    "left_padding",
    "logits_to_keep",
    "decode_state",
    "query_end",
    "labels",
    "num_items_in_batch",
)
"""The keywords every family's ``forward`` takes besides ``input_ids`` (each family types them in its own
signature, which transformers' Trainer reads): the padding mask and the visual inputs of a prefill; the cache,
``use_cache``, ``left_padding`` (inferred from the mask when ``None``), the logits kept, the ``decode_state`` of
decode steps and ``query_end`` (T2V queries end there: a recomputation keeps its prefill's visual tokens) of
generation; ``labels`` and ``num_items_in_batch`` (the loss exact under gradient accumulation) of training.
A family adds its own (Qwen2.5-VL's grids) as keywords; generation passes them through as ``visual_inputs``."""


def decode_step_output(
    model: VisionLanguageModel, input_ids: torch.Tensor, state: DecodeState, cache: Cache, logits_to_keep: int
) -> DuetOutput:
    """New tokens after a (possibly compressed) prefill: the model's embeddings, its decoder's stages with
    their own caches and positions (``state``, advanced in place), its LM head."""
    hidden = run_decoder_step(decoder_of(model.language_model), model.get_input_embeddings()(input_ids), state, cache)
    logits = model.get_output_embeddings()(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)
    return DuetOutput(logits=logits, cache=cache, decode_state=state)


def decode_step_if_given(
    model: VisionLanguageModel,
    input_ids: torch.Tensor,
    decode_state: DecodeState | None,
    cache: Cache | None,
    logits_to_keep: int,
    pixel_inputs: Iterable[torch.Tensor | None],
) -> DuetOutput | None:
    """The decode step when ``decode_state`` is given, ``None`` for a prefill; the forwards' shared guard.

    Raises when pixels (``pixel_inputs``: the forward's image and video pixels) come with a decode step, or
    when a non-empty ``cache`` comes without the ``decode_state`` that knows each stage's length.
    """
    if decode_state is not None:
        if any(pixels is not None for pixels in pixel_inputs):
            raise ValueError("pixel values can only be given at prefill, not at a decode step")
        return decode_step_output(model, input_ids, decode_state, cache, logits_to_keep)
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("decode steps need the decode_state returned by the prefill call")
    return None


def _output_requires_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    output.requires_grad_(True)


def require_grads_from(embeddings: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Make ``embeddings``' output require grad (checkpointed layers over frozen embeddings, adapters)."""
    return embeddings.register_forward_hook(_output_requires_grad)


def label_loss(
    lm_head: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy over label positions only (the logits of other positions are never made).

    ``num_items_in_batch`` (from the HF Trainer) makes the loss exact under gradient accumulation: the sum
    of token losses is divided by it instead of the local count. Returns ``(loss, label token count)``.
    """
    targets = labels[:, 1:]
    predicts = targets != IGNORE_INDEX
    selected_hidden = hidden[:, :-1][predicts]
    logits = lm_head(selected_hidden).float()
    token_loss_sum = F.cross_entropy(logits, targets[predicts], reduction="sum")
    count = predicts.sum()
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device, dtype=torch.float32)
    else:
        denominator = count.clamp(min=1).float()
    return token_loss_sum / denominator, count


def prefill_output(
    model: VisionLanguageModel,
    result: DecoderResult,
    labels: torch.Tensor | None,
    num_items_in_batch: torch.Tensor | int | None,
    logits_to_keep: int,
    cache: Cache | None,
    prompt_length: int,
    extra_seconds: float,
) -> DuetOutput:
    """A prefill's output: the loss over ``labels`` (then no logits), else the logits of the last
    ``logits_to_keep`` positions (all with 0); the stages' masks, positions and decode state."""
    loss = logits = num_label_tokens = None
    lm_head = model.get_output_embeddings()
    if labels is not None:
        loss, num_label_tokens = label_loss(lm_head, result.hidden, result.sequence.labels, num_items_in_batch)
    else:
        kept = result.hidden[:, -logits_to_keep:] if logits_to_keep > 0 else result.hidden
        with record_function(PROFILE_REGIONS["lm_head"]):
            logits = lm_head(kept)
    return DuetOutput(
        loss=loss,
        logits=logits,
        cache=cache,
        attention_mask=result.sequence.attention_mask,
        position_ids=result.sequence.position_ids,
        num_label_tokens=num_label_tokens,
        decode_state=result.decode_state,
        prompt_length=prompt_length,
        visual_tokens_per_layer=result.visual_tokens_per_layer,
        visual_tokens_per_row=result.visual_tokens_per_row,
        compression_time_s=result.compression_time_s + extra_seconds,
    )
