"""The last phase of a run: export the student, write its model card, push to the Hub.

Under FSDP2 every rank takes part in gathering the (EMA) student; the main process writes
``transformer/`` (or ``pytorch_lora_weights.safetensors``), ``scheduler/`` and ``README.md``.

Example::

    finish(run, teacher, data, trainer, progress)   # after the last iteration
"""

from __future__ import annotations

import contextlib

from ..ema import ema_weights
from ..lora import AdapterRole
from .export import export_student
from .parallel import full_state_dict
from .state import Progress, Run, Teacher, Trainer, TrainingData
from .validation import validate

__all__ = ["finish"]


def finish(
    run: Run, teacher: Teacher, data: TrainingData, trainer: Trainer, progress: Progress
) -> None:
    """Export, model card, final validation grid (if not drawn yet) and Hub upload."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(trainer.student)
    ema = trainer.dmd.ema
    gathered = None
    if trainer.prepared.fsdp2:  # every rank gathers the (EMA) student; the main process writes
        with ema_weights(ema, student) if ema is not None else contextlib.nullcontext():
            gathered = full_state_dict(student, main_process=run.is_main)
    if progress.step % args.validation_steps:  # the final weights' grid, if not drawn yet
        validate(run, teacher, data, trainer, progress.step)
    if run.is_main:
        _export(run, teacher, student, ema=None if gathered is not None else ema, gathered=gathered)
    accelerator.end_training()
    if args.push_to_hub and run.is_main:
        from .hub import push_to_hub

        repo_id = args.hub_model_id or run.output_dir.resolve().name
        push_to_hub(run.output_dir, repo_id, token=args.hub_token, private=args.hub_private)


def _export(run: Run, teacher: Teacher, student, *, ema, gathered) -> None:
    from .model_card import write_model_card

    args, cfg, family = run.args, run.cfg, teacher.family
    scheduler_config = family.student_scheduler_config(
        run.t_list, cfg.student_sample_type, dict(teacher.pipe.scheduler.config)
    )
    export_student(
        run.output_dir,
        student=student,
        scheduler_config=scheduler_config,
        ema=ema,
        state_dict=gathered,
    )
    prompt_text = "; ".join(args.validation_prompts or [])
    validation_dir = run.output_dir / "validation"
    write_model_card(
        run.output_dir,
        base_model=args.pretrained_model_name_or_path,
        family=family,
        recipe_name=args.recipe,
        recipe=cfg,
        t_list=run.t_list,
        sample_type=cfg.student_sample_type,
        lora=isinstance(student, AdapterRole),
        repo_id=args.hub_model_id,
        pipeline_kwargs=family.stock_pipeline_kwargs(run.t_list),
        validation_images=[
            (str(p.relative_to(run.output_dir)), prompt_text)
            for p in sorted(validation_dir.glob("student-*.png"))
        ],
    )
