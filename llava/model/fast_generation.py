"""Fast generation: an eager compressed prefill, then decode steps over static per-stage caches that a
CUDA graph replays.

The eager decode loop (:func:`llava.model.generation.greedy_or_sample`) launches about 1,500 small
kernels per token from Python, so at batch 1 the GPU waits for the host. Here the prefill runs as
before (tower, V2V, LLM with T2V drops) into a :class:`~llava.model.static_cache.StaticStageCache`;
every decode step then has fixed shapes (one token per row, one preallocated cache per stage) and no
host synchronisation, so on CUDA it is captured once per shape as a ``torch.cuda.CUDAGraph`` and each
later token is one graph replay. EOS is checked on the device and read back after every step at first,
then at growing intervals up to ``eos_check_interval`` steps (:func:`eos_check_gap`), so a one-word
answer stops after at most one extra step and a long one pays few host reads.

Why explicit graph capture rather than ``torch.compile(mode="reduce-overhead")``: capture costs a few
decode steps instead of a compilation of the whole LLM (tens of seconds for a 7B model, repeated for
every new cache length unless shapes are marked dynamic), it runs the HF layers exactly as the eager
path does (same kernels, same numerics, nothing traced), and it needs no compiler toolchain on the
node. What it does not do is fuse elementwise kernels; the graph removes the launch overhead, which is
what dominates at batch 1.

A :class:`FastDecoder` owns the buffers and graphs and is held by the caller (the inference pipeline,
the benchmark), like a KV cache: the model itself keeps no state between calls. Graphs are kept per
(batch size, per-stage cache lengths), lengths rounded up to
:data:`~llava.model.static_cache.CAPACITY_BUCKET` and, with graphs, batch sizes to 1, 2, 4, 8, then
multiples of 8 (:func:`~llava.model.static_cache.bucketed_batch`; padded rows decode along and are
never read). Shapes are kept least-recently-used first out, within ``max_shapes`` and a memory cap on
their cache buffers and graph pools, so an evaluation keeps the graphs of the shapes it reuses.

A capture that fails for a recoverable reason (an operation not permitted while capturing) leaves that
shape on eager steps, with a warning, and is counted (:attr:`FastDecoder.capture_failures`); an error
after which the CUDA context is unusable (device-side assert, illegal memory access) is raised.

The first replay of every captured graph is checked against the eager step on the same state
(:meth:`FastDecoder._verify_first_replay`): same greedy next tokens and logits within
:func:`replay_tolerance` of the logit scale. A graph that fails the check is dropped and its shape decodes
on eager steps for the rest of the decoder's life, with a warning naming the shape; the check costs one
eager step and one host read per captured shape, and nothing on later replays.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llava.hf_adapter import STATIC_DECODE_KERNELS, Cache, attn_implementation_of
from llava.model.contract import DuetOutput, VisionLanguageModel
from llava.model.decoder import CompiledDecodeStep, StaticDecodeState, decoder_of, run_static_decoder_step
from llava.model.sampling import SamplingOptions
from llava.model.static_cache import CAPACITY_BUCKET, StaticStageCache, bucketed_batch, stage_of_each_layer

logger = logging.getLogger(__name__)

EOS_CHECK_INTERVAL = 8
"""Most decode steps between host reads of "has every row finished?" (each read is a synchronisation)."""

MAX_SHAPES = 8
"""Decode shapes (buffers, state and graph) a :class:`FastDecoder` keeps by default."""

MEMORY_FRACTION = 0.2
"""Default memory cap of the kept shapes on CUDA: this share of the device's total memory."""

STICKY_CUDA_ERRORS = (
    "device-side assert",
    "illegal memory access",
    "illegal address",
    "illegal instruction",
    "unspecified launch failure",
    "misaligned address",
    "hardware stack error",
    "invalid program counter",
    "launch timed out",
    "uncorrectable ecc error",
)
"""Messages of CUDA errors after which the context is unusable: raised, never answered by an eager fallback."""


REPLAY_TOLERANCE_ULPS = 4
"""Units in the last place (of the logit dtype, at the logit scale) a first replay may differ from the eager step."""


