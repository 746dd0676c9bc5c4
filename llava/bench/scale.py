"""Step-time model of multi-GPU LLaVA training: compute from the FLOP model plus exposed DeepSpeed communication.

Why: a single-GPU speed-up from visual-token compression (``llava.bench.flops``, ``llava.bench.train_speed``)
shrinks on a cluster, because compression cuts compute but not the ZeRO traffic, which depends only on the
parameters. This module predicts, per GPU type, GPU count, ZeRO stage, model shape and compression preset, the
time of one training step and the saving versus ``none``. Run ``python -m llava.bench.scale`` (``--help``);
docs/scale.md states the assumptions, sources and results.

Model (all of it is arithmetic; nothing is measured here):

1. Compute: ``training_step_flops(shape, preset, stage, micro_batch)`` per GPU (data parallel: every GPU runs
   its own micro-batch) at an achieved rate ``peak bf16 x efficiency``. The efficiency comes from the measured
   H200 runs (fwd+bwd TFLOP/s over the H200's 989 TFLOP/s peak, per preset, so that short compressed
   sequences run less efficiently, as measured) and is assumed to carry over to the other GPU types;
   ``--mfu`` or ``--tflops`` override it; ``--length-mix llava665k`` takes the finetune FLOPs from ragged
   samples of :mod:`llava.bench.length_mix` (padding-free) instead of one fixed text length. Optimizer: AdamW
   on the rank's 1/n of the trainable parameters, memory-bound (``OPTIMIZER_BYTES_PER_PARAM`` bytes per
   parameter at 80 % of the HBM bandwidth).
2. Communication: :func:`llava.bench.zero_traffic.step_collectives`, every collective DeepSpeed issues in one
   steady-state step with its message size, replayed from the model's layout and checked byte for byte against
   DeepSpeed's comms logger (see that module for the ZeRO-2 and ZeRO-3 rules).
3. Time of a collective: ring algorithm, ``latency + f x buffer / bandwidth`` with ``f = (n - 1) / n`` for
   all-gather and reduce-scatter and ``2 (n - 1) / n`` for all-reduce; bandwidth = the intra-node link per
   GPU per direction up to ``gpus_per_node`` GPUs, the slower of it and the GPU's share of the inter-node
   network beyond, times ``link_efficiency``.
4. Overlap: a share (``overlap_forward``, ``overlap_backward``) of the forward all-gathers and of the backward
   traffic (gathers, recomputation gathers, gradient reduction) hides behind the compute of that phase, at
   most that phase's compute time; what happens after backward (ZeRO-2's parameter all-gather, the persistent
   re-gather, scalars) and the optimizer step are exposed.

Not modelled: DeepSpeed's host-side hook overhead, kernel contention between communication and compute, data
loading, stragglers, LoRA, CPU offload, gradient accumulation (one micro-batch per GPU per optimizer step).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from llava.bench.flops import ragged_step_flops, training_step_flops
from llava.bench.length_mix import draw_lengths, mix_argument
from llava.bench.shapes import SHAPES, ModelShape, default_presets, get_shape
from llava.bench.zero_traffic import (
    Collective,
    ZeroSettings,
    llava_layout,
    step_collectives,
    zero_settings,
)
from llava.compression.config import load_compression

__all__ = [
    "GPUS",
    "GpuSpec",
    "Network",
    "Overlap",
    "StepPrediction",
    "main",
    "markdown_tables",
    "measured_efficiency",
    "paper_setting",
    "plot_savings",
    "predict_grid",
    "predict_step",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
OPTIMIZER_BYTES_PER_PARAM = 32
"""HBM bytes moved per trainable parameter by the AdamW step: fp32 master, m and v read and written (24), the
fp32 gradient read (4), the bf16 parameter written (2), rounded up for the bf16 -> fp32 gradient copy."""
HBM_EFFICIENCY = 0.8


# ----- hardware -----


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator and its node's fabric; bandwidths in GB/s per GPU per direction."""

    name: str
    peak_tflops: float
    hbm_tb_s: float
    intra_gb_s: float
    inter_gb_s: float
    intra_fabric: str
    inter_fabric: str


