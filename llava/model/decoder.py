"""Run a HF decoder-only LM layer by layer on merged embeddings.

The layers are the model's own modules (so SDPA/FlashAttention, gradient checkpointing and ZeRO
hooks all apply); this loop only owns what happens *between* layers, which is where staged
visual-token dropping plugs in.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Cache
from transformers.masking_utils import create_causal_mask


def decoder_of(language_model: nn.Module) -> nn.Module:
    """The base decoder (embeddings, layers, final norm, rotary embedding) of a causal LM."""
    decoder = language_model.get_decoder()
    for attribute in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, attribute):
            raise TypeError(
                f"{type(language_model).__name__} has no decoder.{attribute}; only LLaMA-style decoders "
                "(embed_tokens, layers, norm, rotary_emb) are supported"
            )
    return decoder


def causal_mask_for(
    decoder: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    past_key_values: Cache | None,
    layer_idx: int | None = None,
) -> torch.Tensor | None:
    """The 4D (or ``None`` = plain causal) mask the decoder's attention kernel expects."""
    return create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden_states,
        attention_mask=attention_mask,
        past_key_values=past_key_values,
        layer_idx=layer_idx,
    )


def run_decoder_layers(
    decoder: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    past_key_values: Cache | None = None,
    use_cache: bool = False,
) -> torch.Tensor:
    """Apply every decoder layer and the final norm; returns the last hidden states."""
    mask = causal_mask_for(decoder, hidden_states, attention_mask, past_key_values)
    position_embeddings = decoder.rotary_emb(hidden_states, position_ids=position_ids)
    for layer in decoder.layers:
        hidden_states = layer(
            hidden_states,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
        )
    return decoder.norm(hidden_states)
