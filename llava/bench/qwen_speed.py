"""Qwen2.5-VL with DUET compression: the prefill FLOP model and the inference-speed benchmark.

Shapes: ``qwen2.5-vl-7b`` (Qwen2.5-VL-7B-Instruct: 32-block vision transformer, width 1280, 16 heads,
14 px patches merged 2 x 2, 8 x 8-patch attention windows with full attention in blocks 7/15/23/31;
28-layer Qwen2 decoder, width 3584, 28 heads, 4 KV heads) for GPUs, ``qwen-tiny`` for CPU tests. One
image per prompt at ``--image-size`` (default 1008 x 756: 72 x 54 patches, 972 merged tokens), random
weights (time does not depend on them).

FLOP model (prefill, multiply-add = 2; rule 2 of :mod:`llava.bench.flops`): vision patch embedding,
per block qkv + proj + the gated MLP on every patch, attention over its window (64 patches) or over the
whole image in the full blocks; the 2 x 2 merger MLP; V2V scoring (the last full block's attention map,
computed once more); the decoder with its visual tokens per layer (V2V fractions, then T2V) and GQA; T2V
scoring; the last token's logits.

    python -m llava.bench.qwen_speed --flops-only --presets none,qwen_duet_53,qwen_duet_67
    python -m llava.bench.qwen_speed --shape qwen2.5-vl-7b --batch-sizes 1,8 --new-tokens 64 \\
        --decode-paths eager,fast --out runs/bench/qwen-infer.json        # on a GPU
"""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava.bench import report
from llava.bench.flops import linear_flops
from llava.bench.infer_speed import run_generate
from llava.compression.accounting import visual_tokens_per_layer
from llava.compression.config import CompressionConfig, load_compression
from llava.families.registry import family_named
from llava.model.fast_generation import FastDecoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QwenShape:
    """The dimensions the FLOP model and the random benchmark model need."""

    name: str
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    full_blocks: tuple[int, ...]
    window_patches: int  # patches per side of an attention window
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    patch: int = 14
    merge: int = 2

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """Patches per column and row of an image resized to multiples of ``patch * merge``."""
        unit = self.patch * self.merge
        return max(1, round(height / unit)) * self.merge, max(1, round(width / unit)) * self.merge

    def config_fields(self) -> dict[str, Any]:
        """The random model's config, as the Qwen2.5-VL family's config fields."""
        head_dim = self.hidden // self.heads
        sections = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
        sections[0] += head_dim // 2 - sum(sections)
        return dict(
            text_config=dict(
                hidden_size=self.hidden, intermediate_size=self.intermediate, num_hidden_layers=self.layers,
                num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, vocab_size=self.vocab,
                pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": sections, "rope_theta": 1000000.0},
            ),
            vision_config=dict(
                depth=self.vision_layers, hidden_size=self.vision_hidden, intermediate_size=self.vision_intermediate,
                num_heads=self.vision_heads, out_hidden_size=self.hidden, patch_size=self.patch,
                spatial_merge_size=self.merge, temporal_patch_size=2, window_size=self.window_patches * self.patch,
                fullatt_block_indexes=list(self.full_blocks),
            ),
            image_token_id=self.vocab - 6, video_token_id=self.vocab - 5, vision_start_token_id=self.vocab - 4,
            vision_end_token_id=self.vocab - 3,
        )  # fmt: skip


SHAPES = {
    "qwen2.5-vl-7b": QwenShape("qwen2.5-vl-7b", 32, 1280, 3420, 16, (7, 15, 23, 31), 8, 28, 3584, 18944, 28, 4, 152064),
    "qwen-tiny": QwenShape("qwen-tiny", 2, 32, 64, 4, (1,), 4, 4, 64, 128, 4, 2, 200),
}


