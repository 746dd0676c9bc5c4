"""Diversity-based V2V selectors (llava/compression/diverse_v2v.py): DivPrune and VisPruner."""

from __future__ import annotations

import math

import pytest
import torch

from llava.compression.accounting import average_visual_tokens, visual_tokens_per_layer
from llava.compression.anyres_v2v import check_method
from llava.compression.config import CompressionConfig, CompressionConfigError, V2VConfig, load_compression
from llava.compression.diverse_v2v import DivPruneSelector, VisPrunerSelector
from llava.compression.v2v import MERGERS, VisualTokenMerger, build_merger
from llava.model.config import DuetLlavaConfig
from llava.model.fast_generation import FastDecoder
from llava.model.modeling import DuetLlavaForCausalLM
from tests.conftest import tiny_text_config, tiny_vision_config
from tests.test_fast_generation import IMG, mixed_batch

SELECTORS = {"divprune": DivPruneSelector, "vispruner": VisPrunerSelector}


def polar(norm: float, degrees: float) -> list[float]:
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


def inputs(patches: list[list[float]], attention: list[float] | None = None):
    """One image: CLS ``[5, 5]`` then ``patches``; CLS attention (uniform unless given) and random keys."""
    features = torch.tensor([[5.0, 5.0], *patches]).unsqueeze(0)
    scores = torch.tensor(attention or [1.0 / len(patches)] * len(patches)).unsqueeze(0)
    return features, scores, torch.randn(1, len(patches) + 1, 4)


# ----- DivPrune, hand-computed -----
# Six 2-D patches (tokens 1..6); cosine distance 1 - cos(angle) grows with the angle between them (0..180 deg),
# so the max-min rule can be followed in angles. Norms differ on purpose (only directions count).
#   token:  1     2      3      4      5      6
#   angle:  0     20     90     135    170    270 (= -90)
# Nearest-other angle: 1: 20 (to 2), 2: 20, 3: 45 (to 4), 4: 35 (to 5), 5: 35, 6: 90 (to 1)  -> first pick 6.
# Angle to 6:          1: 90, 2: 110, 3: 180, 4: 135, 5: 100                                 -> pick 3.
# Min angle to {6, 3}: 1: min(90, 90) = 90, 2: min(110, 70) = 70, 4: min(135, 45) = 45, 5: min(100, 80) = 80
#                                                                                            -> pick 1.
# Min angle to {6,3,1}: 2: 20, 4: 45, 5: min(100, 80, 170) = 80                               -> pick 5.
# Greedy order 6, 3, 1, 5. (Starting from token 1 instead would pick 1, 5 (170), 6: {1, 5, 6} != {1, 3, 6}.)
# The CLS attention below favours tokens 2 and 4 and must be ignored.
DIVPRUNE_PATCHES = [polar(2, 0), polar(3, 20), polar(0.5, 90), polar(1.4, 135), polar(2, 170), polar(4, 270)]
DIVPRUNE_ATTENTION = [0.1, 0.4, 0.05, 0.3, 0.1, 0.05]


@pytest.mark.parametrize(("k", "expected"), [(2, [0, 6]), (3, [0, 3, 6]), (4, [0, 1, 3, 6]), (5, [0, 1, 3, 5, 6])])
def test_divprune_picks_the_hand_computed_max_min_subset(k, expected):
    features, scores, keys = inputs(DIVPRUNE_PATCHES, DIVPRUNE_ATTENTION)
    selector = DivPruneSelector(dominant=k)
    assert selector.token_indices(features, scores).tolist() == [expected]
    assert torch.equal(selector(features, scores, keys), features[:, expected])


def test_divprune_greedy_order_and_initialisation():
    features, scores, _ = inputs(DIVPRUNE_PATCHES, DIVPRUNE_ATTENTION)
    picks = DivPruneSelector(dominant=5).select_patches(features[:, 1:], scores, 4)
    assert picks.tolist() == [[5, 2, 0, 4]]  # patch indices (token - 1): 6, 3, 1, 5


