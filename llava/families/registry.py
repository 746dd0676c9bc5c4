"""The one place that hands out a checkpoint's model family: from ``config.json``'s ``model_type`` (a local
directory, or the Hub config of an id), unless ``MODEL_FAMILY`` (or an explicit ``family=``) names one. The names
and the decision itself live in :mod:`llava.families.names` (no torch: the launch scripts ask it,
``python -m llava.families.names --offline MODEL``); this module maps them to the family objects and, online,
reads a Hub id's config.

Adding a family: write its module (one class with the :class:`~llava.families.base.ModelFamily` members), add its
names to :data:`llava.families.names.FAMILY_NAMES` and an instance to :data:`FAMILIES`. Training, LoRA merging,
``llava.tools.generate``, ``llava.eval.run``, the lmms-eval plugin and the benchmarks all ask here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch import nn

from llava.families.base import ModelFamily
from llava.families.llava import LlavaFamily
from llava.families.llava_next import LlavaNextFamily
from llava.families.llava_onevision import LlavaOnevisionFamily
from llava.families.names import family_name, known_family, local_model_type
from llava.families.names import main as names_main
from llava.families.qwen import QwenVLFamily
from llava.model.loading import read_model_type

FAMILIES: tuple[ModelFamily, ...] = (LlavaFamily(), QwenVLFamily(), LlavaNextFamily(), LlavaOnevisionFamily())
"""One instance per entry of :data:`llava.families.names.FAMILY_NAMES`, in its order."""
_BY_NAME = {family.name: family for family in FAMILIES}


def family_named(name: str) -> ModelFamily:
    """The family called ``name``; ValueError listing the known ones otherwise."""
    return _BY_NAME[known_family(name)]


def model_type_of(model_name_or_path: str | os.PathLike[str]) -> str | None:
    """``model_type`` of a local checkpoint's config.json or of a Hub id's config; ``None`` for a local directory
    without config.json (a LoRA adapter, an incomplete copy: the default family's loader says what is missing)."""
    if Path(model_name_or_path).is_dir():
        return local_model_type(model_name_or_path)
    return read_model_type(model_name_or_path)


def family_for(
    model_name_or_path: str | os.PathLike[str], family: str | None = None, offline: bool = False
) -> ModelFamily:
    """The family of a checkpoint or language model (local directory or Hub id).

    ``family`` (else the ``MODEL_FAMILY`` environment variable) overrides what ``model_type`` says. ``offline``:
    a Hub id is not looked up; its family is the one whose ``hub_names`` its name contains.
    """
    hub_model_type = None if offline else read_model_type
    return family_named(family_name(model_name_or_path, family, hub_model_type=hub_model_type))


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
    """Print the family of ``MODEL``; exit code 2 with the reason when it fails. As ``python -m
    llava.families.names`` (which the launch scripts call: it imports no torch), but without ``--offline`` a Hub
    id's config is read."""
    return names_main(argv, prog="python -m llava.families.registry", hub_model_type=read_model_type)


if __name__ == "__main__":
    sys.exit(main())
