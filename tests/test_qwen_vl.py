"""Qwen2.5-VL through the shared decoder loop: equality with transformers' model when uncompressed, T2V with
M-RoPE positions kept, exact keep counts, batched cached generation."""

from __future__ import annotations

import inspect

import pytest
import torch

from llava.compression.config import CompressionConfig, DyMUConfig, T2VConfig, V2VConfig
from llava.model.contract import FORWARD_KEYWORDS, VisionLanguageModel
from llava.model.qwen_vl import DuetQwenVL
from llava.model.sampling import SamplingOptions
from tests.conftest import IMAGE, PATCH_FEATURES, tiny_qwen

START, END = 152, 153


def image(tokens: int) -> list[int]:
    return [START] + [IMAGE] * tokens + [END]


def batch() -> dict[str, torch.Tensor]:
    """Left-padded: one 56 px image (16 patches -> 4 tokens); two images (4 + 1 tokens); text only."""
    rows = [[1, *image(4), 5, 6, 7], [1, *image(4), 8, *image(1), 9, 10], [1, 11, 12, 13]]
    length = max(len(row) for row in rows)
    ids = torch.tensor([[0] * (length - len(row)) + row for row in rows])
    torch.manual_seed(1)
    return {
        "input_ids": ids,
        "attention_mask": (torch.arange(length) >= torch.tensor([[length - len(row)] for row in rows])).long(),
        "pixel_values": torch.randn(16 + 16 + 4, PATCH_FEATURES),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4], [1, 2, 2]]),
    }


T2V = CompressionConfig("qwen_t2v", t2v=T2VConfig((0.5, 0.75), (0.5, 0.25), "instruction"))


def test_uncompressed_logits_equal_transformers_model():
    hf = tiny_qwen()
    inputs = batch()
    types = (inputs["input_ids"] == IMAGE).int()
    expected = hf(**inputs, mm_token_type_ids=types).logits
    ours = DuetQwenVL(hf)(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ours - expected)[real].abs().max() <= 1e-4


def test_greedy_generation_equals_transformers_generate_when_uncompressed():
    hf = tiny_qwen()
    inputs = batch()
    ours = DuetQwenVL(hf).generate(**inputs, max_new_tokens=6, eos_token_id=[], fast=False)
    theirs = hf.generate(
        **inputs, mm_token_type_ids=(inputs["input_ids"] == IMAGE).int(), max_new_tokens=6, min_new_tokens=6,
        do_sample=False,
    )  # fmt: skip
    assert torch.equal(ours, theirs[:, inputs["input_ids"].shape[1] :])


def test_sampling_options_and_the_shared_contract():
    model = DuetQwenVL(tiny_qwen(), T2V)
    assert isinstance(model, VisionLanguageModel)
    assert set(FORWARD_KEYWORDS) <= set(inspect.signature(model.forward).parameters)
    inputs = batch()
    by_keywords = model.generate(**inputs, max_new_tokens=4, eos_token_id=[], fast=False)
    sampling = SamplingOptions(max_new_tokens=4, eos_token_id=[], fast=False)
    assert torch.equal(model.generate(**inputs, sampling=sampling), by_keywords)
    with pytest.raises(TypeError, match="max_new_token"):
        model.generate(**inputs, max_new_token=4)


def test_keep_counts_are_relative_to_n0_and_do_not_compound():
    model = DuetQwenVL(tiny_qwen(), T2V)
    inputs = batch()
    # Row 1 alone: two images, N0 = 5 visual tokens. Stage 1 keeps floor(0.5 * 5) = 2, stage 2 keeps
    # floor(0.25 * 5) = 1; compounding (0.25 of the 2 survivors) would keep 0.
    row = {key: value for key, value in inputs.items() if key != "pixel_values" and key != "image_grid_thw"}
    row = {key: value[1:2] for key, value in row.items()}
    row["pixel_values"], row["image_grid_thw"] = inputs["pixel_values"][16:], inputs["image_grid_thw"][1:]
    per_layer = model(**row).visual_tokens_per_layer
    assert [count * 2 for count in per_layer] == [5, 5, 2, 1]  # per layer, summed over the row's 2 images


