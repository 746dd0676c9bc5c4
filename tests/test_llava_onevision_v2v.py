"""DUET's V2V on LLaVA-OneVision's packed AnyRes tokens (:mod:`llava.compression.onevision_v2v`): scores and keys
land where transformers packs the features (downsizing included), each view group keeps its budget, newline
tokens follow their rows, a budget of every token is the uncompressed model, batched == one by one (left padding,
a text-only row, a multi-image row, videos), cached == recomputed == fast path with V2V + T2V, and training."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.compression.onevision_v2v import (
    OneVisionPlan,
    onevision_v2v_counts,
    onevision_v2v_tokens,
    received_attention_and_keys,
    select_group_tokens,
)
from llava.hf_adapter import (
    llava_onevision_image_features,
    llava_onevision_newline_layout,
    llava_onevision_pack,
    llava_onevision_view_features,
    llava_onevision_views_per_image,
    set_attn_implementation,
)
from llava.model.fast_generation import FastDecoder
from llava.model.llava_next import DuetLlavaNext
from tests.test_llava_onevision import IMAGE, ROW_IMAGES, batch, single, tiny_onevision, visual_inputs

PATCHES = 9  # 3 x 3 patches per 42 px view
DUET = V2VConfig("duet", 0.5, 0.25)
T2V = T2VConfig((0.5,), (0.5,), "instruction")
EVERY_TOKEN = [  # k1 + k2 = every token of any group under 1000 tokens (fractions floored with a 1e-9 margin)
    V2VConfig("duet", 1e-12, 1 - 2e-12),  # one dominant token, every other one an anchor without members
    V2VConfig("visionzip", 1e-12, 1 - 2e-12),
    V2VConfig("random", 1 - 1e-12, 0.0),
]


@pytest.fixture(scope="module")
def hf() -> LlavaOnevisionForConditionalGeneration:
    return tiny_onevision()


def groups_of(hf: LlavaOnevisionForConditionalGeneration) -> list[tuple[list[bool], int]]:
    """Per image of :func:`visual_inputs`: its newline mask and its views (the fixture's sizes)."""
    visual = visual_inputs(hf)
    sizes, counts = visual["image_sizes"], visual["batch_num_images"]
    masks = llava_onevision_newline_layout(hf, sizes, counts)
    views = llava_onevision_views_per_image(hf, sizes, counts)
    return [(mask.tolist(), count) for mask, count in zip(masks, views, strict=True)]


# ---------------------------------------------------------------- layout, scores


def test_scores_keys_and_features_are_packed_where_transformers_packs_the_features(hf):
    visual = visual_inputs(hf)
    pixels, sizes, counts = visual["pixel_values"], visual["image_sizes"], visual["batch_num_images"]
    with torch.no_grad():
        expected = llava_onevision_image_features(hf, pixels, sizes, counts)
        views = llava_onevision_view_features(hf, pixels, sizes, counts, received_attention_and_keys)
        flat = torch.cat([image[:count] for image, count in zip(pixels, views.views, strict=True)])
        theirs = hf.model.vision_tower(flat, output_hidden_states=True).hidden_states[-1]
        projected = hf.model.multi_modal_projector(views.features)
    assert views.views == [3, 1, 1, 17, 17] and torch.equal(views.features, theirs)
    # A positional-index channel beside the projected features, the scores and the keys: one packing.
    index = torch.arange(float(projected.shape[0] * PATCHES)).view(-1, PATCHES, 1)
    stacked = torch.cat([projected, views.scores.unsqueeze(-1), views.keys, index], dim=-1)
    packed = llava_onevision_pack(hf, stacked.split(views.views), sizes)
    alone = llava_onevision_pack(hf, projected.split(views.views), sizes)
    width = projected.shape[-1]
    downsized = 0
    for image, (part, features, newline, want) in enumerate(
        zip(packed, alone, llava_onevision_newline_layout(hf, sizes, counts), expected, strict=True)
    ):
        assert torch.equal(part[:, :width], features)  # channels pack alike: every token has its score and key
        # transformers' own tokens are these with ``image_newline`` where the newline layout says.
        rebuilt = torch.empty(len(newline), width)
        rebuilt[newline] = hf.model.image_newline.detach()
        rebuilt[~newline] = features
        assert torch.equal(rebuilt, want)
        positions = part[:, -1]
        if torch.equal(positions, positions.round()):  # not downsized: each token is one patch, in place
            assert torch.equal(features, projected.reshape(-1, width)[positions.long()]), image
            assert torch.equal(part[:, width], views.scores.reshape(-1)[positions.long()])
        else:  # the large image alone: 4 x 4 tiles (12 x 12 patches) downsized to 9 x 9 tokens
            downsized += 1
            assert image == 3 and len(features) == PATCHES + 81
            assert torch.equal(positions[:PATCHES], index[sum(views.views[:3])].flatten())  # the base view
    assert downsized == 1


def test_scores_are_the_attention_each_patch_receives_in_its_view(monkeypatch):
    """Against transformers' own eager attention maps of the feature layer (summed over queries, mean over heads),
    with the query chunk forced to 2 rows."""
    hf = tiny_onevision()
    set_attn_implementation(hf.config.vision_config, "eager")
    visual = visual_inputs(hf)
    monkeypatch.setattr("llava.compression.onevision_v2v.SCORE_CHUNK_ELEMENTS", 2 * 39 * 4 * PATCHES)
    with torch.no_grad():
        views = llava_onevision_view_features(
            hf, visual["pixel_values"], visual["image_sizes"], visual["batch_num_images"], received_attention_and_keys
        )
        flat = torch.cat([image[:count] for image, count in zip(visual["pixel_values"], views.views, strict=True)])
        attentions = hf.model.vision_tower(flat, output_attentions=True).attentions[-1]  # [views, heads, P, P]
    torch.testing.assert_close(views.scores, attentions.sum(dim=2).mean(dim=1), atol=1e-5, rtol=1e-5)
    assert views.keys.shape == (39, PATCHES, 8)


# ---------------------------------------------------------------- keep counts and the newline rule


@pytest.mark.parametrize(
    "v2v",
    [DUET, V2VConfig("visionzip", 0.5, 0.25), V2VConfig("random", 0.25, 0.0), V2VConfig("duet", 0.1, 0.0)],
    ids=["duet", "visionzip", "random", "duet-dominant-only"],
)
def test_each_view_group_keeps_its_budget_and_newlines_follow_their_rows(hf, v2v):
    visual = visual_inputs(hf)
    torch.manual_seed(2)
    with torch.no_grad():
        result = onevision_v2v_tokens(
            hf, visual["pixel_values"], visual["image_sizes"], v2v, visual["batch_num_images"]
        )
    keep = result.keep.tolist()
    first = kept_newlines = dropped_newlines = 0
    group_sizes, image_tokens = [], []
    for newline, views in groups_of(hf):
        flags = keep[first : first + len(newline)]
        tokens = [flag for flag, is_newline in zip(flags, newline, strict=True) if not is_newline]
        groups = [tokens[:PATCHES], tokens[PATCHES:]] if views > 1 else [tokens]  # base view, packed tile grid
        image_tokens.append(sum(tokens))
        for group in groups:
            group_sizes.append(len(group))
            assert sum(group) == sum(v2v.budget(len(group))), (first, len(group))
        # Every newline closes the row of tokens since the previous one (the tile grid's rows; a lone base view).
        start = PATCHES if views > 1 else 0
        for position, is_newline in enumerate(newline):
            if is_newline:
                assert flags[position] == any(flags[start:position])
                kept_newlines += flags[position]
                dropped_newlines += not flags[position]
                start = position + 1
        first += len(newline)
    assert first == len(keep) == result.tokens.shape[0]
    assert group_sizes == [9, 18, 9, 9, 9, 81, 9, 96]  # the large image's grid downsized from 144 to 81 tokens
    assert kept_newlines > 0
    if v2v.dominant == 0.1:  # 8 tokens of 81 / 9 of 96: most rows lose every token and their newline
        assert dropped_newlines > 0
    plan = OneVisionPlan.build(hf, visual["image_sizes"], visual["batch_num_images"], v2v)
    assert sum(plan.groups.tokens_per_view()) == sum(keep) - kept_newlines
    counts = onevision_v2v_counts(hf, visual["image_sizes"], v2v, visual["batch_num_images"])
    assert [newlines for _, newlines in counts] == [3, 1, 1, 9, 12]
    assert [tokens for tokens, _ in counts] == image_tokens


@pytest.mark.parametrize("method", ["duet", "visionzip"])
def test_selection_equals_a_per_group_reference(hf, method):
    """Each view group against a plain loop over its packed tokens: stable score ranking, the method's anchors,
    each member merged into its most key-similar anchor (anchor + mean of its members), in place."""
    v2v = V2VConfig(method, 0.25, 0.5, cluster_width=2)
    visual = visual_inputs(hf)
    sizes, counts = visual["image_sizes"], visual["batch_num_images"]
    with torch.no_grad():
        views = llava_onevision_view_features(hf, visual["pixel_values"], sizes, counts, received_attention_and_keys)
        maps = torch.cat([hf.model.multi_modal_projector(views.features), views.scores[..., None], views.keys], -1)
        packed = torch.cat(llava_onevision_pack(hf, maps.split(views.views), sizes))
        plan = OneVisionPlan.build(hf, sizes, counts, v2v)
        features, scores, keys = packed[:, :64], packed[:, 64], packed[:, 65:]
        keep, values = select_group_tokens(features, scores, keys, plan, method)
    assert plan.groups.member_valid.any() and keep.shape == scores.shape
    bounds = [*plan.starts.tolist(), len(scores)]
    for start, end in pairwise(bounds):
        size = end - start
        ranked = sorted(range(start, end), key=lambda index: (-float(scores[index]), index))
        dominant, contextual = v2v.budget(size)
        rest = ranked[dominant:]
        pool = rest[: min(v2v.cluster_width * contextual, len(rest))] if method == "duet" else sorted(rest)
        step = max(1, len(pool) // contextual) if contextual else 1
        anchors = pool[::step][:contextual] if contextual else []
        members = [index for index in pool if index not in anchors]
        expected = features[start:end].clone()
        if anchors and members:
            unit = torch.nn.functional.normalize(keys.float(), dim=-1)
            joins = (unit[members] @ unit[anchors].T).argmax(dim=1).tolist()
            for slot, anchor in enumerate(anchors):
                joined = [member for member, chosen in zip(members, joins, strict=True) if chosen == slot]
                if joined:
                    expected[anchor - start] = features[anchor] + features[joined].mean(dim=0)
        assert sorted((start + keep[start:end].nonzero().flatten()).tolist()) == sorted(ranked[:dominant] + anchors)
        torch.testing.assert_close(values[start:end], expected, atol=1e-6, rtol=1e-6)


def test_a_budget_of_every_token_is_the_uncompressed_model(hf):
    inputs = batch(hf)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = DuetLlavaNext(hf)(**inputs).logits
        for v2v in EVERY_TOKEN:
            logits = DuetLlavaNext(hf, CompressionConfig("all", v2v=v2v))(**inputs).logits
            assert logits.shape == expected.shape and torch.equal(logits[real], expected[real]), v2v.method


def test_bf16_every_token_budget_equals_uncompressed_and_the_named_presets_run():
    hf = tiny_onevision().to(torch.bfloat16)
    inputs = batch(hf)
    for key in ("pixel_values", "pixel_values_videos"):
        inputs[key] = inputs[key].to(torch.bfloat16)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = DuetLlavaNext(hf)(**inputs).logits
        every = DuetLlavaNext(hf, CompressionConfig("all", v2v=EVERY_TOKEN[0]))(**inputs).logits
        assert every.dtype == torch.bfloat16 and torch.equal(every[real], expected[real])
        for preset in ("anyres_duet_third", "anyres_duet_ninth"):
            output = DuetLlavaNext(hf, preset)(**inputs)
            assert torch.isfinite(output.logits.float()).all(), preset
            assert (output.attention_mask.sum(dim=1) < inputs["attention_mask"].sum(dim=1))[[0, 1, 3, 4]].all()


# ---------------------------------------------------------------- batching, caching, generation


def test_batched_equals_one_by_one_with_v2v_and_t2v(hf):
    inputs = batch(hf)
    v2v_only = DuetLlavaNext(hf, CompressionConfig("v2v", v2v=DUET))
    model = DuetLlavaNext(hf, CompressionConfig("v2v_t2v", v2v=DUET, t2v=T2V))
    with torch.no_grad():
        kept = onevision_v2v_tokens(
            hf, inputs["pixel_values"], inputs["image_sizes"], DUET, inputs["batch_num_images"]
        ).keep
        lengths = v2v_only(**inputs).attention_mask.sum(dim=1)
        batched = model(**inputs)
        assert batched.compression_time_s > 0
        for index in range(len(ROW_IMAGES)):
            alone = model(**single(inputs, index))
            torch.testing.assert_close(alone.logits[0, -1], batched.logits[index, -1], atol=1e-5, rtol=1e-5)
    # V2V drops image placeholders only (videos and text stay): the rows shrink by their dropped image tokens.
    dropped = (~kept).long()
    per_row, first = [], 0
    for row in inputs["input_ids"]:
        images = int((row == IMAGE).sum())
        per_row.append(int(dropped[first : first + images].sum()))
        first += images
    assert (inputs["attention_mask"].sum(dim=1) - lengths).tolist() == per_row and per_row[2] == 0
    assert all(per_row[index] > 0 for index in (0, 1, 3, 4))


def test_generation_cached_equals_recomputed_fast_path_and_one_by_one(hf):
    model = DuetLlavaNext(hf, CompressionConfig("v2v_t2v", v2v=DUET, t2v=T2V))
    inputs = batch(hf)
    options = dict(max_new_tokens=4, eos_token_id=[])
    cached = model.generate(**inputs, fast=False, **options)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **options))
    assert torch.equal(cached, model.generate(**inputs, fast=True, **options))
    decoder = FastDecoder(model, warmup_steps=1, bucket_batch=True)
    assert torch.equal(cached, model.generate(**inputs, fast=True, fast_decoder=decoder, **options))
    for index in range(len(ROW_IMAGES)):
        assert torch.equal(model.generate(**single(inputs, index), fast=False, **options)[0], cached[index])