def replay_tolerance(dtype: torch.dtype) -> float:
    """Largest accepted ``max |replayed - eager| / logit scale`` of a graph's first replay, for logits of ``dtype``.

    The replay runs the eager step's own kernels on the same inputs, so it is normally bit-identical; what may
    differ is the summation order of a kernel that picks another algorithm under capture (cuBLAS split-K or
    workspace), which moves a logit by a few units in the last place of the largest logit's magnitude
    (``eps * scale``). Four of them pass: 0.031 of the scale for bf16 (eps 2**-7: about 0.6 at a scale of 20),
    0.0039 for fp16; at least 1e-4 (fp32: TF32 or reduction order). A real fault (a stale buffer, a wrong
    cache column or stage, a missed operation) moves logits by about the scale itself.
    """
    return max(REPLAY_TOLERANCE_ULPS * torch.finfo(dtype).eps, 1e-4)


@dataclass(frozen=True)
class ReplayComparison:
    """A graph's first replay against the eager step: the largest logit difference over the logit scale (the
    largest eager logit magnitude, at least 1), and whether every row's greedy token is the same."""

    relative_diff: float
    tolerance: float
    scale: float
    same_tokens: bool

    @property
    def matches(self) -> bool:
        """Same next tokens and logits within the tolerance (a NaN difference never matches)."""
        return self.same_tokens and self.relative_diff <= self.tolerance


def compare_logits(replayed: torch.Tensor, eager: torch.Tensor, tolerance: float | None = None) -> ReplayComparison:
    """Compare ``[B, V]`` logits of a replay with the eager step's (one host read); ``tolerance`` defaults to
    :func:`replay_tolerance` of ``eager``'s dtype. Positions non-finite in both count as equal; non-finite in
    one only as a NaN difference (a mismatch)."""
    tolerance = replay_tolerance(eager.dtype) if tolerance is None else tolerance
    if eager.numel() == 0:
        return ReplayComparison(0.0, tolerance, 1.0, True)
    replayed_f, eager_f = replayed.float(), eager.float()
    both_nonfinite = ~torch.isfinite(replayed_f) & ~torch.isfinite(eager_f)
    same_pattern = torch.isfinite(replayed_f) == torch.isfinite(eager_f)
    diff = (replayed_f - eager_f).abs().masked_fill(both_nonfinite, 0.0)
    diff = torch.where(same_pattern, diff, torch.full_like(diff, math.nan))
    scale = eager_f.masked_fill(~torch.isfinite(eager_f), 0.0).abs().amax().clamp_min(1.0)
    same_tokens = (replayed_f.argmax(dim=-1) == eager_f.argmax(dim=-1)).all()
    relative, scale_value, same = torch.stack([diff.amax() / scale, scale, same_tokens.float()]).tolist()  # one read
    return ReplayComparison(relative, tolerance, scale_value, same == 1.0)


def is_sticky_cuda_error(error: BaseException) -> bool:
    """Whether ``error`` leaves the CUDA context unusable (every later call would fail too)."""
    message = str(error).lower()
    return any(pattern in message for pattern in STICKY_CUDA_ERRORS)


