"""Answer prompts about images and videos with a trained checkpoint.

``python -m llava.tools.generate --model DIR --image IMG --prompt "..."`` (``--video VID`` for a
Video-LLaVA model) or ``--requests FILE.jsonl`` (lines ``{"id", "image", "video", "prompt"}``;
``image``/``video`` may be a path, a list of paths or null) with ``--out answers.jsonl``. Relative
paths in a requests file are resolved against ``--image-folder`` / ``--video-folder`` (default: the
requests file's folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llava.data.dataset import DataError, contained_path
from llava.data.images import ImageError, load_image
from llava.data.video import VideoError
from llava.inference import image_paths, load_pipeline

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RequestError(ValueError):
    """A request is malformed or names an image that does not exist; the message names the request id."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description="Generate answers with a DuetLlava checkpoint.")
    parser.add_argument("--model", required=True, help="checkpoint directory (merged, not a bare LoRA adapter)")
    parser.add_argument(
        "--image", action="append", default=[], help="image path (pairs with --prompt; 'none' for text-only)"
    )
    parser.add_argument(
        "--video", action="append", default=[], help="video path (pairs with --prompt; 'none' for no video)"
    )
    parser.add_argument("--prompt", action="append", default=[], help="question (repeatable)")
    parser.add_argument("--requests", help="JSONL file of {'id', 'image', 'video', 'prompt'} requests")
    parser.add_argument("--image-folder", help="root for relative image paths in --requests")
    parser.add_argument("--video-folder", help="root for relative video paths in --requests")
    parser.add_argument(
        "--allow-outside-paths",
        action="store_true",
        help="trusted requests only: accept image/video paths outside --image-folder/--video-folder",
    )
    parser.add_argument("--out", help="write answers here as JSONL ({'id', 'prompt', 'image', 'answer'})")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--vision-tower", help="CLIP dir with the image processor (original LLaVA checkpoints)")
    parser.add_argument(
        "--compression",
        help="visual-token compression preset or YAML (default: what the checkpoint was trained with; 'none' = off)",
    )
    parser.add_argument(
        "--fast-decoding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static per-stage KV caches and CUDA-graph decode steps (default: on CUDA with SDPA/eager attention)",
    )
    args = parser.parse_args(argv)
    if args.requests and (args.image or args.video or args.prompt):
        parser.error("use either --requests or --image/--video/--prompt, not both")
    if not args.requests:
        if not args.prompt:
            parser.error("give --requests FILE or at least one --prompt")
        for flag, values in (("--image", args.image), ("--video", args.video)):
            if values and len(values) != len(args.prompt):
                parser.error(
                    f"{flag} and --prompt must pair up; got {len(values)} {flag[2:]}s, {len(args.prompt)} prompts"
                )
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch-size and --max-new-tokens must be >= 1")
    return args


