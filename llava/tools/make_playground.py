"""Build the offline playground: ``python -m llava.tools.make_playground --out DIR``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from llava.playground.anyres import build_anyres_playground
from llava.playground.builder import build_playground
from llava.playground.scene_builder import build_scene_playground


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Generate synthetic LLaVA / Video-LLaVA data (images and videos) plus tiny image and video "
            "CLIP towers and a tiny LLaMA (no download)."
        )
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--task",
        choices=("shapes", "scenes", "anyres"),
        default="shapes",
        help=(
            "shapes: the pipeline playground (images, videos, tiny random towers; fast, exercises every path); "
            "scenes: the learnable 336 px task with a held-out benchmark and a pretrained tiny tower; "
            "anyres: the scenes task at three aspect ratios as a tiny LLaVA-NeXT checkpoint (AnyRes tiles)"
        ),
    )
    parser.add_argument(
        "--num-eval", type=int, default=300, help="scenes, anyres: held-out benchmark questions (one per image)"
    )
    parser.add_argument(
        "--llm-steps", type=int, default=400, help="scenes, anyres: text pretraining steps of the LLM (0: random LLM)"
    )
    parser.add_argument(
        "--tower-steps",
        type=int,
        default=300,
        help="scenes, anyres: supervised tower pretraining steps (0: random tower)",
    )
    parser.add_argument(
        "--num-pretrain",
        type=int,
        default=None,
        help="caption samples (pretrain.json; shapes 600, scenes 1000, anyres 600)",
    )
    parser.add_argument(
        "--num-finetune",
        type=int,
        default=None,
        help="instruction samples (finetune.json; shapes 600, scenes 3000, anyres 1500)",
    )
    parser.add_argument(
        "--num-video-pretrain", type=int, default=160, help="video caption samples (video_pretrain.json)"
    )
    parser.add_argument(
        "--num-video-finetune",
        type=int,
        default=160,
        help="mixed video/image/text samples (video_finetune.json); 0 and 0 write no videos",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data and weights")
    parser.add_argument("--vocab-size", type=int, default=1000, help="tokenizer vocabulary size")
    parser.add_argument("--force", action="store_true", help="overwrite outputs in a non-empty --out")
    args = parser.parse_args(argv)
    if args.num_pretrain is None:
        args.num_pretrain = {"scenes": 1000, "anyres": 600}.get(args.task, 600)
    if args.num_finetune is None:
        args.num_finetune = {"scenes": 3000, "anyres": 1500}.get(args.task, 600)
    counts = (args.num_pretrain, args.num_finetune, args.num_video_pretrain, args.num_video_finetune)
    if min(counts) < 0 or min(args.num_eval, args.tower_steps, args.llm_steps) < 0:
        parser.error(
            "--num-pretrain, --num-finetune, --num-video-pretrain, --num-video-finetune, --num-eval and "
            "--tower-steps must be >= 0"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        common = {"num_pretrain": args.num_pretrain, "num_finetune": args.num_finetune, "seed": args.seed,
                  "vocab_size": args.vocab_size, "force": args.force}  # fmt: skip
        if args.task in ("scenes", "anyres"):
            build = build_scene_playground if args.task == "scenes" else build_anyres_playground
            manifest = build(
                args.out, num_eval=args.num_eval, tower_steps=args.tower_steps, llm_steps=args.llm_steps, **common
            )
        else:
            manifest = build_playground(
                args.out,
                num_video_pretrain=args.num_video_pretrain,
                num_video_finetune=args.num_video_finetune,
                **common,
            )
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"playground written to {args.out} in {time.perf_counter() - start:.1f}s")
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
