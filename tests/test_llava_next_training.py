"""Finetuning LLaVA-NeXT (AnyRes): chat-template samples with assistant-only labels, each image expanded to its
AnyRes token count, batches of images with different tile grids, T2V compression in training, and the trainer and
the launch scripts end to end (full finetune, resume, 2-rank ZeRO-3, LoRA + merge)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from llava.arguments import ModelArguments
from llava.constants import IGNORE_INDEX
from llava.data.chat_template import ChatTemplateEncoder
from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.dataset import DataArguments, DataError
from llava.data.tokenization import NoLearnableTokensError
from llava.families.base import Processors
from llava.families.llava_next import LlavaNextFamily, load_llava_next
from llava.hf_adapter import llava_next_image_features, llava_next_views_per_image
from llava.inference import load_pipeline
from llava.model.llava_next import DuetLlavaNext
from llava.training.lora import merge_lora_checkpoint
from llava.training.train import train

T2V_YAML = "name: next_t2v_test\nv2v: null\nt2v:\n  boundaries: [0.5]\n  keep_ratios: [0.5]\n  query: instruction\n"
QUESTION = {"from": "human", "value": "<image>\nwhat colour is the shape"}
ANSWER = {"from": "gpt", "value": "a red square"}
CHAT = [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hello"}]
FAMILY = LlavaNextFamily()


@pytest.fixture(scope="module")
def processors(llava_next_checkpoint) -> Processors:
    model_args = ModelArguments(model_name_or_path=str(llava_next_checkpoint))
    return FAMILY.load_processors(model_args, DataArguments(version="chat_template"), None)


@pytest.fixture(scope="module")
def hf_model(llava_next_checkpoint) -> LlavaNextForConditionalGeneration:
    return LlavaNextForConditionalGeneration.from_pretrained(str(llava_next_checkpoint)).eval()


@pytest.fixture
def compression(tmp_path) -> str:
    path = tmp_path / "next_t2v.yaml"
    path.write_text(T2V_YAML)
    return str(path)


def dataset(checkpoint: Path, processors: Processors, samples: list[dict], folder: Path, **data: object):
    path = folder / "train.json"
    path.write_text(json.dumps(samples))
    data_args = DataArguments(
        data_path=[str(path)], image_folder=str(checkpoint), version="chat_template", **data
    )  # fmt: skip
    config = SimpleNamespace(config=LlavaNextConfig.from_pretrained(str(checkpoint)))
    return FAMILY.dataset(data_args, processors, config)


def encoder(checkpoint: Path, processors: Processors, tmp_path: Path, max_length: int = 2048) -> ChatTemplateEncoder:
    return dataset(checkpoint, processors, [{"conversations": CHAT}], tmp_path, model_max_length=max_length).encoder


def images(checkpoint: Path, *indices: int) -> list[str]:
    return [str(checkpoint / f"image_{index}.png") for index in indices]


def image_id(checkpoint: Path) -> int:
    return LlavaNextConfig.from_pretrained(str(checkpoint)).image_token_id


def test_labels_cover_exactly_the_answers_each_ended_with_eos(llava_next_checkpoint, processors, tmp_path):
    tokenizer = processors.tokenizer
    chat = encoder(llava_next_checkpoint, processors, tmp_path)
    turns = [{"from": "system", "value": "be brief"}, QUESTION, ANSWER, *CHAT]
    item = chat.encode(turns, images(llava_next_checkpoint, 0))
    ids, labels = item["input_ids"], item["labels"]
    learned = labels != IGNORE_INDEX
    assert torch.equal(labels[learned], ids[learned])
    # llava-hf's template writes no end of sequence after an answer: the encoder adds the tokenizer's, learned.
    answers = tokenizer.decode(ids[learned]).replace(" ", "")
    assert answers == f"aredsquare{tokenizer.eos_token}hello{tokenizer.eos_token}"
    # The text before the first answer is exactly the generation prompt of the first question (images expanded),
    # the prompt the pipeline renders with the processor's template.
    first_answer = int(learned.nonzero()[0])
    question = [{"type": "image"}, {"type": "text", "text": "what colour is the shape"}]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": question},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pads = int((ids == image_id(llava_next_checkpoint)).sum())
    assert tokenizer.decode(ids[:first_answer]) == prompt.replace("<image>", "<image>" * pads)


def test_placeholders_expand_to_the_models_anyres_token_counts_and_truncation_keeps_images_whole(
    llava_next_checkpoint, processors, hf_model, tmp_path
):
    chat = encoder(llava_next_checkpoint, processors, tmp_path)
    turns = [{"from": "human", "value": "<image>\n<image>\n<image>\nwhat colour is the shape"}, ANSWER]
    paths = images(llava_next_checkpoint, 0, 1, 2)  # wide, tall, square: three different tile grids
    item = chat.encode(turns, paths)
    sizes = item["image_sizes"]
    assert sizes.tolist() == [[40, 90], [90, 40], [60, 60]]
    views = llava_next_views_per_image(hf_model, sizes)
    assert item["pixel_values"].shape == (sum(views), 3, 28, 28) and len(set(views)) == 2
    with torch.no_grad():
        counts = [int(part.shape[0]) for part in llava_next_image_features(hf_model, item["pixel_values"], sizes)]
    ids = item["input_ids"]
    placeholder = image_id(llava_next_checkpoint)
    assert len(set(counts)) == 3 and int((ids == placeholder).sum()) == sum(counts)
    # The same counts as the checkpoint's own LlavaNextProcessor expands them.
    from transformers import AutoProcessor

    from llava.data.images import load_image

    processor = AutoProcessor.from_pretrained(str(llava_next_checkpoint))
    for path, count in zip(paths, counts, strict=True):
        expanded = processor(images=[load_image(path)], text=["<image>"], return_tensors="pt")["input_ids"]
        assert int((expanded == placeholder).sum()) == count

    # Two turns, one image each: a limit inside the second image drops it whole (its views, its size, its
    # placeholders and everything after), the first turn's answer stays learnable.
    turns = [QUESTION, ANSWER, {"from": "human", "value": "<image>\nhello there"}, {"from": "gpt", "value": "hello"}]
    whole = chat.encode(turns, images(llava_next_checkpoint, 0, 2))
    second = int((whole["input_ids"] == placeholder).nonzero()[counts[0]])
    chat.max_length = second + 5
    cut = chat.encode(turns, images(llava_next_checkpoint, 0, 2))
    assert cut["image_sizes"].tolist() == [[40, 90]] and cut["pixel_values"].shape[0] == views[0]
    assert int((cut["input_ids"] == placeholder).sum()) == counts[0] and len(cut["input_ids"]) <= second
    chat.max_length = int((whole["input_ids"] == placeholder).nonzero()[0]) + 3  # inside the first image
    with pytest.raises(NoLearnableTokensError):
        chat.encode(turns, images(llava_next_checkpoint, 0, 2))


def mixed_samples() -> list[dict]:
    two = {"from": "human", "value": "<image>\n<image>\nwhat colour is the shape"}
    return [
        {"id": "wide", "image": "image_0.png", "conversations": [QUESTION, ANSWER]},
        {"id": "tall+square", "image": ["image_1.png", "image_2.png"], "conversations": [two, ANSWER]},
        {"id": "text", "conversations": CHAT},
    ]


def test_dataset_and_collator_batch_different_tile_grids_and_a_text_only_sample(
    llava_next_checkpoint, processors, hf_model, tmp_path
):
    data = dataset(llava_next_checkpoint, processors, mixed_samples(), tmp_path)
    items = [data[index] for index in range(3)]
    batch = DataCollatorForSupervisedDataset(processors.tokenizer)(items)
    sizes = batch["image_sizes"]
    assert sizes.tolist() == [[40, 90], [90, 40], [60, 60]]
    views = llava_next_views_per_image(hf_model, sizes)
    assert batch["pixel_values"].shape == (sum(views), 3, 28, 28)
    assert bool(batch["attention_mask"][:, 0].all())  # right-padded for training
    with torch.no_grad():
        counts = [int(part.shape[0]) for part in llava_next_image_features(hf_model, batch["pixel_values"], sizes)]
    per_row = (batch["input_ids"] == image_id(llava_next_checkpoint)).sum(dim=1).tolist()
    assert per_row == [counts[0], counts[1] + counts[2], 0]

    outside = [{"id": "x", "image": "../escape.png", "conversations": [QUESTION, ANSWER]}]
    escaping = dataset(llava_next_checkpoint, processors, outside, tmp_path)
    with pytest.raises(DataError, match=r"train\.json sample id='x'.*outside"):
        escaping[0]


def test_compressed_training_loss_of_a_batch_is_the_sum_of_its_samples(
    llava_next_checkpoint, processors, compression, tmp_path
):
    data = dataset(llava_next_checkpoint, processors, mixed_samples(), tmp_path)
    collate = DataCollatorForSupervisedDataset(processors.tokenizer)
    items = [data[index] for index in range(3)]
    model = load_llava_next(llava_next_checkpoint, compression=compression).train()
    assert model.stage_plan.boundaries == (2,)

    def inputs(batch: dict) -> dict:
        return {key: value for key, value in batch.items() if key not in ("sample_ids", "num_skipped_samples")}

    batch = inputs(collate(items))
    total = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    output = model(**batch, num_items_in_batch=total)
    alone = sum(model(**inputs(collate([item])), num_items_in_batch=total).loss for item in items)
    torch.testing.assert_close(output.loss, alone, atol=1e-5, rtol=1e-5)
    per_layer = output.visual_tokens_per_layer
    assert per_layer[-1] < per_layer[0]  # T2V dropped visual tokens at layer 2 of 4
    output.loss.backward()
    assert model.projector.linear_1.weight.grad.abs().sum() > 0
    assert model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_saves_use_transformers_names_and_load_back_exactly(llava_next_checkpoint, hf_model, tmp_path):
    model = load_llava_next(llava_next_checkpoint)
    original = load_file(llava_next_checkpoint / "model.safetensors")  # what transformers' save_pretrained wrote
    model.save_pretrained(tmp_path / "one")
    saved = load_file(tmp_path / "one" / "model.safetensors")
    assert sorted(saved) == sorted(original)
    assert all(torch.equal(saved[key], original[key]) for key in original)
    model.save_pretrained(tmp_path / "sharded", state_dict=model.state_dict(), max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reloaded = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path / "sharded"))
    expected = hf_model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in reloaded.state_dict().items())
    # A checkpoint's state dict (the Trainer's resume without DeepSpeed) loads under the module names, strictly.
    fresh = load_llava_next(llava_next_checkpoint)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    fresh.load_state_dict(original)
    assert all(torch.equal(value, expected[key]) for key, value in fresh.hf_model.state_dict().items())


def train_args(checkpoint: Path, data: Path, out: Path, compression: str, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(checkpoint), "--version", "chat_template", "--data_path", str(data),
        "--image_folder", str(checkpoint), "--output_dir", str(out), "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0", "--seed", "3", "--compression", compression, *extra,
    ]  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def write_data(folder: Path, samples: list[dict]) -> Path:
    path = folder / "train.json"
    path.write_text(json.dumps(samples))
    return path


def test_finetune_saves_checkpoints_that_load_in_transformers_and_the_pipeline_and_resume(
    llava_next_checkpoint, compression, tmp_path
):
    data = write_data(tmp_path, mixed_samples() * 2)
    args = ("--save_steps", "2", "--gradient_checkpointing", "True")
    full = train(train_args(llava_next_checkpoint, data, tmp_path / "full", compression, "--max_steps", "3", *args))
    original, trained = load_file(llava_next_checkpoint / "model.safetensors"), load_file(full / "model.safetensors")
    assert sorted(trained) == sorted(original)  # transformers' layout
    changed = {key for key in original if not torch.equal(original[key], trained[key])}
    assert any("multi_modal_projector" in key for key in changed) and any(
        "layers.0.self_attn" in key for key in changed
    )
    assert "image_newline" in changed  # trained with the LLM, as LLaVA-NeXT's finetuning does
    assert not any(key.startswith("vision_tower.") for key in changed)  # frozen
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("visual_tokens_stage1" in row for row in rows)

    assert isinstance(LlavaNextForConditionalGeneration.from_pretrained(str(full)), LlavaNextForConditionalGeneration)
    request = [{"image": str(llava_next_checkpoint / "image_1.png"), "prompt": "<image>\nwhat colour is the shape"}]
    for folder in (full, full / "checkpoint-2"):  # every save loads: weights, processor, chat template
        pipeline = load_pipeline(folder, compression=compression, device="cpu")
        assert isinstance(pipeline.model, DuetLlavaNext) and len(pipeline.generate(request, max_new_tokens=3)) == 1

    # Resumed from the step-2 checkpoint (weights read back from transformers' names): step 3 is the same.
    resumed = tmp_path / "resumed"
    resume = ("--resume_from_checkpoint", str(full / "checkpoint-2"))
    train(train_args(llava_next_checkpoint, data, resumed, compression, "--max_steps", "3", *resume))
    assert losses(resumed)[3] == pytest.approx(losses(full)[3], rel=1e-5)


def test_llava_only_settings_are_refused(llava_next_checkpoint, tmp_path):
    data = write_data(tmp_path, mixed_samples())
    with pytest.raises(ValueError, match="--version chat_template"):
        train(train_args(llava_next_checkpoint, data, tmp_path / "a", "none", "--version", "v1"))
    with pytest.raises(ValueError, match="drop --vision_tower"):
        train(train_args(llava_next_checkpoint, data, tmp_path / "b", "none", "--vision_tower", "openai/clip"))


def script_env(checkpoint: Path, data: Path, out: Path, **overrides: str) -> dict[str, str]:
    from tests.test_distributed import free_port

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MODEL_FAMILY", None)  # the scripts ask the registry: config.json's model_type
    env.update(
        DS_ACCELERATOR="cpu", NUM_GPUS="2", MASTER_PORT=str(free_port()), MODEL=str(checkpoint),
        IMAGE_FOLDER=str(checkpoint), DATA_PATH=str(data), OUTPUT_DIR=str(out), BATCH_SIZE="1", GRAD_ACCUM="1",
        NUM_WORKERS="1", REPORT_TO="none", OMP_NUM_THREADS="1", SAVE_STEPS="100",
    )  # fmt: skip
    env.update(overrides)
    return env


def test_two_rank_zero3_finetune_through_the_scripts_with_t2v_and_a_text_only_rank_then_lora(
    llava_next_checkpoint, compression, tmp_path
):
    """MODEL= a LLaVA-NeXT checkpoint through scripts/v1_5/finetune.sh: 2 ZeRO-3 CPU ranks with T2V, batch 1 of
    [text-only, two images] so one rank has no image at every step (it still runs the tower once), then LoRA
    in this process and a merge; every result is a plain LLaVA-NeXT checkpoint."""
    from tests.test_distributed import run_script

    two = {"from": "human", "value": "<image>\n<image>\nwhat colour is the shape"}
    samples = [
        {"id": "text", "conversations": CHAT},
        {"id": "visual", "image": ["image_0.png", "image_2.png"], "conversations": [two, ANSWER]},
    ]
    data = write_data(tmp_path, samples)
    full = tmp_path / "full"
    env = script_env(llava_next_checkpoint, data, full, COMPRESSION=compression)
    result = run_script("finetune.sh", env, "--max_steps", "2", "--group_by_modality_length", "False")
    assert "the checkpoint's own projector is finetuned" in result.stderr
    assert json.loads((full / "run_config.json").read_text())["version"] == "chat_template"
    assert sorted(losses(full)) == [1, 2]
    original, trained = load_file(llava_next_checkpoint / "model.safetensors"), load_file(full / "model.safetensors")
    assert sorted(trained) == sorted(original)
    assert not torch.equal(original["language_model.lm_head.weight"], trained["language_model.lm_head.weight"])
    tower = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(original[tower], trained[tower])
    LlavaNextForConditionalGeneration.from_pretrained(str(full))
    pipeline = load_pipeline(full, compression=compression, device="cpu")
    requests = [{"image": str(llava_next_checkpoint / f"image_{i}.png"), "prompt": "what colour"} for i in range(3)]
    assert pipeline.generate(requests, batch_size=3, max_new_tokens=4) == pipeline.generate(
        requests, batch_size=1, max_new_tokens=4
    )

    # LoRA in this process (finetune_lora.sh's shared launch logic is covered for LLaVA and Qwen2.5-VL).
    lora_flags = ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2")
    lora = train(train_args(llava_next_checkpoint, data, tmp_path / "lora", compression, *lora_flags))
    merged = merge_lora_checkpoint(lora, tmp_path / "merged")
    weights = load_file(merged / "model.safetensors")
    assert sorted(weights) == sorted(original)
    changed = {key for key in original if not torch.equal(original[key], weights[key])}
    assert any("q_proj" in key for key in changed) and any("multi_modal_projector" in key for key in changed)
    LlavaNextForConditionalGeneration.from_pretrained(str(merged))
    assert isinstance(load_pipeline(merged, device="cpu").model, DuetLlavaNext)


def test_finetuning_trains_the_newline_token_and_pretraining_only_the_projector(llava_next_checkpoint):
    """LLaVA-NeXT's own finetuning trains ``image_newline`` with the LLM; the CLIP tower stays frozen."""
    from llava.model.stages import freeze_for_stage

    model = load_llava_next(llava_next_checkpoint)
    newline = model.hf_model.model.image_newline
    tower = list(model.hf_model.model.vision_tower.parameters())
    trainable = {id(parameter) for parameter in freeze_for_stage(model, "finetune")}
    assert id(newline) in trainable and not any(id(parameter) in trainable for parameter in tower)
    assert all(id(parameter) in trainable for parameter in model.projector.parameters())
    trainable = {id(parameter) for parameter in freeze_for_stage(model, "pretrain")}
    assert id(newline) not in trainable
    assert trainable == {id(parameter) for parameter in model.projector.parameters()}


