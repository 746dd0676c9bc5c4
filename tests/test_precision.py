"""bf16 loading keeps the RoPE frequencies in float32, as transformers' own ``from_pretrained(dtype=bfloat16)``
does: every checkpoint format, the benchmark models, and the DeepSpeed bf16 engine (ZeRO-2 and ZeRO-3).

The logits checks run past position 600 with LLaMA-7B's head size (128), where frequencies rounded to bf16
shift the rotary angles by up to ~0.9 rad; each one also shows that rounding them would be caught.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    VideoLlavaConfig,
    VideoLlavaForConditionalGeneration,
)

from llava.constants import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.families.qwen import load_qwen_vl
from llava.hf_adapter import set_attn_implementation
from llava.model.loading import load_pretrained_model
from llava.model.precision import cast_model, check_buffer_precision, reduced_precision_buffers
from tests.conftest import IMAGE, PATCH_FEATURES, tiny_qwen_config, tiny_text_config, tiny_vision_config

BF16 = torch.bfloat16
TEXT_TOKENS = 660  # after one image (16 tokens) and a video: positions up to ~710, like a LLaVA-1.5 prompt
CHECKED_FROM = 600
# bf16 logits of the same weights through two code paths differ by rounding only; frequencies rounded to
# bf16 move them by an order of magnitude more (each test checks that too).
TOLERANCE = 0.05


WIDE_HEAD = dict(
    hidden_size=128, intermediate_size=256, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=2,
    initializer_range=0.1,
)  # fmt: skip
"""LLaMA-7B's rotary geometry (head size 128, theta 10000) in a 2-layer model, with weights large enough that
attention depends on position (at the default 0.02 a random model attends almost uniformly)."""


def wide_head_text_config():
    return tiny_text_config(**WIDE_HEAD)


def rope_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {buffer.dtype for name, buffer in model.named_buffers() if name.endswith("inv_freq")}


def text(length: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 110, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def expand(ids: list[int], slots: dict[int, tuple[int, int]]) -> torch.Tensor:
    """HF's expanded prompt: each of our one-slot sentinels becomes ``count`` copies of the HF token id."""
    out = []
    for token in ids:
        token_id, count = slots.get(token, (token, 1))
        out += [token_id] * count
    return torch.tensor([out])


def late_logit_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    return (got[:, CHECKED_FROM:].float() - expected[:, CHECKED_FROM:].float()).abs().max().item()


def assert_matches_and_rounding_would_not(ours, forward, expected: torch.Tensor) -> None:
    """``ours`` (bf16) matches ``expected`` past position 600; the same model with its RoPE buffers rounded
    to bf16 (what ``Module.to(bfloat16)`` did) does not."""
    assert rope_dtypes(ours) == {torch.float32}
    assert reduced_precision_buffers(ours) == []
    with torch.no_grad():
        error = late_logit_error(forward(ours), expected)
        rounded = copy.deepcopy(ours).to(BF16)
        assert rope_dtypes(rounded) == {BF16}
        rounded_error = late_logit_error(forward(rounded), expected)
    assert error <= TOLERANCE, error
    assert rounded_error > 4 * TOLERANCE, rounded_error


def hf_llava():
    torch.manual_seed(0)
    config = LlavaConfig(vision_config=tiny_vision_config(), text_config=wide_head_text_config(), image_token_index=120)
    set_attn_implementation(config, "sdpa")
    return LlavaForConditionalGeneration(config).eval()


