"""AnyRes benchmarks: the anyres_* presets' stated accounting, the FLOP model of the AnyRes shapes (a mix of image
sizes, per image), their random models and batches (model-reported visual tokens == the accounting), and the
training-speed benchmark on a tiny AnyRes shape."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

import pytest
import torch

from llava.bench.anyres import (
    NEXT_GEOMETRY,
    ONEVISION_GEOMETRY,
    AnyResGeometry,
    MixImage,
    anyres_counts,
    mix_accounting,
)
from llava.bench.flops import main as flops_main
from llava.bench.flops import predicted_step_ratio, prefill_flops, training_step_flops
from llava.bench.shapes import ANYRES_PRESETS, SHAPES, LLMShape, ModelShape, VisionShape, build_model, default_presets
from llava.bench.workload import anyres_image_token_id, build_training_batch
from llava.compression.accounting import anyres_initial_visual_tokens, anyres_visual_tokens_per_layer
from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig, available_presets, load_compression

TOLERANCE = 0.005
"""Every anyres_* preset's layer average is within this of its named fraction of N0 (absolute)."""
THIRD, NINTH = 1 / 3, 1 / 9

# (preset, geometry, LLM layers, the layer-average fraction its YAML header states, the named fraction)
STATED = [
    ("anyres_duet_third", NEXT_GEOMETRY, 32, 0.3346, THIRD),
    ("anyres_duet_third", ONEVISION_GEOMETRY, 28, 0.3347, THIRD),  # V2V per view group (base view, packed grid)
    ("anyres_duet_ninth", NEXT_GEOMETRY, 32, 0.1130, NINTH),
    ("anyres_duet_ninth", ONEVISION_GEOMETRY, 28, 0.1127, NINTH),
    ("anyres_visionzip_third", NEXT_GEOMETRY, 32, 0.3332, THIRD),
    ("anyres_visionzip_third", ONEVISION_GEOMETRY, 28, 0.3336, THIRD),
    ("anyres_pdrop_third", NEXT_GEOMETRY, 32, 0.3334, THIRD),
    ("anyres_pdrop_third", ONEVISION_GEOMETRY, 28, 0.3334, THIRD),
    ("anyres_pdrop_ninth", NEXT_GEOMETRY, 32, 0.1070, NINTH),
    ("anyres_pdrop_ninth", ONEVISION_GEOMETRY, 28, 0.1144, NINTH),
]


@pytest.mark.parametrize(("preset", "geometry", "layers", "stated", "named"), STATED)
def test_presets_load_and_average_their_stated_fraction(preset, geometry, layers, stated, named):
    config = load_compression(preset)
    assert config.name == preset
    if config.t2v is not None:
        assert config.t2v.query == "instruction"  # LLaVA-NeXT supports last and instruction only
    uncompressed, _, average = mix_accounting(config, geometry, layers)
    assert average / uncompressed == pytest.approx(stated, abs=5e-5)
    assert abs(average / uncompressed - named) <= TOLERANCE


