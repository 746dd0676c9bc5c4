"""LLaVA-OneVision (SigLIP, ``anyres_max_9``, Qwen2, pooled video frames) through DuetLlavaNext and the shared
decoder loop: equality with transformers' model when uncompressed (images alone and several per prompt, a
downsized large image, videos, left padding, a text-only row), T2V keep counts relative to each sample's N0,
batched, cached and fast generation equal to one-by-one and recomputed; the family's pipeline end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.hf_adapter import (
    llava_next_views_per_image,
    llava_onevision_image_features,
    llava_onevision_tokens_per_image,
    llava_onevision_video_features,
    llava_onevision_video_tokens,
    set_attn_implementation,
)
from llava.model.llava_next import DuetLlavaNext

IMAGE, VIDEO = 100, 101  # the tiny model's placeholder ids
VIEW = 42  # SigLIP input size: 3 x 3 patches of 14 px per view (9 tokens; a pooled video frame keeps 2 x 2)
PINPOINTS = [[42, 84], [84, 42], [84, 84], [168, 168]]  # (height, width); 168 x 168: a 4 x 4 tile grid
WIDE, TALL, LARGE, TALLER = [20, 50], [50, 20], [160, 160], [150, 100]  # original (height, width)
FRAMES = 3
T2V = CompressionConfig("ov_t2v", t2v=T2VConfig((0.5,), (0.5,), "instruction"))


def tiny_onevision_config() -> LlavaOnevisionConfig:
    """Tiny SigLIP (42 px views, no CLS token: the ``full`` strategy) + tiny Qwen2, SDPA everywhere."""
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=VIEW,
            patch_size=14,
        ).to_dict(),
        text_config=Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ).to_dict(),
        image_grid_pinpoints=PINPOINTS, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip
    for part in (config, config.text_config, config.vision_config):
        set_attn_implementation(part, "sdpa")
    return config


def tiny_onevision() -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration(tiny_onevision_config()).eval()


# Rows: a wide image alone; a tall and a large image together (base views only); text only; a large image alone
# (4 x 4 tiles, downsized past anyres_max_9's cap) and a video; a taller image alone and a video.
ROW_IMAGES = [[WIDE], [TALL, LARGE], [], [LARGE], [TALLER]]
ROW_VIDEOS = [0, 0, 0, 1, 1]


def visual_inputs(hf: LlavaOnevisionForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Pixels as the processor lays them out: ``[images, max views, 3, 42, 42]`` zero-padded past each image's
    views (one view for an image of a multi-image sample), ``batch_num_images`` of the rows with images."""
    torch.manual_seed(1)
    sizes = torch.tensor([size for row in ROW_IMAGES for size in row])
    batch_num_images = torch.tensor([len(row) for row in ROW_IMAGES if row])
    alone = [count == 1 for count in batch_num_images.tolist() for _ in range(count)]
    views = [views_of(hf, size) if single else 1 for size, single in zip(sizes, alone, strict=True)]
    pixels = torch.zeros(len(sizes), max(views), 3, VIEW, VIEW)
    for index, count in enumerate(views):
        pixels[index, :count] = torch.randn(count, 3, VIEW, VIEW)
    return {
        "pixel_values": pixels,
        "image_sizes": sizes,
        "batch_num_images": batch_num_images,
        "pixel_values_videos": torch.randn(sum(ROW_VIDEOS), FRAMES, 3, VIEW, VIEW),
    }


def views_of(hf: LlavaOnevisionForConditionalGeneration, size: torch.Tensor) -> int:
    """Views (base view plus AnyRes tiles) the processor makes for an image alone in its sample."""
    return llava_next_views_per_image(hf, size[None])[0]


