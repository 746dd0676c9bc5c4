"""Fast generation (static per-stage caches, graph-capturable decode step) against the eager loop and
cache-free recomputation; host synchronisations of the compressed prefill and of a decode step."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.compression.t2v import Sequence, compacted_extents
from llava.constants import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.hf_adapter import set_attn_implementation
from llava.model.config import DuetLlavaConfig
from llava.model.fast_generation import FastDecoder
from llava.model.modeling import DuetLlavaForCausalLM
from llava.model.static_cache import bucketed, stage_of_each_layer
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
    sequence = Sequence(
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
