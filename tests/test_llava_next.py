"""LLaVA-NeXT (AnyRes) through the shared decoder loop: equality with transformers' model when uncompressed,
T2V keep counts relative to each sample's N0, batched and cached generation equal to one-by-one and recomputed."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from llava.compression.config import CompressionConfig, DyMUConfig, T2VConfig, V2VConfig
from llava.hf_adapter import llava_next_image_features, set_attn_implementation
from llava.model.contract import FORWARD_KEYWORDS, VisionLanguageModel
from llava.model.llava_next import DuetLlavaNext
from tests.conftest import tiny_text_config, tiny_vision_config

IMAGE = 100  # the tiny model's image placeholder id
TILE = 28  # CLIP input size: 2 x 2 patches of 14 px per view
PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # (height, width): wide, tall and square tile grids
SIZES = [[20, 50], [50, 20], [40, 40]]  # original (height, width): wide -> 1x2 tiles, tall -> 2x1, square -> 2x2
T2V = CompressionConfig("next_t2v", t2v=T2VConfig((0.5,), (0.5,), "instruction"))


def tiny_llava_next_config() -> LlavaNextConfig:
    """Tiny CLIP (28 px views) + tiny LLaMA, SDPA everywhere; AnyRes pinpoints that differ by aspect ratio."""
    config = LlavaNextConfig(
        vision_config=tiny_vision_config(image_size=TILE).to_dict(),
        text_config=tiny_text_config().to_dict(),
        image_grid_pinpoints=PINPOINTS,
        image_token_id=IMAGE,
    )
    for part in (config, config.text_config, config.vision_config):
        set_attn_implementation(part, "sdpa")
    return config


def tiny_llava_next() -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(tiny_llava_next_config()).eval()


def pixels_and_sizes() -> tuple[torch.Tensor, torch.Tensor]:
    """``[images, max tiles, 3, 28, 28]`` zero-padded past each image's tiles (the processor's layout): the base
    view plus 2, 2 and 4 tiles."""
    torch.manual_seed(1)
    tiles = [3, 3, 5]
    pixels = torch.zeros(len(tiles), max(tiles), 3, TILE, TILE)
    for index, count in enumerate(tiles):
        pixels[index, :count] = torch.randn(count, 3, TILE, TILE)
    return pixels, torch.tensor(SIZES)


def tokens_per_image(hf: LlavaNextForConditionalGeneration) -> list[int]:
    """Placeholders each image needs: the length of transformers' own packed AnyRes features (base view, unpadded
    tiles, one newline per tile-grid row), as its processor expands them."""
    pixels, sizes = pixels_and_sizes()
    with torch.no_grad():
        return [int(part.shape[0]) for part in llava_next_image_features(hf, pixels, sizes)]


def batch(hf: LlavaNextForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Left-padded: one wide image; a tall and a square image; text only."""
    wide, tall, square = tokens_per_image(hf)
    rows = [[1, *[IMAGE] * wide, 5, 6, 7], [1, *[IMAGE] * tall, 8, *[IMAGE] * square, 9, 10], [1, 11, 12, 13]]
    length = max(len(row) for row in rows)
    pixels, sizes = pixels_and_sizes()
    return {
        "input_ids": torch.tensor([[0] * (length - len(row)) + row for row in rows]),
        "attention_mask": (torch.arange(length) >= torch.tensor([[length - len(row)] for row in rows])).long(),
        "pixel_values": pixels,
        "image_sizes": sizes,
    }


def hf_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def test_anyres_token_counts_differ_by_aspect_ratio():
    # Base view 2x2 = 4 tokens. Wide 1x2 tiles -> 2x4 patches, unpadded to 2 rows of 4 (+2 newlines): 14;
    # tall 2x1 -> 4x2, 4 rows of 2 (+4 newlines): 16; square 2x2 -> 4x4 (+4 newlines): 24.
    assert tokens_per_image(tiny_llava_next()) == [14, 16, 24]


def test_uncompressed_logits_equal_transformers_model():
    hf = tiny_llava_next()
    inputs = batch(hf)
    with torch.no_grad():
        expected = hf(**inputs, position_ids=hf_positions(inputs["attention_mask"])).logits
        ours = DuetLlavaNext(hf)(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ours - expected)[real].abs().max() <= 1e-4


