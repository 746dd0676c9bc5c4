"""The serving engine: concurrent chat requests collected into batches and streamed token by token.

A worker thread owns the model. It takes the first waiting job, collects more for ``batch_wait_s`` (up to
``max_batch``), groups them by compression preset (a batch runs one preset: the model switches presets
between groups) and runs each group through the batched generation of the model's family (the fast decoder
with CUDA graphs on a GPU). Every row samples with its own temperature, nucleus and seed from counter-based
noise (:class:`~llava.model.sampling.RowSampling`) and left padding keeps greedy answers independent of the
batch, so a request's answer never depends on what it was batched with. Each step's tokens go through an
``on_step`` listener that streams text to the job's ``sink`` and ends rows at their stop string, their own
``max_tokens`` or when their client went away (the row stops costing output and the job frees its slot).
"""

from __future__ import annotations

import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llava.compression.config import available_presets
from llava.model.sampling import RowSampling, SamplingOptions
from llava.pipeline import GenerationPipeline, Request
from llava.serve.errors import ServeError
from llava.serve.text import TextStream

logger = logging.getLogger(__name__)

CHECKPOINT_PRESET = "checkpoint"
"""Preset name of the compression a checkpoint was saved with (when it is not a named preset)."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer. ``prompt_tokens``: the prompt's sequence at the first decoder layer (text
    and visual tokens after V2V); ``visual_tokens_per_layer``: the visual tokens each decoder layer kept for
    this request (T2V drops them stage by stage); ``batch_size``: how many requests its batch held."""

    prompt_tokens: int
    completion_tokens: int
    visual_tokens_per_layer: list[int]
    compression: str
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "visual_tokens_per_layer": self.visual_tokens_per_layer,
            "compression": self.compression,
            "batch_size": self.batch_size,
        }


@dataclass(frozen=True)
class Delta:
    """New answer text."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The answer ended: ``reason`` is ``stop`` (EOS or a stop string), ``length`` (``max_tokens``) or
    ``cancelled`` (the client went away); ``text`` is the whole answer."""

    reason: str
    text: str
    usage: Usage | None


@dataclass(frozen=True)
class Failed:
    """The request could not be answered (its error; the server goes on)."""

    error: ServeError


Event = Delta | Finished | Failed


@dataclass(eq=False)
class GenerationJob:
    """One request to answer. ``compression``: a preset name (``None``: the engine's default); ``seed``:
    the row's sampling seed (``None``: a random one); ``ignore_eos``: write exactly ``max_tokens`` tokens (EOS
    does not end the answer: benchmarks get fixed lengths, as vLLM's ``ignore_eos``); ``sink`` receives its
    events, from the worker thread."""

    request: Request
    sink: Callable[[Event], None]
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    compression: str | None = None
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False

    def cancel(self) -> None:
        """Stop answering (the client went away, or the user pressed Ctrl-C): the row ends at its next step."""
        self.cancelled.set()


def _send(job: GenerationJob, event: Event) -> None:
    """Give ``event`` to the job's sink; a sink that fails cancels its own job, never the worker or the batch."""
    try:
        job.sink(event)
    except Exception:
        logger.exception("a job's sink failed; the job is cancelled")
        job.cancel()


@dataclass
class EngineStats:
    """What the engine has done, for ``/health`` and tests."""

    active: int = 0
    batches: int = 0
    largest_batch: int = 0
    answered: int = 0
    cancelled: int = 0
    failed: int = 0


