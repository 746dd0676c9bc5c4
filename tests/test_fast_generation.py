"""Fast generation (static per-stage caches, graph-capturable decode step) against the eager loop and
cache-free recomputation; host synchronisations of the compressed prefill and of a decode step."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.compression.t2v import SequenceState, compacted_extents
from llava.constants import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.hf_adapter import set_attn_implementation
from llava.model.config import DuetLlavaConfig
from llava.model.fast_generation import CapturedStep, CudaGraphCapture, FastDecoder, eos_check_gap, is_sticky_cuda_error
from llava.model.modeling import DuetLlavaForCausalLM
from llava.model.sampling import SamplingOptions
from llava.model.static_cache import bucketed, bucketed_batch, stage_of_each_layer
from tests.conftest import tiny_text_config, tiny_vision_config

IMG, VID = IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
FRAMES = 3

# Tiny analogues of the shipped presets (the tiny tower has 16 patches + CLS).
PRESETS = {
    "none": None,
    "duet": dict(v2v=V2VConfig("duet", 6, 2), t2v=T2VConfig((0.25, 0.75), (0.5, 0.25), query="instruction")),
    "pdrop": dict(t2v=T2VConfig((0.25, 0.5, 0.75), (0.5, 0.25, 0.125), query="last")),
    "visionzip": dict(v2v=V2VConfig("visionzip", 6, 2)),
    "salient_t2v_only": dict(t2v=T2VConfig((0.5,), (0.3,), query="salient")),
}


def build(preset: str, position_mode: str = "keep", video: bool = False, attn: str = "sdpa") -> DuetLlavaForCausalLM:
    torch.manual_seed(0)
    parts = dict(PRESETS[preset] or {})
    if "t2v" in parts:
        t2v = parts["t2v"]
        parts["t2v"] = T2VConfig(t2v.boundaries, t2v.keep_ratios, t2v.query, position_mode)
    compression = CompressionConfig(name=preset, **parts).to_dict() if parts else None
    text_config = tiny_text_config()
    set_attn_implementation(text_config, attn)
    config = DuetLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=text_config,
        video_config=tiny_vision_config() if video else None,
        num_frames=FRAMES,
        compression=compression,
    )
    model = DuetLlavaForCausalLM(config).eval()
    # Content words for salient queries: every id above the specials.
    model.content_token_table = torch.arange(config.text_config.vocab_size) > 3
    return model


def mixed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded: a text-only prompt, a one-image prompt, a two-image prompt, different lengths."""
    ids = torch.tensor(
        [[0, 0, 0, 0, 1, 5, 6, 7], [0, 0, 1, IMG, 4, 5, 6, 9], [1, IMG, 3, IMG, 4, 5, 6, 8]],
    )
    torch.manual_seed(1)
    return ids, (ids != 0).long(), torch.randn(3, 3, 56, 56)


