"""A checkpoint directory's ``config.json`` read as plain JSON: standard library only, so the launch scripts'
family lookup (:mod:`llava.families.names`) reads it without importing torch or transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_config_json(config_file: str | Path) -> dict[str, Any]:
    """A model directory's ``config.json`` as a dict; ValueError naming the file when it is not UTF-8 JSON
    of an object (instead of a bare decoder traceback)."""
    try:
        raw = json.loads(Path(config_file).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{config_file}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{config_file}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(raw).__name__}")
    return raw
