"""Checkpoint completeness markers and explicit resume resolution.

LLaVA resumes implicitly whenever ``output_dir`` holds a ``checkpoint-*`` folder, even after the
configuration changed, and cannot tell a half-written checkpoint (a job killed while saving) from
a finished one. Here resuming is explicit and only finished checkpoints are eligible:

* :class:`CheckpointCompletionCallback` writes ``checkpoint_complete.json`` into each
  ``checkpoint-<step>`` folder *after* the Trainer finished saving everything (model, DeepSpeed
  engine shards, optimizer, scheduler, RNG states, ``trainer_state.json``).
* :func:`resolve_resume_checkpoint` turns ``--resume_from_checkpoint`` (``None``/``""``, ``"auto"``
  or a path) into the folder to pass to ``Trainer.train(resume_from_checkpoint=...)``.

Multi-node: checkpoints are expected on storage shared by all nodes, so exactly one process in the
whole job (global rank 0, ``state.is_world_process_zero``) writes the marker; keying this on the
local rank would make every node's rank 0 race on the same file (LLaVA #861). With
``save_on_each_node=True`` (node-local storage) each node's local rank 0 writes its own copy.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"
"""Folder prefix the HF Trainer uses: ``checkpoint-<global_step>``."""

COMPLETE_MARKER = "checkpoint_complete.json"
"""Marker file written last into a checkpoint folder; its presence means the save finished."""

RESUME_AUTO = "auto"
"""``--resume_from_checkpoint auto``: resume from the newest complete checkpoint in ``output_dir``."""

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


class CheckpointResumeError(FileNotFoundError):
    """Raised when ``--resume_from_checkpoint`` names nothing that can be resumed from."""


_CHUNK = 16 * 1024 * 1024
CORRUPTED = "file content changed since the save"
"""Start of :func:`checkpoint_problem`'s answer for a finished checkpoint whose bytes changed afterwards."""


def file_crc32(path: str | os.PathLike[str]) -> str:
    """CRC-32 of a file as 8 hex digits, read in 16 MiB chunks.

    CRC-32 catches accidental corruption (a torn write, a flipped block), which is what a checkpoint needs;
    zlib's is hardware-accelerated (about 6 GB/s per core measured here) and releases the GIL, so files
    are hashed in parallel threads.
    """
    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def _checksums(paths: list[Path]) -> list[str]:
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(file_crc32, paths))


def _list_files(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """Relative path, size and CRC-32 of every file under ``checkpoint_dir`` (the marker excluded)."""
    paths = []
    for path in sorted(checkpoint_dir.rglob("*")):
        is_marker = path.name == COMPLETE_MARKER or path.name.startswith(f".{COMPLETE_MARKER}")
        if path.is_file() and not is_marker:
            paths.append(path)
    return [
        {"path": path.relative_to(checkpoint_dir).as_posix(), "size": path.stat().st_size, "crc32": checksum}
        for path, checksum in zip(paths, _checksums(paths), strict=True)
    ]


def mark_checkpoint_complete(
    checkpoint_dir: str | os.PathLike[str],
    step: int,
    run_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the completion marker into ``checkpoint_dir`` and return its path.

    Call only after every file of the checkpoint has been written (by all ranks). The marker lists
    the files with their sizes and CRC-32 so a later deletion, truncation or overwrite is detected, names its writer
    (global rank and host: one process per checkpoint, see :class:`CheckpointCompletionCallback`), and is written
    atomically (temporary file, fsync, rename) so a crash never leaves a partial marker behind.
    ``run_config`` (optional, JSON-serialisable) is stored so a resume can warn about config changes.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"Cannot mark missing checkpoint folder {checkpoint_dir} as complete.")
    marker: dict[str, Any] = {
        "step": int(step),
        "completed_at": time.time(),
        "files": _list_files(checkpoint_dir),
        "writer": {"rank": int(os.environ.get("RANK", "0")), "host": socket.gethostname()},
    }
    if run_config is not None:
        marker["run_config"] = dict(run_config)
    marker_path = checkpoint_dir / COMPLETE_MARKER
    tmp_path = checkpoint_dir / f".{COMPLETE_MARKER}.tmp-{os.getpid()}"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, marker_path)
    _fsync_dir(checkpoint_dir)
    logger.info("Checkpoint %s marked complete (%d files).", checkpoint_dir, len(marker["files"]))
    return marker_path


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory``; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("fsync of directory %s not supported", directory)
    finally:
        os.close(fd)


