"""Export of the distilled student in diffusers format, for the final output and every checkpoint.

A folder gets ``transformer/`` (a full student, ``save_pretrained``) or
``pytorch_lora_weights.safetensors`` (a LoRA student, ``pipe.load_lora_weights``), plus
``scheduler/scheduler_config.json`` (written by diffusers' ``SchedulerMixin.save_pretrained``):
the scheduler under which the family's stock pipeline follows the student's rungs. With EMA on,
the EMA weights are exported. Weights are saved in ``--save_dtype`` (default: the teacher's
dtype; fp32 with ``--upcast_before_saving``).

Example::

    export_student("out", student=nets.student, family=family, ema=dmd.ema,
                   scheduler_config=family.student_scheduler_config(t_list, "ode", base))
    write_student(run, teacher, trainer, run.output_dir)   # collective under FSDP2
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..ema import ExponentialMovingAverage, ema_weights
from ..io import atomic_directory, write_json_atomic
from ..lora import (
    MERGED_LORA_WEIGHT_NAME,
    AdapterRole,
    UserLora,
    lora_weight_names,
    save_merged_lora,
    save_student_lora,
)

if TYPE_CHECKING:
    from .state import Run, Teacher, Trainer

__all__ = [
    "SAVE_DTYPES",
    "export_student",
    "other_run_export",
    "remove_export",
    "save_dtype",
    "write_scheduler",
    "write_student",
    "write_json_atomic",
]

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast(
    state: dict[str, torch.Tensor], dtype: torch.dtype | None, device: str | None = None
) -> dict[str, torch.Tensor]:
    # Floating tensors only; a tensor already in ``dtype`` (and on ``device``) is not copied.
    if dtype is None:
        return state
    return {k: v.to(device, dtype) if v.is_floating_point() else v for k, v in state.items()}


def _unsharded_copy(transformer: nn.Module, prefix: str, gathered: dict[str, torch.Tensor]):
    """A plain (unsharded) copy of ``transformer`` holding the given weights (no copy made of
    them: they are assigned)."""
    from accelerate import init_empty_weights

    from .parallel import unsharded_class

    state = {k[len(prefix) :]: v for k, v in gathered.items() if k.startswith(prefix)}
    with init_empty_weights(include_buffers=False):
        copy = unsharded_class(transformer).from_config(transformer.config)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy


def _save_transformer(
    model: nn.Module,
    output_dir: Path,
    gathered: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    *,
    component: str = "transformer",
    prefix: str = "",
) -> Path:
    """``<output_dir>/<component>/`` from ``model`` (a wrapper or a diffusers transformer);
    ``prefix``: where ``model``'s weights sit in ``gathered``."""
    transformer = getattr(model, "transformer", model)
    if gathered is not None:
        prefix += "transformer." if transformer is not model else ""
        transformer = _unsharded_copy(transformer, prefix, _cast(gathered, dtype))
    elif dtype is not None and any(p.dtype != dtype for p in transformer.parameters()):
        # The training model keeps its fp32 weights: a cast copy, on the host (where
        # save_pretrained brings every tensor anyway), is saved.
        state = _cast(transformer.state_dict(), dtype, "cpu")
        transformer = _unsharded_copy(transformer, "", state)
    final = output_dir / component
    with atomic_directory(final) as tmp:  # an existing transformer/ is swapped out whole
        transformer.save_pretrained(tmp)
    return final


def write_scheduler(output_dir: str | os.PathLike, scheduler_config: dict[str, Any]) -> Path:
    """``<output_dir>/scheduler/`` written by the config's scheduler class's own
    ``save_pretrained`` (``_class_name`` and ``_diffusers_version`` filled in by diffusers), in
    one atomic folder swap; returns the path of ``scheduler_config.json``."""
    import diffusers

    name = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None:
        raise ValueError(f"scheduler config names {name!r}, which diffusers does not have")
    scheduler = scheduler_class.from_config(dict(scheduler_config))
    final = Path(output_dir) / "scheduler"
    with atomic_directory(final) as tmp:
        scheduler.save_pretrained(tmp)
    return final / "scheduler_config.json"