def test_anyres_accounting_per_view():
    """V2V keeps the floored fractions of each view's tokens (a view without tokens keeps none) plus every
    newline token; T2V keeps floor(ratio * N0) of that."""
    config = CompressionConfig("x", V2VConfig("duet", 0.25, 0.1), T2VConfig((0.5,), (0.5,), "instruction"))
    views = (576, 432, 0, 100)
    assert anyres_initial_visual_tokens(config, views, 18) == (144 + 57) + (108 + 43) + 0 + (25 + 10) + 18
    n0 = 405
    assert anyres_visual_tokens_per_layer(config, 4, views, 18) == [n0, n0, n0 // 2, n0 // 2]
    assert anyres_initial_visual_tokens(CompressionConfig(), views, 18) == sum(views) + 18
    with pytest.raises(ValueError, match="fractions"):
        anyres_initial_visual_tokens(load_compression("duet_64"), views, 18)


def test_mix_flops_are_the_weighted_mean_of_per_image_flops():
    shape = SHAPES["llava-next-7b"]
    for preset in ("none", "anyres_duet_third", "anyres_pdrop_ninth"):
        mixed = training_step_flops(shape, preset, "finetune", 2)
        parts = [(share, training_step_flops(image, preset, "finetune", 2)) for share, image in shape.mix_images()]
        assert mixed.total == pytest.approx(sum(share * part.total for share, part in parts), rel=1e-12)
        assert mixed.visual_tokens_per_layer[0] == pytest.approx(shape.initial_visual_tokens(load_compression(preset)))


def test_anyres_image_costs_its_views_in_the_tower_and_its_tokens_in_the_llm():
    """One 640x480 image on LLaVA-NeXT: 5 views through CLIP-L/336 (each as LLaVA-1.5's one image), the projector
    on the 5 full 576-token grids, the LLM on base + unpadded tiles + newlines = 2340 tokens."""
    (share, image), *_ = SHAPES["llava-next-7b"].mix_images()
    assert image.image == MixImage(640, 480, 0.35) and share == pytest.approx(0.35)
    flops = training_step_flops(image, None, "finetune", 1)
    single = training_step_flops("llava-7b", None, "finetune", 1)
    assert flops.forward["tower"] == pytest.approx(5 * single.forward["tower"])
    assert flops.component("projector") == pytest.approx(5 * single.component("projector"))
    assert flops.visual_tokens_per_layer == [2340.0] * 32


def test_siglip_tower_has_no_cls_token():
    """OneVision's tower runs 729 tokens per view: patch embedding plus 26 layers (feature layer -1)."""
    shape = SHAPES["llava-onevision-7b"]
    image = dataclasses.replace(shape, image=MixImage(336, 336, 1.0))  # grid 1 x 1: base view + 1 tile
    assert image.anyres_counts.views == 2
    d, inner, tokens = 1152, 4304, 729
    layer = 4 * 2 * tokens * d * d + 2 * 2 * tokens * d * inner + 2 * 2 * tokens * tokens * d
    tower = 2 * tokens * 3 * 14 * 14 * d + 26 * layer
    assert training_step_flops(image, None, "finetune", 1).forward["tower"] == pytest.approx(2 * tower)


def test_onevision_accounts_v2v_per_view_group_and_defaults_to_every_anyres_preset():
    """LLaVA-OneVision's shapes take the V2V presets (selection after packing, per view group); a tower without
    CLS whose V2V is per view (no such family) is still refused."""
    assert default_presets("llava-onevision-7b") == default_presets("llava-next-7b") == list(ANYRES_PRESETS)
    assert default_presets("small-anyres-onevision") == list(ANYRES_PRESETS)
    shape = SHAPES["llava-onevision-7b"]
    config = load_compression("anyres_duet_third")
    expected = sum(
        share * (sum(sum(config.v2v.budget(n)) for n in (729, image.anyres_counts.grid_tokens)))
        + share * image.anyres_counts.newline_tokens
        for share, image in shape.mix_images()
    )
    assert shape.initial_visual_tokens(config) == pytest.approx(expected)
    per_view = replace(shape, anyres=replace(ONEVISION_GEOMETRY, v2v_per_group=False))
    with pytest.raises(ValueError, match="no CLS"):
        training_step_flops(per_view, "anyres_duet_third", "finetune", 1)
    assert default_presets(per_view) == ["none", "anyres_pdrop_third", "anyres_pdrop_ninth"]


def test_onevision_v2v_costs_received_attention_per_view_and_a_merge_per_group():
    """One 336x336 image on LLaVA-OneVision (base view + a 1 x 1 grid, groups of 729 and 729): the projector
    still runs on both full views (it projects before packing); scoring is q_proj + k_proj on 729 patches and
    the 729 x 729 logits per view, plus DUET's cosine assignment per group; the LLM gets each group's budget
    plus the 27 newline tokens."""
    image = dataclasses.replace(SHAPES["llava-onevision-7b"], image=MixImage(336, 336, 1.0))
    config = load_compression("anyres_duet_third")
    none = training_step_flops(image, None, "finetune", 1)
    duet = training_step_flops(image, config, "finetune", 1)
    assert duet.component("projector") == pytest.approx(none.component("projector"))
    assert duet.forward["tower"] == pytest.approx(none.forward["tower"])
    d, patches, head_dim = 1152, 729, 1152 // 16
    dominant, contextual = config.v2v.budget(patches)
    pool = min(4 * contextual, patches - dominant)
    merge = 2 * (pool - contextual) * contextual * head_dim
    scoring = 2 * (2 * 2 * patches * d * d + 2 * patches * patches * d) + 2 * merge
    assert duet.forward["v2v_scoring"] == pytest.approx(scoring)
    assert duet.visual_tokens_per_layer[0] == 2 * (dominant + contextual) + 27


def test_flop_model_savings_of_the_7b_shapes():
    """Every preset saves; 1/9 saves more than 1/3; prefill ratios are the same order as the step ratios."""
    for shape in ("llava-next-7b", "llava-onevision-7b"):
        presets = default_presets(shape)[1:]
        ratios = {preset: predicted_step_ratio(shape, preset, "finetune", 1) for preset in presets}
        assert all(0.1 < ratio < 0.5 for ratio in ratios.values()), ratios
        assert ratios["anyres_pdrop_ninth"] < ratios["anyres_pdrop_third"]
        baseline = prefill_flops(shape, None, 1).total
        for preset in presets:
            assert 0.1 < prefill_flops(shape, preset, 1).total / baseline < 0.5


def test_flops_cli_prints_anyres_rows(capsys):
    assert flops_main(["--shape", "llava-next-7b"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "640x480 x0.35" in lines[0] and "prefill vs none" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == set(default_presets("llava-next-7b"))
    assert rows["none"][1] == "2186.2" and rows["anyres_pdrop_third"][-1] == "0.333"
    assert flops_main(["--shape", "llava-onevision-7b", "--stage", "prefill"]) == 0
    out = capsys.readouterr().out
    assert "anyres_pdrop_ninth" in out and "anyres_duet_third" in out  # V2V rows on OneVision too


# ----- tiny AnyRes shapes: random models, batches, the training benchmark -----

_TINY_NEXT = AnyResGeometry("tiny-next", 56, 14, ((56, 112), (112, 56), (112, 112), (168, 56), (56, 168)))
_TINY_ONEVISION = AnyResGeometry(
    "tiny-onevision", 56, 14, tuple((56 * rows, 56 * cols) for rows in range(1, 4) for cols in range(1, 4)), 2, True
)
_TINY_LLM = LLMShape(num_layers=4, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128)
TINY_NEXT = ModelShape(
    name="tiny-anyres",
    vision=VisionShape(num_layers=2, hidden=32, intermediate=64, heads=4, image_size=56),
    llm=_TINY_LLM,
    text_tokens=16,
    answer_tokens=6,
    anyres=_TINY_NEXT,
    image_mix=(MixImage(80, 60, 0.5), MixImage(60, 80, 0.5)),
    family="llava_next",
)
TINY_ONEVISION = ModelShape(
    name="tiny-anyres-onevision",
    vision=VisionShape(
        num_layers=2, hidden=32, intermediate=64, heads=4, image_size=56, feature_layer=-1, cls_token=False
    ),
    llm=_TINY_LLM,
    text_tokens=16,
    answer_tokens=6,
    anyres=_TINY_ONEVISION,
    image_mix=(MixImage(160, 60, 0.5), MixImage(40, 40, 0.5)),  # the wide one is downsized (anyres_max_2)
    family="llava_onevision",
)
TINY_T2V = CompressionConfig("tiny_t2v", t2v=T2VConfig((0.25, 0.5), (0.5, 0.25), "instruction"))
TINY_DUET = CompressionConfig("tiny_duet", V2VConfig("duet", 0.4, 0.1), TINY_T2V.t2v)


@pytest.mark.parametrize(
    ("shape", "presets"), [(TINY_NEXT, [None, TINY_T2V, TINY_DUET]), (TINY_ONEVISION, [None, TINY_T2V, TINY_DUET])]
)
def test_random_model_reports_the_accounted_visual_tokens(shape, presets):
    """The batch carries each mix image's AnyRes placeholders, and the model (the family's random model) reports
    per layer the tokens the accounting predicts for that mix (the newline rule keeps every row here; OneVision's
    V2V per view group of its packed tokens, the wide image downsized)."""
    torch.manual_seed(0)
    model = build_model(shape).eval()
    batch = build_training_batch(shape, "finetune", 2)
    placeholders = (batch["input_ids"] == anyres_image_token_id(shape)).sum(dim=1).tolist()
    counts = [anyres_counts(shape.anyres, image.height, image.width) for image in shape.image_mix]
    assert placeholders == [count.total for count in counts]
    assert batch["pixel_values"].shape[1] == max(count.views for count in counts)
    if shape is TINY_ONEVISION:
        assert counts[0].downsized and not counts[1].downsized
    for preset in presets:
        model.set_compression(preset)
        with torch.no_grad():
            output = model(**batch)
        config = load_compression(preset)
        assert output.visual_tokens_per_layer == pytest.approx(shape.visual_tokens_per_layer(config))
        assert math.isfinite(float(output.loss))


@pytest.mark.parametrize(
    ("shape", "preset"), [(TINY_NEXT, "anyres_pdrop_ninth"), (TINY_ONEVISION, "anyres_duet_third")]
)
def test_train_speed_runs_an_anyres_shape(tmp_path, shape, preset):
    """Both families, OneVision with its V2V per view group: the rows carry the FLOP-model ratio and the
    model-reported visual tokens equal the accounting."""
    from llava.bench import train_speed

    args = train_speed.parse_args(
        ["--shape", "small-anyres", "--steps", "1", "--warmup", "0", "--batch-size", "2", "--presets", "none",
         "--out", str(tmp_path / "bench.json"), "--threads", "1"]
    )  # fmt: skip
    args.shape, args.presets = shape, ["none", preset]
    rows = train_speed.benchmark(args)
    assert [row["preset"] for row in rows] == ["none", preset]
    assert rows[1]["flops_ratio_vs_none"] == pytest.approx(predicted_step_ratio(shape, preset, "finetune", 2))
    assert rows[1]["measured_visual_tokens"] == pytest.approx(rows[1]["avg_visual_tokens"])
    assert rows[0]["padding_fraction"] < 0.1


def test_every_anyres_preset_runs_on_its_family_and_reports_its_accounting():
    """Each named anyres_* preset switches in on both families' random models and the model reports the accounted
    visual tokens per layer (V2V: up to the newline tokens of rows left without a token; OneVision's kept tokens
    equal its plan's exactly)."""
    from llava.compression.onevision_v2v import onevision_v2v_counts

    presets = [name for name in available_presets() if name.startswith("anyres_")]
    assert len(presets) == 5
    torch.manual_seed(0)
    batches = {shape.name: build_training_batch(shape, "finetune", 2) for shape in (TINY_NEXT, TINY_ONEVISION)}
    models = {shape.name: build_model(shape).eval() for shape in (TINY_NEXT, TINY_ONEVISION)}
    for preset in presets:
        config = load_compression(preset)
        for shape in (TINY_NEXT, TINY_ONEVISION):
            model = models[shape.name]
            model.set_compression(config)
            with torch.no_grad():
                output = model(**batches[shape.name])
            accounted = shape.visual_tokens_per_layer(config)
            if config.v2v is None:
                assert output.visual_tokens_per_layer == pytest.approx(accounted), preset
                continue
            # V2V: the accounting keeps every newline token, the model drops those of rows left without a token
            # (many, at 4 x 4-token views): an upper bound, at most the newline tokens above the model's N0.
            newlines = sum(replace(shape, image=image).anyres_counts.newline_tokens for image in shape.image_mix)
            reported = output.visual_tokens_per_layer[0]
            assert accounted[0] - newlines / len(shape.image_mix) <= reported <= accounted[0], preset
            assert torch.isfinite(output.loss), preset
            if shape is TINY_ONEVISION:  # its tokens (newlines left out) are the plan's, exactly
                sizes = torch.tensor([[image.height, image.width] for image in shape.image_mix])
                kept = [tokens for tokens, _ in onevision_v2v_counts(model.hf_model, sizes, config.v2v)]
                assert accounted[0] - newlines / len(shape.image_mix) == pytest.approx(sum(kept) / len(kept))


@pytest.mark.parametrize("shape", [TINY_NEXT, TINY_ONEVISION])
def test_infer_speed_runs_an_anyres_shape(tmp_path, shape):
    """Left-padded prompts of the mix's images through generate, eager and fast decode paths (V2V on both
    families)."""
    from llava.bench import infer_speed

    args = infer_speed.parse_args(
        ["--shape", "small-anyres", "--batch-sizes", "2", "--prompt-tokens", "8", "--new-tokens", "2",
         "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "infer.json"), "--threads", "1"]
    )  # fmt: skip
    args.shape, args.presets = shape, ["none", "anyres_duet_third"]
    rows = infer_speed.benchmark(args)
    assert {(row["preset"], row["path"]) for row in rows} == {
        (preset, path) for preset in ("none", "anyres_duet_third") for path in ("eager", "fast")
    }
    assert all(row["flops_ratio_vs_none"] <= 1.0 for row in rows)


@pytest.mark.parametrize("name", ["small-anyres", "small-anyres-onevision", "llava-next-7b", "llava-onevision-7b"])
def test_shapes_models_count_their_mix_as_the_accounting_does(name):
    """Each AnyRes shape's model config (its family's random model, widths shrunk, geometry kept) gives every mix
    image the placeholder count the FLOP model uses."""
    from llava.hf_adapter import llava_next_anyres_layout, llava_onevision_tokens_per_image

    shape = SHAPES[name]
    tiny = dataclasses.replace(
        shape,
        vision=dataclasses.replace(shape.vision, num_layers=1, hidden=8, intermediate=16, heads=2),
        llm=LLMShape(num_layers=1, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=64),
    )
    model = build_model(tiny).hf_model
    sizes = torch.tensor([[image.height, image.width] for image in shape.image_mix])
    if shape.vision.cls_token:
        counts = [int(layout.numel()) for layout in llava_next_anyres_layout(model, sizes)]
    else:
        counts = llava_onevision_tokens_per_image(model, sizes)
    assert counts == [image.anyres_counts.total for _, image in shape.mix_images()]