def write_original_layout(hf_model, out):
    """The same weights as an original LLaVA-1.5 release: LLaMA keys + ``model.mm_projector.*``, tower apart."""
    tower_dir = out / "clip"
    hf_model.model.vision_tower.save_pretrained(tower_dir)
    projector = hf_model.model.multi_modal_projector
    state = {f"model.{key}": value for key, value in hf_model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = hf_model.lm_head.weight
    for index, layer in ((0, projector.linear_1), (2, projector.linear_2)):
        state[f"model.mm_projector.{index}.weight"] = layer.weight
        state[f"model.mm_projector.{index}.bias"] = layer.bias
    checkpoint = out / "llava-v1.5"
    checkpoint.mkdir()
    save_file({key: value.contiguous() for key, value in state.items()}, str(checkpoint / "model.safetensors"))
    config = hf_model.config.text_config.to_dict()
    config.update(
        model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower=str(tower_dir),
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_use_im_start_end=False, mm_use_im_patch_token=False,
    )  # fmt: skip
    (checkpoint / "config.json").write_text(json.dumps(config))
    return checkpoint


@pytest.mark.parametrize("layout", ["hf_port", "original"])
def test_llava_loads_in_bf16_with_fp32_rope_and_matches_transformers_past_position_600(tmp_path, layout):
    source = hf_llava()
    hf_dir = tmp_path / "hf"
    source.save_pretrained(hf_dir)
    checkpoint = hf_dir if layout == "hf_port" else write_original_layout(source, tmp_path)
    reference = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=BF16).eval()
    assert rope_dtypes(reference) == {torch.float32}  # what transformers does, and what we match
    ours = load_pretrained_model(checkpoint, dtype=BF16, attn_implementation="sdpa").eval()
    assert next(ours.parameters()).dtype == BF16

    ids = [1, IMAGE_TOKEN_ID, *text(TEXT_TOKENS)]
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=expand(ids, {IMAGE_TOKEN_ID: (120, 16)}), pixel_values=pixels.to(BF16)).logits
    assert expected.shape[1] > 660
    assert_matches_and_rounding_would_not(
        ours, lambda model: model(torch.tensor([ids]), pixel_values=pixels.to(BF16)).logits, expected
    )


def test_video_llava_loads_in_bf16_with_fp32_rope_and_matches_transformers_past_position_600(tmp_path):
    torch.manual_seed(0)
    config = VideoLlavaConfig(
        vision_config=tiny_vision_config(), text_config=wide_head_text_config(), image_token_index=120,
        video_token_index=121,
    )  # fmt: skip
    set_attn_implementation(config, "sdpa")
    VideoLlavaForConditionalGeneration(config).save_pretrained(tmp_path)
    reference = VideoLlavaForConditionalGeneration.from_pretrained(tmp_path, dtype=BF16).eval()
    assert rope_dtypes(reference) == {torch.float32}
    ours = load_pretrained_model(tmp_path, dtype=BF16, attn_implementation="sdpa").eval()
    ours.config.num_frames = 2

    ids = [1, IMAGE_TOKEN_ID, 5, VIDEO_TOKEN_ID, *text(TEXT_TOKENS)]
    generator = torch.Generator().manual_seed(2)
    image, video = torch.randn(1, 3, 56, 56, generator=generator), torch.randn(1, 2, 3, 56, 56, generator=generator)
    with torch.no_grad():
        expected = reference(
            input_ids=expand(ids, {IMAGE_TOKEN_ID: (120, 16), VIDEO_TOKEN_ID: (121, 34)}),
            pixel_values_images=image.to(BF16),
            pixel_values_videos=video.to(BF16),
        ).logits
    assert_matches_and_rounding_would_not(
        ours,
        lambda model: (
            model(torch.tensor([ids]), pixel_values=image.to(BF16), pixel_values_videos=video.to(BF16)).logits
        ),
        expected,
    )


def wide_head_qwen(out):
    """A random Qwen2.5-VL with Qwen2.5-VL-7B's M-RoPE geometry (head size 128, sections 16/24/24), saved."""
    mrope = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 10000.0}
    config = tiny_qwen_config(text={**WIDE_HEAD, "rope_parameters": mrope}, vision={"out_hidden_size": 128})
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out)