def export_student(
    output_dir: str | os.PathLike,
    *,
    student: nn.Module,
    scheduler_config: dict[str, Any],
    ema: ExponentialMovingAverage | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    user_lora: UserLora | None = None,
) -> list[Path]:
    """Write the student (EMA weights when ``ema`` is given) and its scheduler config; returns
    the written paths. ``student`` is unwrapped (no DDP wrapper). For an FSDP2-sharded student
    pass ``state_dict``: its ``state_dict()`` gathered to full tensors
    (:func:`~fastgen_diffusers.training.parallel.full_state_dict`, EMA weights already in).
    ``dtype``: the saved weights' dtype (default: as trained). ``user_lora``: the LoRA fused
    into the teacher (``--teacher_lora``); a LoRA student is then also written merged with it
    (:data:`~fastgen_diffusers.lora.MERGED_LORA_WEIGHT_NAME`), next to the student adapter alone
    (which stacks on the user's LoRA)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    weights = ema_weights(ema, student) if ema is not None else contextlib.nullcontext()
    with weights:
        if isinstance(student, AdapterRole):
            save_student_lora(student, output_dir, gathered=state_dict, dtype=dtype)
            written = [output_dir / name for name in lora_weight_names(student)]
            if user_lora is not None:
                merged = save_merged_lora(
                    student, user_lora, output_dir, gathered=state_dict, dtype=dtype
                )
                written.append(Path(merged))
        elif callable(getattr(student, "experts", None)):
            # Wan 2.2 A14B: the high-noise expert is the pipeline's transformer, the low-noise
            # one its transformer_2.
            names = [n for n, _ in student.named_children()]
            written = [
                _save_transformer(
                    expert,
                    output_dir,
                    state_dict,
                    dtype,
                    component="transformer" if i == 0 else f"transformer_{i + 1}",
                    prefix=f"{next(n for n in names if getattr(student, n) is expert)}.",
                )
                for i, expert in enumerate(student.experts())
            ]
        else:
            written = [_save_transformer(student, output_dir, state_dict, dtype)]
    written.append(write_scheduler(output_dir, scheduler_config))
    return written


def save_dtype(run: Run) -> torch.dtype:
    """The exported weights' dtype: ``--save_dtype``, else fp32 with ``--upcast_before_saving``,
    else the teacher's (``--mixed_precision``) dtype."""
    args = run.args
    if args.save_dtype is not None:
        return SAVE_DTYPES[args.save_dtype]
    return torch.float32 if args.upcast_before_saving else run.weight_dtype


def write_student(run: Run, teacher: Teacher, trainer: Trainer, folder: Path) -> list[Path]:
    """Export the run's student (its EMA weights when the recipe has an EMA) into ``folder``:
    what the final output and every checkpoint hold. Collective under FSDP2 (every rank gathers,
    the main process writes); returns the written paths (empty on other ranks)."""
    from .parallel import full_state_dict

    student = run.accelerator.unwrap_model(trainer.student)
    ema = trainer.dmd.ema
    gathered = None
    if trainer.prepared.fsdp2:  # every rank gathers the (EMA) student; the main process writes
        trainer.prepared.reshard()  # the EMA swaps shards in
        with ema_weights(ema, student) if ema is not None else contextlib.nullcontext():
            gathered = full_state_dict(student, main_process=run.is_main)
    if not run.is_main:
        return []
    scheduler_config = teacher.family.student_scheduler_config(
        run.t_list, run.cfg.student_sample_type, dict(teacher.pipe.scheduler.config)
    )
    return export_student(
        folder,
        student=student,
        scheduler_config=scheduler_config,
        ema=None if gathered is not None else ema,
        state_dict=gathered,
        dtype=save_dtype(run),
        user_lora=teacher.user_lora,
    )


# -- one output folder, one run -------------------------------------------------------------------

# What an earlier run's export leaves next to its weights (checkpoints, logs and the cache stay).
_EXPORT_EXTRAS = ("scheduler", "README.md", "validation", "run.json", MERGED_LORA_WEIGHT_NAME)


def _describe(folder: Path, saved: dict[str, Any] | None) -> str:
    kinds = []
    if (folder / "transformer").is_dir():
        kinds.append("a full student (transformer/)")
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        kinds.append("a LoRA student (pytorch_lora_weights.safetensors)")
    what = " and ".join(kinds)
    if saved:
        what += f" of {saved.get('model')!r}, layout {saved.get('layout')!r} (run.json)"
    return what


def other_run_export(args: Any) -> list[Path]:
    """Refuse an ``--output_dir`` holding another run's export: a full student where this run
    trains a LoRA (or the other way round), or one whose ``run.json`` names another base model
    or layout, so a push never uploads both. With ``--overwrite_output_dir`` the paths of that
    export (weights, scheduler, README.md, validation images, run.json; never checkpoints) are
    returned for :func:`remove_export`. Same run (a resume): nothing."""
    import json

    from .errors import UserError

    folder = Path(args.output_dir)
    has_full = (folder / "transformer").is_dir()
    has_lora = (folder / "pytorch_lora_weights.safetensors").is_file()
    if not (has_full or has_lora):
        return []
    try:
        saved = json.loads((folder / "run.json").read_text())
    except (OSError, ValueError):
        saved = None
    other = has_lora if args.layout == "full" else has_full
    if saved is not None:
        model = args.pretrained_model_name_or_path
        other = other or saved.get("model") != model or saved.get("layout") != args.layout
    if not other:
        return []
    found = _describe(folder, saved)
    if not args.overwrite_output_dir:
        this = "a full student" if args.layout == "full" else f"a {args.layout} LoRA"
        raise UserError(
            f"--output_dir {str(folder)!r} holds another run's export: {found}; this run trains "
            f"{this} of {args.pretrained_model_name_or_path!r}, and both would be pushed",
            fix="pass another --output_dir, or --overwrite_output_dir to remove that export "
            "(weights, scheduler/, README.md, validation/; checkpoints are kept)",
        )
    names = (
        "transformer",
        "transformer_2",
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_transformer_2.safetensors",
        *_EXPORT_EXTRAS,
    )
    return [folder / name for name in names if (folder / name).exists()]


def remove_export(paths: list[Path]) -> None:
    """Delete what :func:`other_run_export` found (main process only)."""
    from ..io import remove_directory

    for path in paths:
        remove_directory(path)  # a file is unlinked; a folder renamed away first
