"""Atomic, rotated training checkpoints on top of ``accelerator.save_state``.

A checkpoint is written to ``<output_dir>/.checkpoint-<step>.tmp``, completed with a
``COMPLETE`` marker and only then renamed to ``checkpoint-<step>``: a run killed mid-save leaves
a ``.tmp`` folder that ``latest`` never picks (and the next save clears). A checkpoint being
replaced or rotated out is first renamed out of the ``checkpoint-<step>`` names, so ``latest``
never sees one half-deleted.

Example::

    save_checkpoint(accelerator, "out", step=500, total_limit=3)
    path = resolve_resume("latest", "out")  # Path("out/checkpoint-500") or None
    accelerator.load_state(path)
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..io import commit_directory, remove_directory

__all__ = [
    "COMPLETE_MARKER",
    "complete_checkpoints",
    "load_per_rank_state",
    "resolve_resume",
    "save_checkpoint",
]

COMPLETE_MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _is_sharded(obj: Any) -> bool:
    return bool(getattr(obj, "is_sharded", False))


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    total_limit: int | None = None,
    per_rank_state: dict[str, Any] | None = None,
) -> Path:
    """Save the full training state (every rank takes part) as ``checkpoint-<step>``.

    ``per_rank_state`` holds objects (``state_dict`` / ``load_state_dict``) that accelerate
    would pickle from the main process only: an object whose ``is_sharded`` is true (an FSDP2
    EMA of local shards) is written by every rank as ``<name>_rank<r>.pt``, any other by the
    main process as ``<name>.pt``. ``None`` values are skipped.
    """
    root = Path(output_dir)
    tmp = root / f".checkpoint-{step}.tmp"
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    for name, obj in (per_rank_state or {}).items():
        if obj is None:
            continue
        if _is_sharded(obj):
            torch.save(obj.state_dict(), tmp / f"{name}_rank{accelerator.process_index}.pt")
        elif accelerator.is_main_process:
            torch.save(obj.state_dict(), tmp / f"{name}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        commit_directory(tmp, final)  # a same-step checkpoint is swapped out whole
        if total_limit is not None:
            for _, old in complete_checkpoints(root)[:-total_limit]:
                remove_directory(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``None``, ``"latest"`` (newest complete one in
    ``output_dir``, or ``None`` when there is none) or an explicit checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume!r}: no such folder")
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resume!r} is incomplete (no {COMPLETE_MARKER} marker: the "
            "save was interrupted); pick another checkpoint or 'latest'"
        )
    return path


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint folder was saved at."""
    return int((Path(path) / COMPLETE_MARKER).read_text().strip())


def load_per_rank_state(
    accelerator: Accelerator, checkpoint: str | os.PathLike, objects: dict[str, Any]
) -> None:
    """Restore what :func:`save_checkpoint` wrote for ``per_rank_state`` (each rank its own
    shard file)."""
    for name, obj in objects.items():
        if obj is None:
            continue
        rank = accelerator.process_index
        path = Path(checkpoint) / (f"{name}_rank{rank}.pt" if _is_sharded(obj) else f"{name}.pt")
        if not path.is_file():
            saved = sorted(p.name for p in Path(checkpoint).glob(f"{name}*.pt"))
            raise FileNotFoundError(
                f"{checkpoint} has no {path.name} for rank {rank} of "
                f"{accelerator.num_processes} (found {saved or 'none'}): a sharded state resumes "
                "on as many ranks as saved it"
            )
        obj.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
