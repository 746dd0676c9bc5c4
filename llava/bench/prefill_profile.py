"""Where the prefill's time goes, per compression preset: host and device time per region, kernel
launches and host synchronisations.

The prefill (tower, V2V, merge, LLM layers with T2V scoring and compaction, last-token logits) is run
under ``torch.profiler``; the model marks its regions with ``record_function`` labels
(:data:`llava.utils.profiling.PROFILE_REGIONS`). Every profiled op and kernel is attributed to the
innermost region around it; what lies outside every region (embeddings, RoPE tables, masks, norms) is
``other``. Wall time per prefill is measured separately, without the profiler (which slows the host).
At batch 1 a prefill whose host time exceeds its device time is launch-bound: dropping tokens then saves
device time the GPU was not waiting on, and only fewer launches or fewer host synchronisations help.

    python -m llava.bench.prefill_profile --shape llava-7b --presets none,duet_192,duet_128,duet_64 \
        --batch-sizes 1,8 --out runs/bench/llava-7b-prefill-profile.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from llava.bench import report
from llava.bench.infer_speed import build_prompts
from llava.bench.shapes import SHAPES, build_model, default_presets, get_shape
from llava.bench.workload import move_batch, resolve_presets
from llava.hf_adapter import new_dynamic_cache
from llava.utils.profiling import PROFILE_REGIONS

logger = logging.getLogger(__name__)

REGION_OF_LABEL = {label: key for key, label in PROFILE_REGIONS.items()}
SYNC_EVENTS = frozenset(
    {
        "aten::_local_scalar_dense",  # .item(), int(tensor), bool(tensor)
        "aten::nonzero",
        "cudaStreamSynchronize",
        "cudaDeviceSynchronize",
        "cudaEventSynchronize",
    }
)
"""Profiler events that make the host wait for the device (on CPU: the reads that would)."""

TABLE_COLUMNS = (
    ("preset", "preset"),
    ("batch_size", "batch"),
    ("region", "region"),
    ("host_ms", "host ms"),
    ("device_ms", "device ms"),
    ("kernels", "kernels"),
    ("ops", "ops"),
    ("syncs", "host syncs"),
)


def _region_of(event: Any) -> str:
    node = event
    while node is not None:
        region = REGION_OF_LABEL.get(node.name)
        if region is not None:
            return region
        node = node.cpu_parent
    return "other"


def attribute(events: Sequence[Any], repeats: int) -> dict[str, dict[str, float]]:
    """Per region, per prefill: host ms (exclusive of nested regions), device ms, kernels, ops, syncs."""
    totals: dict[str, dict[str, float]] = defaultdict(
        lambda: dict(host_ms=0.0, device_ms=0.0, kernels=0, ops=0, syncs=0)
    )
    for event in events:
        if event.name in REGION_OF_LABEL:
            continue
        region = _region_of(event)
        entry = totals[region]
        if event.cpu_parent is None or event.cpu_parent.name in REGION_OF_LABEL:
            entry["host_ms"] += event.cpu_time_total / 1000  # top-level op of its region (children included)
        if event.name.startswith("aten::") and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::")):
            entry["ops"] += 1  # top-level aten ops (what Python dispatches), not their nested calls
        if event.name in SYNC_EVENTS:
            entry["syncs"] += 1
        for kernel in event.kernels:
            entry["kernels"] += 1
            entry["device_ms"] += kernel.duration / 1000
    return {region: {key: value / repeats for key, value in entry.items()} for region, entry in totals.items()}


def profile_case(model: torch.nn.Module, prompts: dict[str, torch.Tensor], repeats: int) -> dict[str, Any]:
    """Wall ms per prefill (median, unprofiled) and the per-region attribution of ``repeats`` profiled ones."""
    device = prompts["input_ids"].device

    def prefill() -> None:
        model(
            **prompts, cache=new_dynamic_cache(model.language_model.config), use_cache=True, left_padding=True,
            logits_to_keep=1,
        )  # fmt: skip

    with torch.no_grad():
        prefill()  # warm-up
        walls = []
        for _ in range(repeats):
            report.synchronize(device)
            began = time.perf_counter()
            prefill()
            report.synchronize(device)
            walls.append((time.perf_counter() - began) * 1000)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            for _ in range(repeats):
                prefill()
            report.synchronize(device)
    return {"wall_ms": statistics.median(walls), "regions": attribute(profiler.events(), repeats)}


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (preset, batch size, region), plus a ``total`` row per (preset, batch size)."""
    device, dtype, attn = report.resolve_runtime(args.device, args.dtype, args.attn_implementation)
    shape = get_shape(args.shape)
    torch.manual_seed(args.seed)
    model = build_model(shape, compression=None, dtype=dtype, attn_implementation=attn, device=device).eval()
    pad_token_id = model.config.text_config.pad_token_id or 0
    machine = report.machine_info(device, dtype, attn, report.load_average())
    rows: list[dict[str, Any]] = []
    for batch_size in args.batch_sizes:
        prompts = move_batch(
            build_prompts(shape, batch_size, args.prompt_tokens, args.seed, pad_token_id), device, dtype
        )
        for label, config in resolve_presets(args.presets, shape):
            model.set_compression(config)
            result = profile_case(model, prompts, args.repeats)
            regions = result["regions"]
            base = {"preset": label, "shape": shape.name, "batch_size": batch_size, "machine": machine}
            for region in [*PROFILE_REGIONS, "other"]:
                if region in regions:
                    rows.append({**base, "region": region, **regions[region]})
            summed = {key: sum(entry[key] for entry in regions.values()) for key in next(iter(regions.values()))}
            rows.append({**base, "region": "total", **summed, "wall_ms": result["wall_ms"]})
            logger.info("%s B=%d: prefill %.2f ms wall", label, batch_size, result["wall_ms"])
    return rows


