"""The compressed prefill and the static decode step copy nothing from the host to the device; a decode step
computes its rotary tables once and hands every layer the mask its attention kernel uses as is."""

from __future__ import annotations

import traceback
import weakref
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

from llava.bench.decode_profile import count_step
from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from llava.hf_adapter import decode_step_mask, set_attn_implementation
from llava.model.config import DuetLlavaConfig
from llava.model.decoder import CompiledDecodeStep, decoder_of, run_static_decoder_step
from llava.model.fast_generation import FastDecoder
from llava.model.modeling import DuetLlavaForCausalLM
from llava.model.splice import matches_any
from tests.conftest import tiny_text_config, tiny_vision_config

IMG = IMAGE_TOKEN_ID
HOST_FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray)
INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put)


class HostToDeviceCopies(TorchFunctionMode):
    """Records the Python-level calls that copy host data to the device (on CUDA each is a pageable copy,
    and a blocking one, a stream synchronisation, unless ``non_blocking``).

    Counted: ``torch.tensor``/``as_tensor``/``asarray``/``Tensor.new_tensor`` of host data (lists, Python
    scalars, NumPy arrays) given a device; ``Tensor.to``/``cuda``/``copy_`` of a host tensor onto the device;
    indexing (``[]``, ``index_put``) with a Python list or a host tensor. On CUDA "host tensor" means a CPU
    tensor and "the device" a CUDA one. On CPU, where both are the same, it is emulated: every ``device=`` of
    a factory counts (library code passes the model's device), and a host tensor is one built from host data
    without a device inside the measured call (later moved with ``.to(device)``). Not seen: copies made
    inside C++ ops (e.g. a CPU tensor argument of a CUDA op), and factories that fill on the device
    (``torch.full``, ``zeros``, ``arange``), which copy nothing.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.emulated = device.type == "cpu"
        self.host_tensors: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self.events: list[tuple[str, bool, str]] = []

    def _is_host(self, tensor: object) -> bool:
        if not isinstance(tensor, torch.Tensor):
            return False
        return self.host_tensors.get(id(tensor)) is tensor if self.emulated else tensor.device.type == "cpu"

    def _is_device(self, device: object) -> bool:
        if device is None:
            return False
        if isinstance(device, torch.Tensor):
            device = device.device
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            return False  # a dtype or memory format given to .to()
        return self.emulated or device.type != "cpu"

    def _record(self, kind: str, blocking: bool) -> None:
        self.events.append((kind, blocking, "".join(traceback.format_stack(limit=6)[:-2])))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        data = args[0] if args else kwargs.get("data")
        if func in HOST_FACTORIES and not isinstance(data, torch.Tensor):
            if self._is_device(kwargs.get("device")):
                self._record(func.__name__, True)
            elif isinstance(result, torch.Tensor):
                self.host_tensors[id(result)] = result
        elif func is torch.Tensor.new_tensor and not isinstance(args[1] if len(args) > 1 else None, torch.Tensor):
            self._record("new_tensor", True)
        elif func in (torch.Tensor.to, torch.Tensor.cuda) and self._is_host(args[0]):
            targets = [*args[1:], kwargs.get("device"), kwargs.get("other")]
            if func is torch.Tensor.cuda or any(self._is_device(target) for target in targets):
                self._record(func.__name__, not kwargs.get("non_blocking", False))
        elif func is torch.Tensor.copy_ and self._is_host(args[1]) and not self._is_host(args[0]):
            self._record("copy_", not kwargs.get("non_blocking", False))
        elif func in INDEXING:
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(part, list) or self._is_host(part) for part in parts):
                self._record(func.__name__, True)
        return result


def host_to_device_copies(function: Callable[[], object], device: torch.device | None = None) -> list[tuple]:
    """The host-to-device copy events (kind, blocking, where) of one call of ``function``."""
    counter = HostToDeviceCopies(device or torch.device("cpu"))
    with counter, torch.no_grad():
        function()
    return counter.events


def build(t2v: T2VConfig | None, attn: str = "sdpa", v2v: bool = True) -> DuetLlavaForCausalLM:
    """A tiny DUET model (4 LLM layers): V2V in the tower, T2V at the given boundaries."""
    torch.manual_seed(0)
    parts = {"t2v": t2v} if t2v is not None else {}
    if v2v:
        parts["v2v"] = V2VConfig("duet", 6, 2)
    text_config = tiny_text_config()
    set_attn_implementation(text_config, attn)
    config = DuetLlavaConfig(
        vision_config=tiny_vision_config(),
        text_config=text_config,
        compression=CompressionConfig(name="duet_test", **parts).to_dict() if parts else None,
    )
    return DuetLlavaForCausalLM(config).eval()


THREE_BOUNDARIES = T2VConfig((0.25, 0.5, 0.75), (0.5, 0.25, 0.125), query="instruction")


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text-only, one-image and two-image prompts of different lengths, left-padded (four images)."""
    ids = torch.tensor([[0, 0, 0, 0, 1, 5, 6, 7], [0, 0, 1, IMG, 4, 5, 6, 9], [1, IMG, 3, IMG, 4, IMG, 6, 8]])
    torch.manual_seed(1)
    return ids, (ids != 0).long(), torch.randn(4, 3, 56, 56)


