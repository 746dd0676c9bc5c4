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
2. Communication: :func:`step_collectives` lists every collective DeepSpeed 0.19.8 issues in one steady-state
   step (the third and later: ZeRO-3 records its module trace in the first two), with the message size its
   comms logger records. It is a replay of DeepSpeed's own bookkeeping on a :class:`Layout` (the model's
   modules and parameters and the order the forward calls them), not a formula, so the test suite can check
   it byte for byte against DeepSpeed's comms logger on two CPU ranks (tests/test_bench_scale.py).

   * ZeRO-2 (``reduce_scatter: true``, ``use_multi_rank_bucket_allreduce: true``, DeepSpeed's defaults): the
     gradients of the *trainable* parameters (bf16) are all-reduced, not reduce-scattered, in buckets of
     ``reduce_bucket_size`` elements as they become ready in backward (each bucket split further where it
     crosses a rank's partition and exceeds the bucket size); after the optimizer step each optimizer group's
     bf16 partition is all-gathered (group padded to a multiple of 2 x world). Plus three scalar all-reduces
     (overflow flag, gradient norm twice).
   * ZeRO-3: every parameter (frozen ones too) is partitioned, ``ceil(numel / world)`` elements per rank. The
     replay walks the module hooks of one forward and backward (:class:`Call` trees: containers and
     parameter-free modules count, because every hook is a step of DeepSpeed's trace and runs its prefetcher).
     A module's parameters (and any external parameter its forward reads, e.g. the patch embedding weight that
     ``VisionTower.dtype`` reads) are all-gathered (one coalesced call) when it runs and they are not available;
     they are released after it unless persistent (``numel <= stage3_param_persistence_threshold``), still
     held by another active module, reused within ``stage3_max_reuse_distance`` elements of the trace, or
     marked by the prefetcher
     (``stage3_prefetch_bucket_size``, ``stage3_max_live_parameters``), which runs ahead of the forward and keeps
     what it finds already gathered. Gradient checkpointing (torch's non-reentrant checkpoint with early stop,
     transformers' default) recomputes a decoder layer inside the backward of its last module: the layer is
     gathered again unless still held, and the recomputation stops inside that last module (``down_proj``),
     whose release then never runs. Trainable gradients are reduce-scattered in buckets, each parameter padded
     to a multiple of world. After the step every persistent parameter is all-gathered again, one call each,
     and the gradient norm takes two scalar all-reduces.
   * ``auto`` values of scripts/zero{2,3}.json are filled as transformers fills them: ``reduce_bucket_size``
     = hidden^2, ``stage3_prefetch_bucket_size`` = 0.9 hidden^2, ``stage3_param_persistence_threshold`` =
     10 hidden.
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
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from llava.bench.flops import ragged_step_flops, training_step_flops
from llava.bench.shapes import SHAPES, LLMShape, ModelShape, VisionShape, default_presets, get_shape
from llava.compression.config import CompressionConfig, load_compression

__all__ = [
    "GPUS",
    "OPS",
    "Call",
    "Collective",
    "GpuSpec",
    "Layout",
    "Module",
    "Network",
    "Overlap",
    "Param",
    "StepPrediction",
    "ZeroSettings",
    "comms_summary",
    "hook_order",
    "llava_layout",
    "main",
    "markdown_tables",
    "measured_efficiency",
    "paper_setting",
    "plot_savings",
    "predict_grid",
    "predict_step",
    "step_collectives",
    "zero_settings",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
OPS = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")
"""DeepSpeed's names (its comms logger's keys) of the collectives a ZeRO-2/3 training step uses."""
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
DTYPE_BYTES = 2  # bf16 parameters and gradients on the wire
OPTIMIZER_BYTES_PER_PARAM = 32
"""HBM bytes moved per trainable parameter by the AdamW step: fp32 master, m and v read and written (24), the
fp32 gradient read (4), the bf16 parameter written (2), rounded up for the bf16 -> fp32 gradient copy."""
HBM_EFFICIENCY = 0.8
# The ZeRO-2 flat groups are padded to a multiple of this factor x world (DeepSpeed's nccl_start_alignment_factor).
_ZERO2_ALIGNMENT = 2
# Scalar all-reduces per optimizer step (bytes each), as DeepSpeed 0.19.8 issues them with gradient clipping on:
# ZeRO-2: the overflow flag (uint8) and the gradient norm (fp32, data-parallel + model-parallel group);
# ZeRO-3: the gradient norm in fp64, twice likewise.
_STEP_SCALARS = {2: (1, 4, 4), 3: (8, 8)}


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


# ----- the model as DeepSpeed sees it -----


@dataclass(frozen=True)
class Param:
    """One parameter: element count, whether it trains, and its optimizer group (transformers: no weight decay
    for biases and norm weights)."""

    name: str
    numel: int
    trainable: bool
    decay: bool = True


@dataclass(frozen=True)
class Module:
    """A module with parameters of its own (DeepSpeed hooks every module; one without parameters costs nothing)."""

    name: str
    params: tuple[Param, ...]


@dataclass(frozen=True)
class Call:
    """One forward call of a module and the calls it makes (DeepSpeed hooks every module, containers and
    parameter-free ones too: each hook is a step of its trace and triggers its prefetcher).

    ``grad``: gradients reach the call's output (its backward pre-hook runs); ``grad_input``: they reach its input
    (its backward post-hook runs and releases it; default ``grad``); ``block``: gradient checkpointing
    recomputes the call inside its backward (a decoder layer); ``recompute_hooks``: the recomputation runs the
    module's own hooks too (``torch.utils.checkpoint.checkpoint(module, ...)`` does; transformers checkpoints a
    layer's ``forward``, so only its children's hooks run again).
    """

    module: str
    grad: bool = False
    children: tuple[Call, ...] = ()
    block: bool = False
    grad_input: bool | None = None
    recompute_hooks: bool = True

    @property
    def releases_in_backward(self) -> bool:
        """Whether the backward post-hook runs (else DeepSpeed releases the module after the whole backward)."""
        return self.grad if self.grad_input is None else self.grad_input

    def walk(self) -> Iterable[Call]:
        """This call and every call under it, in forward order."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class Layout:
    """Modules in registration order (DeepSpeed's parameter ids, the optimizer groups' order; modules without
    parameters may be listed with none) and the forward's top-level calls in execution order.

    ``external``: ``(module, parameter name)`` pairs, a parameter of another module that ``module``'s forward
    reads directly (not through the owner's call). ZeRO-3 gathers it on that read, registers it as an external
    parameter of ``module`` and gathers it with ``module`` from then on.
    """

    modules: tuple[Module, ...]
    calls: tuple[Call, ...]
    external: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        names = {module.name for module in self.modules}
        missing = sorted({call.module for top in self.calls for call in top.walk()} - names)
        params = {param.name for module in self.modules for param in module.params}
        missing += sorted(
            f"{module}/{param}" for module, param in self.external if module not in names or param not in params
        )
        if missing:
            raise ValueError(f"the layout lacks modules or parameters it names: {missing[:5]}")

    @property
    def params(self) -> list[Param]:
        """Every parameter in registration order."""
        return [param for module in self.modules for param in module.params]

    def numel(self, trainable: bool | None = None) -> int:
        """Parameters in total (``trainable=None``), trainable or frozen."""
        return sum(p.numel for p in self.params if trainable is None or p.trainable == trainable)


@dataclass(frozen=True)
class ZeroSettings:
    """The ``zero_optimization`` values that decide traffic (DeepSpeed's defaults where a config is silent)."""

    stage: int
    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000


def zero_settings(config: Mapping[str, Any] | str | Path, hidden_size: int) -> ZeroSettings:
    """:class:`ZeroSettings` of a DeepSpeed config (dict or JSON path), ``auto`` filled as transformers fills it
    for a model of width ``hidden_size``."""
    if not isinstance(config, Mapping):
        config = json.loads(Path(config).read_text())
    zero = dict(config.get("zero_optimization", {}))
    auto = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in auto.items():
        if zero.get(key) == "auto":
            zero[key] = value
    names = {
        "reduce_bucket_size": "reduce_bucket_size",
        "stage3_prefetch_bucket_size": "prefetch_bucket_size",
        "stage3_param_persistence_threshold": "param_persistence_threshold",
        "stage3_max_live_parameters": "max_live_parameters",
        "stage3_max_reuse_distance": "max_reuse_distance",
    }
    values = {field_name: int(float(zero[key])) for key, field_name in names.items() if key in zero}
    stage = int(zero.get("stage", 0))
    if stage not in (2, 3):
        raise ValueError(f"only ZeRO stages 2 and 3 are modelled, got {stage}")
    return ZeroSettings(stage=stage, **values)


@dataclass(frozen=True)
class Collective:
    """One collective call: DeepSpeed's op name, the message size its comms logger records (all-gather: the
    rank's input shard; reduce-scatter and all-reduce: the whole buffer), and the phase it runs in
    (``forward``, ``backward`` or ``step``: after backward)."""

    op: str
    logged_bytes: int
    phase: str

    def buffer_bytes(self, world: int) -> int:
        """Size of the whole gathered / reduced buffer."""
        return self.logged_bytes * world if self.op == "all_gather_into_tensor" else self.logged_bytes

    def wire_bytes(self, world: int) -> float:
        """Bytes each GPU sends with the ring algorithm."""
        share = (world - 1) / world
        return self.buffer_bytes(world) * share * (2 if self.op == "all_reduce" else 1)


def comms_summary(collectives: Iterable[Collective]) -> dict[str, dict[int, int]]:
    """``op -> message size -> count``: the shape of DeepSpeed's ``comms_logger.comms_dict`` (its counts)."""
    summary: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for collective in collectives:
        summary[collective.op][collective.logged_bytes] += 1
    return {op: dict(sizes) for op, sizes in summary.items()}


def _shard(numel: int, world: int) -> int:
    return -(-numel // world)


def _grad_order(layout: Layout, params_reversed: bool) -> list[Param]:
    """Trainable parameters in the order their gradients are complete: by each module's last backward (a module
    called twice accumulates both), within a module reversed (ZeRO-2: a Linear's bias before its weight) or not."""
    done: dict[str, int] = {}
    for index, module in enumerate(_backward_leaf_order(layout)):
        done[module] = index
    by_name = {module.name: module for module in layout.modules}
    ordered: list[Param] = []
    for name in sorted(done, key=done.__getitem__):
        params = [p for p in by_name[name].params if p.trainable]
        ordered.extend(reversed(params) if params_reversed else params)
    missing = {p.name for p in layout.params if p.trainable} - {p.name for p in ordered}
    if missing:
        raise ValueError(f"trainable parameters no gradient-carrying call reaches: {sorted(missing)[:5]}")
    return ordered


def _backward_leaf_order(layout: Layout) -> list[str]:
    """Every gradient-carrying leaf call's module, in the order its backward runs."""
    return [module for module, event, _ in _trace(layout, False) if event == "backward"]


def _buckets(params: Sequence[Param], bucket_size: int) -> list[list[Param]]:
    """Greedy buckets as DeepSpeed fills them: a parameter that would overflow a non-empty bucket flushes it
    first; one larger than a bucket goes alone."""
    buckets: list[list[Param]] = []
    current: list[Param] = []
    elements = 0
    for param in params:
        if current and elements + param.numel > bucket_size:
            buckets.append(current)
            current, elements = [], 0
        current.append(param)
        elements += param.numel
    if current:
        buckets.append(current)
    return buckets


def _optimizer_groups(layout: Layout) -> list[list[Param]]:
    """transformers' AdamW groups (weight decay, no weight decay) of the trainable parameters; empty ones dropped."""
    trainable = [p for p in layout.params if p.trainable]
    groups = [[p for p in trainable if p.decay], [p for p in trainable if not p.decay]]
    return [group for group in groups if group]


def _zero2(layout: Layout, zero: ZeroSettings, world: int, dtype_bytes: int) -> list[Collective]:
    """ZeRO-2: bucketed gradient all-reduces in backward, then each group's partition all-gathered."""
    alignment = _ZERO2_ALIGNMENT * world
    owner: dict[str, list[tuple[int, int]]] = {}  # param -> [(partition, elements)] in flat order
    gathers: list[Collective] = []
    for group in _optimizer_groups(layout):
        padded = -(-sum(p.numel for p in group) // alignment) * alignment
        partition = padded // world
        offset = 0
        for param in group:
            pieces = []
            for rank in range(offset // partition, (offset + param.numel - 1) // partition + 1):
                start, end = max(offset, rank * partition), min(offset + param.numel, (rank + 1) * partition)
                pieces.append((rank, end - start))
            owner[param.name] = pieces
            offset += param.numel
        if world > 1:
            gathers.append(Collective("all_gather_into_tensor", partition * dtype_bytes, "step"))
    reduces: list[Collective] = []
    for bucket in _buckets(_grad_order(layout, params_reversed=True), zero.reduce_bucket_size):
        slices: list[list[int]] = []  # [partition, elements]; a run owned by one rank is one slice
        for param in bucket:
            for rank, elements in owner[param.name]:
                if slices and slices[-1][0] == rank:
                    slices[-1][1] += elements
                else:
                    slices.append([rank, elements])
        pending = 0
        for _, elements in slices:
            pending += elements
            if pending > zero.reduce_bucket_size:
                reduces.append(Collective("all_reduce", pending * dtype_bytes, "backward"))
                pending = 0
        if pending:
            reduces.append(Collective("all_reduce", pending * dtype_bytes, "backward"))
    scalars = [Collective("all_reduce", size, "step") for size in _STEP_SCALARS[2]]
    return reduces + gathers + scalars


def _last_leaf(call: Call) -> Call:
    return _last_leaf(call.children[-1]) if call.children else call


def _forward_events(call: Call, phase: str, stop: Call | None = None) -> tuple[list[tuple[str, str, str]], bool]:
    """``fetch`` and ``release`` events of ``call`` and its children; with ``stop``, they end at ``stop``'s fetch
    (checkpoint early stop: the recomputation ends there and no post-hook of an enclosing module runs)."""
    events = [(call.module, "fetch", phase)]
    if call is stop:
        return events, True
    for child in call.children:
        child_events, stopped = _forward_events(child, phase, stop)
        events += child_events
        if stopped:
            return events, True
    events.append((call.module, "release", phase))
    return events, False


def _backward_events(call: Call, checkpointing: bool, pending: list[Call]) -> list[tuple[str, str, str]]:
    """Backward hooks of ``call`` (pre-hook fetch, children in reverse, post-hook release). In a checkpointed
    block the first leaf reached (its last one) recomputes the block right after its pre-hook, up to that leaf."""
    if not call.grad:
        return []
    events = [(call.module, "fetch", "backward")]
    if call.block and checkpointing:
        pending.append(call)
    if not call.children:
        if pending:  # the first leaf reached in a checkpointed block: its backward needs the recomputation
            block = pending.pop()
            stop = _last_leaf(block)
            for replayed in (block,) if block.recompute_hooks else block.children:
                replay, stopped = _forward_events(replayed, "recompute", stop)
                events += replay
                if stopped:
                    break
        events.append((call.module, "backward", "backward"))
    for child in reversed(call.children):
        events += _backward_events(child, checkpointing, pending)
    if call.releases_in_backward:
        events.append((call.module, "release", "backward"))
    return events


def hook_order(layout: Layout, gradient_checkpointing: bool = True) -> list[tuple[str, str]]:
    """The modules' pre-hooks in one forward + backward, as ``(phase, module)``: ``forward``, ``recompute``
    (gradient checkpointing's replay inside backward) or ``backward``. What DeepSpeed's ZeRO-3 trace records."""
    events = _trace(layout, gradient_checkpointing)
    return [(phase, module) for module, event, phase in events if event == "fetch"]


def _trace(layout: Layout, checkpointing: bool) -> list[tuple[str, str, str]]:
    """``(module, event, phase)`` of one forward + backward in hook order: ``fetch`` (pre-hook), ``release``
    (post-hook), ``backward`` (the module's gradients are computed)."""
    events: list[tuple[str, str, str]] = []
    for call in layout.calls:
        events += _forward_events(call, "forward")[0]
    pending: list[Call] = []
    for call in reversed(layout.calls):
        events += _backward_events(call, checkpointing, pending)
    return events


def _zero3(layout: Layout, zero: ZeroSettings, world: int, dtype_bytes: int, checkpointing: bool) -> list[Collective]:
    """ZeRO-3: the all-gathers DeepSpeed's parameter coordinator issues over a complete trace, the gradient
    reduce-scatters, the persistent parameters' re-gather after the step."""
    params_of = {module.name: module.params for module in layout.modules}
    by_name = {param.name: param for param in layout.params}
    for module, name in layout.external:
        params_of[module] = (*params_of[module], by_name[name])
    persistent = {p.name for p in layout.params if p.numel <= zero.param_persistence_threshold}
    events = [(module, event, phase) for module, event, phase in _trace(layout, checkpointing) if event != "backward"]
    fetches = [module for module, event, _ in events if event == "fetch"]
    queue = deque((param, step) for step, module in enumerate(fetches) for param in params_of[module])
    fetched_for: dict[str, float] = defaultdict(lambda: -math.inf)  # the latest step a param was fetched for
    active: dict[str, set[str]] = defaultdict(set)  # param -> modules that fetched it and have not released it
    available = set(persistent)  # steady state: persistent parameters were gathered after the last step
    live = 0  # elements gathered in this step and not released (persistent ones are not counted)
    collectives: list[Collective] = []

    def gather(params: Iterable[Param], phase: str) -> int:
        params = list(params)
        size = sum(_shard(p.numel, world) for p in params) * dtype_bytes
        collectives.append(Collective("all_gather_into_tensor", size, "forward" if phase == "forward" else "backward"))
        available.update(p.name for p in params)
        return sum(p.numel for p in params)

    step = 0  # fetches so far: DeepSpeed's step id
    for module, event, phase in events:
        params = params_of[module]
        if event == "release":
            release = {p.name: p for p in params if p.name not in persistent and fetched_for[p.name] <= step}
            traversed = 0
            for later in fetches[step:]:
                if traversed >= zero.max_reuse_distance or not release:
                    break
                for param in params_of[later]:
                    release.pop(param.name, None)
                    traversed += param.numel
            for param in params:
                active[param.name].discard(module)
                if param.name in release and param.name in available and not active[param.name]:
                    available.discard(param.name)
                    live -= param.numel
            continue
        missing = [p for p in params if p.name not in available]
        if missing:
            live += gather(missing, phase)
        for param in params:
            active[param.name].add(module)
        for _ in [p for p in params if fetched_for[p.name] < step]:  # this module's entries leave the queue
            param, used_at = queue.popleft()
            fetched_for[param.name] = used_at
        if zero.prefetch_bucket_size > 0:
            budget = min(zero.max_live_parameters - live, zero.prefetch_bucket_size)
            prefetch: dict[str, Param] = {}
            numel = 0
            while queue and numel < budget:
                param, used_at = queue.popleft()
                fetched_for[param.name] = max(fetched_for[param.name], used_at)
                if param.name not in available and param.name not in prefetch:
                    prefetch[param.name] = param
                    numel += param.numel
            if prefetch:
                live += gather(prefetch.values(), phase)
        step += 1
    for bucket in _buckets(_grad_order(layout, params_reversed=False), zero.reduce_bucket_size):
        size = sum(_shard(p.numel, world) for p in bucket) * world * dtype_bytes
        collectives.append(Collective("reduce_scatter_tensor", size, "backward"))
    for param in layout.params:
        if param.name in persistent:
            size = _shard(param.numel, world) * dtype_bytes
            collectives.append(Collective("all_gather_into_tensor", size, "step"))
    collectives.extend(Collective("all_reduce", size, "step") for size in _STEP_SCALARS[3])
    return collectives


def step_collectives(
    layout: Layout,
    zero: ZeroSettings,
    world: int,
    gradient_checkpointing: bool = True,
    dtype_bytes: int = DTYPE_BYTES,
) -> list[Collective]:
    """Every collective of one steady-state training step (one micro-batch per rank) of ``layout`` under ``zero``
    on ``world`` data-parallel ranks, as DeepSpeed 0.19.8 issues it, bf16 (``dtype_bytes`` = 2) parameters and
    gradients. This is the function the cluster tables use and the test suite checks against DeepSpeed."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if zero.stage == 2:
        return _zero2(layout, zero, world, dtype_bytes)
    if zero.stage == 3:
        return _zero3(layout, zero, world, dtype_bytes, gradient_checkpointing)
    raise ValueError(f"only ZeRO stages 2 and 3 are modelled, got {zero.stage}")


# ----- LLaVA layouts from a ModelShape -----


def _linear(name: str, d_in: int, d_out: int, trainable: bool, bias: bool) -> Module:
    params = [Param(f"{name}.weight", d_in * d_out, trainable)]
    if bias:
        params.append(Param(f"{name}.bias", d_out, trainable, decay=False))
    return Module(name, tuple(params))


def _norm(name: str, width: int, trainable: bool, bias: bool) -> Module:
    params = [Param(f"{name}.weight", width, trainable, decay=False)]
    if bias:
        params.append(Param(f"{name}.bias", width, trainable, decay=False))
    return Module(name, tuple(params))


_SCORING = ("q_proj", "k_proj")  # V2V's and T2V's scoring calls: the layer's first norm, then these


def _calls(prefix: str, names: Iterable[str], grad: bool = False) -> tuple[Call, ...]:
    return tuple(Call(f"{prefix}.{name}", grad) for name in names)


def _clip(prefix: str, vision: VisionShape, v2v: bool) -> tuple[list[Module], list[Call]]:
    """A frozen CLIP vision model named as ``VisionTower`` holds it (all its layers and post-layernorm exist; only
    ``layers_run`` run, without gradients) and its calls; with V2V, the scoring calls on the feature layer's
    first norm, q and k before that layer runs."""
    d, inter = vision.hidden, vision.intermediate
    model = f"{prefix}.vision_model"
    embeddings = f"{model}.embeddings"
    modules = [
        Module(embeddings, (Param(f"{embeddings}.class_embedding", d, False),)),
        Module(f"{embeddings}.patch_embedding", (Param(f"{embeddings}.patch", 3 * vision.patch_size**2 * d, False),)),
        Module(f"{embeddings}.position_embedding", (Param(f"{embeddings}.pos", (vision.num_patches + 1) * d, False),)),
        _norm(f"{model}.pre_layrnorm", d, False, bias=True),
    ]
    calls = [Call(embeddings, children=_calls(embeddings, ("patch_embedding", "position_embedding")))]
    calls.append(Call(f"{model}.pre_layrnorm"))
    for index in range(vision.num_layers):
        layer = f"{model}.encoder.layers.{index}"
        modules += [Module(layer, ()), Module(f"{layer}.self_attn", ())]
        modules += [_linear(f"{layer}.self_attn.{name}", d, d, False, True) for name in ("k_proj", "v_proj", "q_proj")]
        modules += [
            _linear(f"{layer}.self_attn.out_proj", d, d, False, True),
            _norm(f"{layer}.layer_norm1", d, False, True),
        ]
        modules += [Module(f"{layer}.mlp", ()), Module(f"{layer}.mlp.activation_fn", ())]
        modules += [
            _linear(f"{layer}.mlp.fc1", d, inter, False, True),
            _linear(f"{layer}.mlp.fc2", inter, d, False, True),
        ]
        modules.append(_norm(f"{layer}.layer_norm2", d, False, True))
        if index >= vision.layers_run:
            continue
        if v2v and index == vision.layers_run - 1:
            calls += _calls(layer, ("layer_norm1", *(f"self_attn.{name}" for name in _SCORING)))
        attention = Call(
            f"{layer}.self_attn", children=_calls(f"{layer}.self_attn", ("q_proj", "k_proj", "v_proj", "out_proj"))
        )
        mlp = Call(f"{layer}.mlp", children=_calls(f"{layer}.mlp", ("fc1", "activation_fn", "fc2")))
        calls.append(Call(layer, children=(Call(f"{layer}.layer_norm1"), attention, Call(f"{layer}.layer_norm2"), mlp)))
    modules.append(_norm(f"{model}.post_layernorm", d, False, bias=True))
    return modules, calls


_LLM = "language_model.model"


def _llama(llm: LLMShape, trainable: bool, scored: set[int]) -> tuple[list[Module], list[Call]]:
    """Vicuna/LLaMA modules (registration order) and the decoder + head calls as the model's stage loop makes
    them: rotary tables at each stage start (after T2V's scoring calls before a boundary layer), each layer a
    checkpointed block (transformers checkpoints its ``forward``), gradients through all of it in every stage."""
    d, kv, inter = llm.hidden, llm.kv_heads * llm.head_dim, llm.intermediate
    modules = [Module(f"{_LLM}.embed_tokens", (Param(f"{_LLM}.embed_tokens.weight", llm.vocab * d, trainable),))]
    calls: list[Call] = [Call(f"{_LLM}.rotary_emb")]
    attention_dims = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}
    mlp_dims = {"gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    for index in range(llm.num_layers):
        layer = f"{_LLM}.layers.{index}"
        modules += [Module(layer, ()), Module(f"{layer}.self_attn", ())]
        modules += [_linear(f"{layer}.self_attn.{n}", *dims, trainable, False) for n, dims in attention_dims.items()]
        modules.append(Module(f"{layer}.mlp", ()))
        modules += [_linear(f"{layer}.mlp.{n}", *dims, trainable, False) for n, dims in mlp_dims.items()]
        modules.append(Module(f"{layer}.mlp.act_fn", ()))
        norms = ("input_layernorm", "post_attention_layernorm")
        modules += [_norm(f"{layer}.{name}", d, trainable, bias=False) for name in norms]
        if index in scored:
            calls += _calls(layer, ("input_layernorm", *(f"self_attn.{name}" for name in _SCORING)))
            calls.append(Call(f"{_LLM}.rotary_emb"))
        attention = Call(f"{layer}.self_attn", True, _calls(f"{layer}.self_attn", attention_dims, True))
        mlp = Call(f"{layer}.mlp", True, _calls(f"{layer}.mlp", ("gate_proj", "act_fn", "up_proj", "down_proj"), True))
        children = (Call(f"{layer}.{norms[0]}", True), attention, Call(f"{layer}.{norms[1]}", True), mlp)
        calls.append(Call(layer, True, children, block=True, recompute_hooks=False))
    modules += [_norm(f"{_LLM}.norm", d, trainable, bias=False), Module(f"{_LLM}.rotary_emb", ())]
    modules.append(_linear("language_model.lm_head", d, llm.vocab, trainable, bias=False))
    calls += [Call(f"{_LLM}.norm", True), Call("language_model.lm_head", True)]
    return modules, calls


def _projector(shape: ModelShape) -> tuple[list[Module], Call]:
    """The trained projector (``nn.Sequential``: linear, GELU, linear, ...); its input carries no gradient."""
    modules = [Module("projector", ())]
    for index, (d_in, d_out) in enumerate(_projector_dims(shape)):
        if index:
            modules.append(Module(f"projector.{2 * index - 1}", ()))  # GELU
        modules.append(_linear(f"projector.{2 * index}", d_in, d_out, True, bias=True))
    children = tuple(Call(m.name, True, grad_input=m.name != "projector.0") for m in modules[1:])
    return modules, Call("projector", True, children, grad_input=False)


def _projector_dims(shape: ModelShape) -> list[tuple[int, int]]:
    d_vision, d_text = shape.vision.hidden, shape.llm.hidden
    if shape.projector == "linear":
        return [(d_vision, d_text)]
    if shape.projector.startswith("mlp") and shape.projector.endswith("x_gelu"):
        depth = int(shape.projector[3 : -len("x_gelu")])
        return [(d_vision, d_text)] + [(d_text, d_text)] * (depth - 1)
    raise ValueError(f"projector {shape.projector!r} is not modelled")


def llava_layout(
    shape: ModelShape | str,
    stage: str,
    compression: CompressionConfig | Mapping[str, Any] | str | None = None,
    gradient_checkpointing: bool = True,
) -> Layout:
    """The :class:`Layout` of a LLaVA (or Video-LLaVA) model of ``shape`` in training ``stage``: towers frozen,
    the projector trained, the LLM with its embeddings and head trained in ``finetune`` (frozen, but
    back-propagated through, in ``pretrain``). ``compression`` adds V2V's and T2V's scoring calls. With
    ``gradient_checkpointing`` the trainer makes the token embeddings' output require grad (so their backward
    hook runs even when they are frozen).

    Forward order as the model runs it: text embeddings, image tower (a video shape's idle blank image) and
    projector, video tower and projector again (video shapes), decoder layers (T2V scoring before each boundary
    layer), final norm, lm_head; all inside the top-level module's call."""
    shape = get_shape(shape)
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage must be 'pretrain' or 'finetune' (LoRA is not modelled), got {stage!r}")
    config = load_compression(compression)
    v2v = config.v2v is not None
    modules = [Module("", ())]
    tower_modules, image_calls = _clip("vision_tower", shape.vision, v2v)
    modules += tower_modules
    video_calls: list[Call] = []
    if shape.video is not None:
        tower_modules, video_calls = _clip("video_tower", shape.video, v2v)
        modules += tower_modules
    projector_modules, projector = _projector(shape)
    modules += projector_modules
    scored: set[int] = set()
    if config.t2v is not None:
        scored = {layer for layer in config.t2v.boundary_layers(shape.llm.num_layers) if layer < shape.llm.num_layers}
    tune_llm = stage == "finetune"
    llm_modules, decoder_calls = _llama(shape.llm, tune_llm, scored)
    modules += llm_modules
    embed = Call(f"{_LLM}.embed_tokens", tune_llm or gradient_checkpointing, grad_input=False)
    calls = [embed, *image_calls, projector]
    if shape.video is not None:  # a video shape's batch runs the image tower on an idle blank image first
        calls += [*video_calls, projector]
    root = Call("", True, (*calls, *decoder_calls), grad_input=False)
    # VisionTower.dtype reads the patch embedding's weight inside the model's own forward: an external parameter
    towers = ("vision_tower", "video_tower") if shape.video is not None else ("vision_tower",)
    external = tuple(("", f"{tower}.vision_model.embeddings.patch") for tower in towers)
    return Layout(tuple(modules), (root,), external)


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
    from llava.bench.length_mix import draw_lengths

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
        "--length-mix", default=None, help="finetune FLOPs from ragged samples of this mix (llava665k), padding-free"
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
