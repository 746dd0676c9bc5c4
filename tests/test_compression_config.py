"""Compression configs, presets and token accounting: the specification of the "192/128/64" budgets."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from llava.compression.accounting import (
    DUET_128_CONTEXTUAL_SHARE,
    average_visual_tokens,
    geometric_keep_ratios,
    main,
    solve_duet,
    solve_geometric_ratios,
    solve_single_ratio,
    stage_summary,
    visual_tokens_per_layer,
)
from llava.compression.config import (
    CompressionConfig,
    CompressionConfigError,
    T2VConfig,
    V2VConfig,
    available_presets,
    load_compression,
    preset_dirs,
)

LAYERS, PATCHES = 32, 576
PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "compression"
EXPECTED_PRESETS = ["none"] + [
    f"{family}_{n}" for family in ("duet", "visionzip", "pdrop", "fastv", "random") for n in (192, 128, 64)
]


def average(name: str, layers: int = LAYERS, patches: int = PATCHES) -> float:
    return average_visual_tokens(load_compression(name), layers, patches)


# ---------------------------------------------------------------- published numbers and presets


def test_duet_192_is_the_published_setting():
    config = load_compression("duet_192")
    assert (config.v2v.method, config.v2v.dominant, config.v2v.contextual, config.v2v.cluster_width) == (
        "duet",
        300,
        7,
        4,
    )
    assert config.v2v.num_tokens == 307
    assert config.t2v.boundary_layers(LAYERS) == (16, 24)
    assert config.t2v.kept_counts(307) == (153, 0)
    assert config.t2v.query == "salient"
    assert average("duet_192") == 191.75  # (307*16 + 153*8 + 0*8) / 32


def test_duet_128_is_the_published_setting():
    config = load_compression("duet_128")
    assert (config.v2v.dominant, config.v2v.contextual) == (170, 35)
    assert average("duet_128") == 128.0


def test_every_preset_exists_and_meets_its_budget():
    assert sorted(EXPECTED_PRESETS) == [name for name in available_presets() if name in EXPECTED_PRESETS]
    for name in EXPECTED_PRESETS:
        config = load_compression(name)
        assert config.name == name
        budget = PATCHES if name == "none" else int(name.rsplit("_", 1)[1])
        assert abs(average(name) - budget) <= 1, (name, average(name))


def test_none_means_no_compression():
    for spec in (None, "none", "", "NONE".lower()):
        config = load_compression(spec)
        assert config == CompressionConfig() and not config.enabled
    assert load_compression(PRESET_DIR / "none.yaml") == CompressionConfig()
    assert visual_tokens_per_layer(CompressionConfig(), LAYERS, PATCHES) == [PATCHES] * LAYERS
    assert average("none") == 576
    assert load_compression("duet_64").enabled and load_compression("visionzip_64").enabled


def test_visionzip_presets_are_v2v_only_and_pdrop_fastv_t2v_only():
    for n, split in ((192, (162, 30)), (128, (108, 20)), (64, (54, 10))):
        config = load_compression(f"visionzip_{n}")
        assert config.t2v is None and config.v2v.method == "visionzip"
        assert (config.v2v.dominant, config.v2v.contextual) == split
        pdrop, fastv = load_compression(f"pdrop_{n}"), load_compression(f"fastv_{n}")
        assert pdrop.v2v is None and pdrop.t2v.query == "last"
        assert fastv.v2v is None and fastv.t2v.query == "last" and fastv.t2v.boundary_layers(LAYERS) == (2,)
    assert load_compression("pdrop_192").t2v.boundary_layers(LAYERS) == (8, 16, 24)
    assert load_compression("pdrop_64").t2v.boundary_layers(LAYERS) == (2, 8, 16)


def test_random_presets_keep_cls_plus_random_patches_at_every_layer():
    for n in (192, 128, 64):
        config = load_compression(f"random_{n}")
        assert config.t2v is None and (config.v2v.method, config.v2v.dominant, config.v2v.contextual) == (
            "random",
            n,
            0,
        )
        assert visual_tokens_per_layer(config, LAYERS, PATCHES) == [n] * LAYERS
    with pytest.raises(CompressionConfigError, match="contextual must be 0"):
        V2VConfig(method="random", dominant=10, contextual=2)


def test_every_preset_yaml_has_a_provenance_header():
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        header = path.read_text().splitlines()[0]
        assert header.startswith("# "), path
    for name in ("duet_64", "pdrop_192", "pdrop_128", "pdrop_64", "fastv_192", "fastv_128", "fastv_64"):
        assert "solve_" in (PRESET_DIR / f"{name}.yaml").read_text(), name


# ---------------------------------------------------------------- solvers reproduce the committed presets


def test_solve_duet_reproduces_the_duet_presets():
    assert solve_duet(192, contextual_share=7 / 307) == (300, 7)
    assert solve_duet(128) == (170, 35)
    k1, k2 = solve_duet(64)
    config = load_compression("duet_64")
    assert (config.v2v.dominant, config.v2v.contextual) == (k1, k2) == (85, 17)
    assert average("duet_64") == 63.75  # N0 = 103 gives 64.25: the tie goes to the value not above target
    assert DUET_128_CONTEXTUAL_SHARE == 35 / 205


@pytest.mark.parametrize(
    ("target", "boundaries"),
    [(192, (8 / 32, 16 / 32, 24 / 32)), (128, (2 / 32, 8 / 32, 16 / 32)), (64, (2 / 32, 8 / 32, 16 / 32))],
)
def test_solve_geometric_ratios_reproduces_the_pdrop_presets(target, boundaries):
    lam = solve_geometric_ratios(target, boundaries, LAYERS, PATCHES)
    preset = load_compression(f"pdrop_{target}").t2v
    assert preset.boundaries == pytest.approx(boundaries)
    assert preset.keep_ratios == geometric_keep_ratios(lam, 3)
    assert preset.keep_ratios[0] == lam


def test_pdrop_128_is_unreachable_with_the_default_boundaries():
    with pytest.raises(ValueError, match=r"out of reach.*144"):
        solve_geometric_ratios(128, (8 / 32, 16 / 32, 24 / 32))


@pytest.mark.parametrize("target", [192, 128, 64])
def test_solve_single_ratio_reproduces_the_fastv_presets(target):
    ratio = solve_single_ratio(target, 2 / 32, LAYERS, PATCHES)
    assert load_compression(f"fastv_{target}").t2v.keep_ratios == (ratio,)


def test_solvers_pick_the_closest_average():
    ratio = solve_single_ratio(192, 2 / 32)
    best = average_visual_tokens(CompressionConfig(t2v=T2VConfig((2 / 32,), (ratio,))), LAYERS, PATCHES)
    for neighbour in (ratio - 0.0001, ratio + 0.0001, ratio - 0.002, ratio + 0.002):
        other = average_visual_tokens(CompressionConfig(t2v=T2VConfig((2 / 32,), (neighbour,))), LAYERS, PATCHES)
        assert abs(best - 192) <= abs(other - 192)


# ---------------------------------------------------------------- boundary layers on shallow models


def test_boundary_layers_on_a_4_layer_model():
    t2v = load_compression("duet_192").t2v
    assert t2v.boundary_layers(4) == (2, 3)
    assert t2v.schedule(4, 307) == ((2, 153), (3, 0))
    assert visual_tokens_per_layer(load_compression("duet_192"), 4, PATCHES) == [307, 307, 153, 0]
    assert average("duet_192", layers=4) == 191.75  # same budget as on 32 layers


def test_duplicate_boundaries_merge_keeping_the_last_ratio():
    t2v = T2VConfig(boundaries=(2 / 32, 8 / 32, 16 / 32), keep_ratios=(0.5, 0.25, 0.125))
    # 4 layers: 0.25 -> 0 -> clamped to 1, 1.0 -> 1 (merged, 0.25 wins), 2.0 -> 2
    assert t2v.boundary_layers(4) == (1, 2)
    assert t2v.stage_ratios(4) == (0.25, 0.125)
    assert t2v.kept_counts(100) == (50, 25, 12)
    assert t2v.kept_counts(100, num_layers=4) == (25, 12)
    config = CompressionConfig(t2v=t2v)
    assert visual_tokens_per_layer(config, 4, 100) == [100, 25, 12, 12]
    assert stage_summary(config, 4, 100) == [(0, 0, 100), (1, 1, 25), (2, 3, 12)]


def test_boundary_at_the_last_layer_is_allowed_but_warned(caplog):
    t2v = T2VConfig(boundaries=(0.5, 1.0), keep_ratios=(0.5, 0.0))
    with caplog.at_level(logging.WARNING, logger="llava.compression.config"):
        assert t2v.boundary_layers(8) == (4, 8)
    assert "drops nothing" in caplog.text
    config = CompressionConfig(t2v=t2v)
    assert visual_tokens_per_layer(config, 8, 10) == [10] * 4 + [5] * 4
    assert stage_summary(config, 8, 10) == [(0, 3, 10), (4, 7, 5)]


def test_rounding_is_half_up():
    assert T2VConfig(boundaries=(0.5,), keep_ratios=(0.5,)).boundary_layers(5) == (3,)  # 2.5 -> 3, not 2


def test_stage_summary_of_duet_192():
    assert stage_summary(load_compression("duet_192"), LAYERS, PATCHES) == [(0, 15, 307), (16, 23, 153), (24, 31, 0)]


def test_v2v_larger_than_the_tower_is_rejected():
    config = CompressionConfig(v2v=V2VConfig("duet", 500, 100))
    with pytest.raises(ValueError, match="600 tokens"):
        average_visual_tokens(config, LAYERS, PATCHES)


# ---------------------------------------------------------------- serialisation


def test_to_dict_from_dict_round_trip_through_json_and_yaml(tmp_path):
    for name in EXPECTED_PRESETS:
        config = load_compression(name)
        data = config.to_dict()
        assert CompressionConfig.from_dict(json.loads(json.dumps(data))) == config
        assert load_compression(data) == config  # as stored in a saved model's config.json
        path = tmp_path / f"copy_{name}.yaml"
        path.write_text(yaml.safe_dump(data))
        assert load_compression(path) == config
        assert load_compression(str(path)) == config


def test_yaml_file_without_name_takes_the_file_stem(tmp_path):
    path = tmp_path / "my_budget.yaml"
    path.write_text("v2v: {method: visionzip, dominant: 20, contextual: 4}\n")
    config = load_compression(path)
    assert config.name == "my_budget" and config.v2v.num_tokens == 24 and config.t2v is None
    assert config.v2v.cluster_width == 4


def test_load_passes_a_config_through():
    config = load_compression("fastv_64")
    assert load_compression(config) is config


def test_preset_dirs_env_override(tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text("t2v: {boundaries: [0.5], keep_ratios: [0.0]}\n")
    monkeypatch.setenv("DUET_COMPRESSION_PRESETS", str(tmp_path))
    assert preset_dirs()[0] == tmp_path
    assert "tiny" in available_presets()
    assert load_compression("tiny").t2v.keep_ratios == (0.0,)


# ---------------------------------------------------------------- validation errors name the problem


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


DUET_T2V = "t2v: {boundaries: [0.5, 0.75], keep_ratios: [0.5, 0.0]}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "v2v: {method: duet, dominant: 10, contextual: 2}\nextra: 1\n",
            r"unknown key\(s\) \['extra'\] in the top level",
        ),
        ("v2v: {method: duet, dominant: 10, contextual: 2, k3: 1}\n", r"unknown key\(s\) \['k3'\] in v2v"),
        ("t2v: {boundaries: [0.5], keep_ratios: [0.5], ratio: 1}\n", r"unknown key\(s\) \['ratio'\] in t2v"),
        ("v2v: {method: tome, dominant: 10, contextual: 2}\n", r"v2v.method must be one of .*'tome'"),
        ("v2v: {method: duet, dominant: 0, contextual: 2}\n", r"v2v.dominant \(k1\) must be an integer >= 1 .*CLS"),
        ("v2v: {method: duet, dominant: 10.5, contextual: 2}\n", r"v2v.dominant"),
        ("v2v: {method: duet, dominant: 10, contextual: -1}\n", r"v2v.contextual \(k2\)"),
        ("v2v: {method: duet, dominant: 10, contextual: 2, cluster_width: 0}\n", r"v2v.cluster_width"),
        ("v2v: {method: duet, contextual: 2}\n", r"missing key\(s\) \['dominant'\] in v2v"),
        ("t2v: {boundaries: [0.5, 0.75], keep_ratios: [0.5]}\n", r"same length.*2 boundaries.*1 keep_ratios"),
        ("t2v: {boundaries: [0.5, 0.75], keep_ratios: [0.25, 0.5]}\n", r"keep_ratios must be non-increasing"),
        ("t2v: {boundaries: [0.75, 0.5], keep_ratios: [0.5, 0.0]}\n", r"boundaries must be strictly increasing"),
        ("t2v: {boundaries: [0.5, 0.5], keep_ratios: [0.5, 0.0]}\n", r"boundaries must be strictly increasing"),
        ("t2v: {boundaries: [0.0], keep_ratios: [0.5]}\n", r"boundaries .* \(0, 1\]"),
        ("t2v: {boundaries: [16], keep_ratios: [0.5]}\n", r"boundaries .* \(0, 1\]"),
        ("t2v: {boundaries: [0.5], keep_ratios: [1.5]}\n", r"keep_ratios must lie in \[0, 1\]"),
        ("t2v: {boundaries: [], keep_ratios: []}\n", r"t2v.boundaries is empty"),
        ("t2v: {boundaries: 0.5, keep_ratios: [0.5]}\n", r"t2v.boundaries must be a list"),
        ("t2v: {boundaries: [0.5], keep_ratios: [0.5], query: first}\n", r"t2v.query must be one of .*'first'"),
        ("t2v: {boundaries: [0.5], keep_ratios: [0.5], position_mode: shift}\n", r"t2v.position_mode .*'shift'"),
        ("- 1\n- 2\n", r"the top level must be a mapping"),
        ("", r"the file is empty"),
        ("v2v: [unclosed\n", r"not valid YAML"),
    ],
)
def test_validation_errors_name_the_file_and_the_field(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(CompressionConfigError, match=message) as error:
        load_compression(path)
    assert str(path) in str(error.value)


def test_errors_name_the_preset_and_where_presets_were_searched(tmp_path, monkeypatch):
    (tmp_path / "broken.yaml").write_text(DUET_T2V.replace("0.0]", "0.9]"))
    monkeypatch.setenv("DUET_COMPRESSION_PRESETS", str(tmp_path))
    with pytest.raises(CompressionConfigError, match=r"preset 'broken' .*keep_ratios must be non-increasing"):
        load_compression("broken")
    with pytest.raises(CompressionConfigError, match="unknown compression preset 'duet_1000'") as error:
        load_compression("duet_1000")
    assert str(tmp_path) in str(error.value) and str(PRESET_DIR) in str(error.value)
    assert "duet_192" in str(error.value)  # lists what is available
    with pytest.raises(CompressionConfigError, match="does not exist"):
        load_compression(tmp_path / "missing.yaml")


def test_dict_errors_and_direct_construction_are_validated():
    with pytest.raises(CompressionConfigError, match=r"compression dict: unknown key\(s\) \['v3v'\]"):
        load_compression({"v3v": {}})
    with pytest.raises(CompressionConfigError, match="CLS"):
        V2VConfig("duet", 0, 5)
    with pytest.raises(CompressionConfigError, match="same length"):
        T2VConfig((0.5,), (0.5, 0.0))
    assert T2VConfig([0.5, 1], [1, 0]).boundaries == (0.5, 1.0)  # lists and ints are normalised


# ---------------------------------------------------------------- CLI


def test_cli_prints_schedule_and_average(capsys):
    assert main(["--preset", "duet_192", "--num-layers", "32", "--num-patches", "576"]) == 0
    out = capsys.readouterr().out
    assert "layers  16-23    153 visual tokens" in out
    assert "average visual tokens per layer: 191.75" in out
    assert main(["--all", "--solve"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^== ", out, flags=re.M)) >= len(EXPECTED_PRESETS)
    assert "duet_64: solve_duet -> (k1, k2) = (85, 17)" in out


# ---------------------------------------------------------------- Video-LLaVA presets


def test_video_presets_match_the_papers_video_settings():
    from llava.compression.accounting import visual_token_reduction

    published = load_compression("duet_video_53")
    assert (published.v2v.dominant, published.v2v.contextual) == (160, 32)
    assert published.t2v.boundary_layers(LAYERS) == (16, 24) and published.t2v.keep_ratios == (0.5, 0.0)
    video = dict(num_layers=LAYERS, num_patches=256, num_frames=8, cls_token=True)
    # T2V keeps floor(0.5 * N0) of the whole video's N0 = 8 x 192, not per frame.
    assert visual_tokens_per_layer(published, **video)[15:17] == [1536, 768]
    assert average_visual_tokens(published, **video) == 960.0
    assert abs(visual_token_reduction(published, **video) - 0.531) < 0.005
    aggressive = load_compression("duet_video_93")
    assert abs(visual_token_reduction(aggressive, **video) - 0.934) < 0.001
    solved = solve_duet((1 - 0.934) * 257, LAYERS, 256, contextual_share=32 / 192)
    assert (aggressive.v2v.dominant, aggressive.v2v.contextual) == solved == (22, 5)
    # Images are counted the same way: 1 frame, CLS not kept.
    assert visual_token_reduction(load_compression("duet_192"), LAYERS, PATCHES) == pytest.approx(1 - 191.75 / 576)


def test_accounting_cli_reports_videos(capsys):
    from llava.compression.accounting import main

    assert main(["--video", "--preset", "duet_video_53"]) == 0
    out = capsys.readouterr().out
    assert "8 frames x 257 tokens" in out and "960 (120 per frame)" in out and "53.3 %" in out