# ----- VisPruner, hand-computed -----
# Ten patches (tokens 1..10), k = 9: patch budget 8 -> 4 important + 4 diverse (share 0.5).
# CLS attention ranks 3 > 8 > 1 > 6 > 2 > 9 > 4 > 10 > 5 > 7: important {3, 8, 1, 6};
# R (the rest, by attention) = [2, 9, 4, 10, 5, 7]; A = R[0::2] = [2, 4, 5], B = R[1::2] = [9, 10, 7].
# Angles: 9: 0, 10: 60, 7: 120, 2: 200, 4: 62, 5: 115 (important: 3: 200, a duplicate of 2; 8: 61; 1: 0; 6: 300).
# Default (up to 8 removals a round): r = min(8, 6 - 4, 3) = 2; best cosine to B: 2: cos 80 = 0.17 (to 7),
#   4: cos 2 = 0.999 (to 10), 5: cos 5 = 0.996 (to 7) -> drop 4 and 5; diverse = [2, 9, 10, 7]. Token 2 stays
#   although it duplicates important token 3: diverse candidates are compared only with each other.
#   Output: [0, 1, 2, 3, 6, 7, 8, 9, 10].
# One removal a round: round 1 drops 4 (0.999) -> R = [2, 9, 10, 5, 7]; round 2: A = [2, 10, 7], B = [9, 5]:
#   2: cos 85 = 0.09 (to 5), 10: cos 55 = 0.57 (to 5), 7: cos 5 = 0.996 (to 5) -> drop 7; R = [2, 9, 10, 5].
#   Output: [0, 1, 2, 3, 5, 6, 8, 9, 10].
VIS_ANGLES = {1: 0, 2: 200, 3: 200, 4: 62, 5: 115, 6: 300, 7: 120, 8: 61, 9: 0, 10: 60}
VIS_ATTENTION = {3: 0.20, 8: 0.15, 1: 0.12, 6: 0.11, 2: 0.10, 9: 0.09, 4: 0.08, 10: 0.07, 5: 0.06, 7: 0.02}
VIS_PATCHES = [polar(1 + token % 3, VIS_ANGLES[token]) for token in range(1, 11)]
VIS_SCORES = [VIS_ATTENTION[token] for token in range(1, 11)]


@pytest.mark.parametrize(
    ("drop_per_round", "expected"), [(8, [0, 1, 2, 3, 6, 7, 8, 9, 10]), (1, [0, 1, 2, 3, 5, 6, 8, 9, 10])]
)
def test_vispruner_keeps_important_then_removes_duplicates_by_hand(drop_per_round, expected):
    features, scores, keys = inputs(VIS_PATCHES, VIS_SCORES)
    selector = VisPrunerSelector(dominant=9, drop_per_round=drop_per_round)
    assert selector.split(8) == (4, 4)
    assert selector.token_indices(features, scores).tolist() == [expected]
    assert torch.equal(selector(features, scores, keys), features[:, expected])


def test_ties_go_to_the_lower_index():
    # Identical patches and uniform attention: every score ties.
    features, scores, _ = inputs([[1.0, 2.0]] * 8)
    assert DivPruneSelector(dominant=5).token_indices(features, scores).tolist() == [[0, 1, 2, 3, 4]]
    # VisPruner: important = patches 0, 1; R = [2..7], target 2. Round 1: r = min(8, 4, 3) = 3 drops all of
    # A = [2, 4, 6]; round 2: R = [3, 5, 7], A = [3, 7], B = [5], equal scores -> the later (7) goes.
    assert VisPrunerSelector(dominant=5).token_indices(features, scores).tolist() == [[0, 1, 2, 4, 6]]


# ----- properties -----
def random_inputs(num_images: int, num_tokens: int, width: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, num_tokens, width, generator=generator)
    scores = torch.rand(num_images, num_tokens - 1, generator=generator)
    return features, scores, torch.randn(num_images, num_tokens, 4, generator=generator)


@pytest.mark.parametrize("method", sorted(SELECTORS))
@pytest.mark.parametrize("k", [1, 2, 12, 33, 50])
def test_batch_equals_one_by_one_deterministic_raster_order(method, k):
    selector = build_merger(V2VConfig(method=method, dominant=k, contextual=0))
    assert isinstance(selector, SELECTORS[method]) and isinstance(selector, VisualTokenMerger)
    assert selector.num_output_tokens(50) == k
    features, scores, keys = random_inputs(5, 50, seed=k)
    index = selector.token_indices(features, scores)
    assert index.shape == (5, k) and (index[:, 0] == 0).all()
    assert (index[:, 1:].diff(dim=1) > 0).all()  # distinct patches, ascending (raster) order after CLS
    single = torch.cat([selector.token_indices(features[i : i + 1], scores[i : i + 1]) for i in range(5)])
    assert torch.equal(index, single)
    assert torch.equal(selector.token_indices(features, scores), index)  # deterministic
    merged = selector(features, scores, keys)
    assert torch.equal(merged, torch.stack([features[i, index[i]] for i in range(5)]))
    if 2 < k < 50:
        assert len({tuple(row) for row in index.tolist()}) > 1  # each image gets its own selection


