"""Export of the distilled student in diffusers format.

The output folder gets ``transformer/`` (a full student, ``save_pretrained``) or
``pytorch_lora_weights.safetensors`` (a LoRA student, ``pipe.load_lora_weights``), plus
``scheduler/scheduler_config.json``: the scheduler under which the family's stock pipeline
follows the student's rungs. With EMA on, the EMA weights are exported.

Example::

    export_student("out", student=nets.student, family=family, ema=dmd.ema,
                   scheduler_config=family.student_scheduler_config(t_list, "ode", base))
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..ema import ExponentialMovingAverage, ema_weights
from ..io import atomic_directory, write_json_atomic
from ..lora import AdapterRole, save_student_lora

__all__ = ["export_student", "write_json_atomic"]


def _unsharded_copy(transformer: nn.Module, prefix: str, gathered: dict[str, torch.Tensor]):
    """A plain (unsharded) copy of ``transformer`` holding the gathered weights."""
    from accelerate import init_empty_weights

    from .parallel import unsharded_class

    state = {k[len(prefix) :]: v for k, v in gathered.items() if k.startswith(prefix)}
    with init_empty_weights(include_buffers=False):
        copy = unsharded_class(transformer).from_config(transformer.config)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy


def _save_transformer(
    model: nn.Module, output_dir: Path, gathered: dict[str, torch.Tensor] | None = None
) -> Path:
    transformer = getattr(model, "transformer", model)
    if gathered is not None:
        prefix = "transformer." if transformer is not model else ""
        transformer = _unsharded_copy(transformer, prefix, gathered)
    final = output_dir / "transformer"
    with atomic_directory(final) as tmp:  # an existing transformer/ is swapped out whole
        transformer.save_pretrained(tmp)
    return final


def export_student(
    output_dir: str | os.PathLike,
    *,
    student: nn.Module,
    scheduler_config: dict[str, Any],
    ema: ExponentialMovingAverage | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> list[Path]:
    """Write the student (EMA weights when ``ema`` is given) and its scheduler config; returns
    the written paths. ``student`` is unwrapped (no DDP wrapper). For an FSDP2-sharded student
    pass ``state_dict``: its ``state_dict()`` gathered to full tensors
    (:func:`~fastgen_diffusers.training.parallel.full_state_dict`, EMA weights already in)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights = ema_weights(ema, student) if ema is not None else contextlib.nullcontext()
    with weights:
        if isinstance(student, AdapterRole):
            written = [Path(save_student_lora(student, output_dir, gathered=state_dict))]
        else:
            written = [_save_transformer(student, output_dir, state_dict)]
    config = {k: v for k, v in scheduler_config.items()}
    written.append(write_json_atomic(output_dir / "scheduler" / "scheduler_config.json", config))
    return written