@pytest.mark.parametrize("position_mode", ["keep", "compact"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fast_path_matches_eager_and_recomputation(preset, position_mode):
    model = build(preset, position_mode)
    ids, mask, pixels = mixed_batch()
    options = dict(max_new_tokens=10, eos_token_id=[])
    eager = model.generate(ids, mask, pixels, fast=False, **options)
    recomputed = model.generate(ids, mask, pixels, use_cache=False, **options)
    # warmup_steps=2 runs (and undoes) the warm-up that precedes a CUDA graph capture.
    fast = model.generate(ids, mask, pixels, fast=True, fast_decoder=FastDecoder(model, warmup_steps=2), **options)
    assert eager.shape == (3, 10)
    assert torch.equal(fast, eager)
    assert torch.equal(fast, recomputed)


def test_fast_path_stops_where_the_eager_loop_stops():
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    free_run = model.generate(ids, mask, pixels, fast=False, max_new_tokens=12, eos_token_id=[])
    # An EOS id that row 0 emits at step 3 (rows that never emit it run to the end).
    eos = int(free_run[0, 3])
    eager = model.generate(ids, mask, pixels, fast=False, max_new_tokens=12, eos_token_id=eos)
    decoder = FastDecoder(model, eos_check_interval=5)
    fast = model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(fast, eager)
    # Only row 0 alone: every row finishes early, so the output is shorter than max_new_tokens.
    first_eos = int((free_run[0] == eos).nonzero()[0])
    alone = model.generate(ids[:1, 4:], None, None, max_new_tokens=12, eos_token_id=int(free_run[0, 0]))
    alone_fast = model.generate(
        ids[:1, 4:], None, None, max_new_tokens=12, eos_token_id=int(free_run[0, 0]), fast=True, fast_decoder=decoder
    )
    assert torch.equal(alone, alone_fast) and alone_fast.shape[1] < 12
    assert eager[0, first_eos] == eos and (eager[0, first_eos + 1 :] == 0).all()


def test_sampling_matches_the_eager_loop_for_the_same_seed():
    model = build("duet")
    ids, mask, pixels = mixed_batch()

    def draw(fast: bool) -> torch.Tensor:
        return model.generate(
            ids, mask, pixels, max_new_tokens=8, eos_token_id=[], do_sample=True, temperature=0.9, top_p=0.9,
            generator=torch.Generator().manual_seed(5), fast=fast,
        )  # fmt: skip

    assert torch.equal(draw(True), draw(False))


def test_video_and_image_batch_matches_recomputation():
    model = build("duet", video=True)
    torch.manual_seed(4)
    ids = torch.tensor([[0, 0, 1, VID, 5, 6, 7], [1, VID, 8, IMG, 9, 10, 11]])
    kwargs = dict(
        attention_mask=(ids != 0).long(),
        pixel_values=torch.randn(1, 3, 56, 56),
        pixel_values_videos=torch.randn(2, FRAMES, 3, 56, 56),
        max_new_tokens=6,
        eos_token_id=[],
    )
    fast = model.generate(ids, fast=True, **kwargs)
    assert torch.equal(fast, model.generate(ids, use_cache=False, **kwargs))


def test_eager_attention_kernel_takes_the_additive_decode_mask():
    model = build("duet", attn="eager")
    ids, mask, pixels = mixed_batch()
    eager = model.generate(ids, mask, pixels, fast=False, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(model.generate(ids, mask, pixels, fast=True, max_new_tokens=8, eos_token_id=[]), eager)


def test_caches_are_never_read_past_what_was_written():
    """Fill every cache column with large values after a first call: the prefill and the decode steps
    overwrite what they read, so a second call must not change."""
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    decoder = FastDecoder(model)
    first = model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, max_new_tokens=8, eos_token_id=[])
    cache = decoder.cache
    for layer in range(len(cache.stage_of_layer)):
        for buffer in cache.layer_buffers(layer):
            buffer.fill_(1e4)
    again = model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(first, again)
    # Each stage's decode mask covers exactly its prompt columns plus the 7 decode steps, and the write
    # column points just past them: nothing beyond was ever attendable.
    (runner,) = decoder.runners()
    starts = model.stage_plan.stage_starts()
    for stage, attendable in enumerate(runner.state.attendable):
        written = int(runner.state.write_columns[stage])
        assert not attendable[:, written:].any()
        assert written + 1 <= cache.stage_capacities()[stage]
        assert attendable.shape[1] == cache.layer_buffers(starts[stage])[0].shape[2]


def test_buffers_and_graph_shapes_are_reused_and_bounded():
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    decoder = FastDecoder(model, max_shapes=2, bucket=16)
    for _ in range(2):
        model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, max_new_tokens=4, eos_token_id=[])
    assert len(decoder.runners()) == 1  # same prompt: same shape, nothing new
    model.generate(ids[1:], mask[1:], pixels, fast=True, fast_decoder=decoder, max_new_tokens=4)
    model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, max_new_tokens=30, eos_token_id=[])
    assert len(decoder.runners()) <= 2
    # Buffers are released with their graphs: at most the shapes of the runners held now remain.
    assert decoder.cache.num_buffer_shapes <= 2 * len(model.language_model.model.layers)
    # Capacities are bucketed: a stage of L prompt tokens decoding N tokens holds bucketed(L + N - 1).
    lengths = [int(m.shape[1]) for m in model(ids, mask, pixels, use_cache=False).decode_state.attention_masks]
    assert decoder.cache.stage_capacities() == tuple(bucketed(length + 29, 16) for length in lengths)


