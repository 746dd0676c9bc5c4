"""Ragged training batches drawn from a length mix like LLaVA-1.5's instruction data (``llava_v1_5_mix665k``).

Real instruction data is ragged: short VQA conversations, long ShareGPT text-only chats, everything between.
Padding a batch to its longest sample spends compute on pad tokens, and compression makes that share larger
(the visual part shrinks, the text spread stays). The training benchmark draws its samples from this mix so
that padded and packed batches, and every preset, are compared on the same samples.

Source of the mix (``LLAVA_665K``):

* **Composition (exact):** the sample counts per source of ``llava_v1_5_mix665k.json`` as listed in the
  LLaVA-1.5 paper (Liu et al., "Improved Baselines with Visual Instruction Tuning", CVPR 2024, Table 7:
  LLaVA-Instruct 158K, ShareGPT 40K, VQAv2 83K, GQA 72K, OKVQA 9K, OCR-VQA 80K, A-OKVQA 66K, TextCaps 22K,
  RefCOCO 48K, VG 86K) with LLaVA-Instruct-158K split as in the LLaVA paper (58K conversations, 23K detailed
  descriptions, 77K complex reasoning). ShareGPT is the text-only part: 40K of 665K = 6 %.
* **Lengths per source (estimated, not measured):** a log-normal over the text tokens of a whole conversation
  (LLaMA tokens, the system prompt added on top), with a median and spread per source from the format of
  each data set (VQA sources are several short question/answer turns per image merged into one conversation;
  ShareGPT chats are long and truncated at the model's maximum length). No copy of the data set was available
  when this was written; the medians are our estimates and are the part to replace with measured numbers.

**Measured mixes.** ``python -m llava.tools.check_data --data_path llava_v1_5_mix665k.json --tokenizer ...
--length-mix-out mix665k-lengths.json`` writes every sample's text and supervised tokens, tokenized as the
trainer tokenizes them; pass that file wherever a mix name goes (``--length-mix mix665k-lengths.json``) and the
samples are drawn from the measured ones instead of the estimates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llava.bench.shapes import ModelShape
from llava.bench.workload import SYSTEM_PROMPT_TOKENS, random_pixels, slot_token_id
from llava.constants import IGNORE_INDEX

MODEL_MAX_LENGTH = 2048
"""LLaVA-1.5's ``--model_max_length``: text plus visual tokens of one sample."""


@dataclass(frozen=True)
class LengthSource:
    """One data source of a mix: how many samples, whether they carry an image, and the log-normal of their
    conversation text tokens (``median``, ``sigma``); ``answer_share`` of those tokens is supervised."""

    name: str
    samples: int
    has_image: bool
    median: float
    sigma: float
    answer_share: float


LLAVA_665K: tuple[LengthSource, ...] = (
    LengthSource("llava_conversation", 58_000, True, 230, 0.45, 0.70),
    LengthSource("llava_detail", 23_000, True, 170, 0.30, 0.85),
    LengthSource("llava_reasoning", 77_000, True, 210, 0.35, 0.80),
    LengthSource("sharegpt", 40_000, False, 700, 0.80, 0.75),
    LengthSource("vqav2", 83_000, True, 90, 0.50, 0.20),
    LengthSource("gqa", 72_000, True, 160, 0.50, 0.15),
    LengthSource("okvqa", 9_000, True, 40, 0.30, 0.20),
    LengthSource("ocrvqa", 80_000, True, 120, 0.40, 0.25),
    LengthSource("aokvqa", 66_000, True, 60, 0.40, 0.20),
    LengthSource("textcaps", 22_000, True, 45, 0.30, 0.50),
    LengthSource("refcoco", 48_000, True, 200, 0.60, 0.40),
    LengthSource("vg", 86_000, True, 230, 0.60, 0.40),
)
"""The LLaVA-1.5 instruction mix (see the module docstring for what is exact and what is estimated)."""

MIXES = {"llava665k": LLAVA_665K}
MEASURED_FORMAT = "duet-length-mix/1"
"""The ``format`` of a measured mix file: ``samples`` lists ``[text tokens, supervised tokens, visual slots]``."""


@dataclass(frozen=True)
class SampleLength:
    """One drawn sample: its source, text tokens (system prompt included), supervised tokens, visual input."""

    source: str
    text_tokens: int
    answer_tokens: int
    has_visual: bool


def write_measured_mix(path: str | os.PathLike[str], samples: list[list[int]], about: dict) -> None:
    """Save measured ``[text tokens, supervised tokens, visual slots]`` per sample, with where they came from."""
    payload = {"format": MEASURED_FORMAT, **about, "num_samples": len(samples), "samples": samples}
    Path(path).write_text(json.dumps(payload), encoding="utf-8")


