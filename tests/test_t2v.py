"""Stage B (T2V): scoring, query selection, dropping in training and batched cached generation."""

from __future__ import annotations

import pytest
import torch

from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.compression.t2v import SequenceState, build_query_mask, keep_top_visual, score_visual_tokens
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from llava.hf_adapter import causal_mask, enable_activation_checkpointing, new_dynamic_cache, set_attn_implementation
from llava.model.config import DuetLlavaConfig
from llava.model.modeling import DuetLlavaForCausalLM
from tests.conftest import tiny_text_config, tiny_vision_config

IMG = IMAGE_TOKEN_ID


def model_with(t2v: T2VConfig | None, v2v: V2VConfig | None = None, **text_overrides) -> DuetLlavaForCausalLM:
    torch.manual_seed(0)
    compression = CompressionConfig(name="test", v2v=v2v, t2v=t2v).to_dict() if (t2v or v2v) else None
    config = DuetLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(**text_overrides),
        compression=compression,
    )
    return DuetLlavaForCausalLM(config).eval()


def batch():
    """Right-padded training batch: two images in row 0, one in row 1, text only in row 2."""
    ids = torch.tensor(
        [
            [1, IMG, 5, IMG, 6, 7, 8, 9, 10],
            [1, IMG, 11, 12, 13, 14, 15, 0, 0],
            [1, 16, 17, 18, 19, 0, 0, 0, 0],
        ]
    )
    mask = (torch.arange(9) < torch.tensor([[9], [7], [5]])).long()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 7:9] = ids[0, 7:9]
    labels[1, 5:7] = ids[1, 5:7]
    labels[2, 3:5] = ids[2, 3:5]
    return ids, mask, labels, torch.randn(3, 3, 56, 56)


def test_ratio_one_without_v2v_gives_identical_logits():
    ids, mask, _, pixels = batch()
    baseline = model_with(None)
    same = model_with(T2VConfig(boundaries=(0.5,), keep_ratios=(1.0,)))
    with torch.no_grad():
        expected = baseline(ids, attention_mask=mask, pixel_values=pixels)
        got = same(ids, attention_mask=mask, pixel_values=pixels)
    real = expected.attention_mask.bool()  # padding rows hold no prediction
    assert torch.equal(got.attention_mask, expected.attention_mask)
    assert torch.equal(got.logits[real], expected.logits[real])


def test_scores_match_eager_attention_rows():
    model = model_with(None)
    decoder = model.language_model.get_decoder()
    ids, mask, _, pixels = batch()
    merged = model.embed_inputs(ids, pixels, mask)
    query = build_query_mask("instruction", merged.attention_mask, merged.visual_mask, None)
    sequence = SequenceState(
        merged.inputs_embeds, merged.attention_mask, merged.position_ids, merged.visual_mask, query
    )
    rope = decoder.rotary_emb(sequence.hidden, position_ids=sequence.position_ids)
    layer = decoder.layers[2]
    scores = score_visual_tokens(layer, sequence, rope)

    # Reference: the full eager attention matrix of that layer, averaged over heads and query rows.
    set_attn_implementation(decoder.config, "eager")
    causal = causal_mask(decoder.config, sequence.hidden, sequence.attention_mask, None, 0)
    with torch.no_grad():
        _, weights = layer.self_attn(
            hidden_states=layer.input_layernorm(sequence.hidden), position_embeddings=rope, attention_mask=causal
        )
    set_attn_implementation(decoder.config, "sdpa")
    weights = weights.mean(dim=1)  # heads
    for row in range(3):
        rows = query[row].nonzero().squeeze(1)
        expected = weights[row, rows].mean(dim=0)
        assert torch.allclose(scores[row], expected, atol=1e-5)


