"""Padding-free (packed) training: the decoder layers run on the real tokens only, packed into one row, and
the loss and every gradient equal the padded batch's, for every kind of compression and a batch mixing
images, videos and text-only samples."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from llava.compression.config import CompressionConfig, DyMUConfig, T2VConfig, V2VConfig, available_presets
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
from llava.hf_adapter import packed_attention
from llava.model.config import DuetLlavaConfig
from llava.model.modeling import DuetLlavaForCausalLM
from llava.model.packing import PackedRows
from tests.conftest import tiny_text_config, tiny_vision_config

IMG, VID = IMAGE_TOKEN_ID, VIDEO_TOKEN_ID
FRAMES = 3
DUET_T2V = T2VConfig(boundaries=(0.5, 0.75), keep_ratios=(0.5, 0.25), query="instruction")
COMPRESSIONS = {
    "none": None,
    "duet": CompressionConfig("duet", v2v=V2VConfig("duet", dominant=6, contextual=2), t2v=DUET_T2V),
    "visionzip": CompressionConfig("visionzip", v2v=V2VConfig("visionzip", dominant=5, contextual=2)),
    "pdrop": CompressionConfig(
        "pdrop",
        t2v=T2VConfig((0.25, 0.5, 0.75), (0.5, 0.25, 0.125), query="last", position_mode="compact"),
    ),
    "fastv": CompressionConfig("fastv", t2v=T2VConfig((0.5,), (0.25,), query="last", position_mode="compact")),
    "dymu": CompressionConfig("dymu", dymu=DyMUConfig((0.3, 0.3))),
    "dymu_vtu": CompressionConfig("dymu_vtu", dymu=DyMUConfig((0.3, 0.3), vtu=True)),
    "dymu_t2v": CompressionConfig("dymu_t2v", dymu=DyMUConfig((0.3, 0.3)), t2v=DUET_T2V),
}


def build(compression: CompressionConfig | None, attention: str = "sdpa") -> DuetLlavaForCausalLM:
    """A tiny Video-LLaVA-shaped model (image and video towers), in training mode."""
    torch.manual_seed(0)
    config = DuetLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=tiny_text_config(),
        video_config=tiny_vision_config(),
        num_frames=FRAMES,
        compression=None if compression is None else compression.to_dict(),
    )
    config.text_config._attn_implementation = attention
    return DuetLlavaForCausalLM(config).train()


def mixed_batch() -> dict[str, torch.Tensor]:
    """Right-padded like the collator's: video + image, text only, one image, two images; answers supervised."""
    rows = [
        ([1, VID, 5, IMG, 6, 7, 8, 9, 10], 3),
        ([1, 9, 10, 11, 12, 13], 2),
        ([1, IMG, 12, 13, 14, 15, 16], 2),
        ([1, IMG, 3, IMG, 4, 5, 6, 8, 9, 10, 11], 4),
    ]
    width = max(len(tokens) for tokens, _ in rows) + 2  # every row padded, the longest too
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, (tokens, answer) in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, len(tokens) - answer : len(tokens)] = ids[row, len(tokens) - answer : len(tokens)]
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.randn(4, 3, 56, 56, generator=generator),
        "pixel_values_videos": torch.randn(1, FRAMES, 3, 56, 56, generator=generator),
    }


def loss_and_gradients(model: DuetLlavaForCausalLM, batch: dict, packed: bool) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    output = model(**batch, pack_sequences=packed)
    output.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), gradients, output.visual_tokens_per_layer


def layer_input_shapes(model: DuetLlavaForCausalLM) -> tuple[list, list]:
    shapes: list = []
    handles = [
        layer.register_forward_pre_hook(lambda _m, args, kwargs: shapes.append(tuple(args[0].shape)), with_kwargs=True)
        for layer in model.language_model.get_decoder().layers
    ]
    return shapes, handles


