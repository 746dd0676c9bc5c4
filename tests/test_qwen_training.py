"""Finetuning Qwen2.5-VL: chat-template samples with assistant-only labels, the loss against transformers', DUET
compression in training, and the trainer end to end (full finetune, resume, LoRA + merge)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from llava.compression.config import CompressionConfig, T2VConfig
from llava.constants import IGNORE_INDEX
from llava.data.chat_template import ChatTemplateEncoder, chat_messages, template_pieces
from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.dataset import DataArguments, DataError, LazySupervisedDataset
from llava.data.templates import ConversationError
from llava.data.tokenization import NoLearnableTokensError
from llava.hf_adapter import load_image_processor
from llava.inference import load_pipeline
from llava.model.qwen_vl import DuetQwenVL
from llava.training.lora import merge_lora_checkpoint
from llava.training.train import train
from tests.conftest import IMAGE, PATCH_FEATURES, tiny_qwen

START, END = 152, 153
QUESTION = {"from": "human", "value": "<image>\nwhat colour is the shape"}


def conversation(*answers: str, image_tags: int = 1) -> list[dict[str, str]]:
    turns = [
        {"from": "human", "value": "<image>\n" * image_tags + "what colour is the shape"},
        {"from": "gpt", "value": answers[0]},
    ]
    for answer in answers[1:]:
        turns += [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": answer}]
    return turns


@pytest.fixture(scope="module")
def processors(qwen_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_checkpoint), padding_side="right")
    return tokenizer, load_image_processor(str(qwen_checkpoint))


def encoder(processors, qwen_checkpoint, max_length=None) -> ChatTemplateEncoder:
    tokenizer, image_processor = processors
    config = json.loads((qwen_checkpoint / "config.json").read_text())
    return ChatTemplateEncoder(
        tokenizer, image_processor, config["image_token_id"], config["vision_start_token_id"], max_length
    )


def test_labels_cover_exactly_the_answers_and_their_end_of_turn_token(processors, qwen_checkpoint):
    tokenizer, _ = processors
    turns = [{"from": "system", "value": "be brief"}, *conversation("a red square", "hello")]
    pieces = template_pieces(tokenizer, chat_messages(turns))
    full = tokenizer.apply_chat_template(chat_messages(turns), tokenize=False)
    assert "".join(text for text, _ in pieces) == full  # the pieces are the template's text, nothing lost
    assert [text for text, learned in pieces if learned] == ["a red square<|im_end|>", "hello<|im_end|>"]

    item = encoder(processors, qwen_checkpoint).encode(turns, [str(qwen_checkpoint / "image_0.png")])
    labels, ids = item["labels"], item["input_ids"]
    learned = labels != IGNORE_INDEX
    assert torch.equal(labels[learned], ids[learned])
    assert tokenizer.decode(ids[learned]).replace(" ", "") == "aredsquare<|im_end|>hello<|im_end|>"
    # The prompt the model learns to answer is exactly the generation prompt (ends with the assistant header).
    first_answer = int(learned.nonzero()[0])
    prompt = chat_messages(turns)[:2]
    generation_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    pads = int((ids == IMAGE_ID(qwen_checkpoint)).sum())
    assert tokenizer.decode(ids[:first_answer]) == generation_prompt.replace("<|image_pad|>", "<|image_pad|>" * pads)


def test_images_expand_to_their_merged_token_counts_and_truncation_keeps_images_whole(processors, qwen_checkpoint):
    paths = [str(qwen_checkpoint / f"image_{index}.png") for index in (0, 2)]
    turns = conversation("a red square", image_tags=2)
    item = encoder(processors, qwen_checkpoint).encode(turns, paths)
    grid = item["image_grid_thw"]
    counts = (grid.prod(dim=-1) // 4).tolist()
    assert len(counts) == 2 and counts[0] != counts[1]  # dynamic resolution: different sizes, different counts
    assert int((item["input_ids"] == IMAGE_ID(qwen_checkpoint)).sum()) == sum(counts)
    assert item["pixel_values"].shape == (int(grid.prod(dim=-1).sum()), PATCH_FEATURES)

    # A limit that falls inside the second image drops it, its opening marker and everything after it: no
    # learnable token is left, which is an error that names the cause.
    ids = item["input_ids"].tolist()
    second_start = ids.index(IMAGE_ID(qwen_checkpoint)) + counts[0] + 2  # past image 1's pads and end marker
    with pytest.raises(NoLearnableTokensError):
        encoder(processors, qwen_checkpoint, max_length=second_start + 3).encode(turns, paths)
    # Images first, answer last: a limit inside the answer keeps both images whole.
    cut = encoder(processors, qwen_checkpoint, max_length=len(ids) - 2).encode(turns, paths)
    assert torch.equal(cut["image_grid_thw"], grid) and len(cut["input_ids"]) == len(ids) - 2


def IMAGE_ID(qwen_checkpoint) -> int:  # noqa: N802 - reads like the constant it stands for
    return json.loads((qwen_checkpoint / "config.json").read_text())["image_token_id"]


def test_bad_samples_are_refused_with_the_reason(processors, qwen_checkpoint):
    chat = encoder(processors, qwen_checkpoint)
    with pytest.raises(ConversationError, match="takes no videos"):
        chat.validate([{"from": "human", "value": "<video>\nwhat"}, {"from": "gpt", "value": "x"}])
    with pytest.raises(ConversationError, match="2 image placeholders"):
        chat.encode(conversation("x", image_tags=2), [str(qwen_checkpoint / "image_0.png")])


def training_data(folder, samples: list[dict]) -> str:
    path = folder / "train.json"
    path.write_text(json.dumps(samples))
    return str(path)


def samples(images: int, texts: int) -> list[dict]:
    answer = {"from": "gpt", "value": "a red square"}
    with_images = [
        {"id": f"i{index}", "image": f"image_{index % 3}.png", "conversations": [QUESTION, answer]}
        for index in range(images)
    ]
    chat = [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hello"}]
    text_only = [{"id": f"t{index}", "conversations": chat} for index in range(texts)]
    return with_images + text_only


def test_dataset_and_collator_build_a_batch_with_every_images_patches_and_grid(processors, qwen_checkpoint, tmp_path):
    tokenizer, image_processor = processors
    data_args = DataArguments(data_path=[training_data(tmp_path, samples(2, 1))], image_folder=str(qwen_checkpoint))
    chat = encoder(processors, qwen_checkpoint)
    dataset = LazySupervisedDataset(data_args, tokenizer, image_processor, IMAGE_ID(qwen_checkpoint), encoder=chat)
    batch = DataCollatorForSupervisedDataset(tokenizer)([dataset[index] for index in range(3)])
    grid = batch["image_grid_thw"]
    assert grid.shape == (2, 3) and batch["pixel_values"].shape[0] == int(grid.prod(dim=-1).sum())
    assert int((batch["input_ids"] == IMAGE_ID(qwen_checkpoint)).sum()) == int(grid.prod(dim=-1).sum()) // 4
    assert bool(batch["attention_mask"][:, 0].all())  # right-padded for training

    outside = [{"id": "x", "image": "../escape.png", "conversations": [QUESTION, {"from": "gpt", "value": "no"}]}]
    data_args = DataArguments(data_path=[training_data(tmp_path, outside)], image_folder=str(qwen_checkpoint))
    escaping = LazySupervisedDataset(data_args, tokenizer, image_processor, IMAGE_ID(qwen_checkpoint), encoder=chat)
    with pytest.raises(DataError, match=r"train\.json sample id='x'.*outside"):
        escaping[0]


def right_padded_batch() -> dict[str, torch.Tensor]:
    """One image (4 tokens); two images (4 + 1); text only; labels on the text after the prompt."""
    image = lambda tokens: [START] + [IMAGE] * tokens + [END]  # noqa: E731
    rows = [[1, *image(4), 5, 6, 7, 8], [1, *image(4), 8, *image(1), 9, 10, 11], [1, 11, 12, 13]]
    length = max(len(row) for row in rows)
    ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    mask = (torch.arange(length) < torch.tensor([[len(row)] for row in rows])).long()
    labels = ids.masked_fill((mask == 0) | (ids == IMAGE), IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    torch.manual_seed(1)
    return {
        "input_ids": ids, "attention_mask": mask, "labels": labels,
        "pixel_values": torch.randn(36, PATCH_FEATURES),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4], [1, 2, 2]]),
    }  # fmt: skip


def test_uncompressed_loss_equals_transformers_loss_on_a_right_padded_batch():
    hf = tiny_qwen()
    inputs = right_padded_batch()
    expected = hf(**inputs, mm_token_type_ids=(inputs["input_ids"] == IMAGE).int()).loss
    assert torch.allclose(DuetQwenVL(hf)(**inputs).loss, expected, atol=1e-5)


def sample(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row ``row`` of the batch alone, its padding and its images' patches only."""
    length = int(inputs["attention_mask"][row].sum())
    images_before = [1, 2, 0][:row]
    first = sum(images_before)
    count = [1, 2, 0][row]
    patches = inputs["image_grid_thw"].prod(dim=-1)
    start, end = int(patches[:first].sum()), int(patches[: first + count].sum())
    single = {key: inputs[key][row : row + 1, :length] for key in ("input_ids", "attention_mask", "labels")}
    if count:
        single["pixel_values"] = inputs["pixel_values"][start:end]
        single["image_grid_thw"] = inputs["image_grid_thw"][first : first + count]
    return single


