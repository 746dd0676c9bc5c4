"""How new tokens are picked and when decoding stops: :class:`SamplingOptions`, shared by both decode loops
(the eager one in :mod:`llava.model.generation`, the fast one in :mod:`llava.model.fast_generation`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
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
    ``per_row``: each row's own temperature, nucleus and seed (:class:`RowSampling`; replaces ``do_sample``,
    ``temperature``, ``top_p`` and ``generator``): what a server batching unrelated requests needs.
    ``on_step``: called after every step with the step's index and tokens ``[B]`` (rows already finished hold
    the pad id); it may return a boolean ``[B]`` of rows to end now (a stop string, a row's own token limit, a
    client gone), which then hold the pad id like rows past their EOS. It makes every step read back to the
    host: streaming needs the tokens there anyway.
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
    per_row: RowSampling | None = None
    on_step: StepListener | None = None

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

    def pick(self, logits: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The next token of every row from its logits ``[B, V]`` at decode step ``step`` (see
        :func:`pick_next_token`, or :meth:`RowSampling.pick` with ``per_row``)."""
        if self.per_row is not None:
            return self.per_row.pick(logits, step)
        return pick_next_token(logits, self.do_sample, self.temperature, self.top_p, self.generator)

    def stop_rows(self, step: int, tokens: torch.Tensor) -> torch.Tensor | None:
        """What ``on_step`` says about this step's ``tokens``: rows to end now (on their device), or ``None``."""
        if self.on_step is None:
            return None
        stop = self.on_step(step, tokens)
        return None if stop is None else stop.to(device=tokens.device, dtype=torch.bool)


StepListener = Callable[[int, torch.Tensor], "torch.Tensor | None"]
"""``on_step(step, tokens)``: sees each step's tokens ``[B]``, may return a boolean ``[B]`` of rows to end."""

_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIERS = (0x7FEB352D, 0x5BD1E995)  # < 2**31: a 32-bit value times one stays inside int64


def _hash32(values: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xor-shift-multiply), in int64 arithmetic that never overflows."""
    values = values & _MASK32
    for multiplier in _HASH_MULTIPLIERS:
        values = values ^ (values >> 16)
        values = (values * multiplier) & _MASK32
    return values ^ (values >> 15)


def counter_uniforms(seeds: torch.Tensor, step: int, width: int) -> torch.Tensor:
    """Uniforms in ``(0, 1)`` ``[B, width]``, a pure function of each row's seed, ``step`` and column: the
    random stream of one row does not depend on the rows beside it (counter-based, like Philox, and
    identical on every device)."""
    columns = torch.arange(width, device=seeds.device, dtype=torch.long)
    row_key = _hash32(_hash32(seeds.long()) ^ step)
    bits = _hash32((row_key.unsqueeze(1) * 0x3C6EF35F + columns.unsqueeze(0)) & _MASK32) >> 8  # 24 bits
    return (bits.float() + 0.5) / float(1 << 24)


@dataclass(frozen=True)
class RowSampling:
    """Each row's own sampling options, as tensors ``[B]`` on the logits' device: ``temperature`` (0: greedy),
    ``top_p`` (1: no nucleus) and ``seed``.

    Rows draw with the Gumbel-max trick (``argmax(logits / T + g)`` samples ``softmax(logits / T)`` exactly)
    from counter-based noise (:func:`counter_uniforms`), so a row's tokens depend only on its own logits,
    seed and step, never on what it is batched with. ``nucleus`` (known on the host when built) says whether
    any row filters by ``top_p``, so the sort is skipped without a device read-back.
    """

    temperature: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor
    nucleus: bool

    @classmethod
    def of(
        cls,
        temperatures: Sequence[float],
        top_ps: Sequence[float],
        seeds: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> RowSampling:
        """Options of ``len(temperatures)`` rows from host lists (validated: temperature >= 0, 0 < top_p <= 1)."""
        if not len(temperatures) == len(top_ps) == len(seeds):
            raise ValueError(
                f"one temperature, top_p and seed per row: {len(temperatures)}, {len(top_ps)}, {len(seeds)}"
            )
        for row, (temperature, top_p) in enumerate(zip(temperatures, top_ps, strict=True)):
            if temperature < 0:
                raise ValueError(f"row {row}: temperature must be >= 0, got {temperature}")
            if not 0 < top_p <= 1:
                raise ValueError(f"row {row}: top_p must be in (0, 1], got {top_p}")
        return cls(
            temperature=torch.tensor(list(temperatures), dtype=torch.float32, device=device),
            top_p=torch.tensor(list(top_ps), dtype=torch.float32, device=device),
            seed=torch.tensor([seed & _MASK32 for seed in seeds], dtype=torch.long, device=device),
            nucleus=any(top_p < 1 for top_p in top_ps),
        )

    def pick(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Each row's token at decode step ``step`` from its logits ``[B, V]``."""
        logits = logits.float()
        greedy = self.temperature <= 0
        scaled = logits / torch.where(greedy, 1.0, self.temperature).unsqueeze(1)
        if self.nucleus:
            probs = torch.softmax(scaled, dim=-1)
            sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p.unsqueeze(1)
            outside = torch.zeros_like(outside).scatter(-1, sorted_ids, outside)
            scaled = scaled.masked_fill(outside, float("-inf"))
        gumbel = -torch.log(-torch.log(counter_uniforms(self.seed, step, logits.shape[-1])))
        sampled = (scaled + gumbel).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)


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
