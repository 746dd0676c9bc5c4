"""Finetuning LLaVA-OneVision (SigLIP, ``anyres_max_9``, Qwen2, videos): chat-template samples with labels on the
answers after the generation prompt, placeholders expanded to the model's own token counts (an image alone, several
images, a video), batches mixing them with a text-only sample, T2V compression in training (a batch's loss is the
sum of its samples'), saves in transformers' layout with tied embeddings, and the trainer and the launch scripts end
to end (resume, 2-rank ZeRO-3 with a text-only rank, LoRA + merge)."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlavaOnevisionForConditionalGeneration

from llava.arguments import ModelArguments
from llava.constants import IGNORE_INDEX
from llava.data.collator import DataCollatorForSupervisedDataset
from llava.data.dataset import DataArguments
from llava.families.base import Processors
from llava.families.llava_onevision import LlavaOnevisionFamily, load_llava_onevision
from llava.hf_adapter import llava_next_views_per_image, llava_onevision_image_features, llava_onevision_video_features
from llava.inference import load_pipeline
from llava.model.llava_next import DuetLlavaNext
from llava.training.lora import merge_lora_checkpoint
from llava.training.train import train
from tests.test_llava_onevision import PINPOINTS, VIDEO_SETTINGS, VIEW, tiny_onevision_config

FAMILY = LlavaOnevisionFamily()
FRAMES = 4  # of the fixture videos' 6
# The Hub checkpoints' chat template (chat_template.jinja of llava-hf/llava-onevision-*, as transformers' conversion
# script writes it): an answered turn starts with the generation prompt "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] }}{% endgeneration %}"
    "{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The variant of transformers' OneVision processor tests: an answered turn is rendered "<|im_start|>assistant \n" +
# answer, but the generation prompt is "<|im_start|>assistant\n".
SPACED_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ '\n' + content['text'] }}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}"
    "{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
T2V_YAML = "name: ov_t2v_test\nv2v: null\nt2v:\n  boundaries: [0.5]\n  keep_ratios: [0.5]\n  query: instruction\n"
QUESTION = {"from": "human", "value": "<image>\nwhat colour is the shape"}
ANSWER = {"from": "gpt", "value": "a red square"}
CHAT = [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hello"}]
TWO = {"from": "human", "value": "<image>\n<image>\nwhat colour is the shape"}
VIDEO = {"from": "human", "value": "<video>\nwhat colour is the shape"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The tiny LLaVA-OneVision with tied embeddings (as Qwen2-0.5B OneVision checkpoints), saved like the Hub's:
    transformers' own weights, a locally trained tokenizer with ``<image>``, ``<video>`` and Qwen's turn markers
    (``<|im_end|>`` its EOS), OneVision's image processor, llava-hf's chat template and video settings; wide, tall
    and large images and two 6-frame videos."""
    from PIL import Image
    from transformers import LlavaOnevisionImageProcessorPil

    from llava.data.video import write_video
    from llava.playground.tokenizer import train_playground_tokenizer

    out = tmp_path_factory.mktemp("onevision_training")
    tokenizer = train_playground_tokenizer(["what colour is the shape", "a red square", "hello there"] * 40, 300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>", "<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    config = tiny_onevision_config()
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = {"height": VIEW, "width": VIEW}
    LlavaOnevisionImageProcessorPil(image_grid_pinpoints=PINPOINTS, size=size).save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_SETTINGS), encoding="utf-8")
    for index, size in enumerate([(90, 40), (40, 90), (160, 160)]):  # (width, height)
        Image.new("RGB", size, (40 * index, 200, 30)).save(out / f"image_{index}.png")
    for index in range(2):
        frames = [Image.new("RGB", (48, 40), (30 * step, 20 * index, 90)) for step in range(6)]
        write_video(out / f"video_{index}.mp4", frames)
    return out


@pytest.fixture(scope="module")
def model(checkpoint) -> DuetLlavaNext:
    return load_llava_onevision(checkpoint).eval()