@pytest.mark.parametrize("name", list(COMPRESSIONS))
def test_packed_loss_and_gradients_equal_the_padded_batch(name):
    model = build(COMPRESSIONS[name])
    batch = mixed_batch()
    padded_shapes, handles = layer_input_shapes(model)
    padded_loss, padded_grads, padded_tokens = loss_and_gradients(model, batch, packed=False)
    for handle in handles:
        handle.remove()
    shapes, handles = layer_input_shapes(model)
    packed_loss, packed_grads, packed_tokens = loss_and_gradients(model, batch, packed=True)
    for handle in handles:
        handle.remove()
    assert torch.isfinite(padded_loss)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    assert any(name.startswith("video_tower") for name in padded_grads) or name != "none"
    for key, gradient in padded_grads.items():
        torch.testing.assert_close(packed_grads[key], gradient, atol=1e-5, rtol=1e-5, msg=key)
    assert packed_tokens == padded_tokens  # the same visual tokens kept at every layer
    # The layers really ran packed: fewer rows (samples share them), fewer token slots than the padded batch.
    assert len(shapes) == len(padded_shapes)
    for packed_shape, padded_shape in zip(shapes, padded_shapes, strict=True):
        assert packed_shape[0] < padded_shape[0]
        assert packed_shape[0] * packed_shape[1] < padded_shape[0] * padded_shape[1]


def test_packed_eager_attention_equals_padded():
    """The additive-float mask of the eager kernel (SDPA takes a boolean one)."""
    model = build(COMPRESSIONS["duet"], attention="eager")
    batch = mixed_batch()
    padded_loss, padded_grads, _ = loss_and_gradients(model, batch, packed=False)
    packed_loss, packed_grads, _ = loss_and_gradients(model, batch, packed=True)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for key, gradient in padded_grads.items():
        torch.testing.assert_close(packed_grads[key], gradient, atol=1e-5, rtol=1e-5, msg=key)


def varlen_reference(module, query, key, value, attention_mask, **kwargs):
    """A variable-length attention kernel written out (what FlashAttention's varlen path computes): causal
    attention inside each ``cu_seq_lens_q`` block. Registered under a name containing ``flash`` so the model
    takes the mask-free, variable-length route."""
    assert attention_mask is None, "the variable-length route passes no mask"
    bounds = kwargs["cu_seq_lens_q"].tolist()
    assert kwargs["max_length_q"] == max(b - a for a, b in itertools.pairwise(bounds))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=kwargs.get("scaling")
        )
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def test_the_variable_length_route_passes_sample_boundaries_to_the_kernel():
    AttentionInterface.register("test_flash_varlen", varlen_reference)
    model = build(COMPRESSIONS["duet"])
    batch = mixed_batch()
    padded_loss, padded_grads, _ = loss_and_gradients(model, batch, packed=False)
    model.config.text_config._attn_implementation = "test_flash_varlen"
    shapes, handles = layer_input_shapes(model)
    packed_loss, packed_grads, _ = loss_and_gradients(model, batch, packed=True)
    for handle in handles:
        handle.remove()
    assert {shape[0] for shape in shapes} == {1}  # one row: the kernel isolates the samples by their boundaries
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for key, gradient in padded_grads.items():
        torch.testing.assert_close(packed_grads[key], gradient, atol=1e-5, rtol=1e-5, msg=key)