def prefill_flops(
    shape: QwenShape, config: CompressionConfig, batch: int, prompt_tokens: int, grid: tuple[int, int]
) -> dict[str, float]:
    """Forward FLOPs of a prefill by component, one image per prompt."""
    rows, columns = grid
    patches = rows * columns
    tokens = patches // shape.merge**2
    d, mlp = shape.vision_hidden, shape.vision_intermediate
    per_patch = linear_flops(1, d, 3 * d) + linear_flops(1, d, d) + 3 * linear_flops(1, d, mlp)
    window = min(patches, shape.window_patches**2)
    attention = 0.0
    for block in range(shape.vision_layers):
        span = patches if block in shape.full_blocks else window
        attention += 4.0 * patches * span * d
    merged = shape.merge**2 * d
    vision = linear_flops(patches, 3 * 2 * shape.patch**2, d) + shape.vision_layers * patches * per_patch + attention
    vision += linear_flops(tokens, merged, merged) + linear_flops(tokens, merged, shape.hidden)
    v2v = 4.0 * patches * patches * d if config.v2v is not None else 0.0
    visual = visual_tokens_per_layer(config, shape.layers, tokens)
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    layer_linears = [(shape.hidden, shape.hidden), (shape.hidden, kv), (shape.hidden, kv), (shape.hidden, shape.hidden),
                     (shape.hidden, shape.intermediate), (shape.hidden, shape.intermediate),
                     (shape.intermediate, shape.hidden)]  # fmt: skip
    llm = 0.0
    for count in visual:
        length = prompt_tokens + count
        llm += sum(linear_flops(length, a, b) for a, b in layer_linears) + 2.0 * length * length * shape.hidden
    t2v = 0.0
    if config.t2v is not None:
        for layer, _ in config.t2v.schedule(shape.layers, round(visual[0])):
            length = prompt_tokens + visual[layer - 1]
            t2v += linear_flops(prompt_tokens, shape.hidden, shape.hidden) + linear_flops(length, shape.hidden, kv)
            t2v += 2.0 * prompt_tokens * length * shape.hidden
    parts = {"vision": vision, "v2v_scoring": v2v, "llm": llm, "t2v_scoring": t2v,
             "lm_head": linear_flops(1, shape.hidden, shape.vocab)}  # fmt: skip
    return {key: value * batch for key, value in parts.items()} | {"visual_tokens_avg": sum(visual) / len(visual)}


