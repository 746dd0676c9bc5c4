"""Qwen2.5-VL through the shared decoder loop: equality with transformers' model when uncompressed, T2V with
M-RoPE positions kept, exact keep counts, batched cached generation."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.model.qwen_vl import DuetQwenVL

IMAGE, START, END = 150, 152, 153
PATCH_FEATURES = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch


def tiny_qwen() -> Qwen2_5_VLForConditionalGeneration:
    """A random Qwen2.5-VL: 2-block vision transformer (window + full attention), 4-layer Qwen2 decoder."""
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=160, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE, video_token_id=151, vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def image(tokens: int) -> list[int]:
    return [START] + [IMAGE] * tokens + [END]


def batch() -> dict[str, torch.Tensor]:
    """Left-padded: one 56 px image (16 patches -> 4 tokens); two images (4 + 1 tokens); text only."""
    rows = [[1, *image(4), 5, 6, 7], [1, *image(4), 8, *image(1), 9, 10], [1, 11, 12, 13]]
    length = max(len(row) for row in rows)
    ids = torch.tensor([[0] * (length - len(row)) + row for row in rows])
    torch.manual_seed(1)
    return {
        "input_ids": ids,
        "attention_mask": (torch.arange(length) >= torch.tensor([[length - len(row)] for row in rows])).long(),
        "pixel_values": torch.randn(16 + 16 + 4, PATCH_FEATURES),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4], [1, 2, 2]]),
    }


T2V = CompressionConfig("qwen_t2v", t2v=T2VConfig((0.5, 0.75), (0.5, 0.25), "instruction"))


def test_uncompressed_logits_equal_transformers_model():
    hf = tiny_qwen()
    inputs = batch()
    types = (inputs["input_ids"] == IMAGE).int()
    expected = hf(**inputs, mm_token_type_ids=types).logits
    ours = DuetQwenVL(hf)(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ours - expected)[real].abs().max() <= 1e-4


def test_greedy_generation_equals_transformers_generate_when_uncompressed():
    hf = tiny_qwen()
    inputs = batch()
    ours = DuetQwenVL(hf).generate(**inputs, max_new_tokens=6, eos_token_id=[], fast=False)
    theirs = hf.generate(
        **inputs, mm_token_type_ids=(inputs["input_ids"] == IMAGE).int(), max_new_tokens=6, min_new_tokens=6,
        do_sample=False,
    )  # fmt: skip
    assert torch.equal(ours, theirs[:, inputs["input_ids"].shape[1] :])


def test_keep_counts_are_relative_to_n0_and_do_not_compound():
    model = DuetQwenVL(tiny_qwen(), T2V)
    inputs = batch()
    # Row 1 alone: two images, N0 = 5 visual tokens. Stage 1 keeps floor(0.5 * 5) = 2, stage 2 keeps
    # floor(0.25 * 5) = 1; compounding (0.25 of the 2 survivors) would keep 0.
    row = {key: value for key, value in inputs.items() if key != "pixel_values" and key != "image_grid_thw"}
    row = {key: value[1:2] for key, value in row.items()}
    row["pixel_values"], row["image_grid_thw"] = inputs["pixel_values"][16:], inputs["image_grid_thw"][1:]
    per_layer = model(**row).visual_tokens_per_layer
    assert [count * 2 for count in per_layer] == [5, 5, 2, 1]  # per layer, summed over the row's 2 images


def test_t2v_generation_matches_recomputation_fast_path_and_single_samples():
    model = DuetQwenVL(tiny_qwen(), T2V)
    inputs = batch()
    options = dict(max_new_tokens=6, eos_token_id=[])
    cached = model.generate(**inputs, fast=False, **options)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **options))
    assert torch.equal(cached, model.generate(**inputs, fast=True, **options))
    pixel_rows = [(slice(0, 16), slice(0, 1)), (slice(16, 36), slice(1, 3)), None]
    for index, pixels in enumerate(pixel_rows):
        keep = inputs["attention_mask"][index].bool()
        single = {"input_ids": inputs["input_ids"][index : index + 1, keep]}
        if pixels is not None:
            single["pixel_values"] = inputs["pixel_values"][pixels[0]]
            single["image_grid_thw"] = inputs["image_grid_thw"][pixels[1]]
        assert torch.equal(model.generate(**single, **options)[0], cached[index])


def test_unsupported_settings_are_refused():
    model = DuetQwenVL(tiny_qwen())
    with pytest.raises(ValueError, match="T2V stages only"):
        model.set_compression(CompressionConfig("x", v2v=V2VConfig("duet", 4, 2)))
    with pytest.raises(ValueError, match="position_mode"):
        model.set_compression(CompressionConfig("x", t2v=T2VConfig((0.5,), (0.5,), "last", "compact")))