def test_fast_path_refuses_what_it_cannot_do():
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(ids, mask, pixels, fast=True, use_cache=False)
    set_attn_implementation(model.language_model.config, "flash_attention_2")
    with pytest.raises(ValueError, match="flash_attention_2"):
        model.generate(ids, mask, pixels, fast=True)


def test_stage_of_each_layer():
    assert stage_of_each_layer((0, 1, 3), 5) == [0, 1, 1, 2, 2]
    assert stage_of_each_layer((0,), 2) == [0, 0]
    assert bucketed(1, 128) == 128 and bucketed(129, 128) == 256 and bucketed(256, 128) == 256


def test_compact_with_known_length_equals_compact_that_measures_it():
    torch.manual_seed(0)
    visual = torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]]).bool()
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
    sequence = SequenceState(
        hidden=torch.randn(3, 7, 4),
        attention_mask=attention,
        position_ids=(attention.cumsum(1) - 1).clamp(min=0),
        visual_mask=visual,
        query_mask=torch.zeros(3, 7, dtype=torch.bool),
        labels=torch.randint(0, 9, (3, 7)),
    )
    keep = attention.bool() & ~visual
    keep[0, 2] = keep[0, 4] = keep[1, 3] = True  # two of four, one of two visual tokens
    ((shortest, expected_length),) = compacted_extents(sequence, (0.5,)).tolist()
    assert shortest == 3  # row 2: three text tokens, no visual ones
    for left_align in (False, True):
        measured = sequence.compact(keep, left_align, recompute_positions=False)
        known = sequence.compact(keep, left_align, recompute_positions=False, length=expected_length)
        assert measured.hidden.shape[1] == expected_length == 5
        for name in ("hidden", "attention_mask", "position_ids", "visual_mask", "labels"):
            assert torch.equal(getattr(measured, name), getattr(known, name))
    right = sequence.compact(keep, left_align=False, recompute_positions=False)
    assert torch.equal(right.hidden[0], sequence.hidden[0, [0, 2, 4, 5, 6]])
    assert torch.equal(right.labels[2], torch.cat([sequence.labels[2, 4:], torch.full((2,), -100)]))
    left = sequence.compact(keep, left_align=True, recompute_positions=False)
    assert torch.equal(left.hidden[1, 1:], sequence.hidden[1, [2, 3, 5, 6]]) and (left.hidden[1, 0] == 0).all()


