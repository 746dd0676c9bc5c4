"""DyMU: DToMe in the vision tower (merging, position map, proportional attention), variable token counts
through the model, generation, training, and threshold calibration."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionModel

from llava.compression.config import CompressionConfig, CompressionConfigError, DyMUConfig, T2VConfig, V2VConfig
from llava.compression.dtome import NO_MERGE, MergeState, apply_merges, best_matches, merge_above
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from llava.hf_adapter import call_clip_attention, call_decoder_layer_on_groups
from llava.model.config import DuetLlavaConfig
from llava.model.modeling import DuetLlavaForCausalLM
from llava.tools import calibrate_dymu
from tests.conftest import tiny_text_config, tiny_vision_config

IMG = IMAGE_TOKEN_ID
TOWER_LAYERS = 2  # the tiny tower has 3 layers and LLaVA reads layer -2


def build(dymu: DyMUConfig | None = None, t2v: T2VConfig | None = None, **vision) -> DuetLlavaForCausalLM:
    torch.manual_seed(0)
    compression = CompressionConfig("dymu_test", dymu=dymu, t2v=t2v).to_dict() if (dymu or t2v) else None
    config = DuetLlavaConfig(
        vision_config=tiny_vision_config(**vision), text_config=tiny_text_config(), compression=compression
    )
    return DuetLlavaForCausalLM(config).eval()


def mixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded: text only, one image, two images."""
    ids = torch.tensor([[0, 0, 0, 0, 1, 5, 6, 7], [0, 0, 1, IMG, 4, 5, 6, 9], [1, IMG, 3, IMG, 4, 5, 6, 8]])
    torch.manual_seed(1)
    return ids, (ids != 0).long(), torch.randn(3, 3, 56, 56)


def test_thresholds_of_one_merge_nothing_and_give_the_uncompressed_output():
    base = build()
    dymu = build(DyMUConfig((NO_MERGE,) * TOWER_LAYERS))
    dymu.load_state_dict(base.state_dict())
    ids, mask, pixels = mixed_batch()
    _, counts, _, _ = dymu.vision_tower.encode_dynamic(pixels)
    assert counts.tolist() == [16, 16, 16]
    torch.testing.assert_close(dymu(ids, mask, pixels).logits, base(ids, mask, pixels).logits, atol=1e-5, rtol=1e-5)


def test_merge_counts_and_position_map_on_a_hand_built_case():
    # Tokens 0 (CLS) .. 4; A = {0, 2, 4}, B = {1, 3}. Token 2 matches token 1 exactly, token 4 matches 3.
    hidden = torch.tensor([[[1.0, 0], [0, 1], [0, 1], [1, 1], [1, 1]]])
    state = MergeState.start(hidden)
    merged = merge_above(state, hidden, 0.9)
    assert merged.counts.tolist() == [3]
    assert merged.sizes.tolist() == [[1.0, 2.0, 2.0, 0.0, 0.0]]
    assert merged.owner.tolist() == [[0, 1, 1, 2, 2]]  # original token -> slot
    # Size-weighted merge: a size-2 token merged with a size-1 token weighs 2:1.
    weighted = MergeState(hidden, torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0]]), state.owner, state.counts)
    again = merge_above(weighted, hidden + torch.tensor([0.0, 0.01]), 0.9)
    assert torch.allclose(again.hidden[0, 1], (2 * hidden[0, 1] + hidden[0, 2]) / 3)
    # Nothing above the threshold: nothing merges, the order becomes A then B.
    kept = merge_above(state, hidden, NO_MERGE)
    assert kept.counts.tolist() == [5] and kept.owner.tolist() == [[0, 3, 1, 4, 2]]
    ordered, sizes, owner = kept.raster_order()
    assert torch.equal(ordered, hidden) and sizes.tolist() == [[1.0] * 5] and owner.tolist() == [[0, 1, 2, 3, 4]]
    _, merged_sizes, merged_owner = merged.raster_order()
    assert merged_owner.tolist() == [[0, 1, 1, 2, 2]] and merged_sizes.tolist() == [[1.0, 2.0, 2.0, 0.0, 0.0]]