def test_the_counter_sees_the_copies_it_documents():
    device = torch.device("cpu")
    values = torch.arange(6)

    def copies() -> None:
        torch.tensor([1, 2], device=device)
        torch.as_tensor(3, device=device)
        torch.tensor([4, 5]).to(device)
        torch.tensor([4, 5]).to(device, non_blocking=True)
        values.new_tensor([1])
        values[[0, 2]]
        torch.zeros(2).copy_(torch.tensor([1.0, 2.0]))

    def no_copies() -> None:
        torch.full((2,), 3, device=device)
        torch.arange(4, device=device)
        values.to(device)  # already there
        values.to(torch.float32)
        values[1:3]
        torch.where(values > 2, values, 0)  # a Python scalar is a kernel argument

    events = host_to_device_copies(copies)
    assert [kind for kind, _, _ in events] == ["tensor", "as_tensor", "to", "to", "new_tensor", "__getitem__", "copy_"]
    assert [blocking for _, blocking, _ in events].count(False) == 1
    assert host_to_device_copies(no_copies) == []


def describe(events: list[tuple]) -> str:
    return "\n".join(f"{kind} (blocking={blocking}) at\n{where}" for kind, blocking, where in events)


@pytest.mark.parametrize("t2v", [T2VConfig((0.5,), (0.5,), query="instruction"), THREE_BOUNDARIES])
def test_compressed_prefill_copies_nothing_from_the_host(t2v):
    """Generation's prefill (left padding, four images, V2V and every T2V boundary) and a training forward
    (right padding, labels: compaction fills them with IGNORE_INDEX) build every tensor on the device."""
    model = build(t2v)
    ids, mask, pixels = left_padded_batch()
    events = host_to_device_copies(lambda: model(ids, mask, pixels, left_padding=True, logits_to_keep=1))
    assert events == [], describe(events)
    right_ids = torch.tensor([[1, IMG, 3, IMG, 4, IMG, 6, 8], [1, IMG, 4, 5, 6, 9, 0, 0]])
    labels = right_ids.masked_fill((right_ids == IMG) | (right_ids == 0), IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    training = host_to_device_copies(lambda: model(right_ids, (right_ids != 0).long(), pixels, labels=labels))
    assert training == [], describe(training)


def test_a_dymu_prefill_copies_nothing_from_the_host():
    """DyMU's variable token counts (merged in the tower, then T2V) are summed per image on the device."""
    from llava.compression.config import DyMUConfig
    from tests.test_dymu import TOWER_LAYERS
    from tests.test_dymu import build as build_dymu

    model = build_dymu(DyMUConfig((0.2,) * TOWER_LAYERS), T2VConfig((0.5,), (0.5,), query="instruction"))
    ids, mask, pixels = left_padded_batch()
    events = host_to_device_copies(lambda: model(ids, mask, pixels, left_padding=True, logits_to_keep=1))
    assert events == [], describe(events)


def fast_decoder_after_generation(model: DuetLlavaForCausalLM) -> tuple[FastDecoder, object]:
    """A FastDecoder that generated for the left-padded batch, and its (only) runner."""
    ids, mask, pixels = left_padded_batch()
    decoder = FastDecoder(model)
    model.generate(ids, mask, pixels, fast=True, fast_decoder=decoder, max_new_tokens=3, eos_token_id=[])
    (runner,) = decoder.runners()
    return decoder, runner


def test_static_decode_step_copies_nothing_from_the_host():
    decoder, runner = fast_decoder_after_generation(build(THREE_BOUNDARIES))
    events = host_to_device_copies(lambda: decoder.step(runner))
    assert events == [], describe(events)


@pytest.mark.parametrize("position_mode", ["keep", "compact"])
def test_rotary_embedding_runs_once_per_decode_step(position_mode):
    t2v = THREE_BOUNDARIES
    model = build(T2VConfig(t2v.boundaries, t2v.keep_ratios, t2v.query, position_mode))
    decoder, runner = fast_decoder_after_generation(model)
    calls = []
    rotary = decoder_of(model.language_model).rotary_emb
    handle = rotary.register_forward_hook(lambda module, args, output: calls.append(output[0].shape))
    try:
        with torch.no_grad():
            decoder.step(runner)
            decoder.step(runner)
    finally:
        handle.remove()
    assert len(calls) == 2  # four stages, one call per step
    assert calls[0][-2] == len(model.stage_plan.stage_starts())  # one column per stage


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_stage_builds_one_additive_mask_in_the_compute_dtype(attn):
    model = build(THREE_BOUNDARIES, attn=attn)
    decoder, runner = fast_decoder_after_generation(model)
    masks = []
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
        )
        for layer in decoder_of(model.language_model).layers
    ]
    try:
        with torch.no_grad():
            decoder.step(runner)
    finally:
        for handle in handles:
            handle.remove()
    stages = len(model.stage_plan.stage_starts())
    assert len({id(mask) for mask in masks}) == stages  # one per stage (a layer per stage here)
    assert all(mask.dtype == torch.float32 and mask.shape[1:3] == (1, 1) for mask in masks)
    blocked = float("-inf") if attn == "sdpa" else torch.finfo(torch.float32).min
    for stage, mask in enumerate(masks):
        attendable = runner.state.attendable[stage]
        assert torch.equal(mask[:, 0, 0] == 0, attendable) and (mask[:, 0, 0][~attendable] == blocked).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_gives_the_additive_mask_the_result_of_the_bool_mask(dtype):
    """The decode step used to pass the bool mask, which SDPA turned into this additive one in every layer:
    the results are identical, in fp32 and bf16."""
    torch.manual_seed(0)
    query = torch.randn(3, 4, 1, 16, dtype=dtype)
    key, value = torch.randn(2, 3, 4, 128, 16, dtype=dtype)
    attendable = torch.rand(3, 128) < 0.4
    attendable[:, 0] = True
    additive = decode_step_mask(tiny_text_config(), attendable, dtype)
    assert additive.dtype == dtype
    sdpa = torch.nn.functional.scaled_dot_product_attention
    expected = sdpa(query, key, value, attn_mask=attendable[:, None, None, :], scale=0.25)
    assert torch.equal(sdpa(query, key, value, attn_mask=additive, scale=0.25), expected)


