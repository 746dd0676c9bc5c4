"""Benchmark names -> the class that implements them (imported only when used)."""

from __future__ import annotations

import importlib
from typing import Any

from llava.eval.base import Benchmark

_BENCHMARKS: dict[str, tuple[str, dict[str, Any]]] = {
    "textvqa": ("llava.eval.benchmarks.textvqa:TextVQA", {"with_ocr": True}),
    "textvqa_noocr": ("llava.eval.benchmarks.textvqa:TextVQA", {"with_ocr": False}),
    "gqa": ("llava.eval.benchmarks.gqa:GQA", {}),
    "vqav2": ("llava.eval.benchmarks.vqav2:VQAv2", {"split": "test-dev"}),
    "vqav2_val": ("llava.eval.benchmarks.vqav2:VQAv2", {"split": "val"}),
    "vizwiz": ("llava.eval.benchmarks.vizwiz:VizWiz", {"split": "test"}),
    "vizwiz_val": ("llava.eval.benchmarks.vizwiz:VizWiz", {"split": "val"}),
    "mme": ("llava.eval.benchmarks.mme:MME", {}),
    "pope": ("llava.eval.benchmarks.pope:POPE", {}),
    "sqa": ("llava.eval.benchmarks.sqa:ScienceQA", {}),
    "mmbench": ("llava.eval.benchmarks.mmbench:MMBench", {}),
    "seed": ("llava.eval.benchmarks.seed:SEEDBench", {}),
    "playground": ("llava.eval.benchmarks.playground:PlaygroundScenes", {}),
    "msvd": ("llava.eval.benchmarks.videoqa:VideoQA", {"dataset": "MSVD"}),
    "msrvtt": ("llava.eval.benchmarks.videoqa:VideoQA", {"dataset": "MSRVTT"}),
    "tgif": ("llava.eval.benchmarks.videoqa:VideoQA", {"dataset": "TGIF"}),
    "activitynet": ("llava.eval.benchmarks.videoqa:VideoQA", {"dataset": "Activitynet"}),
}


def benchmark_names() -> list[str]:
    """Every registered benchmark name."""
    return sorted(_BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    """An instance of the benchmark registered as ``name``."""
    try:
        target, kwargs = _BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(benchmark_names())}") from None
    module_name, class_name = target.split(":")
    benchmark = getattr(importlib.import_module(module_name), class_name)(**kwargs)
    if benchmark.name != name:
        raise TypeError(f"{target}(**{kwargs}) calls itself {benchmark.name!r}, registered as {name!r}")
    return benchmark
