"""Fast generation: an eager compressed prefill, then decode steps over static per-stage caches that a
CUDA graph replays.

The eager decode loop (:func:`llava.model.generation.greedy_or_sample`) launches about 1,500 small
kernels per token from Python, so at batch 1 the GPU waits for the host. Here the prefill runs as
before (tower, V2V, LLM with T2V drops) into a :class:`~llava.model.static_cache.StaticStageCache`;
every decode step then has fixed shapes (one token per row, one preallocated cache per stage) and no
host synchronisation, so on CUDA it is captured once per shape as a ``torch.cuda.CUDAGraph`` and each
later token is one graph replay. EOS is checked on the device and read back every
``eos_check_interval`` steps only.

Why explicit graph capture rather than ``torch.compile(mode="reduce-overhead")``: capture costs a few
decode steps instead of a compilation of the whole LLM (tens of seconds for a 7B model, repeated for
every new cache length unless shapes are marked dynamic), it runs the HF layers exactly as the eager
path does (same kernels, same numerics, nothing traced), and it needs no compiler toolchain on the
node. What it does not do is fuse elementwise kernels; the graph removes the launch overhead, which is
what dominates at batch 1.

A :class:`FastDecoder` owns the buffers and graphs and is held by the caller (the inference pipeline,
the benchmark), like a KV cache: the model itself keeps no state between calls. Graphs are kept per
(batch size, per-stage cache lengths), lengths rounded up to
:data:`~llava.model.static_cache.CAPACITY_BUCKET`; after ``max_shapes`` distinct shapes everything is
released and captured anew, which bounds memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llava.hf_adapter import STATIC_DECODE_KERNELS, attn_implementation_of
from llava.model.decoder import StaticDecodeState, decoder_of, run_static_decoder_step
from llava.model.static_cache import CAPACITY_BUCKET, StaticStageCache, stage_of_each_layer

if TYPE_CHECKING:
    from llava.model.modeling import DuetLlavaForCausalLM

logger = logging.getLogger(__name__)

EOS_CHECK_INTERVAL = 8
"""Decode steps between host reads of "has every row finished?" (each read is a synchronisation)."""


def static_decode_supported(model: DuetLlavaForCausalLM) -> str | None:
    """``None`` when the fast path can run this model, else the reason it cannot."""
    kernel = attn_implementation_of(model.language_model.config)
    if kernel not in STATIC_DECODE_KERNELS:
        return (
            f"the LLM uses the {kernel!r} attention kernel (fast decoding supports {', '.join(STATIC_DECODE_KERNELS)})"
        )
    return None


@dataclass
class _Runner:
    """Buffers and the captured graph of one (batch, per-stage cache lengths) shape."""

    state: StaticDecodeState
    tokens: torch.Tensor  # [B] long, the step's input
    logits: torch.Tensor | None = None  # [B, V], the step's output (allocated by the first step)
    graph: torch.cuda.CUDAGraph | None = None
    capture_failed: bool = False


def prefill(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    pixel_values_videos: torch.Tensor | None,
    cache: Any,
    visual_inputs: dict[str, torch.Tensor] | None = None,
) -> Any:
    """The prompt's forward pass of a left-padded batch (into ``cache`` when given), last-token logits."""
    return model(
        input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        pixel_values_videos=pixel_values_videos,
        cache=cache,
        use_cache=cache is not None,
        left_padding=True,
        logits_to_keep=1,
        **(visual_inputs or {}),
    )


