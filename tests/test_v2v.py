"""Stage A (V2V merging): DUET and VisionZip mergers and the merging vision tower."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPVisionModel

from llava.compression import v2v
from llava.compression.config import CompressionConfig, V2VConfig
from llava.compression.v2v import (
    DuetMerger,
    RandomMerger,
    VisionZipMerger,
    VisualTokenMerger,
    build_merger,
    cls_attention_and_keys,
)
from llava.hf_adapter import attn_implementation_of
from llava.model import vision_tower as vision_tower_module
from llava.model.config import DuetLlavaConfig
from llava.model.vision_tower import VisionTower
from tests.conftest import tiny_text_config, tiny_vision_config

# ----- hand-built example: T = 9 (CLS + 8 patches), k1 = 3, k2 = 2, cluster_width = 2 -----
# Token i (1..8) has feature [i, i^2]; CLS is [100, -1].
# CLS scores by token: 6 > 2 > 8 > 4 > 5 > 7 > 1 > 3.
# Dominant: CLS + tokens {6, 2}, raster order -> tokens 0, 2, 6.
# DUET: remaining by score 8, 4, 5, 7, 1, 3; pool = min(2*2, 6) = 4 -> [8, 4, 5, 7]; step = 2 -> anchors
#   ranks 0, 2 = tokens 8, 5; members 4, 7; tokens 1, 3 dropped.
#   Keys: 8 = [10, 0] (x), 5 = [0, 0.1] (y); member 4 = [1, 2]: raw dot prefers 8 (10 vs 0.2) but cosine
#   prefers 5 (0.89 vs 0.45), so keys must be normalised; member 7 = [3, 1] -> 8.
#   Contextual: 8 + 7 = [15, 113]; 5 + 4 = [9, 41].
# VisionZip: remaining by position 1, 3, 4, 5, 7, 8; step = 6 // 2 = 3 -> anchors slots 0, 3 = tokens 1, 5.
#   Keys: 1 = [2, 0] (x); members 3 = [1, 3] -> 5, 4 -> 5, 7 -> 1, 8 -> 1.
#   Contextual: 1 + mean(7, 8) = [8.5, 57.5]; 5 + mean(3, 4) = [8.5, 37.5].
SCORES = {1: 0.10, 2: 0.50, 3: 0.05, 4: 0.30, 5: 0.20, 6: 0.60, 7: 0.15, 8: 0.40}
KEYS = {0: [0.3, -0.7], 1: [2, 0], 2: [-1, 1], 3: [1, 3], 4: [1, 2], 5: [0, 0.1], 6: [5, 5], 7: [3, 1], 8: [10, 0]}
DOMINANT = [[100.0, -1.0], [2.0, 4.0], [6.0, 36.0]]


def hand_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features = torch.tensor([[100.0, -1.0]] + [[float(i), float(i * i)] for i in range(1, 9)]).unsqueeze(0)
    cls_attention = torch.tensor([SCORES[i] for i in range(1, 9)]).unsqueeze(0)
    keys = torch.tensor([KEYS[i] for i in range(9)]).unsqueeze(0)
    return features, cls_attention, keys


def random_inputs(num_images: int, num_tokens: int, width: int = 8, key_width: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_images, num_tokens, width, generator=generator)
    cls_attention = torch.rand(num_images, num_tokens - 1, generator=generator)
    keys = torch.randn(num_images, num_tokens, key_width, generator=generator)
    return features, cls_attention, keys


def test_duet_merger_matches_hand_computed_output():
    merger = build_merger(V2VConfig(method="duet", dominant=3, contextual=2, cluster_width=2))
    assert isinstance(merger, DuetMerger) and isinstance(merger, VisualTokenMerger)
    expected = torch.tensor([[*DOMINANT, [15.0, 113.0], [9.0, 41.0]]])
    assert torch.equal(merger(*hand_inputs()), expected)


def test_visionzip_merger_matches_hand_computed_output():
    merger = build_merger(V2VConfig(method="visionzip", dominant=3, contextual=2))
    assert isinstance(merger, VisionZipMerger)
    expected = torch.tensor([[*DOMINANT, [8.5, 57.5], [8.5, 37.5]]])
    assert torch.equal(merger(*hand_inputs()), expected)


def test_duet_drops_tokens_outside_the_pool_visionzip_merges_them():
    features, cls_attention, keys = hand_inputs()
    perturbed = features.clone()
    perturbed[0, [1, 3]] += 1000.0  # the two lowest-score patches: outside DUET's pool
    duet = DuetMerger(dominant=3, contextual=2, cluster_width=2)
    zip_merger = VisionZipMerger(dominant=3, contextual=2)
    assert torch.equal(duet(perturbed, cls_attention, keys), duet(features, cls_attention, keys))
    assert not torch.equal(zip_merger(perturbed, cls_attention, keys), zip_merger(features, cls_attention, keys))


def test_visionzip_sums_all_remaining_tokens():
    # k2 = 1: one anchor (the first remaining patch by position) absorbs every other remaining patch.
    features, cls_attention, keys = random_inputs(3, 17)
    k1 = 5
    merged = VisionZipMerger(dominant=k1, contextual=1)(features, cls_attention, keys)
    for image in range(3):
        dominant = set((cls_attention[image].argsort(descending=True)[: k1 - 1] + 1).tolist())
        remaining = [t for t in range(1, 17) if t not in dominant]
        anchor, members = remaining[0], remaining[1:]
        total = merged[image, k1] + (len(members) - 1) * (merged[image, k1] - features[image, anchor])
        assert torch.allclose(total, features[image, remaining].sum(0), atol=1e-5)


def test_duet_single_anchor_takes_only_its_pool():
    # k2 = 1, cluster_width = 2: pool = the two best remaining patches; anchor = best, member = second.
    features, cls_attention, keys = random_inputs(2, 17)
    merged = DuetMerger(dominant=4, contextual=1, cluster_width=2)(features, cls_attention, keys)
    for image in range(2):
        ranked = cls_attention[image].argsort(descending=True) + 1
        assert torch.allclose(merged[image, 4], features[image, ranked[3]] + features[image, ranked[4]])


@pytest.mark.parametrize("method", ["duet", "visionzip"])
@pytest.mark.parametrize(("k1", "k2", "width"), [(5, 3, 4), (1, 4, 2), (6, 0, 4), (4, 13, 4), (17, 0, 1), (7, 5, 1)])
def test_output_count_and_batch_equals_per_image(method, k1, k2, width):
    merger = build_merger(V2VConfig(method=method, dominant=k1, contextual=k2, cluster_width=width))
    features, cls_attention, keys = random_inputs(5, 17, seed=k1 * 31 + k2)
    batched = merger(features, cls_attention, keys)
    assert batched.shape == (5, k1 + k2, 8)
    assert merger.num_output_tokens(17) == k1 + k2
    single = torch.cat([merger(features[i : i + 1], cls_attention[i : i + 1], keys[i : i + 1]) for i in range(5)])
    assert torch.equal(batched, single)
    # Dominant part: CLS first, then the top k1 - 1 patches in raster order.
    top = (cls_attention.argsort(dim=1, descending=True)[:, : k1 - 1] + 1).sort(dim=1).values
    index = torch.cat([torch.zeros(5, 1, dtype=torch.long), top], dim=1)
    assert torch.equal(batched[:, :k1], torch.stack([features[i, index[i]] for i in range(5)]))


def test_random_merger_keeps_cls_and_distinct_random_patches_per_image():
    features, cls_attention, keys = random_inputs(6, 50, seed=3)
    merger = build_merger(V2VConfig(method="random", dominant=9, contextual=0))
    assert isinstance(merger, RandomMerger) and merger.num_output_tokens(50) == 9
    torch.manual_seed(0)
    merged = merger(features, cls_attention, keys)
    assert merged.shape == (6, 9, 8) and torch.equal(merged[:, 0], features[:, 0])
    # Every kept token is one of the image's own patches, each at most once, in raster order.
    chosen = [[int((features[i, 1:] == token).all(-1).nonzero()) + 1 for token in merged[i, 1:]] for i in range(6)]
    assert all(row == sorted(set(row)) for row in chosen)
    # Not the CLS ranking, and not the same draw for every image.
    top = sorted((cls_attention[0].argsort(descending=True)[:8] + 1).tolist())
    assert chosen[0] != top and len({tuple(row) for row in chosen}) > 1
    torch.manual_seed(0)
    assert torch.equal(merger(features, cls_attention, keys), merged)  # repeatable with the seed
    with pytest.raises(ValueError, match="contextual must be 0"):
        RandomMerger(dominant=4, contextual=1)


def test_merger_errors_are_clear():
    with pytest.raises(ValueError, match="k1 \\+ k2"):
        DuetMerger(dominant=10, contextual=8)(*random_inputs(1, 17))
    with pytest.raises(ValueError, match="unknown V2V method"):
        build_merger(SimpleNamespace(method="tome", dominant=3, contextual=2, cluster_width=4))
    with pytest.raises(ValueError, match="counts CLS"):
        DuetMerger(dominant=0, contextual=2)
    with pytest.raises(ValueError, match="cluster_width"):
        DuetMerger(dominant=2, contextual=2, cluster_width=0)
    features, cls_attention, keys = random_inputs(2, 17)
    with pytest.raises(ValueError, match="cls_attention"):
        DuetMerger(dominant=2, contextual=2)(features, cls_attention[:, 1:], keys)


# ----- the merging vision tower -----
def tower_config(**overrides) -> DuetLlavaConfig:
    return DuetLlavaConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(), **overrides)


def merging_tower(monkeypatch, merger: VisualTokenMerger, **config_overrides) -> VisionTower:
    """A tiny tower whose config's compression resolves to ``merger`` (independent of preset names)."""
    monkeypatch.setattr(vision_tower_module, "build_tower_merger", lambda compression: merger)
    torch.manual_seed(0)
    placeholder = {"name": "test-v2v", "v2v": {"method": "duet", "dominant": 2, "contextual": 1}, "t2v": None}
    return VisionTower(tower_config(compression=placeholder, **config_overrides)).eval()