@pytest.mark.parametrize("method", sorted(SELECTORS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_flows_to_the_kept_tokens(method, dtype):
    features, scores, keys = random_inputs(3, 20, seed=1)
    features = features.to(dtype).requires_grad_(True)
    selector = SELECTORS[method](dominant=7)
    weights = torch.randn(3, 7, 8)
    (selector(features, scores, keys).float() * weights).sum().backward()
    index = selector.token_indices(features, scores)
    expected = torch.zeros(3, 20, 8)
    for image in range(3):
        expected[image, index[image]] = weights[image]
    assert torch.equal(features.grad.float(), expected.to(dtype).float())


@pytest.mark.parametrize(
    ("method", "k", "patches", "scores"),
    [("divprune", 5, DIVPRUNE_PATCHES, DIVPRUNE_ATTENTION), ("vispruner", 9, VIS_PATCHES, VIS_SCORES)],
)
def test_bf16_picks_the_fp32_indices_on_a_well_separated_example(method, k, patches, scores):
    features, attention, keys = inputs(patches, scores)
    selector = SELECTORS[method](dominant=k)
    half = features.to(torch.bfloat16)
    assert torch.equal(selector.token_indices(half, attention), selector.token_indices(features, attention))
    out = selector(half, attention, keys)
    assert out.dtype == torch.bfloat16 and out.shape == (1, k, 2)


def test_config_registry_and_errors_are_clear():
    assert {"divprune", "vispruner"} <= set(MERGERS)
    assert VisPrunerSelector(dominant=64).split(63) == (31, 32)
    for method in SELECTORS:
        with pytest.raises(CompressionConfigError, match="contextual must be 0"):
            V2VConfig(method=method, dominant=10, contextual=2)
        with pytest.raises(ValueError, match="contextual must be 0"):
            SELECTORS[method](dominant=4, contextual=1)
        with pytest.raises(ValueError, match="counts CLS"):
            SELECTORS[method](dominant=0)
        with pytest.raises(ValueError, match="tower yields only 17 tokens"):
            SELECTORS[method](dominant=18)(*random_inputs(1, 17))
        with pytest.raises(ValueError, match="cls_attention"):
            features, scores, keys = random_inputs(1, 17)
            SELECTORS[method](dominant=4)(features, scores[:, 1:], keys)
        # AnyRes (LLaVA-NeXT / OneVision) does not run them, and says so.
        with pytest.raises(ValueError, match=f"AnyRes V2V methods: .*got '{method}'"):
            check_method(V2VConfig(method=method, dominant=0.25, contextual=0.0))


@pytest.mark.parametrize("method", sorted(SELECTORS))
@pytest.mark.parametrize("budget", [192, 128, 64])
def test_presets_load_and_count(method, budget):
    config = load_compression(f"{method}_{budget}")
    assert config.name == f"{method}_{budget}" and config.t2v is None
    assert (config.v2v.method, config.v2v.dominant, config.v2v.contextual) == (method, budget, 0)
    assert visual_tokens_per_layer(config, 32, 576) == [budget] * 32
    assert average_visual_tokens(config, 32, 576) == budget
    assert build_merger(config.v2v).num_output_tokens(577) == budget


# ----- end to end: a tiny LLaVA with the selectors in its tower -----
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = DuetLlavaConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config())
    return DuetLlavaForCausalLM(config).eval()


@pytest.mark.parametrize(("method", "k"), [("divprune", 6), ("vispruner", 7)])
def test_generation_eager_fast_and_recomputation_agree(tiny, method, k):
    tiny.set_compression(CompressionConfig(name=f"tiny-{method}", v2v=V2VConfig(method, k, 0)))
    assert isinstance(tiny.vision_tower.merger, SELECTORS[method]) and tiny.vision_tower.num_output_tokens == k
    ids, mask, pixels = mixed_batch()
    options = dict(max_new_tokens=8, eos_token_id=[])
    eager = tiny.generate(ids, mask, pixels, fast=False, **options)
    recomputed = tiny.generate(ids, mask, pixels, use_cache=False, **options)
    fast = tiny.generate(ids, mask, pixels, fast=True, fast_decoder=FastDecoder(tiny), **options)
    assert eager.shape == (3, 8)
    assert torch.equal(fast, eager) and torch.equal(recomputed, eager)


@pytest.mark.parametrize("method", sorted(SELECTORS))
def test_training_step_reaches_the_projector(tiny, method):
    tiny.set_compression(CompressionConfig(name=f"tiny-{method}", v2v=V2VConfig(method, 7, 0)))
    ids, mask, pixels = mixed_batch()
    labels = ids.masked_fill((mask == 0) | (ids == IMG), -100)
    tiny.train()
    try:
        tiny.zero_grad(set_to_none=True)
        output = tiny(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        output.loss.backward()
    finally:
        tiny.eval()
    assert torch.isfinite(output.loss)
    grads = [p.grad for p in tiny.projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    tower_grads = [p.grad for p in tiny.vision_tower.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in tower_grads)  # through the kept tokens