def host_reads(function) -> int:
    """Device-to-host scalar reads (``.item()``, ``int()``, ``bool()`` of a tensor) and ``nonzero`` calls:
    on a GPU each one is a synchronisation."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        function()
    names = [event.name for event in prof.events()]
    return sum(name in ("aten::_local_scalar_dense", "aten::nonzero") for name in names)


def test_prefill_host_reads_do_not_grow_with_the_number_of_boundaries():
    ids, mask, pixels = mixed_batch()
    reads = {}
    for name, boundaries in (("one", (0.5,)), ("three", (0.25, 0.5, 0.75))):
        model = build("none")
        ratios = tuple(0.5**i for i in range(1, len(boundaries) + 1))
        model.set_compression(CompressionConfig(name, t2v=T2VConfig(boundaries, ratios, "instruction")))
        reads[name] = host_reads(lambda model=model: model(ids, mask, pixels, left_padding=True, logits_to_keep=1))
    assert reads["three"] == reads["one"]


@pytest.mark.parametrize("preset", ["duet", "visionzip", "pdrop", "none"])
def test_prefill_reads_no_scalars_and_calls_no_nonzero(preset):
    """Sizes the prefill needs on the host come from its few bulk transfers (slots per row before the
    towers; stage extents and query counts before the LLM; visual tokens per layer at the end), never
    from per-op reads: V2V, the merge, T2V scoring and compaction, masks."""
    model = build(preset)
    ids, mask, pixels = mixed_batch()
    assert host_reads(lambda: model(ids, mask, pixels, left_padding=True, logits_to_keep=1)) == 0
    assert host_reads(lambda: model(ids[2:], mask[2:], pixels[1:], left_padding=True, logits_to_keep=1)) == 0


def test_a_decode_step_reads_nothing_back_from_the_device():
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    decoder = FastDecoder(model)
    model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, max_new_tokens=3, eos_token_id=[])
    (runner,) = decoder.runners()
    assert host_reads(lambda: decoder.step(runner)) == 0


def text_prompt(length: int, batch: int = 1, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` text-only prompts of exactly ``length`` tokens (BOS, then random ids above the specials)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (batch, length), generator=generator)
    ids[:, 0] = 1
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("preset", ["none", "duet"])
@pytest.mark.parametrize(("prompt_length", "max_new_tokens"), [(127, 1), (127, 2), (127, 3), (126, 3), (128, 2)])
def test_warm_up_never_writes_past_the_cache_at_the_bucket_boundary(preset, prompt_length, max_new_tokens):
    """Two warm-up steps before a capture with one decode step left: prompt + 1 == the 128 bucket used to
    write one column past the cache (IndexError on CPU, a device-side assert on CUDA)."""
    model = build(preset)
    ids, mask = text_prompt(prompt_length)
    options = dict(max_new_tokens=max_new_tokens, eos_token_id=[])
    eager = model.generate(ids, mask, None, fast=False, **options)
    decoder = FastDecoder(model, warmup_steps=2)
    fast = model.generate(ids, mask, None, fast=True, fast_decoder=decoder, **options)
    assert torch.equal(fast, eager) and fast.shape == (1, max_new_tokens)
    if max_new_tokens > 1:  # the cache was not enlarged for the warm-up: prompt + new tokens - 1, bucketed
        assert decoder.cache.stage_capacities()[0] == bucketed(prompt_length + max_new_tokens - 1)


# ----- capture failures (a capture seam on CPU: ``capture(warm_up, step) -> CapturedStep``) -----


class EagerCapture:
    """Stands in for CUDA graph capture on a CPU: warms up, then "replays" by running the step eagerly;
    raises ``errors[i]`` at the ``i``-th capture when one is given."""

    def __init__(self, *errors: Exception | None) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, warm_up, step) -> CapturedStep:
        error = self.errors[self.calls] if self.calls < len(self.errors) else None
        self.calls += 1
        warm_up()
        if error is not None:
            raise error
        return CapturedStep(replay=step, pool_bytes=1000)


def test_a_captured_step_replays_to_the_eager_loops_tokens():
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    options = dict(max_new_tokens=6, eos_token_id=[])
    decoder = FastDecoder(model, use_cuda_graph=True, capture=EagerCapture())
    fast = model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, **options)
    assert torch.equal(fast, model.generate(ids, mask, pixels, fast=False, **options))
    assert (decoder.captures, decoder.capture_failures, decoder.graph_replays, decoder.eager_steps) == (1, 0, 5, 0)
    model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, **options)
    assert decoder.captures == 1 and decoder.graph_replays == 10  # the shape's graph is reused


def test_a_compiled_decode_step_captured_like_the_eager_one_gives_the_eager_loops_tokens():
    """The opt-in compiled step (``aot_eager`` here: dynamo's tracing without code generation) is compiled in
    the warm-up, captured, replayed; tokens equal the eager loop's and its compile time is reported."""
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    options = dict(max_new_tokens=6, eos_token_id=[])
    decoder = FastDecoder(model, use_cuda_graph=True, capture=EagerCapture(), compile_step={"backend": "aot_eager"})
    fast = model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, **options)
    assert torch.equal(fast, model.generate(ids, mask, pixels, fast=False, **options))
    assert decoder.captures == 1 and decoder.graph_replays == 5 and decoder.compile_time_s > 0
    assert FastDecoder(model).compile_time_s == 0.0