def test_qwen_vl_loads_in_bf16_with_fp32_mrope_and_vision_rope_and_matches_transformers(tmp_path):
    wide_head_qwen(tmp_path)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=BF16).eval()
    assert rope_dtypes(reference) == {torch.float32}
    ours = load_qwen_vl(tmp_path, dtype=BF16).eval()
    names = [name for name, _ in ours.named_buffers() if name.endswith("inv_freq")]
    assert any("visual" in name for name in names) and any("language_model" in name for name in names)
    ids = torch.tensor([[1, 152, *[IMAGE] * 4, 153, *text(TEXT_TOKENS)]])
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(16, PATCH_FEATURES, generator=torch.Generator().manual_seed(3)).to(BF16),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }
    with torch.no_grad():
        expected = reference(**inputs, mm_token_type_ids=(ids == IMAGE).int()).logits
    assert_matches_and_rounding_would_not(ours, lambda model: model(**inputs).logits, expected)


def test_own_format_and_benchmark_models_keep_rope_in_fp32(tmp_path, tiny_model):
    from llava.bench.shapes import build_model

    tiny_model.save_pretrained(tmp_path)
    loaded = load_pretrained_model(tmp_path, dtype=BF16, attn_implementation="sdpa")
    assert next(loaded.parameters()).dtype == BF16 and rope_dtypes(loaded) == {torch.float32}
    bench = build_model("small", dtype=BF16)
    assert next(bench.parameters()).dtype == BF16 and rope_dtypes(bench) == {torch.float32}


class WithBuffers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.register_buffer("running", torch.ones(2))  # persistent: loaded from checkpoints, cast like weights
        self.register_buffer("inv_freq", torch.tensor([1.0, 1 / 3]), persistent=False)
        self.register_buffer("positions", torch.arange(3), persistent=False)


def test_cast_model_casts_weights_and_persistent_buffers_only():
    module = cast_model(WithBuffers(), BF16)
    assert module.linear.weight.dtype == BF16 and module.running.dtype == BF16
    assert module.inv_freq.dtype == torch.float32 and module.inv_freq[1].item() == pytest.approx(1 / 3, rel=1e-7)
    assert module.positions.dtype == torch.long
    check_buffer_precision(module, "test")  # nothing rounded: no error


def test_a_rounded_rope_buffer_is_a_clear_error():
    module = WithBuffers().to(BF16)
    assert reduced_precision_buffers(module) == ["inv_freq"]
    with pytest.raises(RuntimeError, match=r"training engine: rotary buffers inv_freq are not float32"):
        check_buffer_precision(module, "training engine")


def hf_port_checkpoint(playground, out):
    """The playground's LLM and tower as a HF ``LlavaForConditionalGeneration`` checkpoint (what users start
    from: llava-hf/llava-1.5-7b-hf), with its tokenizer and image processor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    from llava.hf_adapter import load_image_processor

    language_model = AutoModelForCausalLM.from_pretrained(playground / "llm")
    tower = CLIPVisionModel.from_pretrained(playground / "vision_tower")
    config = LlavaConfig(
        vision_config=tower.config, text_config=language_model.config,
        image_token_index=language_model.config.vocab_size - 1,
    )  # fmt: skip
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(playground / "llm").save_pretrained(out)
    load_image_processor(playground / "vision_tower").save_pretrained(out)
    return out


def test_deepspeed_bf16_engine_keeps_rope_in_fp32_with_zero2_and_zero3_from_a_hf_port(bf16_text_only_runs):
    """The real launch path in bf16 on 2 CPU ranks, starting from a HF-port checkpoint (ZeRO-3 used to fail
    loading it: the port's partitioned weights were copied as empty tensors). The trainer's precision check
    runs on the engine's module after DeepSpeed cast it; both stages see the same first loss. (The runs are
    conftest's ``bf16_text_only_runs``, which tests/test_distributed.py's text-only-rank test shares.)"""
    from tests.test_distributed import losses

    first_losses = {}
    for zero in ("zero2", "zero3"):
        out, output = bf16_text_only_runs[zero]
        assert "parameters bfloat16, 2 RoPE buffers in float32" in output, zero
        first_losses[zero] = losses(out)[1]
        saved = load_pretrained_model(out, dtype=BF16)
        assert rope_dtypes(saved) == {torch.float32}
    assert first_losses["zero2"] == pytest.approx(first_losses["zero3"], rel=1e-2)
