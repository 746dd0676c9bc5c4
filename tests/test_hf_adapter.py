"""The transformers adapter and the supported-version check."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import subprocess
import sys
import tomllib
import types
import warnings
from pathlib import Path

import pytest
import transformers

from llava import hf_adapter, versions

REPO = Path(__file__).resolve().parents[1]


def pyproject_dependencies() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = {}
    for requirement in project["dependencies"]:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
        specs[name.lower()] = spec
    return specs


def test_version_range_is_the_one_pyproject_declares():
    assert pyproject_dependencies()["transformers"] == versions.supported_transformers_range()


def test_installed_transformers_is_supported():
    versions.check_transformers_version(transformers.__version__)


@pytest.mark.parametrize("installed", ["4.57.6", "5.13.1", "5.25.0", "5.25.0.dev0", "6.0.0"])
def test_unsupported_transformers_fails_in_one_line(installed, monkeypatch):
    monkeypatch.delenv(versions.ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(versions.UnsupportedVersionError) as error:
        versions.check_transformers_version(installed)
    message = str(error.value)
    assert "\n" not in message
    assert f"transformers {installed} is installed" in message
    assert versions.supported_transformers_range() in message


def test_opt_in_turns_the_version_error_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(versions.ALLOW_UNTESTED_ENV, "1")
    versions.check_transformers_version("5.30.0")
    assert "transformers 5.30.0 is installed" in caplog.text


def test_import_llava_with_an_unsupported_transformers_says_so_before_importing_it():
    # Pretend 4.57.6 is installed: the check must fire from package metadata, before any transformers import.
    script = (
        "import importlib.metadata as m, sys\n"
        "real = m.version\n"
        "m.version = lambda name: '4.57.6' if name == 'transformers' else real(name)\n"
        "try:\n"
        "    import llava.model.modeling\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    name, _, rest = result.stdout.strip().partition(" ")
    assert name == "UnsupportedVersionError"
    assert "transformers 4.57.6 is installed" in rest and versions.supported_transformers_range() in rest
    assert rest.endswith("False")  # transformers itself was never imported


def test_cache_kwarg_follows_the_signature():
    def new_style(hidden, cache=None, use_cache=False): ...

    def old_style(hidden, past_key_values=None, use_cache=False): ...

    def neither(hidden, **kwargs): ...

    assert hf_adapter.cache_kwarg_of(new_style) == "cache"
    assert hf_adapter.cache_kwarg_of(old_style) == "past_key_values"
    with pytest.raises(TypeError, match="neither"):
        hf_adapter.cache_kwarg_of(neither)


def test_installed_llama_layer_and_mask_agree_on_the_cache_name():
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layer_name = hf_adapter.cache_kwarg_of(LlamaDecoderLayer.forward)
    assert layer_name == hf_adapter.cache_kwarg_of(create_causal_mask)
    assert layer_name in inspect.signature(LlamaDecoderLayer.forward).parameters


def test_image_processor_falls_back_to_pil_without_torchvision(tmp_path, monkeypatch):
    from llava.playground.tiny_models import build_clip_image_processor

    build_clip_image_processor(image_size=56).save_pretrained(tmp_path)

    def no_torchvision(*args, **kwargs):
        raise ImportError("AutoImageProcessor requires the Torchvision library")

    # transformers 5.14-5.17 without torchvision: AutoImageProcessor itself is a placeholder that raises.
    monkeypatch.setattr(hf_adapter, "AutoImageProcessor", types.SimpleNamespace(from_pretrained=no_torchvision))
    monkeypatch.setattr(hf_adapter.importlib.util, "find_spec", lambda name: None)
    processor = hf_adapter.load_image_processor(tmp_path)
    assert type(processor).__name__ == "CLIPImageProcessorPil"
    assert processor.crop_size["height"] == 56
    monkeypatch.setattr(hf_adapter.importlib.util, "find_spec", lambda name: object())  # torchvision present
    with pytest.raises(ImportError, match="Torchvision"):
        hf_adapter.load_image_processor(tmp_path)


@pytest.mark.parametrize("spelling", ["gradient_checkpointing", "activation_checkpointing"])
def test_checkpointing_flag_parses_without_deprecation_under_either_name(spelling, tmp_path):
    from transformers import HfArgumentParser

    from llava.arguments import LlavaTrainingArguments

    argv = ["--output_dir", str(tmp_path), f"--{spelling}", "True", f'--{spelling}_kwargs={{"use_reentrant": false}}']
    renamed = hf_adapter.current_training_argv(argv)
    has_new_name = any(field.name == "activation_checkpointing" for field in dataclasses.fields(LlavaTrainingArguments))
    expected = "activation_checkpointing" if has_new_name else "gradient_checkpointing"
    assert renamed[2] == f"--{expected}" and renamed[4].startswith(f"--{expected}_kwargs=")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        (args,) = HfArgumentParser(LlavaTrainingArguments).parse_args_into_dataclasses(args=renamed)
    assert hf_adapter.activation_checkpointing_requested(args)
    (plain,) = HfArgumentParser(LlavaTrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path)]
    )
    assert not hf_adapter.activation_checkpointing_requested(plain)


NO_DEPRECATIONS_SCRIPT = """
import json, logging, warnings
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration
from llava.compression.config import CompressionConfig, T2VConfig, V2VConfig
from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_ID as IMG
from llava.hf_adapter import enable_activation_checkpointing, set_attn_implementation
from llava.model.config import DuetLlavaConfig
from llava.model.loading import convert_hf_llava
from llava.model.modeling import DuetLlavaForCausalLM
from tests.conftest import tiny_text_config, tiny_vision_config