def test_check_data_reads_llava_hf_data_through_the_processors_chat_template(llava_next_checkpoint, tmp_path):
    """llava-hf's templates read content lists (string content renders as nothing): check_data finds that out,
    so its text-token counts equal the training encoder's (BOS and the EOS after answers included)."""
    from llava.tools.check_data import main

    samples = [{"id": "a", "image": "image_0.png", "conversations": [QUESTION, ANSWER]}, {"conversations": CHAT}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    report = tmp_path / "report.json"
    lengths = tmp_path / "lengths.json"
    argv = ["--data_path", str(data), "--image_folder", str(llava_next_checkpoint), "--tokenizer",
            str(llava_next_checkpoint), "--version", "chat_template", "--image_token", "<image>",
            "--json-report", str(report), "--length-mix-out", str(lengths)]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(report.read_text())["num_samples"] == 2
    recorded = json.loads(lengths.read_text())
    text_tokens = sorted(row[0] for row in recorded["samples"])
    training = FAMILY.load_processors(
        ModelArguments(model_name_or_path=str(llava_next_checkpoint)), DataArguments(version="chat_template"), None
    )
    chat = encoder(llava_next_checkpoint, training, tmp_path)
    image = image_id(llava_next_checkpoint)
    expected = []
    for sample in samples:
        ids = chat.encode(sample["conversations"], images(llava_next_checkpoint, 0) if "image" in sample else [])
        expected.append(int((ids["input_ids"] != image).sum()))  # check_data counts visual slots apart
    assert text_tokens == sorted(expected)
