"""Inference speed per compression preset and batch size: time to first token, decode throughput, memory.

One random-weight model of a benchmark shape is built once and every preset is switched on it with
``model.set_compression``. Each measurement is one ``model.generate`` call (greedy, KV cache) on a
left-padded batch of synthetic prompts (one image slot + ``--prompt-tokens`` text tokens per sample),
with EOS disabled so every sample decodes exactly ``--new-tokens`` tokens. A forward hook splits the
call: the first forward is the prefill (time to first token), the rest is decoding. After warm-up,
measurements run round-robin over (preset, batch size) so that machine drift hits all alike; rows give
medians and compare the prefill-time ratio to ``none`` with the FLOP model's prefill ratio. With a video
shape each prompt holds one video slot and ``pixel_values_videos`` ``[B, frames, 3, S, S]`` instead of an image.
Every case is timed on both decode loops (``--decode-paths``): the eager reference loop and the fast path
(static per-stage KV caches, CUDA-graph decode step); ratios against ``none`` compare rows of one path.

    python -m llava.bench.infer_speed --shape small --presets none,duet_192,duet_128,duet_64 \
        --batch-sizes 1,8 --prompt-tokens 64 --new-tokens 32 --out runs/bench/small-infer.json
    python -m llava.bench.infer_speed --shape small-video --presets none,duet_video_53,duet_video_93 \
        --batch-sizes 1,4 --prompt-tokens 64 --new-tokens 16 --out runs/bench/small-video-infer.json
    python -m llava.bench.infer_speed --shape llava-7b --batch-sizes 1,8 --new-tokens 128 \
        --attn-implementation sdpa --out runs/bench/llava-7b-infer.json    # on a GPU: the issue-14 targets
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llava.bench import report
from llava.bench.flops import prefill_flops
from llava.bench.hf_baseline import BASELINE_LABEL, build_hf_llava, check_baseline_shape, to_hf_batch
from llava.bench.shapes import SHAPES, ModelShape, build_model, default_presets, get_shape
from llava.bench.workload import (
    FIRST_SPECIAL_IDS,
    SYSTEM_PROMPT_TOKENS,
    expand_anyres_slots,
    measured_initial_tokens,
    move_batch,
    random_pixels,
    resolve_presets,
    slot_token_id,
    video_notes,
    visual_input_fields,
)
from llava.compression.config import CompressionConfig
from llava.model.fast_generation import FastDecoder

logger = logging.getLogger(__name__)

NEVER_EMITTED_TOKEN = -1
"""EOS id for the benchmark: argmax never returns a negative id, so every sample runs to ``--new-tokens``."""

DECODE_PATHS = ("eager", "fast", "compiled")
"""``eager``: the reference decode loop (growing cache, one Python pass per token); ``fast``: static
per-stage caches with a CUDA-graph decode step (:mod:`llava.model.fast_generation`; no graph on CPU);
``compiled``: ``fast`` with the decode step under ``torch.compile`` (fused kernels inside the same graph;
opt-in, each shape compiles once in the untimed warm-up)."""
GRAPH_PATHS = ("fast", "compiled")

TABLE_COLUMNS = (
    ("preset", "preset"),
    ("batch_size", "batch"),
    ("path", "decode path"),
    ("avg_visual_tokens", "visual tok/layer"),
    ("ttft_s", "TTFT s (median)"),
    ("ttft_iqr_s", "IQR s"),
    ("prefill_speedup_vs_none", "prefill speed-up"),
    ("ratio_vs_none", "prefill ratio vs none"),
    ("flops_ratio_vs_none", "FLOP-model ratio"),
    ("measured_over_ideal", "measured/ideal"),
    ("decode_tokens_per_s", "decode tok/s"),
    ("decode_speedup_vs_none", "decode speed-up"),
    ("decode_speedup_vs_eager", "decode vs eager"),
    ("capture_s", "capture s"),
    ("compile_s", "compile s"),
    ("graph", "graph"),
    ("captures", "captures"),
    ("capture_failures", "capture failures"),
    ("replay_mismatches", "replay mismatches"),
    ("compression_share", "compression share"),
    ("peak_mem_mb", "peak mem MiB"),
)


def build_prompts(
    shape: ModelShape, batch_size: int, prompt_tokens: int, seed: int = 0, pad_token_id: int = 0, bos_token_id: int = 1
) -> dict[str, torch.Tensor]:
    """A left-padded prompt batch: ``BOS + system prompt``, one image slot, then the instruction.

    ``prompt_tokens`` text tokens per sample, shortened by up to 10% per sample (sample 0 keeps the full
    length); random ids and ``[B, 3, S, S]`` random pixels. A video shape has one video slot per prompt and
    ``pixel_values_videos`` ``[B, frames, 3, S, S]`` instead.
    """
    if prompt_tokens < 2:
        raise ValueError(f"prompt_tokens must be >= 2, got {prompt_tokens}")
    generator = torch.Generator().manual_seed(seed)
    spread = prompt_tokens // 10
    cuts = torch.randint(0, spread + 1, (batch_size,), generator=generator).tolist()
    cuts[0] = 0
    prefix = min(SYSTEM_PROMPT_TOKENS, prompt_tokens // 2)
    rows = []
    for cut in cuts:
        head = torch.randint(FIRST_SPECIAL_IDS, shape.llm.vocab, (prefix,), generator=generator)
        head[0] = bos_token_id
        tail = torch.randint(FIRST_SPECIAL_IDS, shape.llm.vocab, (prompt_tokens - prefix - cut,), generator=generator)
        rows.append(torch.cat([head, torch.tensor([slot_token_id(shape)]), tail]))
    length = max(len(row) for row in rows)
    input_ids = torch.full((batch_size, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row) :] = row
        attention_mask[index, length - len(row) :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **random_pixels(shape, batch_size, generator)}
    if shape.anyres is None:
        return batch
    return expand_anyres_slots(batch, shape, generator, left_padded=True, pad_token_id=pad_token_id)


@dataclass
class GenerateSample:
    """One timed ``generate`` call."""

    ttft_s: float
    decode_s: float
    compression_s: float
    total_s: float
    initial_tokens: float = 0.0  # visual tokens per sample entering the LLM, as the model reported


@dataclass
class CaseRecord:
    """Everything measured for one (preset, batch size)."""

    label: str
    config: CompressionConfig
    batch_size: int
    prompts: dict[str, torch.Tensor]
    hf_baseline: bool = False
    path: str = "eager"
    samples: list[GenerateSample] = field(default_factory=list)
    capture_s: float = 0.0
    compile_s: float = 0.0  # torch.compile time of the compiled path's decode step (warm-up calls)
    captures: int = 0  # graphs captured for this case (warm-up and timed calls)
    capture_failures: int = 0
    replay_checks: int = 0  # first replays of a captured graph compared with the eager step ...
    replay_mismatches: int = 0  # ... that differed (that shape then decodes eagerly)
    graph_replays: int = 0  # decode steps of the timed calls replayed from a graph ...
    eager_steps: int = 0  # ... and run eagerly (no graph: CPU, or a failed capture)
    peak_mem_mb: float = 0.0
    peak_rss_mb: float = 0.0


class _PrefillClock:
    """Forward hook: the host time (after a device sync) at which the first forward call, the prefill, ended."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls = 0
        self.prefill_end = 0.0
        self.compression_s = 0.0
        self.initial_tokens = 0.0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            report.synchronize(self.device)
            self.prefill_end = time.perf_counter()
            self.compression_s = float(getattr(output, "compression_time_s", 0.0) or 0.0)
            per_layer = getattr(output, "visual_tokens_per_layer", None)
            self.initial_tokens = float(per_layer[0]) if per_layer else 0.0