def test_greedy_generation_equals_transformers_generate_eager_and_fast():
    hf = tiny_llava_next()
    inputs = batch(hf)
    theirs = hf.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    theirs = theirs[:, inputs["input_ids"].shape[1] :]
    model = DuetLlavaNext(hf)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, eos_token_id=[], fast=False), theirs)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, eos_token_id=[], fast=True), theirs)


def test_the_shared_contract():
    model = DuetLlavaNext(tiny_llava_next(), T2V)
    assert isinstance(model, VisionLanguageModel)
    assert set(FORWARD_KEYWORDS) <= set(inspect.signature(model.forward).parameters)
    assert model.stage_plan.boundaries == (2,)
    assert model.projector is model.hf_model.model.multi_modal_projector


def test_keep_counts_are_relative_to_each_samples_n0():
    model = DuetLlavaNext(tiny_llava_next(), T2V)
    inputs = batch(model.hf_model)
    _, tall, square = tokens_per_image(model.hf_model)
    keep = inputs["attention_mask"][1].bool()
    row = {"input_ids": inputs["input_ids"][1:2, keep], "pixel_values": inputs["pixel_values"][1:]}
    row["image_sizes"] = inputs["image_sizes"][1:]
    with torch.no_grad():
        per_layer = model(**row).visual_tokens_per_layer
    n0 = tall + square  # newline tokens included: 40
    assert [round(count * 2) for count in per_layer] == [n0, n0, n0 // 2, n0 // 2]  # summed over the 2 images
    with torch.no_grad():
        whole = model(**inputs).attention_mask.sum(dim=1).tolist()
    # Each row keeps floor(0.5 * its own N0) visual tokens after the boundary: 14 -> 7, 40 -> 20, 0 -> 0.
    full = inputs["attention_mask"].sum(dim=1).tolist()
    assert [before - after for before, after in zip(full, whole, strict=True)] == [7, 20, 0]


def test_t2v_generation_matches_recomputation_fast_path_and_single_samples():
    model = DuetLlavaNext(tiny_llava_next(), T2V)
    inputs = batch(model.hf_model)
    options = dict(max_new_tokens=6, eos_token_id=[])
    cached = model.generate(**inputs, fast=False, **options)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **options))
    assert torch.equal(cached, model.generate(**inputs, fast=True, **options))
    for index, images in enumerate([slice(0, 1), slice(1, 3), None]):
        keep = inputs["attention_mask"][index].bool()
        single = {"input_ids": inputs["input_ids"][index : index + 1, keep]}
        if images is not None:
            single["pixel_values"] = inputs["pixel_values"][images]
            single["image_sizes"] = inputs["image_sizes"][images]
        assert torch.equal(model.generate(**single, fast=False, **options)[0], cached[index])


def test_unsupported_settings_are_refused():
    model = DuetLlavaNext(tiny_llava_next())
    with pytest.raises(ValueError, match="V2V is not yet available for this family"):
        model.set_compression(CompressionConfig("x", v2v=V2VConfig("duet", 0.5, 0.25)))
    with pytest.raises(ValueError, match="DyMU is not yet available"):
        model.set_compression(CompressionConfig("x", dymu=DyMUConfig((0.5,))))
    with pytest.raises(ValueError, match="T2V queries"):
        model.set_compression(CompressionConfig("x", t2v=T2VConfig((0.5,), (0.5,), "salient")))
    inputs = batch(model.hf_model)
    with pytest.raises(ValueError, match="image placeholders but the 2 images"):
        model(**inputs | {"pixel_values": inputs["pixel_values"][:2], "image_sizes": inputs["image_sizes"][:2]})


# ---------------------------------------------------------------- the family


def test_registry_dispatches_llava_next_checkpoints(tmp_path):
    from llava.families.llava_next import LlavaNextFamily
    from llava.families.registry import family_for, family_of_model

    tiny_llava_next_config().save_pretrained(tmp_path)
    family = family_for(tmp_path)
    assert isinstance(family, LlavaNextFamily)
    assert family_for("llava-hf/llava-v1.6-mistral-7b-hf", offline=True) is family
    model = family.random_model(tiny_llava_next_config().to_dict(), torch.float32, "cpu", "sdpa")
    assert isinstance(model, DuetLlavaNext) and family_of_model(model) is family
    with pytest.raises(NotImplementedError, match="LLaVA-NeXT training is not supported yet"):
        family.build_model(None, None, None)
