"""The shared evaluation runner: batched, compressed generation over a benchmark's questions, one shard
per rank, answers appended as they finish (a killed run resumes), then scoring by the benchmark's metric.

Layout of a run folder (one per preset and benchmark)::

    <out>/<preset>/<benchmark>/answers-<rank>of<world>.jsonl   answers, append-only
    <out>/<preset>/<benchmark>/stats-<rank>of<world>.jsonl     generation time and visual tokens per batch
    <out>/<preset>/<benchmark>/result.json                     score, protocol, sub-scores, n scored / n questions, ...
    <out>/<preset>/<benchmark>/export-official/                with ``export="official"``: the answers in the
                                                               format of the benchmark's official script/server
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llava.data.images import ImageError
from llava.data.video import VideoError
from llava.eval.answers import AnswerWriter, read_answers, shard_file
from llava.eval.base import Benchmark, EvalDataError, EvalItem, check_protocol

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
EXPORT_FOLDER = "export-official"
EXPORTS = ("official",)


@dataclass
class BatchStats:
    """What one generated batch cost and how many visual tokens its prefill carried per LLM layer."""

    questions: int
    prefill_s: float
    total_s: float
    visual_tokens_per_layer: float | None


def shard_items(items: Sequence[EvalItem], rank: int, world_size: int) -> list[EvalItem]:
    """The questions of one rank: every ``world_size``-th, starting at ``rank`` (balanced, deterministic)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(items[rank::world_size])


def _batches(items: Sequence[EvalItem], batch_size: int) -> Iterator[list[EvalItem]]:
    """Consecutive batches of at most ``batch_size`` questions sharing one ``max_new_tokens``."""
    batch: list[EvalItem] = []
    for item in items:
        if batch and (len(batch) == batch_size or item.max_new_tokens != batch[0].max_new_tokens):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _prefill_clock(model: torch.nn.Module, device: torch.device) -> Iterator[dict[str, Any]]:
    """Time the prefill forwards (calls without a ``decode_state``) and record their visual tokens per layer."""
    clock: dict[str, Any] = {"prefill_s": 0.0, "tokens": [], "began": 0.0}

    def before(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs.get("decode_state") is None:
            _synchronize(device)
            clock["began"] = time.perf_counter()

    def after(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if kwargs.get("decode_state") is None:
            _synchronize(device)
            clock["prefill_s"] += time.perf_counter() - clock["began"]
            per_layer = getattr(output, "visual_tokens_per_layer", None)
            if per_layer:
                clock["tokens"].append(sum(per_layer) / len(per_layer))

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield clock
    finally:
        for handle in handles:
            handle.remove()


def _answer_batch(pipeline: Any, batch: list[EvalItem]) -> tuple[list[str], BatchStats]:
    device = pipeline.device
    with _prefill_clock(pipeline.model, device) as clock:
        _synchronize(device)
        began = time.perf_counter()
        texts = pipeline.generate(
            [item.request() for item in batch], max_new_tokens=batch[0].max_new_tokens, batch_size=len(batch)
        )
        _synchronize(device)
        total = time.perf_counter() - began
    tokens = clock["tokens"]
    stats = BatchStats(len(batch), clock["prefill_s"], total, sum(tokens) / len(tokens) if tokens else None)
    return texts, stats


def generate_answers(
    pipeline: Any,
    benchmark: Benchmark,
    items: Sequence[EvalItem],
    folder: Path,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    preset: str = "checkpoint",
    skip_bad: bool = False,
    progress: bool = True,
) -> int:
    """Answer this rank's unanswered questions, appending to its shard file; returns how many were answered.

    Questions already answered in any shard file of ``folder`` are skipped (resume). A question whose image
    or video cannot be read raises an error naming it, or with ``skip_bad`` is recorded in
    ``skipped-<rank>of<world>.jsonl`` and left unscored.
    """
    done = read_answers(folder)
    shard = shard_items(items, rank, world_size)
    todo = [item for item in shard if item.question_id not in done]
    if len(todo) < len(shard):
        logger.info(
            "%s: %d of %d questions of shard %d already answered", folder, len(shard) - len(todo), len(shard), rank
        )
    stats_path = folder / f"stats-{rank}of{world_size}.jsonl"
    skipped_path = folder / f"skipped-{rank}of{world_size}.jsonl"
    answered = 0
    bar = tqdm(
        total=len(shard), initial=len(shard) - len(todo), desc=f"{benchmark.name} [{preset}]", disable=not progress
    )
    with AnswerWriter(shard_file(folder, rank, world_size)) as writer, bar:
        for batch in _batches(todo, batch_size):
            try:
                texts, stats = _answer_batch(pipeline, batch)
            except (ImageError, VideoError, OSError) as error:
                if not skip_bad:
                    ids = ", ".join(item.question_id for item in batch)
                    raise EvalDataError(
                        f"{benchmark.name}: cannot read the media of question(s) {ids}: {error}"
                    ) from error
                texts, stats, kept = _answer_one_by_one(pipeline, batch, skipped_path)
            else:
                kept = batch
            writer.write(
                {"question_id": item.question_id, "prompt": item.prompt, "text": text, "preset": preset}
                for item, text in zip(kept, texts, strict=True)
            )
            with open(stats_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(stats.__dict__) + "\n")
            answered += len(kept)
            bar.update(len(batch))  # skipped questions are done too
    return answered


def _answer_one_by_one(
    pipeline: Any, batch: list[EvalItem], skipped_path: Path
) -> tuple[list[str], BatchStats, list[EvalItem]]:
    """Skip mode: retry a failed batch question by question, recording the ones whose media are bad."""
    texts: list[str] = []
    kept: list[EvalItem] = []
    totals = BatchStats(0, 0.0, 0.0, None)
    tokens: list[float] = []
    for item in batch:
        try:
            (text,), stats = _answer_batch(pipeline, [item])
        except (ImageError, VideoError, OSError) as error:
            logger.warning("skipping question %s: %s", item.question_id, error)
            with open(skipped_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"question_id": item.question_id, "error": str(error)}) + "\n")
            continue
        texts.append(text)
        kept.append(item)
        totals.questions += 1
        totals.prefill_s += stats.prefill_s
        totals.total_s += stats.total_s
        if stats.visual_tokens_per_layer is not None:
            tokens.append(stats.visual_tokens_per_layer)
    totals.visual_tokens_per_layer = sum(tokens) / len(tokens) if tokens else None
    return texts, totals, kept


