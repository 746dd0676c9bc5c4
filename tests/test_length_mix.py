"""The ragged length mix of the training benchmark and the FLOP model of a ragged batch."""

from __future__ import annotations

import statistics

import pytest

from llava.bench.flops import ragged_step_flops, training_step_flops
from llava.bench.length_mix import LLAVA_665K, SampleLength, build_ragged_batch, draw_lengths, padding_fraction
from llava.bench.shapes import get_shape
from llava.bench.workload import SYSTEM_PROMPT_TOKENS
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID


def test_the_mix_matches_llava_665k_composition():
    assert sum(source.samples for source in LLAVA_665K) == 664_000  # Table 7 of LLaVA-1.5, in thousands rounded
    text_only = sum(source.samples for source in LLAVA_665K if not source.has_image)
    assert text_only / 664_000 == pytest.approx(0.06, abs=0.005)
    drawn = draw_lengths("llava665k", 5000, seed=3)
    assert sum(not sample.has_visual for sample in drawn) / 5000 == pytest.approx(0.06, abs=0.015)
    assert draw_lengths("llava665k", 5000, seed=3) == drawn  # seeded
    lengths = [sample.text_tokens for sample in drawn]
    assert min(lengths) > SYSTEM_PROMPT_TOKENS and statistics.median(lengths) < 400 < max(lengths)
    # Truncation as the trainer's: text plus the 576 visual tokens within 2048.
    assert all(s.text_tokens + (576 if s.has_visual else 0) <= 2048 for s in drawn)
    assert all(1 <= s.answer_tokens < s.text_tokens for s in drawn)


def test_ragged_batch_rows_follow_their_samples():
    samples = [SampleLength("a", 40, 5, True), SampleLength("b", 60, 10, False), SampleLength("c", 45, 3, True)]
    batch = build_ragged_batch(get_shape("tiny"), samples, seed=0)
    assert batch["pixel_values"].shape[0] == 2  # only the samples with an image
    assert batch["attention_mask"].sum(dim=1).tolist() == [41, 60, 46]  # text (+ the image slot)
    assert (batch["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [1, 0, 1]
    assert (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist() == [5, 10, 3]
    assert batch["input_ids"][:, 0].tolist() == [1, 1, 1]


def test_padding_fraction_by_hand():
    samples = [SampleLength("a", 10, 1, True), SampleLength("b", 30, 1, False)]
    # Layer 1: rows 10 + 20 and 30 -> real 60 of 60. Layer 2: rows 10 + 4 and 30 -> real 44 of 60.
    assert padding_fraction(samples, [20, 4]) == pytest.approx(1 - 104 / 120)
    assert padding_fraction([samples[0]], [20, 4]) == 0.0


def test_ragged_flops_sum_samples_and_count_text_only_rows():
    shape = get_shape("llava-7b")
    image = SampleLength("a", 100, 30, True)
    text = SampleLength("b", 100, 30, False)
    assert ragged_step_flops(shape, "duet_128", [image, image]) == pytest.approx(
        training_step_flops(shape, "duet_128", "finetune", 2).total
    )
    with_text = ragged_step_flops(shape, None, [image, text])
    alone = ragged_step_flops(shape, None, [image])
    text_only = with_text - alone
    assert 0 < text_only < alone / 5  # 100 text tokens against 676 tokens plus the tower
    # Compression does not touch text-only samples.
    assert ragged_step_flops(shape, "duet_64", [text]) == pytest.approx(ragged_step_flops(shape, None, [text]))