class BatchingEngine:
    """Answers :class:`GenerationJob` s in batches on one worker thread (see the module docstring)."""

    def __init__(
        self,
        pipeline: GenerationPipeline,
        compression: str | None = None,
        max_batch: int = 8,
        batch_wait_s: float = 0.01,
        max_pending: int = 64,
        presets: Sequence[str] | None = None,
    ) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError(f"max_batch and max_pending must be >= 1, got {max_batch} and {max_pending}")
        self.pipeline = pipeline
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_pending = max_pending
        self.context_length = pipeline.model.config.text_config.max_position_embeddings
        self._specs = self._usable_presets(presets)
        self.default_compression = self._default_preset(compression)
        self._current: str | None = None
        self._use(self.default_compression)
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._queue: queue.Queue[GenerationJob | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="llava-serve-engine", daemon=True)
        self._worker.start()

    # ----- presets -----
    @property
    def presets(self) -> list[str]:
        """The compression presets this model runs (``none`` first)."""
        return list(self._specs)

    def _usable_presets(self, names: Sequence[str] | None) -> dict[str, Any]:
        model = self.pipeline.model
        saved = model.config.compression
        specs: dict[str, Any] = {"none": "none"}
        if saved:
            specs[CHECKPOINT_PRESET] = dict(saved)
        for name in available_presets() if names is None else names:
            try:
                model.set_compression(name)
            except (ValueError, TypeError, KeyError, FileNotFoundError) as error:
                if names is not None:
                    raise ValueError(f"compression preset {name!r} cannot run on this model: {error}") from error
                logger.debug("preset %s skipped: %s", name, error)
                continue
            specs[name] = name
        model.set_compression(dict(saved) if saved else "none")
        return specs

    def _default_preset(self, compression: str | None) -> str:
        if compression is None:
            saved = self.pipeline.model.config.compression
            name = (saved or {}).get("name")
            return "none" if not saved else name if name in self._specs else CHECKPOINT_PRESET
        if compression not in self._specs:
            raise ValueError(f"unknown compression preset {compression!r}; this model runs {', '.join(self._specs)}")
        return compression

    def _use(self, preset: str) -> None:
        if preset != self._current:
            self.pipeline.model.set_compression(self._specs[preset])
            self.pipeline.model.eval()  # the compression wrappers set_compression builds start in training mode
            self._current = preset

    # ----- submitting -----
    def submit(self, job: GenerationJob) -> None:
        """Queue ``job``; raises :class:`ServeError` (503) when ``max_pending`` jobs are already waiting or
        running, (400) for an unknown preset or bad sampling options."""
        preset = job.compression if job.compression is not None else self.default_compression
        if preset not in self._specs:
            raise ServeError(400, f"unknown compression preset {preset!r}; this model runs {', '.join(self._specs)}",
                             param="compression")  # fmt: skip
        if job.max_tokens < 1:
            raise ServeError(400, f"max_tokens must be >= 1, got {job.max_tokens}", param="max_tokens")
        if job.temperature < 0 or not 0 < job.top_p <= 1:
            raise ServeError(400, f"need temperature >= 0 and 0 < top_p <= 1, got {job.temperature}, {job.top_p}")
        job.compression = preset
        with self._lock:
            if self.stats.active >= self.max_pending:
                raise ServeError(503, f"server busy: {self.stats.active} requests in progress", kind="server_busy")
            self.stats.active += 1
        self._queue.put(job)

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._queue.put(None)
        self._worker.join(timeout=60)

    # ----- the worker -----
    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            closing = False
            deadline = time.monotonic() + self.batch_wait_s
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                jobs.append(job)
            for preset, group in itertools.groupby(sorted(jobs, key=lambda job: job.compression or ""),
                                                   key=lambda job: job.compression):  # fmt: skip
                self._run_group(str(preset), list(group))
            if closing:
                return

    def _end(self, job: GenerationJob, event: Finished | Failed) -> None:
        """Send a job's last event (once) and free its slot."""
        if job.ended:
            return
        job.ended = True
        with self._lock:
            self.stats.active -= 1
            if isinstance(event, Failed):
                self.stats.failed += 1
            elif event.reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.answered += 1
        _send(job, event)

    def _run_group(self, preset: str, jobs: list[GenerationJob]) -> None:
        live = []
        for job in jobs:
            if job.cancelled.is_set():
                self._end(job, Finished("cancelled", "", None))
            else:
                live.append(job)
        if not live:
            return
        try:
            self._use(preset)
            inputs, live = self._prepare(live)
            if live:
                self._generate(preset, live, inputs)
        except Exception as error:  # a batch's failure is its jobs' failure; the server goes on
            logger.exception("generation failed for a batch of %d", len(live))
            for job in live:
                self._end(job, Failed(ServeError(500, f"generation failed: {type(error).__name__}: {error}")))

    def _prepare(self, jobs: list[GenerationJob]) -> tuple[dict[str, torch.Tensor], list[GenerationJob]]:
        """Model inputs of the jobs that can run; a job whose request cannot be prepared (an undecodable image)
        or that does not fit the context fails alone."""
        try:
            inputs = self.pipeline.prepare([job.request for job in jobs])
        except (ValueError, OSError, TypeError) as error:
            if len(jobs) == 1:
                self._end(jobs[0], Failed(ServeError(400, f"cannot read the request: {error}")))
                return {}, []
            kept = [job for job in jobs if self._prepare([job])[1]]
            return (self.pipeline.prepare([job.request for job in kept]), kept) if kept else ({}, [])
        lengths = self.pipeline.sequence_lengths(inputs)
        too_long = [
            (job, length) for job, length in zip(jobs, lengths, strict=True)
            if length + job.max_tokens > self.context_length
        ]  # fmt: skip
        if not too_long:
            return inputs, jobs
        for job, length in too_long:
            message = (
                f"this model's context is {self.context_length} tokens; the prompt takes {length} (text and "
                f"visual tokens) and max_tokens asks for {job.max_tokens} more"
            )
            self._end(job, Failed(ServeError(400, message, param="messages", code="context_length_exceeded")))
        rest = [job for job in jobs if all(job is not failed for failed, _ in too_long)]
        return (self.pipeline.prepare([job.request for job in rest]), rest) if rest else ({}, [])

    def _generate(self, preset: str, jobs: list[GenerationJob], inputs: dict[str, torch.Tensor]) -> None:
        pipeline = self.pipeline
        lengths = pipeline.sequence_lengths(inputs)
        eos_ids = set(pipeline.eos_ids())
        streams = [TextStream(pipeline.tokenizer, job.stop) for job in jobs]
        counts = [0] * len(jobs)
        ended = [False] * len(jobs)
        prefill: dict[str, Any] = {}

        def finish(row: int, reason: str) -> None:
            ended[row] = True
            job = jobs[row]
            tail = streams[row].finish()
            if tail and reason != "cancelled":
                _send(job, Delta(tail))
            per_row = prefill.get("visual_tokens_per_row") or [[] for _ in jobs]
            usage = Usage(lengths[row], counts[row], [int(count) for count in per_row[row]], preset, len(jobs))
            self._end(job, Finished(reason, streams[row].emitted, usage))

        def on_step(step: int, tokens: torch.Tensor) -> torch.Tensor:
            stop = [False] * len(jobs)
            for row, token in enumerate(tokens.tolist()):
                if ended[row]:
                    continue
                job = jobs[row]
                if job.cancelled.is_set():
                    stop[row] = True
                    finish(row, "cancelled")
                    continue
                if token in eos_ids and not job.ignore_eos:
                    stop[row] = True
                    finish(row, "stop")
                    continue
                counts[row] += 1
                delta = streams[row].push(token)
                if delta:
                    _send(job, Delta(delta))
                if streams[row].stopped or counts[row] >= job.max_tokens:
                    stop[row] = True
                    finish(row, "stop" if streams[row].stopped else "length")
            return torch.tensor(stop)

        def record_prefill(module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
            if kwargs.get("decode_state") is None and not prefill:
                prefill["visual_tokens_per_row"] = getattr(output, "visual_tokens_per_row", None)

        seeds = [job.seed if job.seed is not None else secrets.randbits(32) for job in jobs]
        device = pipeline.device
        fast_decoder = pipeline.fast_decoder()
        sampling = SamplingOptions(
            max_new_tokens=max(job.max_tokens for job in jobs),
            eos_token_id=[],  # rows end through on_step: EOS unless the job ignores it
            pad_token_id=pipeline.pad_id(),
            per_row=RowSampling.of([job.temperature for job in jobs], [job.top_p for job in jobs], seeds, device),
            on_step=on_step,
            fast=pipeline.fast_decoding if fast_decoder is None else True,
        )
        with self._lock:
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
        hook = pipeline.model.register_forward_hook(record_prefill, with_kwargs=True)
        try:
            with torch.inference_mode():
                pipeline.model.generate(**pipeline.to_device(inputs), sampling=sampling, fast_decoder=fast_decoder)
        finally:
            hook.remove()
        for row in range(len(jobs)):
            if not ended[row]:
                finish(row, "length")
