"""Dataset, images, collator and sampler: the data side of the batch contract."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from llava.data.collator import AllSamplesSkippedError, DataCollatorForSupervisedDataset
from llava.data.dataset import DataArguments, DataError, LazySupervisedDataset, SkippedSample
from llava.data.images import expand_to_square, load_and_preprocess, processor_background
from llava.data.sampler import ModalityLengthGroupedSampler
from llava.data.templates import VICUNA_SYSTEM
from llava.playground.tokenizer import train_playground_tokenizer

SIZE = 32
COLOURS = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255)}


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [VICUNA_SYSTEM, "USER: What is shown? ASSISTANT: A red square. Compare them. Hello there."]
    return train_playground_tokenizer(corpus * 4, vocab_size=400)


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in COLOURS.items():
        Image.new("RGB", (48, 24), colour).save(folder / name)
    (folder / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    return folder


def qa(question: str = "What is shown?", answer: str = "A red square.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_json(path, samples) -> str:
    path.write_text(json.dumps(samples))
    return str(path)


def make_dataset(tokenizer, processor, image_folder, samples, tmp_path, **overrides) -> LazySupervisedDataset:
    args = DataArguments(
        data_path=[write_json(tmp_path / "data.json", samples)],
        image_folder=str(image_folder),
        model_max_length=overrides.pop("model_max_length", 512),
        tokens_per_image=overrides.pop("tokens_per_image", 16),
        **overrides,
    )
    return LazySupervisedDataset(args, tokenizer, processor)


def test_image_sample_has_one_sentinel_per_image_and_matching_pixels(tokenizer, processor, image_folder, tmp_path):
    samples = [{"id": "two", "image": ["red.png", "green.png"], "conversations": qa("<image> and <image>?")}]
    item = make_dataset(tokenizer, processor, image_folder, samples, tmp_path)[0]
    assert int((item["input_ids"] == IMAGE_TOKEN_ID).sum()) == 2
    assert item["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert item["labels"].dtype == torch.long
    assert torch.all(item["labels"][item["input_ids"] == IMAGE_TOKEN_ID] == IGNORE_INDEX)


def test_missing_tag_is_prepended_to_the_first_user_turn(tokenizer, processor, image_folder, tmp_path):
    samples = [{"id": "a", "image": "red.png", "conversations": qa()}]
    dataset = make_dataset(tokenizer, processor, image_folder, samples, tmp_path)
    assert dataset.get_record(0)["conversations"][0]["value"] == "<image>\nWhat is shown?"
    assert int((dataset[0]["input_ids"] == IMAGE_TOKEN_ID).sum()) == 1


def test_text_only_sample_has_no_pixels_and_negative_length(tokenizer, processor, image_folder, tmp_path):
    samples = [{"id": "t", "conversations": qa()}, {"id": "i", "image": "red.png", "conversations": qa()}]
    dataset = make_dataset(tokenizer, processor, image_folder, samples, tmp_path, tokens_per_image=100)
    assert "pixel_values" not in dataset[0]
    assert dataset.modality_lengths.tolist() == [-6, 106]  # 6 words; 6 words + 100 visual tokens


def test_several_files_json_and_jsonl(tokenizer, processor, image_folder, tmp_path):
    first = write_json(tmp_path / "a.json", [{"id": "a0", "image": "red.png", "conversations": qa()}])
    second = tmp_path / "b.jsonl"
    second.write_text("\n".join(json.dumps({"id": f"b{i}", "conversations": qa()}) for i in range(2)) + "\n")
    args = DataArguments(data_path=[first, str(second)], image_folder=str(image_folder))
    dataset = LazySupervisedDataset(args, tokenizer, processor)
    assert len(dataset) == 3
    assert [dataset.get_record(i)["id"] for i in range(3)] == ["a0", "b0", "b1"]
    assert "b.jsonl sample id='b1' (index 1)" in dataset.describe(2)
    assert isinstance(dataset._buffer, np.ndarray)  # stored as bytes, not Python dicts
    assert pickle.loads(pickle.dumps(dataset)).get_record(1)["id"] == "b0"  # spawn-safe workers


def test_truncation_drops_the_image_that_does_not_fit(tokenizer, processor, image_folder, tmp_path):
    conversation = [*qa("<image>\nWhat is shown?"), *qa("<image>\nAnd this?", "Hello there.")]
    samples = [{"id": "long", "image": ["red.png", "green.png"], "conversations": conversation}]
    full = make_dataset(tokenizer, processor, image_folder, samples, tmp_path, tokens_per_image=100)[0]
    first_turn_end = int(torch.nonzero(full["input_ids"] == IMAGE_TOKEN_ID)[1]) - 5  # inside turn 2 prompt
    max_length = first_turn_end + 100 + 50  # the second image (100 tokens) cannot fit whole
    item = make_dataset(
        tokenizer, processor, image_folder, samples, tmp_path, tokens_per_image=100, model_max_length=max_length
    )[0]
    assert int((item["input_ids"] == IMAGE_TOKEN_ID).sum()) == 1
    assert item["pixel_values"].shape[0] == 1
    assert len(item["input_ids"]) - 1 + 100 <= max_length
    assert torch.equal(item["pixel_values"][0], full["pixel_values"][0])


def test_nothing_learnable_raises_naming_the_sample(tokenizer, processor, image_folder, tmp_path):
    samples = [{"id": "tiny", "image": "red.png", "conversations": qa()}]
    dataset = make_dataset(tokenizer, processor, image_folder, samples, tmp_path, model_max_length=20)
    with pytest.raises(DataError, match=r"data\.json sample id='tiny' \(index 0\).*no learnable label"):
        dataset[0]


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (["not", "a", "dict"], "sample must be a JSON object"),
        ({"id": "s1"}, "no 'conversations'"),
        ({"id": "s1", "image": "red.png", "conversations": qa("<image><image>")}, "2 <image> tags but 1 images"),
        ({"id": "s1", "image": 5, "conversations": qa()}, "'image' must be"),
        ({"id": "s1", "conversations": [{"from": "gpt", "value": "x"}]}, "no user turn"),
    ],
)
def test_structural_errors_name_file_id_and_index(tokenizer, processor, image_folder, tmp_path, sample, message):
    samples = [{"id": "ok", "conversations": qa()}, sample]
    with pytest.raises(DataError, match=message) as error:
        make_dataset(tokenizer, processor, image_folder, samples, tmp_path)
    expected_id = "1" if isinstance(sample, list) else "s1"
    assert f"data.json sample id='{expected_id}' (index 1)" in str(error.value)


def test_malformed_json_names_file_and_position(tokenizer, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": oops}\n]')
    with pytest.raises(DataError, match=r"broken\.json: malformed JSON at line 3 column 10"):
        LazySupervisedDataset(DataArguments(data_path=[str(path)]), tokenizer)
    lines = tmp_path / "broken.jsonl"
    lines.write_text(json.dumps({"id": "a", "conversations": qa()}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: malformed JSON at line 2"):
        LazySupervisedDataset(DataArguments(data_path=[str(lines)]), tokenizer)


def test_invalid_utf8_names_file_and_line(tokenizer, tmp_path):
    good = json.dumps({"id": "a", "conversations": qa()}).encode()
    path = tmp_path / "latin1.json"
    path.write_bytes(b"[\n" + good + b",\n" + good.replace(b"What", b"Wh\xe4t") + b"\n]")
    with pytest.raises(DataError, match=r"latin1\.json: line 3: not valid UTF-8"):
        LazySupervisedDataset(DataArguments(data_path=[str(path)]), tokenizer)
    lines = tmp_path / "latin1.jsonl"
    lines.write_bytes(good + b"\n" + good.replace(b"What", b"Wh\xe4t") + b"\n" + good + b"\n")
    with pytest.raises(DataError, match=r"latin1\.jsonl: line 2: not valid UTF-8"):
        LazySupervisedDataset(DataArguments(data_path=[str(lines)]), tokenizer)
    skipping = LazySupervisedDataset(DataArguments(data_path=[str(lines)], skip_bad_samples=True), tokenizer)
    assert len(skipping) == 2 and "line 2: not valid UTF-8" in str(skipping.problems[0])


@pytest.mark.parametrize(
    ("image", "message"), [("nowhere.png", "image file not found"), ("corrupt.jpg", "cannot read")]
)
def test_bad_image_files_name_the_path_and_sample(tokenizer, processor, image_folder, tmp_path, image, message):
    samples = [{"id": "pic", "image": image, "conversations": qa()}]
    dataset = make_dataset(tokenizer, processor, image_folder, samples, tmp_path)
    with pytest.raises(DataError, match=message) as error:
        dataset[0]
    assert "data.json sample id='pic' (index 0)" in str(error.value)
    assert image in str(error.value)


def test_skip_mode_counts_and_drops_bad_samples(tokenizer, processor, image_folder, tmp_path):
    samples = [
        {"id": "good", "image": "red.png", "conversations": qa()},
        {"id": "no-conv"},
        "garbage",
        {"id": "missing", "image": "nowhere.png", "conversations": qa()},
        {"id": "text", "conversations": qa()},
    ]
    dataset = make_dataset(tokenizer, processor, image_folder, samples, tmp_path, skip_bad_samples=True)
    assert len(dataset) == 3 and dataset.num_invalid_samples == 2
    assert [problem.sample_id for problem in dataset.problems] == ["no-conv", "2"]
    marker = dataset[1]
    assert isinstance(marker, SkippedSample) and marker.sample_id == "missing"

    collate = DataCollatorForSupervisedDataset(tokenizer)
    batch = collate([dataset[i] for i in range(3)])
    assert batch["num_skipped_samples"] == 1
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 1
    with pytest.raises(AllSamplesSkippedError, match=r"nowhere\.png"):
        collate([marker, marker])


def test_pad_and_square_differ_for_non_square_images(processor, image_folder):
    paths = [str(image_folder / "red.png")]
    padded = load_and_preprocess(paths, processor, "pad")
    squared = load_and_preprocess(paths, processor, "square")
    assert padded.shape == squared.shape == (1, 3, SIZE, SIZE)
    assert not torch.allclose(padded, squared)
    # pad fills with the processor mean, which normalises to ~0 (top row is padding)
    assert padded[0, :, 0, :].abs().max() < 0.02
    canvas = expand_to_square(Image.new("RGB", (40, 20), (255, 0, 0)), processor_background(processor))
    assert canvas.size == (40, 40) and canvas.getpixel((0, 0)) == processor_background(processor)


def test_collator_pads_right_and_orders_pixels_by_sentinel(tokenizer, processor, image_folder, tmp_path):
    samples = [
        {"id": "rg", "image": ["red.png", "green.png"], "conversations": qa("<image> then <image>")},
        {"id": "text", "conversations": qa("Hello there, what is shown?", "A red square.")},
        {"id": "b", "image": "blue.png", "conversations": qa()},
    ]
    dataset = make_dataset(tokenizer, processor, image_folder, samples, tmp_path, image_aspect_ratio="square")
    items = [dataset[i] for i in range(3)]
    batch = DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id)(items)

    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(1).tolist() == lengths
    pad = batch["attention_mask"] == 0
    assert torch.all(batch["input_ids"][pad] == tokenizer.pad_token_id)
    assert torch.all(batch["labels"][pad] == IGNORE_INDEX)
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == batch["pixel_values"].shape[0] == 3
    dominant_channel = batch["pixel_values"].mean(dim=(2, 3)).argmax(dim=1).tolist()
    assert dominant_channel == [0, 1, 2]  # red, green, blue: row-major sentinel order
    text_only = DataCollatorForSupervisedDataset(tokenizer)([items[1]])
    assert "pixel_values" not in text_only and "num_skipped_samples" not in text_only


def test_sampler_is_a_deterministic_permutation_grouped_by_modality():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 500, 37), -rng.integers(1, 500, 29)])
    batch_size, world_size = 4, 2
    sampler = ModalityLengthGroupedSampler(batch_size, world_size, lengths, seed=3)
    order = np.asarray(list(sampler))
    assert sorted(order.tolist()) == list(range(len(lengths))) and len(sampler) == len(lengths)
    assert np.array_equal(order, list(sampler))  # same epoch, same order
    sampler.set_epoch(1)
    assert not np.array_equal(order, list(sampler))

    megabatch = batch_size * world_size
    num_full = 37 // megabatch + 29 // megabatch
    full = lengths[order[: num_full * megabatch]].reshape(num_full, world_size, batch_size)
    signs = np.sign(full).reshape(num_full, -1)
    assert np.all(signs == signs[:, :1])  # every full megabatch is single-modality
    assert np.all(np.abs(full).max(axis=2) >= np.abs(full).min(axis=2))
    per_rank = np.abs(full).sum(axis=2)
    assert np.all(per_rank.max(1) - per_rank.min(1) <= np.abs(full).max(axis=(1, 2)))  # balanced ranks


def test_sampler_rejects_zero_length():
    with pytest.raises(ValueError, match="non-zero"):
        list(ModalityLengthGroupedSampler(2, 1, [3, 0, -2]))


def test_paths_outside_the_image_folder_are_refused_unless_allowed(tokenizer, processor, image_folder, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret / "x.png")
    (image_folder / "link.png").symlink_to(secret / "x.png")  # a link inside that points outside
    for name in ("../secret/x.png", str(secret / "x.png"), "link.png"):
        samples = [{"id": "sneaky", "image": name, "conversations": qa("<image>\nWhat?")}]
        dataset = make_dataset(tokenizer, processor, image_folder, samples, tmp_path)
        with pytest.raises(DataError, match="outside") as error:
            dataset[0]
        assert "data.json sample id='sneaky' (index 0)" in str(error.value) and "allow_outside_paths" in str(
            error.value
        )
        trusted = make_dataset(tokenizer, processor, image_folder, samples, tmp_path, allow_outside_paths=True)
        assert trusted[0]["pixel_values"].shape[0] == 1
    samples = [{"id": "ok", "image": "./red.png", "conversations": qa("<image>\nWhat?")}]
    assert make_dataset(tokenizer, processor, image_folder, samples, tmp_path)[0]["pixel_values"].shape[0] == 1