def test_plain_template_falls_back_to_last_prompt_token():
    # plain: <image> caption \n -> no instruction after the image; labels start right after it.
    visual = torch.tensor([[False, True, True, True, False, False]])
    mask = torch.ones(1, 6, dtype=torch.long)
    labels = torch.tensor([[IGNORE_INDEX] * 4 + [7, 8]])
    for mode in ("last", "instruction", "salient"):
        query = build_query_mask(
            mode, mask, visual, labels, token_ids=torch.tensor([[1, -1, -1, -1, 7, 8]]),
            content_table=torch.ones(10, dtype=torch.bool),
        )  # fmt: skip
        assert query.tolist() == [[False, False, False, True, False, False]], mode


def test_salient_keeps_content_words_and_last_token():
    visual = torch.tensor([[False, True, False, False, False, False]])
    mask = torch.ones(1, 6, dtype=torch.long)
    token_ids = torch.tensor([[1, -1, 3, 4, 5, 6]])
    table = torch.tensor([False, False, False, True, False, True, False])  # 3 and 5 are content words
    query = build_query_mask("salient", mask, visual, None, token_ids, table)
    assert query.tolist() == [[False, False, True, False, True, True]]
    instruction = build_query_mask("instruction", mask, visual, None)
    assert instruction.tolist() == [[False, False, True, True, True, True]]