def test_compressed_training_loss_of_a_batch_is_the_sum_of_its_samples_and_reaches_the_merger():
    model = DuetQwenVL(tiny_qwen(), "qwen_duet_53").train()
    inputs = right_padded_batch()
    total = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    output = model(**inputs, num_items_in_batch=total)
    alone = sum(model(**sample(inputs, row), num_items_in_batch=total).loss for row in range(3))
    assert torch.allclose(output.loss, alone, atol=1e-5)
    # V2V and T2V both dropped tokens: 53 % fewer per image over the decoder, keep counts relative to N0.
    assert (
        output.visual_tokens_per_layer[0] < 4 and output.visual_tokens_per_layer[-1] < output.visual_tokens_per_layer[0]
    )
    output.loss.backward()
    assert model.projector.mlp[0].weight.grad.abs().sum() > 0
    assert model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_a_text_only_training_batch_still_runs_the_vision_side_without_changing_the_loss():
    model = DuetQwenVL(tiny_qwen(), "qwen_duet_53")
    inputs = {
        key: value[2:]
        for key, value in right_padded_batch().items()
        if key in ("input_ids", "attention_mask", "labels")
    }
    calls = []
    model.projector.register_forward_hook(lambda *args: calls.append(1))
    evaluated = model.eval()(**inputs).loss
    assert calls == []
    trained = model.train()(**inputs).loss
    assert calls == [1] and torch.allclose(trained, evaluated)  # the blank image adds nothing to the sequence
    trained.backward()
    assert model.projector.mlp[0].weight.grad is not None  # zeros, reduced like every other rank's


