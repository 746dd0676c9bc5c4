"""How new tokens are picked and when decoding stops: :class:`SamplingOptions`, shared by both decode loops
(the eager one in :mod:`llava.model.generation`, the fast one in :mod:`llava.model.fast_generation`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig


@dataclass(frozen=True)
class SamplingOptions:
    """The options of one ``generate`` call; the keywords of ``model.generate`` of the same names.

    ``max_new_tokens``: most tokens per prompt. ``do_sample``: sample from the ``temperature``-scaled,
    ``top_p``-nucleus-filtered distribution (drawn with ``generator``), else argmax. ``eos_token_id``: the
    id(s) that end a row (``None``: the language model's config's; ``[]``: none, every row runs to
    ``max_new_tokens``). ``pad_token_id``: fills a row after its end (``None``: the config's, else the first
    EOS id, else 0). ``use_cache``: ``False`` recomputes the whole sequence at every step (slow; the
    reference the cached paths are tested against). ``fast``: static per-stage caches and a CUDA-graph decode
    step (``None``: on CUDA when the attention kernel allows it; ``True`` insists; ``False``: the eager loop).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True
    generator: torch.Generator | None = None
    fast: bool | None = None

    @classmethod
    def from_keywords(cls, sampling: SamplingOptions | None = None, **keywords: Any) -> SamplingOptions:
        """``sampling`` (the defaults when ``None``) with the fields named in ``keywords`` replaced: how
        ``generate`` folds its keywords in. Unknown keywords raise ``TypeError`` (a typo would be ignored)."""
        if sampling is not None and not isinstance(sampling, cls):
            raise TypeError(f"sampling must be a SamplingOptions, got {type(sampling).__name__}")
        unknown = sorted(set(keywords) - SAMPLING_FIELDS)
        if unknown:
            raise TypeError(
                f"generate() got unexpected keyword argument(s) {', '.join(unknown)}; "
                f"its sampling options are {', '.join(sorted(SAMPLING_FIELDS))}, sampling and fast_decoder"
            )
        sampling = sampling if sampling is not None else cls()
        return dataclasses.replace(sampling, **keywords) if keywords else sampling

    def stop_ids(self, text_config: PretrainedConfig) -> list[int]:
        """The EOS ids that end a row: ``eos_token_id``, else the language model's config's."""
        value = self.eos_token_id if self.eos_token_id is not None else text_config.eos_token_id
        if value is None:
            return []
        return [value] if isinstance(value, int) else list(value)

    def padding_id(self, text_config: PretrainedConfig, stop_ids: list[int]) -> int:
        """The id that fills a row after its end: ``pad_token_id``, the config's, the first EOS id, or 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return text_config.pad_token_id if text_config.pad_token_id is not None else (stop_ids or [0])[0]

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token of every row from its logits ``[B, V]`` (see :func:`pick_next_token`)."""
        return pick_next_token(logits, self.do_sample, self.temperature, self.top_p, self.generator)


SAMPLING_FIELDS = frozenset(field.name for field in dataclasses.fields(SamplingOptions))
"""The keywords ``generate`` folds into :class:`SamplingOptions`."""


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