NOTES = (
    "Per prefill (mean over the profiled repeats). host ms: CPU time of the region's top-level ops (Python "
    "overhead between ops is not in any op, so regions sum to less than the wall time); device ms: time of the "
    "kernels the region launched (CUDA only); ops: top-level aten ops the region dispatched (each is host "
    "work; most launch a kernel); host syncs: reads of device values (.item(), nonzero) and stream/device "
    "synchronisations. Regions: vision = towers without V2V; v2v = V2V scoring and merging; merge = splicing "
    "visual tokens into the text; llm = decoder layers; t2v_scoring / t2v_compaction = T2V at the boundaries; "
    "other = embeddings, RoPE tables, masks, final norm. total: wall_ms is the unprofiled median.",
)


def write_outputs(rows: list[dict[str, Any]], out: str) -> str:
    """JSON rows and the Markdown table; returns the table."""
    json_path, md_path, _ = report.output_paths(out)
    report.write_json(rows, json_path)
    first = rows[0]
    title = f"Prefill profile: {first['shape']}"
    columns = (*TABLE_COLUMNS, ("wall_ms", "wall ms"))
    return report.write_markdown(rows, columns, md_path, title, NOTES)


def add_runtime_options(parser: argparse.ArgumentParser, out: str) -> None:
    """The options the profilers share: output file, dtype, device, attention kernel, threads, seed."""
    parser.add_argument("--out", default=out, help="FILE.json; FILE.md too")
    parser.add_argument("--dtype", choices=sorted(report.DTYPES), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--attn-implementation", default=None)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--presets", type=report.parse_list, default=None, help="default: the shape's presets")
    parser.add_argument("--batch-sizes", type=lambda text: report.parse_list(text, int), default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    add_runtime_options(parser, out="runs/bench/prefill_profile.json")
    args = parser.parse_args(argv)
    if args.repeats < 1 or not args.batch_sizes or any(size < 1 for size in args.batch_sizes):
        parser.error("--repeats and every batch size must be >= 1")
    if args.presets is None:
        args.presets = default_presets(args.shape)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Profile, write FILE.json/.md, print the table; returns the rows."""
    args = parse_args(argv)
    with report.torch_threads(args.threads):
        rows = benchmark(args)
    print(write_outputs(rows, args.out))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