def test_cls_never_merges_and_rows_merge_independently():
    # Row 0: every token identical (all A tokens but CLS merge); row 1: 3 live tokens out of 5.
    hidden = torch.ones(2, 5, 2)
    state = MergeState(hidden, torch.tensor([[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0]]),
                       torch.arange(5).expand(2, 5).clone(), torch.tensor([5, 3]))  # fmt: skip
    best, _ = best_matches(hidden, state.counts)
    assert best[:, 0].isinf().all()  # CLS
    assert best[1, 2].isinf()  # row 1 slot 4 is empty
    merged = merge_above(state, hidden, 0.5)
    assert merged.counts.tolist() == [3, 2]
    assert merged.sizes[0].tolist() == [1.0, 3.0, 1.0, 0.0, 0.0]  # ties go to the first B token
    assert merged.sizes[1].tolist() == [1.0, 2.0, 0.0, 0.0, 0.0]
    no_merge = apply_merges(state, torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.long))
    assert no_merge.counts.tolist() == [5, 3]


def test_proportional_attention_equals_attending_to_duplicated_tokens():
    """A token of size s with log(s) added to its key logits gets the attention that s copies of it get."""
    layer = CLIPVisionModel(tiny_vision_config()).encoder.layers[0].eval()
    torch.manual_seed(2)
    tokens = torch.randn(1, 3, 32)
    duplicated = tokens[:, [0, 1, 1, 2, 2, 2]]
    full, _ = call_clip_attention(layer, duplicated, None)
    bias = torch.tensor([1.0, 2.0, 3.0]).log()[None, None, None, :]
    merged, keys = call_clip_attention(layer, tokens, bias)
    torch.testing.assert_close(merged, full[:, [0, 1, 3]], atol=1e-5, rtol=1e-5)
    assert keys.shape == (1, 3, 32)
    # And the eager kernel agrees with SDPA on the biased attention.
    layer.self_attn.config._attn_implementation = "eager"
    eager, _ = call_clip_attention(layer, tokens, bias)
    torch.testing.assert_close(eager, merged, atol=1e-5, rtol=1e-5)


def test_a_batch_equals_its_images_alone_and_counts_follow_the_image():
    model = build(DyMUConfig((0.2, 0.2)))
    torch.manual_seed(3)
    plain = torch.zeros(1, 3, 56, 56)  # a flat image merges much more than noise
    pixels = torch.cat([torch.randn(2, 3, 56, 56), plain])
    features, counts, groups, _ = model.vision_tower.encode_dynamic(pixels)
    assert counts[2] < counts[0] and counts[2] < counts[1]
    for index in range(3):
        alone, alone_count, alone_groups, _ = model.vision_tower.encode_dynamic(pixels[index : index + 1])
        assert alone_count.item() == counts[index].item()
        live = int(counts[index])
        torch.testing.assert_close(features[index, :live], alone[0, :live], atol=1e-5, rtol=1e-5)
        assert torch.equal(groups[index], alone_groups[0]) and int(groups[index].max()) == live - 1


def test_tower_output_does_not_depend_on_train_mode():
    """Fixed thresholds: unlike the published code, train mode does not switch to fixed-r merging."""
    model = build(DyMUConfig((0.3, 0.3)))
    pixels = torch.randn(2, 3, 56, 56)
    evaluated = model.vision_tower.encode_dynamic(pixels)
    model.train()
    trained = model.vision_tower.encode_dynamic(pixels)
    assert torch.equal(evaluated[1], trained[1]) and torch.equal(evaluated[0], trained[0])


@pytest.mark.parametrize("t2v", [None, T2VConfig((0.5,), (0.5,), "instruction")])
def test_generation_with_variable_counts_matches_recomputation_and_single_samples(t2v):
    model = build(DyMUConfig((0.3, 0.3)), t2v)
    ids, mask, pixels = mixed_batch()
    options = dict(max_new_tokens=6, eos_token_id=[])
    cached = model.generate(ids, mask, pixels, fast=False, **options)
    assert torch.equal(cached, model.generate(ids, mask, pixels, use_cache=False, **options))
    assert torch.equal(cached, model.generate(ids, mask, pixels, fast=True, **options))
    image_of_row = [[], [0], [1, 2]]
    for row in range(3):
        keep = mask[row].bool()
        row_pixels = pixels[image_of_row[row]] if image_of_row[row] else None
        single = model.generate(ids[row : row + 1, keep], None, row_pixels, **options)
        assert torch.equal(single[0], cached[row])


