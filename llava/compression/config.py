"""Typed, validated configuration of DUET-VLM visual-token compression.

A :class:`CompressionConfig` has up to two stages (Stage A by DUET's V2V or by DyMU's DToMe):

* :class:`V2VConfig` (Stage A, vision tower): merge the CLIP patches into ``k1`` dominant tokens (CLS
  included) and ``k2`` contextual tokens, with DUET's pooled anchors or VisionZip's positional ones.
* :class:`DyMUConfig` (Stage A alternative): DyMU's threshold-driven merging in every tower block; the
  number of tokens per image follows the image.
* :class:`T2VConfig` (Stage B, LLM): at given fractions of the decoder depth keep only the most attended
  visual tokens, ``floor(ratio * N0)`` of them, ``N0`` being the visual count entering the LLM.

Boundaries are *fractions of depth*, not layer indices, so a preset means the same thing on the 32-layer
Vicuna-7B and on a 4-layer test model. :meth:`T2VConfig.boundary_layers` turns them into layer indices:
``round(f * num_layers)`` (round half up), at least 1 (0.0 alone means layer 0, the LLM input); boundaries
that land on the same layer (shallow models) are merged and the *last* (smallest) keep ratio wins, i.e. the
shallow model drops as much as the deep one does by the end of that layer.

Presets are YAML files in ``configs/compression/`` at the repository root (see :func:`available_presets`).
They are found through the package location, which works for the editable install used by this project
(``pip install -e .``). A non-editable install (a wheel) does not contain them: pass the YAML path instead
(``--compression path/to/duet_192.yaml``) or set ``DUET_COMPRESSION_PRESETS`` to a folder of presets. A
config saved in a model's ``config.json`` (``CompressionConfig.to_dict()``) never needs the preset files.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "PRESET_DIRS_ENV",
    "T2V_POSITION_MODES",
    "T2V_QUERIES",
    "T2V_SELECTORS",
    "V2V_METHODS",
    "CompressionConfig",
    "CompressionConfigError",
    "DyMUConfig",
    "T2VConfig",
    "V2VConfig",
    "available_presets",
    "load_compression",
    "preset_dirs",
]

logger = logging.getLogger(__name__)

V2V_METHODS = ("duet", "visionzip", "random", "divprune", "vispruner")
T2V_QUERIES = ("last", "instruction", "salient")
T2V_POSITION_MODES = ("keep", "compact")
T2V_SELECTORS = ("attention", "dpp")
PRESET_DIRS_ENV = "DUET_COMPRESSION_PRESETS"
_REPO_PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "compression"
# Products like 0.5 * 307 or 0.29 * 100 may land a hair below an integer in binary floating point.
_FLOOR_EPS = 1e-9


class CompressionConfigError(ValueError):
    """A compression config (preset, YAML file or dict) is invalid; the message names the source and field."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _floor(value: float) -> int:
    return math.floor(value + _FLOOR_EPS)


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5 + _FLOOR_EPS)