def qwen_train_args(qwen_checkpoint, data, out, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(qwen_checkpoint), "--version", "chat_template", "--data_path", data,
        "--image_folder", str(qwen_checkpoint), "--output_dir", str(out), "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0", "--seed", "3", "--compression", "qwen_duet_53", *extra,
    ]  # fmt: skip


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_finetune_saves_qwen_checkpoints_that_load_answer_and_resume(qwen_checkpoint, tmp_path):
    data = training_data(tmp_path, samples(5, 3))
    full = train(qwen_train_args(qwen_checkpoint, data, tmp_path / "full", "--max_steps", "3", "--save_steps", "2"))
    original, trained = load_file(qwen_checkpoint / "model.safetensors"), load_file(full / "model.safetensors")
    assert sorted(trained) == sorted(original)  # the Hub's layout
    changed = {key for key in original if not torch.equal(original[key], trained[key])}
    assert any("merger" in key for key in changed) and any("layers.0.self_attn" in key for key in changed)
    assert not any(key.startswith("visual.blocks") or "patch_embed" in key for key in changed)  # tower frozen
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("visual_tokens_stage1" in row for row in rows)

    pipeline = load_pipeline(full, compression="qwen_duet_53")
    requests = [{"image": str(qwen_checkpoint / "image_1.png"), "prompt": "<image>\nwhat colour is the shape"}]
    assert len(pipeline.generate(requests, max_new_tokens=3)) == 1
    # Intermediate checkpoints load the same way (weights, processors, the chat template).
    assert len(load_pipeline(full / "checkpoint-2").generate(requests, max_new_tokens=3)) == 1

    # Preempted after step 2, resumed: step 3 is the uninterrupted run's step 3.
    cut = tmp_path / "cut"
    train(qwen_train_args(qwen_checkpoint, data, cut, "--max_steps", "2", "--save_steps", "2"))
    train(qwen_train_args(qwen_checkpoint, data, cut, "--max_steps", "3", "--resume_from_checkpoint", "auto"))
    assert losses(cut)[3] == pytest.approx(losses(full)[3], rel=1e-5)