def test_t2v_generation_matches_recomputation_fast_path_and_single_samples():
    model = DuetQwenVL(tiny_qwen(), T2V)
    inputs = batch()
    options = dict(max_new_tokens=6, eos_token_id=[])
    cached = model.generate(**inputs, fast=False, **options)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **options))
    assert torch.equal(cached, model.generate(**inputs, fast=True, **options))
    pixel_rows = [(slice(0, 16), slice(0, 1)), (slice(16, 36), slice(1, 3)), None]
    for index, pixels in enumerate(pixel_rows):
        keep = inputs["attention_mask"][index].bool()
        single = {"input_ids": inputs["input_ids"][index : index + 1, keep]}
        if pixels is not None:
            single["pixel_values"] = inputs["pixel_values"][pixels[0]]
            single["image_grid_thw"] = inputs["image_grid_thw"][pixels[1]]
        assert torch.equal(model.generate(**single, **options)[0], cached[index])


VIDEO = 151


def video_batch() -> dict[str, torch.Tensor]:
    """Left-padded: a video of 2 temporal patches (8 tokens); an image and a 1-step video; text only."""
    segment = lambda token, count: [START] + [token] * count + [END]  # noqa: E731
    rows = [[1, *segment(VIDEO, 8), 5, 6, 7, 8], [1, *segment(IMAGE, 4), 8, *segment(VIDEO, 4), 9, 10], [1, 11, 12]]
    length = max(len(row) for row in rows)
    torch.manual_seed(2)
    return {
        "input_ids": torch.tensor([[0] * (length - len(row)) + row for row in rows]),
        "attention_mask": (torch.arange(length) >= torch.tensor([[length - len(row)] for row in rows])).long(),
        "pixel_values": torch.randn(16, PATCH_FEATURES),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
        "pixel_values_videos": torch.randn(32 + 16, PATCH_FEATURES),
        "video_grid_thw": torch.tensor([[2, 4, 4], [1, 4, 4]]),
        "second_per_grid_ts": torch.tensor([0.5, 2.0]),  # temporal positions spaced by real time
    }


def test_videos_equal_transformers_model_uncompressed_and_generate_consistently_compressed():
    hf = tiny_qwen()
    inputs = video_batch()
    types = (inputs["input_ids"] == IMAGE).int() + 2 * (inputs["input_ids"] == VIDEO).int()
    real = inputs["attention_mask"].bool()
    assert (DuetQwenVL(hf)(**inputs).logits - hf(**inputs, mm_token_type_ids=types).logits)[real].abs().max() <= 1e-4
    theirs = hf.generate(**inputs, mm_token_type_ids=types, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    ours = DuetQwenVL(hf).generate(**inputs, max_new_tokens=5, eos_token_id=[], fast=False)
    assert torch.equal(ours, theirs[:, inputs["input_ids"].shape[1] :])

    model = DuetQwenVL(tiny_qwen(), "qwen_duet_53")
    options = dict(max_new_tokens=5, eos_token_id=[])
    cached = model.generate(**inputs, fast=False, **options)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **options))
    assert torch.equal(cached, model.generate(**inputs, fast=True, **options))
    keep = inputs["attention_mask"][0].bool()
    alone = {"input_ids": inputs["input_ids"][:1, keep], "pixel_values_videos": inputs["pixel_values_videos"][:32]}
    alone |= {"video_grid_thw": inputs["video_grid_thw"][:1], "second_per_grid_ts": inputs["second_per_grid_ts"][:1]}
    assert torch.equal(model.generate(**alone, **options)[0], cached[0])


def test_video_frames_take_qwens_patch_layout_with_consecutive_frames_on_the_temporal_axis(qwen_checkpoint):
    import numpy as np
    from PIL import Image

    from llava.data.qwen_video import frames_to_patches, load_qwen_video
    from llava.hf_adapter import load_image_processor

    processor = load_image_processor(str(qwen_checkpoint))
    rng = np.random.default_rng(0)
    first, second = (Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)) for _ in range(2))
    # Two copies of one frame are exactly the image processor's layout of that frame (it repeats images in time).
    pixels, grid = frames_to_patches([first, first], processor)
    image = processor(images=[first], return_tensors="pt")
    assert torch.equal(pixels, image["pixel_values"]) and grid.tolist() == image["image_grid_thw"][0].tolist()
    pixels, grid = frames_to_patches([first, second, second], processor)  # padded to 4 frames: 2 steps
    assert grid[0] == 2
    steps = pixels.view(2, -1, 3, 2, 14, 14)
    frame = lambda picture: processor(images=[picture], return_tensors="pt")["pixel_values"].view(-1, 3, 2, 14, 14)  # noqa: E731
    assert torch.equal(steps[0, :, :, 0], frame(first)[:, :, 0]) and torch.equal(
        steps[0, :, :, 1], frame(second)[:, :, 0]
    )
    video = load_qwen_video(qwen_checkpoint / "clip.mp4", processor, num_frames=4)
    assert video.second_per_grid == pytest.approx(2 * 1.5 / 4)  # 6 frames at 4 fps, 4 sampled, 2 per step


