"""The Video-LLaVA path of the model: video tower, mixed image/video batches, per-frame V2V,
joint T2V over all frames, generation with a video prompt, and the HF Video-LLaVA import."""

from __future__ import annotations

import pytest
import torch
from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.constants import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.hf_adapter import set_attn_implementation
from llava.model.config import DuetLlavaConfig
from llava.model.loading import convert_hf_video_llava
from llava.model.modeling import DuetLlavaForCausalLM
from llava.model.splice import order_visual_segments
from tests.conftest import tiny_text_config, tiny_vision_config

IMG, VID = IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
FRAMES = 3
TOKENS_PER_FRAME = 17  # 56 px / patch 14 = 16 patches + CLS (Video-LLaVA keeps CLS per frame)


def video_model(compression=None, seed: int = 0) -> DuetLlavaForCausalLM:
    torch.manual_seed(seed)
    config = DuetLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        video_config=tiny_vision_config(),
        num_frames=FRAMES,
        compression=compression,
    )
    return DuetLlavaForCausalLM(config).eval()


def test_config_counts_video_tokens():
    config = video_model().config
    assert config.has_video_tower
    assert config.tokens_per_frame == TOKENS_PER_FRAME
    assert config.llm_tokens_per_video == FRAMES * TOKENS_PER_FRAME
    merged = DuetLlavaConfig(
        vision_config=tiny_vision_config(),
        video_config=tiny_vision_config(),
        num_frames=FRAMES,
        compression=CompressionConfig("v", v2v=V2VConfig("duet", 5, 2)),
    )
    assert merged.llm_tokens_per_video == FRAMES * 7
    assert not DuetLlavaConfig(vision_config=tiny_vision_config()).has_video_tower


def test_config_round_trip_keeps_video_tower(tmp_path):
    model = video_model()
    model.save_pretrained(tmp_path)
    loaded = DuetLlavaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.video_tower is not None and loaded.config.num_frames == FRAMES
    ids = torch.tensor([[1, VID, 5, 6]])
    videos = torch.randn(1, FRAMES, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(
            model(ids, pixel_values_videos=videos).logits, loaded(ids, pixel_values_videos=videos).logits
        )


def test_order_visual_segments_matches_a_loop():
    torch.manual_seed(0)
    image_counts = torch.tensor([2, 3])
    video_counts = torch.tensor([4, 1, 5])
    images = torch.randn(5, 3)
    videos = torch.randn(10, 3)
    slot_is_video = torch.tensor([True, False, True, True, False])
    embeds, counts = order_visual_segments(slot_is_video, images, image_counts, videos, video_counts)
    image_parts = list(images.split(image_counts.tolist()))
    video_parts = list(videos.split(video_counts.tolist()))
    expected = [video_parts.pop(0) if is_video else image_parts.pop(0) for is_video in slot_is_video.tolist()]
    assert torch.equal(embeds, torch.cat(expected))
    assert counts.tolist() == [4, 2, 1, 5, 3]
    with pytest.raises(ValueError, match="3 image and 2 video slots"):
        order_visual_segments(
            torch.tensor([True, False, False, False, True]), images, image_counts, videos, video_counts
        )


def test_video_becomes_one_segment_of_frames_times_tokens():
    model = video_model()
    ids = torch.tensor([[1, 5, VID, 7, 8]])
    videos = torch.randn(1, FRAMES, 3, 56, 56)
    with torch.no_grad():
        merged = model.embed_inputs(ids, pixel_values_videos=videos)
        frame_features = model.video_tower(videos[0])  # [FRAMES, 17, 32]
        projected = model.projector(frame_features).reshape(-1, 64)
    assert merged.visual_mask.sum().item() == FRAMES * TOKENS_PER_FRAME
    assert merged.inputs_embeds.shape[1] == 4 + FRAMES * TOKENS_PER_FRAME
    # Frame-major order: frame 0's tokens first, then frame 1's, ...
    assert torch.allclose(merged.inputs_embeds[0, 2 : 2 + FRAMES * TOKENS_PER_FRAME], projected, atol=1e-6)


def test_mixed_batch_equals_samples_run_alone():
    """Video+image, text-only and image-only rows in one batch give each row's solo logits."""
    model = video_model()
    torch.manual_seed(1)
    image_a, image_b = torch.randn(2, 3, 56, 56).unbind(0)
    video = torch.randn(1, FRAMES, 3, 56, 56)
    rows = [
        ([1, VID, 5, IMG, 6, 7], {"pixel_values": image_a[None], "pixel_values_videos": video}),
        ([1, 9, 10, 11], {}),
        ([1, IMG, 12, 13], {"pixel_values": image_b[None]}),
    ]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, (tokens, _) in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    with torch.no_grad():
        batched = model(
            ids, attention_mask=mask, pixel_values=torch.stack([image_a, image_b]), pixel_values_videos=video
        ).logits
        for row, (tokens, pixels) in enumerate(rows):
            alone = model(torch.tensor([tokens]), **pixels).logits[0]
            real = int(alone.shape[0])
            assert torch.allclose(batched[row, :real], alone, atol=1e-5), f"row {row}"


def test_videos_without_a_video_tower_are_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="no video tower"):
        tiny_model(torch.tensor([[1, VID, 4]]), pixel_values_videos=torch.randn(1, 2, 3, 56, 56))
    with pytest.raises(ValueError, match="1 video slots but no video pixels"):
        video_model()(torch.tensor([[1, VID, 4]]))


