"""DUET's V2V per AnyRes view on LLaVA-NeXT: the packing layout is transformers' own, each view keeps its budget
of the patches that survive unpadding, newline tokens follow their rows, a budget of every token is the
uncompressed model, batched == one by one, cached == recomputed == fast path, bf16 and training."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionConfig

from llava.compression.anyres_v2v import AnyResPlan, anyres_v2v_tokens, select_view_tokens
from llava.compression.config import CompressionConfig, DyMUConfig, T2VConfig, V2VConfig
from llava.compression.v2v import cls_attention_and_keys
from llava.hf_adapter import (
    llava_next_anyres_layout,
    llava_next_image_features,
    llava_next_view_features,
    llava_next_views_per_image,
)
from llava.model.fast_generation import FastDecoder
from llava.model.llava_next import DuetLlavaNext
from tests.test_llava_next import IMAGE, TILE, tiny_llava_next_config

PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 84]]
# (height, width): wide and tall choose 2 x 2 tiles and unpad to half the patch rows / columns (two patches of
# each tile survive); the very wide one chooses 3 x 3 tiles of which the top and bottom rows are all padding;
# the square one keeps everything.
SIZES = [[30, 50], [50, 30], [30, 84], [40, 40]]
DUET = V2VConfig("duet", 0.5, 0.25)
T2V = T2VConfig((0.5,), (0.5,), "instruction")


def tiny_next() -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    config = tiny_llava_next_config()
    config.image_grid_pinpoints = PINPOINTS
    return LlavaNextForConditionalGeneration(config).eval()


def pixels_and_sizes(hf: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``[images, max views, 3, 28, 28]``, zero past each image's views (the processor's layout)."""
    sizes = torch.tensor(SIZES)
    views = llava_next_views_per_image(hf, sizes)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.zeros(len(views), max(views), 3, TILE, TILE)
    for index, count in enumerate(views):
        pixels[index, :count] = torch.randn(count, 3, TILE, TILE, generator=generator)
    return pixels, sizes


def batch(hf: nn.Module) -> dict[str, torch.Tensor]:
    """Left-padded: a wide image; a tall and a very wide image; text only; a square image."""
    pixels, sizes = pixels_and_sizes(hf)
    with torch.no_grad():
        wide, tall, very_wide, square = (len(part) for part in llava_next_image_features(hf, pixels, sizes))
    rows = [
        [1, *[IMAGE] * wide, 5, 6, 7],
        [1, *[IMAGE] * tall, 8, *[IMAGE] * very_wide, 9, 10],
        [1, 11, 12, 13],
        [1, *[IMAGE] * square, 14],
    ]
    length = max(len(row) for row in rows)
    return {
        "input_ids": torch.tensor([[0] * (length - len(row)) + row for row in rows]),
        "attention_mask": (torch.arange(length) >= torch.tensor([[length - len(row)] for row in rows])).long(),
        "pixel_values": pixels,
        "image_sizes": sizes,
    }