GPUS: dict[str, GpuSpec] = {
    # NVIDIA A100 80GB SXM datasheet: 312 TFLOP/s bf16 dense, 2,039 GB/s HBM2e, NVLink 3 600 GB/s (both
    # directions together); DGX A100: 8 x 200 Gb/s HDR InfiniBand compute NICs, one per GPU.
    "A100-80G": GpuSpec("A100-80G", 312.0, 2.039, 300.0, 25.0, "NVLink 3, 300 GB/s", "8x HDR 200 Gb/s IB"),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, NVLink 4 900 GB/s; DGX H100: 8 x 400 Gb/s
    # NDR (ConnectX-7), one per GPU.
    "H100": GpuSpec("H100", 989.0, 3.35, 450.0, 50.0, "NVLink 4, 450 GB/s", "8x NDR 400 Gb/s IB"),
    # NVIDIA H200 SXM datasheet: H100's compute and NVLink, 4.8 TB/s HBM3e; same NDR network assumed.
    "H200": GpuSpec("H200", 989.0, 4.8, 450.0, 50.0, "NVLink 4, 450 GB/s", "8x NDR 400 Gb/s IB"),
    # AMD Instinct MI300X data sheet: 1,307.4 TFLOP/s bf16 dense, 5.3 TB/s HBM3, 7 Infinity Fabric links of
    # 128 GB/s (64 GB/s per direction) to the other 7 GPUs of the platform = 448 GB/s per direction in all
    # (a ring only gets it if the collective library spreads channels over every link); 8 x 400 Gb/s NICs assumed.
    "MI300X": GpuSpec("MI300X", 1307.4, 5.3, 448.0, 50.0, "Infinity Fabric (xGMI), 448 GB/s", "8x 400 Gb/s"),
}

# Measured on one H200 (../shared/measurements/2026-11-28-h200, ft.json / pt.json / vft.json, made with
# llava.bench.train_speed at commit 77222e9): FLOP-model TFLOPs of the step and the median forward+backward
# seconds (optimizer excluded), per (shape, stage) and preset. Batch: finetune 16, pretrain 32, video 4.
_H200_PEAK_TFLOPS = 989.0
_H200_MEASURED: dict[tuple[str, str], dict[str, tuple[float, float]]] = {
    ("llava-7b", "finetune"): {
        "none": (575.34, 1.2145),
        "duet_192": (250.81, 0.5405),
        "duet_128": (196.98, 0.4387),
        "duet_64": (142.93, 0.3272),
    },
    ("llava-7b", "pretrain"): {"none": (780.18, 1.7276), "duet_192": (291.87, 0.6852), "duet_64": (129.78, 0.3256)},
    ("video-llava-7b", "finetune"): {
        "none": (477.11, 1.0624),
        "duet_video_53": (236.84, 0.5590),
        "duet_video_93": (58.68, 0.2034),
    },
}


@functools.lru_cache(maxsize=512)
def measured_efficiency(shape: ModelShape | str, stage: str, preset: str) -> float:
    """Achieved fwd+bwd TFLOP/s over peak on the H200 for ``preset``, interpolated in visual tokens per
    sample between the measured presets of the nearest measured (shape, stage) (llava-13b uses llava-7b's)."""
    shape = get_shape(shape)
    base = "video-llava-7b" if shape.is_video else "llava-7b"
    key = (base, stage) if (base, stage) in _H200_MEASURED else (base, "finetune")
    if key not in _H200_MEASURED:
        key = ("llava-7b", stage if ("llava-7b", stage) in _H200_MEASURED else "finetune")
    reference = get_shape(key[0])
    points = sorted(
        (reference.average_visual_tokens(load_compression(name)), tflops / seconds / _H200_PEAK_TFLOPS)
        for name, (tflops, seconds) in _H200_MEASURED[key].items()
    )
    tokens = shape.average_visual_tokens(load_compression(preset)) * reference.uncompressed_visual_tokens
    tokens /= shape.uncompressed_visual_tokens
    if tokens <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in pairwise(points):
        if tokens <= x1:
            return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)
    return points[-1][1]


