"""The model families' names: the one table of each family's name, the ``config.json`` ``model_type`` values it
loads and the parts of a Hub id that name it, and the decision the launch scripts ask for. Standard library only
(no torch, no transformers), so ``python -m llava.families.names --offline MODEL`` answers at once:

* ``MODEL_FAMILY`` (or an explicit ``family``) names the family, checked against the known names;
* a local directory: the family of its config.json's ``model_type`` (the default family for a type no family
  loads, or for a directory without config.json: a LoRA adapter, an incomplete copy);
* anything else is a Hub id: the family whose ``hub_names`` its name contains, else the default family (or, when
  a ``hub_model_type`` lookup is given, as :mod:`llava.families.registry` does online, its Hub config's type).

The family classes (:mod:`llava.families.registry`'s ``FAMILIES``) and the model modules take their names from
here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llava.model.config_json import read_config_json


@dataclass(frozen=True)
class FamilyNames:
    """What names one family: its ``name`` (``MODEL_FAMILY``'s value), the ``model_types`` of config.json it
    loads and the lowercase ``hub_names`` a Hub id of it contains (offline guesses only)."""

    name: str
    model_types: tuple[str, ...]
    hub_names: tuple[str, ...]


LLAVA_NAMES = FamilyNames("llava", ("duet_llava", "llava", "llava_llama", "video_llava"), ())
"""LLaVA-1.5 / Video-LLaVA in any layout (``duet_llava``: :class:`~llava.model.config.DuetLlavaConfig`); no Hub
name: it is the default family, of anything no other family names."""
QWEN2_5_VL_NAMES = FamilyNames("qwen2_5_vl", ("qwen2_5_vl",), ("qwen2.5-vl", "qwen2_5_vl"))
LLAVA_NEXT_NAMES = FamilyNames("llava_next", ("llava_next",), ("llava-v1.6", "llava-next", "llava_next"))
LLAVA_ONEVISION_NAMES = FamilyNames("llava_onevision", ("llava_onevision",), ("llava-onevision", "llava_onevision"))

FAMILY_NAMES: tuple[FamilyNames, ...] = (LLAVA_NAMES, QWEN2_5_VL_NAMES, LLAVA_NEXT_NAMES, LLAVA_ONEVISION_NAMES)
"""Every family, in the registry's order (the first whose ``hub_names`` match names a Hub id)."""
DEFAULT_FAMILY = LLAVA_NAMES.name
"""The family of anything no family claims: a plain language model that training pairs with a CLIP tower."""
FAMILY_ENV = "MODEL_FAMILY"


def known_family(name: str) -> str:
    """``name`` when a family is called so; ValueError listing the known ones otherwise."""
    if any(family.name == name for family in FAMILY_NAMES):
        return name
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(family.name for family in FAMILY_NAMES)}")


def family_of_model_type(model_type: str | None) -> str:
    """The family that loads config.json's ``model_type``; the default family for any other (or ``None``)."""
    for family in FAMILY_NAMES:
        if model_type in family.model_types:
            return family.name
    return DEFAULT_FAMILY


def family_of_hub_id(hub_id: str) -> str:
    """The first family whose ``hub_names`` the Hub id contains (case-insensitive); else the default family."""
    lowered = hub_id.lower()
    for family in FAMILY_NAMES:
        if any(part in lowered for part in family.hub_names):
            return family.name
    return DEFAULT_FAMILY


def local_model_type(directory: str | os.PathLike[str]) -> str | None:
    """``model_type`` of a local directory's config.json; ``None`` when it has no config.json. ValueError when
    the file is unreadable JSON or has no ``model_type``."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        return None
    config = read_config_json(config_file)
    if "model_type" not in config:
        raise ValueError(f"{config_file} has no 'model_type'")
    return config["model_type"]


def family_name(
    model_name_or_path: str | os.PathLike[str],
    family: str | None = None,
    hub_model_type: Callable[[str], str] | None = None,
) -> str:
    """The family name of a checkpoint or language model (local directory or Hub id), decided as the module
    docstring says. ``hub_model_type``: how to read a Hub id's ``model_type`` (not given: its name decides)."""
    override = family or os.environ.get(FAMILY_ENV)
    if override:
        return known_family(override)
    if Path(model_name_or_path).is_dir():
        return family_of_model_type(local_model_type(model_name_or_path))
    if hub_model_type is not None:
        return family_of_model_type(hub_model_type(os.fspath(model_name_or_path)))
    return family_of_hub_id(os.fspath(model_name_or_path))


def main(
    argv: list[str] | None = None,
    prog: str = "python -m llava.families.names",
    hub_model_type: Callable[[str], str] | None = None,
) -> int:
    """Print the family of ``MODEL`` (what the launch scripts ask); exit code 2 with the reason when it fails.
    Without ``hub_model_type`` (this module's own command) a Hub id's name decides, ``--offline`` or not."""
    parser = argparse.ArgumentParser(prog=prog, description="Print the model family of MODEL.")
    parser.add_argument("model", help="checkpoint or language model: local directory or Hub id")
    parser.add_argument("--offline", action="store_true", help="do not ask the Hub; a Hub id's name decides")
    args = parser.parse_args(argv)
    try:
        name = family_name(args.model, hub_model_type=None if args.offline else hub_model_type)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