def test_one_packed_row_round_trip():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1]])  # any padding side
    rows = PackedRows.of(mask, [3, 1, 3], one_row=True)
    assert rows.shape == (1, 7)
    assert rows.slot_source.tolist() == [0, 1, 2, 4, 9, 10, 11]
    assert rows.segment_ids.tolist() == [[0, 0, 0, 1, 2, 2, 2]]
    assert rows.cu_seqlens.tolist() == [0, 3, 4, 7]
    values = torch.arange(12.0).view(3, 4, 1)
    assert rows.pack(values).squeeze(-1).tolist() == [[0, 1, 2, 4, 9, 10, 11]]
    assert rows.unpack(rows.pack(values)).squeeze(-1).tolist() == [[0, 1, 2, 0], [4, 0, 0, 0], [0, 9, 10, 11]]
    flash = tiny_text_config()
    flash._attn_implementation = "flash_attention_2"
    mask_out, keywords = packed_attention(flash, rows.segment_ids, rows.cu_seqlens, rows.longest, torch.float32)
    assert mask_out is None and keywords["cu_seq_lens_q"].tolist() == [0, 3, 4, 7] and keywords["max_length_k"] == 3


def test_bins_deal_the_longest_samples_first_in_snake_order_with_a_block_mask():
    lengths = [5, 2, 4, 1, 3]  # 15 tokens, longest 5: 3 bins; deal 5, 4, 3, then back: 2 -> bin 2, 1 -> bin 1
    mask = (torch.arange(6) < torch.tensor(lengths).unsqueeze(1)).long()
    rows = PackedRows.of(mask, lengths, one_row=False)
    assert rows.shape == (3, 5) and rows.bin_of.tolist() == [0, 2, 1, 1, 2]
    assert rows.segment_ids.tolist() == [[0, 0, 0, 0, 0], [2, 2, 2, 2, 3], [4, 4, 4, 1, 1]]
    values = torch.arange(30.0).view(5, 6)
    assert torch.equal(rows.unpack(rows.pack(values.unsqueeze(-1))).squeeze(-1), values * mask)
    block, extra = packed_attention(tiny_text_config(), rows.segment_ids, rows.cu_seqlens, 5, torch.float32)
    assert extra == {} and block.shape == (3, 1, 5, 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:3, :3] = torch.ones(3, 3, dtype=torch.bool).tril()  # sample 4 (3 tokens), then sample 1 (2)
    expected[3:, 3:] = torch.ones(2, 2, dtype=torch.bool).tril()
    assert torch.equal(block[2, 0], expected)


def test_padding_slots_of_bins_attend_only_to_themselves_and_count_as_groups():
    lengths = [5, 2, 4]  # 3 bins of capacity 5: {5}, {4} + 1 padding slot, {2} + 3 padding slots
    mask = (torch.arange(5) < torch.tensor(lengths).unsqueeze(1)).long()
    rows = PackedRows.of(mask, lengths, one_row=False)
    assert rows.segment_ids.tolist() == [[0, 0, 0, 0, 0], [2, 2, 2, 2, -1], [1, 1, -1, -1, -1]]
    block, _ = packed_attention(tiny_text_config(), rows.segment_ids, rows.cu_seqlens, 5, torch.float32)
    assert torch.equal(block[2, 0, 2:], torch.eye(5, dtype=torch.bool)[2:])
    eager = tiny_text_config()
    eager._attn_implementation = "eager"
    additive, _ = packed_attention(eager, rows.segment_ids, rows.cu_seqlens, 5, torch.float32)
    assert torch.equal(additive == 0, block)
    assert rows.most_groups([1, 2, 1]) == 5  # bin 2: 2 groups + 3 padding slots


def test_packing_refuses_a_kv_cache():
    model = build(None).eval()
    batch = mixed_batch()
    from llava.hf_adapter import new_dynamic_cache

    with pytest.raises(ValueError, match="packed sequences are for training"):
        model(
            batch["input_ids"][1:2],
            attention_mask=batch["attention_mask"][1:2],
            cache=new_dynamic_cache(model.config.text_config),
            use_cache=True,
            pack_sequences=True,
        )


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [
        ([760, 662, 730, 868, 696, 674, 755, 707], (8, 868)),  # similar lengths: nothing to gain, the padded layout
        ([2048, 300, 250, 400, 700, 680, 900, 350], (3, 2698)),  # one long chat: 8,094 slots instead of 16,384
    ],
)
def test_the_deal_never_holds_more_slots_than_the_padded_batch(lengths, expected):
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)).long()
    rows = PackedRows.of(mask, lengths, one_row=False)
    assert rows.shape == expected
    assert rows.shape[0] * rows.shape[1] <= len(lengths) * max(lengths)
    assert sorted(rows.segment_ids[rows.segment_ids >= 0].bincount().tolist()) == sorted(lengths)