def build_prompts(shape: QwenShape, batch: int, prompt_tokens: int, grid: tuple[int, int], seed: int) -> dict:
    """Left-aligned prompts of equal length: BOS, vision start, the image's placeholders, vision end, text."""
    fields = shape.config_fields()
    generator = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1] // shape.merge**2
    text = torch.randint(3, fields["image_token_id"], (batch, prompt_tokens), generator=generator)
    image = torch.full((batch, tokens), fields["image_token_id"])
    start = torch.full((batch, 1), fields["vision_start_token_id"])
    end = torch.full((batch, 1), fields["vision_end_token_id"])
    ids = torch.cat([text[:, :1], start, image, end, text[:, 1:]], dim=1)
    patches = grid[0] * grid[1]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(batch * patches, 3 * 2 * shape.patch**2, generator=generator),
        "image_grid_thw": torch.tensor([[1, grid[0], grid[1]]] * batch),
    }


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time generate per (preset, batch, decode path); FLOP-model ratios alongside."""
    shape = SHAPES[args.shape]
    grid = shape.grid(*args.image_size)
    presets = [(report.preset_label(spec), load_compression(spec)) for spec in args.presets]
    rows: list[dict[str, Any]] = []
    if args.flops_only:
        for batch in args.batch_sizes:
            base = prefill_flops(shape, CompressionConfig(), batch, args.prompt_tokens, grid)
            for label, config in presets:
                flops = prefill_flops(shape, config, batch, args.prompt_tokens, grid)
                total = sum(value for key, value in flops.items() if key != "visual_tokens_avg")
                base_total = sum(value for key, value in base.items() if key != "visual_tokens_avg")
                rows.append({"preset": label, "batch_size": batch, "visual tok/layer": flops["visual_tokens_avg"],
                             "prefill_tflops": total / 1e12, "flops_ratio_vs_none": total / base_total})  # fmt: skip
        return rows
    device, dtype, attn = report.resolve_runtime(args.device, args.dtype, args.attn_implementation or "sdpa")
    torch.manual_seed(args.seed)
    model = family_named("qwen2_5_vl").random_model(shape.config_fields(), dtype, device, attn).eval()
    machine = report.machine_info(device, dtype, attn, report.load_average())
    decoders: dict[str, FastDecoder] = {}
    for batch in args.batch_sizes:
        prompts = {
            key: value.to(device=device, dtype=dtype) if key == "pixel_values" else value.to(device)
            for key, value in build_prompts(shape, batch, args.prompt_tokens, grid, args.seed).items()
        }
        cases = [(label, cfg, path) for path in args.decode_paths for label, cfg in presets]
        samples: dict[tuple, list] = {case[::2]: [] for case in cases}
        for round_number in range(args.repeats + 1):  # round 0 warms up (and captures the fast path's graphs)
            for label, cfg, path in cases:
                model.set_compression(cfg)
                decoder = decoders.setdefault(label, FastDecoder(model)) if path == "fast" else None
                sample = run_generate(model, prompts, args.new_tokens, 0, fast_decoder=decoder)
                if round_number:
                    samples[(label, path)].append(sample)
        for label, cfg, path in cases:
            timed = samples[(label, path)]
            ttft = statistics.median(sample.ttft_s for sample in timed)
            decode = statistics.median(sample.decode_s for sample in timed)
            flops = prefill_flops(shape, cfg, batch, args.prompt_tokens, grid)
            rows.append({"preset": label, "batch_size": batch, "path": path,
                         "visual tok/layer": flops["visual_tokens_avg"], "ttft_s": ttft,
                         "decode_tokens_per_s": report.ratio((args.new_tokens - 1) * batch, decode),
                         "machine": machine})  # fmt: skip
    for row in rows:
        base = next(r for r in rows if r["batch_size"] == row["batch_size"] and r["path"] == row["path"]
                    and r["preset"] == "none")  # fmt: skip
        row["prefill_speedup_vs_none"] = report.ratio(base["ttft_s"], row["ttft_s"])
        row["decode_speedup_vs_none"] = report.ratio(row["decode_tokens_per_s"], base["decode_tokens_per_s"])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-vl-7b", choices=sorted(SHAPES))
    parser.add_argument("--presets", type=report.parse_list, default=["none", "qwen_duet_53", "qwen_duet_67"])
    parser.add_argument("--batch-sizes", type=lambda text: report.parse_list(text, int), default=[1, 8])
    parser.add_argument("--image-size", type=lambda text: tuple(int(x) for x in text.split("x")), default=(1008, 756),
                        help="WIDTHxHEIGHT of every prompt's image (default 1008x756)")  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-paths", type=report.parse_list, default=["eager", "fast"])
    parser.add_argument("--flops-only", action="store_true", help="print the FLOP model only (no model is built)")
    parser.add_argument("--out", default="runs/bench/qwen_speed.json")
    parser.add_argument("--dtype", choices=sorted(report.DTYPES), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--attn-implementation", default=None, help="default sdpa")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if "none" not in args.presets:
        args.presets = ["none", *args.presets]
    if args.new_tokens < 2 or args.repeats < 1:
        parser.error("--new-tokens must be >= 2 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run, write FILE.json and FILE.md, print the table; returns the rows."""
    args = parse_args(argv)
    rows = benchmark(args)
    json_path, md_path, _ = report.output_paths(args.out)
    report.write_json(rows, json_path)
    columns = [(key, key) for key in rows[0] if key != "machine"]
    print(report.write_markdown(rows, columns, md_path, f"Qwen2.5-VL prefill and decode: {args.shape}"))
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