def read_checkpoint_marker(checkpoint_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The parsed completion marker of ``checkpoint_dir``, or ``None`` when it is missing or unreadable."""
    marker_path = Path(checkpoint_dir) / COMPLETE_MARKER
    if not marker_path.is_file():
        return None
    try:
        with open(marker_path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("Unreadable checkpoint marker %s: %s", marker_path, err)
        return None
    return marker if isinstance(marker, dict) else None


def checkpoint_problem(checkpoint_dir: str | os.PathLike[str], verify_content: bool = False) -> str | None:
    """Why ``checkpoint_dir`` cannot be resumed from, or ``None`` when it is complete.

    Complete means: the marker exists and every file it lists is still there with its recorded size, and
    with ``verify_content`` (resume does this; rotation does not, it would read every checkpoint) also with
    its recorded CRC-32 (markers written before checksums were recorded are checked by size only).
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return "folder does not exist"
    marker = read_checkpoint_marker(checkpoint_dir)
    if marker is None:
        return f"no {COMPLETE_MARKER} (the save was interrupted or is still running)"
    for entry in marker.get("files", []):
        path = checkpoint_dir / entry["path"]
        if not path.is_file():
            return f"file listed in {COMPLETE_MARKER} is missing: {entry['path']}"
        if "size" in entry and path.stat().st_size != entry["size"]:
            return f"file size changed since the save: {entry['path']}"
    if verify_content:
        listed = [entry for entry in marker.get("files", []) if "crc32" in entry]
        actual = _checksums([checkpoint_dir / entry["path"] for entry in listed])
        for entry, checksum in zip(listed, actual, strict=True):
            if checksum != entry["crc32"]:
                return f"{CORRUPTED} (CRC-32 {checksum}, recorded {entry['crc32']}): {checkpoint_dir / entry['path']}"
    return None


def is_checkpoint_complete(checkpoint_dir: str | os.PathLike[str]) -> bool:
    """Whether ``checkpoint_dir`` holds a finished save (see :func:`checkpoint_problem`)."""
    return checkpoint_problem(checkpoint_dir) is None


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """All ``checkpoint-<step>`` folders in ``output_dir`` as ``(step, path)``, sorted by step.

    Sorting is by the step number, not by name or mtime (``checkpoint-1000`` is newer than
    ``checkpoint-999``).
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_complete_checkpoint(output_dir: str | os.PathLike[str], verify_content: bool = True) -> Path | None:
    """The complete checkpoint with the highest step in ``output_dir``; logs and skips incomplete ones."""
    for step, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path, verify_content=verify_content)
        if problem is None:
            return path
        if problem.startswith(CORRUPTED):
            # Not an interrupted save but damage after it: never fall back to an older state silently.
            raise CheckpointResumeError(
                f"checkpoint {path} (step {step}) is corrupted: {problem}. Restore the file, or resume from "
                "an older checkpoint by passing its path to --resume_from_checkpoint"
            )
        logger.warning("Skipping incomplete checkpoint %s (step %d): %s.", path, step, problem)
    return None


def resolve_resume_checkpoint(
    output_dir: str | os.PathLike[str],
    resume_arg: str | os.PathLike[str] | None,
    run_config: Mapping[str, Any] | None = None,
    verify_content: bool = True,
) -> str | None:
    """Turn ``--resume_from_checkpoint`` into the checkpoint folder to resume from (or ``None``).

    * ``None`` / ``""``: fresh start. Existing checkpoints in ``output_dir`` are *not* resumed
      implicitly; a warning says so (and how to resume).
    * ``"auto"``: the newest complete ``checkpoint-<step>`` in ``output_dir``; raises
      :class:`CheckpointResumeError` naming ``output_dir`` when there is none.
    * a path: must be a complete checkpoint, else :class:`CheckpointResumeError` says why.

    ``verify_content`` also checks every file's CRC-32 against the marker (a mismatch is a
    :class:`CheckpointResumeError` naming the file, even with ``auto``: damage is never skipped silently).
    With ``run_config`` given, differences from the config stored in the checkpoint's marker are
    logged as a warning (resuming after a config change is allowed but should be deliberate).
    """
    resume = "" if resume_arg is None else str(resume_arg).strip()
    if resume.lower() in ("", "none", "false", "no"):
        existing = list_checkpoints(output_dir)
        if existing:
            logger.warning(
                "%s already holds %d checkpoint folder(s) (newest: %s). They are NOT resumed implicitly; "
                "this run starts from scratch and may overwrite them. Pass --resume_from_checkpoint auto "
                "(or a checkpoint path) to resume.",
                output_dir,
                len(existing),
                existing[-1][1].name,
            )
        return None

    if resume.lower() in (RESUME_AUTO, "true", "yes", "latest"):
        checkpoint = find_latest_complete_checkpoint(output_dir, verify_content)
        if checkpoint is None:
            n_found = len(list_checkpoints(output_dir))
            detail = (
                f"{n_found} checkpoint folder(s) exist but none is complete (no {COMPLETE_MARKER})"
                if n_found
                else "it holds no checkpoint-<step> folders"
                if Path(output_dir).is_dir()
                else "the folder does not exist"
            )
            raise CheckpointResumeError(
                f"--resume_from_checkpoint {RESUME_AUTO}: no complete checkpoint in output_dir "
                f"'{output_dir}': {detail}. Start without --resume_from_checkpoint for a fresh run."
            )
    else:
        checkpoint = Path(resume)
        problem = checkpoint_problem(checkpoint, verify_content=verify_content)
        if problem is not None:
            raise CheckpointResumeError(
                f"--resume_from_checkpoint '{resume}' cannot be resumed from: {problem}. "
                f"Use '{RESUME_AUTO}' to pick the newest complete checkpoint in output_dir '{output_dir}'."
            )

    if run_config is not None:
        _warn_on_config_change(checkpoint, run_config)
    logger.info("Resuming from checkpoint %s.", checkpoint)
    return str(checkpoint)


def _warn_on_config_change(checkpoint: Path, run_config: Mapping[str, Any]) -> None:
    """Log which config keys differ between the checkpoint's stored config and ``run_config``."""
    marker = read_checkpoint_marker(checkpoint) or {}
    saved = marker.get("run_config")
    if not isinstance(saved, dict):
        return
    current = json.loads(json.dumps(dict(run_config), default=str))
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    # Bookkeeping keys that legitimately differ between the original and the resumed run.
    changed = [k for k in changed if k not in _VOLATILE_CONFIG_KEYS]
    if changed:
        logger.warning(
            "Resuming from %s with a changed configuration: %s.",
            checkpoint,
            ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed),
        )