@dataclass(frozen=True)
class Network:
    """Collective-time assumptions: nodes of ``gpus_per_node``, achieved share of the link rate, latency per
    collective (seconds; within a node and across nodes)."""

    gpus_per_node: int = 8
    link_efficiency: float = 0.8
    intra_latency_s: float = 15e-6
    inter_latency_s: float = 30e-6

    def bandwidth(self, gpu: GpuSpec, world: int) -> float:
        """Bytes/s a ring moves per GPU per direction: NVLink/xGMI within a node, the bottleneck across nodes."""
        link = gpu.intra_gb_s if world <= self.gpus_per_node else min(gpu.intra_gb_s, gpu.inter_gb_s)
        return link * 1e9 * self.link_efficiency

    def latency(self, world: int) -> float:
        """Fixed seconds per collective (0 on one GPU)."""
        if world <= 1:
            return 0.0
        return self.intra_latency_s if world <= self.gpus_per_node else self.inter_latency_s


# ----- step time -----


@dataclass(frozen=True)
class StepPrediction:
    """Predicted seconds of one step and what they are made of (per GPU; bytes sent per GPU by the rings)."""

    shape: str
    stage: str
    preset: str
    gpu: str
    world: int
    zero: int
    micro_batch: int
    tflops: float
    achieved_tflops: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    comm_s: float
    exposed_comm_s: float
    step_s: float
    sent_gb: float
    collectives: int
    comm_by_op_gb: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Overlap:
    """Shares of communication time that can hide behind compute: forward all-gathers (ZeRO-3 prefetch) and
    backward traffic (gathers, recomputation gathers, gradient reduction with ``overlap_comm``)."""

    forward: float = 0.7
    backward: float = 0.7


def _comm_seconds(collectives: Iterable[Collective], gpu: GpuSpec, world: int, network: Network) -> float:
    if world <= 1:
        return 0.0
    bandwidth = network.bandwidth(gpu, world)
    return sum(network.latency(world) + c.wire_bytes(world) / bandwidth for c in collectives)


@functools.lru_cache(maxsize=64)
def _trainable(shape: ModelShape, stage: str) -> int:
    return llava_layout(shape, stage).numel(trainable=True)


@functools.lru_cache(maxsize=16)
def _drawn(mix: str, count: int, visual_tokens: int) -> tuple[Any, ...]:
    return tuple(draw_lengths(mix, count, seed=0, visual_tokens=visual_tokens))


def predict_step(
    shape: ModelShape | str,
    preset: str,
    stage: str,
    gpu: GpuSpec | str,
    world: int,
    zero: ZeroSettings,
    micro_batch: int,
    network: Network | None = None,
    overlap: Overlap | None = None,
    mfu: float | None = None,
    tflops: float | None = None,
    gradient_checkpointing: bool = True,
    collectives: list[Collective] | None = None,
    length_mix: str | None = None,
    mix_samples: int = 4096,
) -> StepPrediction:
    """Predicted time of one optimizer step: ``micro_batch`` samples per GPU on ``world`` GPUs.

    Achieved compute rate: ``tflops`` if given, else ``peak x mfu``, else ``peak x`` the H200-measured efficiency
    of this preset. ``length_mix`` (finetune only, e.g. ``llava665k`` of :mod:`llava.bench.length_mix`): the
    FLOPs of ``micro_batch`` samples are the mean of ``mix_samples`` drawn ragged samples, padding-free
    (``ragged_step_flops``; text-only samples included), split into forward and backward as the fixed-length
    step is. ``collectives`` (from :func:`step_collectives`) can be passed to reuse one computation.
    """
    shape = get_shape(shape)
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    network = network or Network()
    overlap = overlap or Overlap()
    flops = training_step_flops(shape, preset, stage, micro_batch, gradient_checkpointing)
    total_flops = flops.total
    if length_mix is not None and stage == "finetune":
        if shape.is_video:
            raise ValueError("length mixes describe image instruction data; use them with image shapes")
        samples = _drawn(length_mix, mix_samples, shape.uncompressed_visual_tokens)
        total_flops = ragged_step_flops(shape, preset, samples, gradient_checkpointing) * micro_batch / len(samples)
    if tflops is not None:
        rate = tflops
    else:
        rate = gpu.peak_tflops * (mfu if mfu is not None else measured_efficiency(shape, stage, preset))
    forward_s = total_flops * flops.total_forward / flops.total / (rate * 1e12)
    backward_s = total_flops * flops.total_backward / flops.total / (rate * 1e12)
    if collectives is None:
        layout = llava_layout(shape, stage, preset, gradient_checkpointing)
        collectives = step_collectives(layout, zero, world, gradient_checkpointing)
    phases = {
        phase: _comm_seconds([c for c in collectives if c.phase == phase], gpu, world, network)
        for phase in ("forward", "backward", "step")
    }
    hidden = min(overlap.forward * phases["forward"], forward_s)
    hidden += min(overlap.backward * phases["backward"], backward_s)
    comm_s = sum(phases.values())
    optimizer_s = _trainable(shape, stage) / world * OPTIMIZER_BYTES_PER_PARAM / (gpu.hbm_tb_s * 1e12 * HBM_EFFICIENCY)
    by_op: dict[str, float] = defaultdict(float)
    for collective in collectives:
        by_op[collective.op] += collective.wire_bytes(world) / 1e9 if world > 1 else 0.0
    return StepPrediction(
        shape=shape.name,
        stage=stage,
        preset=preset,
        gpu=gpu.name,
        world=world,
        zero=zero.stage,
        micro_batch=micro_batch,
        tflops=total_flops / 1e12,
        achieved_tflops=rate,
        forward_s=forward_s,
        backward_s=backward_s,
        optimizer_s=optimizer_s,
        comm_s=comm_s,
        exposed_comm_s=comm_s - hidden,
        step_s=forward_s + backward_s + comm_s - hidden + optimizer_s,
        sent_gb=sum(by_op.values()),
        collectives=len(collectives),
        comm_by_op_gb=dict(by_op),
    )


