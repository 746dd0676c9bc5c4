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


def test_uncompressed_bf16_logits_equal_transformers_model_in_bf16():
    """GPUs run bf16: loaded the way users load it (the whole HF model in bf16), the same logits as transformers'."""
    hf = tiny_llava_next().to(torch.bfloat16)
    inputs = batch(hf)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        expected = hf(**inputs, position_ids=hf_positions(inputs["attention_mask"])).logits
        ours = DuetLlavaNext(hf)(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert ours.dtype == torch.bfloat16
    assert (ours - expected)[real].float().abs().max() <= 1e-2 * expected[real].float().abs().max()


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
    with pytest.raises(ValueError, match="V2V budgets must be fractions"):  # V2V per view: tests/test_llava_next_v2v.py
        model.set_compression(CompressionConfig("x", v2v=V2VConfig("duet", 64, 16)))
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


# ---------------------------------------------------------------- a local LLaVA-NeXT checkpoint end to end


def test_checkpoint_loads_through_the_pipeline_and_answers_in_batches(llava_next_checkpoint):
    from llava.families.llava_next import LlavaNextPipeline
    from llava.inference import load_pipeline

    pipeline = load_pipeline(llava_next_checkpoint, device="cpu")
    assert isinstance(pipeline, LlavaNextPipeline)
    requests = [
        {"image": str(llava_next_checkpoint / "image_0.png"), "prompt": "what colour is the shape"},
        {
            "image": [str(llava_next_checkpoint / "image_1.png"), str(llava_next_checkpoint / "image_2.png")],
            "prompt": "hello",
        },
        {"image": None, "prompt": "hello there"},
    ]
    inputs = pipeline.prepare(requests)
    assert inputs["image_sizes"].tolist() == [[40, 90], [90, 40], [60, 60]]
    assert inputs["attention_mask"][:, -1].all()  # left-padded
    # The processor's placeholder counts are the lengths of the model's packed AnyRes features.
    with torch.no_grad():
        features = llava_next_image_features(pipeline.model.hf_model, inputs["pixel_values"], inputs["image_sizes"])
    wide, tall, square = (int(part.shape[0]) for part in features)
    image_token = pipeline.model.config.image_token_id
    assert (inputs["input_ids"] == image_token).sum(dim=1).tolist() == [wide, tall + square, 0]
    assert len({wide, tall, square}) == 3
    one_by_one = pipeline.generate(requests, max_new_tokens=5, batch_size=1)
    assert pipeline.generate(requests, max_new_tokens=5, batch_size=3) == one_by_one
    compressed = LlavaNextPipeline.from_pretrained(llava_next_checkpoint, device="cpu", compression=T2V)
    assert compressed.model.stage_plan.boundaries == (2,)
    assert compressed.generate(requests, max_new_tokens=5, batch_size=3) == compressed.generate(
        requests, max_new_tokens=5, batch_size=1
    )
    # The random model's answers may decode to little text: compare the tokens too (no EOS stops them).
    for loaded in (pipeline, compressed):
        batched = loaded.model.generate(**inputs, max_new_tokens=5, eos_token_id=[])
        for index, request in enumerate(requests):
            alone = loaded.model.generate(**loaded.prepare([request]), max_new_tokens=5, eos_token_id=[])
            assert torch.equal(alone[0], batched[index])
    with pytest.raises(ValueError, match="images only"):
        pipeline.prepare([{"video": "clip.mp4", "prompt": "what happens"}])


def test_packed_training_loss_and_gradients_equal_the_padded_batch():
    """Padding-free rows (``pack_sequences``) through the shared stage loop: the same loss and gradients, with T2V."""
    model = DuetLlavaNext(tiny_llava_next(), T2V).train()
    inputs = batch(model.hf_model)
    # Text supervised as in training: not the images, not the padding, not BOS (the collator never labels it).
    unsupervised = (inputs["attention_mask"] == 0) | (inputs["input_ids"] == IMAGE) | (inputs["input_ids"] == 1)
    labels = inputs["input_ids"].masked_fill(unsupervised, -100)
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        output = model(**inputs, labels=labels, pack_sequences=packed)
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((output.loss.detach(), grads))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert padded_grads and packed_grads.keys() == padded_grads.keys()
    for name, gradient in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], gradient, atol=1e-5, rtol=1e-5, msg=name)


def test_training_batch_without_images_still_runs_the_vision_tower_once():
    """ZeRO-safe: a text-only training batch runs one blank image through the tower and projector, so their
    parameters get (zero) gradients like every other rank's; the loss equals the text-only forward's."""
    model = DuetLlavaNext(tiny_llava_next()).train()
    input_ids = torch.tensor([[1, 11, 12, 13, 14]])
    labels = input_ids.clone()
    loss = model(input_ids, labels=labels).loss
    loss.backward()
    projector_grads = [param.grad for param in model.projector.parameters()]
    assert all(grad is not None and float(grad.abs().sum()) == 0.0 for grad in projector_grads)
    tower = model.hf_model.model.vision_tower
    assert any(param.grad is not None for param in tower.parameters())
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids, labels=labels).loss, loss.detach())