@dataclass(frozen=True)
class V2VConfig:
    """Stage A (vision tower): keep ``dominant`` tokens (CLS counted) and merge the rest into ``contextual``.

    ``method`` is ``"duet"`` (anchors evenly spaced in CLS-score rank over a pool of ``cluster_width * k2``
    candidates, other patches dropped) or ``"visionzip"`` (anchors evenly spaced by position over all
    remaining patches, all of them merged; ``cluster_width`` unused) or ``"random"`` (the baseline: CLS and
    ``k1 - 1`` uniformly random patches, ``k2`` must be 0). Floats in (0, 1) are fractions of each image's
    tokens (Qwen2.5-VL, whose images have different token counts; no CLS there).
    """

    method: str
    dominant: int
    contextual: int
    cluster_width: int = 4

    def __post_init__(self) -> None:
        if self.method not in V2V_METHODS:
            raise CompressionConfigError(f"v2v.method must be one of {list(V2V_METHODS)}, got {self.method!r}")
        if self.is_fraction:
            if not (
                0.0 < self.dominant < 1.0 and 0.0 <= self.contextual < 1.0 and self.dominant + self.contextual <= 1
            ):
                raise CompressionConfigError(
                    "v2v.dominant and v2v.contextual given as fractions of each image's tokens must lie in (0, 1) and "
                    f"[0, 1) and sum to at most 1; got {self.dominant!r}, {self.contextual!r}"
                )
        else:
            if not _is_int(self.dominant) or self.dominant < 1:
                raise CompressionConfigError(
                    f"v2v.dominant (k1) must be an integer >= 1 because it counts the CLS token, which is always "
                    f"kept; got {self.dominant!r}"
                )
            if not _is_int(self.contextual) or self.contextual < 0:
                raise CompressionConfigError(f"v2v.contextual (k2) must be an integer >= 0, got {self.contextual!r}")
        if self.method == "random" and self.contextual != 0:
            raise CompressionConfigError(
                "v2v.method random keeps k1 random tokens and merges nothing: contextual must be 0, "
                f"got {self.contextual!r}"
            )
        if self.method in ("divprune", "vispruner") and self.contextual != 0:
            raise CompressionConfigError(
                f"v2v.method {self.method} keeps k1 selected tokens (CLS included) and merges nothing: contextual "
                f"must be 0, got {self.contextual!r}"
            )
        if not _is_int(self.cluster_width) or self.cluster_width < 1:
            raise CompressionConfigError(f"v2v.cluster_width must be an integer >= 1, got {self.cluster_width!r}")

    @property
    def is_fraction(self) -> bool:
        """Budgets given as fractions of each image's token count (Qwen2.5-VL's counts vary per image)."""
        return isinstance(self.dominant, float) or (isinstance(self.contextual, float) and self.contextual > 0)

    def budget(self, num_tokens: int) -> tuple[int, int]:
        """``(k1, k2)`` for an image of ``num_tokens`` tokens: the fractions floored, at least one dominant token."""
        if not self.is_fraction:
            return self.dominant, self.contextual
        dominant = max(1, _floor(self.dominant * num_tokens))
        return dominant, min(_floor(self.contextual * num_tokens), num_tokens - dominant)

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image leaving the vision tower: ``k1 + k2``."""
        if self.is_fraction:
            raise ValueError("v2v budgets given as fractions keep a different number of tokens per image")
        return self.dominant + self.contextual


@dataclass(frozen=True)
class DyMUConfig:
    """Stage A alternative (vision tower): DyMU's dynamic merging (DToMe) in every encoder block run.

    ``thresholds`` holds one cosine threshold per encoder layer the tower runs (23 for CLIP-L/14-336 read
    at layer -2); an A token whose best key similarity exceeds it merges, so the token count follows the
    image. ``thresholds_file`` names a JSON file written by ``python -m llava.tools.calibrate_dymu``
    (absolute, or relative to the working directory); it is read when the config is loaded and the
    thresholds are stored inline, so a checkpoint's ``config.json`` needs no file.

    ``vtu``: DyMU's virtual token unmerging in the LLM. Every merged token is copied back to each position
    it covers for attention (RoPE at the true positions, full-length attention and KV cache) while the
    linear layers and the MLP run once per token. Without it the merged tokens enter the LLM packed.
    """

    thresholds: tuple[float, ...] = ()
    thresholds_file: str | None = None
    vtu: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.vtu, bool):
            raise CompressionConfigError(f"dymu.vtu must be true or false, got {self.vtu!r}")
        thresholds = self.thresholds
        if not thresholds and self.thresholds_file:
            thresholds = _read_thresholds(self.thresholds_file)
        if not isinstance(thresholds, (list, tuple)) or not thresholds:
            raise CompressionConfigError(
                "dymu needs thresholds: a list with one value per vision-tower layer, or thresholds_file (make one "
                "with `python -m llava.tools.calibrate_dymu`)"
            )
        if not all(_is_number(value) and 0.0 <= value <= 1.0 for value in thresholds):
            raise CompressionConfigError(f"dymu.thresholds are cosine thresholds in [0, 1], got {list(thresholds)}")
        object.__setattr__(self, "thresholds", tuple(float(value) for value in thresholds))
        object.__setattr__(self, "thresholds_file", None)


def _read_thresholds(path_text: str) -> list[float]:
    path = Path(path_text)
    if not path.is_file():
        raise CompressionConfigError(
            f"dymu.thresholds_file {path_text!r} does not exist (looked at {path.resolve()}); calibrate one with "
            "`python -m llava.tools.calibrate_dymu --vision_tower ... --data_path ... --image_folder ... "
            f"--target low|mid|high|TOKENS --out {path_text}`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CompressionConfigError(f"dymu.thresholds_file {path_text!r} is not valid JSON: {error}") from None
    if not isinstance(data, Mapping) or "thresholds" not in data:
        raise CompressionConfigError(f"dymu.thresholds_file {path_text!r} has no 'thresholds' list")
    return data["thresholds"]


@dataclass(frozen=True)
class T2VConfig:
    """Stage B (LLM): from each boundary on, keep ``floor(keep_ratio * N0)`` visual tokens.

    ``boundaries`` are fractions of the decoder depth in (0, 1], strictly increasing (with ``selector: dpp``
    also 0.0: at the LLM input, before layer 0, on the input embeddings); ``keep_ratios`` are
    relative to ``N0`` (the visual count entering the LLM, *not* to the previous stage), in [0, 1] and
    non-increasing. ``query`` selects the text rows that score the visual tokens (``"last"`` token,
    all ``"instruction"`` tokens after the image, or ``"salient"`` instruction tokens plus the last one);
    ``position_mode`` keeps the original position ids of the survivors or compacts them to 0..n-1.
    ``selector`` picks the kept visual tokens: ``"attention"`` (the query rows' attention: FastV, PyramidDrop,
    DUET) or ``"dpp"`` (CDPruner's instruction-conditioned DPP, :mod:`llava.compression.dpp`).
    """

    boundaries: tuple[float, ...]
    keep_ratios: tuple[float, ...]
    query: str = "instruction"
    position_mode: str = "keep"
    selector: str = "attention"

    def __post_init__(self) -> None:
        for name in ("boundaries", "keep_ratios"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise CompressionConfigError(f"t2v.{name} must be a list of numbers, got {value!r}")
            if not all(_is_number(item) for item in value):
                raise CompressionConfigError(f"t2v.{name} must contain only numbers, got {list(value)!r}")
            object.__setattr__(self, name, tuple(float(item) for item in value))
        if not self.boundaries:
            raise CompressionConfigError("t2v.boundaries is empty; leave out the t2v section for no Stage B")
        if len(self.boundaries) != len(self.keep_ratios):
            raise CompressionConfigError(
                f"t2v.boundaries and t2v.keep_ratios must have the same length, got {len(self.boundaries)} "
                f"boundaries {list(self.boundaries)} and {len(self.keep_ratios)} keep_ratios {list(self.keep_ratios)}"
            )
        lowest = 0.0 if self.selector == "dpp" else math.nextafter(0.0, 1.0)  # 0.0: the LLM input, DPP only
        if any(not lowest <= f <= 1.0 for f in self.boundaries):
            raise CompressionConfigError(
                f"t2v.boundaries are fractions of the LLM depth and must lie in (0, 1] (0.0, the LLM input, only "
                f"with selector 'dpp'), got {list(self.boundaries)}"
            )
        if any(b <= a for a, b in pairwise(self.boundaries)):
            raise CompressionConfigError(f"t2v.boundaries must be strictly increasing, got {list(self.boundaries)}")
        if any(not 0.0 <= r <= 1.0 for r in self.keep_ratios):
            raise CompressionConfigError(f"t2v.keep_ratios must lie in [0, 1], got {list(self.keep_ratios)}")
        if any(b > a for a, b in pairwise(self.keep_ratios)):
            raise CompressionConfigError(
                f"t2v.keep_ratios must be non-increasing (each is relative to N0, the count entering the LLM, "
                f"not to the previous stage), got {list(self.keep_ratios)}"
            )
        if self.query not in T2V_QUERIES:
            raise CompressionConfigError(f"t2v.query must be one of {list(T2V_QUERIES)}, got {self.query!r}")
        if self.position_mode not in T2V_POSITION_MODES:
            raise CompressionConfigError(
                f"t2v.position_mode must be one of {list(T2V_POSITION_MODES)}, got {self.position_mode!r}"
            )
        if self.selector not in T2V_SELECTORS:
            raise CompressionConfigError(f"t2v.selector must be one of {list(T2V_SELECTORS)}, got {self.selector!r}")

    def boundary_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layer indices where dropping happens (layer ``l`` is the first to see fewer tokens).

        ``round(f * num_layers)`` rounded half up and at least 1 (0.0 alone gives layer 0); duplicates (shallow
        models) are merged, so the result may be shorter than ``boundaries``: pair it with :meth:`stage_ratios` or use
        :meth:`schedule`. A boundary equal to ``num_layers`` drops nothing that any layer sees (warned once).
        """
        return _merged_schedule(self, num_layers)[0]

    def stage_ratios(self, num_layers: int) -> tuple[float, ...]:
        """Keep ratios aligned with :meth:`boundary_layers` (merged duplicates keep the last, smallest ratio)."""
        return _merged_schedule(self, num_layers)[1]

    def kept_counts(self, n0: int, num_layers: int | None = None) -> tuple[int, ...]:
        """Visual tokens kept per stage, ``floor(r * n0)``; per configured boundary, or per merged stage
        (aligned with :meth:`boundary_layers`) when ``num_layers`` is given."""
        if not _is_int(n0) or n0 < 0:
            raise ValueError(f"n0 must be a non-negative integer, got {n0!r}")
        ratios = self.keep_ratios if num_layers is None else self.stage_ratios(num_layers)
        return tuple(_floor(ratio * n0) for ratio in ratios)

    def schedule(self, num_layers: int, n0: int) -> tuple[tuple[int, int], ...]:
        """``(boundary_layer, kept_visual_tokens)`` per merged stage: what the LLM forward needs."""
        return tuple(zip(self.boundary_layers(num_layers), self.kept_counts(n0, num_layers), strict=True))


@functools.lru_cache(maxsize=256)
def _merged_schedule(t2v: T2VConfig, num_layers: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Boundary layers and ratios for a ``num_layers``-deep LLM; cached so the warnings appear once."""
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    layers: list[int] = []
    ratios: list[float] = []
    for fraction, ratio in zip(t2v.boundaries, t2v.keep_ratios, strict=True):
        layer = 0 if fraction == 0.0 else max(1, _round_half_up(fraction * num_layers))
        if layers and layers[-1] == layer:
            logger.info(
                "T2V boundaries %s on a %d-layer LLM: two boundaries fall on layer %d; merged, keep ratio %s wins",
                list(t2v.boundaries),
                num_layers,
                layer,
                ratio,
            )
            ratios[-1] = ratio
        else:
            layers.append(layer)
            ratios.append(ratio)
    if layers[-1] == num_layers:
        logger.warning(
            "T2V boundary %s of a %d-layer LLM rounds to layer %d, past the last layer: that stage drops nothing",
            t2v.boundaries[-1],
            num_layers,
            num_layers,
        )
    return tuple(layers), tuple(ratios)


@dataclass(frozen=True)
class CompressionConfig:
    """Both compression stages; either may be ``None``. ``name`` is for logs and reports only."""

    name: str = "none"
    v2v: V2VConfig | None = None
    t2v: T2VConfig | None = field(default=None)
    dymu: DyMUConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise CompressionConfigError(f"name must be a non-empty string, got {self.name!r}")
        if self.v2v is not None and not isinstance(self.v2v, V2VConfig):
            raise CompressionConfigError(f"v2v must be a V2VConfig or None, got {type(self.v2v).__name__}")
        if self.t2v is not None and not isinstance(self.t2v, T2VConfig):
            raise CompressionConfigError(f"t2v must be a T2VConfig or None, got {type(self.t2v).__name__}")
        if self.dymu is not None and not isinstance(self.dymu, DyMUConfig):
            raise CompressionConfigError(f"dymu must be a DyMUConfig or None, got {type(self.dymu).__name__}")
        if self.dymu is not None and self.v2v is not None:
            raise CompressionConfigError("v2v and dymu both reduce tokens in the vision tower: configure one of them")
        if self.dymu is not None and self.dymu.vtu and self.t2v is not None:
            raise CompressionConfigError(
                "dymu.vtu keeps the LLM sequence at full length while t2v drops positions from it: they are not "
                "combined; use t2v with dymu's packed tokens (vtu: false)"
            )

    @property
    def enabled(self) -> bool:
        """Whether any stage reduces visual tokens."""
        return self.v2v is not None or self.t2v is not None or self.dymu is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML data (lists, not tuples), the inverse of :meth:`from_dict`; stored in config.json."""
        return {
            "name": self.name,
            "v2v": None if self.v2v is None else {f.name: getattr(self.v2v, f.name) for f in fields(V2VConfig)},
            "t2v": None
            if self.t2v is None
            else {
                "boundaries": list(self.t2v.boundaries),
                "keep_ratios": list(self.t2v.keep_ratios),
                "query": self.t2v.query,
                "position_mode": self.t2v.position_mode,
                **({"selector": self.t2v.selector} if self.t2v.selector != "attention" else {}),
            },
            **(
                {}
                if self.dymu is None
                else {"dymu": {"thresholds": list(self.dymu.thresholds), **({"vtu": True} if self.dymu.vtu else {})}}
            ),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "dict") -> CompressionConfig:
        """Build and validate from :meth:`to_dict` output or a parsed YAML file; errors name ``source``."""
        try:
            return _from_dict(data)
        except CompressionConfigError as error:
            raise CompressionConfigError(f"{source}: {error}") from None


def _check_keys(data: Any, allowed: tuple[str, ...], required: tuple[str, ...], where: str) -> None:
    if not isinstance(data, Mapping):
        raise CompressionConfigError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        raise CompressionConfigError(f"unknown key(s) {unknown} in {where}; allowed: {list(allowed)}")
    missing = [key for key in required if key not in data]
    if missing:
        raise CompressionConfigError(f"missing key(s) {missing} in {where}")


def _from_dict(data: Any) -> CompressionConfig:
    _check_keys(data, ("name", "v2v", "t2v", "dymu"), (), "the top level")
    v2v = data.get("v2v")
    t2v = data.get("t2v")
    dymu = data.get("dymu")
    if dymu is not None:
        _check_keys(dymu, ("thresholds", "thresholds_file", "vtu"), (), "dymu")
        dymu = DyMUConfig(**dymu)
    if v2v is not None:
        names = tuple(f.name for f in fields(V2VConfig))
        _check_keys(v2v, names, ("method", "dominant", "contextual"), "v2v")
        v2v = V2VConfig(**v2v)
    if t2v is not None:
        names = tuple(f.name for f in fields(T2VConfig))
        _check_keys(t2v, names, ("boundaries", "keep_ratios"), "t2v")
        t2v = T2VConfig(**t2v)
    return CompressionConfig(name=data.get("name", "custom"), v2v=v2v, t2v=t2v, dymu=dymu)


def preset_dirs() -> list[Path]:
    """Folders searched for presets, in order: ``$DUET_COMPRESSION_PRESETS`` (``os.pathsep``-separated),
    then ``configs/compression`` of the source tree this package is imported from."""
    extra = [Path(part) for part in os.environ.get(PRESET_DIRS_ENV, "").split(os.pathsep) if part]
    return [*extra, _REPO_PRESET_DIR]


def available_presets() -> list[str]:
    """Sorted names of the presets found in :func:`preset_dirs` (file stems of ``*.yaml``)."""
    names = {path.stem for folder in preset_dirs() if folder.is_dir() for path in folder.glob("*.yaml")}
    return sorted(names)


def _load_yaml(path: Path, source: str, default_name: str) -> CompressionConfig:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as error:
        raise CompressionConfigError(f"{source}: not valid YAML: {error}") from None
    if data is None:
        raise CompressionConfigError(f"{source}: the file is empty")
    if isinstance(data, Mapping) and "name" not in data:
        data = {"name": default_name, **data}
    return CompressionConfig.from_dict(data, source=source)


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or "/" in spec or os.sep in spec


def load_compression(spec: str | Path | Mapping[str, Any] | CompressionConfig | None) -> CompressionConfig:
    """Resolve a ``--compression`` value or a saved ``config.json`` entry to a validated config.

    ``None``, ``""`` and ``"none"``: no compression. A :class:`CompressionConfig` is returned as is; a dict is
    read with :meth:`CompressionConfig.from_dict`; a ``Path`` or a string ending in ``.yaml``/``.yml`` or
    holding a path separator is a YAML file; any other string is a preset name (see :func:`preset_dirs`).
    """
    if spec is None:
        return CompressionConfig()
    if isinstance(spec, CompressionConfig):
        return spec
    if isinstance(spec, Mapping):
        return CompressionConfig.from_dict(spec, source="compression dict")
    if isinstance(spec, Path) or (isinstance(spec, str) and _looks_like_path(spec)):
        path = Path(spec)
        if not path.is_file():
            raise CompressionConfigError(f"compression file {str(path)!r} does not exist")
        return _load_yaml(path, source=f"compression file {str(path)!r}", default_name=path.stem)
    if not isinstance(spec, str):
        raise CompressionConfigError(
            f"compression must be a preset name, a YAML path, a dict or None, got {type(spec).__name__}"
        )
    name = spec.strip()
    if name in ("", "none"):
        return CompressionConfig()
    searched = preset_dirs()
    for folder in searched:
        path = folder / f"{name}.yaml"
        if path.is_file():
            return _load_yaml(path, source=f"preset {name!r} ({path})", default_name=name)
    found = available_presets()
    raise CompressionConfigError(
        f"unknown compression preset {name!r}; looked for {name}.yaml in {[str(d) for d in searched]}. "
        f"Available: {found or 'none found (non-editable install?)'}. Pass a YAML path with --compression "
        f"path/to/preset.yaml or set {PRESET_DIRS_ENV} to a folder of presets."
    )