def test_unsupported_settings_are_refused():
    model = DuetQwenVL(tiny_qwen())
    with pytest.raises(ValueError, match="not 'visionzip'"):
        model.set_compression(CompressionConfig("x", v2v=V2VConfig("visionzip", 4, 2)))
    with pytest.raises(ValueError, match="DyMU"):
        model.set_compression(CompressionConfig("x", dymu=DyMUConfig((0.5,))))
    with pytest.raises(ValueError, match="position_mode"):
        model.set_compression(CompressionConfig("x", t2v=T2VConfig((0.5,), (0.5,), "last", "compact")))


# ---------------------------------------------------------------- a local Qwen2.5-VL checkpoint end to end


def test_checkpoint_loads_through_the_pipeline_and_answers_in_batches(qwen_checkpoint):
    from llava.families.qwen import QwenVLPipeline
    from llava.inference import load_pipeline

    pipeline = load_pipeline(qwen_checkpoint, device="cpu")
    assert isinstance(pipeline, QwenVLPipeline)
    requests = [
        {"image": str(qwen_checkpoint / "image_0.png"), "prompt": "what colour is the shape"},
        {"image": [str(qwen_checkpoint / "image_1.png"), str(qwen_checkpoint / "image_2.png")], "prompt": "hello"},
        {"image": None, "prompt": "hello there"},
    ]
    inputs = pipeline.prepare(requests)
    # Dynamic resolution: 90x70 -> 84x56 px -> grid 1x4x6 -> 6 tokens; 60x60 -> 56x56 -> 4; 120x80 -> 112x84 -> 12.
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4], [1, 6, 8]]
    image_token = pipeline.model.config.image_token_id
    assert (inputs["input_ids"] == image_token).sum(dim=1).tolist() == [6, 4 + 12, 0]
    assert inputs["attention_mask"][:, -1].all()  # left-padded
    one_by_one = pipeline.generate(requests, max_new_tokens=5, batch_size=1)
    assert pipeline.generate(requests, max_new_tokens=5, batch_size=3) == one_by_one
    compressed = QwenVLPipeline.from_pretrained(qwen_checkpoint, device="cpu", compression=T2V)
    assert compressed.model.stage_plan.boundaries == (2, 3)
    assert compressed.generate(requests, max_new_tokens=5, batch_size=3) == compressed.generate(
        requests, max_new_tokens=5, batch_size=1
    )


def test_pipeline_serves_videos_in_place_of_their_tags_and_batches_them(qwen_checkpoint):
    from llava.families.qwen import QwenVLPipeline

    pipeline = QwenVLPipeline.from_pretrained(qwen_checkpoint, device="cpu", compression="qwen_duet_53", video_frames=4)
    clip, picture = str(qwen_checkpoint / "clip.mp4"), str(qwen_checkpoint / "image_0.png")
    requests = [
        {"video": clip, "prompt": "what happens"},
        {"image": picture, "video": clip, "prompt": "compare <image> with <video>"},
        {"prompt": "hello there"},
    ]
    inputs = pipeline.prepare(requests)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6], [2, 4, 6]]  # 4 frames of 84x56 -> 2 steps of 4x6
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([0.75, 0.75])
    config = pipeline.model.config
    tokens = pipeline.tokenizer.convert_ids_to_tokens(inputs["input_ids"][1][inputs["attention_mask"][1].bool()])
    visual = [token for token in tokens if token in ("<|image_pad|>", "<|video_pad|>")]
    assert visual == ["<|image_pad|>"] * 6 + ["<|video_pad|>"] * 12  # in the order of the tags
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == 24
    assert pipeline.generate(requests, max_new_tokens=4, batch_size=3) == pipeline.generate(
        requests, max_new_tokens=4, batch_size=1
    )
    with pytest.raises(ValueError, match="prompt holds 2 <video> tags but 1 videos"):
        pipeline.prepare([{"video": clip, "prompt": "<video> and <video>"}])


