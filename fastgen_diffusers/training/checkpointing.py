"""Atomic, rotated training checkpoints on top of ``accelerator.save_state``.

A checkpoint is written to ``<output_dir>/.checkpoint-<step>.tmp``, completed with a
``COMPLETE`` marker and only then renamed to ``checkpoint-<step>``: a run killed mid-save leaves
a ``.tmp`` folder that ``latest`` never picks (and the next save clears).

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

from accelerate import Accelerator

__all__ = [
    "COMPLETE_MARKER",
    "complete_checkpoints",
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


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    total_limit: int | None = None,
) -> Path:
    """Save the full training state (every rank takes part) as ``checkpoint-<step>``."""
    root = Path(output_dir)
    tmp = root / f".checkpoint-{step}.tmp"
    final = root / f"checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for _, old in complete_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old)
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
