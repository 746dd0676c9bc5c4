"""Kernel launches of one static decode step (the step a CUDA graph replays), per region.

A graph removes the host's launch cost but not the GPU's per-kernel cost: at batch 1 a decode step is
hundreds of tiny kernels, so their number bounds the tokens per second. This counts them for one
:meth:`~llava.model.fast_generation.FastDecoder.step` after a compressed prefill, attributed to regions:
``embed``, ``rotary`` (the RoPE tables), ``mask`` (the per-stage decode masks), ``rmsnorm`` (every layer's
two norms and the final one), ``attention`` (projections, RoPE application, cache writes, SDPA),
``mlp``, ``residual`` (the layers' own additions), ``lm_head`` and ``other`` (state updates, logits copy).

What is counted: on CUDA, the device kernels the profiler sees (``kernels``). Everywhere, ``launch ops``:
the outermost aten ops that compute, looking through views, allocations, no-op conversions (``aten::to``
to the same dtype) and composites (``linear`` counts as its ``mm``); each one is a kernel launch on CUDA,
give or take a library's split into two (cuBLAS split-K). The count does not depend
on the model's width, so a model with LLaMA-7B's depth and a tiny width (``llava-7b-depth``) gives
LLaVA-1.5-7B's count on a CPU in seconds. Use ``--dtype bf16`` for the GPU's count (fp32 skips the
norms' up- and down-casts).

    python -m llava.bench.decode_profile --shape llava-7b-depth --presets none,duet_128,pdrop_128 \
        --dtype bf16 --out runs/bench/decode-profile.json
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from llava.bench import report
from llava.bench.infer_speed import build_prompts
from llava.bench.prefill_profile import add_runtime_options
from llava.bench.shapes import SHAPES, LLMShape, ModelShape, VisionShape, build_model, get_shape
from llava.bench.workload import move_batch, resolve_presets
from llava.model.decoder import decoder_of
from llava.model.fast_generation import FastDecoder

if TYPE_CHECKING:
    from llava.model.decoder import CompiledDecodeStep

logger = logging.getLogger(__name__)

DEPTH_SHAPES = {
    "llava-7b-depth": ModelShape(
        name="llava-7b-depth",
        # LLaVA-1.5's token geometry (576 patches) on a narrow tower, so the presets select as on the real model.
        vision=VisionShape(num_layers=4, hidden=128, intermediate=512, heads=4),
        # Vicuna-7B's depth and attention layout (32 layers, as many key/value heads as query heads), tiny width.
        llm=LLMShape(num_layers=32, hidden=128, intermediate=344, heads=4, kv_heads=4, vocab=32000),
    ),
}
"""Shapes with a real model's depth and a tiny width: the same kernels per step as the real model."""

REGION_PREFIX = "decode::"
STEP_LABEL = f"{REGION_PREFIX}step"
REGIONS = ("embed", "rotary", "mask", "rmsnorm", "attention", "mlp", "residual", "lm_head", "compiled", "other")
COMPILED_KERNEL_MARKS = ("cpp_fused", "triton_")
"""Profiler event names of inductor's generated kernels (CPU: with ``cpp.enable_kernel_profile``)."""
_VIEWS = (
    "view", "_unsafe_view", "as_strided", "transpose", "t", "permute", "expand", "expand_as", "unsqueeze", "squeeze",
    "slice", "select", "narrow", "reshape", "_reshape_alias", "flatten", "unflatten", "view_as", "split",
    "split_with_sizes", "chunk", "unbind", "alias", "detach", "resolve_conj", "resolve_neg", "numpy_T",
)  # fmt: skip
_ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "resize_", "lift_fresh")
_COMPOSITES = (
    "to", "_to_copy", "contiguous", "clone", "linear", "matmul", "scaled_dot_product_attention", "dropout",
    "full", "full_like", "zeros", "zeros_like", "new_zeros", "new_full", "ones", "ones_like", "scalar_tensor",
    "result_type", "is_nonzero", "_has_compatible_shallow_copy_type",
)  # fmt: skip
PASS_THROUGH = frozenset(f"aten::{name}" for name in (*_VIEWS, *_ALLOCATIONS, *_COMPOSITES))
"""aten ops that launch no kernel themselves: views, allocations, and composites whose work (if any) is done by
the ops they call (``to`` that converts calls ``copy_``, ``linear`` calls ``addmm`` or ``mm``, ``full`` calls
``fill_``). Any other aten op counts once, without its own sub-ops: those are CPU implementation details
(``mean`` is ``sum`` and ``div_`` on a CPU, one reduction kernel on CUDA)."""