def _read_jsonl_rows(folder: Path, pattern: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob(pattern)):
        rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows


def versions() -> dict[str, str]:
    """Versions worth recording next to a score."""
    found = {"python": platform.python_version()}
    for package in ("duet-vlm", "torch", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def score_folder(
    benchmark: Benchmark,
    items: Sequence[EvalItem],
    folder: Path,
    run_info: dict[str, Any] | None = None,
    judge: Callable[[Sequence[EvalItem], Mapping[str, str]], dict[str, Any]] | None = None,
    protocol: str = "official",
    export: str | None = None,
) -> dict[str, Any]:
    """Merge every shard's answers, score them under ``protocol`` and write ``result.json``; returns the result.

    Answers whose question id the benchmark does not have are an error (the answer files belong to another
    data set or version). The result says how many questions were scored out of how many, so a partial run
    is never mistaken for a complete one, and under which protocol (``protocol``). ``judge`` (e.g.
    :func:`llava.eval.judge.judge_answers`, already bound to the protocol) adds an LLM judge's summary under
    ``judge`` and its per-question verdicts in ``judge.json``. ``export="official"`` also writes the answers
    in the official script's or server's format under ``<folder>/export-official/`` when the benchmark has
    ``export_official`` (listed in ``export_files``; ``None`` there, and a log line, when it has none).
    """
    check_protocol(protocol)
    if export is not None and export not in EXPORTS:
        raise ValueError(f"unknown export {export!r}; expected one of {', '.join(EXPORTS)}")
    answers = read_answers(folder)
    known = {item.question_id for item in items}
    unknown = sorted(set(answers) - known)
    if unknown:
        raise EvalDataError(
            f"{folder}: {len(unknown)} answer(s) for question ids {benchmark.name} does not have "
            f"(first: {unknown[0]!r}); the answers come from another data set or version"
        )
    predictions = {question_id: record["text"] for question_id, record in answers.items()}
    score = benchmark.score(items, predictions, protocol=protocol)
    stats = _read_jsonl_rows(folder, "stats-*of*.jsonl")
    skipped = _read_jsonl_rows(folder, "skipped-*of*.jsonl")
    token_rows = [(row["questions"], row["visual_tokens_per_layer"]) for row in stats if row["visual_tokens_per_layer"]]
    weight = sum(count for count, _ in token_rows)
    result = {
        "benchmark": benchmark.name,
        "score_name": benchmark.score_name,
        "score": None if math.isnan(score.score) else score.score,
        "protocol": protocol,
        "metrics": score.metrics,
        "num_scored": score.num_scored,
        "num_questions": score.num_questions,
        "complete": score.complete,
        "num_skipped": len(skipped),
        "skipped": skipped[:20],
        "visual_tokens_per_layer": sum(count * tokens for count, tokens in token_rows) / weight if weight else None,
        "prefill_s": sum(row["prefill_s"] for row in stats),
        "generate_s": sum(row["total_s"] for row in stats),
        "versions": versions(),
        **(run_info or {}),
    }
    if judge is not None:
        verdicts = judge(items, predictions)
        (folder / "judge.json").write_text(json.dumps(verdicts, indent=1, default=str) + "\n", encoding="utf-8")
        result["judge"] = {key: value for key, value in verdicts.items() if key not in ("judgements", "failures")}
    writer = getattr(benchmark, "write_submission", None)
    if writer is not None:
        result["submission_files"] = [str(path) for path in writer(items, predictions, folder)]
    if export == "official":
        exporter = getattr(benchmark, "export_official", None)
        if exporter is None:
            logger.info("%s has no official export format; nothing written for --export official", benchmark.name)
            result["export_files"] = None
        else:
            result["export_files"] = [str(path) for path in exporter(items, predictions, folder / EXPORT_FOLDER)]
    (folder / RESULT_FILE).write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    return result
