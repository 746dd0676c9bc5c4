"""The composite model: splicing, loss, save/load, checkpoint import, batched generation."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from llava.hf_adapter import set_attn_implementation
from llava.model.contract import FORWARD_KEYWORDS, DuetOutput, VisionLanguageModel
from llava.model.loading import convert_hf_llava, load_pretrained_model
from llava.model.modeling import DuetLlavaOutput
from llava.model.projector import build_projector
from llava.model.sampling import SamplingOptions
from llava.model.splice import VisualSegments, splice_visual_tokens
from tests.conftest import tiny_text_config, tiny_vision_config

IMG = IMAGE_TOKEN_ID


def expand_slots(ids: torch.Tensor, token: int, count: int) -> torch.Tensor:
    rows = [[t for v in row.tolist() for t in ([token] * count if v == IMG else [v])] for row in ids]
    return torch.tensor(rows)


def test_hf_llava_conversion_matches_logits():
    torch.manual_seed(0)
    hf_config = LlavaConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(), image_token_index=120)
    set_attn_implementation(hf_config, "sdpa")
    hf_model = LlavaForConditionalGeneration(hf_config).eval()
    ours = convert_hf_llava(hf_model).eval()
    pixels = torch.randn(4, 3, 56, 56)
    ids = torch.tensor([[1, 5, IMG, 7, 8, 9, IMG], [1, IMG, 4, 5, IMG, 7, 8]])
    with torch.no_grad():
        expected = hf_model(input_ids=expand_slots(ids, 120, 16), pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_original_llava_checkpoint_import(tmp_path, tiny_model):
    # Write the model in the original LLaVA-1.5 layout: LLaMA keys + model.mm_projector.*,
    # the tower in its own folder named by mm_vision_tower.
    tower_dir = tmp_path / "clip"
    tiny_model.vision_tower.vision_model.save_pretrained(tower_dir)
    state = {f"model.mm_projector.{k}": v for k, v in tiny_model.projector.state_dict().items()}
    state.update({k: v.contiguous() for k, v in tiny_model.language_model.state_dict().items()})
    checkpoint = tmp_path / "llava-v1.5"
    checkpoint.mkdir()
    save_file(state, str(checkpoint / "model.safetensors"))
    config = tiny_model.config.text_config.to_dict()
    config.update(
        model_type="llava_llama",
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower=str(tower_dir),
        mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_hidden_size=32,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
    )
    (checkpoint / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained_model(checkpoint, attn_implementation="sdpa").eval()
    ids = torch.tensor([[1, IMG, 4, 5]])
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.allclose(loaded(ids, pixel_values=pixels).logits, tiny_model(ids, pixel_values=pixels).logits)
    assert loaded.config.image_aspect_ratio == "pad"


def test_save_and_load_roundtrip_safetensors(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors")), "weights must be saved as safetensors"
    loaded = load_pretrained_model(tmp_path, attn_implementation="sdpa").eval()
    ids = torch.tensor([[1, IMG, 4, 5, IMG, 6]])
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=pixels).logits, tiny_model(ids, pixel_values=pixels).logits)


def test_unknown_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        load_pretrained_model(tmp_path)


def test_splice_handles_varied_counts_several_images_and_text_only_rows():
    hidden = 4
    ids = torch.tensor([[1, IMG, 3, IMG, 5], [1, 2, 3, 0, 0], [1, IMG, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    text = torch.arange(3 * 5, dtype=torch.float).view(3, 5, 1).expand(3, 5, hidden)
    counts = torch.tensor([2, 3, 1])
    visual = -torch.arange(1, 7, dtype=torch.float).view(6, 1).expand(6, hidden)
    labels = ids.clone()
    merged = splice_visual_tokens(ids, text, VisualSegments(visual, counts), IMG, mask, labels, left_padding=False)
    assert merged.inputs_embeds.shape == (3, 8, hidden)
    first = merged.inputs_embeds[0, :, 0].tolist()
    assert first == [0, -1, -2, 2, -3, -4, -5, 4]
    assert merged.visual_mask[0].tolist() == [False, True, True, False, True, True, True, False]
    assert merged.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert merged.inputs_embeds[2, :4, 0].tolist() == [10, -6, 12, 13]
    assert (merged.labels[merged.visual_mask] == IGNORE_INDEX).all()
    assert merged.labels[0, 3].item() == 3


def test_splice_left_padding_aligns_last_tokens():
    ids = torch.tensor([[0, 1, IMG, 7], [1, 5, IMG, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    text = torch.randn(2, 4, 3)
    visual = torch.randn(5, 3)
    segments = VisualSegments(visual, torch.tensor([2, 3]))
    merged = splice_visual_tokens(ids, text, segments, IMG, mask, left_padding=True)
    assert merged.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert merged.position_ids[0, -1].item() == 3 and merged.position_ids[1, -1].item() == 5
    assert torch.equal(merged.inputs_embeds[0, -1], text[0, -1])


def test_wrong_image_count_is_a_clear_error(tiny_model):
    ids = torch.tensor([[1, IMG, 4, IMG]])
    with pytest.raises(ValueError, match="hold 2 image and 0 video slots but 1 images"):
        tiny_model(ids, pixel_values=torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match="2 image slots but no image pixels"):
        tiny_model(ids)


def test_loss_ignores_visual_and_masked_positions(tiny_model):
    ids = torch.tensor([[1, IMG, 4, 5, 6], [1, 9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 9, 10, -100, -100]])
    pixels = torch.randn(1, 3, 56, 56)
    out = tiny_model(ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    assert out.num_label_tokens.item() == 4
    out.loss.backward()
    assert tiny_model.projector[0].weight.grad is not None
    # Same loss by hand from full logits.
    with torch.no_grad():
        full = tiny_model(ids, attention_mask=mask, pixel_values=pixels)
        merged_labels = tiny_model.embed_inputs(ids, pixels, mask, labels).labels
    logits = full.logits[:, :-1].reshape(-1, full.logits.shape[-1])
    expected = torch.nn.functional.cross_entropy(logits, merged_labels[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_batched_cached_generation_matches_single_and_uncached(tiny_model):
    # Left-padded batch: a text-only prompt, a one-image prompt and a two-image prompt.
    ids = torch.tensor([[0, 0, 0, 1, 5, 6, 7], [0, 0, 1, IMG, 4, 5, 6], [1, IMG, 3, IMG, 4, 5, 6]])
    mask = (ids != 0).long()
    pixels = torch.randn(3, 3, 56, 56)
    batched = tiny_model.generate(ids, mask, pixels, max_new_tokens=8, eos_token_id=2)
    uncached = tiny_model.generate(ids, mask, pixels, max_new_tokens=8, eos_token_id=2, use_cache=False)
    assert torch.equal(batched, uncached)
    image_of_row = [[], [0], [1, 2]]
    for row in range(3):
        keep = mask[row].bool()
        single_pixels = pixels[image_of_row[row]] if image_of_row[row] else None
        single = tiny_model.generate(ids[row : row + 1, keep], None, single_pixels, max_new_tokens=8, eos_token_id=2)
        assert torch.equal(single[0], batched[row, : single.shape[1]])


def test_sampling_is_reproducible_with_a_generator(tiny_model):
    ids = torch.tensor([[1, IMG, 4, 5]])
    pixels = torch.randn(1, 3, 56, 56)
    draws = [
        tiny_model.generate(
            ids,
            None,
            pixels,
            max_new_tokens=6,
            do_sample=True,
            top_p=0.9,
            temperature=0.8,
            generator=torch.Generator().manual_seed(3),
        )
        for _ in range(2)
    ]
    assert torch.equal(draws[0], draws[1])


def test_sampling_options_give_what_the_keywords_give(tiny_model):
    ids = torch.tensor([[1, IMG, 4, 5]])
    pixels = torch.randn(1, 3, 56, 56)
    keywords = {"max_new_tokens": 6, "do_sample": True, "top_p": 0.9, "temperature": 0.8}
    by_keywords = tiny_model.generate(ids, None, pixels, generator=torch.Generator().manual_seed(3), **keywords)
    options = SamplingOptions(**keywords, generator=torch.Generator().manual_seed(3))
    assert torch.equal(tiny_model.generate(ids, None, pixels, sampling=options), by_keywords)
    # A keyword replaces the same field of ``sampling``.
    options = SamplingOptions(**keywords, generator=torch.Generator().manual_seed(3))
    shorter = tiny_model.generate(ids, None, pixels, sampling=options, max_new_tokens=3)
    assert torch.equal(shorter, by_keywords[:, :3])


def test_unknown_generate_keywords_are_a_clear_error(tiny_model):
    ids = torch.tensor([[1, 4, 5]])
    with pytest.raises(TypeError, match="max_new_token"):
        tiny_model.generate(ids, max_new_token=4)
    with pytest.raises(TypeError, match="must be a SamplingOptions"):
        tiny_model.generate(ids, sampling={"max_new_tokens": 4})


def test_the_model_meets_the_shared_contract(tiny_model):
    assert isinstance(tiny_model, VisionLanguageModel)
    assert set(FORWARD_KEYWORDS) <= set(inspect.signature(tiny_model.forward).parameters)
    assert DuetLlavaOutput is DuetOutput


@pytest.mark.parametrize(("kind", "n_linear"), [("linear", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3), ("identity", 0)])
def test_projector_factory(kind, n_linear):
    projector = build_projector(kind, 8, 8)
    assert sum(isinstance(m, torch.nn.Linear) for m in projector.modules()) == n_linear
    assert projector(torch.randn(2, 8)).shape == (2, 8)


def test_projector_factory_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown projector_type"):
        build_projector("conv", 8, 8)