@pytest.fixture(scope="module")
def processors(checkpoint, model) -> Processors:
    model_args = ModelArguments(model_name_or_path=str(checkpoint))
    return FAMILY.load_processors(model_args, DataArguments(version="chat_template"), model)


def dataset(checkpoint: Path, processors: Processors, model: DuetLlavaNext, samples: list[dict], folder: Path, **data):
    path = folder / "train.json"
    path.write_text(json.dumps(samples))
    data_args = DataArguments(
        data_path=[str(path)], image_folder=str(checkpoint), video_folder=str(checkpoint), version="chat_template",
        num_frames=FRAMES, **data,
    )  # fmt: skip
    return FAMILY.dataset(data_args, processors, model)


def mixed_samples() -> list[dict]:
    return [
        {"id": "wide", "image": "image_0.png", "conversations": [QUESTION, ANSWER]},
        {"id": "tall+large", "image": ["image_1.png", "image_2.png"], "conversations": [TWO, ANSWER]},
        {"id": "video", "video": "video_0.mp4", "conversations": [VIDEO, ANSWER]},
        {"id": "text", "conversations": CHAT},
    ]


def model_counts(model: DuetLlavaNext, batch: dict) -> tuple[list[int], list[int]]:
    """Tokens the model's own feature paths give each image and each video of ``batch``."""
    with torch.no_grad():
        images = llava_onevision_image_features(
            model.hf_model, batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"]
        )
        videos = llava_onevision_video_features(model.hf_model, batch["pixel_values_videos"])
    return [int(part.shape[0]) for part in images], [int(videos.shape[1])] * int(videos.shape[0])