# ----- CLI -----

_RECIPE = {  # per-GPU micro-batch and the ZeRO stage of the LLaVA-1.5 / Video-LLaVA recipes (scripts/)
    ("image", "pretrain"): (32, 2),
    ("image", "finetune"): (16, 3),
    ("video", "pretrain"): (32, 2),
    ("video", "finetune"): (16, 2),
}
# LLaVA-1.5's data: 558K LCS captions (pretrain, global batch 256) and the 665K instruction mix (finetune, 128).
PAPER_SAMPLES = {"pretrain": (558_128, 256), "finetune": (665_298, 128)}


def _zero_for(stage: int, shape: ModelShape, paths: Mapping[int, Path | None]) -> ZeroSettings:
    path = paths.get(stage)
    if path is not None and Path(path).exists():
        return zero_settings(path, shape.llm.hidden)
    auto = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    return zero_settings({"zero_optimization": {"stage": stage} | dict.fromkeys(auto, "auto")}, shape.llm.hidden)


def predict_grid(
    shapes: Sequence[str | ModelShape],
    stage: str,
    gpus: Sequence[str],
    zero_stages: Sequence[int],
    worlds: Sequence[int],
    micro_batch: int | None = None,
    presets: Sequence[str] | None = None,
    zero_paths: Mapping[int, Path | None] | None = None,
    **options: Any,
) -> list[StepPrediction]:
    """:func:`predict_step` over a grid; each (shape, preset, ZeRO stage, world)'s collectives are listed once."""
    zero_paths = (
        zero_paths if zero_paths is not None else {2: REPO / "scripts/zero2.json", 3: REPO / "scripts/zero3.json"}
    )
    rows: list[StepPrediction] = []
    for shape in map(get_shape, shapes):
        batch = micro_batch or _RECIPE[(shape.media, stage)][0]
        names = list(presets) if presets else default_presets(shape)
        for zero_stage in zero_stages:
            zero = _zero_for(zero_stage, shape, zero_paths)
            checkpointing = options.get("gradient_checkpointing", True)
            for preset in names:
                layout = llava_layout(shape, stage, preset, checkpointing)
                for world in worlds:
                    collectives = step_collectives(layout, zero, world, checkpointing)
                    for gpu in gpus:
                        row = predict_step(
                            shape, preset, stage, gpu, world, zero, batch, collectives=collectives, **options
                        )
                        rows.append(row)
    return rows


def _saving(row: StepPrediction, rows: Sequence[StepPrediction]) -> float:
    key = (row.shape, row.gpu, row.zero, row.world, "none")
    base = next(r for r in rows if (r.shape, r.gpu, r.zero, r.world, r.preset) == key)
    return 1.0 - row.step_s / base.step_s