def test_a_failed_capture_leaves_only_that_shape_on_eager_steps(caplog):
    model = build("duet")
    options = dict(max_new_tokens=4, eos_token_id=[])
    not_permitted = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    decoder = FastDecoder(model, use_cuda_graph=True, bucket=16, capture=EagerCapture(not_permitted))
    short, long = text_prompt(10), text_prompt(30)
    with caplog.at_level("WARNING", logger="llava.model.fast_generation"):
        first = model.generate(*short, None, fast=True, fast_decoder=decoder, **options)
    assert "capture failed" in caplog.text and "decodes without a graph" in caplog.text
    assert (decoder.captures, decoder.capture_failures, decoder.eager_steps, decoder.graph_replays) == (0, 1, 3, 0)
    model.generate(*short, None, fast=True, fast_decoder=decoder, **options)  # not captured again
    assert (decoder.capture_failures, decoder.eager_steps) == (1, 6)
    second = model.generate(*long, None, fast=True, fast_decoder=decoder, **options)  # another shape: captured
    assert (decoder.captures, decoder.graph_replays) == (1, 3)
    assert torch.equal(first, model.generate(*short, None, fast=False, **options))
    assert torch.equal(second, model.generate(*long, None, fast=False, **options))


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: device-side assert triggered",
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: an illegal instruction was encountered",
        "CUDA error: unspecified launch failure",
    ],
)
def test_a_sticky_cuda_error_during_capture_is_raised(message):
    model = build("none")
    decoder = FastDecoder(model, use_cuda_graph=True, capture=EagerCapture(RuntimeError(message)))
    with pytest.raises(RuntimeError, match=message.split(": ")[1]):
        model.generate(*text_prompt(10), None, fast=True, fast_decoder=decoder, max_new_tokens=4, eos_token_id=[])
    assert is_sticky_cuda_error(RuntimeError(message))
    assert not is_sticky_cuda_error(RuntimeError("operation not permitted when stream is capturing"))


class FakeCuda:
    """The ``torch.cuda`` calls :class:`CudaGraphCapture` makes, recorded; ``capture_end`` can fail."""

    def __init__(self, fail_capture_end: bool = False, fail_step: bool = False) -> None:
        self.fail_capture_end = fail_capture_end
        self.calls: list[tuple] = []
        outer = self

        class Stream:
            def __init__(self, name: str = "side stream") -> None:
                self.name = name
                self.device = "cuda:0"

            def __repr__(self) -> str:
                return self.name

            def wait_stream(self, other) -> None:
                outer.calls.append(("wait_stream", self, other))

            def synchronize(self) -> None:
                outer.calls.append(("synchronize", self))

        class CUDAGraph:
            def capture_begin(self) -> None:
                outer.calls.append(("capture_begin", outer.current))

            def capture_end(self) -> None:
                outer.calls.append(("capture_end",))
                if outer.fail_capture_end:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

            def replay(self) -> None:
                outer.calls.append(("replay",))

        self.Stream, self.CUDAGraph = Stream, CUDAGraph
        self.caller = self.current = Stream("caller stream")

    def current_stream(self):
        return self.current

    def set_stream(self, stream) -> None:
        self.calls.append(("set_stream", stream))
        self.current = stream

    def synchronize(self) -> None:
        self.calls.append(("synchronize",))

    def memory_reserved(self) -> int:
        return 4096 * sum(call[0] == "capture_end" for call in self.calls)

    def install(self, monkeypatch) -> None:
        for name in ("Stream", "CUDAGraph", "current_stream", "set_stream", "synchronize", "memory_reserved"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))


