"""Merge a LoRA checkpoint into a plain DuetLlava checkpoint.

``python -m llava.tools.merge_lora --checkpoint OUT/checkpoint-500 --out merged/``. The base model
is rebuilt from the run's ``run_config.json`` (checkpoint dir or its parent, or ``--run-config``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from llava.training.lora import LoraCheckpointError, merge_lora_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description="Merge a LoRA adapter checkpoint into its base model.")
    parser.add_argument("--checkpoint", required=True, help="LoRA output dir or an intermediate checkpoint-N dir")
    parser.add_argument("--out", required=True, help="directory for the merged checkpoint")
    parser.add_argument("--run-config", help="run_config.json of the run (default: found next to the checkpoint)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = merge_lora_checkpoint(args.checkpoint, args.out, args.run_config)
    except (LoraCheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
