"""FLOP model: hand-computed small cases, backward rules per stage, compression effects, shapes, CLI.

The expected numbers are written out as arithmetic here (2 FLOPs per multiply-add), not computed by the code
under test. The unit shape: tower of 1 layer (width 8, MLP 16, 2 heads, 4x4 image, patch 2 -> P = 4 patches,
T = 5 tokens, feature layer -1 -> 1 layer run); LLM of 1 layer (width 12, MLP 20, 3 heads of 4, 1 KV head ->
k/v width 4, vocab 10); finetune text 6 tokens (2 answer), pretrain text 3 tokens.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llava.bench.flops import main, predicted_step_ratio, prefill_flops, training_step_flops
from llava.bench.shapes import SHAPES, LLMShape, ModelShape, VisionShape, build_model, get_shape
from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID

UNIT = ModelShape(
    name="unit",
    vision=VisionShape(num_layers=1, hidden=8, intermediate=16, heads=2, image_size=4, patch_size=2, feature_layer=-1),
    llm=LLMShape(num_layers=1, hidden=12, intermediate=20, heads=3, kv_heads=1, vocab=10),
    text_tokens=6,
    answer_tokens=2,
    pretrain_text_tokens=3,
)
UNIT2 = dataclasses.replace(UNIT, llm=dataclasses.replace(UNIT.llm, num_layers=2))

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
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
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