def markdown_tables(rows: Sequence[StepPrediction]) -> list[str]:
    """One Markdown table per (shape, GPU, ZeRO stage): step seconds per preset and the saving versus ``none``,
    then the FLOP model's saving (compute only) for reference."""
    lines: list[str] = []
    groups: dict[tuple[str, str, int], list[StepPrediction]] = defaultdict(list)
    for row in rows:
        groups[(row.shape, row.gpu, row.zero)].append(row)
    for (shape, gpu, zero), group in groups.items():
        presets = list(dict.fromkeys(r.preset for r in group))
        first = group[0]
        header = " | ".join(f"{p} s" if p == "none" else f"{p} s (saving)" for p in presets)
        lines += [
            f"#### {shape} {first.stage}, {gpu}, ZeRO-{zero}, micro-batch {first.micro_batch} per GPU",
            "",
            f"| GPUs | sent GB/GPU | {header} |",
            "|---" * (len(presets) + 2) + "|",
        ]
        for world in sorted({r.world for r in group}):
            cells = []
            for preset in presets:
                row = next(r for r in group if r.world == world and r.preset == preset)
                saving = "" if preset == "none" else f" ({_saving(row, group):.1%})"
                cells.append(f"{row.step_s:.3f}{saving}")
            sent = next(r for r in group if r.world == world and r.preset == "none").sent_gb
            lines.append(f"| {world} | {sent:.1f} | " + " | ".join(cells) + " |")
        base = next(r for r in group if r.preset == "none").tflops
        flops = [f"{1 - next(r for r in group if r.preset == p).tflops / base:.1%}" for p in presets if p != "none"]
        lines += [f"| FLOPs only | | | {' | '.join(flops)} |", ""]
    return lines


