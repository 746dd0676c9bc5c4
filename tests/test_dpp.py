"""CDPruner (conditional DPP selection at the LLM input): greedy MAP inference, relevance, and the tiny model
end to end (eager == fast == recomputation, batched == one by one, kept counts, training gradients)."""

from __future__ import annotations

import itertools

import pytest
import torch

from llava.compression.accounting import average_visual_tokens, stage_summary
from llava.compression.config import CompressionConfig, CompressionConfigError, T2VConfig, load_compression
from llava.compression.dpp import conditional_dpp_kernel, greedy_dpp_map, normalise_relevance
from llava.model.config import DuetLlavaConfig
from llava.model.decoder import StagePlan
from llava.model.fast_generation import FastDecoder
from llava.model.modeling import DuetLlavaForCausalLM
from tests.conftest import tiny_text_config, tiny_vision_config
from tests.test_fast_generation import host_reads, mixed_batch
from tests.test_t2v import batch

# The hand-worked kernel (symmetric positive definite, det 9).
HAND_KERNEL = torch.tensor(
    [
        [4.0, 2.0, 2.0, 0.0, 1.0],
        [2.0, 2.0, 1.0, 0.0, 0.0],
        [2.0, 1.0, 3.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 3.0, 0.0],
        [1.0, 0.0, 0.0, 0.0, 1.0],
    ],
    dtype=torch.float64,
)


def test_greedy_map_of_a_hand_worked_kernel():
    # d^2 starts as the diagonal [4, 2, 3, 3, 1]; each step picks argmax d^2 (ties: lowest index), then
    # e_i = (L_ji - <c_j, c_i>) / d_j and d_i^2 -= e_i^2.
    # 1. pick 0 (4), d = 2: e = L_0 / 2 = [2, 1, 1, 0, 1/2]; d^2 = [0, 1, 2, 3, 3/4].
    # 2. pick 3 (3; it beats 2 with 2), d = sqrt3: c_3 = [0], so e = L_3 / sqrt3 = [0, 0, 0, sqrt3, 0];
    #    d^2 = [0, 1, 2, 0, 3/4].
    # 3. pick 2 (2), d = sqrt2: e = (L_2 - 1 * [2, 1, 1, 0, 1/2] - 0) / sqrt2 = [0, 0, 2, 0, -1/2] / sqrt2;
    #    d^2 = [0, 1, 0, 0, 3/4 - 1/8 = 5/8].
    # 4. pick 1 (1), d = 1: e = L_1 - 1 * [2, 1, 1, 0, 1/2] - 0 - 0 = [0, 1, 0, 0, -1/2]; d^2 = [0, 0, 0, 0, 3/8].
    # 5. pick 4 (3/8). Gains 4, 3, 2, 1, 3/8: their running products are the determinants of the picked sets.
    order = greedy_dpp_map(HAND_KERNEL.unsqueeze(0), 5, torch.ones(1, 5, dtype=torch.bool))
    assert order.tolist() == [[0, 3, 2, 1, 4]]
    dets = [float(torch.linalg.det(HAND_KERNEL[order[0, :t]][:, order[0, :t]])) for t in range(1, 6)]
    assert dets == pytest.approx([4.0, 12.0, 24.0, 24.0, 9.0])
    assert greedy_dpp_map(HAND_KERNEL.unsqueeze(0), 2, torch.ones(1, 5, dtype=torch.bool)).tolist() == [[0, 3]]


def test_greedy_equals_the_brute_force_best_subset_when_copies_are_redundant():
    """Blocks of identical tokens (S = 1 within a block, 0 across): a set with two copies has det 0, so the best
    set takes the most relevant token of the most relevant blocks, and greedy is optimal here."""
    block_of = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    similarity = (block_of.unsqueeze(0) == block_of.unsqueeze(1)).double()
    relevance = torch.tensor([0.3, 0.9, 0.5, 0.8, 0.2, 0.6, 0.1], dtype=torch.float64)
    kernel = relevance.unsqueeze(1) * similarity * relevance.unsqueeze(0)
    for k in range(1, 5):
        picked = greedy_dpp_map(kernel.unsqueeze(0), k, torch.ones(1, 7, dtype=torch.bool))[0].tolist()
        best = max(
            itertools.combinations(range(7), k), key=lambda s: float(torch.linalg.det(kernel[list(s)][:, list(s)]))
        )
        assert sorted(picked) == sorted(best)
    assert greedy_dpp_map(kernel.unsqueeze(0), 4, torch.ones(1, 7, dtype=torch.bool)).tolist() == [[1, 3, 5, 6]]


def test_batched_greedy_equals_one_row_at_a_time():
    torch.manual_seed(0)
    features, relevance = torch.randn(3, 10, 6), torch.rand(3, 10)
    valid = torch.zeros(3, 10, dtype=torch.bool)
    valid[0, :7] = True
    valid[1, [1, 4, 6, 9]] = True
    valid[2] = True
    kernel = conditional_dpp_kernel(features, relevance)
    batched = greedy_dpp_map(kernel, 8, valid, fallback=relevance)
    for row in range(3):
        items = valid[row].nonzero().squeeze(1)
        alone = greedy_dpp_map(
            conditional_dpp_kernel(features[row : row + 1, items], relevance[row : row + 1, items]),
            8, torch.ones(1, len(items), dtype=torch.bool), fallback=relevance[row : row + 1, items],
        )[0]  # fmt: skip
        expected = [int(items[i]) if i >= 0 else -1 for i in alone.tolist()]
        assert batched[row].tolist() == expected
    assert batched[1, 4:].tolist() == [-1] * 4  # 4 valid items, 8 steps: padded with -1
    # Rank 6 (6 features): the last 2 picks of row 2 follow the fallback (relevance), not rounding noise.
    rest = [i for i in range(10) if i not in batched[2, :6].tolist()]
    assert batched[2, 6:].tolist() == sorted(rest, key=lambda i: -float(relevance[2, i]))[:2]