def eos_check_gap(steps_done: int, max_new_tokens: int, max_interval: int = EOS_CHECK_INTERVAL) -> int:
    """Decode steps until the next host read of "has every row finished?", after ``steps_done`` steps.

    Every step for the first 7 steps and when ``max_new_tokens`` is below 16, then a quarter of the
    steps done (a stop costs at most 25 % extra steps), at most ``max_interval`` and ``max_new_tokens // 8``.
    """
    return max(1, min(max_interval, steps_done // 4, max_new_tokens // 8))


def static_decode_supported(model: VisionLanguageModel) -> str | None:
    """``None`` when the fast path can run this model, else the reason it cannot."""
    kernel = attn_implementation_of(model.language_model.config)
    if kernel not in STATIC_DECODE_KERNELS:
        return (
            f"the LLM uses the {kernel!r} attention kernel (fast decoding supports {', '.join(STATIC_DECODE_KERNELS)})"
        )
    return None


@dataclass
class CapturedStep:
    """A captured decode step: ``replay()`` runs it again on the same buffers; ``pool_bytes`` estimates
    the memory its graph holds (the growth of reserved device memory during the capture)."""

    replay: Callable[[], None]
    pool_bytes: int = 0
    graph: Any = None  # keeps the torch.cuda.CUDAGraph (and its memory pool) alive


class StepCapture(Protocol):
    """How a :class:`FastDecoder` captures a decode step: ``warm_up()`` runs (and undoes) eager steps,
    ``step()`` is the step to capture (it returns the logits buffer it fills). Raises ``RuntimeError`` when the
    capture fails. Also the seam tests use to stand in for CUDA graphs on a CPU (a ``replay`` that runs
    ``step`` eagerly, or one that corrupts the logits to exercise the first-replay check)."""

    def __call__(self, warm_up: Callable[[], None], step: Callable[[], object]) -> CapturedStep: ...


def _tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)


class CudaGraphCapture:
    """Captures a decode step as a ``torch.cuda.CUDAGraph`` on a side stream of its own.

    Unlike ``with torch.cuda.graph(...)`` (whose exit ends the capture before it restores the stream, so a
    failed ``capture_end`` leaves the caller on the capture stream), the caller's stream is restored
    whatever fails, and the step's own error is the one raised. It does not empty the CUDA caching
    allocator before each capture, which would free every block a long run reuses.
    """

    def __init__(self) -> None:
        self._streams: dict[Any, torch.cuda.Stream] = {}  # one side stream per device, reused by every capture

    def __call__(self, warm_up: Callable[[], None], step: Callable[[], object]) -> CapturedStep:
        """Warm up and capture on the side stream; the caller's stream is current again on return or raise."""
        caller = torch.cuda.current_stream()
        side = self._streams.get(caller.device)
        if side is None:
            side = self._streams[caller.device] = torch.cuda.Stream()
        side.wait_stream(caller)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_stream(side)
        try:
            warm_up()
            side.synchronize()
            reserved_before = torch.cuda.memory_reserved()
            graph.capture_begin()
            try:
                step()
            except BaseException:
                _end_failed_capture(graph)
                raise
            graph.capture_end()
        finally:
            torch.cuda.set_stream(caller)
        caller.wait_stream(side)
        torch.cuda.synchronize()
        pool_bytes = max(0, torch.cuda.memory_reserved() - reserved_before)
        return CapturedStep(graph.replay, pool_bytes, graph)


def _end_failed_capture(graph: torch.cuda.CUDAGraph) -> None:
    """End a capture whose step raised, so the stream leaves capture mode; ``capture_end`` then reports the
    invalidated capture, which says less than the step's own error (raised by the caller)."""
    try:
        graph.capture_end()
    except RuntimeError as error:
        logger.debug("ending the failed capture: %s", error)


@dataclass
class _Runner:
    """Buffers, state and the captured step of one (batch capacity, per-stage cache lengths) shape."""

    state: StaticDecodeState
    tokens: torch.Tensor  # [B] long, the step's input
    buffer_keys: frozenset[tuple] = field(default_factory=frozenset)  # the cache buffers the step uses
    logits: torch.Tensor | None = None  # [B, V], the step's output (allocated by the first step)
    graph: CapturedStep | None = None
    capture_failed: bool = False
    replay_verified: bool = False  # the graph's first replay matched the eager step: replay without checks
    graph_rejected: bool = False  # the first replay did not match: this shape never uses a graph again

    @property
    def batch_capacity(self) -> int:
        return self.tokens.shape[0]

    def nbytes(self) -> int:
        """Bytes of the state, the step's input and output, and the graph's pool (cache buffers apart)."""
        state = self.state
        own = _tensor_bytes([*state.attendable, state.positions, state.write_columns, self.tokens, self.logits])
        return own + (self.graph.pool_bytes if self.graph is not None else 0)

    def rows(self, batch: int) -> StaticDecodeState:
        """The state of the first ``batch`` rows (views: loading them fills the runner's own tensors)."""
        state = self.state
        return StaticDecodeState(
            stage_starts=state.stage_starts,
            attendable=[attendable[:batch] for attendable in state.attendable],
            positions=state.positions[:, :batch],
            write_columns=state.write_columns,
        )

    def reset_padding(self, batch: int) -> None:
        """Padded rows (past ``batch``) see only the column they write and start at position 0: they decode
        finite garbage that no real row reads (rows never mix in a decoder layer)."""
        if batch < self.batch_capacity:
            for attendable in self.state.attendable:
                attendable[batch:].zero_()
            self.state.positions[:, batch:].zero_()


def prefill(
    model: VisionLanguageModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    visual_inputs: Mapping[str, torch.Tensor | None] | None,
    cache: Cache | StaticStageCache | None,
) -> DuetOutput:
    """The prompt's forward pass of a left-padded batch (into ``cache`` when given), last-token logits;
    ``visual_inputs`` are the prefill's visual keywords (``pixel_values``, ``pixel_values_videos``, grids)."""
    return model(
        input_ids,
        attention_mask=attention_mask,
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
    ``bucket_batch``: decode at :func:`~llava.model.static_cache.bucketed_batch` rows (``None``: when
    graphs are used, where fewer shapes mean fewer captures; on a CPU padded rows are only extra work).
    ``max_shapes`` and ``memory_cap_bytes`` bound the shapes kept (``None``: :data:`MEMORY_FRACTION` of the
    device's memory on CUDA, no byte cap elsewhere); the least recently used go first, the current one
    always stays. ``capture``: how a step is captured (:class:`CudaGraphCapture`; tests pass their own).
    ``verify_replay``: check each captured graph's first replay against the eager step (same greedy tokens,
    logits within ``replay_tolerance`` of the logit scale, default :func:`replay_tolerance` of the logits'
    dtype); a graph that fails is dropped and its shape decodes eagerly from then on (counted in
    :attr:`replay_mismatches`, a warning names the shape).
    ``compile_step``: opt-in, run the decode step under ``torch.compile``
    (:class:`~llava.model.decoder.CompiledDecodeStep`: about 450 instead of about 1,300 kernels per LLaVA-7B
    step, fused inside the same graph capture; each new shape compiles once, tens of seconds, counted in
    :attr:`compile_time_s`); a dict is passed to ``torch.compile`` (``backend``, ``mode``).
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        use_cuda_graph: bool | None = None,
        max_shapes: int = MAX_SHAPES,
        bucket: int = CAPACITY_BUCKET,
        eos_check_interval: int = EOS_CHECK_INTERVAL,
        warmup_steps: int | None = None,
        bucket_batch: bool | None = None,
        memory_cap_bytes: int | None = None,
        capture: StepCapture | None = None,
        compile_step: bool | dict[str, Any] = False,
        verify_replay: bool = True,
        replay_tolerance: float | None = None,
    ) -> None:
        reason = static_decode_supported(model)
        if reason is not None:
            raise ValueError(f"fast decoding is not available: {reason}; generate with fast=False")
        if max_shapes < 1 or eos_check_interval < 1:
            raise ValueError("max_shapes and eos_check_interval must be >= 1")
        if memory_cap_bytes is not None and memory_cap_bytes < 0:
            raise ValueError(f"memory_cap_bytes must be >= 0, got {memory_cap_bytes}")
        if replay_tolerance is not None and not replay_tolerance >= 0:
            raise ValueError(f"replay_tolerance must be >= 0, got {replay_tolerance}")
        self.model = model
        self.use_cuda_graph = use_cuda_graph
        self.max_shapes = max_shapes
        self.bucket = bucket
        self.eos_check_interval = eos_check_interval
        self.warmup_steps = warmup_steps
        self.bucket_batch = bucket_batch
        self.memory_cap_bytes = memory_cap_bytes
        self._capture_step = capture if capture is not None else CudaGraphCapture()
        self.verify_replay = verify_replay
        self.replay_tolerance = replay_tolerance
        self.replay_checks = 0  # first replays compared with the eager step
        self.replay_mismatches = 0  # ... that differed (their shapes decode eagerly from then on)
        self._rejected_shapes: set[tuple] = set()  # runner keys whose graph failed the check, kept past eviction
        self.captures = 0
        self.capture_failures = 0
        self.capture_time_s = 0.0
        self.graph_replays = 0
        self.eager_steps = 0
        self.evictions = 0
        self._runners: OrderedDict[tuple, _Runner] = OrderedDict()
        self._cache: StaticStageCache | None = None
        self._cache_layout: tuple | None = None
        self._eos_tensors: dict[tuple, torch.Tensor] = {}
        self._compiled_step: CompiledDecodeStep | None = None
        if compile_step:
            options = compile_step if isinstance(compile_step, dict) else {}
            self._compiled_step = CompiledDecodeStep(decoder_of(model.language_model), **options)
            # Every shape kept may need its own compiled graph: dynamo must not fall back to eager before that.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * max_shapes)

    @property
    def compile_time_s(self) -> float:
        """Seconds spent compiling decode steps (0 without ``compile_step``)."""
        return self._compiled_step.compile_time_s if self._compiled_step is not None else 0.0

    # ----- buffers -----
    def _cache_for(self, stage_starts: tuple[int, ...]) -> StaticStageCache:
        num_layers = len(decoder_of(self.model.language_model).layers)
        layout = (stage_starts, num_layers)
        if self._cache is None or self._cache_layout != layout:
            self.release()
            self._cache = StaticStageCache(stage_of_each_layer(stage_starts, num_layers), self.bucket)
            self._cache_layout = layout
        return self._cache

    def _eos_tensor(self, eos_ids: list[int], device: torch.device) -> torch.Tensor:
        """The EOS ids on ``device``, copied from the host once per decoder, ids and device."""
        key = (tuple(eos_ids), device)
        tensor = self._eos_tensors.get(key)
        if tensor is None:
            tensor = self._eos_tensors[key] = torch.tensor(eos_ids, device=device, dtype=torch.long)
        return tensor

    def _runner_for(self, cache: StaticStageCache, batch_capacity: int, device: torch.device) -> _Runner:
        capacities = cache.stage_capacities()
        key = (batch_capacity, capacities, cache.dtype, device)
        runner = self._runners.get(key)
        if runner is not None:
            self._runners.move_to_end(key)
            return runner
        stages = len(capacities)
        state = StaticDecodeState(
            stage_starts=self._cache_layout[0],
            attendable=[
                torch.zeros(batch_capacity, capacity, dtype=torch.bool, device=device) for capacity in capacities
            ],
            positions=torch.zeros(stages, batch_capacity, dtype=torch.long, device=device),
            write_columns=torch.zeros(stages, dtype=torch.long, device=device),
        )
        runner = _Runner(
            state=state,
            tokens=torch.zeros(batch_capacity, dtype=torch.long, device=device),
            buffer_keys=cache.current_keys(),
            graph_rejected=key in self._rejected_shapes,
        )
        self._runners[key] = runner
        self._evict(device)
        return runner

    def held_bytes(self) -> int:
        """Estimated memory of the shapes kept: their cache buffers (each counted once), states and graph
        pools."""
        keys = set().union(*(runner.buffer_keys for runner in self._runners.values()))
        cache_bytes = self._cache.nbytes(keys) if self._cache is not None else 0
        return cache_bytes + sum(runner.nbytes() for runner in self._runners.values())

    def _memory_cap(self, device: torch.device) -> float:
        if self.memory_cap_bytes is not None:
            return self.memory_cap_bytes
        if device.type == "cuda":
            return MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory
        return math.inf

    def _evict(self, device: torch.device) -> None:
        """Drop the least recently used shapes (graph, state, the cache buffers no kept shape uses) until
        within ``max_shapes`` and the memory cap; the most recent one always stays."""
        cap = self._memory_cap(device)
        while len(self._runners) > 1 and (len(self._runners) > self.max_shapes or self.held_bytes() > cap):
            key, _ = self._runners.popitem(last=False)
            self.evictions += 1
            logger.info("fast decoding: releasing the least recently used decode shape %s", key[:2])
        if len(self._runners) == 1 and self.held_bytes() > cap:
            logger.warning(
                "fast decoding: the current decode shape alone holds about %.0f MiB, above the %.0f MiB cap",
                self.held_bytes() / 2**20, cap / 2**20,
            )  # fmt: skip
        if self._cache is not None:
            self._cache.retain(set().union(*(runner.buffer_keys for runner in self._runners.values())))

    @property
    def cache(self) -> StaticStageCache:
        """The static cache of the last call."""
        if self._cache is None:
            raise RuntimeError("no generation has run with this FastDecoder yet")
        return self._cache

    def runners(self) -> list[_Runner]:
        """Buffers and graphs per shape held now, least recently used first."""
        return list(self._runners.values())

    def shapes(self) -> list[tuple]:
        """The (batch capacity, per-stage cache lengths) of the shapes held now, least recently used first."""
        return [key[:2] for key in self._runners]

    def release(self) -> None:
        """Free every cache buffer and graph (the next call allocates and captures again)."""
        self._runners.clear()
        if self._cache is not None:
            self._cache.clear()
        self._cache = None
        self._cache_layout = None

    # ----- one decode step -----
    def step(self, runner: _Runner) -> torch.Tensor:
        """One decode step on ``runner``'s buffers (what the graph captures); returns ``runner.logits``, the
        output buffer it fills."""
        model = self.model
        embeds = model.get_input_embeddings()(runner.tokens.unsqueeze(1))
        if self._compiled_step is not None:
            hidden = self._compiled_step(embeds, runner.state, self._cache)
        else:
            hidden = run_static_decoder_step(decoder_of(model.language_model), embeds, runner.state, self._cache)
        logits = model.get_output_embeddings()(hidden)[:, -1]
        if runner.logits is None:
            runner.logits = torch.empty_like(logits)
        runner.logits.copy_(logits)
        return runner.logits

    def _warm_up(self, runner: _Runner, steps: int) -> None:
        """Run ``steps`` eager steps, each undone before the next (positions, masks, write columns).

        Every warm-up step writes the first decode column, which the first real step overwrites before it is
        read; so warm-up never writes past the cache, however few new tokens were reserved.
        """
        saved = runner.state.snapshot()
        for _ in range(steps):
            self.step(runner)
            runner.state.restore(saved)

    def _capture(self, runner: _Runner, device: torch.device) -> None:
        """Warm up and capture ``runner``'s step; on a recoverable failure leave this shape on eager steps."""
        steps = 2 if self.warmup_steps is None else self.warmup_steps
        began = time.perf_counter()
        try:
            runner.graph = self._capture_step(lambda: self._warm_up(runner, steps), lambda: self.step(runner))
        except RuntimeError as error:
            if is_sticky_cuda_error(error):
                raise
            runner.capture_failed = True
            self.capture_failures += 1
            logger.warning(
                "fast decoding: CUDA graph capture failed for batch %d, cache lengths %s (%s); this shape decodes "
                "without a graph",
                runner.batch_capacity, tuple(mask.shape[1] for mask in runner.state.attendable), error,
            )  # fmt: skip
        else:
            self.captures += 1
            self._evict(device)  # the graph's pool now counts
        finally:
            self.capture_time_s += time.perf_counter() - began

    def _advance(self, runner: _Runner, use_graph: bool, device: torch.device, batch: int) -> None:
        """One decode step of ``runner``: a graph replay where there is a verified graph, else eager."""
        if runner.graph is None and use_graph and not runner.capture_failed and not runner.graph_rejected:
            self._capture(runner, device)
        if runner.graph is not None:
            if runner.replay_verified:  # the hot path: no check, no host read
                runner.graph.replay()
                self.graph_replays += 1
                return
            if self._verify_first_replay(runner, batch):
                self.graph_replays += 1  # the graph's output was checked and accepted
                return
            self.eager_steps += 1  # the eager step of the failed check is this step's result
            return
        self.step(runner)
        self.eager_steps += 1

    def _verify_first_replay(self, runner: _Runner, batch: int) -> bool:
        """Replay ``runner``'s new graph once and run the eager step on the same state; ``True`` when they match.

        Either way the eager step runs second, from the state restored to before the replay, so the step's
        result (logits, advanced state, cache) is the eager loop's. The cache needs no snapshot of its own: a
        step writes only column ``write_columns[stage]`` of each layer's buffers, which the eager step, from the
        restored write columns, overwrites. Only the real rows (``batch``) are compared: padded rows decode
        garbage no row reads. On a mismatch the graph is dropped and its shape never captured again here.
        """
        if not self.verify_replay:
            runner.replay_verified = True
            runner.graph.replay()
            return True
        saved = runner.state.snapshot()
        runner.graph.replay()
        replayed = runner.logits[:batch].clone()
        runner.state.restore(saved)
        eager = self.step(runner)[:batch]
        comparison = compare_logits(replayed, eager, self.replay_tolerance)
        self.replay_checks += 1
        if comparison.matches:
            runner.replay_verified = True
            return True
        self.replay_mismatches += 1
        runner.graph = None  # frees its pool; the shape's buffers and state stay for eager steps
        runner.graph_rejected = True
        key = next(key for key, held in self._runners.items() if held is runner)
        self._rejected_shapes.add(key)
        capacities = tuple(mask.shape[1] for mask in runner.state.attendable)
        logger.warning(
            "fast decoding: the CUDA graph's first replay differs from the eager step for batch %d, cache capacity "
            "%s, stages %d, dtype %s (max |logit difference| %.3g of the logit scale %.3g, tolerance %.3g; same "
            "next tokens: %s); this shape decodes without a graph from now on",
            runner.batch_capacity, capacities, len(capacities), str(key[2]).removeprefix("torch."),
            comparison.relative_diff, comparison.scale, comparison.tolerance, comparison.same_tokens,
        )  # fmt: skip
        return False

    # ----- generation -----
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual_inputs: Mapping[str, torch.Tensor | None] | None = None,
        sampling: SamplingOptions | None = None,
    ) -> torch.Tensor:
        """New tokens ``[B, <= max_new_tokens]``, identical to the eager loop's for the same ``sampling``.

        ``visual_inputs`` are the prefill's visual keywords (``pixel_values``, ``pixel_values_videos``,
        Qwen2.5-VL's ``image_grid_thw``); ``sampling``'s EOS and pad ids default to the model's config's.
        """
        sampling = sampling if sampling is not None else SamplingOptions()
        max_new_tokens = sampling.max_new_tokens
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        model = self.model
        text_config = model.config.text_config
        eos_ids = sampling.stop_ids(text_config)
        pad_token_id = sampling.padding_id(text_config, eos_ids)
        pick_next_token = sampling.pick
        device = input_ids.device
        batch = input_ids.shape[0]
        if max_new_tokens == 1:  # no decode step: the prefill needs no cache
            out = prefill(model, input_ids, attention_mask, visual_inputs, None)
            token = pick_next_token(out.logits[:, -1], 0)
            sampling.stop_rows(0, token)
            return token.unsqueeze(1)
        use_graph = self.use_cuda_graph if self.use_cuda_graph is not None else device.type == "cuda"
        bucket_batch = self.bucket_batch if self.bucket_batch is not None else use_graph
        batch_capacity = bucketed_batch(batch) if bucket_batch and batch else batch
        plan = model.stage_plan
        cache = self._cache_for(plan.stage_starts() if plan is not None else (0,))
        cache.begin_prefill(reserve=max_new_tokens - 1, batch_capacity=batch_capacity or None)
        out = prefill(model, input_ids, attention_mask, visual_inputs, cache)
        eos_tensor = self._eos_tensor(eos_ids, device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        last_step_needed = torch.zeros(batch, dtype=torch.long, device=device)
        new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        token = pick_next_token(out.logits[:, -1], 0)
        runner = self._runner_for(cache, batch_capacity, device)
        runner.rows(batch).load(out.decode_state)
        runner.reset_padding(batch)
        cache.begin_decoding(runner.state.write_columns)
        if not use_graph and self.warmup_steps:
            self._warm_up(runner, self.warmup_steps)
        steps_run = max_new_tokens
        # Without EOS ids (or a listener) no row can finish early; a listener reads every step back anyway.
        listening = sampling.on_step is not None
        next_check = 1 if eos_ids or listening else max_new_tokens
        for step in range(max_new_tokens):
            token = token.masked_fill(finished, pad_token_id)
            new_tokens[:, step] = token
            # A row still running needs this column; a row that already finished does not.
            last_step_needed = torch.where(finished, last_step_needed, step)
            finished |= torch.isin(token, eos_tensor)
            stop = sampling.stop_rows(step, token)
            if stop is not None:
                finished |= stop
            if step == max_new_tokens - 1:
                break
            if step + 1 == next_check:
                if bool(finished.all()):
                    steps_run = step + 1
                    break
                next_check += 1 if listening else eos_check_gap(step + 1, max_new_tokens, self.eos_check_interval)
            runner.tokens[:batch].copy_(token)
            self._advance(runner, use_graph, device, batch)
            token = pick_next_token(runner.logits[:batch], step + 1)
        # The eager loop stops at the first step after which every row has finished: same length here.
        length = min(steps_run, int(last_step_needed.max()) + 1) if batch else 0
        return new_tokens[:, :length]