def batch(hf: LlavaOnevisionForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Left-padded rows of ``ROW_IMAGES``/``ROW_VIDEOS``: images, then videos, then text (OneVision's template)."""
    visual = visual_inputs(hf)
    counts = iter(llava_onevision_tokens_per_image(hf, visual["image_sizes"], visual["batch_num_images"]))
    video_tokens = llava_onevision_video_tokens(hf, FRAMES)
    rows = []
    for index, (images, videos) in enumerate(zip(ROW_IMAGES, ROW_VIDEOS, strict=True)):
        row = [1]
        for _ in images:
            row += [IMAGE] * next(counts)
        row += [VIDEO] * video_tokens * videos
        rows.append([*row, 5 + index, 6, 7 + index])
    length = max(len(row) for row in rows)
    return {
        "input_ids": torch.tensor([[0] * (length - len(row)) + row for row in rows]),
        "attention_mask": (torch.arange(length) >= torch.tensor([[length - len(row)] for row in rows])).long(),
        **visual,
    }


def single(inputs: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Row ``index`` of :func:`batch` alone, without padding, with its own images and videos."""
    keep = inputs["attention_mask"][index].bool()
    out = {"input_ids": inputs["input_ids"][index : index + 1, keep]}
    start = sum(len(row) for row in ROW_IMAGES[:index])
    images = slice(start, start + len(ROW_IMAGES[index]))
    if ROW_IMAGES[index]:
        out["pixel_values"] = inputs["pixel_values"][images]
        out["image_sizes"] = inputs["image_sizes"][images]
        out["batch_num_images"] = torch.tensor([len(ROW_IMAGES[index])])
    if ROW_VIDEOS[index]:
        first = sum(ROW_VIDEOS[:index])
        out["pixel_values_videos"] = inputs["pixel_values_videos"][first : first + ROW_VIDEOS[index]]
    return out


def hf_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def test_token_counts_follow_onevisions_layout():
    hf = tiny_onevision()
    visual = visual_inputs(hf)
    with torch.no_grad():
        features = llava_onevision_image_features(
            hf, visual["pixel_values"], visual["image_sizes"], visual["batch_num_images"]
        )
        videos = llava_onevision_video_features(hf, visual["pixel_values_videos"])
    # Base view 9 tokens. Wide 1x2 tiles -> 3x6 patches unpadded to 2 rows of 6 (+2 newlines): 9 + 14 = 23... as
    # transformers counts: multi-image views are 9 + 1 newline; the 4x4-tile large image is 12x12 = 144 > 1.1^2 * 81
    # tokens, so downsized to 9x9 (+9 newlines); the taller one (12x8 = 96) is under the cap and keeps its tiles.
    counts = [int(part.shape[0]) for part in features]
    assert counts == [30, 10, 10, 99, 117]
    assert counts == llava_onevision_tokens_per_image(hf, visual["image_sizes"], visual["batch_num_images"])
    assert videos.shape[:2] == (2, FRAMES * 4 + 1) and llava_onevision_video_tokens(hf, FRAMES) == 13


def test_uncompressed_logits_equal_transformers_model():
    hf = tiny_onevision()
    inputs = batch(hf)
    with torch.no_grad():
        expected = hf(**inputs, position_ids=hf_positions(inputs["attention_mask"])).logits
        ours = DuetLlavaNext(hf)(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert (ours - expected)[real].abs().max() <= 1e-4


def test_uncompressed_bf16_logits_equal_transformers_model_in_bf16():
    hf = tiny_onevision().to(torch.bfloat16)
    inputs = batch(hf)
    for key in ("pixel_values", "pixel_values_videos"):
        inputs[key] = inputs[key].to(torch.bfloat16)
    with torch.no_grad():
        expected = hf(**inputs, position_ids=hf_positions(inputs["attention_mask"])).logits
        ours = DuetLlavaNext(hf)(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert ours.dtype == torch.bfloat16
    assert (ours - expected)[real].float().abs().max() <= 1e-2 * expected[real].float().abs().max()


def test_greedy_generation_equals_transformers_generate_eager_and_fast():
    hf = tiny_onevision()
    inputs = batch(hf)
    theirs = hf.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    theirs = theirs[:, inputs["input_ids"].shape[1] :]
    model = DuetLlavaNext(hf)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, eos_token_id=[], fast=False), theirs)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, eos_token_id=[], fast=True), theirs)


def test_keep_counts_are_relative_to_each_samples_n0():
    model = DuetLlavaNext(tiny_onevision(), T2V)
    inputs = batch(model.hf_model)
    with torch.no_grad():
        kept = model(**inputs).attention_mask.sum(dim=1).tolist()
        per_layer = model(**single(inputs, 3)).visual_tokens_per_layer
    n0 = [30, 20, 0, 99 + 13, 117 + 13]  # newline tokens included; a video's tokens count too
    full = inputs["attention_mask"].sum(dim=1).tolist()
    assert [before - after for before, after in zip(full, kept, strict=True)] == [count // 2 for count in n0]
    # Row 3 alone: one image and one video (2 segments), the average per segment before and after the boundary.
    assert [round(count * 2) for count in per_layer] == [n0[3], n0[3], n0[3] // 2, n0[3] // 2]


def test_t2v_generation_matches_recomputation_fast_path_and_single_samples():
    model = DuetLlavaNext(tiny_onevision(), T2V)
    inputs = batch(model.hf_model)
    options = dict(max_new_tokens=5, eos_token_id=[])
    cached = model.generate(**inputs, fast=False, **options)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **options))
    assert torch.equal(cached, model.generate(**inputs, fast=True, **options))
    for index in range(len(ROW_IMAGES)):
        assert torch.equal(model.generate(**single(inputs, index), fast=False, **options)[0], cached[index])


def test_unsupported_settings_and_mismatches_are_refused():
    model = DuetLlavaNext(tiny_onevision())
    with pytest.raises(ValueError, match="must be fractions"):  # V2V: tests/test_llava_onevision_v2v.py
        model.set_compression(CompressionConfig("x", v2v=V2VConfig("duet", 64, 16)))
    inputs = batch(model.hf_model)
    with pytest.raises(ValueError, match="video placeholders but the 1 videos"):
        model(**inputs | {"pixel_values_videos": inputs["pixel_values_videos"][:1]})
    with pytest.raises(ValueError, match="video placeholders but no pixel_values_videos"):
        model(**{key: value for key, value in inputs.items() if key != "pixel_values_videos"})


# ---------------------------------------------------------------- the family


def test_registry_dispatches_llava_onevision_checkpoints(tmp_path):
    from llava.families.llava_next import LlavaNextFamily
    from llava.families.llava_onevision import LlavaOnevisionFamily
    from llava.families.registry import family_for, family_of_model

    tiny_onevision_config().save_pretrained(tmp_path)
    family = family_for(tmp_path)
    assert isinstance(family, LlavaOnevisionFamily)
    assert family_for("llava-hf/llava-onevision-qwen2-7b-ov-hf", offline=True) is family
    model = family.random_model(tiny_onevision_config().to_dict(), torch.float32, "cpu", "sdpa")
    assert isinstance(model, DuetLlavaNext) and family_of_model(model) is family
    # The two AnyRes families share DuetLlavaNext: the model's config decides.
    next_config = {"vision_config": {"model_type": "clip_vision_model", "image_size": 28, "hidden_size": 32,
                   "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "patch_size": 14},
                   "text_config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 128}}  # fmt: skip
    next_model = LlavaNextFamily().random_model(next_config, torch.float32, "cpu", "sdpa")
    assert isinstance(family_of_model(next_model), LlavaNextFamily)


# ---------------------------------------------------------------- a local LLaVA-OneVision checkpoint end to end

CHAT_TEMPLATE = (  # OneVision's: the images, then the videos, then the text of each turn
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + item['text'] }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
VIDEO_SETTINGS = {  # as the Hub's video_preprocessor_config.json, at the tiny view size
    "video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": VIEW, "width": VIEW}, "resample": 3,
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
}  # fmt: skip


@pytest.fixture(scope="module")
def onevision_checkpoint(tmp_path_factory):
    """The tiny LLaVA-OneVision saved like the Hub's: weights, a locally trained tokenizer with ``<image>`` and
    ``<video>``, OneVision's image processor (AnyRes), the processor's chat template and video settings (the
    video processor itself needs torchvision); wide, tall and large images, two short videos."""
    from PIL import Image
    from transformers import LlavaOnevisionImageProcessorPil

    from llava.data.video import write_video
    from llava.playground.tokenizer import train_playground_tokenizer

    out = tmp_path_factory.mktemp("llava_onevision")
    tokenizer = train_playground_tokenizer(["what colour is the shape", "a red square", "hello there"] * 40, 300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    image_processor = LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=PINPOINTS, size={"height": VIEW, "width": VIEW}
    )
    model = tiny_onevision()
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model.config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_SETTINGS), encoding="utf-8")
    for index, size in enumerate([(90, 40), (40, 90), (160, 160)]):  # (width, height)
        Image.new("RGB", size, (40 * index, 200, 30)).save(out / f"image_{index}.png")
    for index in range(2):
        frames = [Image.new("RGB", (48, 40), (30 * step, 20 * index, 90)) for step in range(6)]
        write_video(out / f"video_{index}.mp4", frames)
    return out


def test_checkpoint_loads_through_the_pipeline_and_answers_images_and_videos_in_batches(onevision_checkpoint):
    from llava.families.llava_onevision import LlavaOnevisionPipeline
    from llava.inference import load_pipeline

    assert isinstance(load_pipeline(onevision_checkpoint, device="cpu"), LlavaOnevisionPipeline)
    pipeline = LlavaOnevisionPipeline.from_pretrained(onevision_checkpoint, device="cpu", video_frames=4)
    path = lambda name: str(onevision_checkpoint / name)  # noqa: E731
    requests = [
        {"image": path("image_0.png"), "prompt": "what colour is the shape"},
        {"image": [path("image_1.png"), path("image_2.png")], "prompt": "hello"},
        {"image": None, "prompt": "hello there"},
        {"video": path("video_0.mp4"), "prompt": "what colour is the shape"},
        {"image": path("image_2.png"), "video": path("video_1.mp4"), "prompt": "a red square"},
    ]
    inputs = pipeline.prepare(requests)
    assert inputs["image_sizes"].tolist() == [[40, 90], [90, 40], [160, 160], [160, 160]]
    assert inputs["batch_num_images"].tolist() == [1, 2, 1]
    assert inputs["pixel_values_videos"].shape == (2, 4, 3, VIEW, VIEW)
    assert inputs["attention_mask"][:, -1].all()  # left-padded
    config = pipeline.model.config
    # The placeholders are the lengths of the model's own features: the wide image on a 4 x 4 tile grid unpadded to
    # 6 rows of 12 (+6 newlines), two base views of 9 + 1, the large image downsized past anyres_max_9; 4 x 4 + 1.
    with torch.no_grad():
        features = llava_onevision_image_features(
            pipeline.model.hf_model, inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"]
        )
    assert [int(part.shape[0]) for part in features] == [87, 10, 10, 99]
    assert (inputs["input_ids"] == config.image_token_id).sum(dim=1).tolist() == [87, 20, 0, 0, 99]
    assert (inputs["input_ids"] == config.video_token_id).sum(dim=1).tolist() == [0, 0, 0, 17, 17]
    # What the pipeline prepares is what transformers' own model takes: the same logits.
    with torch.no_grad():
        positions = hf_positions(inputs["attention_mask"])
        expected = pipeline.model.hf_model(**inputs, position_ids=positions).logits
        ours = pipeline.model(**inputs).logits
    assert (ours - expected)[inputs["attention_mask"].bool()].abs().max() <= 1e-4
    one_by_one = pipeline.generate(requests, max_new_tokens=4, batch_size=1)
    assert pipeline.generate(requests, max_new_tokens=4, batch_size=5) == one_by_one
    compressed = LlavaOnevisionPipeline.from_pretrained(
        onevision_checkpoint, device="cpu", compression=T2V, video_frames=4
    )
    assert compressed.model.stage_plan.boundaries == (2,)
    for loaded in (pipeline, compressed):
        batched = loaded.model.generate(**inputs, max_new_tokens=4, eos_token_id=[])
        for index, request in enumerate(requests):
            alone = loaded.model.generate(**loaded.prepare([request]), max_new_tokens=4, eos_token_id=[])
            assert torch.equal(alone[0], batched[index])
