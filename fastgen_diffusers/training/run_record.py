"""``run.json``: what a training run is, written to the output folder and every checkpoint.

It holds the resolved recipe, the layout, the model family, the arguments without secrets
(:meth:`~.args.TrainingArguments.public_dict`), the global batch, the world size and the
library versions. Resuming compares the checkpoint's record with the current run and refuses a
change of recipe, layout, family, model or global batch (``--allow_resume_changes`` prints the
differences and continues).

Example::

    record = run_record(run, family="sd3")
    write_run_record(run.output_dir, record)
    changes = compare_runs(json.loads((ckpt / "run.json").read_text()), record)
    # ["recipe.guidance_scale: 2.0 -> 5.0"]
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from ..io import write_json_atomic
from .errors import UserError
from .state import Run

__all__ = ["RUN_RECORD", "ResumeMismatchError", "compare_runs", "run_record", "write_run_record"]

RUN_RECORD = "run.json"
_PACKAGES = ("torch", "diffusers", "accelerate", "peft", "fastgen_diffusers")
# What a resumed run must share with the checkpoint's run (the arguments not listed, e.g. the
# number of steps or the validation prompts, may change).
_COMPARED = ("recipe", "layout", "family", "model", "global_batch")
_SAME_RESULT = ("recipe.ema.mode:", "recipe.ema.fsdp2:")


class ResumeMismatchError(UserError):
    """The checkpoint was written by a run with another recipe, layout, family, model or global
    batch."""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        if package == "fastgen_diffusers":
            import fastgen_diffusers

            return getattr(fastgen_diffusers, "__version__", None)
        return None


def _plain(value: Any) -> Any:
    """``value`` as JSON data (paths and other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def run_record(run: Run, family: str | None) -> dict[str, Any]:
    """The record of ``run`` (no secret in it: the arguments come from ``public_dict``)."""
    args = run.args
    return {
        "recipe": run.cfg.model_dump(mode="json"),
        "layout": args.layout,
        "family": family,
        "model": args.pretrained_model_name_or_path,
        "global_batch": run.global_batch,
        "train_batch_size": args.train_batch_size,
        "world_size": run.accelerator.num_processes,
        "arguments": _plain(args.public_dict()),
        "versions": {name: _version(name) for name in _PACKAGES},
    }


def write_run_record(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` as ``<folder>/run.json`` atomically."""
    return write_json_atomic(Path(folder) / RUN_RECORD, record)


def _diff(before: Any, after: Any, prefix: str) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in before:
                out.append(f"{name}: (absent) -> {after[key]!r}")
            elif key not in after:
                out.append(f"{name}: {before[key]!r} -> (absent)")
            else:
                out.extend(_diff(before[key], after[key], name))
        return out
    return [] if before == after else [f"{prefix}: {before!r} -> {after!r}"]


def compare_runs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The differences that matter for resuming, one ``name: before -> after`` line each."""
    out = []
    for key in _COMPARED:
        out.extend(_diff(saved.get(key), current.get(key), key))
    # How the EMA is kept under FSDP2 (gathered or per shard) gives the same average.
    return [line for line in out if not line.startswith(_SAME_RESULT)]


def check_resume(
    saved: dict[str, Any], current: dict[str, Any], *, checkpoint: Path, allow: bool
) -> list[str]:
    """Refuse (``ResumeMismatchError``) a resume whose run differs from the checkpoint's,
    unless ``allow``; returns the differences."""
    changes = compare_runs(saved, current)
    if not changes:
        return changes
    lines = "\n  ".join(changes)
    hint = ""
    if any(c.startswith("global_batch") for c in changes):
        world = current["world_size"]
        hint = (
            f"\n--train_batch_size is per device: the checkpoint's global batch of "
            f"{saved['global_batch']} needs --train_batch_size {saved['global_batch'] / world:g} "
            f"on {world} process(es)"
        )
    if allow:
        print(f"Resuming from {checkpoint} with changes (--allow_resume_changes):\n  {lines}")
        return changes
    raise ResumeMismatchError(
        f"{checkpoint} was written by a different run:\n  {lines}{hint}\n"
        "Resume with the same settings, or pass --allow_resume_changes to continue anyway."
    )
