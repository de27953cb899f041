"""What a run prints on the main process: a summary before the first iteration and, at the
end, where the student was written and the lines that load it.

Example::

    print_run_summary(run, teacher, trainer, num_samples=len(data.samples))
    ...
    print_student_location(run, teacher.family, lora=False, repo_id=run.hub_repo_id)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from ..plugins.base import Family
    from .state import Run, Teacher, Trainer

__all__ = [
    "print_monitor_warning",
    "print_run_summary",
    "print_student_location",
    "run_summary",
    "student_location",
]


def _trainable(module: nn.Module) -> int:
    # DTensor.numel() is the global count, so FSDP2 shards count as the whole network.
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def run_summary(run: Run, teacher: Teacher, trainer: Trainer, num_samples: int) -> str:
    """The start-of-run summary: teacher, family, layout, trainable parameters per network,
    samples, effective batch, iterations, precision and output folder."""
    args, accelerator = run.args, run.accelerator
    ranks, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    effective = args.train_batch_size * ranks * accumulation
    roles = trainer.roles(True) + trainer.roles(False)
    lines = [
        "***** DMD2 distillation *****",
        f"  teacher: {args.pretrained_model_name_or_path} (family {teacher.family.name})",
        f"  recipe: {args.recipe} ({len(run.t_list) - 1}-step student)",
        f"  layout: {args.layout}"
        + (f" (rank {args.rank}, alpha {args.lora_alpha or args.rank:g})" if args.use_lora else ""),
    ]
    lines += [
        f"  trainable parameters, {role}: {_trainable(trainer.module(role)):,}" for role in roles
    ]
    lines += [
        f"  samples: {num_samples:,}",
        f"  effective batch: {effective} = {args.train_batch_size} per device x {ranks} "
        f"process(es) x {accumulation} accumulation step(s)",
        f"  iterations: {args.max_train_steps:,} (a student update every "
        f"{run.cfg.student_update_freq})",
        f"  precision: {accelerator.mixed_precision} (frozen weights in {run.weight_dtype})",
        f"  output: {run.output_dir.resolve()}",
    ]
    if run.hub_repo_id:
        lines.append(f"  Hub repo: {run.hub_repo_id}")
    return "\n".join(lines)


def print_run_summary(run: Run, teacher: Teacher, trainer: Trainer, num_samples: int) -> None:
    """Print :func:`run_summary` on the main process."""
    if run.is_main:
        print(run_summary(run, teacher, trainer, num_samples), flush=True)


def student_location(
    output_dir: str | Path,
    family: Family,
    base_model: str,
    *,
    lora: bool,
    repo_id: str | None = None,
) -> str:
    """One line: where the student was written (and pushed) and the diffusers call that loads
    it into the family's stock pipeline (from the Hub repo when pushed, else the folder)."""
    output = Path(output_dir).resolve()
    if Path(base_model).exists():
        base_model = str(Path(base_model).resolve())
    location = repo_id or str(output)
    pipeline = family.pipeline_class.__name__
    scheduler = (
        f"FlowMatchEulerDiscreteScheduler.from_pretrained({location!r}, subfolder='scheduler')"
    )
    two_experts = len(family.transformer_components) > 1  # Wan 2.2 A14B
    if lora:
        written = output / "pytorch_lora_weights.safetensors"
        load = (
            f"pipe = {pipeline}.from_pretrained({base_model!r}, scheduler={scheduler}); "
            f"pipe.load_lora_weights({location!r})"
        )
        if two_experts:
            load += (
                f"; pipe.load_lora_weights({location!r}, "
                "weight_name='pytorch_lora_weights_transformer_2.safetensors', "
                "load_into_transformer_2=True)"
            )
    elif two_experts:
        written = output
        experts = ", ".join(
            f"{name}={family.transformer_class.__name__}.from_pretrained({location!r}, "
            f"subfolder={name!r})"
            for name in family.transformer_components
        )
        load = (
            f"pipe = {pipeline}.from_pretrained({base_model!r}, {experts}, scheduler={scheduler})"
        )
    else:
        written = output / "transformer"
        transformer = (
            f"{family.transformer_class.__name__}.from_pretrained({location!r}, "
            "subfolder='transformer')"
        )
        load = (
            f"pipe = {pipeline}.from_pretrained({base_model!r}, transformer={transformer}, "
            f"scheduler={scheduler})"
        )
    pushed = f" and pushed to {repo_id}" if repo_id else ""
    return f"Student written to {written}{pushed}. Load it with: {load}"


def print_student_location(
    run: Run, family: Family, *, lora: bool, repo_id: str | None = None
) -> None:
    """Print :func:`student_location` on the main process: the run's last line."""
    if run.is_main:
        line = student_location(
            run.output_dir,
            family,
            run.args.pretrained_model_name_or_path,
            lora=lora,
            repo_id=repo_id,
        )
        print(line, flush=True)


def print_monitor_warning(message: str, bar: Any = None) -> None:
    """A monitor's warning on its own line, above the progress bar when there is one."""
    write = getattr(bar, "write", None)
    if write is not None:
        write(message, file=sys.stdout)
    else:
        print(message, flush=True)
