"""What DeepSpeed sends in one ZeRO-2/3 training step, replayed from a model's layout (pure arithmetic).

Why: compression cuts compute but not the ZeRO traffic; :mod:`llava.bench.scale` adds this traffic to the FLOP
model's compute to predict step times on clusters. The replay is checked byte for byte against DeepSpeed's comms
logger on two CPU ranks (tests/test_bench_scale.py).

Communication: :func:`step_collectives` lists every collective DeepSpeed 0.19.8 issues in one steady-state
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
"""

from __future__ import annotations

import json
import math
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava.bench.shapes import LLMShape, ModelShape, VisionShape, get_shape
from llava.compression.config import CompressionConfig, load_compression

__all__ = [
    "OPS",
    "Call",
    "Collective",
    "Layout",
    "Module",
    "Param",
    "ZeroSettings",
    "comms_summary",
    "hook_order",
    "llava_layout",
    "step_collectives",
    "zero_settings",
]

DTYPE_BYTES = 2  # bf16 parameters and gradients on the wire
OPS = ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce")
"""DeepSpeed's names (its comms logger's keys) of the collectives a ZeRO-2/3 training step uses."""
# The ZeRO-2 flat groups are padded to a multiple of this factor x world (DeepSpeed's nccl_start_alignment_factor).
_ZERO2_ALIGNMENT = 2
# Scalar all-reduces per optimizer step (bytes each), as DeepSpeed 0.19.8 issues them with gradient clipping on:
# ZeRO-2: the overflow flag (uint8) and the gradient norm (fp32, data-parallel + model-parallel group);
# ZeRO-3: the gradient norm in fp64, twice likewise.
_STEP_SCALARS = {2: (1, 4, 4), 3: (8, 8)}


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