def test_training_step_with_dymu_and_t2v_backpropagates_to_the_projector():
    model = build(DyMUConfig((0.3, 0.3)), T2VConfig((0.5,), (0.5,), "instruction")).train()
    ids = torch.tensor([[1, IMG, 5, 6, 7, 8], [1, IMG, 9, IMG, 10, 11]])
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[labels == IMG] = IGNORE_INDEX
    out = model(ids, torch.ones_like(ids), torch.randn(3, 3, 56, 56), labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(parameter.grad is not None for parameter in model.projector.parameters())


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="one threshold per vision-tower layer run"):
        build(DyMUConfig((0.5,) * 5))
    with pytest.raises(CompressionConfigError, match="configure one of them"):
        CompressionConfig("x", v2v=V2VConfig("duet", 4, 2), dymu=DyMUConfig((0.5, 0.5)))
    with pytest.raises(CompressionConfigError, match="calibrate_dymu"):
        DyMUConfig(thresholds_file=str(tmp_path / "missing.json"))
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"thresholds": [0.9, 0.8]}))
    config = CompressionConfig("x", dymu=DyMUConfig(thresholds_file=str(path)))
    assert config.to_dict()["dymu"] == {"thresholds": [0.9, 0.8]}  # checkpoints carry the values, not the path


def test_calibration_is_deterministic_and_lands_near_its_target(playground, tmp_path):
    tower = playground / "vision_tower"
    common = ["--vision_tower", str(tower), "--data_path", str(playground / "finetune.json"),
              "--image_folder", str(playground / "images"), "--batch_size", "16", "--no_progress"]  # fmt: skip
    first = calibrate_dymu.main([*common, "--target", "300", "--out", str(tmp_path / "a.json")])
    second = calibrate_dymu.main([*common, "--target", "300", "--out", str(tmp_path / "b.json")])
    assert first["thresholds"] == second["thresholds"] and len(first["thresholds"]) == 2
    assert first["merges_per_layer"] == round((577 - 300) / 2)
    measured = calibrate_dymu.main([*common, "--measure", str(tmp_path / "a.json")])
    assert abs(measured["tokens_mean"] - 300) <= 30, measured
    assert measured["tokens_std"] >= 0 and measured["num_images"] == first["num_images"] > 0
    # The file feeds a preset, and the model keeps that many tokens per image on average.
    assert json.loads((tmp_path / "a.json").read_text())["thresholds"] == first["thresholds"]


def test_calibration_refuses_paths_outside_the_image_folder(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": "a", "image": "../secret.png", "conversations": []}]))
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="outside"):
        calibrate_dymu.image_paths(str(data), str(tmp_path / "images"))
    assert calibrate_dymu.merges_per_layer("low", 577, 23) == 21
    assert calibrate_dymu.merges_per_layer("mid", 577, 23) == 16
    assert calibrate_dymu.merges_per_layer("high", 577, 23) == 8
    assert calibrate_dymu.reachable_tokens(577, 2, 242) < 577 // 3


# ---------------------------------------------------------------- VTU: virtual token unmerging in the LLM


def test_vtu_with_nothing_merged_equals_the_uncompressed_model():
    base = build()
    vtu = build(DyMUConfig((NO_MERGE,) * TOWER_LAYERS, vtu=True))
    vtu.load_state_dict(base.state_dict())
    ids, mask, pixels = mixed_batch()
    torch.testing.assert_close(vtu(ids, mask, pixels).logits, base(ids, mask, pixels).logits, atol=1e-5, rtol=1e-5)


def test_a_vtu_layer_on_duplicated_tokens_equals_the_full_layer_averaged_per_group():
    """q/k/v of each unique token copied to its positions, attention at full length with RoPE at the true
    positions: the same as the layer's own attention on the expanded sequence, averaged back per group."""
    from transformers import LlamaModel

    torch.manual_seed(5)
    llm = LlamaModel(tiny_text_config()).eval()
    layer = llm.layers[0]
    unique = torch.randn(2, 3, 64)
    groups = torch.tensor([[0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 1, 2]])
    sizes = torch.zeros(2, 3).scatter_add(1, groups, torch.ones(2, 6))
    full = unique.gather(1, groups.unsqueeze(-1).expand(-1, -1, 64))
    embeddings = llm.rotary_emb(full, position_ids=torch.arange(6).expand(2, 6))
    out = call_decoder_layer_on_groups(
        layer, unique, groups, sizes, attention_mask=None, position_embeddings=embeddings, cache=None
    )
    attended, _ = layer.self_attn(layer.input_layernorm(full), attention_mask=None, position_embeddings=embeddings)
    residual = full + attended
    averaged = torch.zeros_like(unique).scatter_add(1, groups.unsqueeze(-1).expand(-1, -1, 64), residual)
    averaged = averaged / sizes.unsqueeze(-1)
    expected = averaged + layer.mlp(layer.post_attention_layernorm(averaged))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_vtu_batches_generation_and_token_accounting():
    model = build(DyMUConfig((0.2, 0.2), vtu=True))
    plain = build(DyMUConfig((0.2, 0.2)))
    ids, mask, pixels = mixed_batch()
    out = model(ids, mask, pixels)
    # Attention runs at full length (every patch position), the linear layers on the merged tokens.
    assert out.logits.shape[1] == ids.shape[1] - 2 + 2 * 16  # the two-image row, at full length
    assert out.visual_tokens_per_layer == plain(ids, mask, pixels).visual_tokens_per_layer
    assert out.visual_tokens_per_layer[0] < 16
    options = dict(max_new_tokens=6, eos_token_id=[])
    cached = model.generate(ids, mask, pixels, fast=False, **options)
    assert torch.equal(cached, model.generate(ids, mask, pixels, use_cache=False, **options))
    assert torch.equal(cached, model.generate(ids, mask, pixels, fast=True, **options))
    for row, images in enumerate([[], [0], [1, 2]]):
        keep = mask[row].bool()
        single = model.generate(ids[row : row + 1, keep], None, pixels[images] if images else None, **options)
        assert torch.equal(single[0], cached[row])
    with pytest.raises(CompressionConfigError, match="not combined"):
        CompressionConfig("x", dymu=DyMUConfig((0.2, 0.2), vtu=True), t2v=T2VConfig((0.5,), (0.5,)))