class FastDecoder:
    """Generates with static per-stage caches and (on CUDA) a graph-captured decode step.

    ``use_cuda_graph``: ``None`` = on CUDA devices. ``warmup_steps``: eager steps run (and undone) before
    a capture, as CUDA graphs require; also run on CPU when set explicitly, which tests the undo.
    """

    def __init__(
        self,
        model: DuetLlavaForCausalLM,
        use_cuda_graph: bool | None = None,
        max_shapes: int = 4,
        bucket: int = CAPACITY_BUCKET,
        eos_check_interval: int = EOS_CHECK_INTERVAL,
        warmup_steps: int | None = None,
    ) -> None:
        reason = static_decode_supported(model)
        if reason is not None:
            raise ValueError(f"fast decoding is not available: {reason}; generate with fast=False")
        if max_shapes < 1 or eos_check_interval < 1:
            raise ValueError("max_shapes and eos_check_interval must be >= 1")
        self.model = model
        self.use_cuda_graph = use_cuda_graph
        self.max_shapes = max_shapes
        self.bucket = bucket
        self.eos_check_interval = eos_check_interval
        self.warmup_steps = warmup_steps
        self.captures = 0
        self.capture_time_s = 0.0
        self._runners: dict[tuple, _Runner] = {}
        self._cache: StaticStageCache | None = None
        self._cache_layout: tuple | None = None

    # ----- buffers -----
    def _cache_for(self, stage_starts: tuple[int, ...]) -> StaticStageCache:
        num_layers = len(decoder_of(self.model.language_model).layers)
        layout = (stage_starts, num_layers)
        if self._cache is None or self._cache_layout != layout:
            self.release()
            self._cache = StaticStageCache(stage_of_each_layer(stage_starts, num_layers), self.bucket)
            self._cache_layout = layout
        return self._cache

    def _runner_for(self, cache: StaticStageCache, batch: int, device: torch.device) -> _Runner:
        capacities = cache.stage_capacities()
        key = (batch, capacities, cache.dtype, device)
        runner = self._runners.get(key)
        if runner is not None:
            return runner
        if len(self._runners) >= self.max_shapes:
            logger.info("fast decoding: %d shapes held; releasing their buffers and graphs", len(self._runners))
            self._runners.clear()
            cache.release_unused()
        stages = len(capacities)
        state = StaticDecodeState(
            stage_starts=self._cache_layout[0],
            attendable=[torch.zeros(batch, capacity, dtype=torch.bool, device=device) for capacity in capacities],
            positions=torch.zeros(stages, batch, dtype=torch.long, device=device),
            write_columns=torch.zeros(stages, dtype=torch.long, device=device),
        )
        runner = _Runner(state=state, tokens=torch.zeros(batch, dtype=torch.long, device=device))
        self._runners[key] = runner
        return runner

    @property
    def cache(self) -> StaticStageCache:
        """The static cache of the last call."""
        if self._cache is None:
            raise RuntimeError("no generation has run with this FastDecoder yet")
        return self._cache

    def runners(self) -> list[_Runner]:
        """Buffers and graphs per shape held now."""
        return list(self._runners.values())

    def release(self) -> None:
        """Free every cache buffer and graph (the next call allocates and captures again)."""
        self._runners.clear()
        if self._cache is not None:
            self._cache.clear()
        self._cache = None
        self._cache_layout = None

    # ----- one decode step -----
    def step(self, runner: _Runner) -> None:
        """One decode step on ``runner``'s buffers (what the graph captures)."""
        model = self.model
        embeds = model.get_input_embeddings()(runner.tokens.unsqueeze(1))
        hidden = run_static_decoder_step(decoder_of(model.language_model), embeds, runner.state, self._cache)
        logits = model.get_output_embeddings()(hidden)[:, -1]
        if runner.logits is None:
            runner.logits = torch.empty_like(logits)
        runner.logits.copy_(logits)

    def _warm_up(self, runner: _Runner, steps: int) -> None:
        """Run ``steps`` eager steps and undo their effect on positions, masks and write columns (the
        cache columns they wrote are overwritten before being read)."""
        saved = runner.state.snapshot()
        tokens = runner.tokens.clone()
        for _ in range(steps):
            self.step(runner)
        runner.state.restore(saved)
        runner.tokens.copy_(tokens)

    def _capture(self, runner: _Runner) -> None:
        """Warm up on a side stream, undo the warm-up, capture one step; counts the time it took."""
        torch.cuda.synchronize()
        began = time.perf_counter()
        try:
            self._warm_up_and_capture(runner)
        finally:
            torch.cuda.synchronize()
            self.capture_time_s += time.perf_counter() - began

    def _warm_up_and_capture(self, runner: _Runner) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(runner, 2 if self.warmup_steps is None else self.warmup_steps)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step(runner)
        except RuntimeError as error:
            runner.capture_failed = True
            logger.warning("fast decoding: CUDA graph capture failed (%s); decoding without a graph", error)
            return
        runner.graph = graph
        self.captures += 1

    def _advance(self, runner: _Runner, use_graph: bool) -> None:
        if runner.graph is None and use_graph and not runner.capture_failed:
            self._capture(runner)
        if runner.graph is not None:
            runner.graph.replay()
        else:
            self.step(runner)

    # ----- generation -----
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        pixel_values_videos: torch.Tensor | None,
        max_new_tokens: int,
        pick_next_token,
        eos_ids: list[int],
        pad_token_id: int,
        visual_inputs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """New tokens ``[B, <= max_new_tokens]``, identical to the eager loop's for the same picks.

        ``pick_next_token(logits [B, V]) -> [B]`` chooses each token (greedy or sampled);
        ``visual_inputs`` are further prefill keywords (Qwen2.5-VL's ``image_grid_thw``).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        model = self.model
        device = input_ids.device
        plan = model.stage_plan
        stage_starts = plan.stage_starts() if plan is not None else (0,)
        cache = self._cache_for(stage_starts)
        cache.begin_prefill(reserve=max_new_tokens - 1)
        out = prefill(model, input_ids, attention_mask, pixel_values, pixel_values_videos, cache, visual_inputs)
        batch = input_ids.shape[0]
        eos_tensor = torch.tensor(eos_ids, device=device, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        last_step_needed = torch.zeros(batch, dtype=torch.long, device=device)
        new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        token = pick_next_token(out.logits[:, -1])
        if max_new_tokens > 1:
            runner = self._runner_for(cache, batch, device)
            runner.state.load(out.decode_state)
            cache.begin_decoding(runner.state.write_columns)
            use_graph = self.use_cuda_graph if self.use_cuda_graph is not None else device.type == "cuda"
            if not use_graph and self.warmup_steps:
                self._warm_up(runner, self.warmup_steps)
        steps_run = max_new_tokens
        for step in range(max_new_tokens):
            token = token.masked_fill(finished, pad_token_id)
            new_tokens[:, step] = token
            # A row still running needs this column; a row that already finished does not.
            last_step_needed = torch.where(finished, last_step_needed, step)
            finished |= torch.isin(token, eos_tensor)
            if step == max_new_tokens - 1:
                break
            if (step + 1) % self.eos_check_interval == 0 and bool(finished.all()):
                steps_run = step + 1
                break
            runner.tokens.copy_(token)
            self._advance(runner, use_graph)
            token = pick_next_token(runner.logits)
        # The eager loop stops at the first step after which every row has finished: same length here.
        length = min(steps_run, int(last_step_needed.max()) + 1) if batch else 0
        return new_tokens[:, :length]
