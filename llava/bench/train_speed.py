"""Training-step speed per compression preset, on the real training code path, against the FLOP model.

One random-weight model of a benchmark shape is built once; every preset is switched on it with
``model.set_compression`` (same weights, same optimizer, same synthetic batch), so the presets differ
only in the visual tokens they carry. A step is what the trainer does: ``zero_grad``, forward with
labels, backward, ``optimizer.step``, with the stage's freezing (pretrain: projector only; finetune:
projector + LLM; the tower is always frozen), optional gradient checkpointing (non-reentrant, input
grads enabled as in training) and AdamW (fused on CUDA). After per-preset warm-up, steps run
round-robin over the presets so that machine drift hits all of them alike; each row reports the
median step time and compares its ratio to ``none`` with the analytic FLOP model's.

With a video shape (``small-video``, ``video-llava-7b``) every sample carries one video instead of an image:
one video slot in ``input_ids`` and ``pixel_values_videos`` ``[B, frames, 3, S, S]``; the visual-token counts
are per video (all frames), and the default presets are the video ones.

    python -m llava.bench.train_speed --shape small --stage finetune \
        --presets none,duet_192,duet_128,duet_64 --batch-size 4 --steps 5 --warmup 2 \
        --out runs/bench/small-finetune.json
    python -m llava.bench.train_speed --shape small-video --stage finetune \
        --presets none,duet_video_53,duet_video_93 --batch-size 2 --steps 5 --warmup 1 \
        --out runs/bench/small-video-finetune.json

With an AnyRes shape (``small-anyres``, ``small-anyres-onevision``, ``llava-next-7b``; :mod:`llava.bench.anyres`;
LLaVA-OneVision's shapes with V2V per view group after packing) sample ``i`` carries image
``i`` of the shape's image mix (cycled; placeholders expanded to its AnyRes tokens, ``pixel_values``
``[B, views, 3, S, S]``, ``image_sizes``), the model is the shape's family's random model, and the default presets
are the ``anyres_*`` ones (fractions of each image's tokens); the FLOP model averages the mix's images with their
weights, so a batch of whole cycles of the mix (``small-anyres``: an even batch) is what it predicts:

    python -m llava.bench.train_speed --shape small-anyres --stage finetune --batch-size 4 --steps 3 --warmup 1 \
        --out runs/bench/small-anyres-finetune.json

``--length-mix llava665k`` draws a ragged batch from LLaVA-1.5's instruction mix (:mod:`llava.bench.length_mix`:
text-only ShareGPT chats, short VQA turns, long conversations) instead of equal-length samples, and
``--packing both`` times every preset padded and packed (padding-free) on those same samples; the rows then
report the padding share of the LLM's input and the FLOP model of the real tokens
(:func:`llava.bench.flops.ragged_step_flops`, what a padding-free step computes):

    python -m llava.bench.train_speed --shape small --length-mix llava665k --packing both --batch-size 8 \
        --out runs/bench/small-ragged.json
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llava.bench import report
from llava.bench.flops import predicted_step_ratio, ragged_step_flops, training_step_flops
from llava.bench.hf_baseline import (
    BASELINE_LABEL,
    build_hf_llava,
    check_baseline_shape,
    freeze_hf_for_stage,
    to_hf_batch,
)
from llava.bench.length_mix import SampleLength, build_ragged_batch, draw_lengths, mix_argument, padding_fraction
from llava.bench.shapes import SHAPES, ModelShape, build_model, default_presets, get_shape
from llava.bench.workload import (
    anyres_image_token_id,
    build_training_batch,
    measured_initial_tokens,
    move_batch,
    resolve_presets,
    video_notes,
    visual_input_fields,
)
from llava.compression.config import CompressionConfig
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.hf_adapter import enable_activation_checkpointing
from llava.model.stages import STAGES, freeze_for_stage

logger = logging.getLogger(__name__)

TABLE_COLUMNS = (
    ("preset", "preset"),
    ("avg_visual_tokens", "visual tok/layer"),
    ("padding_fraction", "padding"),
    ("step_time_s", "step s (median)"),
    ("step_time_iqr_s", "IQR s"),
    ("ratio_vs_none", "ratio vs none"),
    ("flops_ratio_vs_none", "FLOP-model ratio"),
    ("measured_over_ideal", "measured/ideal"),
    ("fwd_bwd_over_ideal", "fwd+bwd/ideal"),
    ("optimizer_share", "optimizer share"),
    ("compression_share", "compression share"),
    ("peak_mem_mb", "peak mem MiB"),
    ("tokens_per_s", "LLM tok/s"),
    ("tflops_per_s", "TFLOP/s"),
)


# ----- training setup -----
def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every layer, and input grads, as the trainer sets them up (a
    composed model without the switch, e.g. LLaVA-NeXT's, gets it on its wrapped transformers model, whose
    decoder and tower layers it runs)."""
    switched = hasattr(model, "activation_checkpointing_enable") or hasattr(model, "gradient_checkpointing_enable")
    enable_activation_checkpointing(model if switched else model.hf_model, use_reentrant=False)
    model.enable_input_require_grads()