def test_cuda_graph_capture_restores_the_callers_stream_when_the_step_fails(monkeypatch):
    fake = FakeCuda(fail_capture_end=True)
    fake.install(monkeypatch)

    def failing_step() -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="operation not permitted"):  # the step's error, not capture_end's
        CudaGraphCapture()(lambda: None, failing_step)
    assert fake.current is fake.caller
    names = [call[0] for call in fake.calls]
    assert names.index("capture_begin") < names.index("capture_end") < len(names) - 1
    assert fake.calls[-1] == ("set_stream", fake.caller)


def test_cuda_graph_capture_restores_the_callers_stream_when_capture_end_fails(monkeypatch):
    fake = FakeCuda(fail_capture_end=True)
    fake.install(monkeypatch)
    with pytest.raises(RuntimeError, match="previous error during capture"):
        CudaGraphCapture()(lambda: None, lambda: None)
    assert fake.current is fake.caller and fake.calls[-1] == ("set_stream", fake.caller)


def test_cuda_graph_capture_warms_up_and_captures_on_its_side_stream(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    seen = []
    captured = CudaGraphCapture()(lambda: seen.append(("warm_up", fake.current)), lambda: seen.append("step"))
    side = seen[0][1]
    assert seen == [("warm_up", side), "step"] and side is not fake.caller
    assert ("capture_begin", side) in fake.calls and fake.current is fake.caller
    assert ("wait_stream", fake.caller, side) in fake.calls  # the caller's stream waits for the capture stream
    assert captured.pool_bytes == 4096
    captured.replay()
    assert fake.calls[-1] == ("replay",)


# ----- evaluation shape policy: batch buckets, LRU with a memory cap, adaptive EOS checks -----


def test_batch_sizes_are_bucketed():
    assert [bucketed_batch(size) for size in (1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 25)] == [
        1, 2, 4, 4, 8, 8, 16, 16, 24, 24, 32,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="batch"):
        bucketed_batch(0)


@pytest.mark.parametrize("preset", ["duet", "pdrop"])
def test_a_ragged_batch_decodes_at_its_bucket_with_the_unbucketed_tokens(preset):
    """Batch 3 decodes on 4 rows (the padding row sees only what it writes); batch 4 then reuses the shape and
    its graph. Tokens equal the unbucketed fast path's and the eager loop's."""
    model = build(preset)
    ids, mask, pixels = mixed_batch()
    options = dict(max_new_tokens=8, eos_token_id=[])
    eager = model.generate(ids, mask, pixels, fast=False, **options)
    plain = model.generate(ids, mask, pixels, fast=True, fast_decoder=FastDecoder(model, bucket_batch=False), **options)
    decoder = FastDecoder(model, use_cuda_graph=True, bucket_batch=True, capture=EagerCapture())
    bucketed_run = model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, **options)
    assert torch.equal(bucketed_run, plain) and torch.equal(bucketed_run, eager)
    ((batch_capacity, _),) = decoder.shapes()
    assert batch_capacity == 4 and decoder.cache.layer_buffers(0)[0].shape[0] == 4
    # A full batch of 4 (one more text prompt) takes the same shape: no new capture.
    four_ids, four_mask = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]])
    four = model.generate(four_ids, four_mask, pixels, fast=True, fast_decoder=decoder, **options)
    assert len(decoder.shapes()) == 1 and decoder.captures == 1
    assert torch.equal(four, model.generate(four_ids, four_mask, pixels, fast=False, **options))
    # The ragged batch again, after the full one filled the padding row's cache: still the same tokens.
    assert torch.equal(model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, **options), eager)


