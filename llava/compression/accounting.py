"""Honest visual-token accounting, and the solvers that derive the presets' budgets.

The "192 / 128 / 64 tokens" of DUET-VLM, VisionZip, PyramidDrop and FastV are *layer averages*: the mean,
over all LLM layers, of the visual tokens each layer sees. :func:`visual_tokens_per_layer` defines that
count exactly (``N0`` = Stage A output, or all patches without Stage A; from each T2V boundary layer on,
``floor(ratio * N0)``; a boundary at layer 0, CDPruner's selection at the LLM input, means every layer sees
``floor(ratio * N0)``), and :func:`average_visual_tokens` is its mean.

The solvers pick the free parameter of each method family so that the average is as close as possible to
a target (ties resolved to the value *not above* the target). They search integer grids by bisection, which
is exact because the average is non-decreasing in the parameter:

* :func:`solve_duet`: ``N0 = k1 + k2`` for a fixed T2V schedule, split by a contextual share;
* :func:`solve_geometric_ratios`: PyramidDrop's ``lambda`` (ratios lambda, lambda^2, ...), on a 1e-4 grid;
* :func:`solve_single_ratio`: FastV's keep ratio, on a 1e-4 grid.

Videos are counted the same way: a video is one visual segment of ``num_frames`` frames; V2V keeps
``k1 + k2`` tokens *per frame*, and T2V keeps ``floor(ratio * N0)`` of the video's joint ``N0`` (all frames).
The reduction is reported against the uncompressed count (``num_patches`` plus CLS when the tower keeps it,
per frame: Video-LLaVA keeps 257 = 256 + CLS).

AnyRes images (LLaVA-NeXT / OneVision) have a base view, tiles and newline tokens, and their count follows the
image: :func:`anyres_visual_tokens_per_layer` counts one image from the token counts its V2V budgets apply to
(fractions of each: LLaVA-NeXT's views, LLaVA-OneVision's view groups, i.e. the base view and the packed grid after
downsizing) and its newline tokens (all counted as kept: an upper bound, a row left without a token loses its
newline); ``python -m llava.bench.anyres --preset NAME`` averages a preset over an image-size mix (the
``anyres_*`` presets' stated fractions) on both families.

CLI: ``python -m llava.compression.accounting --preset duet_192 --num-layers 32 --num-patches 576`` prints
the per-stage schedule and the average; ``--all`` does every preset; ``--solve`` prints the solved numbers
behind the committed presets; ``--video`` counts Video-LLaVA videos (8 frames x 257 tokens, 224 px).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from llava.compression.config import (
    CompressionConfig,
    CompressionConfigError,
    T2VConfig,
    V2VConfig,
    available_presets,
    load_compression,
)

__all__ = [
    "DUET_128_CONTEXTUAL_SHARE",
    "RATIO_DECIMALS",
    "anyres_initial_visual_tokens",
    "anyres_visual_tokens_per_layer",
    "average_visual_tokens",
    "geometric_keep_ratios",
    "initial_visual_tokens",
    "main",
    "solve_duet",
    "solve_geometric_ratios",
    "solve_single_ratio",
    "stage_summary",
    "visual_token_reduction",
    "visual_tokens_per_layer",
]

VIDEO_LLAVA_FRAMES = 8
VIDEO_LLAVA_PATCHES = 256  # CLIP-L/14 at 224 px; Video-LLaVA keeps CLS too: 257 tokens per frame

# DUET-128 (k1, k2) = (170, 35): 35 of its 205 tokens are contextual. The published 192 split (300, 7) is far
# more dominant-heavy; for unpublished budgets we keep the 128 split's share, the nearer one to small budgets.
DUET_128_CONTEXTUAL_SHARE = 35 / 205
# Solved keep ratios are rounded to this many decimals so presets stay readable (1e-4 * 576 < 1 token).
RATIO_DECIMALS = 4


def initial_visual_tokens(
    config: CompressionConfig,
    num_patches: int,
    num_frames: int = 1,
    cls_token: bool = False,
    measured: float | None = None,
) -> float:
    """``N0``: visual tokens per image (or per video of ``num_frames`` frames) entering the LLM: the Stage A
    output per frame, else every patch (plus CLS when ``cls_token``). DyMU's count depends on the images:
    pass the ``measured`` mean (what the LLM's linear layers see; with VTU attention still sees every patch)."""
    if num_patches < 1:
        raise ValueError(f"num_patches must be positive, got {num_patches}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if config.dymu is not None:
        if measured is not None:
            return measured
        raise ValueError(
            f"compression {config.name!r}: DyMU keeps a different number of tokens per image; measure the mean and "
            "spread on your data with `python -m llava.tools.calibrate_dymu --measure THRESHOLDS.json ...`"
        )
    if config.v2v is None:
        return num_frames * (num_patches + int(cls_token))
    if config.v2v.is_fraction:  # Qwen2.5-VL: fractions of each image's merged tokens (no CLS)
        return num_frames * sum(config.v2v.budget(num_patches))
    if config.v2v.num_tokens > num_patches + 1:
        raise ValueError(
            f"compression {config.name!r}: v2v keeps k1 + k2 = {config.v2v.num_tokens} tokens but the tower only "
            f"has {num_patches} patches + CLS"
        )
    return num_frames * config.v2v.num_tokens


def visual_tokens_per_layer(
    config: CompressionConfig,
    num_layers: int,
    num_patches: int,
    num_frames: int = 1,
    cls_token: bool = False,
    measured: float | None = None,
) -> list[float]:
    """Visual tokens (per image, or per video) seen by each of the ``num_layers`` LLM layers' linear layers.

    With a ``measured`` DyMU mean the T2V stages keep ``floor(ratio * round(mean))``: an approximation, as
    each image keeps ``floor(ratio * N0)`` of its own count.
    """
    n0 = initial_visual_tokens(config, num_patches, num_frames, cls_token, measured)
    counts = [n0] * num_layers
    if config.t2v is not None:
        for layer, kept in config.t2v.schedule(num_layers, round(n0)):
            counts[layer:] = [kept] * (num_layers - layer)
    return counts


def anyres_initial_visual_tokens(config: CompressionConfig, view_tokens: Sequence[int], newline_tokens: int) -> int:
    """``N0`` of one AnyRes image (LLaVA-NeXT / OneVision): every unit's tokens plus the grid's newline tokens;
    with V2V (fraction budgets only) each unit keeps ``floor(dominant * n) + floor(contextual * n)`` of its
    ``n`` tokens (:meth:`V2VConfig.budget`) and every newline token is counted (an upper bound: the models drop
    the newline of a row that keeps no token).

    ``view_tokens``: the token counts V2V budgets one by one (:attr:`llava.bench.anyres.AnyResCounts.v2v_groups`):
    on LLaVA-NeXT the base view's tokens, then each tile's tokens after unpadding; on LLaVA-OneVision the base
    view's tokens, then the packed grid's (unpadded, downsized past ``anyres_max_9``; V2V selects after packing,
    :mod:`llava.compression.onevision_v2v`). Integer V2V budgets and DyMU are refused: the token count of an
    AnyRes image varies, so a fixed per-image budget has no per-view meaning.
    """
    if config.dymu is not None:
        raise ValueError(f"compression {config.name!r}: DyMU is not accounted for AnyRes images")
    if any(tokens < 0 for tokens in view_tokens) or newline_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got views {list(view_tokens)}, newlines {newline_tokens}")
    if config.v2v is None:
        return sum(view_tokens) + newline_tokens
    if not config.v2v.is_fraction:
        raise ValueError(
            f"compression {config.name!r}: AnyRes images take V2V budgets as fractions of each view's tokens, "
            f"got k1 {config.v2v.dominant} + k2 {config.v2v.contextual}"
        )
    return sum(sum(config.v2v.budget(tokens)) for tokens in view_tokens if tokens > 0) + newline_tokens


def anyres_visual_tokens_per_layer(
    config: CompressionConfig, num_layers: int, view_tokens: Sequence[int], newline_tokens: int
) -> list[int]:
    """Visual tokens of one AnyRes image seen by each LLM layer: :func:`anyres_initial_visual_tokens`, then
    ``floor(ratio * N0)`` from each T2V boundary on (newline tokens are visual tokens there, ranked and dropped
    like the others)."""
    n0 = anyres_initial_visual_tokens(config, view_tokens, newline_tokens)
    counts = [n0] * num_layers
    if config.t2v is not None:
        for layer, kept in config.t2v.schedule(num_layers, n0):
            counts[layer:] = [kept] * (num_layers - layer)
    return counts


def average_visual_tokens(
    config: CompressionConfig,
    num_layers: int,
    num_patches: int,
    num_frames: int = 1,
    cls_token: bool = False,
    measured: float | None = None,
) -> float:
    """The papers' "token count": visual tokens (per image or per video) averaged over all LLM layers."""
    counts = visual_tokens_per_layer(config, num_layers, num_patches, num_frames, cls_token, measured)
    return sum(counts) / num_layers


def visual_token_reduction(
    config: CompressionConfig, num_layers: int, num_patches: int, num_frames: int = 1, cls_token: bool = False
) -> float:
    """Fraction of visual tokens dropped, layer-averaged, relative to the uncompressed model
    (``num_frames * (num_patches + cls_token)`` tokens in every layer)."""
    average = average_visual_tokens(config, num_layers, num_patches, num_frames, cls_token)
    return 1.0 - average / (num_frames * (num_patches + int(cls_token)))


def stage_summary(
    config: CompressionConfig, num_layers: int, num_patches: int, num_frames: int = 1, cls_token: bool = False
) -> list[tuple[int, int, int]]:
    """``(first_layer, last_layer, visual_tokens)`` per stage, inclusive; stages that no layer sees are left out."""
    n0 = initial_visual_tokens(config, num_patches, num_frames, cls_token)
    starts = [(0, n0)]
    if config.t2v is not None:
        starts += [(layer, kept) for layer, kept in config.t2v.schedule(num_layers, n0) if layer < num_layers]
    ends = [start - 1 for start, _ in starts[1:]] + [num_layers - 1]
    # A boundary at layer 0 (a selection at the LLM input, CDPruner) leaves the N0 stage without layers.
    return [(start, end, kept) for (start, kept), end in zip(starts, ends, strict=True) if end >= start]


def _closest_on_grid(average_of: Callable[[int], float], lo: int, hi: int, target: float, what: str) -> int:
    """Integer ``x`` in ``[lo, hi]`` whose non-decreasing ``average_of(x)`` is closest to ``target`` (ties: lower)."""
    first = lo
    low_avg, high_avg = average_of(lo), average_of(hi)
    if not low_avg <= target <= high_avg:
        raise ValueError(
            f"{what}: target {target} is out of reach; averages from {low_avg:g} to {high_avg:g} are possible"
        )
    # Bisection for the first x with average_of(x) >= target.
    while lo < hi:
        mid = (lo + hi) // 2
        if average_of(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > first and target - average_of(lo - 1) <= average_of(lo) - target:
        return lo - 1
    return lo


def solve_duet(
    target: float,
    num_layers: int = 32,
    num_patches: int = 576,
    boundaries: Sequence[float] = (0.5, 0.75),
    keep_ratios: Sequence[float] = (0.5, 0.0),
    contextual_share: float = DUET_128_CONTEXTUAL_SHARE,
) -> tuple[int, int]:
    """DUET ``(k1, k2)`` whose layer average with the given T2V schedule is closest to ``target``.

    ``N0 = k1 + k2`` is solved exactly; the split is ``k2 = round(contextual_share * N0)`` (half up, ``k1``
    at least 1). The default share is DUET-128's 35/205; pass 7/307 to recover the published (300, 7).
    """
    if not 0.0 <= contextual_share < 1.0:
        raise ValueError(f"contextual_share must lie in [0, 1), got {contextual_share}")
    t2v = T2VConfig(boundaries=tuple(boundaries), keep_ratios=tuple(keep_ratios))

    def average_of(n0: int) -> float:
        return average_visual_tokens(CompressionConfig("solve", V2VConfig("duet", n0, 0), t2v), num_layers, num_patches)

    n0 = _closest_on_grid(average_of, 1, num_patches + 1, target, "solve_duet")
    contextual = min(math.floor(contextual_share * n0 + 0.5), n0 - 1)
    return n0 - contextual, contextual


def geometric_keep_ratios(lam: float, stages: int) -> tuple[float, ...]:
    """PyramidDrop's ratios ``lam, lam^2, ..., lam^stages``, rounded to :data:`RATIO_DECIMALS` decimals."""
    return tuple(round(lam**power, RATIO_DECIMALS) for power in range(1, stages + 1))


def _grid_ratio(step: int) -> float:
    return round(step / 10**RATIO_DECIMALS, RATIO_DECIMALS)


def solve_geometric_ratios(
    target: float, boundaries: Sequence[float], num_layers: int = 32, num_patches: int = 576
) -> float:
    """PyramidDrop ``lambda`` (on a 1e-4 grid) whose ratios :func:`geometric_keep_ratios` average closest to
    ``target`` over ``num_layers`` layers, without Stage A. Raises if no lambda in [0, 1] reaches the target
    (e.g. 128 with boundaries [8/32, 16/32, 24/32]: the first 8 layers alone average 144)."""
    boundaries = tuple(boundaries)

    def average_of(step: int) -> float:
        ratios = geometric_keep_ratios(_grid_ratio(step), len(boundaries))
        config = CompressionConfig("solve", t2v=T2VConfig(boundaries=boundaries, keep_ratios=ratios))
        return average_visual_tokens(config, num_layers, num_patches)

    what = f"solve_geometric_ratios(boundaries={list(boundaries)}, num_layers={num_layers})"
    return _grid_ratio(_closest_on_grid(average_of, 0, 10**RATIO_DECIMALS, target, what))


def solve_single_ratio(target: float, boundary: float, num_layers: int = 32, num_patches: int = 576) -> float:
    """FastV keep ratio (on a 1e-4 grid) after one boundary whose layer average is closest to ``target``."""

    def average_of(step: int) -> float:
        config = CompressionConfig("solve", t2v=T2VConfig(boundaries=(boundary,), keep_ratios=(_grid_ratio(step),)))
        return average_visual_tokens(config, num_layers, num_patches)

    what = f"solve_single_ratio(boundary={boundary}, num_layers={num_layers})"
    return _grid_ratio(_closest_on_grid(average_of, 0, 10**RATIO_DECIMALS, target, what))


def _describe(
    config: CompressionConfig, num_layers: int, num_patches: int, num_frames: int = 1, cls_token: bool = False
) -> str:
    per_frame = num_patches + int(cls_token)
    unit = f"{num_frames} frames x {per_frame} tokens" if num_frames > 1 else f"{per_frame} tokens per image"
    lines = [f"== {config.name} ({num_layers} layers, {unit})"]
    if config.dymu is not None:
        thresholds = config.dymu.thresholds
        lines.append(
            f"  DyMU DToMe: {len(thresholds)} tower layers, thresholds {min(thresholds):.3f}-{max(thresholds):.3f}; "
            "tokens per image follow the image: `python -m llava.tools.calibrate_dymu --measure ...` reports "
            "their mean and spread on a data set"
        )
        if config.t2v is not None:
            t2v = config.t2v
            lines.append(
                f"  T2V boundaries {list(t2v.boundaries)} -> layers {list(t2v.boundary_layers(num_layers))}, "
                f"keep ratios {list(t2v.stage_ratios(num_layers))} of each image's own N0"
            )
        return "\n".join(lines)
    if config.v2v is not None:
        v2v = config.v2v
        width = f", cluster_width {v2v.cluster_width}" if v2v.method == "duet" else ""
        where = " per frame" if num_frames > 1 else ""
        if v2v.is_fraction:
            lines.append(
                f"  V2V {v2v.method}: k1 {v2v.dominant} + k2 {v2v.contextual} of each image's tokens{width}{where}"
            )
        else:
            lines.append(f"  V2V {v2v.method}: k1 {v2v.dominant} (CLS included) + k2 {v2v.contextual}{width}{where}")
    if config.t2v is not None:
        t2v = config.t2v
        joint = " (ranked over all frames jointly)" if num_frames > 1 else ""
        lines.append(
            f"  T2V boundaries {list(t2v.boundaries)} -> layers {list(t2v.boundary_layers(num_layers))}, "
            f"keep ratios {list(t2v.stage_ratios(num_layers))}, query {t2v.query}, positions {t2v.position_mode}{joint}"
            + (f", selector {t2v.selector}" if t2v.selector != "attention" else "")
        )
    for first, last, tokens in stage_summary(config, num_layers, num_patches, num_frames, cls_token):
        lines.append(f"  layers {first:>3}-{last:<3} {tokens:>5} visual tokens")
    average = average_visual_tokens(config, num_layers, num_patches, num_frames, cls_token)
    frame_note = f" ({average / num_frames:g} per frame)" if num_frames > 1 else ""
    lines.append(f"  average visual tokens per layer: {average:g}{frame_note}")
    reduction = visual_token_reduction(config, num_layers, num_patches, num_frames, cls_token)
    lines.append(f"  dropped vs uncompressed ({num_frames * per_frame} tokens): {100 * reduction:.1f} %")
    return "\n".join(lines)


def _solved_presets(num_layers: int, num_patches: int) -> list[str]:
    lines = [f"Solved budgets ({num_layers} layers, {num_patches} patches):"]
    for target in (192, 128, 64):
        k1, k2 = solve_duet(target, num_layers, num_patches)
        lines.append(f"  duet_{target}: solve_duet -> (k1, k2) = ({k1}, {k2}) [share 35/205]")
    k1, k2 = solve_duet(192, num_layers, num_patches, contextual_share=7 / 307)
    lines.append(f"  duet_192 with share 7/307 -> ({k1}, {k2})")
    for target, boundaries in (
        (192, (8 / 32, 16 / 32, 24 / 32)),
        (128, (2 / 32, 8 / 32, 16 / 32)),
        (64, (2 / 32, 8 / 32, 16 / 32)),
    ):
        lam = solve_geometric_ratios(target, boundaries, num_layers, num_patches)
        ratios = geometric_keep_ratios(lam, len(boundaries))
        lines.append(f"  pdrop_{target}: boundaries {list(boundaries)} lambda {lam} -> keep_ratios {list(ratios)}")
    for target in (192, 128, 64):
        ratio = solve_single_ratio(target, 2 / 32, num_layers, num_patches)
        lines.append(f"  fastv_{target}: boundary 2/32 -> keep ratio {ratio}")
    target = (1 - 0.934) * (VIDEO_LLAVA_PATCHES + 1)
    k1, k2 = solve_duet(target, num_layers, VIDEO_LLAVA_PATCHES, contextual_share=32 / 192)
    lines.append(
        f"  duet_video_93: 6.6 % of 257 tokens per frame ({target:.2f}) -> (k1, k2) = ({k1}, {k2}) "
        "[share 32/192 of the published video split (160, 32)]"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Print per-stage schedules and averages of presets (or YAML files), or the solved preset numbers."""
    parser = argparse.ArgumentParser(prog="python -m llava.compression.accounting", description=main.__doc__)
    parser.add_argument("--preset", action="append", default=[], help="preset name or YAML path (repeatable)")
    parser.add_argument("--all", action="store_true", help="every available preset")
    parser.add_argument("--solve", action="store_true", help="print the solver outputs behind the presets")
    parser.add_argument("--num-layers", type=int, default=32, help="LLM depth (Vicuna-7B: 32)")
    parser.add_argument("--num-patches", type=int, default=576, help="vision patches per image (CLIP-L/336: 576)")
    parser.add_argument("--num-frames", type=int, default=1, help="frames per video (1: images)")
    parser.add_argument("--cls-token", action="store_true", help="the tower keeps CLS (Video-LLaVA frames do)")
    parser.add_argument(
        "--video", action="store_true", help="Video-LLaVA videos: 8 frames x (256 patches + CLS) at 224 px"
    )
    args = parser.parse_args(argv)
    if args.video:
        args.num_frames, args.num_patches, args.cls_token = VIDEO_LLAVA_FRAMES, VIDEO_LLAVA_PATCHES, True
    specs = list(args.preset) + (available_presets() if args.all else [])
    if not specs and not args.solve:
        parser.error("give --preset NAME, --all or --solve")
    for spec in specs:
        try:
            config = load_compression(spec)
        except CompressionConfigError as error:
            if spec in args.preset:
                raise
            print(f"== {spec}: not loadable here ({error})")
            continue
        print(_describe(config, args.num_layers, args.num_patches, args.num_frames, args.cls_token))
    if args.solve:
        print("\n".join(_solved_presets(args.num_layers, args.num_patches)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
