"""FLOP model: hand-computed small cases, backward rules per stage, compression effects, shapes, CLI.

The expected numbers are written out as arithmetic here (2 FLOPs per multiply-add), not computed by the code
under test. The unit shape: tower of 1 layer (width 8, MLP 16, 2 heads, 4x4 image, patch 2 -> P = 4 patches,
T = 5 tokens, feature layer -1 -> 1 layer run); LLM of 1 layer (width 12, MLP 20, 3 heads of 4, 1 KV head ->
k/v width 4, vocab 10); finetune text 6 tokens (2 answer), pretrain text 3 tokens. The unit video shape adds
a video tower of the same dimensions and 3 frames per video: 4 patches + CLS = 5 tokens per frame, 15 per video.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llava.bench.flops import main, predicted_step_ratio, prefill_flops, training_step_flops
from llava.bench.shapes import SHAPES, VIDEO_PRESETS, LLMShape, ModelShape, VisionShape, build_model, get_shape
from llava.compression.config import CompressionConfig, DyMUConfig, T2VConfig, V2VConfig, load_compression
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.hf_adapter import attn_implementation_of

UNIT = ModelShape(
    name="unit",
    vision=VisionShape(num_layers=1, hidden=8, intermediate=16, heads=2, image_size=4, patch_size=2, feature_layer=-1),
    llm=LLMShape(num_layers=1, hidden=12, intermediate=20, heads=3, kv_heads=1, vocab=10),
    text_tokens=6,
    answer_tokens=2,
    pretrain_text_tokens=3,
)
UNIT2 = dataclasses.replace(UNIT, llm=dataclasses.replace(UNIT.llm, num_layers=2))
VIDEO = dataclasses.replace(UNIT, name="unit-video", video=UNIT.vision, num_frames=3)
VIDEO2 = dataclasses.replace(VIDEO, llm=UNIT2.llm)

# Tower: patch embedding (3*2*2 = 12 -> 8 on 4 patches) + one layer on T = 5 tokens.
TOWER = 2 * 4 * 12 * 8 + (4 * (2 * 5 * 8 * 8) + 2 * 5 * 8 * 16 + 2 * 5 * 16 * 8 + 2 * (2 * 5 * 5 * 8))
# LLM linears per token: q, o 12x12; k, v 12x4; gate, up 12x20; down 20x12.
LINEAR_PER_TOKEN = 2 * (12 * 12 + 12 * 4 + 12 * 4 + 12 * 12 + 12 * 20 + 12 * 20 + 20 * 12)


def llm_layer(tokens: int) -> tuple[int, int]:
    """(linears, causal attention) of one unit decoder layer on ``tokens`` tokens, written out."""
    return LINEAR_PER_TOKEN * tokens, 2 * tokens * tokens * 12


def test_shape_properties_and_lookup():
    assert UNIT.vision.num_patches == 4 and UNIT.vision.layers_run == 1
    clip = get_shape("llava-7b").vision
    assert clip.num_patches == 576 and clip.layers_run == 23
    assert get_shape("small").vision.num_patches == 576 and get_shape("small").vision.layers_run == 3
    assert get_shape(UNIT) is UNIT
    with pytest.raises(ValueError, match="llava-13b"):
        get_shape("llava-70b")


def test_none_finetune_forward_per_component():
    flops = training_step_flops(UNIT, "none", "finetune", batch_size=1, gradient_checkpointing=False)
    assert LINEAR_PER_TOKEN == 2208
    assert flops.forward["tower"] == TOWER == 6688
    assert flops.forward["v2v_scoring"] == 0
    assert flops.forward["projector"] == 2 * 4 * 8 * 12 + 2 * 4 * 12 * 12  # mlp2x_gelu on 4 patches
    # n = 6 text + 4 visual = 10: linears 2208 * 10, causal attention 2 * 10^2 * 12.
    assert flops.forward["llm_layer_0"] == 22080 + 2400
    assert flops.forward["t2v_scoring"] == 0
    assert flops.forward["lm_head"] == 2 * 2 * 12 * 10  # 2 supervised answer tokens only
    assert flops.forward["recompute"] == 0
    assert flops.total_forward == 6688 + 1920 + 24480 + 480
    assert flops.backward["tower"] == 0
    assert list(flops.forward) == list(flops.backward)


def test_backward_rules_finetune_pretrain_lora():
    projector_first, projector_second = 2 * 4 * 8 * 12, 2 * 4 * 12 * 12
    # finetune: projector first linear weight-grad only (1x), second 2x; LLM linears 2x, attention 2x; head 2x.
    ft = training_step_flops(UNIT, None, "finetune", 1, gradient_checkpointing=False)
    assert ft.backward["projector"] == projector_first + 2 * projector_second
    assert ft.backward["llm_layer_0"] == 2 * 22080 + 2 * 2400
    assert ft.backward["lm_head"] == 2 * (2 * 2 * 12 * 10)
    assert ft.backward["tower"] == ft.backward["v2v_scoring"] == 0

    # pretrain: n = 3 text + 4 visual = 7; LLM frozen, back-propagated: linears 1x, attention 2x;
    # lm_head on the caption (3 - BOS = 2 tokens), frozen: 1x.
    pt = training_step_flops(UNIT, None, "pretrain", 1, gradient_checkpointing=False)
    assert pt.forward["llm_layer_0"] == 2208 * 7 + 2 * 7 * 7 * 12
    assert pt.backward["llm_layer_0"] == 2208 * 7 + 2 * (2 * 7 * 7 * 12)
    assert pt.backward["projector"] == projector_first + 2 * projector_second
    assert pt.forward["lm_head"] == pt.backward["lm_head"] == 2 * 2 * 12 * 10

    # lora r = 2 on n = 10: adapters 2 * n * r * (d_in + d_out) per target, trained (2x); base 1x; head 1x.
    lora_forward = 2 * 10 * 2 * ((12 + 12) + (12 + 4) + (12 + 4) + (12 + 12) + (12 + 20) + (12 + 20) + (20 + 12))
    assert lora_forward == 7040
    lo = training_step_flops(UNIT, None, "lora", 1, gradient_checkpointing=False, lora_r=2)
    assert lo.forward["llm_layer_0"] == 22080 + 2400 + 7040
    assert lo.backward["llm_layer_0"] == 22080 + 2 * 7040 + 2 * 2400
    assert lo.backward["lm_head"] == 2 * 2 * 12 * 10
    assert lo.backward["projector"] == ft.backward["projector"]


def test_gradient_checkpointing_adds_one_llm_forward():
    for stage in ("pretrain", "finetune", "lora"):
        with_gc = training_step_flops(UNIT2, "none", stage, 2, gradient_checkpointing=True)
        without = training_step_flops(UNIT2, "none", stage, 2, gradient_checkpointing=False)
        layers = with_gc.forward["llm_layer_0"] + with_gc.forward["llm_layer_1"]
        assert with_gc.backward["recompute"] == layers
        assert with_gc.total - without.total == layers
        assert with_gc.total_forward == without.total_forward


def test_t2v_drop_halves_later_layer_token_terms_and_scores():
    t2v = CompressionConfig("half", t2v=T2VConfig(boundaries=(0.5,), keep_ratios=(0.5,), query="last"))
    flops = training_step_flops(UNIT2, t2v, "finetune", 1, gradient_checkpointing=False)
    assert flops.visual_tokens_per_layer == [4, 2]
    linear0, attention0 = 2208 * (6 + 4), 2 * 10 * 10 * 12
    linear1, attention1 = 2208 * (6 + 2), 2 * 8 * 8 * 12
    assert flops.forward["llm_layer_0"] == linear0 + attention0
    assert flops.forward["llm_layer_1"] == linear1 + attention1
    # The visual tokens' share of the linears halves: 2208 * 4 -> 2208 * 2.
    visual0 = flops.forward["llm_layer_0"] - attention0 - 2208 * 6
    visual1 = flops.forward["llm_layer_1"] - attention1 - 2208 * 6
    assert visual0 == 2208 * 4 and visual1 == 2208 * 2 == visual0 / 2
    # Scoring at layer 1 (10 tokens enter), query "last": q on 1 row, k on 10 rows (k width 4), 1 x 10 scores.
    assert flops.forward["t2v_scoring"] == 2 * 1 * 12 * 12 + 2 * 10 * 12 * 4 + 2 * 1 * 10 * 12
    assert flops.backward["t2v_scoring"] == 0
    # Instruction queries: 6 - 2 answer = 4 rows.
    instruction = dataclasses.replace(t2v, t2v=dataclasses.replace(t2v.t2v, query="instruction"))
    flops = training_step_flops(UNIT2, instruction, "finetune", 1)
    assert flops.forward["t2v_scoring"] == 2 * 4 * 12 * 12 + 2 * 10 * 12 * 4 + 2 * 4 * 10 * 12
    # plain pretraining has no instruction tokens: the last prompt token scores (3 + 4 = 7 tokens enter).
    flops = training_step_flops(UNIT2, instruction, "pretrain", 1)
    assert flops.forward["t2v_scoring"] == 2 * 1 * 12 * 12 + 2 * 7 * 12 * 4 + 2 * 1 * 7 * 12
    # A boundary at the last layer (1.0 of 2 layers -> layer 2) is not applied: still one scoring.
    late = CompressionConfig("late", t2v=T2VConfig(boundaries=(0.5, 1.0), keep_ratios=(0.5, 0.0), query="last"))
    flops = training_step_flops(UNIT2, late, "finetune", 1)
    assert flops.forward["t2v_scoring"] == 2 * 1 * 12 * 12 + 2 * 10 * 12 * 4 + 2 * 1 * 10 * 12


def test_v2v_shrinks_projector_and_llm_not_tower():
    duet = CompressionConfig("v", v2v=V2VConfig("duet", dominant=2, contextual=1, cluster_width=2))
    flops = training_step_flops(UNIT, duet, "finetune", 1, gradient_checkpointing=False)
    assert flops.forward["tower"] == TOWER
    # k on 5 rows, q on the CLS row, 5 scores; pool min(2 * 1, 4 - 1) = 2 -> 1 anchor, 1 member, head_dim 4.
    assert flops.forward["v2v_scoring"] == 2 * 5 * 8 * 8 + 2 * 1 * 8 * 8 + 2 * 5 * 8 + 2 * 1 * 1 * 4
    assert flops.backward["v2v_scoring"] == 0
    assert flops.forward["projector"] == 2 * 3 * 8 * 12 + 2 * 3 * 12 * 12  # k1 + k2 = 3 tokens
    assert flops.forward["llm_layer_0"] == 2208 * 9 + 2 * 9 * 9 * 12
    # VisionZip merges every remaining patch: 3 remaining -> 1 anchor, 2 members.
    zip_config = CompressionConfig("z", v2v=V2VConfig("visionzip", dominant=2, contextual=1))
    flops = training_step_flops(UNIT, zip_config, "finetune", 1)
    assert flops.forward["v2v_scoring"] == 640 + 128 + 80 + 2 * 2 * 1 * 4


def test_lm_head_counts_only_supervised_tokens_and_batch_scales():
    longer_prompt = dataclasses.replace(UNIT, text_tokens=50)
    base = training_step_flops(UNIT, None, "finetune", 1)
    assert training_step_flops(longer_prompt, None, "finetune", 1).forward["lm_head"] == base.forward["lm_head"]
    more_answer = dataclasses.replace(UNIT, answer_tokens=5)
    assert training_step_flops(more_answer, None, "finetune", 1).forward["lm_head"] == 2 * 5 * 12 * 10
    tripled = training_step_flops(UNIT, None, "finetune", 3)
    assert tripled.total == 3 * base.total
    assert tripled.forward["lm_head"] == 3 * 2 * 2 * 12 * 10


def test_prefill_forward_only_last_token_logits():
    flops = prefill_flops(UNIT, None, batch_size=2)
    # prompt = 6 - 2 = 4 text tokens + 4 visual = 8; logits for 1 token per sample.
    assert flops.forward["llm_layer_0"] == 2 * (2208 * 8 + 2 * 8 * 8 * 12)
    assert flops.forward["lm_head"] == 2 * (2 * 1 * 12 * 10)
    assert flops.total_backward == 0
    assert prefill_flops(UNIT, None, 1, prompt_tokens=6).forward["llm_layer_0"] == 22080 + 2400


def test_predicted_ratios_llava_7b_finetune():
    assert predicted_step_ratio("llava-7b", "none", "finetune", 16) == 1.0
    ratios = [predicted_step_ratio("llava-7b", name, "finetune", 16) for name in ("duet_64", "duet_128", "duet_192")]
    assert ratios[0] < ratios[1] < ratios[2] < 1.0
    # Ratios do not depend on the batch size (no padding, no fixed costs).
    assert math.isclose(predicted_step_ratio("llava-7b", "duet_128", "finetune", 1), ratios[1])
    flops = training_step_flops("llava-7b", "none", "finetune", 1)
    # About 7e9 parameters * 676 tokens * 2 FLOPs, times 4 (forward, 2x backward, recompute).
    assert 30e12 < flops.total < 40e12
    assert flops.llm_share > 0.95


def test_unknown_stage_rejected():
    with pytest.raises(ValueError, match="finetune"):
        training_step_flops(UNIT, None, "sft", 1)


def test_flop_formulas_match_built_tiny_model():
    shape = SHAPES["tiny"]
    model = build_model(shape)
    tokens = shape.text_tokens + shape.vision.num_patches
    flops = training_step_flops(shape, None, "finetune", 1)
    layer = model.language_model.model.layers[0]
    weights = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert flops.forward["llm_layer_0"] == 2 * tokens * weights + 2 * tokens * tokens * shape.llm.hidden
    clip = model.vision_tower.vision_model
    clip_weights = sum(m.weight.numel() for m in clip.encoder.layers[0].modules() if isinstance(m, torch.nn.Linear))
    patches, width = shape.vision.num_patches, shape.vision.hidden
    expected_tower = 2 * patches * clip.embeddings.patch_embedding.weight.numel()
    expected_tower += model.vision_tower.num_layers * (
        2 * (patches + 1) * clip_weights + 4 * (patches + 1) ** 2 * width
    )
    assert flops.forward["tower"] == expected_tower
    assert flops.forward["lm_head"] == 2 * shape.answer_tokens * model.get_output_embeddings().weight.numel()


@pytest.mark.parametrize(
    "compression",
    [None, CompressionConfig("tiny_duet", V2VConfig("duet", 6, 2), T2VConfig((0.5,), (0.5,), query="last"))],
)
def test_build_model_tiny_runs_forward(compression):
    torch.manual_seed(0)
    shape = get_shape("tiny")
    model = build_model(shape, compression=compression)
    assert attn_implementation_of(model.config.text_config) == "sdpa"
    assert attn_implementation_of(model.config.vision_config) == "sdpa"
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_ID, 7, 8, 9, 10]])
    labels = torch.tensor([[IGNORE_INDEX] * 5 + [9, 10]])
    pixels = torch.randn(1, 3, shape.vision.image_size, shape.vision.image_size)
    out = model(ids, pixel_values=pixels, labels=labels)
    assert torch.isfinite(out.loss)
    predicted = training_step_flops(shape, compression, "finetune", 1).visual_tokens_per_layer
    assert out.visual_tokens_per_layer == [float(count) for count in predicted]


def test_build_model_dtype():
    model = build_model("tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32


def test_cli_prints_table(capsys):
    assert main(["--shape", "llava-7b", "--stage", "finetune", "--presets", "none,duet_128", "--batch-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "duet_128" in text and "1.000" in text and "batch 4" in text
    assert main(["--shape", "tiny", "--stage", "prefill", "--presets", "none", "--breakdown"]) == 0
    assert "lm_head" in capsys.readouterr().out


# ----- video shapes -----
# mlp2x_gelu projector per token: 8 -> 12 then 12 -> 12; backward: first linear 1x (weight grad), second 2x.
PROJECTOR_PER_TOKEN = 2 * 8 * 12 + 2 * 12 * 12
PROJECTOR_BACKWARD_PER_TOKEN = 2 * 8 * 12 + 2 * (2 * 12 * 12)


def test_video_shape_counts_frames_times_tokens_with_cls():
    assert VIDEO.is_video and VIDEO.tokens_per_frame == 4 + 1 and VIDEO.uncompressed_visual_tokens == 15
    assert not UNIT.is_video and UNIT.uncompressed_visual_tokens == 4 and UNIT.frames_per_sample == 1
    assert VIDEO.visual_tokens_per_layer(CompressionConfig()) == [15]
    real = get_shape("video-llava-7b")
    assert real.tokens_per_frame == 257 and real.uncompressed_visual_tokens == 8 * 257 == 2056
    assert real.video.layers_run == 23 and real.vision.image_size == real.video.image_size == 224
    n0 = {name: real.initial_visual_tokens(load_compression(name)) for name in VIDEO_PRESETS}
    assert n0 == {"none": 2056, "duet_video_53": 8 * (160 + 32), "duet_video_93": 8 * (22 + 5)}
    assert get_shape("small-video").uncompressed_visual_tokens == 2056
    with pytest.raises(ValueError, match="num_frames > 0 and a video tower"):
        dataclasses.replace(UNIT, num_frames=2)
    with pytest.raises(ValueError, match="widths"):
        dataclasses.replace(VIDEO, video=dataclasses.replace(UNIT.vision, hidden=16))


def test_video_finetune_forward_per_component():
    flops = training_step_flops(VIDEO, None, "finetune", batch_size=1, gradient_checkpointing=False)
    assert flops.visual_tokens_per_layer == [15]
    assert flops.forward["tower"] == 3 * TOWER  # the tower runs once per frame
    assert flops.forward["projector"] == 15 * PROJECTOR_PER_TOKEN  # CLS kept: 5 tokens per frame
    assert flops.backward["projector"] == 15 * PROJECTOR_BACKWARD_PER_TOKEN
    # n = 6 text + 15 visual = 21.
    assert flops.forward["llm_layer_0"] == 2208 * 21 + 2 * 21 * 21 * 12
    assert flops.backward["llm_layer_0"] == 2 * (2208 * 21 + 2 * 21 * 21 * 12)
    # Idle image pass of a video-only training batch: one image (4 patches, CLS dropped) once per step.
    assert flops.forward["idle_image"] == TOWER + 4 * PROJECTOR_PER_TOKEN
    assert flops.backward["idle_image"] == 4 * PROJECTOR_BACKWARD_PER_TOKEN
    assert list(flops.forward) == list(flops.backward)
    tripled = training_step_flops(VIDEO, None, "finetune", batch_size=3, gradient_checkpointing=False)
    assert tripled.forward["tower"] == 3 * flops.forward["tower"]
    assert tripled.forward["idle_image"] == flops.forward["idle_image"]  # per step, not per sample
    assert tripled.total == 3 * flops.total - 2 * flops.component("idle_image")
    # Prefill: no idle pass, a frame-count-proportional tower.
    prefill = prefill_flops(VIDEO, None, 1)
    assert "idle_image" not in prefill.forward and prefill.forward["tower"] == 3 * TOWER


def test_video_tower_flops_scale_with_frames():
    six = dataclasses.replace(VIDEO, num_frames=6)
    duet = CompressionConfig("v", v2v=V2VConfig("duet", dominant=2, contextual=1, cluster_width=2))
    for config in (None, duet):
        three_frames = training_step_flops(VIDEO, config, "finetune", 1)
        six_frames = training_step_flops(six, config, "finetune", 1)
        assert six_frames.forward["tower"] == 2 * three_frames.forward["tower"]
        assert six_frames.forward["v2v_scoring"] == 2 * three_frames.forward["v2v_scoring"]
        assert six_frames.forward["projector"] == 2 * three_frames.forward["projector"]
    real = training_step_flops("video-llava-7b", None, "finetune", 1)
    tokens, width = 257, 1024
    per_frame = 2 * 256 * (3 * 14 * 14) * width + 23 * (
        2 * tokens * (4 * width * width + 2 * width * 4096) + 4 * tokens * tokens * width
    )
    assert real.forward["tower"] == 8 * per_frame


def test_video_v2v_per_frame_and_t2v_over_all_frames():
    # V2V (k1 2 + k2 1) per frame: N0 = 3 frames x 3 = 9. T2V keeps floor(0.5 * 9) = 4 of the whole video,
    # not 3 x floor(0.5 * 3) = 3 frame by frame.
    config = CompressionConfig(
        "vt",
        v2v=V2VConfig("duet", dominant=2, contextual=1, cluster_width=2),
        t2v=T2VConfig(boundaries=(0.5,), keep_ratios=(0.5,), query="last"),
    )
    flops = training_step_flops(VIDEO2, config, "finetune", 1, gradient_checkpointing=False)
    assert flops.visual_tokens_per_layer == [9, 4]
    # Per frame: k on 5 rows, q on CLS, 5 scores, 1 member x 1 anchor cosine (head_dim 4) -> 856; 3 frames.
    assert flops.forward["v2v_scoring"] == 3 * (2 * 5 * 8 * 8 + 2 * 1 * 8 * 8 + 2 * 5 * 8 + 2 * 1 * 1 * 4)
    assert flops.forward["projector"] == 9 * PROJECTOR_PER_TOKEN
    assert flops.forward["llm_layer_0"] == 2208 * 15 + 2 * 15 * 15 * 12
    assert flops.forward["llm_layer_1"] == 2208 * 10 + 2 * 10 * 10 * 12
    # Scoring at layer 1 over the 6 + 9 = 15 tokens entering it (query "last": 1 row).
    assert flops.forward["t2v_scoring"] == 2 * 1 * 12 * 12 + 2 * 15 * 12 * 4 + 2 * 1 * 15 * 12
    # The idle image is merged by V2V too: tower + scoring (856) + projector on k1 + k2 = 3 tokens.
    assert flops.forward["idle_image"] == TOWER + 856 + 3 * PROJECTOR_PER_TOKEN


def test_predicted_ratios_video_llava_7b():
    for stage in ("finetune", "pretrain"):
        ratios = [predicted_step_ratio("video-llava-7b", name, stage, 4) for name in VIDEO_PRESETS]
        assert ratios[0] == 1.0 and 0.0 < ratios[2] < ratios[1] < 0.6
    flops = training_step_flops("video-llava-7b", "none", "finetune", 1)
    # About 6.7e9 LLM parameters * 2176 tokens * 2 FLOPs, times 4 (forward, 2x backward, recompute).
    assert 100e12 < flops.total < 130e12
    assert flops.llm_share > 0.95
    assert flops.visual_tokens_per_layer == [2056] * 32
    assert training_step_flops("video-llava-7b", "duet_video_93", "finetune", 1).visual_tokens_per_layer == (
        [216] * 16 + [108] * 8 + [0] * 8
    )
    with pytest.raises(ValueError, match="256 patches"):  # an image budget does not fit a 224 px frame
        training_step_flops("video-llava-7b", "duet_192", "finetune", 1)


TINY_VIDEO_DUET = CompressionConfig("tv", V2VConfig("duet", 6, 2), T2VConfig((0.5,), (0.5,)))


@pytest.mark.parametrize("compression", [None, TINY_VIDEO_DUET])
def test_build_model_tiny_video_matches_the_flop_model(compression):
    torch.manual_seed(0)
    shape = get_shape("tiny-video")
    model = build_model(shape, compression=compression)
    assert model.video_tower is not None and model.vision_tower is not None
    assert model.config.num_frames == shape.num_frames == 2
    assert model.config.tokens_per_frame == shape.tokens_per_frame == 17
    assert attn_implementation_of(model.config.video_config) == "sdpa"
    ids = torch.tensor([[1, 5, VIDEO_TOKEN_ID, 7, 8, 9, 10]])
    labels = torch.tensor([[IGNORE_INDEX] * 5 + [9, 10]])
    videos = torch.randn(1, shape.num_frames, 3, shape.video.image_size, shape.video.image_size)
    out = model(ids, pixel_values_videos=videos, labels=labels)
    assert torch.isfinite(out.loss)
    predicted = training_step_flops(shape, compression, "finetune", 1).visual_tokens_per_layer
    assert out.visual_tokens_per_layer == [float(count) for count in predicted]
    assert predicted[0] == model.config.llm_tokens_per_video


def test_cli_video_shape_defaults_to_video_presets(capsys):
    assert main(["--shape", "video-llava-7b", "--stage", "finetune"]) == 0
    text = capsys.readouterr().out
    assert "duet_video_53" in text and "duet_video_93" in text and "8 frames x 257 tokens" in text
    assert "2056" in text
    with pytest.raises(SystemExit):
        main(["--shape", "video-llava-7b", "--presets", "none,duet_192"])  # 307 > 257 tokens


def test_dymu_with_t2v_takes_a_measured_mean_token_count():
    """DyMU's tokens per image are a measured mean (a float); the T2V boundaries still apply."""
    config = CompressionConfig("x", dymu=DyMUConfig((0.5,) * 23), t2v=T2VConfig((0.5,), (0.5,)))
    fractional = prefill_flops("llava-7b", config, 1, dymu_tokens=195.3)
    assert fractional.forward["t2v_scoring"] > 0
    assert fractional.total == pytest.approx(prefill_flops("llava-7b", config, 1, dymu_tokens=195).total, rel=1e-3)


def test_a_selection_at_the_llm_input_is_costed_on_the_tokens_entering():
    """CDPruner (``selector: dpp`` at boundary 0.0) runs after the projector: the projector sees all 576 patches,
    the DPP costs its 576 x 576 kernel, and every layer sees the kept 64."""
    from llava.bench.flops import training_step_flops

    dpp = training_step_flops("llava-7b", "cdpruner_64", "finetune", 1)
    none = training_step_flops("llava-7b", None, "finetune", 1)
    zip64 = training_step_flops("llava-7b", "visionzip_64", "finetune", 1)
    assert dpp.visual_tokens_per_layer == [64] * 32
    assert dpp.forward["projector"] == none.forward["projector"] > zip64.forward["projector"]
    hidden = 4096
    assert dpp.forward["t2v_scoring"] >= 2.0 * 576 * 576 * hidden
    assert dpp.forward["llm_layer_0"] == zip64.forward["llm_layer_0"]
