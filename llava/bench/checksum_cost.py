"""What the checkpoint marker's CRC-32s cost next to writing the checkpoint.

    python -m llava.bench.checksum_cost --size-gb 4 --files 8 --out /scratch/bench

Writes ``--files`` shard files of ``--size-gb`` in total (random bytes, like optimizer states; each
written and fsynced, as a save does), then times :func:`llava.training.checkpoints.mark_checkpoint_complete`
(which hashes every file) and the content verification a resume runs. A 7B ZeRO-3 checkpoint is about
98 GB (bf16 weights 13.5 GB plus fp32 master weights and Adam moments, 12 bytes per parameter); the
report extrapolates the hashing time to that size at the measured rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from llava.training.checkpoints import checkpoint_problem, mark_checkpoint_complete

SEVEN_B_ZERO3_GB = 98.0


def run(size_gb: float, num_files: int, out: Path) -> dict[str, float]:
    """Write, mark and verify one synthetic checkpoint under ``out``; returns seconds and GB/s."""
    checkpoint = out / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    per_file = int(size_gb * 1e9 / num_files)
    block = os.urandom(64 * 1024 * 1024)
    began = time.perf_counter()
    for index in range(num_files):
        with open(checkpoint / f"shard_{index:02d}.pt", "wb") as handle:
            written = 0
            while written < per_file:
                piece = block[: min(len(block), per_file - written)]
                handle.write(piece)
                written += len(piece)
            handle.flush()
            os.fsync(handle.fileno())
    write_s = time.perf_counter() - began
    began = time.perf_counter()
    mark_checkpoint_complete(checkpoint, step=1)
    mark_s = time.perf_counter() - began
    began = time.perf_counter()
    problem = checkpoint_problem(checkpoint, verify_content=True)
    verify_s = time.perf_counter() - began
    if problem is not None:
        raise RuntimeError(f"verification failed on an untouched checkpoint: {problem}")
    total_gb = per_file * num_files / 1e9
    return {
        "size_gb": total_gb,
        "files": num_files,
        "write_s": write_s,
        "checksum_s": mark_s,
        "verify_s": verify_s,
        "checksum_share_of_write_percent": 100.0 * mark_s / write_s,
        "checksum_gb_per_s": total_gb / mark_s,
        "extrapolated_7b_zero3_checksum_s": SEVEN_B_ZERO3_GB / (total_gb / mark_s),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    """CLI: print (and optionally save) the measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="total checkpoint size to write")
    parser.add_argument("--files", type=int, default=8, help="number of shard files")
    parser.add_argument("--out", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    scratch = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="checksum-bench-"))
    try:
        result = run(args.size_gb, args.files, scratch)
    finally:
        shutil.rmtree(scratch / "checkpoint-1", ignore_errors=True)
        if not args.out:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