# ---------------------------------------------------------------- accounting, FLOP model, benchmarks


def test_flop_model_counts_what_vtu_saves_and_benchmarks_take_dymu_presets(tmp_path):
    from llava.bench import flops, infer_speed
    from llava.compression.accounting import initial_visual_tokens

    plain = CompressionConfig("plain", dymu=DyMUConfig((0.9,) * 23))
    vtu = CompressionConfig("vtu", dymu=DyMUConfig((0.9,) * 23, vtu=True))
    with pytest.raises(ValueError, match="calibrate_dymu --measure"):
        initial_visual_tokens(plain, 576)
    none = flops.prefill_flops("llava-7b", None, 1)
    packed = flops.prefill_flops("llava-7b", plain, 1, dymu_tokens=88)
    unmerged = flops.prefill_flops("llava-7b", vtu, 1, dymu_tokens=88)
    # VTU: the same linear-layer savings, attention still over every patch position.
    assert packed.total < unmerged.total < none.total
    shape = flops.get_shape("llava-7b")
    text = shape.text_tokens - shape.answer_tokens  # the prefill's prompt
    extra_attention = 2.0 * shape.llm.hidden * ((text + 576) ** 2 - (text + 88) ** 2)
    assert unmerged.forward["llm_layer_0"] - packed.forward["llm_layer_0"] == pytest.approx(extra_attention)

    thresholds = tmp_path / "tiny.json"
    thresholds.write_text(json.dumps({"thresholds": [0.2]}))  # the tiny shape's tower runs 1 layer
    preset = tmp_path / "dymu_tiny.yaml"
    preset.write_text(f"name: dymu_tiny\ndymu: {{thresholds_file: {thresholds}}}\n")
    rows = infer_speed.main(
        ["--shape", "tiny", "--presets", f"none,{preset}", "--batch-sizes", "2", "--prompt-tokens", "8",
         "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--decode-paths", "eager", "--device", "cpu",
         "--threads", "1", "--out", str(tmp_path / "infer.json")]
    )  # fmt: skip
    dymu_row = rows[1]
    assert dymu_row["preset"] == "dymu_tiny"
    assert 1 <= dymu_row["initial_visual_tokens"] < 16 and dymu_row["flops_ratio_vs_none"] < 1.0


def test_videos_merge_frame_by_frame_and_generate_like_recomputation():
    from tests.test_video_model import FRAMES, VID, video_model

    for vtu in (False, True):
        model = video_model(CompressionConfig("dymu_video", dymu=DyMUConfig((0.3, 0.3), vtu=vtu)).to_dict(), seed=3)
        torch.manual_seed(4)
        ids = torch.tensor([[0, 0, 1, VID, 5, 6, 7], [1, VID, 8, IMG, 9, 10, 11]])
        videos = torch.randn(2, FRAMES, 3, 56, 56)
        parts = model.encode_videos(videos)
        frame_counts = model.video_tower.encode_dynamic(videos.flatten(0, 1)).counts.view(2, FRAMES)
        unique = frame_counts.sum(dim=1).tolist()
        assert (parts.unique_counts if vtu else parts.host_counts) == unique
        kwargs = dict(attention_mask=(ids != 0).long(), pixel_values=torch.randn(1, 3, 56, 56),
                      pixel_values_videos=videos, max_new_tokens=5, eos_token_id=[])  # fmt: skip
        cached = model.generate(ids, fast=False, **kwargs)
        assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))
        assert torch.equal(cached, model.generate(ids, fast=True, **kwargs))