def test_lora_finetune_merges_into_a_plain_qwen_checkpoint(qwen_checkpoint, tmp_path):
    data = training_data(tmp_path, samples(4, 2))
    lora = ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8")
    out = train(qwen_train_args(qwen_checkpoint, data, tmp_path / "lora", "--max_steps", "2", *lora))
    assert (out / "adapter_config.json").is_file()
    merged = merge_lora_checkpoint(out, tmp_path / "merged")
    original, weights = load_file(qwen_checkpoint / "model.safetensors"), load_file(merged / "model.safetensors")
    assert sorted(weights) == sorted(original)
    changed = {key for key in original if not torch.equal(original[key], weights[key])}
    assert any("merger" in key for key in changed) and any("q_proj" in key for key in changed)
    assert not any("lm_head" in key or "visual.blocks" in key for key in changed)
    assert isinstance(load_pipeline(merged).model, DuetQwenVL)


def test_llava_only_settings_are_refused_for_qwen(qwen_checkpoint, tmp_path):
    data = training_data(tmp_path, samples(1, 0))
    with pytest.raises(ValueError, match="--version chat_template"):
        train(qwen_train_args(qwen_checkpoint, data, tmp_path / "a", "--version", "v1"))
    with pytest.raises(ValueError, match="drop --vision_tower"):
        train(qwen_train_args(qwen_checkpoint, data, tmp_path / "b", "--vision_tower", "openai/clip"))


def test_saved_checkpoints_use_the_hubs_names_and_shards_and_load_back_exactly(qwen_checkpoint, tmp_path):
    from llava.families.qwen import load_qwen_vl

    model = load_qwen_vl(qwen_checkpoint)
    model.save_pretrained(tmp_path / "one")
    assert sorted(load_file(tmp_path / "one" / "model.safetensors")) == sorted(
        load_file(qwen_checkpoint / "model.safetensors")
    )
    model.save_pretrained(tmp_path / "sharded", state_dict=model.state_dict(), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = load_qwen_vl(tmp_path / "sharded")
    inputs = {key: value for key, value in right_padded_batch().items() if key != "labels"}
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE, IMAGE_ID(qwen_checkpoint))
    inputs["input_ids"] = inputs["input_ids"].masked_fill(
        inputs["input_ids"] == START, model.config.vision_start_token_id
    )
    assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


def test_check_data_reads_qwen_data_through_the_chat_template(qwen_checkpoint, tmp_path):
    from llava.tools.check_data import main

    answer = {"from": "gpt", "value": "x"}
    broken = [
        *samples(1, 1),
        {"id": "gone", "image": "missing.png", "conversations": [QUESTION, answer]},
        {"id": "video", "video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nwhat"}, answer]},
        {"id": "lost", "video": "gone.mp4", "conversations": [{"from": "human", "value": "what"}, answer]},
        {"id": "no question", "conversations": [answer]},
    ]
    report = tmp_path / "report.json"
    argv = [
        "--data_path", training_data(tmp_path, broken), "--image_folder", str(qwen_checkpoint),
        "--video_folder", str(qwen_checkpoint), "--tokenizer", str(qwen_checkpoint), "--version", "chat_template",
        "--tokens_per_image", "64", "--model_max_length", "60", "--num_frames", "4", "--json-report", str(report),
    ]  # fmt: skip
    assert main(argv) == 1
    result = json.loads(report.read_text())
    assert result["num_missing_images"] == 1 and result["num_missing_videos"] == 1  # videos train: checked too
    assert result["num_structural_errors"] == 1 and result["num_bad_videos"] == 0  # the sample without a question
    assert result["num_samples"] == 6 and result["num_text_only"] == 1
    assert result["num_over_max_length"] == 4  # two image samples (64 tokens > 60), two videos (8 x 257 > 60)