def build_optimizer(parameters: list[nn.Parameter], device: torch.device, lr: float) -> torch.optim.Optimizer:
    """AdamW as the trainer uses it (weight decay 0, fused kernels on CUDA)."""
    if device.type == "cuda":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=True)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)


@dataclass
class StepSample:
    """One timed training step."""

    step_s: float
    optimizer_s: float
    compression_s: float
    visual_tokens: float
    loss: float
    initial_tokens: float = 0.0  # visual tokens per sample entering the LLM, as the model reported


@dataclass
class PresetRecord:
    """Everything measured for one preset."""

    label: str
    config: CompressionConfig
    packed: bool = False
    samples: list[StepSample] = field(default_factory=list)
    peak_mem_mb: float = 0.0
    peak_rss_mb: float = 0.0


def run_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    dtype: torch.dtype,
    visual_tokens: float = 0.0,
) -> StepSample:
    """One synchronised training step; the optimizer step is timed separately (CUDA events on GPU).

    ``visual_tokens`` is reported for models that do not count their own (the HF baseline).
    """
    timer = report.IntervalTimer(device)
    report.synchronize(device)
    timer.mark()
    optimizer.zero_grad(set_to_none=True)
    with report.autocast_context(device, dtype):
        output = model(**batch)
    output.loss.backward()
    timer.mark()
    optimizer.step()
    timer.mark()
    report.synchronize(device)
    forward_backward_s, optimizer_s = timer.intervals()
    per_layer = getattr(output, "visual_tokens_per_layer", None) or [visual_tokens]
    return StepSample(
        step_s=forward_backward_s + optimizer_s,
        optimizer_s=optimizer_s,
        compression_s=float(getattr(output, "compression_time_s", None) or 0.0),
        visual_tokens=sum(per_layer) / len(per_layer),
        loss=float(output.loss.detach()),
        initial_tokens=per_layer[0],
    )


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build, warm up, measure round-robin; one result row per preset (``--threads`` applies meanwhile)."""
    with report.torch_threads(args.threads):
        return _benchmark(args)


def _benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    device, dtype, attn = report.resolve_runtime(args.device, args.dtype, args.attn_implementation)
    load_at_start = report.load_average()
    shape = get_shape(args.shape)
    layouts = {"off": (False,), "on": (True,), "both": (False, True)}[args.packing]
    presets = [
        PresetRecord(f"{label} packed" if packed else label, config, packed)
        for label, config in resolve_presets(args.presets, shape)
        for packed in layouts
    ]
    torch.manual_seed(args.seed)

    model = build_model(shape, compression=None, dtype=dtype, attn_implementation=attn, device=device)
    model.config.use_cache = False
    trainable = freeze_for_stage(model, args.stage)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = build_optimizer(trainable, device, args.lr)
    if args.length_mix:
        drawn = draw_lengths(args.length_mix, args.batch_size, args.seed, shape.uncompressed_visual_tokens)
        batch = move_batch(build_ragged_batch(shape, drawn, seed=args.seed), device, dtype)
    else:
        batch = move_batch(build_training_batch(shape, args.stage, args.batch_size, seed=args.seed), device, dtype)
    logger.info(
        "%s %s: batch %d x %d text tokens + %s, %d trainable / %d parameters, %s on %s (%s)",
        shape.name, args.stage, args.batch_size, batch["input_ids"].shape[1], shape.describe_visual_input(),
        sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters()), report.dtype_name(dtype),
        device, attn,
    )  # fmt: skip

    packed_batch = {**batch, "pack_sequences": True}
    for record in presets:
        model.set_compression(record.config)
        for _ in range(args.warmup):
            run_step(model, packed_batch if record.packed else batch, optimizer, device, dtype)
        logger.info("warmed up %s", record.label)
    memory = report.PeakMemory(device)
    for number, record in report.round_robin(presets, args.steps):
        model.set_compression(record.config)
        with memory.measure():
            sample = run_step(model, packed_batch if record.packed else batch, optimizer, device, dtype)
        record.samples.append(sample)
        record.peak_mem_mb = max(record.peak_mem_mb, memory.peak_mb)
        record.peak_rss_mb = max(record.peak_rss_mb, memory.peak_rss_mb)
        logger.info("round %d %s: %.4f s (loss %.3f)", number, record.label, sample.step_s, sample.loss)
    if not all(math.isfinite(sample.loss) for record in presets for sample in record.samples):
        logger.warning("non-finite loss in a benchmark step: timings are still valid, the model is random")

    if args.hf_baseline:
        del model, optimizer, trainable
        report.release_memory(device)
        presets.append(_measure_hf_baseline(args, shape, device, dtype, attn, memory))
    machine = report.machine_info(device, dtype, attn, load_at_start)
    image_token = anyres_image_token_id(shape) if shape.anyres is not None else None
    lengths = batch_lengths(batch, image_token)
    return build_rows(presets, shape, args, machine, memory.kind, memory.exact_window, lengths)


def batch_lengths(batch: dict[str, torch.Tensor], image_token_id: int | None = None) -> list[SampleLength]:
    """Each row's text tokens, supervised tokens and whether it has a visual slot (read from the batch);
    ``image_token_id``: the placeholder of an AnyRes batch (one per AnyRes token), counted as slots too."""
    input_ids = batch["input_ids"].cpu()
    slots = (input_ids == IMAGE_TOKEN_ID) | (input_ids == VIDEO_TOKEN_ID)
    if image_token_id is not None:
        slots |= input_ids == image_token_id
    real = batch["attention_mask"].cpu().sum(dim=1) - slots.sum(dim=1)
    answers = (batch["labels"].cpu() != IGNORE_INDEX).sum(dim=1)
    return [
        SampleLength("batch", int(text), int(answer), bool(visual))
        for text, answer, visual in zip(real.tolist(), answers.tolist(), slots.any(dim=1).tolist(), strict=True)
    ]


def _measure_hf_baseline(
    args: argparse.Namespace,
    shape: ModelShape,
    device: torch.device,
    dtype: torch.dtype,
    attn: str,
    memory: report.PeakMemory,
) -> PresetRecord:
    """Time transformers' ``LlavaForConditionalGeneration`` on the same batch and freezing, after our rows
    (one model in memory at a time, so a 7B pair fits an 80 GB GPU; machine drift is not cancelled here)."""
    torch.manual_seed(args.seed)
    model = build_hf_llava(shape, dtype, attn, device)
    trainable = freeze_hf_for_stage(model, args.stage)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    optimizer = build_optimizer(trainable, device, args.lr)
    batch = build_training_batch(shape, args.stage, args.batch_size, seed=args.seed)
    hf_batch = move_batch(to_hf_batch(batch, shape), device, dtype)
    record = PresetRecord(BASELINE_LABEL, CompressionConfig())
    tokens = shape.average_visual_tokens(record.config)
    for _ in range(args.warmup):
        run_step(model, hf_batch, optimizer, device, dtype, tokens)
    for number in range(args.steps):
        with memory.measure():
            sample = run_step(model, hf_batch, optimizer, device, dtype, tokens)
        record.samples.append(sample)
        record.peak_mem_mb = max(record.peak_mem_mb, memory.peak_mb)
        record.peak_rss_mb = max(record.peak_rss_mb, memory.peak_rss_mb)
        logger.info("step %d %s: %.4f s (loss %.3f)", number, record.label, sample.step_s, sample.loss)
    return record


def build_rows(
    presets: list[PresetRecord],
    shape: ModelShape,
    args: argparse.Namespace,
    machine: dict[str, Any],
    memory_kind: str,
    memory_exact: bool,
    lengths: list[SampleLength],
) -> list[dict[str, Any]]:
    """Summaries per preset, ratios against the first (``none``) preset and the FLOP model.

    ``lengths`` (each row of the batch) give the padding share and the LLM tokens per second; with a ragged
    batch (``--length-mix``) the FLOP model is the per-sample one of the real tokens."""
    rows: list[dict[str, Any]] = []
    baseline_step: float | None = None
    baseline_fwd_bwd = 0.0
    for record in presets:
        step_s, iqr_s = report.median_iqr([sample.step_s for sample in record.samples])
        fwd_bwd_s = statistics.median(sample.step_s - sample.optimizer_s for sample in record.samples)
        if baseline_step is None:
            baseline_step, baseline_fwd_bwd = step_s, fwd_bwd_s
        optimizer_s = statistics.median(sample.optimizer_s for sample in record.samples)
        compression_s = statistics.median(sample.compression_s for sample in record.samples)
        measured = measured_initial_tokens(record.config, record.samples)
        options = {"gradient_checkpointing": args.gradient_checkpointing, "dymu_tokens": measured}
        if args.length_mix:
            step_flops = ragged_step_flops(shape, record.config, lengths, args.gradient_checkpointing, measured)
            flops_ratio = step_flops / ragged_step_flops(shape, None, lengths, args.gradient_checkpointing)
        else:
            step_flops = training_step_flops(shape, record.config, args.stage, args.batch_size, **options).total
            flops_ratio = float(predicted_step_ratio(shape, record.config, args.stage, args.batch_size, **options))
        per_layer = shape.visual_tokens_per_layer(record.config, measured=measured)
        llm_tokens = sum(sample.text_tokens + (per_layer[0] if sample.has_visual else 0) for sample in lengths)
        ratio = report.ratio(step_s, baseline_step)
        fwd_bwd_ratio = report.ratio(fwd_bwd_s, baseline_fwd_bwd)
        rows.append(
            {
                "preset": record.label,
                "shape": shape.name,
                "stage": args.stage,
                "batch_size": args.batch_size,
                "gradient_checkpointing": bool(args.gradient_checkpointing),
                "length_mix": args.length_mix or "fixed",
                "packed": record.packed,
                "padding_fraction": 0.0 if record.packed else padding_fraction(lengths, per_layer),
                "tokens_per_s": report.ratio(llm_tokens, step_s),
                **visual_input_fields(shape, record.config, measured),
                "avg_visual_tokens": shape.average_visual_tokens(record.config, measured),
                "measured_visual_tokens": statistics.mean(sample.visual_tokens for sample in record.samples),
                "steps": len(record.samples),
                "step_time_s": step_s,
                "step_time_iqr_s": iqr_s,
                "step_time_min_s": min(sample.step_s for sample in record.samples),
                "noisy": report.is_noisy(step_s, iqr_s),
                "samples_per_s": report.ratio(args.batch_size, step_s),
                "ratio_vs_none": ratio,
                "flops_ratio_vs_none": flops_ratio,
                "measured_over_ideal": report.ratio(ratio, flops_ratio),
                "fwd_bwd_time_s": fwd_bwd_s,
                "fwd_bwd_ratio_vs_none": fwd_bwd_ratio,
                "fwd_bwd_over_ideal": report.ratio(fwd_bwd_ratio, flops_ratio),
                "optimizer_share": report.ratio(optimizer_s, step_s),
                "compression_share": report.ratio(compression_s, step_s),
                "compression_time_s": compression_s,
                "peak_mem_mb": record.peak_mem_mb,
                "peak_mem_kind": memory_kind if memory_exact else f"{memory_kind} (process peak, approximate)",
                **({"peak_rss_mb": record.peak_rss_mb} if record.peak_rss_mb else {}),
                "step_tflops": step_flops / 1e12,
                "tflops_per_s": report.ratio(step_flops / 1e12, step_s),
                "loss": statistics.median(sample.loss for sample in record.samples),
                "machine": machine,
            }
        )
    return rows


NOTES = (
    "step = zero_grad + forward with labels + backward + optimizer.step (synchronised); "
    "median over round-robin rounds.",
    "ratio vs none = step time / none's step time; FLOP-model ratio = predicted_step_ratio; "
    "measured/ideal > 1 means less speed-up than the FLOPs promise. The FLOP model leaves out the optimizer step "
    "(same cost for every preset): fwd+bwd/ideal compares the step without it.",
    "compression share = model-reported host seconds in V2V/T2V scoring and selection / step time "
    "(on CUDA these are host seconds around asynchronous kernels).",
    "peak mem: CUDA max_memory_allocated; on CPU the peak RSS (getrusage) above the RSS at step start, approximate.",
)


def baseline_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The report note on the HF LLaVA row, when there is one."""
    if not any(row["preset"] == BASELINE_LABEL for row in rows):
        return []
    return [
        f"{BASELINE_LABEL} = transformers' LlavaForConditionalGeneration at the same shape, batch, freezing and "
        "checkpointing (image slots expanded to the patch count), timed after the presets with its own "
        "optimizer; its FLOP-model column is none's (it also computes logits at every position)."
    ]