def test_keep_top_visual_keeps_text_and_best_visual_in_order():
    visual = torch.tensor([[False, True, True, True, True, False, False]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    sequence = SequenceState(torch.zeros(1, 7, 2), mask, torch.arange(7)[None], visual, torch.zeros_like(visual))
    scores = torch.tensor([[9.0, 0.1, 0.7, 0.2, 0.9, 5.0, 9.0]])
    keep = keep_top_visual(scores, sequence, torch.tensor([2]))
    assert keep.tolist() == [[True, False, True, False, True, True, False]]


@pytest.mark.parametrize("position_mode", ["keep", "compact"])
def test_training_loss_stays_aligned_and_counts_drop(position_mode):
    ids, mask, labels, pixels = batch()
    model = model_with(T2VConfig(boundaries=(0.5, 0.75), keep_ratios=(0.5, 0.0), position_mode=position_mode))
    model.train()
    out = model(ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert torch.isfinite(out.loss)
    assert out.num_label_tokens.item() == int((labels != IGNORE_INDEX).sum())
    # 16 patches per image: layers 0-1 see 16, layers 2 sees 8, layer 3 sees 0 (per image).
    assert out.visual_tokens_per_layer == [16.0, 16.0, 8.0, 0.0]
    out.loss.backward()
    assert model.projector[0].weight.grad is not None
    assert torch.isfinite(model.projector[0].weight.grad).all()


def test_gradient_checkpointing_with_compression():
    ids, mask, labels, pixels = batch()
    model = model_with(T2VConfig(boundaries=(0.5,), keep_ratios=(0.25,)))
    model.train()
    enable_activation_checkpointing(model, use_reentrant=False)
    loss = model(ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    loss.backward()
    reference = model_with(T2VConfig(boundaries=(0.5,), keep_ratios=(0.25,))).train()
    ref_loss = reference(ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
    assert torch.allclose(loss, ref_loss, atol=1e-6)


@pytest.mark.parametrize("position_mode", ["keep", "compact"])
@pytest.mark.parametrize("query", ["last", "instruction"])
def test_batched_cached_generation_equals_uncached_recomputation(position_mode, query):
    model = model_with(
        T2VConfig(boundaries=(0.5, 0.75), keep_ratios=(0.5, 0.25), query=query, position_mode=position_mode)
    )
    # Left-padded prompts of different lengths: text only, one image, two images.
    ids = torch.tensor([[0, 0, 0, 1, 5, 6, 7], [0, 0, 1, IMG, 4, 5, 6], [1, IMG, 3, IMG, 4, 5, 6]])
    mask = (ids != 0).long()
    pixels = torch.randn(3, 3, 56, 56)
    cached = model.generate(ids, mask, pixels, max_new_tokens=8, eos_token_id=2)
    uncached = model.generate(ids, mask, pixels, max_new_tokens=8, eos_token_id=2, use_cache=False)
    assert torch.equal(cached, uncached)
    # Each row alone gives the same tokens as in the batch.
    images_of_row = [[], [0], [1, 2]]
    for row in range(3):
        keep = mask[row].bool()
        single = model.generate(
            ids[row : row + 1, keep], None, pixels[images_of_row[row]] if images_of_row[row] else None,
            max_new_tokens=8, eos_token_id=2,
        )  # fmt: skip
        assert torch.equal(single[0], cached[row, : single.shape[1]])


def test_compression_shortens_the_kv_cache_of_later_layers():
    model = model_with(T2VConfig(boundaries=(0.5, 0.75), keep_ratios=(0.5, 0.0)))
    ids = torch.tensor([[1, IMG, 4, 5, 6]])
    cache = new_dynamic_cache(model.language_model.config)
    model(ids, pixel_values=torch.randn(1, 3, 56, 56), cache=cache, use_cache=True)
    lengths = [cache.layers[i].get_seq_length() for i in range(4)]
    assert lengths == [4 + 16, 4 + 16, 4 + 8, 4]


@pytest.mark.parametrize("position_mode", ["keep", "compact"])
def test_dual_stage_generation_cached_equals_uncached(position_mode):
    """V2V (6 dominant + 2 contextual of 16 patches) then T2V, as the duet presets on the tiny tower."""
    model = model_with(
        T2VConfig(boundaries=(0.5, 0.75), keep_ratios=(0.5, 0.0), query="instruction", position_mode=position_mode),
        v2v=V2VConfig(method="duet", dominant=6, contextual=2, cluster_width=2),
    )
    ids = torch.tensor([[0, 0, 1, IMG, 4, 5, 6], [1, IMG, 3, IMG, 4, 5, 6]])
    mask = (ids != 0).long()
    pixels = torch.randn(3, 3, 56, 56)
    cached = model.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=2)
    uncached = model.generate(ids, mask, pixels, max_new_tokens=6, eos_token_id=2, use_cache=False)
    assert torch.equal(cached, uncached)
    out = model(ids, attention_mask=mask, pixel_values=pixels, left_padding=True)
    assert out.visual_tokens_per_layer == [8.0, 8.0, 4.0, 0.0]


def test_input_require_grads_leaves_the_frozen_tower_out_of_backward():
    *_, pixels = batch()
    model = model_with(None).train()
    model.requires_grad_(False)
    model.projector.requires_grad_(True)
    model.enable_input_require_grads()
    features = model.vision_tower(pixels)
    assert not features.requires_grad  # the tower is not part of the backward graph
    text = model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert text.requires_grad


def test_text_only_training_batch_still_gives_projector_gradients():
    """Every rank must run the same collectives: a text-only batch touches the vision modules too."""
    model = model_with(None).train()
    ids = torch.tensor([[1, 5, 6, 7]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 6, 7]])
    with_term = model(ids, labels=labels)
    with_term.loss.backward()
    grad = model.projector[0].weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
    model.eval()
    assert torch.equal(model(ids, labels=labels).loss, with_term.loss.detach())


def test_forward_on_left_padded_prompts_keeps_rows_right_aligned_after_drops():
    model = model_with(T2VConfig(boundaries=(0.5,), keep_ratios=(0.25,)))
    ids = torch.tensor([[0, 0, 1, IMG, 4], [1, 5, IMG, 6, 7]])
    mask = (ids != 0).long()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        inferred = model(ids, attention_mask=mask, pixel_values=pixels)
        explicit = model(ids, attention_mask=mask, pixel_values=pixels, left_padding=True)
    assert inferred.attention_mask[:, -1].all()  # the last column is every row's last real token
    assert torch.equal(inferred.logits, explicit.logits)