def test_shapes_are_kept_least_recently_used_first_out():
    model = build("none")
    options = dict(max_new_tokens=4, eos_token_id=[])
    prompts = {name: text_prompt(length) for name, length in (("a", 10), ("b", 20), ("c", 40))}
    capacity = {"a": 16, "b": 32, "c": 48}  # prompt + 3 reserved, bucketed to 16
    decoder = FastDecoder(model, max_shapes=2, bucket=16, use_cuda_graph=True, capture=EagerCapture())
    outputs = {}
    for name in ("a", "b", "a", "c"):
        outputs[name] = model.generate(*prompts[name], None, fast=True, fast_decoder=decoder, **options)
    # "a" was used after "b": "b" is the one released when "c" arrives.
    assert decoder.shapes() == [(1, (capacity["a"],)), (1, (capacity["c"],))]
    assert decoder.evictions == 1 and decoder.captures == 3
    layers = len(model.language_model.model.layers)
    assert decoder.cache.num_buffer_shapes == 2 * layers  # b's buffers went with its graph
    model.generate(*prompts["a"], None, fast=True, fast_decoder=decoder, **options)
    assert decoder.captures == 3  # still held: replayed, not captured again
    for name, tokens in outputs.items():
        assert torch.equal(tokens, model.generate(*prompts[name], None, fast=False, **options))


def test_the_memory_cap_evicts_shapes(caplog):
    model = build("none")
    options = dict(max_new_tokens=4, eos_token_id=[])
    short, long = text_prompt(10), text_prompt(40)
    alone = FastDecoder(model, bucket=16)
    model.generate(*long, None, fast=True, fast_decoder=alone, **options)
    long_bytes = alone.held_bytes()
    assert long_bytes >= alone.cache.nbytes() > 0
    decoder = FastDecoder(model, bucket=16, memory_cap_bytes=long_bytes)
    model.generate(*long, None, fast=True, fast_decoder=decoder, **options)
    model.generate(*short, None, fast=True, fast_decoder=decoder, **options)
    assert decoder.shapes() == [(1, (16,))] and decoder.evictions == 1
    assert decoder.held_bytes() <= long_bytes
    tiny = FastDecoder(model, bucket=16, memory_cap_bytes=1)
    with caplog.at_level("WARNING", logger="llava.model.fast_generation"):
        model.generate(*short, None, fast=True, fast_decoder=tiny, **options)
    assert len(tiny.shapes()) == 1 and "above the" in caplog.text  # the current shape always stays


def test_eos_checks_are_every_step_at_first_then_back_off():
    checks = [1]
    while checks[-1] < 128:
        checks.append(checks[-1] + eos_check_gap(checks[-1], 128))
    assert checks[:8] == [1, 2, 3, 4, 5, 6, 7, 8] and max(b - a for a, b in itertools.pairwise(checks)) == 8
    assert all(eos_check_gap(steps, 12) == 1 for steps in range(1, 12))  # few new tokens: every step
    assert eos_check_gap(40, 16) == 2 and eos_check_gap(100, 128, max_interval=4) == 4


def test_a_batch_whose_rows_all_end_at_step_1_stops_after_at_most_one_extra_step():
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    free_run = model.generate(ids, mask, pixels, fast=False, max_new_tokens=4, eos_token_id=[])
    eos = sorted(set(free_run[:, 1].tolist()))  # every row emits one of these by step 1
    options = dict(max_new_tokens=64, eos_token_id=eos)
    eager = model.generate(ids, mask, pixels, fast=False, **options)
    assert eager.shape[1] <= 2
    decoder = FastDecoder(model, eos_check_interval=8)
    fast = model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, **options)
    assert torch.equal(fast, eager)
    assert decoder.eager_steps <= eager.shape[1]  # the steps the answer needed (one fewer) plus at most one


def test_generation_setup_copies_nothing_from_the_host_per_call():
    """After the first call, a fast generate creates no tensor from host data beyond what its prefill does
    (``torch.tensor(list)`` is ``aten::lift_fresh``: a blocking host-to-device copy on a GPU)."""
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    decoder = FastDecoder(model)

    def generate() -> None:
        decoder.generate(ids, mask, {"pixel_values": pixels}, SamplingOptions(6, eos_token_id=[2, 3], pad_token_id=0))

    def copies(function) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            function()
        return sum(event.name == "aten::lift_fresh" for event in prof.events())

    generate()
    prefill_copies = copies(lambda: model(ids, mask, pixels, left_padding=True, logits_to_keep=1))
    assert copies(generate) == prefill_copies


