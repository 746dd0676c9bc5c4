"""What serving needs from generation: per-row sampling independent of the batch, the on_step listener (streaming,
ending rows), per-row visual-token counts, and multi-turn requests for every family."""

from __future__ import annotations

import pytest
import torch

from llava.constants import IMAGE_TAG
from llava.model.fast_generation import FastDecoder
from llava.model.sampling import RowSampling, SamplingOptions, counter_uniforms
from llava.pipeline import chat_request, conversation_of
from tests.test_fast_generation import build, mixed_batch


def test_counter_uniforms_depend_only_on_seed_step_and_column():
    alone = counter_uniforms(torch.tensor([7]), step=3, width=50)
    batched = counter_uniforms(torch.tensor([1, 7, 2**31]), step=3, width=50)
    assert torch.equal(alone[0], batched[1])
    assert not torch.equal(batched[0], batched[1])
    assert not torch.equal(counter_uniforms(torch.tensor([7]), step=4, width=50), alone)
    many = counter_uniforms(torch.arange(200), step=0, width=500)
    assert bool((many > 0).all() and (many < 1).all())
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(many.var().item() - 1 / 12) < 0.005


def test_row_sampling_draws_from_the_tempered_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rows = 20_000
    plain = RowSampling.of([1.0] * rows, [1.0] * rows, list(range(rows))).pick(logits.expand(rows, 4), step=0)
    frequencies = torch.bincount(plain, minlength=4).float() / rows
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
    # top_p 0.6 keeps {0, 1} (the mass before token 2 is 0.8 > 0.6), renormalised to 0.625 / 0.375.
    nucleus = RowSampling.of([1.0] * rows, [0.6] * rows, list(range(rows))).pick(logits.expand(rows, 4), step=0)
    frequencies = torch.bincount(nucleus, minlength=4).float() / rows
    assert frequencies[2:].sum() == 0 and abs(frequencies[0].item() - 0.625) < 0.015
    # Temperature 2 flattens: p ~ sqrt(p).
    hot = RowSampling.of([2.0] * rows, [1.0] * rows, list(range(rows))).pick(logits.expand(rows, 4), step=0)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    assert torch.allclose(torch.bincount(hot, minlength=4).float() / rows, expected / expected.sum(), atol=0.015)


def test_row_sampling_is_per_row_and_batch_independent():
    torch.manual_seed(0)
    logits = torch.randn(4, 30)
    options = RowSampling.of([0.0, 0.7, 1.3, 0.7], [1.0, 0.9, 1.0, 0.5], [11, 12, 13, 14])
    together = options.pick(logits, step=5)
    assert together[0] == logits[0].argmax()  # temperature 0 is greedy
    for row in range(4):
        alone = RowSampling.of(
            [options.temperature[row].item()], [options.top_p[row].item()], [int(options.seed[row])]
        ).pick(logits[row : row + 1], step=5)
        assert alone.item() == together[row].item()
    with pytest.raises(ValueError, match="temperature"):
        RowSampling.of([-1.0], [1.0], [0])
    with pytest.raises(ValueError, match="top_p"):
        RowSampling.of([1.0], [0.0], [0])


@pytest.mark.parametrize("preset", ["none", "duet"])
def test_listener_streams_every_step_and_ends_rows_in_both_decode_loops(preset):
    model = build(preset)
    ids, mask, pixels = mixed_batch()
    per_row = RowSampling.of([0.0, 0.9, 0.0], [1.0, 0.8, 1.0], [1, 2, 3])
    reference = model.generate(ids, mask, pixels, fast=False, max_new_tokens=8, eos_token_id=[], per_row=per_row)
    for fast in (False, True):
        seen: list[list[int]] = []

        def listen(step: int, tokens: torch.Tensor, seen: list = seen) -> torch.Tensor:
            seen.append(tokens.tolist())
            return torch.tensor([step == 2, False, False])  # row 0 ends after its third token

        decoder = FastDecoder(model) if fast else None
        out = model.generate(
            ids, mask, pixels, fast=fast, fast_decoder=decoder, max_new_tokens=8, eos_token_id=[], pad_token_id=0,
            per_row=per_row, on_step=listen,
        )  # fmt: skip
        assert out.shape == (3, 8) and len(seen) == 8
        assert torch.equal(out[1:], reference[1:])  # the other rows did not notice
        assert torch.equal(out[0, :3], reference[0, :3]) and bool((out[0, 3:] == 0).all())
        assert torch.equal(torch.tensor(seen).T, out)  # the listener saw every token, pads included