def paper_setting(
    gpu: str = "A100-80G",
    world: int = 8,
    presets: Sequence[str] | None = None,
    shape: ModelShape | str = "llava-7b",
    **options: Any,
) -> list[tuple[str, float, float, float]]:
    """LLaVA-1.5 trained as the recipe does (pretrain: ZeRO-2, 32 per GPU, 558K samples at global batch 256;
    finetune: ZeRO-3, 16 per GPU, 665K samples at 128) on ``world`` GPUs: ``(preset, pretrain hours, finetune
    hours, saving of the total versus none)`` per preset. Global batches above ``world`` x micro-batch are
    reached by gradient accumulation, which this counts as that many steps (ZeRO traffic per micro-step)."""
    shape = get_shape(shape)
    names = list(presets) if presets else default_presets(shape)
    paths = {2: REPO / "scripts/zero2.json", 3: REPO / "scripts/zero3.json"}
    hours: dict[str, tuple[float, float]] = {}
    for preset in names:
        per_stage = []
        for stage in ("pretrain", "finetune"):
            batch, zero_stage = _RECIPE[(shape.media, stage)]
            row = predict_step(shape, preset, stage, gpu, world, _zero_for(zero_stage, shape, paths), batch, **options)
            samples, global_batch = PAPER_SAMPLES[stage]
            micro_steps = math.ceil(samples / global_batch) * max(1, global_batch // (batch * world))
            per_stage.append(row.step_s * micro_steps / 3600)
        hours[preset] = (per_stage[0], per_stage[1])
    base = sum(hours["none"]) if "none" in hours else math.nan
    return [(preset, pt, ft, 1 - (pt + ft) / base) for preset, (pt, ft) in hours.items()]


def plot_savings(rows: Sequence[StepPrediction], path: Path) -> bool:
    """Saving versus GPU count: one panel per GPU type, a colour per (shape, preset), solid ZeRO-3, dashed ZeRO-2.
    Returns False (and writes nothing) when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not importable: no plot written")
        return False
    gpus = list(dict.fromkeys(r.gpu for r in rows))
    lines = list(dict.fromkeys((r.shape, r.preset) for r in rows if r.preset != "none"))
    colours = plt.get_cmap("tab20")
    figure, axes = plt.subplots(1, len(gpus), figsize=(3.6 * len(gpus) + 2.4, 3.6), sharey=True, squeeze=False)
    for axis, gpu in zip(axes[0], gpus, strict=True):
        series: dict[tuple[str, str, int], list[tuple[int, float]]] = defaultdict(list)
        for row in rows:
            if row.gpu == gpu and row.preset != "none":
                series[(row.shape, row.preset, row.zero)].append((row.world, 100 * _saving(row, rows)))
        for (shape, preset, zero), points in series.items():
            worlds, savings = zip(*sorted(points), strict=True)
            style = {"color": colours(lines.index((shape, preset)) % 20), "linestyle": "-" if zero == 3 else "--"}
            axis.plot(worlds, savings, marker="o", markersize=3, label=f"{shape} {preset} ZeRO-{zero}", **style)
        axis.set_xscale("log", base=2)
        axis.set_title(gpu)
        axis.set_xlabel("GPUs (8 per node)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("predicted step-time saving vs none (%)")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Print predicted step times and savings versus ``none`` on 1-64 GPUs (Markdown), optionally JSON and a plot."""
    parser = argparse.ArgumentParser(prog="python -m llava.bench.scale", description=main.__doc__)
    parser.add_argument("--shapes", default="llava-7b,llava-13b,video-llava-7b")
    parser.add_argument("--stage", default="finetune", choices=["pretrain", "finetune"])
    parser.add_argument("--gpus", default=",".join(GPUS), help=f"GPU types: {', '.join(GPUS)}")
    parser.add_argument("--zero", default="2,3", help="ZeRO stages (2, 3)")
    parser.add_argument("--world", default=",".join(map(str, GPU_COUNTS)), help="GPU counts")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default: the shape's)")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="per GPU (default: recipe, 16 finetune, 32 pretrain)"
    )
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens per sample (default: the shape's)")
    parser.add_argument(
        "--length-mix",
        type=mix_argument,
        default=None,
        help="finetune FLOPs from ragged samples of this mix (llava665k, or a file measured with check_data "
        "--length-mix-out), padding-free",
    )
    parser.add_argument(
        "--mfu", type=float, default=None, help="achieved/peak for every preset (default: H200-measured)"
    )
    parser.add_argument("--tflops", type=float, default=None, help="achieved TFLOP/s per GPU for every preset and GPU")
    parser.add_argument("--overlap-forward", type=float, default=Overlap.forward)
    parser.add_argument("--overlap-backward", type=float, default=Overlap.backward)
    parser.add_argument("--link-efficiency", type=float, default=Network.link_efficiency)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--paper", action="store_true", help="also the paper setting: LLaVA-1.5-7B, 8 A100, both stages"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every prediction here")
    parser.add_argument("--plot", type=Path, default=None, help="write a saving-vs-GPUs plot (PNG) here")
    args = parser.parse_args(argv)
    unknown = [gpu for gpu in _csv(args.gpus) if gpu not in GPUS]
    if unknown:
        parser.error(f"unknown GPU types {unknown}; known: {list(GPUS)}")
    shapes = []
    for name in _csv(args.shapes):
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
        shape = SHAPES[name]
        if args.text_tokens is not None:  # finetune text; pretrain keeps its caption length
            shape = replace(
                shape, text_tokens=args.text_tokens, answer_tokens=min(shape.answer_tokens, args.text_tokens - 1)
            )
        shapes.append(shape)
    options = {
        "network": Network(link_efficiency=args.link_efficiency),
        "overlap": Overlap(args.overlap_forward, args.overlap_backward),
        "mfu": args.mfu,
        "tflops": args.tflops,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "length_mix": args.length_mix,
    }
    gpus, zeros, worlds = _csv(args.gpus), [int(z) for z in _csv(args.zero)], [int(w) for w in _csv(args.world)]
    presets = _csv(args.presets) if args.presets else None
    rows = predict_grid(shapes, args.stage, gpus, zeros, worlds, args.micro_batch, presets, **options)
    print("\n".join(markdown_tables(rows)))
    if args.paper:
        image_shape = next((s for s in shapes if not s.is_video), get_shape("llava-7b"))
        print(
            f"#### Paper setting: {image_shape.name}, 8 GPUs, pretrain (ZeRO-2, 32/GPU) + finetune (ZeRO-3, 16/GPU)\n"
        )
        print("| GPU | preset | pretrain h | finetune h | total saving vs none |\n|---|---|---|---|---|")
        for gpu in gpus:
            for preset, pretrain_h, finetune_h, saving in paper_setting(gpu, 8, presets, image_shape, **options):
                print(f"| {gpu} | {preset} | {pretrain_h:.2f} | {finetune_h:.2f} | {saving:.1%} |")
    if args.json is not None:
        args.json.write_text(
            json.dumps([asdict(row) | {"saving_vs_none": _saving(row, rows)} for row in rows], indent=1)
        )
    if args.plot is not None and plot_savings(rows, args.plot):
        logger.info("wrote %s", args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