# ----- benchmark rows: graph use, captures, capture failures; no matplotlib needed -----


def test_infer_speed_rows_report_graph_use_without_matplotlib(tmp_path, monkeypatch, caplog):
    """The GPU node has no matplotlib: rows and table are written, the chart is skipped with a note."""
    from llava.bench import infer_speed

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # ``import matplotlib`` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "infer.json"
    with caplog.at_level("INFO", logger="llava.bench.report"):
        rows = infer_speed.main(
            ["--shape", "tiny", "--presets", "none", "--batch-sizes", "1", "--prompt-tokens", "8", "--new-tokens",
             "3", "--repeats", "1", "--device", "cpu", "--threads", "1", "--out", str(out)]
        )  # fmt: skip
    assert out.exists() and out.with_suffix(".md").exists() and not out.with_suffix(".png").exists()
    assert "matplotlib is not installed" in caplog.text
    by_path = {row["path"]: row for row in json.loads(out.read_text())}
    assert len(rows) == 2
    assert (by_path["fast"]["graph"], by_path["fast"]["captures"], by_path["fast"]["capture_failures"]) == ("no", 0, 0)
    assert (by_path["eager"]["graph"], by_path["eager"]["captures"]) == ("no", None)
    assert (by_path["fast"]["replay_checks"], by_path["fast"]["replay_mismatches"]) == (0, 0)  # no graph on a CPU
    assert by_path["eager"]["replay_mismatches"] is None
    table = out.with_suffix(".md").read_text()
    assert "| graph | captures | capture failures | replay mismatches |" in table


def test_graph_use_of_a_benchmark_case():
    from llava.bench.infer_speed import CaseRecord, graph_use

    case = CaseRecord("none", CompressionConfig(), 1, {}, path="fast")
    assert graph_use(case) == "no"
    case.graph_replays = 10
    assert graph_use(case) == "yes"
    case.eager_steps = 2
    assert graph_use(case) == "partial"


def test_a_decode_state_refuses_a_prefill_of_another_batch_size():
    """A ``[1, L]`` prompt mask would silently broadcast over every row of a bigger state."""
    from llava.model.decoder import DecodeState, StaticDecodeState

    state = StaticDecodeState(
        stage_starts=(0,),
        attendable=[torch.zeros(2, 16, dtype=torch.bool)],
        positions=torch.zeros(1, 2, dtype=torch.long),
        write_columns=torch.zeros(1, dtype=torch.long),
    )
    prefill_state = DecodeState((0,), [torch.ones(1, 5, dtype=torch.long)], [torch.tensor([5])])
    with pytest.raises(ValueError, match=r"stage 0: a prefill of 1 rows x 5 tokens does not fit .* 2 rows"):
        state.load(prefill_state)
    too_long = DecodeState((0,), [torch.ones(2, 17, dtype=torch.long)], [torch.tensor([17, 17])])
    with pytest.raises(ValueError, match="2 rows x 17 tokens"):
        state.load(too_long)


def test_a_call_without_a_held_decoder_captures_only_when_the_answer_is_long_enough(monkeypatch):
    """Its graphs die with the call: a short answer would pay the capture and not win it back."""
    from llava.model import generation

    model = build("none")
    made = []
    monkeypatch.setattr(generation, "FastDecoder", lambda model, **options: made.append(options) or FastDecoder(model))
    ids, mask, pixels = mixed_batch()
    for new_tokens in (4, generation.ONE_OFF_GRAPH_MIN_TOKENS):
        model.generate(ids, mask, pixels, fast=True, max_new_tokens=new_tokens, eos_token_id=[])
    assert made == [{"use_cuda_graph": False}, {"use_cuda_graph": None}]