def test_listener_ending_every_row_stops_decoding():
    model = build("none")
    ids, mask, pixels = mixed_batch()
    steps = []
    out = model.generate(
        ids, mask, pixels, max_new_tokens=20, eos_token_id=[],
        on_step=lambda step, tokens: steps.append(step) or torch.ones(3, dtype=torch.bool),
    )  # fmt: skip
    assert steps == [0] and out.shape == (3, 1)


def test_sampled_rows_do_not_depend_on_the_batch():
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    options = dict(max_new_tokens=6, eos_token_id=[])
    per_row = RowSampling.of([0.8, 0.8, 0.8], [0.9, 0.9, 0.9], [5, 6, 7])
    together = model.generate(ids, mask, pixels, per_row=per_row, **options)
    # Row 0 is text-only; rows 1 and 2 hold one and two images (pixels 0 and 1-2).
    alone = model.generate(ids[2:], mask[2:], pixels[1:], per_row=RowSampling.of([0.8], [0.9], [7]), **options)
    trimmed = alone[:, : together.shape[1]]
    assert torch.equal(together[2, : trimmed.shape[1]], trimmed[0])


def test_prefill_reports_each_rows_visual_tokens_per_layer():
    model = build("duet")
    ids, mask, pixels = mixed_batch()
    out = model(ids, attention_mask=mask, pixel_values=pixels, left_padding=True, logits_to_keep=1)
    rows = torch.tensor(out.visual_tokens_per_row)
    layers = model.config.text_config.num_hidden_layers
    assert rows.shape == (3, layers)
    assert bool((rows[0] == 0).all())  # text only
    assert torch.equal(rows[2], 2 * rows[1])  # two images keep twice one image's tokens
    assert rows[1, 0] == 8 and rows[1, -1] < rows[1, 0]  # V2V keeps 6 + 2; T2V drops more in later stages
    per_segment = torch.tensor(out.visual_tokens_per_layer)
    assert torch.allclose(rows.sum(dim=0).double() / 3, per_segment.double())  # three images in the batch


def test_conversation_places_history_tags_and_gives_the_prompt_the_rest():
    request = {"prompt": "And now?", "image": ["a.png", "b.png"], "history": [(f"{IMAGE_TAG}\nWhat is it?", "A cat.")]}
    turns, images, videos = conversation_of(request)
    assert turns == [("user", f"{IMAGE_TAG}\nWhat is it?"), ("assistant", "A cat."), ("user", f"{IMAGE_TAG}\nAnd now?")]
    assert images == ["a.png", "b.png"] and videos == []
    messages = chat_request(request).messages
    assert [message["role"] for message in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][0] == {"type": "image"} and messages[1]["content"] == [
        {"type": "text", "text": "A cat."}
    ]
    with pytest.raises(ValueError, match="2 <image>"):
        conversation_of({"prompt": "x", "image": ["a.png"], "history": [(f"{IMAGE_TAG}{IMAGE_TAG}", "y")]})
    with pytest.raises(ValueError, match="pair"):
        conversation_of({"prompt": "x", "history": [("only one",)]})
    with pytest.raises(ValueError, match="answer holds"):
        conversation_of({"prompt": "x", "image": ["a.png"], "history": [("q", f"{IMAGE_TAG} a")]})


def test_sampling_options_reject_unknown_keywords_still():
    with pytest.raises(TypeError, match="on_stepp"):
        SamplingOptions.from_keywords(None, on_stepp=None)


def test_chat_template_family_renders_a_multi_turn_request(llava_next_checkpoint):
    """LLaVA-NeXT (llava-hf's template): the history's image and answer come before the new question, and the
    image placeholder is expanded for the history's image too."""
    from llava.inference import load_pipeline

    pipeline = load_pipeline(llava_next_checkpoint, device="cpu")
    image = str(llava_next_checkpoint / "image_0.png")
    single = pipeline.prepare([{"image": image, "prompt": "what colour is the shape"}])
    history = [(f"{IMAGE_TAG}\nwhat colour is the shape", "a red square")]
    chat = pipeline.prepare([{"image": image, "prompt": "hello there", "history": history}])
    image_token = pipeline.model.config.image_token_id
    assert int((chat["input_ids"] == image_token).sum()) == int((single["input_ids"] == image_token).sum()) > 0
    text = pipeline.tokenizer.decode(chat["input_ids"][0], skip_special_tokens=False).replace("<image>", "")
    assert (
        text.index("what colour") < text.index("a red square") < text.index("hello there") < text.rindex("ASSISTANT:")
    )
    answers = pipeline.generate([{"image": image, "prompt": "hello there", "history": [(IMAGE_TAG, "a red square")]}],
                                max_new_tokens=3)  # fmt: skip
    assert len(answers) == 1