@pytest.mark.parametrize("template", ["hub", "spaced"])
def test_labels_cover_exactly_the_answers_after_the_generation_prompt(
    checkpoint, processors, model, tmp_path, template
):
    tokenizer = copy.deepcopy(processors.tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE if template == "hub" else SPACED_TEMPLATE
    own = Processors(tokenizer, processors.image_processor)
    chat = dataset(checkpoint, own, model, [{"conversations": CHAT}], tmp_path).encoder
    turns = [{"from": "system", "value": "be brief"}, QUESTION, ANSWER, *CHAT]
    item = chat.encode(turns, [str(checkpoint / "image_0.png")])
    ids, labels = item["input_ids"], item["labels"]
    learned = labels != IGNORE_INDEX
    assert torch.equal(labels[learned], ids[learned])
    # Each answer is learned through the template's end of turn (the tokenizer's EOS), nothing else.
    assert tokenizer.decode(ids[learned]).replace(" ", "") == "aredsquare<|im_end|>hello<|im_end|>"
    # The text before the first answer is exactly the pipeline's prompt (generation prompt, image expanded).
    first_answer = int(learned.nonzero()[0])
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the shape"}]},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    pads = int((ids == model.config.image_token_id).sum())
    assert tokenizer.decode(ids[:first_answer]) == prompt.replace("<image>", "<image>" * pads)
    # The Hub's template: the whole text is the template's own; the spaced one: its "assistant \n" header of an
    # answered turn is replaced by the generation prompt (what inference asks for).
    ours = tokenizer.decode(ids).replace("<image>" * pads, "<image>")
    messages += [{"role": "assistant", "content": [{"type": "text", "text": "a red square"}]}]
    messages += [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    messages += [{"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if template == "spaced":
        assert rendered.count("<|im_start|>assistant \n") == 2
        rendered = rendered.replace("<|im_start|>assistant \n", "<|im_start|>assistant\n")
    assert ours.replace(" ", "") == rendered.replace(" ", "")


def test_a_template_that_rewrites_an_answer_is_refused(processors):
    """Answers after the generation prompt need the template to write an answer's text as it is."""
    from llava.data.chat_template import ChatTemplateEncoder
    from llava.data.templates import ConversationError

    tokenizer = copy.deepcopy(processors.tokenizer)
    upper = "content['text'] | upper }}{% endgeneration"
    tokenizer.chat_template = SPACED_TEMPLATE.replace("content['text'] }}{% endgeneration", upper)
    assert upper in tokenizer.chat_template
    encoder = ChatTemplateEncoder(tokenizer, None, 5, content_lists=True, answers_after_generation_prompt=True)
    with pytest.raises(ConversationError, match="does not render an answer's text as it is"):
        encoder.tokenize(CHAT)


def test_placeholders_are_the_models_own_token_counts_and_truncation_recounts_kept_images(
    checkpoint, processors, model, tmp_path
):
    data = dataset(checkpoint, processors, model, mixed_samples()[:3], tmp_path)
    image, video = model.config.image_token_id, model.config.video_token_id
    alone, pair, clip = (data[index] for index in range(3))
    # An image alone: its AnyRes views; two images: one base view each (batch_num_images), as HF's processor.
    views = llava_next_views_per_image(model.hf_model, alone["image_sizes"])
    assert alone["pixel_values"].shape == (views[0], 3, VIEW, VIEW) and views[0] > 1
    assert pair["pixel_values"].shape == (2, 3, VIEW, VIEW) and pair["batch_num_images"].tolist() == [2]
    for item in (alone, pair):
        with torch.no_grad():
            features = llava_onevision_image_features(
                model.hf_model, item["pixel_values"], item["image_sizes"], item["batch_num_images"]
            )
        assert int((item["input_ids"] == image).sum()) == sum(int(part.shape[0]) for part in features)
    assert [int(part.shape[0]) for part in features] == [10, 10]
    with torch.no_grad():
        frames = llava_onevision_video_features(model.hf_model, clip["pixel_values_videos"])
    assert clip["pixel_values_videos"].shape == (1, FRAMES, 3, VIEW, VIEW)
    assert int((clip["input_ids"] == video).sum()) == frames.shape[1] == FRAMES * 4 + 1
    # The same pixels and counts as the pipeline prepares for the same request.
    pipeline = load_pipeline(checkpoint, device="cpu")
    prepared = pipeline.prepare([{"image": [str(checkpoint / "image_1.png"), str(checkpoint / "image_2.png")],
                                  "prompt": "what colour is the shape"}])  # fmt: skip
    assert torch.equal(prepared["pixel_values"][:, 0], pair["pixel_values"])
    assert int((prepared["input_ids"] == image).sum()) == int((pair["input_ids"] == image).sum())

    # Two turns with an image each: a limit inside the second image drops it; the first, now alone in its sample,
    # is processed again (AnyRes views, batch_num_images [1]) and counted as the model counts it.
    chat = data.encoder
    turns = [QUESTION, {"from": "gpt", "value": "a red square " * 30}, {"from": "human", "value": "<image>\nhello"},
             {"from": "gpt", "value": "hello"}]  # fmt: skip
    paths = [str(checkpoint / "image_0.png"), str(checkpoint / "image_1.png")]
    whole = chat.encode(turns, paths)
    assert whole["batch_num_images"].tolist() == [2]
    second = int((whole["input_ids"] == image).nonzero()[10])
    chat.max_length = second + 3
    cut = chat.encode(turns, paths)
    assert cut["batch_num_images"].tolist() == [1] and cut["pixel_values"].shape[0] == views[0]
    with torch.no_grad():
        features = llava_onevision_image_features(
            model.hf_model, cut["pixel_values"], cut["image_sizes"], cut["batch_num_images"]
        )
    assert int((cut["input_ids"] == image).sum()) == int(features[0].shape[0]) > 10
    assert len(cut["input_ids"]) <= second + 3 and bool((cut["labels"] != IGNORE_INDEX).any())


def test_collated_batch_of_images_several_images_a_video_and_text_is_what_transformers_takes(
    checkpoint, processors, model, tmp_path
):
    data = dataset(checkpoint, processors, model, mixed_samples(), tmp_path)
    batch = DataCollatorForSupervisedDataset(processors.tokenizer)([data[index] for index in range(4)])
    assert batch["batch_num_images"].tolist() == [1, 2] and batch["image_sizes"].shape == (3, 2)
    assert batch["pixel_values_videos"].shape == (1, FRAMES, 3, VIEW, VIEW)
    images, videos = model_counts(model, batch)
    ids = batch["input_ids"]
    per_row = (ids == model.config.image_token_id).sum(dim=1).tolist()
    assert per_row == [images[0], images[1] + images[2], 0, 0]
    assert (ids == model.config.video_token_id).sum(dim=1).tolist() == [0, 0, videos[0], 0]
    # Right-padded training batch: the wrapper's logits are transformers' own.
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes",
                                          "batch_num_images", "pixel_values_videos")}  # fmt: skip
    with torch.no_grad():
        expected = model.hf_model(**inputs).logits
        ours = model(**inputs).logits
    real = batch["attention_mask"].bool()
    assert (ours - expected)[real].abs().max() <= 1e-4


@pytest.mark.parametrize("preset", ["t2v", "anyres_duet_third"])
def test_compressed_training_loss_of_a_batch_is_the_sum_of_its_samples(checkpoint, processors, model, tmp_path, preset):
    """T2V alone, and V2V per view group + T2V (``anyres_duet_third``)."""
    data = dataset(checkpoint, processors, model, mixed_samples(), tmp_path)
    collate = DataCollatorForSupervisedDataset(processors.tokenizer)
    items = [data[index] for index in range(4)]
    (tmp_path / "t2v.yaml").write_text(T2V_YAML)
    trained = load_llava_onevision(checkpoint, compression=str(tmp_path / "t2v.yaml") if preset == "t2v" else preset)
    trained.train()
    assert trained.stage_plan.boundaries == ((2,) if preset == "t2v" else (2, 3))

    def inputs(batch: dict) -> dict:
        return {key: value for key, value in batch.items() if key not in ("sample_ids", "num_skipped_samples")}

    batch = inputs(collate(items))
    total = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    output = trained(**batch, num_items_in_batch=total)
    alone = sum(trained(**inputs(collate([item])), num_items_in_batch=total).loss for item in items)
    torch.testing.assert_close(output.loss, alone, atol=1e-5, rtol=1e-5)
    assert output.visual_tokens_per_layer[-1] < output.visual_tokens_per_layer[0]
    output.loss.backward()
    assert trained.projector.linear_1.weight.grad.abs().sum() > 0
    # Whatever a batch holds (an image, two, a video, text only), the SigLIP embeddings and the projector run twice:
    # once for images, once for videos, blank ones where it has none (ZeRO-3: every rank gathers alike).
    embeddings = trained.hf_model.model.vision_tower.embeddings
    calls: list[int] = []
    hooks = [module.register_forward_hook(lambda *_: calls.append(1)) for module in (embeddings, trained.projector)]
    for item in items:
        calls.clear()
        trained.zero_grad()
        trained(**inputs(collate([item]))).loss.backward()
        assert len(calls) == 4 and trained.projector.linear_1.weight.grad is not None
    for hook in hooks:
        hook.remove()


def test_saves_use_transformers_names_with_tied_embeddings_and_load_back_exactly(checkpoint, model, tmp_path):
    original = load_file(checkpoint / "model.safetensors")  # what transformers' save_pretrained wrote
    assert "language_model.lm_head.weight" not in original  # tied: the embeddings only
    model.save_pretrained(tmp_path / "one")
    saved = load_file(tmp_path / "one" / "model.safetensors")
    assert sorted(saved) == sorted(original) and all(torch.equal(saved[key], original[key]) for key in original)
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(str(tmp_path / "one"))
    expected = model.hf_model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in reloaded.state_dict().items())
    # A checkpoint's state dict loads under the module names, strictly (the tied head from the embeddings).
    fresh = load_llava_onevision(checkpoint)
    with torch.no_grad():
        for parameter in fresh.parameters():
            parameter.zero_()
    fresh.load_state_dict(original)
    assert all(torch.equal(value, expected[key]) for key, value in fresh.hf_model.state_dict().items())
    # Untied (7B-style): the head is saved under transformers' name.
    untied = DuetLlavaNext(LlavaOnevisionForConditionalGeneration(tiny_onevision_config()))
    untied.hf_model.save_pretrained(tmp_path / "theirs")
    untied.save_pretrained(tmp_path / "ours")
    theirs, ours = (load_file(tmp_path / name / "model.safetensors") for name in ("theirs", "ours"))
    assert "language_model.lm_head.weight" in ours and sorted(ours) == sorted(theirs)


def train_args(checkpoint: Path, data: Path, out: Path, compression: str, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(checkpoint), "--version", "chat_template", "--data_path", str(data),
        "--image_folder", str(checkpoint), "--video_folder", str(checkpoint), "--num_frames", str(FRAMES),
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none",
        "--dataloader_num_workers", "0", "--seed", "3", "--compression", compression, *extra,
    ]  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def write_data(folder: Path, samples: list[dict]) -> Path:
    path = folder / "train.json"
    path.write_text(json.dumps(samples))
    return path


def test_finetune_saves_checkpoints_that_load_in_transformers_and_the_pipeline_and_resume(checkpoint, tmp_path):
    data = write_data(tmp_path, mixed_samples() * 2)
    args = ("--save_steps", "2", "--gradient_checkpointing", "True", "--group_by_modality_length", "False")
    full = train(train_args(checkpoint, data, tmp_path / "full", "anyres_pdrop_third", "--max_steps", "3", *args))
    original, trained = load_file(checkpoint / "model.safetensors"), load_file(full / "model.safetensors")
    assert sorted(trained) == sorted(original)  # transformers' layout, the tied head stored once
    changed = {key for key in original if not torch.equal(original[key], trained[key])}
    assert any("multi_modal_projector" in key for key in changed)
    assert any("layers.0.self_attn" in key for key in changed)
    assert not any(key.startswith("vision_tower.") for key in changed)  # frozen
    assert isinstance(LlavaOnevisionForConditionalGeneration.from_pretrained(str(full)), torch.nn.Module)
    request = [{"video": str(checkpoint / "video_1.mp4"), "image": str(checkpoint / "image_2.png"), "prompt": "hi"}]
    for folder in (full, full / "checkpoint-2"):  # every save loads: weights, tokenizer, template, video settings
        pipeline = load_pipeline(folder, compression="anyres_pdrop_third", device="cpu")
        pipeline.video_frames = FRAMES
        assert isinstance(pipeline.model, DuetLlavaNext) and len(pipeline.generate(request, max_new_tokens=3)) == 1
    resumed = tmp_path / "resumed"
    resume = ("--resume_from_checkpoint", str(full / "checkpoint-2"))
    train(train_args(checkpoint, data, resumed, "anyres_pdrop_third", "--max_steps", "3", *args, *resume))
    assert losses(resumed)[3] == pytest.approx(losses(full)[3], rel=1e-5)
    with pytest.raises(ValueError, match="--version chat_template"):
        train(train_args(checkpoint, data, tmp_path / "a", "none", "--version", "v1"))
    with pytest.raises(ValueError, match="drop --video_tower"):
        train(train_args(checkpoint, data, tmp_path / "b", "none", "--video_tower", "openai/clip"))


def script_env(checkpoint: Path, data: Path, out: Path, **overrides: str) -> dict[str, str]:
    from tests.test_distributed import free_port

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MODEL_FAMILY", None)  # the scripts ask the registry: config.json's model_type
    env.update(
        DS_ACCELERATOR="cpu", NUM_GPUS="2", MASTER_PORT=str(free_port()), MODEL=str(checkpoint),
        IMAGE_FOLDER=str(checkpoint), VIDEO_FOLDER=str(checkpoint), NUM_FRAMES=str(FRAMES), DATA_PATH=str(data),
        OUTPUT_DIR=str(out), BATCH_SIZE="1", GRAD_ACCUM="1", NUM_WORKERS="1", REPORT_TO="none", OMP_NUM_THREADS="1",
        SAVE_STEPS="100",
    )  # fmt: skip
    env.update(overrides)
    return env


def test_two_rank_zero3_finetune_through_the_scripts_with_t2v_and_a_text_only_rank_then_lora(checkpoint, tmp_path):
    """MODEL= a LLaVA-OneVision checkpoint through scripts/v1_5/finetune.sh: 2 ZeRO-3 CPU ranks with T2V
    (anyres_pdrop_third), batch 1 of [text-only, two images + a video] so one rank has neither at every step (it
    still runs the tower for both), then LoRA in this process and a merge; every result is a
    plain LLaVA-OneVision checkpoint."""
    from tests.test_distributed import run_script

    both = {"from": "human", "value": "<image>\n<image>\n<video>\nwhat colour is the shape"}
    samples = [
        {"id": "text", "conversations": CHAT},
        {"id": "visual", "image": ["image_0.png", "image_2.png"], "video": "video_0.mp4",
         "conversations": [both, ANSWER]},
    ]  # fmt: skip
    data = write_data(tmp_path, samples)
    full = tmp_path / "full"
    env = script_env(checkpoint, data, full, COMPRESSION="anyres_pdrop_third")
    result = run_script("finetune.sh", env, "--max_steps", "2", "--group_by_modality_length", "False")
    assert "LLaVA-OneVision: the checkpoint's own projector is finetuned" in result.stderr
    run_config = json.loads((full / "run_config.json").read_text())
    assert run_config["version"] == "chat_template"
    assert (
        run_config["video_folder"] == str(checkpoint) and run_config["num_frames"] == FRAMES
    )  # VIDEO_FOLDER, NUM_FRAMES
    assert sorted(losses(full)) == [1, 2]
    original, trained = load_file(checkpoint / "model.safetensors"), load_file(full / "model.safetensors")
    assert sorted(trained) == sorted(original)
    embeddings = "language_model.model.embed_tokens.weight"  # the tied head: trained, stored once
    assert not torch.equal(original[embeddings], trained[embeddings])
    tower = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(original[tower], trained[tower])
    pipeline = load_pipeline(full, compression="anyres_pdrop_third", device="cpu")
    requests = [{"image": str(checkpoint / f"image_{i}.png"), "prompt": "what colour"} for i in range(3)]
    assert pipeline.generate(requests, batch_size=3, max_new_tokens=4) == pipeline.generate(
        requests, batch_size=1, max_new_tokens=4
    )

    # LoRA in this process (finetune_lora.sh's shared launch logic is covered for LLaVA and Qwen2.5-VL).
    lora_flags = ("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2")
    lora = train(train_args(checkpoint, data, tmp_path / "lora", "anyres_pdrop_third", *lora_flags))
    merged = merge_lora_checkpoint(lora, tmp_path / "merged")
    weights = load_file(merged / "model.safetensors")
    assert sorted(weights) == sorted(original)
    changed = {key for key in original if not torch.equal(original[key], weights[key])}
    assert any("q_proj" in key for key in changed) and any("multi_modal_projector" in key for key in changed)
    assert not any(key.startswith("vision_tower.") for key in changed)
    assert isinstance(load_pipeline(merged, device="cpu").model, DuetLlavaNext)


def test_scripts_refuse_a_video_tower(tmp_path):
    """LLaVA-OneVision's SigLIP tower encodes the frames: VIDEO_TOWER is refused (VIDEO_FOLDER and NUM_FRAMES reach
    the trainer: the 2-rank script test trains on a video)."""
    import subprocess

    from tests.test_scripts import dry_run

    env = {"MODEL_FAMILY": "llava_onevision", "DATA_PATH": "d.json", "VIDEO_FOLDER": "videos"}
    with pytest.raises(subprocess.CalledProcessError) as refused:
        dry_run("finetune_lora.sh", tmp_path, **env, VIDEO_TOWER="openai/clip")
    assert "VIDEO_TOWER does not apply to LLaVA-OneVision" in refused.value.stderr