def run_generate(
    model: nn.Module,
    prompts: dict[str, torch.Tensor],
    new_tokens: int,
    pad_token_id: int,
    hf_baseline: bool = False,
    fast_decoder: FastDecoder | None = None,
) -> GenerateSample:
    """One greedy ``generate`` of exactly ``new_tokens`` tokens per sample, split into prefill and decode.

    ``hf_baseline``: ``model`` is transformers' LLaVA, whose ``generate`` returns prompt + new tokens and
    is held to exactly ``new_tokens`` by ``min_new_tokens`` (it rejects a negative EOS id). With a
    ``fast_decoder`` our model decodes on the fast path, otherwise on the eager loop.
    """
    device = prompts["input_ids"].device
    clock = _PrefillClock(device)
    handle = model.register_forward_hook(clock)
    if hf_baseline:
        options = {"min_new_tokens": new_tokens, "use_cache": True}
    else:
        options = {"eos_token_id": NEVER_EMITTED_TOKEN, "fast": fast_decoder is not None, "fast_decoder": fast_decoder}
    try:
        report.synchronize(device)
        began = time.perf_counter()
        generated = model.generate(
            **prompts, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id, **options
        )
        report.synchronize(device)
        ended = time.perf_counter()
    finally:
        handle.remove()
    if hf_baseline:
        generated = generated[:, prompts["input_ids"].shape[1] :]
    if generated.shape[1] != new_tokens:
        raise RuntimeError(f"generate returned {generated.shape[1]} tokens, expected {new_tokens}")
    return GenerateSample(
        ttft_s=clock.prefill_end - began,
        decode_s=ended - clock.prefill_end,
        compression_s=clock.compression_s,
        total_s=ended - began,
        initial_tokens=clock.initial_tokens,
    )


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build, warm up, measure round-robin; one row per (preset, batch size)."""
    with report.torch_threads(args.threads):
        return _benchmark(args)


def _benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    device, dtype, attn = report.resolve_runtime(args.device, args.dtype, args.attn_implementation)
    load_at_start = report.load_average()
    shape = get_shape(args.shape)
    presets = resolve_presets(args.presets, shape)
    torch.manual_seed(args.seed)
    model = build_model(shape, compression=None, dtype=dtype, attn_implementation=attn, device=device)
    model.eval()
    pad_token_id = model.config.text_config.pad_token_id or 0
    hf_model = build_hf_llava(shape, dtype, attn, device, use_cache=True).eval() if args.hf_baseline else None
    cases: list[CaseRecord] = []
    for batch_size in args.batch_sizes:
        prompts = build_prompts(shape, batch_size, args.prompt_tokens, seed=args.seed, pad_token_id=pad_token_id)
        moved = move_batch(prompts, device, dtype)
        cases += [
            CaseRecord(label, config, batch_size, moved, path=path)
            for path in args.decode_paths
            for label, config in presets
        ]
        if hf_model is not None:
            hf_prompts = move_batch(to_hf_batch(prompts, shape), device, dtype)
            cases.append(
                CaseRecord(BASELINE_LABEL, CompressionConfig(), batch_size, hf_prompts, hf_baseline=True, path="hf")
            )
    # One fast decoder per preset: its buffers and CUDA graphs are captured once (in the warm-up) and
    # reused by every timed call, as in a long evaluation run.
    fast_decoders: dict[tuple[str, str], FastDecoder] = {}

    def measure(case: CaseRecord, timed: bool) -> GenerateSample:
        if case.hf_baseline:
            return run_generate(hf_model, case.prompts, args.new_tokens, pad_token_id, hf_baseline=True)
        model.set_compression(case.config)
        if case.path == "eager":
            return run_generate(model, case.prompts, args.new_tokens, pad_token_id)
        decoder = fast_decoders.get((case.label, case.path))
        if decoder is None:
            decoder = fast_decoders[(case.label, case.path)] = FastDecoder(model, compile_step=case.path == "compiled")
        before = fast_counters(decoder)
        sample = run_generate(model, case.prompts, args.new_tokens, pad_token_id, fast_decoder=decoder)
        capture_s, compile_s, captures, failures, replays, eager_steps, checks, mismatches = (
            after - earlier for after, earlier in zip(fast_counters(decoder), before, strict=True)
        )
        case.capture_s += capture_s
        case.compile_s += compile_s
        case.captures += captures
        case.capture_failures += failures
        case.replay_checks += checks
        case.replay_mismatches += mismatches
        if timed:
            case.graph_replays += replays
            case.eager_steps += eager_steps
        return sample

    for case in cases:
        # A fast case's first call captures its CUDA graphs: at least one untimed call keeps that out of the rows.
        for _ in range(max(args.warmup, 1 if case.path in GRAPH_PATHS else 0)):
            measure(case, timed=False)
    memory = report.PeakMemory(device)
    for number, case in report.round_robin(cases, args.repeats):
        with memory.measure():
            sample = measure(case, timed=True)
        case.samples.append(sample)
        case.peak_mem_mb = max(case.peak_mem_mb, memory.peak_mb)
        case.peak_rss_mb = max(case.peak_rss_mb, memory.peak_rss_mb)
        logger.info(
            "round %d %s B=%d: TTFT %.4f s, decode %.4f s", number, case.label, case.batch_size, sample.ttft_s,
            sample.decode_s,
        )  # fmt: skip
    machine = report.machine_info(device, dtype, attn, load_at_start)
    return build_rows(cases, shape, args, machine, memory.kind, memory.exact_window)


def fast_counters(decoder: FastDecoder) -> tuple[float, float, int, int, int, int, int, int]:
    """Capture and compile seconds, captures, capture failures, replayed and eager decode steps, first-replay
    checks and their mismatches of ``decoder`` so far."""
    return (
        decoder.capture_time_s,
        decoder.compile_time_s,
        decoder.captures,
        decoder.capture_failures,
        decoder.graph_replays,
        decoder.eager_steps,
        decoder.replay_checks,
        decoder.replay_mismatches,
    )


def graph_use(case: CaseRecord) -> str:
    """``yes`` when every timed decode step replayed a CUDA graph, ``no`` when none did, else ``partial``."""
    if case.graph_replays == 0:
        return "no"
    return "yes" if case.eager_steps == 0 else "partial"


def build_rows(
    cases: list[CaseRecord],
    shape: ModelShape,
    args: argparse.Namespace,
    machine: dict[str, Any],
    memory_kind: str,
    memory_exact: bool,
) -> list[dict[str, Any]]:
    """Summaries per case; ratios against ``none`` at the same batch size and against the FLOP model."""
    decode_steps = args.new_tokens - 1  # the first new token comes out of the prefill
    summaries = []
    for case in cases:
        ttft, ttft_iqr = report.median_iqr([sample.ttft_s for sample in case.samples])
        decode_s = statistics.median(sample.decode_s for sample in case.samples)
        tokens_per_s = report.ratio(decode_steps * case.batch_size, decode_s) if decode_steps > 0 else float("nan")
        summaries.append((case, ttft, ttft_iqr, decode_s, tokens_per_s))
    baselines = {
        (case.batch_size, case.path): (ttft, tps)
        for case, ttft, _, _, tps in summaries
        if not case.config.enabled and not case.hf_baseline
    }
    eager_tps = {(case.label, case.batch_size): tps for case, _, _, _, tps in summaries if case.path == "eager"}
    rows: list[dict[str, Any]] = []
    for case, ttft, ttft_iqr, decode_s, tokens_per_s in summaries:
        # The HF baseline is compared with our none row of the first decode path measured.
        reference_path = args.decode_paths[0] if case.hf_baseline else case.path
        base_ttft, base_tps = baselines[(case.batch_size, reference_path)]
        measured = measured_initial_tokens(case.config, case.samples)
        flops = prefill_flops(shape, case.config, case.batch_size, args.prompt_tokens, measured)
        flops_none = prefill_flops(shape, None, case.batch_size, args.prompt_tokens)
        flops_ratio = flops.total / flops_none.total
        ratio = report.ratio(ttft, base_ttft)
        compression_s = statistics.median(sample.compression_s for sample in case.samples)
        rows.append(
            {
                "preset": case.label,
                "shape": shape.name,
                "batch_size": case.batch_size,
                "path": case.path,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                **visual_input_fields(shape, case.config, measured),
                "avg_visual_tokens": shape.average_visual_tokens(case.config, measured),
                "repeats": len(case.samples),
                "ttft_s": ttft,
                "ttft_iqr_s": ttft_iqr,
                "ttft_min_s": min(sample.ttft_s for sample in case.samples),
                "noisy": report.is_noisy(ttft, ttft_iqr),
                "ratio_vs_none": ratio,
                "prefill_speedup_vs_none": report.ratio(base_ttft, ttft),
                "flops_ratio_vs_none": flops_ratio,
                "measured_over_ideal": report.ratio(ratio, flops_ratio),
                "decode_time_s": decode_s,
                "decode_tokens_per_s": tokens_per_s,
                "decode_speedup_vs_none": report.ratio(tokens_per_s, base_tps),
                "decode_speedup_vs_eager": report.ratio(tokens_per_s, eager_tps[(case.label, case.batch_size)])
                if (case.label, case.batch_size) in eager_tps
                else None,
                "capture_s": case.capture_s,
                "graph": graph_use(case),
                "compile_s": case.compile_s if case.path == "compiled" else None,
                "captures": case.captures if case.path in GRAPH_PATHS else None,
                "capture_failures": case.capture_failures if case.path in GRAPH_PATHS else None,
                "replay_checks": case.replay_checks if case.path in GRAPH_PATHS else None,
                "replay_mismatches": case.replay_mismatches if case.path in GRAPH_PATHS else None,
                "compression_share": report.ratio(compression_s, ttft),
                "peak_mem_mb": case.peak_mem_mb,
                "peak_mem_kind": memory_kind if memory_exact else f"{memory_kind} (process peak, approximate)",
                **({"peak_rss_mb": case.peak_rss_mb} if case.peak_rss_mb else {}),
                "prefill_tflops": flops.total / 1e12,
                "prefill_tflops_per_s": report.ratio(flops.total / 1e12, ttft),
                "machine": machine,
            }
        )
    return rows


NOTES = (
    "TTFT = first forward of generate (prefill: tower, V2V, LLM with T2V drops, last-token logits), synchronised.",
    "decode tok/s = (new_tokens - 1) x batch / time after the prefill (the first token comes from the prefill).",
    "ratio vs none = TTFT / none's TTFT at the same batch size; FLOP-model ratio = prefill_flops ratio.",
    "peak mem: CUDA max_memory_allocated; on CPU the peak RSS (getrusage) above the RSS at call start, approximate.",
    "decode path: eager = the reference loop (growing KV cache, one Python pass per token); fast = static per-stage "
    "KV caches, a decode step with no host synchronisation, captured as a CUDA graph on CUDA (not on CPU). Ratios "
    "vs none compare rows of the same path; decode vs eager = fast tok/s / eager tok/s of the same preset and batch.",
    "capture s = one-time CUDA graph capture (warm-up steps + capture) of the fast path, paid in the untimed "
    "warm-up calls and excluded from the timed rows; compile s = torch.compile time of the compiled path's decode "
    "step (first call of each shape, in the untimed calls; part of capture s where graphs are captured; '-' on "
    "other paths).",
    "graph = whether the timed decode steps replayed a CUDA graph (yes: all, partial: some, no: none, e.g. on CPU "
    "or after a failed capture); captures / capture failures = graph captures of the case (warm-up and timed "
    "calls) and captures that fell back to eager steps; '-' on the eager and HF rows.",
)


def write_outputs(rows: list[dict[str, Any]], out: str) -> str:
    """JSON rows, the Markdown table and the ratio chart; returns the table."""
    first = rows[0]
    media = f"video ({first['num_frames']} frames)" if first.get("media") == "video" else "image"
    title = (
        f"Inference speed: {first['shape']}, {first['prompt_tokens']} prompt tokens + {media}, "
        f"{first['new_tokens']} new tokens"
    )
    notes = [*NOTES, *video_notes(first, training=False), *report.noise_note(rows, "TTFT")]
    if any(row["preset"] == BASELINE_LABEL for row in rows):
        notes.append(
            f"{BASELINE_LABEL} = transformers' LlavaForConditionalGeneration.generate (greedy, its default dynamic "
            "cache) on the same prompts with image slots expanded, timed round-robin with the presets; both models "
            "are in memory together."
        )
    labels = [f"{row['preset']}\n{row['path']} B={row['batch_size']}" for row in rows]
    return report.write_report(rows, out, title, TABLE_COLUMNS, notes, labels, "prefill time / none")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES), help="benchmark shape (default small)")
    parser.add_argument(
        "--presets",
        type=report.parse_list,
        default=None,
        help="comma-separated preset names or YAML paths ('none' is the baseline, added if missing); default "
        "none,duet_192,duet_128,duet_64, for video shapes none,duet_video_53,duet_video_93",
    )
    parser.add_argument("--batch-sizes", type=lambda text: report.parse_list(text, int), default=[1, 8])
    parser.add_argument(
        "--prompt-tokens", type=int, default=64, help="text tokens per prompt besides the image (or video)"
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="round-robin rounds (timed calls per case)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case before the rounds")
    parser.add_argument("--out", default="runs/bench/infer_speed.json", help="FILE.json; FILE.md and FILE.png too")
    parser.add_argument(
        "--dtype", choices=sorted(report.DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--attn-implementation", default=None, help="default: flash_attention_2 if importable, else sdpa"
    )
    parser.add_argument(
        "--decode-paths",
        type=report.parse_list,
        default=["eager", "fast"],
        help="comma-separated decode loops to time: eager (reference), fast (static caches + CUDA graphs), "
        "compiled (fast with a torch.compile'd decode step; opt-in); default eager,fast",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hf-baseline",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=f"also time transformers' LlavaForConditionalGeneration.generate (rows '{BASELINE_LABEL}', image shapes)",
    )
    args = parser.parse_args(argv)
    if args.hf_baseline:
        try:
            check_baseline_shape(get_shape(args.shape))
        except ValueError as error:
            parser.error(str(error))
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1 or not args.batch_sizes:
        parser.error("--repeats and --new-tokens must be >= 1, --warmup >= 0, --batch-sizes non-empty")
    unknown_paths = [path for path in args.decode_paths if path not in DECODE_PATHS]
    if unknown_paths or not args.decode_paths:
        parser.error(f"--decode-paths takes {', '.join(DECODE_PATHS)}; got {', '.join(args.decode_paths) or 'nothing'}")
    if any(size < 1 for size in args.batch_sizes):
        parser.error("--batch-sizes must be >= 1")
    if args.presets is None:
        args.presets = default_presets(args.shape)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, write FILE.json/.md/.png, print the table; returns the rows."""
    args = parse_args(argv)
    rows = benchmark(args)
    table = write_outputs(rows, args.out)
    print(table)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llava.model").setLevel(logging.WARNING)
    main()