_VOLATILE_CONFIG_KEYS = frozenset({"resume_from_checkpoint", "logging_dir", "run_name", "local_rank"})


class CheckpointCompletionCallback(TrainerCallback):
    """Mark each ``checkpoint-<step>`` complete once the Trainer has fully saved it.

    ``on_save`` fires on every rank after ``Trainer._save_checkpoint`` returned (model, DeepSpeed
    engine shards, optimizer, scheduler, RNG states, ``trainer_state.json``). Each rank has then
    finished *its own* writes, so all ranks meet at a barrier before the one writer (global rank 0,
    or each node's local rank 0 with ``save_on_each_node``) records the marker; a second barrier
    keeps other ranks from racing ahead (e.g. to a rotation) before the marker exists.
    """

    def __init__(self, run_config: Mapping[str, Any] | None = None, keep_last: int | None = None) -> None:
        """``run_config`` is stored in each marker so a later resume can report config changes.

        ``keep_last`` replaces the Trainer's ``save_total_limit``: the Trainer rotates *before*
        the new checkpoint is known to be complete, so a kill in that window could leave nothing
        resumable. Here older checkpoints are deleted only after the new one is marked complete.
        """
        self.run_config = dict(run_config) if run_config is not None else None
        self.keep_last = keep_last

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Before a save into an existing ``checkpoint-<step>`` (a re-run), drop its stale marker."""
        if control.should_save:
            self._invalidate_stale_marker(args, state)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Same as :meth:`on_step_end` for epoch-end saves."""
        if control.should_save:
            self._invalidate_stale_marker(args, state)

    def _invalidate_stale_marker(self, args: TrainingArguments, state: TrainerState) -> None:
        # DefaultFlowCallback (registered first) has already decided control.should_save.
        writer = state.is_local_process_zero if args.save_on_each_node else state.is_world_process_zero
        marker = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}" / COMPLETE_MARKER
        if writer and marker.exists():
            logger.info("Overwriting checkpoint %s: removing its old completion marker first.", marker.parent)
            marker.unlink()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Barrier, then let the designated process write the completion marker."""
        _barrier()
        writer = state.is_local_process_zero if args.save_on_each_node else state.is_world_process_zero
        if writer:
            checkpoint_dir = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
            if checkpoint_dir.is_dir():
                mark_checkpoint_complete(checkpoint_dir, state.global_step, self.run_config)
                if self.keep_last:
                    rotate_checkpoints(args.output_dir, self.keep_last)
            else:
                logger.warning("on_save: expected checkpoint folder %s does not exist.", checkpoint_dir)
        _barrier()


def rotate_checkpoints(output_dir: str | os.PathLike[str], keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than them.

    Incomplete checkpoints newer than the newest complete one are left alone (a save may be in
    flight). Returns the deleted folders.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    checkpoints = list_checkpoints(output_dir)
    complete = [path for _, path in checkpoints if is_checkpoint_complete(path)]
    if not complete:
        return []
    kept = set(complete[-keep_last:])
    newest_step = checkpoints[[path for _, path in checkpoints].index(complete[-1])][0]
    deleted = []
    for step, path in checkpoints:
        if path not in kept and step <= newest_step:
            shutil.rmtree(path, ignore_errors=False)
            deleted.append(path)
            logger.info("Deleted old checkpoint %s (keeping the last %d complete ones).", path, keep_last)
    return deleted


def _barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is initialised, else nothing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
