"""Scan LLaVA / Video-LLaVA data before training: structure, images, videos, lengths and token statistics.

Usage::

    python -m llava.tools.check_data --data_path A.json [B.jsonl ...] --image_folder DIR \\
        --tokenizer PATH --version v1 --model_max_length 2048 --tokens_per_image 576 \\
        [--video_folder DIR --tokens_per_video 2056 --num_frames 8] [--json-report FILE]

Problems (exit code 1): unparseable files, structurally invalid samples, missing or corrupt images,
missing, unreadable or too-short videos (fewer frames than ``--num_frames``), samples with nothing to
learn (before or after truncation). Samples longer than ``model_max_length`` are counted and reported;
they are a problem only with ``--fail-on-truncation``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llava.bench.length_mix import write_measured_mix
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.data.chat_template import (
    CHAT_TEMPLATE_VERSION,
    ChatTemplateEncoder,
    processor_chat_template,
    special_prefix,
    template_reads_content_lists,
)
from llava.data.dataset import DataArguments, DataError, LazySupervisedDataset
from llava.data.images import ImageError, inspect_image
from llava.data.templates import conversation_to_turns
from llava.data.tokenization import NoLearnableTokensError, TokenizedConversation, tokenize_conversation, truncate
from llava.data.video import VideoError, read_video_frames

logger = logging.getLogger(__name__)


@dataclass
class DataReport:
    """Everything :func:`scan` found; ``problems`` lists the first ``max_listed`` with file and id."""

    num_samples: int = 0
    num_files_unreadable: int = 0
    num_structural_errors: int = 0
    num_missing_images: int = 0
    num_corrupt_images: int = 0
    num_lossy_images: int = 0
    num_missing_videos: int = 0
    num_bad_videos: int = 0
    num_no_learnable_tokens: int = 0
    num_over_max_length: int = 0
    num_text_only: int = 0
    problems: list[str] = field(default_factory=list)
    over_length_examples: list[str] = field(default_factory=list)
    lossy_examples: list[str] = field(default_factory=list)
    """Images that load, but whose conversion to 8-bit RGB loses something (bit depth, transparency)."""
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    sample_lengths: list[list[int]] = field(default_factory=list)
    """``[text tokens, supervised tokens, visual slots]`` per tokenized sample (``record_lengths``)."""

    @property
    def num_problems(self) -> int:
        """Problem count (over-length samples and lossy images excluded: they are truncated or converted,
        not broken; both are reported)."""
        return (
            self.num_files_unreadable
            + self.num_structural_errors
            + self.num_missing_images
            + self.num_corrupt_images
            + self.num_missing_videos
            + self.num_bad_videos
            + self.num_no_learnable_tokens
        )


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    p50, p95 = np.percentile(values, [50, 95])
    return {
        "min": float(values.min()),
        "mean": float(values.mean()),
        "p50": float(p50),
        "p95": float(p95),
        "max": float(values.max()),
    }


def scan(
    data_args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    check_images: bool = True,
    max_listed: int = 20,
    show_progress: bool = True,
    image_token: str = "<|image_pad|>",
    video_token: str = "<|video_pad|>",
    record_lengths: bool = False,
) -> DataReport:
    """Check every sample of every file in ``data_args.data_path``; never raises on bad data. With
    ``data_args.version`` ``chat_template`` samples go through the tokenizer's chat template, whose image and
    video placeholders are ``image_token`` and ``video_token``."""
    report = DataReport()

    def note(message: str) -> None:
        if len(report.problems) < max_listed:
            report.problems.append(message)

    chat = None
    if data_args.version == CHAT_TEMPLATE_VERSION:  # a checkpoint's own template and image placeholder
        placeholders = tokenizer.convert_tokens_to_ids([image_token, video_token])
        if placeholders[0] in (None, tokenizer.unk_token_id):
            raise ValueError(f"the tokenizer does not know the image placeholder {image_token!r}: pass --image_token")
        chat = ChatTemplateEncoder(
            tokenizer, None, placeholders[0], video_token_id=placeholders[1],
            content_lists=template_reads_content_lists(tokenizer), prefix_ids=special_prefix(tokenizer),
            answer_end_id=tokenizer.eos_token_id,  # where the template ends answers without it (llava-hf's)
        )  # fmt: skip
    datasets: list[LazySupervisedDataset] = []
    for path in data_args.data_path:
        file_args = DataArguments(**{**asdict(data_args), "data_path": [path], "skip_bad_samples": True})
        try:
            dataset = LazySupervisedDataset(file_args, tokenizer, encoder=chat)
        except (DataError, OSError) as error:
            report.num_files_unreadable += 1
            note(f"{path}: unreadable: {error}")
            continue
        report.num_structural_errors += dataset.num_invalid_samples
        for problem in dataset.problems:
            note(str(problem))
        datasets.append(dataset)

    total_lengths: list[int] = []
    text_lengths: list[int] = []
    image_counts: list[int] = []
    video_counts: list[int] = []
    media_status: dict[str, str] = {}
    tokens_per_image, max_length = data_args.tokens_per_image, data_args.model_max_length
    tokens_per_video = data_args.tokens_per_video
    num_valid = sum(len(dataset) for dataset in datasets)
    report.num_samples = num_valid + report.num_structural_errors
    progress = tqdm(total=num_valid, desc="checking samples", unit="sample", disable=not show_progress)
    for dataset in datasets:
        for index in range(len(dataset)):
            progress.update(1)
            record = dataset.get_record(index)
            where = dataset.describe(index, record["id"])
            try:
                tokenized = _tokenize(tokenizer, dataset, chat, record["conversations"])
            except NoLearnableTokensError:
                report.num_no_learnable_tokens += 1
                note(f"{where}: no learnable tokens (empty answers)")
                continue
            input_ids = np.asarray(tokenized["input_ids"], dtype=np.int64)
            num_images = int(np.count_nonzero(input_ids == IMAGE_TOKEN_ID))
            num_videos = int(np.count_nonzero(input_ids == VIDEO_TOKEN_ID))
            num_text = len(input_ids) - num_images - num_videos
            total = num_text + num_images * tokens_per_image + num_videos * tokens_per_video
            total_lengths.append(total)
            text_lengths.append(num_text)
            image_counts.append(num_images)
            video_counts.append(num_videos)
            report.num_text_only += int(num_images + num_videos == 0)
            if record_lengths:
                supervised = int(np.count_nonzero(np.asarray(tokenized["labels"]) != IGNORE_INDEX))
                report.sample_lengths.append([num_text, supervised, num_images + num_videos])
            if total > max_length:
                report.num_over_max_length += 1
                if len(report.over_length_examples) < max_listed:
                    report.over_length_examples.append(f"{where}: {total} tokens > {max_length}")
                cut = truncate(
                    tokenized["input_ids"],
                    tokenized["labels"],
                    max_length,
                    tokens_per_image,
                    tokens_per_video=tokens_per_video,
                )
                if all(label == IGNORE_INDEX for label in cut["labels"]):
                    report.num_no_learnable_tokens += 1
                    note(f"{where}: nothing learnable left after truncation to {max_length}")
            try:
                media_paths = dataset.image_paths(record), dataset.video_paths(record)
            except DataError as error:
                report.num_structural_errors += 1
                note(f"{where}: {error}")
                continue
            if check_images:
                for image_path in media_paths[0]:
                    if image_path not in media_status:
                        media_status[image_path], lossy = _check_image(image_path)
                        if lossy:
                            report.num_lossy_images += 1
                            if len(report.lossy_examples) < max_listed:
                                report.lossy_examples.append(f"{where}: {image_path}: {lossy}")
                    status = media_status[image_path]
                    if status == "missing":
                        report.num_missing_images += 1
                        note(f"{where}: missing image {image_path}")
                    elif status != "ok":
                        report.num_corrupt_images += 1
                        note(f"{where}: corrupt image {image_path}: {status}")
                for video_path in media_paths[1]:
                    if video_path not in media_status:
                        media_status[video_path] = _check_video(video_path, data_args)
                    status = media_status[video_path]
                    if status == "missing":
                        report.num_missing_videos += 1
                        note(f"{where}: missing video {video_path}")
                    elif status != "ok":
                        report.num_bad_videos += 1
                        note(f"{where}: unusable video {video_path}: {status}")
    progress.close()

    report.stats = {
        "total_tokens": _summary(np.asarray(total_lengths)),
        "text_tokens": _summary(np.asarray(text_lengths)),
        "images_per_sample": _summary(np.asarray(image_counts)),
        "videos_per_sample": _summary(np.asarray(video_counts)) if any(video_counts) else {},
    }
    return report


def _check_image(path: str) -> tuple[str, str | None]:
    """('ok', 'missing' or the reason the image cannot be decoded; what its RGB conversion loses, if anything)."""
    if not os.path.exists(path):
        return "missing", None
    try:
        _, lossy = inspect_image(path)
    except ImageError as error:
        return str(error.__cause__ or error), None
    return "ok", lossy


def _check_video(path: str, data_args: DataArguments) -> str:
    """'ok', 'missing', or why the video cannot be used (unreadable, empty, too short): a full decode
    of the sampled frames, exactly as training does it."""
    if not os.path.exists(path):
        return "missing"
    try:
        read_video_frames(path, data_args.num_frames, data_args.video_backend)
    except VideoError as error:
        return str(error)
    return "ok"


def format_report(report: DataReport) -> str:
    """Human-readable report."""
    lines = [
        f"samples: {report.num_samples} ({report.num_text_only} text-only)",
        f"unreadable files: {report.num_files_unreadable}",
        f"structural errors: {report.num_structural_errors}",
        f"missing images: {report.num_missing_images}",
        f"corrupt images: {report.num_corrupt_images}",
        f"missing videos: {report.num_missing_videos}",
        f"unusable videos (unreadable, empty, too short): {report.num_bad_videos}",
        f"no learnable tokens: {report.num_no_learnable_tokens}",
        f"over max length (will be truncated): {report.num_over_max_length}",
        f"images converted with loss (bit depth, transparency): {report.num_lossy_images}",
    ]
    for name, summary in report.stats.items():
        if summary:
            values = " ".join(f"{key}={value:.1f}" for key, value in summary.items())
            lines.append(f"{name}: {values}")
    if report.problems:
        lines.append(f"first {len(report.problems)} problems:")
        lines += [f"  {problem}" for problem in report.problems]
    if report.over_length_examples:
        lines.append("over-length examples:")
        lines += [f"  {example}" for example in report.over_length_examples]
    if report.lossy_examples:
        lines.append("images converted with loss:")
        lines += [f"  {example}" for example in report.lossy_examples]
    return "\n".join(lines)


def _tokenize(
    tokenizer: PreTrainedTokenizerBase,
    dataset: LazySupervisedDataset,
    chat: ChatTemplateEncoder | None,
    conversation: list[dict],
) -> TokenizedConversation:
    """A sample's ids and labels with one ``IMAGE_TOKEN_ID``/``VIDEO_TOKEN_ID`` sentinel per image and video,
    through the LLaVA template or, with ``chat``, the tokenizer's chat template (its placeholder mapped to the
    sentinel)."""
    if chat is None:
        return tokenize_conversation(tokenizer, dataset.template, conversation_to_turns(dataset.template, conversation))
    ids, labels = chat.tokenize(conversation)
    if not np.any(labels != IGNORE_INDEX):
        raise NoLearnableTokensError("no learnable label: the answers are empty")
    ids = np.where(
        ids == chat.image_token_id, IMAGE_TOKEN_ID, np.where(ids == chat.video_token_id, VIDEO_TOKEN_ID, ids)
    )
    return TokenizedConversation(
        input_ids=ids.tolist(), labels=labels.tolist(), num_dropped_images=0, num_dropped_videos=0
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", nargs="+", required=True, help="LLaVA JSON/JSONL files")
    parser.add_argument("--image_folder", default=None, help="root for relative image paths")
    parser.add_argument("--tokenizer", required=True, help="tokenizer name or path (AutoTokenizer)")
    parser.add_argument(
        "--version", default="v1", help="conversation template; chat_template: the tokenizer's own (Qwen2.5-VL)"
    )
    parser.add_argument(
        "--image_token",
        default="<|image_pad|>",
        help="with --version chat_template: the template's image placeholder (<image> for llava-hf's)",
    )
    parser.add_argument(
        "--video_token", default="<|video_pad|>", help="with --version chat_template: the template's video placeholder"
    )
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--tokens_per_image", type=int, default=576)
    parser.add_argument("--video_folder", default=None, help="root for relative video paths")
    parser.add_argument("--tokens_per_video", type=int, default=8 * 257, help="visual tokens per video")
    parser.add_argument("--num_frames", type=int, default=8, help="frames sampled per video")
    parser.add_argument("--json-report", dest="json_report", default=None, help="write the report here")
    parser.add_argument(
        "--length-mix-out",
        dest="length_mix_out",
        default=None,
        help="write every sample's text and supervised tokens here: a measured length mix for the benchmarks "
        "(train_speed / scale --length-mix FILE)",
    )
    parser.add_argument(
        "--allow_outside_paths",
        action="store_true",
        help="trusted data only: accept absolute paths and paths outside --image_folder/--video_folder",
    )
    parser.add_argument("--max-listed", dest="max_listed", type=int, default=20, help="problems to list")
    parser.add_argument(
        "--skip-image-check", dest="skip_image_check", action="store_true", help="do not open images and videos"
    )
    parser.add_argument(
        "--fail-on-truncation", dest="fail_on_truncation", action="store_true", help="over-length is a problem"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scan; returns 0 when clean, 1 when problems were found."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    data_args = DataArguments(
        data_path=args.data_path,
        image_folder=args.image_folder,
        version=args.version,
        model_max_length=args.model_max_length,
        tokens_per_image=args.tokens_per_image,
        video_folder=args.video_folder,
        tokens_per_video=args.tokens_per_video,
        num_frames=args.num_frames,
        allow_outside_paths=args.allow_outside_paths,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    template = processor_chat_template(args.tokenizer) if Path(args.tokenizer).is_dir() else None
    if template is not None:  # a multimodal checkpoint's own template places the images
        tokenizer.chat_template = template
    report = scan(
        data_args,
        tokenizer,
        check_images=not args.skip_image_check,
        max_listed=args.max_listed,
        image_token=args.image_token,
        video_token=args.video_token,
        record_lengths=args.length_mix_out is not None,
    )
    print(format_report(report))
    if args.length_mix_out:
        about = {"data_path": args.data_path, "tokenizer": args.tokenizer, "version": args.version}
        write_measured_mix(args.length_mix_out, report.sample_lengths, about)
        print(f"length mix of {len(report.sample_lengths)} samples written to {args.length_mix_out}")
    if args.json_report:
        payload: dict[str, Any] = {**asdict(report), "num_problems": report.num_problems}
        payload.pop("sample_lengths")
        with open(args.json_report, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
    failed = report.num_problems > 0 or (args.fail_on_truncation and report.num_over_max_length > 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
