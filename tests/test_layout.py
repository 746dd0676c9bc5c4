"""The package's shape, checked from the source (AST, no imports): layers, no import circles, one door per family.

Every ``import llava...`` counts, function-local and ``TYPE_CHECKING`` ones included: a local import that
only dodges a circle is still a circle.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llava"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("llava.constants", "llava.versions", "llava.utils", "llava.model.config_json"),
    ("llava.families.names",),  # the families' names and the launch scripts' lookup: no torch, used by llava.model
    ("llava",),  # the package's __init__: checks the transformers version on import
    ("llava.hf_adapter",),
    ("llava.compression",),
    ("llava.data",),
    ("llava.arguments",),
    ("llava.model",),
    ("llava.pipeline",),
    ("llava.families",),
    ("llava.inference",),
    ("llava.training", "llava.playground", "llava.serve"),
    ("llava.eval", "llava.bench"),
    ("llava.tools",),
)
"""Bottom to top. A module may import from its own package and from lower layers only; packages that share a
layer do not import each other. A module named here (not its package) has its own layer: a light leaf that lower
layers may use."""

LIGHT_MODULES = ("llava.families.names", "llava.model.config_json")
"""Modules the launch scripts import on every launch: they must not import torch or transformers."""

FAMILY_WORDS = re.compile(r"model_type|Qwen2_5_VL\w*|DuetQwenVL|QwenVL\w*|LlavaNext\w*")
"""What only the registry and the families' own modules may name: the checkpoint's ``model_type`` and the
Qwen2.5-VL and LLaVA-NeXT classes."""

MAX_PUBLIC_PARAMETERS = 8
TRANSFORMERS_SIGNATURES = {"forward", "__init__", "save_pretrained", "from_pretrained"}
"""Methods whose parameters follow a transformers or torch signature (``forward``: the keywords
callers of a ``PreTrainedModel`` pass)."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> Iterator[str]:
    """The ``llava`` modules ``path`` imports (``from llava.x import y``: module ``llava.x.y`` when that is one)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in known else node.module for name in names]
        else:
            continue
        yield from (name for name in names if name == "llava" or name.startswith("llava."))


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imports_of(path, known)) - {name} for name, path in found.items()}


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer_of(module: str) -> int:
    for name in (module, package_of(module)):
        for index, layer in enumerate(LAYERS):
            if name in layer:
                return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add its package to LAYERS")


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (import circles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles() -> None:
    assert strongly_connected(import_graph()) == []


def test_circle_finder_finds_a_circle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_go_down_the_layers() -> None:
    upward = []
    for source, targets in import_graph().items():
        for target in targets:
            same_package = package_of(source) == package_of(target)
            if not same_package and layer_of(target) >= layer_of(source):
                upward.append(f"{source} -> {target}")
    assert upward == []


REGISTRY_MODULES = {"llava.families", "llava.families.base", "llava.families.names", "llava.families.registry"}
"""The registry, the interface it hands out and the families' names."""


def family_modules() -> set[str]:
    """Modules the registry names as belonging to a family, and the registry itself."""
    from llava.families.registry import FAMILIES

    owned = set(REGISTRY_MODULES)
    for family in FAMILIES:
        owned.update(family.modules)
    return owned


def test_only_the_registry_and_the_families_name_a_family() -> None:
    owned = family_modules()
    assert all(name in modules() for name in owned), sorted(owned - set(modules()))
    outside = {
        name: sorted(set(FAMILY_WORDS.findall(path.read_text(encoding="utf-8"))))
        for name, path in modules().items()
        if name not in owned
    }
    assert {name: words for name, words in outside.items() if words} == {}


def test_light_modules_import_only_the_standard_library_and_each_other() -> None:
    heavy = []
    for name in LIGHT_MODULES:
        for node in ast.walk(ast.parse(modules()[name].read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported = [node.module if node.level == 0 else "." * node.level + node.module]
            else:
                continue
            for module in imported:
                top = module.split(".")[0]
                light = module in LIGHT_MODULES if top == "llava" else top in sys.stdlib_module_names
                if not light:
                    heavy.append(f"{name} -> {module}")
    assert heavy == []


def test_public_model_functions_take_few_parameters() -> None:
    crowded = []
    for name, path in modules().items():
        if package_of(name) != "llava.model":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
                continue
            if node.name in TRANSFORMERS_SIGNATURES:
                continue
            arguments = node.args
            named = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
            count = len([argument for argument in named if argument.arg not in {"self", "cls"}])
            if count > MAX_PUBLIC_PARAMETERS:
                crowded.append(f"{name}.{node.name}: {count}")
    assert crowded == []


@pytest.mark.parametrize(
    "word", ["model_type", "Qwen2_5_VLForConditionalGeneration", "DuetQwenVL", "QwenVLPipeline", "DuetLlavaNext"]
)
def test_family_words_are_recognised(word: str) -> None:
    assert FAMILY_WORDS.search(f"x = {word}")