def row_of(inputs: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Sample ``index`` of :func:`batch` alone, without padding."""
    images = [slice(0, 1), slice(1, 3), None, slice(3, 4)][index]
    keep = inputs["attention_mask"][index].bool()
    single = {"input_ids": inputs["input_ids"][index : index + 1, keep]}
    if images is not None:
        single |= {"pixel_values": inputs["pixel_values"][images], "image_sizes": inputs["image_sizes"][images]}
    return single


@pytest.fixture(scope="module")
def hf() -> LlavaNextForConditionalGeneration:
    return tiny_next()


# ---------------------------------------------------------------- layout and per-view features


def test_layout_and_view_features_reproduce_transformers_packing_bit_exact(hf):
    pixels, sizes = pixels_and_sizes(hf)
    views = llava_next_views_per_image(hf, sizes)
    assert views == [5, 5, 10, 5]
    with torch.no_grad():
        expected = llava_next_image_features(hf, pixels, sizes)
        flat = torch.cat([image[:count] for image, count in zip(pixels, views, strict=True)])
        theirs = hf.model.vision_tower(flat, output_hidden_states=True).hidden_states[-2][:, 1:]
        ours = llava_next_view_features(hf, pixels, sizes)
        projected = hf.model.multi_modal_projector(ours.features)
    assert torch.equal(ours.features, theirs) and ours.views == views and ours.cls_attention is None
    first = 0
    for layout, count, packed in zip(llava_next_anyres_layout(hf, sizes), views, expected, strict=True):
        rows = projected[first : first + count].reshape(-1, projected.shape[-1])
        gathered = torch.where((layout < 0).unsqueeze(-1), hf.model.image_newline, rows[layout.clamp(min=0)])
        assert torch.equal(gathered, packed)
        first += count
    # The very wide image: 3 x 3 tiles whose top and bottom tile rows are padding (indices 4..15 and 28..39).
    very_wide = set(llava_next_anyres_layout(hf, sizes)[2].tolist())
    assert not very_wide & set(range(4, 16)) and not very_wide & set(range(28, 40))


# ---------------------------------------------------------------- keep counts and the newline rule


@pytest.mark.parametrize(
    "v2v",
    [DUET, V2VConfig("visionzip", 0.5, 0.25), V2VConfig("random", 0.25, 0.0), V2VConfig("duet", 0.25, 0.0)],
    ids=["duet", "visionzip", "random", "duet-dominant-only"],
)
def test_each_view_keeps_its_budget_and_newlines_follow_their_rows(hf, v2v):
    pixels, sizes = pixels_and_sizes(hf)
    torch.manual_seed(2)
    with torch.no_grad():
        result = anyres_v2v_tokens(hf, pixels, sizes, v2v)
    patches = 4
    keep = result.keep.tolist()
    dropped_newlines = kept_newlines = 0
    first_token = first_view = 0
    for layout, count in zip(llava_next_anyres_layout(hf, sizes), llava_next_views_per_image(hf, sizes), strict=True):
        flags = keep[first_token : first_token + len(layout)]
        indices = layout.tolist()
        for view in range(count):
            surviving = sum(1 for index in indices if index >= 0 and index // patches == view)
            dominant, contextual = v2v.budget(surviving) if surviving else (0, 0)
            kept = sum(
                flag for index, flag in zip(indices, flags, strict=True) if index >= 0 and index // patches == view
            )
            assert kept == dominant + contextual, (first_view + view, surviving)
        start = patches  # the tile grid's rows follow the base view; each ends in a newline (-1)
        for position, index in enumerate(indices):
            if index < 0 and position >= patches:
                row = flags[start:position]
                assert flags[position] == any(row)
                dropped_newlines += not flags[position]
                kept_newlines += flags[position]
                start = position + 1
        first_token += len(layout)
        first_view += count
    assert first_token == len(keep) and kept_newlines > 0
    if v2v.contextual == 0:  # one token per full tile: some rows of a tile lose every token
        assert dropped_newlines > 0
    plan = AnyResPlan.build(hf, sizes, v2v)
    assert sum(plan.tokens_per_view()) == sum(keep) - kept_newlines


@pytest.mark.parametrize("method", ["duet", "visionzip"])
def test_batched_selection_equals_a_per_view_reference(hf, method):
    """Every view against a plain loop over its surviving patches: stable CLS-score ranking, the method's anchors,
    each member merged into its most key-similar anchor (anchor + mean of its members), in place."""
    v2v = V2VConfig(method, 0.25, 0.5, cluster_width=2)
    pixels, sizes = pixels_and_sizes(hf)
    with torch.no_grad():
        views = llava_next_view_features(hf, pixels, sizes, cls_attention_and_keys)
        plan = AnyResPlan.build(hf, sizes, v2v)
        keep, values = select_view_tokens(views.features, views.cls_attention, views.keys, plan, method)
    assert plan.anchor_valid.any(dim=1).sum() > 0 and plan.member_valid.any()
    for view in range(len(plan.surviving)):
        surviving = plan.surviving[view].nonzero().flatten().tolist()
        scores = views.cls_attention[view].tolist()
        ranked = sorted(surviving, key=lambda index: (-scores[index], index))
        dominant, contextual = v2v.budget(len(surviving)) if surviving else (0, 0)
        rest = ranked[dominant:]
        pool = rest[: min(v2v.cluster_width * contextual, len(rest))] if method == "duet" else sorted(rest)
        step = max(1, len(pool) // contextual) if contextual else 1
        anchors = pool[::step][:contextual] if contextual else []
        members = [index for index in pool if index not in anchors]
        expected = views.features[view].clone()
        if anchors:
            unit = torch.nn.functional.normalize(views.keys[view].float(), dim=-1)
            joins = (unit[members] @ unit[anchors].T).argmax(dim=1).tolist() if members else []
            for slot, anchor in enumerate(anchors):
                group = [member for member, joined in zip(members, joins, strict=True) if joined == slot]
                if group:
                    expected[anchor] = views.features[view, anchor] + views.features[view, group].mean(dim=0)
        assert sorted(keep[view].nonzero().flatten().tolist()) == sorted(ranked[:dominant] + anchors)
        torch.testing.assert_close(values[view], expected, atol=1e-6, rtol=1e-6)


def test_a_budget_of_every_token_is_the_uncompressed_model(hf):
    inputs = batch(hf)
    with torch.no_grad():
        expected = DuetLlavaNext(hf)(**inputs).logits
        for method in ("duet", "visionzip"):
            model = DuetLlavaNext(hf, CompressionConfig("all", v2v=V2VConfig(method, 0.5, 0.5)))
            output = model(**inputs)
            assert output.logits.shape == expected.shape
            real = inputs["attention_mask"].bool()
            assert (output.logits - expected)[real].abs().max() <= 1e-5, method


# ---------------------------------------------------------------- batching, caching, generation


def test_batched_equals_one_by_one_with_v2v_and_t2v(hf):
    model = DuetLlavaNext(hf, CompressionConfig("v2v_t2v", v2v=DUET, t2v=T2V))
    inputs = batch(hf)
    with torch.no_grad():
        batched = model(**inputs)
        assert batched.compression_time_s > 0
        for index in range(4):
            alone = model(**row_of(inputs, index))
            torch.testing.assert_close(alone.logits[0, -1], batched.logits[index, -1], atol=1e-5, rtol=1e-5)
            visual = int((row_of(inputs, index)["input_ids"] == IMAGE).sum())
            assert alone.attention_mask.shape[1] < row_of(inputs, index)["input_ids"].shape[1] or not visual


def test_generation_cached_equals_recomputed_fast_path_and_one_by_one(hf):
    model = DuetLlavaNext(hf, CompressionConfig("v2v_t2v", v2v=DUET, t2v=T2V))
    inputs = batch(hf)
    options = dict(max_new_tokens=5, eos_token_id=[])
    cached = model.generate(**inputs, fast=False, **options)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **options))
    assert torch.equal(cached, model.generate(**inputs, fast=True, **options))
    decoder = FastDecoder(model, warmup_steps=1, bucket_batch=True)  # reused, warm-up undone, padded rows
    for _ in range(2):
        assert torch.equal(cached, model.generate(**inputs, fast=True, fast_decoder=decoder, **options))
    assert len(decoder.runners()) == 1
    for index in range(4):
        assert torch.equal(model.generate(**row_of(inputs, index), fast=False, **options)[0], cached[index])


def test_bf16_runs_and_an_every_token_budget_equals_uncompressed_bf16():
    hf = tiny_next().to(torch.bfloat16)
    inputs = batch(hf)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        expected = DuetLlavaNext(hf)(**inputs).logits
        every = DuetLlavaNext(hf, CompressionConfig("all", v2v=V2VConfig("duet", 0.5, 0.5)))(**inputs).logits
        compressed = DuetLlavaNext(hf, CompressionConfig("v2v_t2v", v2v=DUET, t2v=T2V))(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert every.dtype == compressed.dtype == torch.bfloat16
    assert torch.equal(every[real], expected[real])
    assert torch.isfinite(compressed.float()).all()


# ---------------------------------------------------------------- training


def test_backward_reaches_projector_newline_and_tower_with_v2v():
    model = DuetLlavaNext(tiny_next(), CompressionConfig("v2v_t2v", v2v=DUET, t2v=T2V)).train()
    inputs = batch(model.hf_model)
    unsupervised = (inputs["attention_mask"] == 0) | (inputs["input_ids"] == IMAGE) | (inputs["input_ids"] == 1)
    labels = inputs["input_ids"].masked_fill(unsupervised, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    with torch.no_grad():  # padding-free rows and right padding (the collator's) give the same loss
        torch.testing.assert_close(model(**inputs, labels=labels, pack_sequences=True).loss, loss.detach())
        lengths = inputs["attention_mask"].sum(dim=1)
        right = {key: value.clone() for key, value in inputs.items()}
        for index, length in enumerate(lengths.tolist()):
            for key, tensor in (("input_ids", inputs["input_ids"]), ("attention_mask", inputs["attention_mask"])):
                right[key][index] = tensor[index].roll(length - tensor.shape[1])
        right_labels = right["input_ids"].masked_fill(
            (right["attention_mask"] == 0) | (right["input_ids"] == IMAGE), -100
        )
        right_labels[:, 0] = -100  # BOS is the first token of every right-padded row
        torch.testing.assert_close(model(**right, labels=right_labels, left_padding=False).loss, loss.detach())
    assert all(float(param.grad.abs().sum()) > 0 for param in model.projector.parameters())
    assert float(model.hf_model.model.image_newline.grad.abs().sum()) > 0
    tower = model.hf_model.model.vision_tower
    assert any(param.grad is not None and float(param.grad.abs().sum()) > 0 for param in tower.parameters())
    # A text-only training batch still runs the tower once, through V2V's path (ZeRO-safe): zero gradients.
    model.zero_grad(set_to_none=True)
    input_ids = torch.tensor([[1, 11, 12, 13, 14]])
    model(input_ids, labels=input_ids.clone()).loss.backward()
    assert all(param.grad is not None and float(param.grad.abs().sum()) == 0 for param in model.projector.parameters())


# ---------------------------------------------------------------- refusals


def test_v2v_settings_that_cannot_apply_are_refused(hf):
    model = DuetLlavaNext(hf)
    with pytest.raises(ValueError, match="must be fractions of each view's tokens"):
        model.set_compression(CompressionConfig("x", v2v=V2VConfig("duet", 64, 16)))
    with pytest.raises(ValueError, match="DyMU is not yet available"):
        model.set_compression(CompressionConfig("x", dymu=DyMUConfig((0.5,))))
    onevision = nn.Module()
    onevision.config = LlavaOnevisionConfig()
    with pytest.raises(ValueError, match="must be fractions of each view's tokens"):  # V2V per view group there
        DuetLlavaNext(onevision, CompressionConfig("x", v2v=V2VConfig("duet", 64, 16)))
    model.set_compression(CompressionConfig("x", v2v=DUET, t2v=T2V))
    assert model.v2v == DUET and model.stage_plan.boundaries == (2,)
