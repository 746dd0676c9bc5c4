"""Writing a playground to disk: the output folder and its JSON / JSON-lines files.

Shared by the shapes playground (:mod:`llava.playground.builder`) and the scenes playground
(:mod:`llava.playground.scene_builder`), so both refuse to clobber a folder the same way and write
byte-identical files for the same data.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def prepare_out_dir(out_dir: Path, force: bool, entries: Iterable[str]) -> None:
    """Create ``out_dir``; a non-empty one is a FileExistsError unless ``force``, which removes only ``entries``
    (the names a builder writes), never other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise FileExistsError(f"output directory {out_dir} is not empty; pass --force (force=True) to overwrite it")
        for name in entries:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        logger.warning("overwriting playground outputs in %s", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented UTF-8 JSON."""
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