def eager_reference(tower: VisionTower, pixels: torch.Tensor):
    """The same weights in an eager CLIP run with ``output_attentions`` (only for the reference)."""
    eager = CLIPVisionModel._from_config(tower.vision_model.config, attn_implementation="eager").eval()
    eager.load_state_dict(tower.vision_model.state_dict())
    with torch.no_grad():
        return eager(pixel_values=pixels, output_attentions=True, output_hidden_states=True)


def test_tower_scores_match_eager_attention_and_dominant_features_match(monkeypatch):
    k1, k2 = 5, 3
    tower = merging_tower(monkeypatch, DuetMerger(dominant=k1, contextual=k2))
    pixels = torch.randn(3, 3, 56, 56)
    reference = eager_reference(tower, pixels)
    feature_layer = tower.num_layers  # hidden-state index of layer -2: 2 of 3
    expected_scores = reference.attentions[feature_layer - 1][:, :, 0, 1:].sum(dim=1)
    layer = tower.vision_model.encoder.layers[feature_layer - 1]
    scores, keys = cls_attention_and_keys(layer, reference.hidden_states[feature_layer - 1])
    assert (scores - expected_scores).abs().max().item() <= 1e-5
    assert keys.shape == (3, 17, 8)

    with torch.no_grad():
        merged = tower(pixels)
    assert merged.shape == (3, k1 + k2, 32) and tower.num_output_tokens == k1 + k2
    features = reference.hidden_states[-2]
    top = (expected_scores.argsort(dim=1, descending=True)[:, : k1 - 1] + 1).sort(dim=1).values
    index = torch.cat([torch.zeros(3, 1, dtype=torch.long), top], dim=1)
    expected_dominant = torch.stack([features[i, index[i]] for i in range(3)])
    assert torch.allclose(merged[:, :k1], expected_dominant, atol=1e-5)
    # The whole output equals the merger applied to the eager reference's tensors.
    assert torch.allclose(merged, tower.merger(features, expected_scores, keys), atol=1e-5)