def read_measured_mix(path: str | os.PathLike[str]) -> list[SampleLength]:
    """The samples of a file written by :func:`write_measured_mix`; a clear error for anything else."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"length mix {str(path)!r}: cannot read it as JSON ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != MEASURED_FORMAT:
        raise ValueError(
            f"length mix {str(path)!r}: not a measured mix (format {MEASURED_FORMAT!r}); write one with "
            "python -m llava.tools.check_data ... --length-mix-out FILE"
        )
    samples = []
    for index, row in enumerate(payload.get("samples", [])):
        if not (isinstance(row, list) and len(row) == 3 and all(isinstance(v, int) and v >= 0 for v in row)):
            raise ValueError(f"length mix {str(path)!r}: sample {index} is {row!r}, not [text, supervised, slots]")
        text, answer, slots = row
        samples.append(SampleLength("measured", text, answer, slots > 0))
    if not samples:
        raise ValueError(f"length mix {str(path)!r} holds no samples")
    return samples


def known_mix(name: str) -> str:
    """``name`` if it is a built-in mix or a readable measured-mix file (for argparse ``type=``)."""
    if name in MIXES:
        return name
    if Path(name).is_file():
        read_measured_mix(name)
        return name
    raise ValueError(f"unknown length mix {name!r}: a built-in one ({', '.join(sorted(MIXES))}) or a measured-mix file")


def mix_argument(text: str) -> str:
    """:func:`known_mix` for argparse ``type=``: the reason reaches the user's terminal."""
    try:
        return known_mix(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def draw_lengths(
    mix: tuple[LengthSource, ...] | str | os.PathLike[str],
    count: int,
    seed: int = 0,
    visual_tokens: int = 576,
    max_length: int = MODEL_MAX_LENGTH,
) -> list[SampleLength]:
    """``count`` samples drawn from ``mix`` (seeded), truncated so text plus ``visual_tokens`` fit ``max_length``
    (as the trainer truncates). A built-in mix: a source by its share of samples, then a length from its
    log-normal. A measured-mix file (:func:`read_measured_mix`): measured samples, drawn with replacement."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not isinstance(mix, tuple):
        if str(mix) not in MIXES:
            return _resample(read_measured_mix(known_mix(str(mix))), count, seed, visual_tokens, max_length)
        mix = MIXES[str(mix)]
    generator = torch.Generator().manual_seed(seed)
    weights = torch.tensor([float(source.samples) for source in mix])
    picks = torch.multinomial(weights, count, replacement=True, generator=generator).tolist()
    noise = torch.randn(count, generator=generator, dtype=torch.float64).tolist()
    samples = []
    for index, z in zip(picks, noise, strict=True):
        source = mix[index]
        conversation = max(2, round(math.exp(math.log(source.median) + source.sigma * z)))
        limit = max_length - (visual_tokens if source.has_image else 0)
        text = min(SYSTEM_PROMPT_TOKENS + conversation, limit)
        answer = max(1, min(round(source.answer_share * conversation), text - SYSTEM_PROMPT_TOKENS - 1))
        samples.append(SampleLength(source.name, text, answer, source.has_image))
    return samples


def _resample(
    measured: list[SampleLength], count: int, seed: int, visual_tokens: int, max_length: int
) -> list[SampleLength]:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(measured), (count,), generator=generator).tolist()
    drawn = []
    for sample in (measured[index] for index in picks):
        text = min(sample.text_tokens, max_length - (visual_tokens if sample.has_visual else 0))
        answer = max(1, min(sample.answer_tokens, text - SYSTEM_PROMPT_TOKENS - 1))
        drawn.append(SampleLength(sample.source, text, answer, sample.has_visual))
    return drawn


def build_ragged_batch(
    shape: ModelShape, samples: list[SampleLength], seed: int = 0, pad_token_id: int = 0, bos_token_id: int = 1
) -> dict[str, torch.Tensor]:
    """A right-padded finetuning batch shaped like the collator's, one row per drawn sample.

    A sample with a visual input is ``BOS + system prompt``, its image (or video) slot, the instruction and the
    supervised answer; a text-only sample is the same without the slot. Pixels only for the samples that
    have a slot, in row order (as the collator stacks them).
    """
    generator = torch.Generator().manual_seed(seed)
    slot = slot_token_id(shape)
    vocab = shape.llm.vocab
    rows = []
    for sample in samples:
        ids = torch.randint(3, vocab, (sample.text_tokens,), generator=generator)
        ids[0] = bos_token_id
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-sample.answer_tokens :] = ids[-sample.answer_tokens :]
        if sample.has_visual:
            prefix = min(SYSTEM_PROMPT_TOKENS, sample.text_tokens - sample.answer_tokens - 1)
            ids = torch.cat([ids[:prefix], torch.tensor([slot]), ids[prefix:]])
            labels = torch.cat([labels[:prefix], torch.tensor([IGNORE_INDEX]), labels[prefix:]])
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = row_labels
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    visual = sum(sample.has_visual for sample in samples)
    if visual:
        batch.update(random_pixels(shape, visual, generator))
    return batch


def padding_fraction(samples: list[SampleLength], visual_per_layer: list[float]) -> float:
    """Share of padding in the LLM's padded ``[B, L]`` input, averaged over layers (token-weighted).

    Each layer's padded length is its longest row; a visual sample carries ``visual_per_layer[layer]`` visual
    tokens there (T2V keep counts are relative to each sample's N0, equal for every visual sample).
    """
    real = padded = 0.0
    for visual in visual_per_layer:
        lengths = [sample.text_tokens + (visual if sample.has_visual else 0) for sample in samples]
        real += sum(lengths)
        padded += len(lengths) * max(lengths)
    return 1.0 - real / padded if padded else 0.0
