"""Video-LLaVA data: ``video`` fields and ``<video>`` tags, tokenization and truncation with video slots,
mixed text/image/video batches, and clear errors for bad videos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.dataset import DataArguments, DataError, LazySupervisedDataset, SkippedSample, normalise_sample
from llava.data.templates import VICUNA_SYSTEM, conversation_to_turns, get_template
from llava.data.tokenization import tokenize_conversation, truncate
from llava.data.video import write_video
from llava.playground.tiny_models import build_clip_image_processor
from llava.playground.tokenizer import train_playground_tokenizer

FRAMES = 4


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two short videos, one too-short video, a corrupt one and an image, in separate folders."""
    root = tmp_path_factory.mktemp("media")
    videos, images = root / "videos", root / "images"
    videos.mkdir()
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, count in (("a.mp4", 10), ("b.mp4", 6), ("short.mp4", 2)):
        write_video(videos / name, [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(count)])
    (videos / "corrupt.mp4").write_bytes(b"not a video at all" * 10)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / "red.png")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [
        VICUNA_SYSTEM,
        "USER: What moves? Colour? Same? What is red? ASSISTANT: a red square blood. A circle moves left.",
    ]
    return train_playground_tokenizer(corpus * 4, vocab_size=400)


def write_json(path, samples):
    path.write_text(json.dumps(samples))
    return str(path)


def make_dataset(media, samples, tmp_path, tokenizer, **overrides):
    args = DataArguments(
        data_path=[write_json(tmp_path / "data.json", samples)],
        image_folder=str(media / "images"),
        video_folder=str(media / "videos"),
        num_frames=FRAMES,
        tokens_per_image=5,
        tokens_per_video=FRAMES * 3,
        model_max_length=400,
        **overrides,
    )
    return LazySupervisedDataset(args, tokenizer, build_clip_image_processor(56))


def qa(question: str, answer: str = "a red square") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_untagged_video_and_image_get_tags_video_first():
    sample = normalise_sample(
        {"video": "a.mp4", "image": "red.png", "conversations": qa("What moves?")}, get_template("v1")
    )
    assert sample["videos"] == ["a.mp4"] and sample["images"] == ["red.png"]
    assert sample["conversations"][0]["value"] == "<video>\n<image>\nWhat moves?"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"video": "a.mp4", "conversations": qa("<video> and <video>")}, "2 <video> tags but 1 videos"),
        ({"video": ["a.mp4", "b.mp4"], "conversations": qa("<video> what?")}, "cannot tell which is which"),
        ({"video": 3, "conversations": qa("what?")}, "'video' must be"),
    ],
)
def test_bad_video_fields_are_clear_errors(raw, message):
    with pytest.raises(DataError, match=message):
        normalise_sample(raw, get_template("v1"))


def test_tokenization_places_video_sentinels_and_masks_them(tokenizer):
    turns = conversation_to_turns(get_template("v1"), qa("<video>\nWhat <image> moves?"))
    tokenized = tokenize_conversation(tokenizer, get_template("v1"), turns, tokens_per_image=5, tokens_per_video=12)
    ids = tokenized["input_ids"]
    assert ids.count(VIDEO_TOKEN_ID) == 1 and ids.count(IMAGE_TOKEN_ID) == 1
    assert ids.index(VIDEO_TOKEN_ID) < ids.index(IMAGE_TOKEN_ID)
    labels = np.asarray(tokenized["labels"])
    assert np.all(labels[np.isin(ids, [VIDEO_TOKEN_ID, IMAGE_TOKEN_ID])] == IGNORE_INDEX)
    plain = conversation_to_turns(get_template("plain"), qa("<video>\nignored words", "A circle moves left."))
    assert plain[0].prompt == "<video>"


def test_truncation_counts_video_tokens_and_never_splits_a_video():
    ids = [1, 7, VIDEO_TOKEN_ID, 8, 9, VIDEO_TOKEN_ID, 10]
    labels = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX, 10]
    cut = truncate(ids, labels, max_length=30, tokens_per_image=5, tokens_per_video=20)
    # 2 + 20 + 2 = 24 fit; the second video (20 more) does not: it and what follows are dropped.
    assert cut["input_ids"] == [1, 7, VIDEO_TOKEN_ID, 8, 9]
    assert cut["num_dropped_videos"] == 1 and cut["num_dropped_images"] == 0


def test_dataset_items_hold_video_pixels_and_mixed_batches_collate(media, tmp_path, tokenizer):
    samples = [
        {"id": "vid", "video": "a.mp4", "conversations": qa("<video>\nWhat moves?")},
        {"id": "txt", "conversations": qa("What is red?", "blood")},
        {"id": "img", "image": "red.png", "conversations": qa("<image>\nColour?")},
        {"id": "both", "video": "b.mp4", "image": "red.png", "conversations": qa("<video>\n<image>\nSame?")},
    ]
    dataset = make_dataset(media, samples, tmp_path, tokenizer)
    assert dataset.num_videos.tolist() == [1, 0, 0, 1]
    lengths = dataset.modality_lengths
    assert lengths[1] < 0 < lengths[0] and lengths[3] > lengths[2] > 0  # the video's 12 tokens counted
    items = [dataset[i] for i in range(4)]
    assert items[0]["pixel_values_videos"].shape == (1, FRAMES, 3, 56, 56)
    assert "pixel_values_videos" not in items[1] and "pixel_values" not in items[1]
    batch = DataCollatorForSupervisedDataset(pad_token_id=0)(items)
    assert batch["pixel_values_videos"].shape == (2, FRAMES, 3, 56, 56)
    assert batch["pixel_values"].shape == (2, 3, 56, 56)
    assert int((batch["input_ids"] == VIDEO_TOKEN_ID).sum()) == 2
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2
    # The batch runs through a Video-LLaVA model as one forward pass.
    from tests.test_video_model import video_model

    model = video_model()
    model.config.num_frames = FRAMES
    vocab = model.config.text_config.vocab_size
    batch["input_ids"] = batch["input_ids"].where(batch["input_ids"] < 0, batch["input_ids"] % vocab)
    batch["labels"] = batch["labels"].where(batch["labels"] < 0, batch["labels"] % vocab)
    with torch.no_grad():
        out = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values", "pixel_values_videos")}
        )
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    ("video", "message"), [("missing.mp4", "not found"), ("corrupt.mp4", "corrupt.mp4"), ("short.mp4", "short")]
)
def test_bad_videos_name_the_file_and_sample(media, tmp_path, tokenizer, video, message):
    samples = [{"id": "bad-one", "video": video, "conversations": qa("<video>\nWhat moves?")}]
    dataset = make_dataset(media, samples, tmp_path, tokenizer)
    with pytest.raises(DataError, match=message) as error:
        dataset[0]
    assert "bad-one" in str(error.value) and "data.json" in str(error.value)
    skipping = make_dataset(media, samples, tmp_path, tokenizer, skip_bad_samples=True)
    skipped = skipping[0]
    assert isinstance(skipped, SkippedSample) and video in skipped.reason
