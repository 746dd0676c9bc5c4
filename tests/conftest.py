"""Shared fixtures: tiny random models that build in milliseconds on CPU."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig

from llava.hf_adapter import set_attn_implementation

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
    from llava.playground.synthetic import build_playground

    out = tmp_path_factory.mktemp("playground")
    build_playground(out, num_pretrain=48, num_finetune=48, seed=0, num_video_pretrain=16, num_video_finetune=24)
    return out