records = []
class Collect(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("transformers").addHandler(Collect())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    torch.manual_seed(0)
    v2v = V2VConfig(method="duet", dominant=6, contextual=2)
    compression = CompressionConfig(name="t", v2v=v2v, t2v=T2VConfig(boundaries=(0.5,), keep_ratios=(0.5,))).to_dict()
    model = DuetLlavaForCausalLM(
        DuetLlavaConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(), compression=compression)
    )
    ids = torch.tensor([[1, IMG, 5, 6, 7, 8], [1, 4, IMG, 5, 6, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    pixels = torch.randn(2, 3, 56, 56)
    model.train()
    enable_activation_checkpointing(model, use_reentrant=False)
    model.enable_input_require_grads()
    out = model(ids, attention_mask=mask, pixel_values=pixels, labels=labels)
    out.loss.backward()
    model.eval()
    prompts = torch.tensor([[0, 1, IMG, 5, 6], [1, 4, IMG, 5, 6]])
    generated = model.generate(prompts, (prompts != 0).long(), pixels, max_new_tokens=4, eos_token_id=2)
    prefill = model(prompts, attention_mask=(prompts != 0).long(), pixel_values=pixels, logits_to_keep=1)
    hf_config = LlavaConfig(vision_config=tiny_vision_config(), text_config=tiny_text_config(), image_token_index=120)
    set_attn_implementation(hf_config, "sdpa")
    converted = convert_hf_llava(LlavaForConditionalGeneration(hf_config).eval())
    converted(ids, attention_mask=mask, pixel_values=pixels)
print(json.dumps({
    "warnings": [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught],
    "log": records,
    "generated": list(generated.shape),
    "output_fields": list(prefill.keys()),
}))
"""


def test_our_calls_raise_no_transformers_deprecations():
    """Training step with checkpointing, compressed cached generation and HF import on the installed release."""
    result = subprocess.run(
        [sys.executable, "-c", NO_DEPRECATIONS_SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["generated"][0] == 2
    assert "logits" in report["output_fields"]
    deprecations = [
        text for text in report["warnings"] + report["log"] if "deprecat" in text.lower() or "FutureWarning" in text
    ]
    assert deprecations == []
