"""AnyRes token counts (llava.bench.anyres) against transformers' own: LlavaNextProcessor's placeholder counts
and LLaVA-OneVision's model (its pack_image_features: unpadding and anyres_max_9 downsizing), on configurations
built here (no downloads), for many image sizes and aspect ratios."""

from __future__ import annotations

import random

import pytest
import torch

from llava.bench.anyres import NEXT_GEOMETRY, ONEVISION_GEOMETRY, AnyResGeometry, anyres_counts, best_resolution
from llava.hf_adapter import processor_image_token_counts

FIXED_SIZES = [  # (height, width)
    (480, 640), (640, 480), (375, 500), (768, 1024), (720, 1280), (336, 336), (384, 384), (1, 1), (10, 1000),
    (1000, 10), (224, 224), (1080, 1920), (1920, 1080), (2000, 3000), (4000, 1000), (333, 999), (1008, 336),
    (672, 672), (500, 333), (1536, 2048), (3024, 4032), (100, 2304), (2304, 2304), (800, 799),
]  # fmt: skip


def many_sizes(count: int = 120, seed: int = 0) -> list[tuple[int, int]]:
    """The fixed sizes plus random ones from thin strips to 4K, both orientations."""
    generator = random.Random(seed)
    sizes = list(FIXED_SIZES)
    for _ in range(count):
        sizes.append((generator.randint(16, 4096), generator.randint(16, 4096)))
    return sizes


def word_level_tokenizer():
    """A tokenizer built here with the ``<image>`` and ``<video>`` tokens the processors need (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<image>": 1, "<video>": 2, "hello": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )


@pytest.fixture(scope="module")
def next_processor():
    """``LlavaNextProcessor`` as ``llava-hf/llava-v1.6-*-hf`` configures it (336 px views, patch 14, the five
    v1.6 pinpoints, the ``default`` strategy dropping CLS)."""
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[list(pin) for pin in NEXT_GEOMETRY.grid_pinpoints],
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=word_level_tokenizer(),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def test_llava_next_counts_equal_the_processors_for_many_sizes(next_processor):
    sizes = many_sizes()
    expected = processor_image_token_counts(next_processor, sizes)
    ours = [anyres_counts(NEXT_GEOMETRY, height, width).total for height, width in sizes]
    assert ours == expected


def test_llava_next_counts_equal_the_processors_expanded_prompt_and_views(next_processor):
    """End to end: the processor's pixels (views) and the placeholders it writes into ``input_ids``."""
    from PIL import Image

    for height, width in [(480, 640), (640, 480), (336, 336), (200, 900)]:
        encoded = next_processor(
            images=[Image.new("RGB", (width, height))], text=["<image> hello"], return_tensors="pt"
        )
        counts = anyres_counts(NEXT_GEOMETRY, height, width)
        assert int((encoded["input_ids"] == 1).sum()) == counts.total
        assert encoded["pixel_values"].shape[1] == counts.views