def test_compiled_decode_step_traces_as_one_graph_and_matches_the_eager_step():
    """The opt-in compiled step (here with the ``aot_eager`` backend: the same tracing and functionalisation as
    inductor, without code generation) captures the step as one graph and advances the state as the eager step."""
    model = build(THREE_BOUNDARIES)
    decoder, runner = fast_decoder_after_generation(model)
    language_decoder = decoder_of(model.language_model)
    compiled = CompiledDecodeStep(language_decoder, backend="aot_eager")
    saved = runner.state.snapshot()
    embeds = model.get_input_embeddings()(runner.tokens.unsqueeze(1))
    runs = {}
    with torch.no_grad():
        for name, step in (
            ("eager", lambda *args: run_static_decoder_step(language_decoder, *args)),
            ("compiled", compiled),
        ):
            runner.state.restore(saved)
            hidden = [step(embeds, runner.state, decoder.cache) for _ in range(2)]
            runs[name] = (hidden, runner.state.snapshot())
    for expected, got in zip(runs["eager"][0], runs["compiled"][0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for expected, got in zip(runs["eager"][1], runs["compiled"][1], strict=True):
        assert torch.equal(got, expected)
    assert len(compiled.compiled_shapes) == 1 and compiled.compile_time_s > 0


def test_decode_profile_counts_the_launches_of_each_region():
    """fp32 (no casts): RMSNorm is six kernels per call (two per layer and the final one), the rotary tables
    are computed once per step, each of the four stages builds its mask with two kernels."""
    model = build(THREE_BOUNDARIES)
    decoder, runner = fast_decoder_after_generation(model)
    saved = runner.state.snapshot()
    regions = {name: entry["launch_ops"] for name, entry in count_step(decoder, runner, 2, torch.device("cpu")).items()}
    layers = len(decoder_of(model.language_model).layers)
    assert regions["rmsnorm"] == 6 * (2 * layers + 1)
    assert regions["mask"] == 2 * 4
    assert regions["embed"] == regions["lm_head"] == 1
    assert set(regions) == {"embed", "rotary", "mask", "rmsnorm", "attention", "mlp", "residual", "lm_head", "other"}
    assert all(torch.equal(now, before) for now, before in zip(runner.state.snapshot(), saved, strict=True))


def test_matches_any():
    values = torch.tensor([[3, 5, 7], [5, 9, 3]])
    assert torch.equal(matches_any(values, 5), values == 5)
    assert torch.equal(matches_any(values, [3, 9]), torch.isin(values, torch.tensor([3, 9])))
    assert not matches_any(values, []).any()
