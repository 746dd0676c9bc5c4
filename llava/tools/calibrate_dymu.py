"""Calibrate DyMU's per-layer merge thresholds on a data set's images, or measure the token counts that
given thresholds produce.

Calibration (DyMU's offline step): the tower runs on batches of the data set's images; in each block the
``r * batch`` most similar A->B edges of the whole batch merge (``r`` tokens per image and layer on
average, images merging more or fewer as their content allows) and the similarity of the first edge
left unmerged is that batch's threshold for the layer. Thresholds are averaged over batches (weighted by
batch size) and over ranks. Afterwards the thresholds are applied to the same images, and the tokens
per image (mean and standard deviation) are written next to them.

``--target`` picks ``r``: ``low``/``mid``/``high`` keep about 94/209/393 of CLIP-L/14-336's 577 tokens
(DyMU's r = 21/16/8 over 23 layers; the same fractions of any other tower), a number keeps about that
many tokens (CLS included): ``r = round((T0 - target) / layers)``.

    python -m llava.tools.calibrate_dymu --vision_tower openai/clip-vit-large-patch14-336 \\
        --data_path playground/data/llava_v1_5_mix665k.json --image_folder playground/data \\
        --target low --max_images 20000 --out runs/dymu/clip-l-336-low.json
    torchrun --nproc_per_node 8 -m llava.tools.calibrate_dymu ...        # data-parallel
    python -m llava.tools.calibrate_dymu --measure runs/dymu/clip-l-336-low.json \\
        --vision_tower ... --data_path ... --image_folder ...                   # tokens per image, mean +- std
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import CLIPVisionModel

from llava.compression.config import DyMUConfig
from llava.compression.dtome import MergeState, merge_above, merge_top_edges
from llava.data.dataset import DataError, contained_path, read_samples
from llava.data.images import load_and_preprocess
from llava.hf_adapter import load_image_processor
from llava.model.vision_tower import layers_to_run, run_dtome

logger = logging.getLogger(__name__)

TARGET_FRACTIONS = {"low": 94 / 577, "mid": 209 / 577, "high": 393 / 577}
"""Tokens kept (CLS included) as a fraction of the tower's tokens: DyMU's r = 21/16/8 on CLIP-L/14-336."""


def merges_per_layer(target: str, num_tokens: int, num_layers: int) -> int:
    """Tokens each image merges per layer on average so that about ``target`` tokens remain."""
    if target in TARGET_FRACTIONS:
        wanted = TARGET_FRACTIONS[target] * num_tokens
    else:
        try:
            wanted = float(target)
        except ValueError:
            raise ValueError(f"--target must be low, mid, high or a token count, got {target!r}") from None
        if not 1 <= wanted <= num_tokens:
            raise ValueError(f"--target {target} tokens is outside 1..{num_tokens} (this tower's tokens per image)")
    return max(0, round((num_tokens - wanted) / num_layers))


def reachable_tokens(num_tokens: int, num_layers: int, per_layer: int) -> int:
    """Tokens left after ``num_layers`` layers merging ``per_layer`` each, when a layer can merge at most
    its A side (every other token, CLS excluded)."""
    tokens = num_tokens
    for _ in range(num_layers):
        tokens -= min(per_layer, (tokens - 1) // 2)
    return tokens


def image_paths(data_path: str, image_folder: str | None, allow_outside_paths: bool = False) -> list[str]:
    """Every image a LLaVA data file names (text-only and video samples contribute none), resolved under
    ``image_folder``; paths outside it are refused unless ``allow_outside_paths``."""
    folder = image_folder or os.getcwd()
    paths = []
    for index, sample in enumerate(read_samples(data_path)):
        images = sample.get("image") if isinstance(sample, dict) else None
        for name in [images] if isinstance(images, str) else list(images or []):
            if not isinstance(name, str):
                raise DataError(f"{data_path}: sample {index}: 'image' entries must be paths, got {name!r}")
            if allow_outside_paths:
                paths.append(os.path.join(folder, name))
            else:
                try:
                    paths.append(contained_path(folder, name, "image"))
                except DataError as error:
                    raise DataError(f"{data_path}: sample {index}: {error}") from None
    return paths


def _shard(paths: list[str], max_images: int | None, seed: int, rank: int, world_size: int) -> list[str]:
    if max_images is not None and len(paths) > max_images:
        paths = sorted(random.Random(seed).sample(paths, max_images))
    return paths[rank::world_size]


def _batches(paths: list[str], batch_size: int) -> Iterator[list[str]]:
    for start in range(0, len(paths), batch_size):
        yield paths[start : start + batch_size]


class Calibrator:
    """Runs a CLIP tower with DToMe and accumulates thresholds or token counts."""

    def __init__(self, vision_model: CLIPVisionModel, processor: Any, feature_layer: int, aspect_ratio: str) -> None:
        self.vision_model = vision_model
        self.processor = processor
        self.aspect_ratio = aspect_ratio
        config = vision_model.config
        self.num_layers = layers_to_run(config.num_hidden_layers, feature_layer)
        self.num_tokens = (config.image_size // config.patch_size) ** 2 + 1

    def _pixels(self, paths: list[str]) -> torch.Tensor:
        device = next(self.vision_model.parameters()).device
        return load_and_preprocess(paths, self.processor, self.aspect_ratio).to(device)

    @torch.no_grad()
    def threshold_sums(self, paths: list[str], per_layer: int, batch_size: int, progress: bool) -> torch.Tensor:
        """Per layer, the sum over batches of ``batch size x batch threshold`` (divide by the images)."""
        sums = torch.zeros(self.num_layers, dtype=torch.float64)
        for batch in tqdm(list(_batches(paths, batch_size)), desc="calibrating", disable=not progress):
            found: list[torch.Tensor] = []

            def merge(index: int, state: MergeState, keys: torch.Tensor, found: list = found) -> MergeState:
                merged, threshold = merge_top_edges(state, keys, per_layer)
                found.append(threshold)
                return merged

            run_dtome(self.vision_model, self._pixels(batch), self.num_layers, merge)
            sums += torch.stack(found).double().cpu() * len(batch)
        return sums

    @torch.no_grad()
    def token_counts(self, paths: list[str], thresholds: Sequence[float], batch_size: int, progress: bool) -> list[int]:
        """Tokens per image (CLS included) that ``thresholds`` leave."""
        counts: list[int] = []
        for batch in tqdm(list(_batches(paths, batch_size)), desc="measuring", disable=not progress):
            state = run_dtome(
                self.vision_model,
                self._pixels(batch),
                self.num_layers,
                lambda index, state, keys: merge_above(state, keys, thresholds[index]),
            )
            counts += state.counts.tolist()
        return counts


def _distributed() -> tuple[int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), world_size


def _all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        moved = tensor.to(backend_device)
        torch.distributed.all_reduce(moved)
        return moved.cpu()
    return tensor


def _gather_counts(counts: list[int], world_size: int) -> list[int]:
    if world_size == 1:
        return counts
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, counts)
    return [count for part in gathered for count in part]


def count_summary(counts: list[int], keep_cls: bool = False) -> dict[str, float]:
    """Mean and standard deviation of tokens per image, with CLS and as LLaVA's patch tokens."""
    mean = sum(counts) / len(counts)
    std = math.sqrt(sum((count - mean) ** 2 for count in counts) / len(counts))
    return {"tokens_mean": mean, "tokens_std": std, "llm_tokens_mean": mean - (0 if keep_cls else 1)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision_tower", required=True, help="CLIP vision tower folder (or hub id when online)")
    parser.add_argument("--data_path", required=True, help="LLaVA data file (JSON list or JSONL) naming images")
    parser.add_argument("--image_folder", default=None, help="root of the data's image paths (default: cwd)")
    parser.add_argument("--target", default=None, help="low, mid, high or a token count (CLS included)")
    parser.add_argument("--out", default=None, help="thresholds file to write (JSON)")
    parser.add_argument("--measure", default=None, help="a thresholds file: only report tokens per image")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_images", type=int, default=256_000, help="images drawn (seeded) from the data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision_feature_layer", type=int, default=-2, help="LLaVA reads layer -2 (23 of 24 run)")
    parser.add_argument("--image_aspect_ratio", default="pad", choices=["pad", "square"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--allow_outside_paths", action="store_true", help="trusted data: images may lie anywhere")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    if (args.measure is None) == (args.target is None):
        parser.error("give either --target (calibrate) or --measure THRESHOLDS.json (report tokens per image)")
    if args.target is not None and args.out is None:
        parser.error("--target needs --out (where to write the thresholds)")
    if args.batch_size < 1 or args.max_images < 1:
        parser.error("--batch_size and --max_images must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Calibrate (``--target``) or measure (``--measure``); prints and returns the summary."""
    args = parse_args(argv)
    rank, world_size = _distributed()
    device = torch.device(
        args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    )
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    vision_model = CLIPVisionModel.from_pretrained(args.vision_tower, dtype=dtype, attn_implementation="sdpa")
    vision_model.to(device).eval()
    calibrator = Calibrator(vision_model, load_image_processor(args.vision_tower), args.vision_feature_layer,
                            args.image_aspect_ratio)  # fmt: skip
    all_paths = image_paths(args.data_path, args.image_folder, args.allow_outside_paths)
    if not all_paths:
        raise DataError(f"{args.data_path}: no sample names an image")
    paths = _shard(all_paths, args.max_images, args.seed, rank, world_size)
    progress = rank == 0 and not args.no_progress
    images = _all_reduce(torch.tensor([len(paths)], dtype=torch.float64), world_size).item()
    summary: dict[str, Any] = {"vision_tower": str(args.vision_tower), "data_path": str(args.data_path),
                               "num_images": int(images), "feature_layer": args.vision_feature_layer,
                               "num_layers": calibrator.num_layers, "tokens_in": calibrator.num_tokens}  # fmt: skip
    if args.measure is not None:
        # Read and checked as a preset reads it (errors name the file).
        thresholds = list(DyMUConfig(thresholds_file=args.measure).thresholds)
        if len(thresholds) != calibrator.num_layers:
            raise ValueError(
                f"{args.measure} has {len(thresholds)} thresholds but the tower runs {calibrator.num_layers} layers"
            )
        summary["thresholds_file"] = str(args.measure)
    else:
        per_layer = merges_per_layer(args.target, calibrator.num_tokens, calibrator.num_layers)
        floor = reachable_tokens(calibrator.num_tokens, calibrator.num_layers, per_layer)
        wanted = calibrator.num_tokens - per_layer * calibrator.num_layers
        if floor > wanted:
            logger.warning(
                "target %s: %d layers merging at most half their tokens each leave at least about %d of %d tokens, "
                "not %d; the thresholds will aim for that", args.target, calibrator.num_layers, floor,
                calibrator.num_tokens, wanted,
            )  # fmt: skip
        sums = _all_reduce(calibrator.threshold_sums(paths, per_layer, args.batch_size, progress), world_size)
        thresholds = (sums / images).tolist()
        summary.update(target=args.target, merges_per_layer=per_layer, seed=args.seed, thresholds=thresholds)
    counts = _gather_counts(calibrator.token_counts(paths, thresholds, args.batch_size, progress), world_size)
    summary.update(count_summary(counts))
    if rank == 0:
        if args.out is not None:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(
            f"{summary['num_images']} images: {summary['tokens_mean']:.1f} +- {summary['tokens_std']:.1f} tokens per "
            f"image (CLS included) of {calibrator.num_tokens}"
            + (f"; thresholds written to {args.out}" if args.out else "")
        )
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
