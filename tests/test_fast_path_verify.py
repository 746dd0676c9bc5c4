"""The fast decoder's first-replay check: each captured decode graph's first replay is compared with the eager
step on the same state; a graph that differs is dropped (with a warning naming the shape) and its shape decodes
eagerly from then on. On a CPU the graph is stood in for by the ``capture`` seam of :class:`FastDecoder`: a
"replay" that runs the step eagerly, optionally corrupting the logits it leaves."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.constants import IMAGE_TOKEN_ID
from llava.model.config import DuetLlavaConfig
from llava.model.fast_generation import CapturedStep, FastDecoder, compare_logits, replay_tolerance
from llava.model.modeling import DuetLlavaForCausalLM
from tests.conftest import tiny_text_config, tiny_vision_config

OPTIONS = {"max_new_tokens": 6, "eos_token_id": []}
LOGGER = "llava.model.fast_generation"


def build(compressed: bool = True) -> DuetLlavaForCausalLM:
    """A tiny LLaVA; ``compressed``: V2V and two T2V boundaries (three cache stages of their own lengths)."""
    torch.manual_seed(0)
    compression = None
    if compressed:
        t2v = T2VConfig((0.25, 0.75), (0.5, 0.25), query="instruction")
        compression = CompressionConfig(name="duet", v2v=V2VConfig("duet", 6, 2), t2v=t2v).to_dict()
    config = DuetLlavaConfig(
        vision_config=tiny_vision_config(), text_config=tiny_text_config(), compression=compression
    )
    return DuetLlavaForCausalLM(config).eval()


def image_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three left-padded prompts (text only, one image, two images) of different lengths."""
    ids = torch.tensor(
        [
            [0, 0, 0, 0, 1, 5, 6, 7],
            [0, 0, 1, IMAGE_TOKEN_ID, 4, 5, 6, 9],
            [1, IMAGE_TOKEN_ID, 3, IMAGE_TOKEN_ID, 4, 5, 6, 8],
        ]
    )
    torch.manual_seed(1)
    return ids, (ids != 0).long(), torch.randn(3, 3, 56, 56)


