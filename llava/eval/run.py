"""Evaluate a checkpoint on benchmarks, for one or several compression presets.

    python -m llava.eval.run --model runs/llava-v1.5-7b --root playground/data/eval \\
        --benchmarks textvqa,gqa,mme,pope,sqa --presets none,duet_192 --out runs/eval/llava-v1.5-7b

Several GPUs: ``torchrun --nproc_per_node 8 -m llava.eval.run ...`` (each rank answers its shard, rank 0
merges and scores). Without a launcher, ``--rank``/``--world-size`` run one shard; ``--score-only`` scores
a folder once all shards are done. A killed run resumes where it stopped when started again with the
same ``--out``.

``--protocol official`` (the default) reads answers as each benchmark's published scoring script does and
``--protocol strict`` with this project's stricter rules (see the README's Evaluate section); the result
file and the printed line say which. ``--export official`` also writes the answers in the official
script's or server's format under ``<out>/<preset>/<benchmark>/export-official/``. Both work with
``--score-only``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llava.eval.answers import read_answers
from llava.eval.base import PROTOCOLS, EvalDataError
from llava.eval.benchmarks.videoqa import VideoQA
from llava.eval.judge import JudgeConfig, judge_answers
from llava.eval.registry import benchmark_names, get_benchmark
from llava.eval.runner import EXPORTS, generate_answers, score_folder

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_PRESET = "checkpoint"
"""Preset label meaning: the compression the checkpoint was saved with."""


def preset_label(preset: str) -> str:
    """The folder and table name of a preset: its name, or a YAML file's stem."""
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--seed", type=int, default=0, help="torch seed set before each preset (random-drop presets)")
    parser.add_argument("--root", default="playground/data/eval", help="evaluation data root (LLaVA's layout)")
    parser.add_argument(
        "--benchmarks", required=True, help=f"comma-separated benchmark names: {', '.join(benchmark_names())}"
    )
    parser.add_argument(
        "--presets",
        default=CHECKPOINT_PRESET,
        help=f"comma-separated compression presets or YAML paths ('{CHECKPOINT_PRESET}': as saved; 'none': off)",
    )
    parser.add_argument("--out", required=True, help="output folder (answers, results); reused to resume")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark")
    parser.add_argument("--skip-bad", action="store_true", help="count and skip questions whose media are unreadable")
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on CUDA, else float32"
    )
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    parser.add_argument("--vision-tower", default=None, help="CLIP folder with the image processor (original LLaVA)")
    parser.add_argument("--rank", type=int, default=None, help="this shard (without a launcher)")
    parser.add_argument("--world-size", type=int, default=None, help="number of shards (without a launcher)")
    parser.add_argument("--score-only", action="store_true", help="score existing answers, generate nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--fast-decoding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static per-stage KV caches and CUDA-graph decode steps (default: on CUDA with SDPA/eager attention)",
    )
    parser.add_argument(
        "--judge", action="store_true", help="also judge video QA answers with an LLM (OpenAI-compatible endpoint)"
    )
    parser.add_argument("--judge-url", default=None, help="judge endpoint base URL (default: $DUET_JUDGE_URL)")
    parser.add_argument("--judge-model", default=None, help="judge model (default: $DUET_JUDGE_MODEL or gpt-3.5-turbo)")
    parser.add_argument(
        "--judge-temperature",
        type=float,
        default=None,
        help="judge sampling temperature (default: none sent under --protocol official, 0 under strict)",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="official",
        help="answer reading: 'official' = the published scoring scripts (default), 'strict' = this project's",
    )
    parser.add_argument(
        "--export",
        choices=EXPORTS,
        default=None,
        help="also write the answers in the official script's format to <out>/<preset>/<benchmark>/export-official/",
    )
    args = parser.parse_args(argv)
    args.benchmarks = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
    args.presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = [name for name in args.benchmarks if name not in benchmark_names()]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(benchmark_names())}")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size and --limit must be >= 1")
    if (args.rank is None) != (args.world_size is None):
        parser.error("--rank and --world-size go together")
    return args


def _distributed(args: argparse.Namespace) -> tuple[int, int, bool]:
    """``(rank, world_size, launched)``: from ``--rank``/``--world-size``, else from a launcher's environment
    (which also starts the process group, so rank 0 can wait for the others before scoring)."""
    if args.rank is not None:
        return args.rank, args.world_size, False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), world_size, True


def _load_pipeline(args: argparse.Namespace) -> Any:
    from llava.inference import load_pipeline

    device = args.device
    if device is None and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    return load_pipeline(
        args.model, dtype=dtype, device=device, vision_tower=args.vision_tower, fast_decoding=args.fast_decoding
    )


def _judge_for(args: argparse.Namespace, benchmark: Any) -> Any:
    """The LLM judge for video QA when ``--judge`` asks for it (other benchmarks have official metrics)."""
    if not args.judge or not isinstance(benchmark, VideoQA):
        return None
    config = JudgeConfig.from_env(url=args.judge_url, model=args.judge_model, temperature=args.judge_temperature)
    return functools.partial(judge_answers, config=config, protocol=args.protocol)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Generate (unless ``--score-only``) and score every preset x benchmark; returns rank 0's results."""
    args = parse_args(argv)
    rank, world_size, launched = _distributed(args)
    out = Path(args.out)
    pipeline = None if args.score_only else _load_pipeline(args)
    results: list[dict[str, Any]] = []
    loaded = {}  # every benchmark is read and checked once, whatever the number of presets
    for name in args.benchmarks:
        benchmark = get_benchmark(name)
        items = benchmark.load(Path(args.root), out / ".cache" / name)
        loaded[name] = (benchmark, items if args.limit is None else items[: args.limit])
    for preset in args.presets:
        torch.manual_seed(args.seed + rank)  # random-drop presets draw from it: repeatable per preset and shard
        if pipeline is not None and preset != CHECKPOINT_PRESET:
            pipeline.model.set_compression(preset)
        label = preset_label(preset)
        for name, (benchmark, items) in loaded.items():
            folder = out / label / name
            folder.mkdir(parents=True, exist_ok=True)
            if pipeline is not None:
                generate_answers(
                    pipeline, benchmark, items, folder, args.batch_size, rank, world_size, label, args.skip_bad,
                    progress=not args.no_progress,
                )  # fmt: skip
            if launched:
                torch.distributed.barrier()
            if rank != 0:
                continue
            if not launched and world_size > 1 and not args.score_only:
                remaining = len({item.question_id for item in items} - set(read_answers(folder)))
                if remaining:
                    print(f"{label}/{name}: shard {rank} done; {remaining} questions wait for other shards")
                    continue
            run_info = {"model": str(Path(args.model).resolve()), "root": str(Path(args.root).resolve()),
                        "preset": label, "batch_size": args.batch_size, "world_size": world_size,
                        "seed": args.seed}  # fmt: skip
            result = score_folder(
                benchmark, items, folder, run_info, _judge_for(args, benchmark), args.protocol, args.export
            )
            results.append(result)
            score = "server-scored" if result["score"] is None else f"{result['score']:.2f}"
            print(
                f"{label}/{name} [{args.protocol}]: {benchmark.score_name} {score} "
                f"({result['num_scored']}/{result['num_questions']} scored) -> {folder / 'result.json'}"
            )
            if args.export is not None:
                files = result.get("export_files")
                print(f"  export {args.export}: {', '.join(files) if files else 'none for this benchmark'}")
    if launched:
        torch.distributed.destroy_process_group()
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main()
    except EvalDataError as error:
        raise SystemExit(f"error: {error}") from None