def test_v2v_merges_each_frame_to_its_budget():
    compression = CompressionConfig("v", v2v=V2VConfig("duet", dominant=5, contextual=2))
    model = video_model(compression)
    videos = torch.randn(2, FRAMES, 3, 56, 56)
    with torch.no_grad():
        tokens, counts, *_ = model.encode_videos(videos)
        per_frame = model.video_tower(videos.flatten(0, 1))
    assert counts.tolist() == [FRAMES * 7, FRAMES * 7]
    assert tokens.shape[0] == 2 * FRAMES * 7
    assert per_frame.shape == (2 * FRAMES, 7, 32)  # merged frame by frame, not across frames
    # Merging a frame alone gives the same tokens as inside the batch: no cross-frame mixing.
    with torch.no_grad():
        alone = model.video_tower(videos[1, 2:3])
    assert torch.allclose(per_frame[5], alone[0], atol=1e-5)


def test_t2v_ranks_all_frames_jointly():
    """floor(0.5 * 3 frames * 5 tokens) = 7 survive: more than 3 x floor(0.5 * 5) = 6 per-frame picks."""
    compression = CompressionConfig(
        "j",
        v2v=V2VConfig("duet", dominant=4, contextual=1),
        t2v=T2VConfig(boundaries=(0.5,), keep_ratios=(0.5,), query="instruction"),
    )
    model = video_model(compression)
    ids = torch.tensor([[1, VID, 5, 6, 7, 8]])
    with torch.no_grad():
        out = model(ids, pixel_values_videos=torch.randn(1, FRAMES, 3, 56, 56))
    assert out.visual_tokens_per_layer == [15.0, 15.0, 7.0, 7.0]


def test_cached_generation_with_a_video_prompt_matches_recomputation():
    compression = CompressionConfig(
        "g",
        v2v=V2VConfig("duet", dominant=6, contextual=2),
        t2v=T2VConfig(boundaries=(0.25, 0.75), keep_ratios=(0.5, 0.25), query="instruction"),
    )
    model = video_model(compression, seed=3)
    torch.manual_seed(4)
    ids = torch.tensor([[0, 0, 1, VID, 5, 6, 7], [1, VID, 8, IMG, 9, 10, 11]])
    mask = (ids != 0).long()
    kwargs = dict(
        attention_mask=mask,
        pixel_values=torch.randn(1, 3, 56, 56),
        pixel_values_videos=torch.randn(2, FRAMES, 3, 56, 56),
        max_new_tokens=6,
        eos_token_id=[],
    )
    cached = model.generate(ids, use_cache=True, **kwargs)
    recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, recomputed)


def test_training_batch_without_videos_still_runs_the_video_tower():
    """ZeRO-3 needs every rank to call the same modules: an image-only batch runs the video tower idle."""
    model = video_model().train()
    calls = []
    model.video_tower.vision_model.embeddings.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.tensor([[1, IMG, 5, 6]])
    labels = torch.tensor([[-100, -100, 5, 6]])
    out = model(ids, pixel_values=torch.randn(1, 3, 56, 56), labels=labels)
    out.loss.backward()
    assert calls, "the video tower was skipped"
    assert all(p.grad is not None for p in model.projector.parameters())
    calls.clear()
    with torch.no_grad():
        model(ids, pixel_values=torch.randn(1, 3, 56, 56), labels=labels)
    assert not calls, "no idle video pass is needed without gradients"


def test_hf_video_llava_conversion_matches_logits():
    torch.manual_seed(0)
    hf_config = VideoLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        image_token_index=120,
        video_token_index=121,
    )
    set_attn_implementation(hf_config, "sdpa")
    hf_model = VideoLlavaForConditionalGeneration(hf_config).eval()
    ours = convert_hf_video_llava(hf_model, num_frames=2).eval()
    images = torch.randn(2, 3, 56, 56)
    videos = torch.randn(2, 2, 3, 56, 56)
    ids = torch.tensor([[1, 5, VID, 7, IMG, 9], [1, IMG, VID, 5, 6, 7]])
    expanded = [
        [t for v in row for t in ([121] * 34 if v == VID else [120] * 16 if v == IMG else [v])] for row in ids.tolist()
    ]
    with torch.no_grad():
        expected = hf_model(
            input_ids=torch.tensor(expanded), pixel_values_images=images, pixel_values_videos=videos
        ).logits
        got = ours(ids, pixel_values=images, pixel_values_videos=videos).logits
    assert ours.config.tokens_per_frame == 17 and ours.config.tokens_per_image == 16
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("batch_kind", ["video_only", "image_only", "text_only"])
def test_every_training_batch_backpropagates_through_the_projector_twice(batch_kind):
    """ZeRO-3 matches the ranks' backward passes module by module, so a video-only, image-only or
    text-only batch must run the projector's backward once per modality, like a mixed batch does."""
    model = video_model().train()
    backward_calls = []
    model.projector.register_full_backward_hook(lambda *_: backward_calls.append(1))
    ids = {"video_only": [1, VID, 5, 6], "image_only": [1, IMG, 5, 6], "text_only": [1, 4, 5, 6]}[batch_kind]
    pixels = {
        "video_only": {"pixel_values_videos": torch.randn(1, FRAMES, 3, 56, 56)},
        "image_only": {"pixel_values": torch.randn(1, 3, 56, 56)},
        "text_only": {},
    }[batch_kind]
    out = model(torch.tensor([ids]), labels=torch.tensor([[-100, -100, 5, 6]]), **pixels)
    out.loss.backward()
    assert len(backward_calls) == 2