def text_prompt(length: int) -> tuple[torch.Tensor, torch.Tensor, None]:
    """One text-only prompt of ``length`` tokens (BOS, then random ids above the specials)."""
    ids = torch.randint(4, 128, (1, length), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 1
    return ids, torch.ones_like(ids), None


class StandInCapture:
    """A CPU stand-in for CUDA graph capture: warms up, then "replays" by running the step eagerly and
    applying ``corrupt`` (when given) to the logits buffer it filled, as a faulty graph would."""

    def __init__(self, corrupt: Callable[[torch.Tensor], object] | None = None) -> None:
        self.corrupt = corrupt
        self.calls = 0

    def __call__(self, warm_up: Callable[[], None], step: Callable[[], object]) -> CapturedStep:
        self.calls += 1
        warm_up()

        def replay() -> None:
            logits = step()
            if self.corrupt is not None:
                self.corrupt(logits)

        return CapturedStep(replay=replay)


def generate(model: DuetLlavaForCausalLM, prompt: tuple, decoder: FastDecoder | None = None) -> torch.Tensor:
    if decoder is None:
        return model.generate(*prompt, fast=False, **OPTIONS)
    return model.generate(*prompt, fast=True, fast_decoder=decoder, **OPTIONS)


def test_a_corrupted_first_replay_warns_with_the_shape_and_the_shape_decodes_eagerly_from_then_on(caplog):
    model = build()
    prompt = image_batch()
    eager = generate(model, prompt)
    capture = StandInCapture(corrupt=lambda logits: logits.neg_())
    decoder = FastDecoder(model, use_cuda_graph=True, capture=capture)
    with caplog.at_level("WARNING", logger=LOGGER):
        first = generate(model, prompt, decoder)
    assert torch.equal(first, eager)  # the failed check left the eager step's state and cache
    ((batch_capacity, capacities),) = decoder.shapes()
    assert batch_capacity == 4 and len(capacities) == 3  # 3 rows bucketed to 4; three stages
    assert "first replay differs from the eager step" in caplog.text
    assert f"batch 4, cache capacity {capacities}, stages 3, dtype float32" in caplog.text
    assert "same next tokens: False" in caplog.text and "without a graph from now on" in caplog.text
    counts = (decoder.replay_checks, decoder.replay_mismatches, decoder.graph_replays, decoder.eager_steps)
    assert counts == (1, 1, 0, 5)
    assert decoder.runners()[0].graph is None
    caplog.clear()
    with caplog.at_level("WARNING", logger=LOGGER):
        again = generate(model, prompt, decoder)
    assert torch.equal(again, eager)
    assert capture.calls == 1 and caplog.text == ""  # not captured, nor checked, again
    assert (decoder.replay_checks, decoder.graph_replays, decoder.eager_steps) == (1, 0, 10)


def test_logits_off_by_more_than_the_tolerance_fail_the_check_even_with_the_same_tokens(caplog):
    model = build()
    prompt = image_batch()
    decoder = FastDecoder(model, use_cuda_graph=True, capture=StandInCapture(corrupt=lambda logits: logits.mul_(1.5)))
    with caplog.at_level("WARNING", logger=LOGGER):
        assert torch.equal(generate(model, prompt, decoder), generate(model, prompt))
    assert decoder.replay_mismatches == 1 and "same next tokens: True" in caplog.text


def test_a_rejected_shape_is_not_captured_again_after_its_buffers_were_released():
    model = build(compressed=False)
    capture = StandInCapture(corrupt=lambda logits: logits.add_(1e3))
    decoder = FastDecoder(model, use_cuda_graph=True, max_shapes=1, bucket=16, capture=capture)
    short, long = text_prompt(10), text_prompt(30)
    for prompt in (short, long, short):
        assert torch.equal(generate(model, prompt, decoder), generate(model, prompt))
    assert decoder.evictions == 2 and capture.calls == 2 and decoder.replay_mismatches == 2
    assert decoder.graph_replays == 0


def test_a_matching_first_replay_is_accepted_once_and_the_graph_replays_without_checks(caplog):
    model = build()
    prompt = image_batch()
    capture = StandInCapture()
    decoder = FastDecoder(model, use_cuda_graph=True, capture=capture)
    with caplog.at_level("WARNING", logger=LOGGER):
        assert torch.equal(generate(model, prompt, decoder), generate(model, prompt))
        assert torch.equal(generate(model, prompt, decoder), generate(model, prompt))
    assert caplog.text == ""
    assert (decoder.replay_checks, decoder.replay_mismatches, decoder.graph_replays, decoder.eager_steps) == (
        1,
        0,
        10,
        0,
    )
    assert capture.calls == 1 and decoder.runners()[0].graph is not None


def test_verify_replay_false_trusts_the_graph():
    model = build(compressed=False)
    decoder = FastDecoder(
        model, use_cuda_graph=True, bucket=16, verify_replay=False, capture=StandInCapture(lambda x: x.add_(1e3))
    )
    generate(model, text_prompt(10), decoder)
    assert (decoder.replay_checks, decoder.graph_replays, decoder.eager_steps) == (0, 5, 0)


def test_the_tolerance_admits_a_few_bf16_ulps_at_the_logit_scale_and_no_more():
    torch.manual_seed(0)
    eager = (torch.randn(2, 50) * 8).to(torch.bfloat16)
    scale = eager.float().abs().max().item()
    assert replay_tolerance(torch.bfloat16) == pytest.approx(4 * 2**-7)
    assert replay_tolerance(torch.float32) == pytest.approx(1e-4)
    ulp = 2.0 ** (torch.tensor(scale).log2().floor().item() - 7)  # one bf16 ulp at the largest logit
    nudged = eager.clone()
    other = (int(eager[0].float().argmax()) + 1) % eager.shape[1]  # not the row's top logit: same tokens
    nudged[0, other] = (nudged[0, other].float() - 2 * ulp).to(torch.bfloat16)
    assert compare_logits(eager, eager).relative_diff == 0.0 and compare_logits(eager, eager).matches
    assert compare_logits(nudged, eager).relative_diff > 0.0 and compare_logits(nudged, eager).matches
    off = eager.clone()
    off[1, 3] = off[1, 3] + 0.1 * scale
    assert not compare_logits(off, eager).matches
    with_nan = eager.clone()
    with_nan[0, 1] = float("nan")
    assert not compare_logits(with_nan, eager).matches  # NaN in the replay only
    assert compare_logits(with_nan, with_nan).same_tokens and compare_logits(with_nan, with_nan).relative_diff == 0.0


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real CUDA graphs)")


@CUDA
def test_cuda_graph_first_replay_matches_and_tokens_equal_the_eager_loop_fp32():
    model = build().cuda()
    prompt = tuple(tensor.cuda() for tensor in image_batch())
    decoder = FastDecoder(model)
    fast = generate(model, prompt, decoder)
    again = generate(model, prompt, decoder)
    assert torch.equal(fast, generate(model, prompt)) and torch.equal(again, fast)
    assert decoder.captures == 1 and decoder.replay_checks == 1 and decoder.replay_mismatches == 0
    assert decoder.graph_replays == 10 and decoder.eager_steps == 0


@CUDA
def test_cuda_graph_first_replay_matches_the_eager_step_in_bf16():
    model = build().to("cuda", torch.bfloat16)
    ids, mask, pixels = image_batch()
    decoder = FastDecoder(model)
    generate(model, (ids.cuda(), mask.cuda(), pixels.to("cuda", torch.bfloat16)), decoder)
    assert decoder.captures == 1 and decoder.replay_mismatches == 0 and decoder.graph_replays == 5