# ---------------------------------------------------------------- training, refusals


def test_backward_reaches_projector_newline_and_tower_with_v2v():
    model = DuetLlavaNext(tiny_onevision(), CompressionConfig("v2v_t2v", v2v=DUET, t2v=T2V)).train()
    inputs = batch(model.hf_model)
    unsupervised = (inputs["attention_mask"] == 0) | (inputs["input_ids"] >= IMAGE) | (inputs["input_ids"] == 1)
    labels = inputs["input_ids"].masked_fill(unsupervised, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():  # padding-free decoder rows give the same loss
        torch.testing.assert_close(model(**inputs, labels=labels, pack_sequences=True).loss, loss.detach())
    assert all(float(param.grad.abs().sum()) > 0 for param in model.projector.parameters())
    assert float(model.hf_model.model.image_newline.grad.abs().sum()) > 0
    tower = model.hf_model.model.vision_tower
    assert any(param.grad is not None and float(param.grad.abs().sum()) > 0 for param in tower.parameters())
    # A text-only training batch still runs the tower once, through V2V's path (ZeRO-safe): zero gradients.
    model.zero_grad(set_to_none=True)
    input_ids = torch.tensor([[1, 11, 12, 13, 14]])
    model(input_ids, labels=input_ids.clone()).loss.backward()
    assert all(param.grad is not None and float(param.grad.abs().sum()) == 0 for param in model.projector.parameters())


def test_v2v_settings_that_cannot_apply_are_refused(hf):
    with pytest.raises(ValueError, match="must be fractions of each view's tokens"):
        DuetLlavaNext(hf, CompressionConfig("x", v2v=V2VConfig("duet", 64, 16)))
    other = tiny_onevision()
    other.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="'full' vision_feature_select_strategy"):
        DuetLlavaNext(other, CompressionConfig("x", v2v=DUET))
    model = DuetLlavaNext(hf, CompressionConfig("x", v2v=DUET, t2v=T2V))
    assert model.v2v == DUET and model.stage_plan.boundaries == (2,)