@pytest.mark.parametrize("strategy", ["patch", "cls_patch"])
def test_tower_output_count_ignores_strategy_and_batches(monkeypatch, strategy):
    tower = merging_tower(
        monkeypatch, VisionZipMerger(dominant=4, contextual=2), vision_feature_select_strategy=strategy
    )
    pixels = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        batched = tower(pixels)
        single = torch.cat([tower(pixels[i : i + 1]) for i in range(4)])
    assert batched.shape == (4, 6, 32) and tower.num_output_tokens == 6
    assert torch.allclose(batched, single, atol=1e-5)


def test_tower_never_uses_eager_attention_or_output_attentions(monkeypatch):
    tower = merging_tower(monkeypatch, DuetMerger(dominant=3, contextual=2))
    assert attn_implementation_of(tower.vision_model.config) == "sdpa"
    seen_kwargs = []
    for layer in tower.vision_model.encoder.layers:
        layer.self_attn.register_forward_hook(
            lambda module, args, kwargs, output: seen_kwargs.append(kwargs), with_kwargs=True
        )
    eager_calls = []
    monkeypatch.setattr(
        "transformers.models.clip.modeling_clip.eager_attention_forward",
        lambda *args, **kwargs: eager_calls.append(1),
    )
    pixels = torch.randn(2, 3, 56, 56, requires_grad=True)
    merged = tower(pixels)
    assert merged.shape == (2, 5, 32)
    assert not eager_calls and len(seen_kwargs) == tower.num_layers
    assert all("output_attentions" not in kwargs for kwargs in seen_kwargs)
    assert attn_implementation_of(tower.vision_model.config) == "sdpa"
    merged.sum().backward()  # the merge is differentiable w.r.t. the tower (scores are not)
    assert pixels.grad is not None