def test_ties_go_to_the_lowest_index_and_repeat_exactly():
    kernel = torch.eye(6).expand(2, 6, 6)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 0] = False
    picks = greedy_dpp_map(kernel, 4, valid)
    assert picks.tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]
    # Two copies of one token: the copy is exhausted after the first pick, the next distinct token comes next.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert greedy_dpp_map(conditional_dpp_kernel(features, torch.ones(1, 3)), 3, valid[:1, :3]).tolist() == [[0, 2, 1]]
    torch.manual_seed(1)
    kernel = conditional_dpp_kernel(torch.randn(2, 12, 4), torch.rand(2, 12))
    assert torch.equal(
        greedy_dpp_map(kernel, 9, valid.new_ones(2, 12)), greedy_dpp_map(kernel, 9, valid.new_ones(2, 12))
    )


def test_relevance_is_min_max_normalised_per_row():
    raw = torch.tensor([[0.2, 0.6, 1.0, 9.0], [-1.0, 3.0, 1.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, False, False]])
    got = normalise_relevance(raw, valid)
    assert torch.allclose(got, torch.tensor([[0.0, 0.5, 1.0, 0.0], [0.0, 1.0, 0.5, 0.25], [1.0, 1.0, 0.0, 0.0]]))
    # The kernel scales cosine similarity by r_i r_j: a token of relevance 0 has no volume.
    kernel = conditional_dpp_kernel(torch.tensor([[[2.0, 0.0], [3.0, 4.0]]]), torch.tensor([[0.5, 1.0]]))
    assert torch.allclose(kernel, torch.tensor([[[0.25, 0.3], [0.3, 1.0]]]))


def test_presets_keep_k_tokens_in_every_layer_and_validate():
    for k in (192, 128, 64):
        config = load_compression(f"cdpruner_{k}")
        assert config.t2v.selector == "dpp" and config.t2v.boundary_layers(32) == (0,)
        assert average_visual_tokens(config, 32, 576) == k
        assert stage_summary(config, 32, 576) == [(0, 31, k)]
        assert CompressionConfig.from_dict(config.to_dict()) == config
    assert "selector" not in load_compression("fastv_64").to_dict()["t2v"]  # saved configs of older presets unchanged
    with pytest.raises(CompressionConfigError, match=r"only with selector 'dpp'"):
        T2VConfig((0.0,), (0.5,))
    with pytest.raises(CompressionConfigError, match=r"t2v.selector must be one of"):
        T2VConfig((0.5,), (0.5,), selector="random")
    with pytest.raises(ValueError, match="needs selector 'dpp'"):
        StagePlan((0,), (0.5,))


def cdpruner_model(ratio: float = 0.5, position_mode: str = "keep", boundaries=(0.0,)) -> DuetLlavaForCausalLM:
    torch.manual_seed(0)
    ratios = (ratio, *(ratio / 2 ** (i + 1) for i in range(len(boundaries) - 1)))
    t2v = T2VConfig(tuple(boundaries), ratios, "instruction", position_mode, "dpp")
    config = DuetLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        compression=CompressionConfig("cdpruner", t2v=t2v).to_dict(),
    )
    return DuetLlavaForCausalLM(config).eval()


@pytest.mark.parametrize(("position_mode", "boundaries"), [("keep", (0.0,)), ("compact", (0.0, 0.5))])
def test_generation_is_the_same_eager_fast_recomputed_and_row_by_row(position_mode, boundaries):
    model = cdpruner_model(0.5, position_mode, boundaries)
    ids, mask, pixels = mixed_batch()
    options = dict(max_new_tokens=6, eos_token_id=[])
    eager = model.generate(ids, mask, pixels, fast=False, **options)
    fast = model.generate(ids, mask, pixels, fast=True, fast_decoder=FastDecoder(model), **options)
    recomputed = model.generate(ids, mask, pixels, use_cache=False, **options)
    assert torch.equal(fast, eager) and torch.equal(recomputed, eager)
    images_of_row = [[], [0], [1, 2]]
    for row in range(3):
        real = mask[row].bool()
        images = pixels[images_of_row[row]] if images_of_row[row] else None
        single = model.generate(ids[row : row + 1, real], None, images, **options)
        assert torch.equal(single[0], eager[row])


def test_prefill_keeps_k_visual_tokens_per_row_in_every_layer_without_host_reads():
    model = cdpruner_model(0.5)
    ids, mask, pixels = mixed_batch()
    with torch.no_grad():
        out = model(ids, mask, pixels, left_padding=True, logits_to_keep=1)
    # 16 patches per image: the text row keeps none, the one-image row 8, the two-image row 16 (of its 32).
    assert out.visual_tokens_per_row == [[0] * 4, [8] * 4, [16] * 4]
    assert host_reads(lambda: model(ids, mask, pixels, left_padding=True, logits_to_keep=1)) == 0


def test_training_step_reaches_the_projector_padded_and_packed():
    ids, mask, labels, pixels = batch()
    model = cdpruner_model(0.25).train()
    out = model(ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert out.visual_tokens_per_layer == [4.0] * 4  # 16 patches per image, 0.25 kept from the input on
    out.loss.backward()
    grad = model.projector[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    packed = model(ids, attention_mask=mask, pixel_values=pixels, labels=labels, pack_sequences=True)
    assert torch.allclose(packed.loss, out.loss, atol=1e-5)
