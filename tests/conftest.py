"""Shared fixtures: tiny random models that build in milliseconds on CPU."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (pytest -n) share the cores: one OpenMP thread per worker and per process it starts, or
    # the workers' spinning OpenMP threads slow each other down many times over (measured: 3.4 s -> 33 s).
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # after the thread count is set
from transformers import CLIPVisionConfig, LlamaConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from llava.hf_adapter import set_attn_implementation

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # also when torch was imported before this file

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_vision_config(**overrides) -> CLIPVisionConfig:
    fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    )
    fields.update(overrides)
    config = CLIPVisionConfig(**fields)
    set_attn_implementation(config, "sdpa")
    return config


def tiny_text_config(**overrides) -> LlamaConfig:
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    config = LlamaConfig(**fields)
    set_attn_implementation(config, "sdpa")
    return config


IMAGE = 150  # the tiny Qwen2.5-VL's image placeholder id
PATCH_FEATURES = 3 * 2 * 14 * 14  # Qwen2.5-VL patch: channels x temporal patch x patch x patch


def tiny_qwen_config(text: dict | None = None, vision: dict | None = None) -> Qwen2_5_VLConfig:
    """A tiny Qwen2.5-VL config (SDPA everywhere); ``text``/``vision`` override fields of the two parts."""
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=160, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ) | (text or {}),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ) | (vision or {}),
        image_token_id=IMAGE, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153,
    )  # fmt: skip
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = "sdpa"
    return config


def tiny_qwen() -> Qwen2_5_VLForConditionalGeneration:
    """A random Qwen2.5-VL: 2-block vision transformer (window + full attention), 4-layer Qwen2 decoder."""
    config = tiny_qwen_config()
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture
def tiny_model():
    """A random DuetLlavaForCausalLM: 56 px images, 16 patches, 4 decoder layers."""
    from llava.model.config import DuetLlavaConfig
    from llava.model.modeling import DuetLlavaForCausalLM

    torch.manual_seed(0)
    config = DuetLlavaConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config())
    return DuetLlavaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def playground(tmp_path_factory):
    """A small playground (tiny CLIP-L/14-336-geometry tower, tiny LLaMA, 48+48 samples, 16+24 video
    samples with a 224 px video tower), built once."""
    from llava.playground.builder import build_playground

    out = tmp_path_factory.mktemp("playground")
    build_playground(out, num_pretrain=48, num_finetune=48, seed=0, num_video_pretrain=16, num_video_finetune=24)
    return out


@pytest.fixture(scope="session")
def bf16_text_only_runs(playground, tmp_path_factory):
    """One bf16 finetune per ZeRO stage through ``scripts/v1_5/finetune.sh`` on 2 CPU ranks, starting from the
    playground as a HF-port checkpoint (``tests.test_precision.hf_port_checkpoint``), on [text-only, image] at batch
    1 for 2 steps: at every step one rank is text-only. Shared by tests/test_precision.py (the engine's precision)
    and tests/test_distributed.py (a text-only rank's collectives still match): one launch per stage, not two.
    Maps ``"zero2"`` / ``"zero3"`` to (output dir, the launch's stdout + stderr).

    Under parallel workers the two consumers usually run in different workers: the first one builds the runs in
    the run's shared temporary folder, under a file lock, and the other reads them (pytest-xdist's recipe for a
    session fixture built once), instead of launching both stages again."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return launch_bf16_text_only_runs(playground, tmp_path_factory.mktemp("bf16_text_only"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, the parent of every worker's own
    record = shared / "bf16_text_only.json"
    with FileLock(str(shared / "bf16_text_only.lock")):
        if not record.exists():
            runs = launch_bf16_text_only_runs(playground, shared / "bf16_text_only")
            record.write_text(json.dumps({zero: [str(out), output] for zero, (out, output) in runs.items()}))
    return {zero: (Path(out), output) for zero, (out, output) in json.loads(record.read_text()).items()}


def launch_bf16_text_only_runs(playground: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """The launches of ``bf16_text_only_runs``, in ``root``."""
    from tests.test_distributed import REPO, finetune_env, run_script
    from tests.test_precision import hf_port_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    checkpoint = hf_port_checkpoint(playground, root / "llava-hf")
    samples = json.loads((playground / "finetune.json").read_text())
    text_only = next(sample for sample in samples if "image" not in sample)
    with_image = next(sample for sample in samples if isinstance(sample.get("image"), str))
    data = root / "mixed.json"
    data.write_text(json.dumps([text_only, with_image]))

    def launch(zero: str) -> tuple[Path, str]:
        out = root / zero
        env = finetune_env(
            playground, out, MODEL=str(checkpoint), PRECISION="bf16", DATA_PATH=str(data), BATCH_SIZE="1",
            SAVE_STEPS="100", ZERO=str(REPO / "scripts" / f"{zero}.json"),
        )  # fmt: skip
        result = run_script("finetune.sh", env, "--max_steps", "2", "--group_by_modality_length", "False")
        return out, result.stdout + result.stderr

    # The two launches are independent (own port, own output folder): run them side by side, so one's
    # single-process phases (launcher start, exit) overlap the other's ranks.
    with ThreadPoolExecutor(2) as pool:
        futures = {zero: pool.submit(launch, zero) for zero in ("zero2", "zero3")}
        return {zero: future.result() for zero, future in futures.items()}


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif item['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory):
    """A tiny Qwen2.5-VL saved like the Hub's: weights, locally trained tokenizer with Qwen's special tokens
    and chat template, Qwen's image processor (dynamic resolution), and a few images."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessorPil

    from llava.data.video import write_video
    from llava.playground.tokenizer import train_playground_tokenizer

    out = tmp_path_factory.mktemp("qwen")
    tokenizer = train_playground_tokenizer(["what colour is the shape", "a red square", "hello there"] * 40, 300)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    model = tiny_qwen()
    model.config.image_token_id = ids["<|image_pad|>"]
    model.config.video_token_id = ids["<|video_pad|>"]
    model.config.vision_start_token_id = ids["<|vision_start|>"]
    model.config.vision_end_token_id = ids["<|vision_end|>"]
    model.resize_token_embeddings(len(tokenizer))
    model.generation_config.eos_token_id = [ids["<|im_end|>"], tokenizer.eos_token_id]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2).save_pretrained(out)
    for index, size in enumerate([(90, 70), (60, 60), (120, 80)]):
        Image.new("RGB", size, (40 * index, 200, 30)).save(out / f"image_{index}.png")
    frames = [np.full((56, 84, 3), 30 * step, dtype=np.uint8) for step in range(6)]
    write_video(out / "clip.mp4", frames, fps=4)  # 1.5 s
    return out


LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)  # llava-hf's llava-v1.6-vicuna template (every content a list; no end-of-sequence after answers)


@pytest.fixture(scope="session")
def llava_next_checkpoint(tmp_path_factory):
    """The tiny LLaVA-NeXT (tests/test_llava_next.py's) saved like the Hub's: weights, a locally trained tokenizer
    with ``<image>``, and transformers' own ``LlavaNextProcessor`` (AnyRes image processor with tiny pinpoints,
    llava-hf's vicuna chat template); wide, tall and square images."""
    from PIL import Image
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    from llava.playground.tokenizer import train_playground_tokenizer
    from tests.test_llava_next import PINPOINTS, TILE, tiny_llava_next

    out = tmp_path_factory.mktemp("llava_next")
    tokenizer = train_playground_tokenizer(["what colour is the shape", "a red square", "hello there"] * 40, 300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=PINPOINTS, size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
    )  # fmt: skip
    model = tiny_llava_next()
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for index, size in enumerate([(90, 40), (40, 90), (60, 60)]):  # (width, height)
        Image.new("RGB", size, (40 * index, 200, 30)).save(out / f"image_{index}.png")
    return out


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """``(model_dir, playground)``: a playground LLaVA-1.5 finetuned for one step at a tiny learning rate (it stays
    near its random init, so it writes long, varied answers), for the serving tests (CLI, API, page, load)."""
    from llava.playground.builder import build_playground
    from llava.training.train import train
    from tests.run_args import finetune_args

    root = tmp_path_factory.mktemp("chat_model")
    build_playground(root / "playground", num_pretrain=2, num_finetune=12, seed=0)
    train(
        finetune_args(
            root / "playground", root / "model", "--per_device_train_batch_size", "1", "--max_steps", "1",
            "--save_strategy", "no", "--learning_rate", "1e-7", "--group_by_modality_length", "False", "--seed", "42",
        )
    )  # fmt: skip
    return root / "model", root / "playground"