def test_video_samples_expand_to_their_patches_and_train(processors, qwen_checkpoint, tmp_path):
    import functools

    from llava.data.qwen_video import load_qwen_video

    tokenizer, image_processor = processors
    config = json.loads((qwen_checkpoint / "config.json").read_text())
    loader = functools.partial(load_qwen_video, image_processor=image_processor, num_frames=4)
    chat = ChatTemplateEncoder(
        tokenizer, image_processor, config["image_token_id"], config["vision_start_token_id"],
        video_token_id=config["video_token_id"], video_loader=loader,
    )  # fmt: skip
    turns = [{"from": "human", "value": "<video>\n<image>\nwhat happens"}, {"from": "gpt", "value": "a red square"}]
    item = chat.encode(turns, [str(qwen_checkpoint / "image_0.png")], [str(qwen_checkpoint / "clip.mp4")])
    assert item["video_grid_thw"].tolist() == [[2, 4, 6]] and item["pixel_values_videos"].shape[0] == 48
    assert item["second_per_grid_ts"].tolist() == pytest.approx([0.75])
    ids = item["input_ids"].tolist()
    assert ids.count(config["video_token_id"]) == 12 and ids.count(config["image_token_id"]) == 6
    assert ids.index(config["video_token_id"]) < ids.index(config["image_token_id"])  # tag order
    # A limit inside the image keeps the video whole and drops the image with its marker: nothing to learn left.
    chat.max_length = ids.index(config["image_token_id"]) + 2
    with pytest.raises(NoLearnableTokensError):
        chat.encode(turns, [str(qwen_checkpoint / "image_0.png")], [str(qwen_checkpoint / "clip.mp4")])

    video_sample = {"id": "v", "video": "clip.mp4", "conversations": [{"from": "human", "value": "what happens"},
                    {"from": "gpt", "value": "a red square"}]}  # fmt: skip
    data = training_data(tmp_path, [video_sample, *samples(2, 1)])
    extra = ("--max_steps", "2", "--video_folder", str(qwen_checkpoint), "--num_frames", "4")
    out = train(qwen_train_args(qwen_checkpoint, data, tmp_path / "video", *extra))
    assert sorted(losses(out)) == [1, 2]
    assert isinstance(load_pipeline(out).model, DuetQwenVL)


def test_training_keeps_the_visual_tokens_its_prompt_keeps_at_generation():
    """Answers never act as T2V queries: with labels, each stage keeps the same visual tokens (by their M-RoPE
    positions) as the prompt alone, which is what generation sees."""
    hf = tiny_qwen()
    with torch.no_grad():  # sharp attention, so which tokens ask decides what is kept (the random init is flat)
        for layer in hf.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
            layer.self_attn.k_proj.weight.mul_(40)
    model = DuetQwenVL(hf, CompressionConfig("t2v", t2v=T2VConfig((0.5,), (0.3,), "instruction"))).eval()
    prompt_ids = [1, START, *[IMAGE] * 16, END, 8, 9]
    answer = [10, 11, 12, 13, 14, 15]
    ids = torch.tensor([prompt_ids + answer])
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt_ids) + answer])
    torch.manual_seed(3)
    visual = {"pixel_values": torch.randn(64, PATCH_FEATURES), "image_grid_thw": torch.tensor([[1, 8, 8]])}
    trained = model(input_ids=ids, labels=labels, **visual).position_ids[0]
    generated = model(input_ids=ids[:, : len(prompt_ids)], **visual).position_ids[0]
    assert torch.equal(trained[: generated.shape[0]], generated)


@pytest.mark.parametrize("compression", [None, "qwen_duet_53"])
def test_packed_loss_and_gradients_equal_the_padded_batch(compression):
    """Padding-free batches with M-RoPE positions ([B, L, 3], restarting per sample) and Qwen's V2V/T2V."""
    model = DuetQwenVL(tiny_qwen(), compression).train()
    inputs = right_padded_batch()
    results = []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        output = model(**inputs, pack_sequences=packed)
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((output.loss.detach(), grads, output.visual_tokens_per_layer))
    (padded_loss, padded_grads, padded_tokens), (packed_loss, packed_grads, packed_tokens) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert packed_tokens == padded_tokens and packed_grads.keys() == padded_grads.keys()
    for name, gradient in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], gradient, atol=1e-5, rtol=1e-5, msg=name)