def test_generate_cli_answers_with_a_qwen_checkpoint(qwen_checkpoint, capsys):
    from llava.tools import generate as generate_cli

    argv = ["--model", str(qwen_checkpoint), "--image", str(qwen_checkpoint / "image_0.png"), "--prompt", "hi",
            "--max-new-tokens", "3", "--device", "cpu"]  # fmt: skip
    assert generate_cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("[0]")


# ---------------------------------------------------------------- V2V on the merged tokens


def test_token_scores_follow_the_window_order_back_to_raster_order_and_match_an_eager_reference(monkeypatch):
    """A 112 px image (8 x 8 patches, 4 x 4 merged tokens) spans four 56 px attention windows, so the vision
    transformer runs its tokens in window order; scores come back in raster order, per image."""
    from llava.compression import qwen_v2v
    from llava.hf_adapter import qwen_vision_layout, qwen_vision_rotary, qwen_visual_embeddings

    hf = tiny_qwen()
    torch.manual_seed(2)
    grid = torch.tensor([[1, 8, 8], [1, 4, 4]])
    pixels = torch.randn(64 + 16, PATCH_FEATURES)
    window_index, unit, index, block = qwen_vision_layout(hf, grid)
    assert not torch.equal(window_index[:16], torch.arange(16))  # the windows do reorder the first image
    _, captured = qwen_visual_embeddings(hf, pixels, grid, capture_block=index)
    monkeypatch.setattr(qwen_v2v, "QUERY_CHUNK", 5)  # chunked softmax rows must not change the sums
    scores, keys = qwen_v2v.token_scores(block, captured, window_index, unit)
    # Eager reference: the whole [heads, n, n] map per image, then window -> raster by transformers' argsort.
    hidden = block.norm1(captured["hidden_states"])
    qkv = block.attn.qkv(hidden).reshape(hidden.shape[0], 3, block.attn.num_heads, -1).permute(1, 0, 2, 3)
    query, key = qwen_vision_rotary(qkv[0], qkv[1], *captured["position_embeddings"])
    expected = []
    for start, end in ((0, 64), (64, 80)):
        q, k = query[start:end].transpose(0, 1), key[start:end].transpose(0, 1)
        probs = torch.softmax(q @ k.transpose(1, 2) * block.attn.scaling, dim=-1)
        expected.append(probs.sum(dim=1).mean(dim=0))
    merged = torch.cat(expected).view(-1, unit).mean(dim=1)[torch.argsort(window_index)]
    torch.testing.assert_close(scores, merged, atol=1e-5, rtol=1e-5)
    assert keys.shape == (20, key.shape[-1])


def test_v2v_keeps_each_images_budget_with_positions_and_generates_consistently():
    compression = CompressionConfig(
        "qwen_duet", v2v=V2VConfig("duet", 0.5, 0.25), t2v=T2VConfig((0.5, 0.75), (0.5, 0.25), "instruction")
    )
    model = DuetQwenVL(tiny_qwen(), compression)
    inputs = batch()
    v2v_only = DuetQwenVL(model.hf_model, CompressionConfig("v", v2v=V2VConfig("duet", 0.5, 0.25)))
    out = v2v_only(**inputs)
    # Images of 4, 4 and 1 tokens keep floor(0.5 n) + floor(0.25 n) (at least one): 3, 3, 1.
    assert out.visual_tokens_per_layer[0] * 3 == pytest.approx(7)
    assert out.attention_mask.shape[1] == inputs["input_ids"].shape[1] - 1  # the two-image row lost one token
    # Survivors keep their M-RoPE positions: every kept position is one of the full sequence's positions.
    full = DuetQwenVL(model.hf_model)(**inputs).position_ids
    for row in range(3):
        kept = {tuple(p) for p in out.position_ids[row][out.attention_mask[row].bool()].tolist()}
        assert kept <= {tuple(p) for p in full[row][inputs["attention_mask"][row].bool()].tolist()}
    options = dict(max_new_tokens=6, eos_token_id=[])
    cached = model.generate(**inputs, fast=False, **options)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **options))
    assert torch.equal(cached, model.generate(**inputs, fast=True, **options))
    single = model.generate(
        inputs["input_ids"][:1, 3:], None, inputs["pixel_values"][:16], inputs["image_grid_thw"][:1], **options
    )
    assert torch.equal(single[0], cached[0])