@pytest.fixture(scope="module")
def onevision_model():
    """A LLaVA-OneVision with OneVision's real geometry (SigLIP 384 / 14, the 6 x 6 pinpoints, anyres_max_9) and
    tiny widths; only its ``pack_image_features`` is used (through llava.hf_adapter)."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=384, patch_size=14
    )
    text = Qwen2Config(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=32,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_grid_pinpoints=[list(pin) for pin in ONEVISION_GEOMETRY.grid_pinpoints],
        vision_aspect_ratio="anyres_max_9",
        image_token_id=31,
    )
    assert config.image_grid_pinpoints == LlavaOnevisionConfig().image_grid_pinpoints  # transformers' default
    return LlavaOnevisionForConditionalGeneration(config).eval()


def test_llava_onevision_counts_equal_the_models_packed_features(onevision_model):
    from llava.hf_adapter import llava_onevision_tokens_per_image

    sizes = many_sizes(count=60, seed=1)
    with torch.no_grad():
        expected = llava_onevision_tokens_per_image(onevision_model, torch.tensor(sizes))
    counts = [anyres_counts(ONEVISION_GEOMETRY, height, width) for height, width in sizes]
    assert [count.total for count in counts] == expected
    assert any(count.downsized for count in counts) and not all(count.downsized for count in counts)


def test_onevision_downsizing_past_nine_views():
    """1280x720 fills a 2 x 4 grid, unpadded 54 x 108 = 5832 tokens: ratio sqrt(5832 / (9 x 729)) = 0.94, not
    past 1.1, so no downsizing; 3000x2000 (a 4 x 6 grid) is downsized below 1.1^2 x 9 views' tokens."""
    wide = anyres_counts(ONEVISION_GEOMETRY, 720, 1280)
    assert (wide.grid, wide.downsized, wide.grid_tokens, wide.newline_tokens) == ((2, 4), False, 5184, 54)
    big = anyres_counts(ONEVISION_GEOMETRY, 2000, 3000)
    assert big.downsized and big.grid_tokens <= 1.1**2 * 9 * 729
    assert big.newline_tokens * (big.grid_tokens // big.newline_tokens) == big.grid_tokens
    assert sum(big.view_token_counts) == big.base_tokens + big.grid_tokens


def test_per_view_breakdown():
    """Base view, then each tile's surviving positions (row-major), summing to the unpadded grid; a tall strip
    in a 1 x 3 grid loses whole columns of its outer tiles, a square image none."""
    counts = anyres_counts(NEXT_GEOMETRY, 480, 640)
    assert counts.grid == (2, 2) and counts.views == 5 and counts.base_tokens == 576
    assert sum(counts.tile_tokens) == counts.grid_tokens == 1728 and counts.newline_tokens == 36
    assert counts.total == 576 + 1728 + 36
    assert counts.tile_tokens == (24 * 18, 24 * 18, 24 * 18, 24 * 18)  # 6 of 48 rows cut at the top and bottom
    strip = anyres_counts(NEXT_GEOMETRY, 1000, 150)
    assert strip.grid == (3, 1) and strip.tile_tokens[0] == strip.tile_tokens[2] == strip.tile_tokens[1]
    square = anyres_counts(NEXT_GEOMETRY, 672, 672)
    assert square.tile_tokens == (576,) * 4 and square.newline_tokens == 48
    assert anyres_counts(NEXT_GEOMETRY, 336, 336).grid == (1, 2)  # ties keep the first listed pinpoint


def test_best_resolution_and_bad_input():
    assert best_resolution(480, 640, NEXT_GEOMETRY.grid_pinpoints) == (672, 672)
    assert best_resolution(100, 1000, NEXT_GEOMETRY.grid_pinpoints) == (336, 1008)
    with pytest.raises(ValueError, match="positive"):
        anyres_counts(NEXT_GEOMETRY, 0, 10)
    with pytest.raises(ValueError, match="pinpoints"):
        anyres_counts(AnyResGeometry("empty", 336, 14, ()), 10, 10)


@pytest.fixture(scope="module")
def next_model():
    """A LLaVA-NeXT with v1.6's geometry (CLIP 336 / 14, the five pinpoints) and tiny widths; only its AnyRes
    layout is used (transformers' own grid shape and unpadding, through llava.hf_adapter)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=336, patch_size=14
    )
    text = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_grid_pinpoints=[list(pin) for pin in NEXT_GEOMETRY.grid_pinpoints],
        image_token_id=31,
    )
    return LlavaNextForConditionalGeneration(config).eval()


def test_llava_next_per_view_breakdown_equals_the_models_layout(next_model):
    """Per view (base, then each tile), the tokens transformers' packed layout takes from it, and its newline
    slots, equal the breakdown."""
    from llava.hf_adapter import llava_next_anyres_layout

    sizes = many_sizes(count=40, seed=2)
    layouts = llava_next_anyres_layout(next_model, torch.tensor(sizes))
    for (height, width), layout in zip(sizes, layouts, strict=True):
        counts = anyres_counts(NEXT_GEOMETRY, height, width)
        rows = layout[layout >= 0]
        per_view = torch.bincount(rows // NEXT_GEOMETRY.view_tokens, minlength=counts.views).tolist()
        assert tuple(per_view) == counts.view_token_counts, (height, width)
        assert int((layout < 0).sum()) == counts.newline_tokens


@pytest.mark.parametrize("preset", ["anyres_duet_third", "anyres_duet_ninth", "anyres_visionzip_third"])
def test_onevision_v2v_accounting_per_view_group_equals_the_plan(onevision_model, preset):
    """LLaVA-OneVision's V2V budgets per view group after packing: the base view and the packed grid (unpadded,
    downsized past anyres_max_9), not per tile. The accounting's kept tokens per image equal the model's plan
    (onevision_v2v_counts, exact) and its newline tokens the plan's upper bound, for sizes with and without
    downsizing; per-tile budgets would keep a different count."""
    from llava.compression.accounting import anyres_initial_visual_tokens
    from llava.compression.config import CompressionConfig, load_compression
    from llava.compression.onevision_v2v import onevision_v2v_counts

    config = load_compression(preset)
    sizes = many_sizes(count=30, seed=3)
    plan = onevision_v2v_counts(onevision_model, torch.tensor(sizes), config.v2v)
    counts = [anyres_counts(ONEVISION_GEOMETRY, height, width) for height, width in sizes]
    assert [count.v2v_groups for count in counts] == [(729, count.grid_tokens) for count in counts]
    v2v_only = CompressionConfig("v2v_only", config.v2v)
    accounted = [
        (anyres_initial_visual_tokens(v2v_only, count.v2v_groups, 0), count.newline_tokens) for count in counts
    ]
    assert accounted == plan
    per_tile = [anyres_initial_visual_tokens(v2v_only, count.view_token_counts, 0) for count in counts]
    assert per_tile != [kept for kept, _ in plan]
    assert any(count.downsized for count in counts)


def test_llava_next_v2v_groups_are_its_views():
    """LLaVA-NeXT's V2V stays per view: its budget units are the base view and each tile's unpadded tokens."""
    counts = anyres_counts(NEXT_GEOMETRY, 480, 640)
    assert counts.v2v_groups == counts.view_token_counts == (576, 432, 432, 432, 432)