@pytest.mark.parametrize("strategy", ["patch", "cls_patch"])
@pytest.mark.parametrize("compression", [None, "none"])
def test_tower_without_merger_is_unchanged(strategy, compression):
    torch.manual_seed(0)
    tower = VisionTower(tower_config(vision_feature_select_strategy=strategy, compression=compression)).eval()
    assert tower.merger is None
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got = tower(pixels)
        expected = tower.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    expected = expected if strategy == "cls_patch" else expected[:, 1:]
    assert torch.equal(got, expected)
    assert tower.num_output_tokens == got.shape[1] == (17 if strategy == "cls_patch" else 16)


@pytest.mark.parametrize("as_dict", [True, False])
def test_tower_builds_merger_from_config_compression(as_dict):
    compression = CompressionConfig(name="test", v2v=V2VConfig(method="duet", dominant=4, contextual=3))
    tower = VisionTower(tower_config(compression=compression.to_dict() if as_dict else compression))
    assert isinstance(tower.merger, DuetMerger) and tower.num_output_tokens == 7
    assert (tower.merger.dominant, tower.merger.contextual, tower.merger.cluster_width) == (4, 3, 4)
    with torch.no_grad():
        assert tower(torch.randn(2, 3, 56, 56)).shape == (2, 7, 32)
    no_v2v = CompressionConfig(name="t2v-only").to_dict()
    assert VisionTower(tower_config(compression=no_v2v)).merger is None


def test_tower_rejects_budget_larger_than_the_image(monkeypatch):
    with pytest.raises(ValueError, match="k1 \\+ k2"):
        merging_tower(monkeypatch, DuetMerger(dominant=12, contextual=6))


def test_registry_lists_every_method():
    assert set(v2v.MERGERS) == {"duet", "visionzip", "random", "divprune", "vispruner"}
