"""The one place that decides a checkpoint's model family: from ``config.json``'s ``model_type`` (a local
directory, or the Hub config of an id), unless ``MODEL_FAMILY`` (or an explicit ``family=``) names one.
The launch scripts ask it too: ``python -m llava.families.registry --offline MODEL`` prints the family's name
(offline, a Hub id's family follows from its name).

Adding a family: write its module (one class with the :class:`~llava.families.base.ModelFamily` members) and add
an instance to :data:`FAMILIES`. Training, LoRA merging, ``llava.tools.generate``, ``llava.eval.run``, the
lmms-eval plugin and the benchmarks all ask here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torch import nn

from llava.families.base import ModelFamily
from llava.families.llava import LlavaFamily
from llava.families.llava_next import LlavaNextFamily
from llava.families.llava_onevision import LlavaOnevisionFamily
from llava.families.qwen import QwenVLFamily
from llava.model.loading import read_model_type

FAMILIES: tuple[ModelFamily, ...] = (LlavaFamily(), QwenVLFamily(), LlavaNextFamily(), LlavaOnevisionFamily())
DEFAULT_FAMILY = "llava"
"""The family of anything no family claims: a plain language model that training pairs with a CLIP tower."""
FAMILY_ENV = "MODEL_FAMILY"


def family_named(name: str) -> ModelFamily:
    """The family called ``name``; ValueError listing the known ones otherwise."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(family.name for family in FAMILIES)}")


def model_type_of(model_name_or_path: str | os.PathLike[str]) -> str | None:
    """``model_type`` of a local checkpoint's config.json or of a Hub id's config; ``None`` for a local directory
    without config.json (a LoRA adapter, an incomplete copy: the default family's loader says what is missing)."""
    path = Path(model_name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        return None
    return read_model_type(path)


def family_for(
    model_name_or_path: str | os.PathLike[str], family: str | None = None, offline: bool = False
) -> ModelFamily:
    """The family of a checkpoint or language model (local directory or Hub id).

    ``family`` (else the ``MODEL_FAMILY`` environment variable) overrides what ``model_type`` says. ``offline``:
    a Hub id is not looked up; its family is the one whose ``hub_names`` its name contains.
    """
    name = family or os.environ.get(FAMILY_ENV)
    if name:
        return family_named(name)
    if offline and not Path(model_name_or_path).is_dir():
        hub_id = os.fspath(model_name_or_path).lower()
        named = [candidate for candidate in FAMILIES if any(part in hub_id for part in candidate.hub_names)]
        return named[0] if named else family_named(DEFAULT_FAMILY)
    model_type = model_type_of(model_name_or_path)
    for candidate in FAMILIES:
        if model_type in candidate.model_types:
            return candidate
    return family_named(DEFAULT_FAMILY)


def family_of_model(model: nn.Module) -> ModelFamily:
    """The family whose builders make ``model`` (an unwrapped model: not a peft or DeepSpeed wrapper): of those
    whose model class it is an instance of, the one whose ``model_types`` hold its config's (families may share a
    class: LLaVA-NeXT and LLaVA-OneVision run as one), else the first."""
    candidates = [family for family in FAMILIES if isinstance(model, family.model_class)]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in candidates:
        if model_type in family.model_types:
            return family
    if candidates:
        return candidates[0]
    raise TypeError(
        f"{type(model).__name__} belongs to no model family; known: "
        + ", ".join(f"{family.name} ({family.model_class.__name__})" for family in FAMILIES)
    )


def main(argv: list[str] | None = None) -> int:
    """Print the family of ``MODEL`` (what the launch scripts ask); exit code 2 with the reason when it fails."""
    parser = argparse.ArgumentParser(prog="python -m llava.families.registry", description=main.__doc__)
    parser.add_argument("model", help="checkpoint or language model: local directory or Hub id")
    parser.add_argument("--offline", action="store_true", help="do not ask the Hub; a Hub id's name decides")
    args = parser.parse_args(argv)
    try:
        print(family_for(args.model, offline=args.offline).name)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