def write_outputs(rows: list[dict[str, Any]], out: str) -> str:
    """JSON rows, the Markdown table and the ratio chart; returns the table."""
    first = rows[0]
    title = (
        f"Training step speed: {first['shape']} {first['stage']}, batch {first['batch_size']}, "
        f"gradient checkpointing {'on' if first['gradient_checkpointing'] else 'off'}"
    )
    if first.get("media") == "video":
        title += f", one video of {first['num_frames']} frames per sample"
    notes = [*NOTES, *video_notes(first), *baseline_notes(rows), *report.noise_note(rows, "step-time")]
    labels = [row["preset"] for row in rows]
    return report.write_report(rows, out, title, TABLE_COLUMNS, notes, labels, "step time / none")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES), help="benchmark shape (default small)")
    parser.add_argument("--stage", choices=STAGES, default="finetune")
    parser.add_argument(
        "--presets",
        type=report.parse_list,
        default=None,
        help="comma-separated preset names or YAML paths ('none' is the baseline, added if missing); default "
        "none,duet_192,duet_128,duet_64, for video shapes none,duet_video_53,duet_video_93",
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="round-robin rounds (timed steps per preset)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per preset before the rounds")
    parser.add_argument("--out", default="runs/bench/train_speed.json", help="FILE.json; FILE.md and FILE.png too")
    parser.add_argument(
        "--dtype", choices=sorted(report.DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--attn-implementation", default=None, help="default: flash_attention_2 if importable, else sdpa"
    )
    parser.add_argument(
        "--hf-baseline",
        action=argparse.BooleanOptionalAction,
        default=False,
        help=f"also time transformers' LlavaForConditionalGeneration (row '{BASELINE_LABEL}', image shapes) "
        "after the presets, same batch and freezing",
    )
    parser.add_argument(
        "--length-mix",
        type=mix_argument,
        default=None,
        help="draw a ragged finetuning batch from this length mix instead of equal-length samples: llava665k "
        "(LLaVA-1.5's instruction data, estimated lengths) or a file measured with check_data --length-mix-out",
    )
    parser.add_argument(
        "--packing",
        choices=("off", "on", "both"),
        default="off",
        help="padding-free (packed) LLM layers: off (padded), on, or both (every preset twice, same samples)",
    )
    parser.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate (tiny: the weights barely move)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    if args.presets is None:
        args.presets = default_presets(args.shape)
    if args.length_mix and args.stage != "finetune":
        parser.error("--length-mix draws instruction-tuning samples: use it with --stage finetune")
    if args.hf_baseline and args.packing != "off":
        parser.error("--hf-baseline times transformers' padded model: use it with --packing off")
    if args.hf_baseline:
        try:
            check_baseline_shape(get_shape(args.shape))
        except ValueError as error:
            parser.error(str(error))
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