def read_requests(
    path: str | Path,
    image_folder: str | Path | None = None,
    video_folder: str | Path | None = None,
    allow_outside_paths: bool = False,
) -> list[dict[str, Any]]:
    """Read a JSONL requests file; image (video) paths are resolved against ``image_folder`` (``video_folder``),
    by default the requests file's folder, and must stay inside it unless ``allow_outside_paths``."""
    path = Path(path)
    root = Path(image_folder) if image_folder else path.parent
    video_root = Path(video_folder) if video_folder else path.parent
    requests = []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise RequestError(
                    f"{path}:{line_number}: not valid UTF-8 ({error.reason} at byte {error.start})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise RequestError(f"{path}:{line_number}: invalid JSON: {error}") from error
            if not isinstance(record, dict):
                raise RequestError(f"{path}:{line_number}: expected a JSON object")
            record.setdefault("id", f"line{line_number}")
            try:
                images = [
                    _resolve(root, name, "image", allow_outside_paths) for name in image_paths(record.get("image"))
                ]
                videos = [
                    _resolve(video_root, name, "video", allow_outside_paths)
                    for name in image_paths(record.get("video"), "video")
                ]
            except (TypeError, DataError) as error:
                raise RequestError(f"{path}:{line_number}: request id={record['id']!r}: {error}") from None
            record["image"] = images or None
            if "video" in record:
                record["video"] = videos or None
            record["_where"] = f"{path}:{line_number}: "
            requests.append(record)
    return requests


def _resolve(root: Path, name: str, what: str, allow_outside: bool) -> str:
    return str(root / name) if allow_outside else contained_path(root, name, what)


def cli_requests(images: list[str], prompts: list[str], videos: list[str] | None = None) -> list[dict[str, Any]]:
    """Requests from repeated ``--image``/``--video``/``--prompt`` flags (``none`` means no file)."""
    images = images or ["none"] * len(prompts)
    videos = videos or ["none"] * len(prompts)
    return [
        {
            "id": str(index),
            "image": None if image.lower() == "none" else image,
            "video": None if video.lower() == "none" else video,
            "prompt": prompt,
        }
        for index, (image, video, prompt) in enumerate(zip(images, videos, prompts, strict=True))
    ]


def validate_requests(requests: list[dict[str, Any]]) -> None:
    """Fail before loading the model if a request lacks a prompt, names a missing or empty file, or an image
    that does not decode (every image is opened in full: a broken one must not stop a run hours in)."""
    for request in requests:
        where = f"{request.get('_where', '')}request id={request.get('id')!r}"
        if not isinstance(request.get("prompt"), str):
            raise RequestError(f"{where}: missing or non-string 'prompt'")
        for key in ("image", "video"):
            try:
                files = image_paths(request.get(key), key)
            except TypeError as error:
                raise RequestError(f"{where}: {error}") from None
            for file in files:
                if not Path(file).is_file():
                    raise RequestError(f"{where}: {key} file not found: {file}")
                if Path(file).stat().st_size == 0:
                    raise RequestError(f"{where}: {key} file is empty: {file}")
                if key == "image":
                    try:
                        load_image(file)
                    except ImageError as error:
                        raise RequestError(f"{where}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = parse_args(argv)
    try:
        if args.requests:
            requests = read_requests(args.requests, args.image_folder, args.video_folder, args.allow_outside_paths)
        else:
            requests = cli_requests(args.image, args.prompt, args.video)
        validate_requests(requests)
    except (OSError, RequestError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    pipeline = load_pipeline(
        args.model,
        dtype=_DTYPES[args.dtype],
        device=args.device,
        vision_tower=args.vision_tower,
        compression=args.compression,
        fast_decoding=args.fast_decoding,
    )
    show_bar = bool(args.requests)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "temperature": args.temperature,
               "top_p": args.top_p, "seed": args.seed}  # fmt: skip
    inputs = [{"image": r.get("image"), "video": r.get("video"), "prompt": r["prompt"]} for r in requests]
    failed = 0
    with tqdm(total=len(requests), desc="generate", unit="req", disable=not show_bar, file=sys.stderr) as bar:
        try:
            answers = pipeline.generate(inputs, batch_size=args.batch_size, progress=bar.update, **options)
            records = [{**request, "answer": answer} for request, answer in zip(requests, answers, strict=True)]
        except (ImageError, VideoError, ValueError) as error:
            # A request that passed validation still failed (e.g. a video that does not decode): answer the
            # others one by one, so one bad request costs its own answer, not every answer of the run.
            print(f"error: {error}; retrying request by request", file=sys.stderr)
            records = []
            for request, single in zip(requests, inputs, strict=True):
                try:
                    records.append({**request, "answer": pipeline.generate([single], **options)[0]})
                except (ImageError, VideoError, ValueError) as request_error:
                    failed += 1
                    where = f"{request.get('_where', '')}request id={request.get('id')!r}"
                    print(f"error: {where}: {request_error}", file=sys.stderr)
                    records.append({**request, "answer": None, "error": str(request_error)})
    for record in records:
        record.pop("_where", None)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        print(f"wrote {len(records)} answers to {out}", file=sys.stderr)
    if not args.out or not show_bar:
        for record in records:
            print(f"[{record['id']}] {record['answer']}")
    if failed:
        print(f"error: {failed} of {len(records)} requests failed (answer null, 'error' says why)", file=sys.stderr)
        return 2
    scored = [record for record in records if "expected" in record]
    if scored:
        correct = sum(_normalise(record["answer"]) == _normalise(record["expected"]) for record in scored)
        print(f"exact match vs 'expected': {correct}/{len(scored)}")
        for record in scored[:4]:
            print(f"  [{record['id']}] expected {record['expected']!r}, got {record['answer']!r}")
    return 0


def _normalise(text: str) -> str:
    """Lower-case, without surrounding space and final punctuation (VQA-style exact match)."""
    return str(text).strip().rstrip(".!").lower()


if __name__ == "__main__":
    sys.exit(main())