NAMED_PRESETS = [
    name
    for name in available_presets()
    # Qwen2.5-VL's (test_qwen_training), DyMU's and the AnyRes family's (fractions per view: LLaVA-NeXT's
    # tests) need their own files
    if not name.startswith(("qwen_", "dymu_", "anyres_"))
]


def geometry_model(video: bool) -> DuetLlavaForCausalLM:
    """The real token geometry at tiny widths: 576 patches per 336 px image (CLIP-L/14-336), or 8 frames of
    257 tokens (Video-LLaVA), so every named preset applies as it does at full size."""
    torch.manual_seed(0)
    tower = dict(image_size=224 if video else 336, num_hidden_layers=2, hidden_size=16, intermediate_size=32)
    config = DuetLlavaConfig(
        vision_config=tiny_vision_config(**tower),
        text_config=tiny_text_config(num_hidden_layers=8),
        video_config=tiny_vision_config(**tower) if video else None,
        num_frames=8 if video else 1,
    )
    return DuetLlavaForCausalLM(config).train()


def geometry_batch(video: bool) -> dict[str, torch.Tensor]:
    """Right-padded, ragged: three visual samples of different text lengths and a text-only one."""
    slot = VID if video else IMG
    rows = [[1, slot, *range(5, 25)], [1, *range(5, 12)], [1, slot, *range(5, 9)], [1, slot, *range(5, 40)]]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = (ids != 0).long()
    labels = ids.masked_fill((mask == 0) | (ids == slot), IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    generator = torch.Generator().manual_seed(2)
    pixels = (
        {"pixel_values_videos": torch.randn(3, 8, 3, 224, 224, generator=generator)}
        if video
        else {"pixel_values": torch.randn(3, 3, 336, 336, generator=generator)}
    )
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **pixels}


@pytest.fixture(scope="module")
def geometry_models() -> dict[bool, DuetLlavaForCausalLM]:
    return {False: geometry_model(False), True: geometry_model(True)}


@pytest.mark.parametrize("preset", NAMED_PRESETS)
def test_every_named_preset_packs_to_the_padded_loss_and_gradients(preset, geometry_models):
    video = preset.startswith("duet_video")
    model = geometry_models[video]
    model.set_compression(preset)
    batch = geometry_batch(video)
    results = []
    for packed in (False, True):
        torch.manual_seed(3)  # the random presets draw the same tokens both times
        results.append(loss_and_gradients(model, batch, packed))
    (padded_loss, padded_grads, padded_tokens), (packed_loss, packed_grads, packed_tokens) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    assert packed_tokens == padded_tokens
    for key, gradient in padded_grads.items():
        torch.testing.assert_close(packed_grads[key], gradient, atol=1e-5, rtol=1e-5, msg=key)


def test_packed_bf16_loss_matches_padded_within_bf16_rounding():
    """GPUs train in bf16: packing changes only which rows share a matmul, so the losses agree to bf16 rounding
    (positions stay integers and the rotary tables are built from them as in the padded batch)."""
    model = build(COMPRESSIONS["duet"]).to(torch.bfloat16)
    batch = mixed_batch()
    batch = {key: value.to(torch.bfloat16) if value.is_floating_point() else value for key, value in batch.items()}
    with torch.no_grad():
        padded = model(**batch).loss.float()
        packed = model(**batch, pack_sequences=True).loss.float()
    assert torch.isfinite(padded) and abs(packed - padded) <= 2e-2 * padded.abs()