def depth_or_named_shape(name: str) -> ModelShape:
    """A shape of :data:`DEPTH_SHAPES` or of :data:`llava.bench.shapes.SHAPES`."""
    return DEPTH_SHAPES[name] if name in DEPTH_SHAPES else get_shape(name)


@contextmanager
def labelled_modules(model: nn.Module, inside_decoder: bool = True) -> Iterator[None]:
    """Wrap the model's modules in profiler labels (forward hooks, removed on exit); the mask region is
    recognised by its function on the call stack. ``inside_decoder=False`` labels the embeddings and the LM
    head only (a compiled decoder step runs no hooks of its own)."""
    decoder = decoder_of(model.language_model)
    modules: list[tuple[nn.Module, str]] = [
        (model.get_input_embeddings(), "embed"),
        (model.get_output_embeddings(), "lm_head"),
    ]
    if inside_decoder:
        modules += [(decoder.rotary_emb, "rotary"), (decoder.norm, "rmsnorm")]
    for layer in decoder.layers if inside_decoder else ():
        modules += [
            (layer, "residual"),  # what a layer runs outside its submodules: the residual additions
            (layer.input_layernorm, "rmsnorm"),
            (layer.post_attention_layernorm, "rmsnorm"),
            (layer.self_attn, "attention"),
            (layer.mlp, "mlp"),
        ]
    open_labels: list[Any] = []
    handles = []

    def enter(label: str):
        def hook(module: nn.Module, args: Any) -> None:
            context = record_function(REGION_PREFIX + label)
            context.__enter__()
            open_labels.append(context)

        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        open_labels.pop().__exit__(None, None, None)

    for module, label in modules:
        handles.append(module.register_forward_pre_hook(enter(label)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _launch_ops(event: Any) -> list[Any]:
    """The kernel-launching ops at or below ``event``: the outermost aten ops, looking through
    :data:`PASS_THROUGH` ops and profiler labels, and inductor's generated kernels."""
    if event.name.startswith("aten::") and event.name not in PASS_THROUGH:
        return [event]
    if any(mark in event.name for mark in COMPILED_KERNEL_MARKS):
        return [event]
    return [op for child in event.cpu_children for op in _launch_ops(child)]


def _region(event: Any) -> str:
    """The innermost region around ``event``: a module label, the compiled step, or the mask function (its
    Python frame, recorded with ``with_stack``); ``other`` outside all of them."""
    node = event
    while node is not None and node.name != STEP_LABEL:
        if node.name.startswith(REGION_PREFIX):
            return node.name.removeprefix(REGION_PREFIX)
        if node.name.startswith("Torch-Compiled Region"):
            return "compiled"
        if "decode_step_mask" in node.name:
            return "mask"
        node = node.cpu_parent
    return "other"


def count_step(
    decoder: FastDecoder, runner: Any, repeats: int, device: torch.device, compiled: CompiledDecodeStep | None = None
) -> dict[str, dict[str, float]]:
    """Per region, per decode step: launch ops (CPU estimate), CUDA kernels, and the most frequent launch
    ops of the region (``top``). The runner's state is restored after every step. With ``compiled``, the
    decoder part of the step is that compiled step (compiled at the warm-up step)."""
    model = decoder.model
    saved = runner.state.snapshot()

    def step() -> None:
        if compiled is None:
            decoder.step(runner)
            return
        hidden = compiled(model.get_input_embeddings()(runner.tokens.unsqueeze(1)), runner.state, decoder.cache)
        runner.logits.copy_(model.get_output_embeddings()(hidden)[:, -1])

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), labelled_modules(model, inside_decoder=compiled is None):
        step()  # warm-up (and compilation)
        runner.state.restore(saved)
        with profile(activities=activities, with_stack=True) as profiler:
            for _ in range(repeats):
                with record_function(STEP_LABEL):
                    step()
                runner.state.restore(saved)
            report.synchronize(device)
    steps = [event for event in profiler.events() if event.name == STEP_LABEL]
    totals: dict[str, Counter] = defaultdict(Counter)
    kernels: Counter = Counter()
    for step in steps:
        for op in _launch_ops(step):
            totals[_region(op)][op.name] += 1
    for event in profiler.events():
        if event.kernels and _inside(event, STEP_LABEL):
            kernels[_region(event)] += len(event.kernels)
    return {
        region: {
            "launch_ops": sum(totals[region].values()) / repeats,
            "kernels": kernels[region] / repeats if device.type == "cuda" else None,
            "top": _most_frequent(totals[region], repeats),
        }
        for region in REGIONS
        if totals[region] or kernels[region]
    }


def _most_frequent(ops: Counter, repeats: int, shown: int = 4) -> str:
    """``"mm 128, mul 96"``: the region's most frequent launch ops per step (inductor's kernels as ``fused``)."""
    named: Counter = Counter()
    for name, count in ops.items():
        named["fused" if any(mark in name for mark in COMPILED_KERNEL_MARKS) else name.removeprefix("aten::")] += count
    return ", ".join(f"{name} {count // repeats}" for name, count in named.most_common(shown))


def _inside(event: Any, label: str) -> bool:
    node = event
    while node is not None:
        if node.name == label:
            return True
        node = node.cpu_parent
    return False


def compiled_step(model: nn.Module) -> CompiledDecodeStep:
    """The opt-in compiled decode step of ``model``'s decoder, its generated CPU kernels visible to the profiler
    (imported here: the eager count needs neither the compiler nor the class)."""
    import torch._inductor.config as inductor_config

    from llava.model.decoder import CompiledDecodeStep

    inductor_config.cpp.enable_kernel_profile = True
    return CompiledDecodeStep(decoder_of(model.language_model))


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (preset, region), plus a ``total`` row per preset."""
    device, dtype, attn = report.resolve_runtime(args.device, args.dtype, args.attn_implementation)
    shape = depth_or_named_shape(args.shape)
    torch.manual_seed(args.seed)
    model = build_model(shape, compression=None, dtype=dtype, attn_implementation=attn, device=device).eval()
    pad_token_id = model.config.text_config.pad_token_id or 0
    machine = report.machine_info(device, dtype, attn, report.load_average())
    prompts = move_batch(
        build_prompts(shape, args.batch_size, args.prompt_tokens, args.seed, pad_token_id), device, dtype
    )
    rows: list[dict[str, Any]] = []
    for label, config in resolve_presets(args.presets, shape):
        model.set_compression(config)
        decoder = FastDecoder(model, use_cuda_graph=False)
        with torch.no_grad():
            model.generate(**prompts, max_new_tokens=2, eos_token_id=[], fast=True, fast_decoder=decoder)
        (runner,) = decoder.runners()
        compiled = compiled_step(model) if args.compiled else None
        regions = count_step(decoder, runner, args.repeats, device, compiled)
        stages = len(model.stage_plan.stage_starts()) if model.stage_plan is not None else 1
        base = {"preset": label, "shape": shape.name, "batch_size": args.batch_size, "stages": stages}
        base["step"] = "compiled" if compiled is not None else "eager"
        if compiled is not None:
            base["compile_s"] = compiled.compile_time_s
        for region, entry in regions.items():
            rows.append({**base, "region": region, **entry, "machine": machine})
        total_kernels = [entry["kernels"] for entry in regions.values() if entry["kernels"] is not None]
        rows.append({
            **base, "region": "total", "launch_ops": sum(entry["launch_ops"] for entry in regions.values()),
            "kernels": sum(total_kernels) if device.type == "cuda" else None, "top": "", "machine": machine,
        })  # fmt: skip
        logger.info("%s: %.0f launch ops per decode step", label, rows[-1]["launch_ops"])
    return rows


TABLE_COLUMNS = (
    ("preset", "preset"),
    ("step", "step"),
    ("stages", "stages"),
    ("region", "region"),
    ("launch_ops", "launch ops"),
    ("kernels", "CUDA kernels"),
    ("compile_s", "compile s"),
    ("top", "most frequent ops"),
)
NOTES = (
    "Per decode step (one token per row, static caches; what a CUDA graph replays). launch ops: outermost "
    "computing aten ops (views, allocations, no-op conversions and composites looked through), each a kernel "
    "launch on CUDA; CUDA "
    "kernels: the device kernels the profiler saw (CUDA only). Regions: rmsnorm = every layer's two norms and the "
    "final norm; attention = projections, RoPE application, cache writes, SDPA; residual = the layers' additions; "
    "other = state updates and the logits copy.",
)


def write_outputs(rows: list[dict[str, Any]], out: str) -> str:
    """JSON rows and the Markdown table; returns the table."""
    json_path, md_path, _ = report.output_paths(out)
    report.write_json(rows, json_path)
    title = f"Decode-step launches: {rows[0]['shape']}, batch {rows[0]['batch_size']}"
    return report.write_markdown(rows, TABLE_COLUMNS, md_path, title, NOTES)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llava-7b-depth", choices=sorted({*SHAPES, *DEPTH_SHAPES}))
    parser.add_argument("--presets", type=report.parse_list, default=["none", "duet_128", "pdrop_128"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    add_runtime_options(parser, out="runs/bench/decode_profile.json")
    parser.add_argument(
        "--compiled", action="store_true", help="count the opt-in compiled step (CompiledDecodeStep, inductor)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Count, write FILE.json/.md, print the table; returns the rows."""
    args = parse_args(argv)
    with report.torch_threads(args.threads):
        rows = benchmark(args)
    print(write_outputs(rows, args.out))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