def test_qwen_presets_reach_the_papers_reductions():
    from llava.compression.accounting import visual_token_reduction
    from llava.compression.config import load_compression

    assert visual_token_reduction(load_compression("qwen_duet_53"), 28, 1000) == pytest.approx(0.519, abs=0.001)
    assert visual_token_reduction(load_compression("qwen_duet_67"), 28, 1000) == pytest.approx(0.670, abs=0.001)
    DuetQwenVL(tiny_qwen(), "qwen_duet_53")  # the presets load on a Qwen model


def test_qwen_benchmark_flop_model_and_a_tiny_timed_run(tmp_path):
    from llava.bench import qwen_speed

    rows = qwen_speed.main(["--flops-only", "--batch-sizes", "1", "--out", str(tmp_path / "flops.json")])
    by_preset = {row["preset"]: row for row in rows}
    # 1008 x 756 px: 72 x 54 patches, 972 merged tokens; qwen_duet_53 keeps floor(0.65 n) + floor(0.05 n) = 679,
    # then 339 from layer 14 and 169 from layer 21 of 28.
    assert by_preset["none"]["visual tok/layer"] == 972
    assert by_preset["qwen_duet_53"]["visual tok/layer"] == pytest.approx((679 * 14 + 339 * 7 + 169 * 7) / 28)
    assert 1.0 > by_preset["qwen_duet_53"]["flops_ratio_vs_none"] > by_preset["qwen_duet_67"]["flops_ratio_vs_none"]
    timed = qwen_speed.main(
        ["--shape", "qwen-tiny", "--batch-sizes", "2", "--image-size", "112x112", "--prompt-tokens", "6",
         "--new-tokens", "3", "--repeats", "1", "--device", "cpu", "--presets", "none,qwen_duet_53",
         "--out", str(tmp_path / "tiny.json")]
    )  # fmt: skip
    assert [(row["preset"], row["path"]) for row in timed] == [
        ("none", "eager"), ("qwen_duet_53", "eager"), ("none", "fast"), ("qwen_duet_53", "fast")
    ]  # fmt: skip
    assert all(row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0 for row in timed)


def reference_select(embeds, scores, keys, counts, v2v):
    """DUET's selection one image at a time (the straightforward loop the batched version replaces)."""
    from llava.compression.v2v import merge_into_anchors, split_anchors

    keep = torch.zeros(embeds.shape[0], dtype=torch.bool)
    values = embeds.clone()
    start = 0
    for count in counts:
        dominant, contextual = v2v.budget(count)
        ranked = scores[start : start + count].argsort(descending=True, stable=True)
        keep[start + ranked[:dominant]] = True
        pool = ranked[dominant : dominant + min(v2v.cluster_width * contextual, count - dominant)]
        if contextual and pool.numel():
            anchor_ranks, member_ranks = split_anchors(pool.numel(), contextual, pool.device)
            anchors, members = pool[anchor_ranks], pool[member_ranks]
            image = slice(start, start + count)
            merged = merge_into_anchors(embeds[image][None], keys[image][None], anchors[None], members[None])
            values[start + anchors] = merged[0]
            keep[start + anchors] = True
        start += count
    return keep, values


@pytest.mark.parametrize(
    "v2v", [V2VConfig("duet", 0.65, 0.05), V2VConfig("duet", 0.3, 0.2, 2), V2VConfig("duet", 3, 2)]
)
def test_batched_v2v_selection_equals_selecting_each_image_alone(v2v):
    from llava.compression.qwen_v2v import select_tokens

    counts = [1, 7, 40, 16, 3, 97]  # one-token images, fractions that floor to 0 contextual, ragged pools
    torch.manual_seed(5)
    total = sum(counts)
    embeds, keys = torch.randn(total, 8), torch.randn(total, 4)
    scores = torch.randint(0, 5, (total,)).float()  # many ties: the stable order must match too
    keep, values = select_tokens(embeds, scores, keys, counts, v2v)
    expected_keep, expected_values = reference_select(embeds, scores, keys, counts, v2v)
    assert torch.equal(keep, expected_keep)
    assert torch.allclose(values, expected_values, atol=1e-6)
    kept_per_image = [int(part.sum()) for part in keep.split(counts)]
    assert all(kept >= 1 for kept in kept_per_image) and kept_per_image[-1] < counts[-1]
