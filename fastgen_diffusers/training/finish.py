"""The last phase of a run: export the student, write its model card, push to the Hub.

Under FSDP2 every rank takes part in gathering the (EMA) student; the main process writes
``transformer/`` (or ``pytorch_lora_weights.safetensors``), ``scheduler/`` and ``README.md``.

Example::

    finish(run, teacher, data, trainer, progress)   # after the last iteration
"""

from __future__ import annotations

from pathlib import Path

from ..lora import MERGED_LORA_WEIGHT_NAME, AdapterRole
from .console import print_student_location
from .export import write_student
from .state import Progress, Run, Teacher, Trainer, TrainingData
from .validation import final_image_paths, validate

__all__ = ["finish", "training_settings"]


def finish(
    run: Run, teacher: Teacher, data: TrainingData, trainer: Trainer, progress: Progress
) -> None:
    """Export, model card, final validation grid (if not drawn yet) and Hub upload (to the
    repo ``setup_run`` created); the last line printed says where the student is and how to
    load it."""
    accelerator, args = run.accelerator, run.args
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(trainer.student)
    if progress.step % args.validation_steps:  # the final weights' grid, if not drawn yet
        validate(run, teacher, data, trainer, progress.step)
    write_student(run, teacher, trainer, run.output_dir)  # collective under FSDP2
    if run.is_main:
        _write_card(run, teacher, lora=isinstance(student, AdapterRole))
    # Every rank past its last collective before any tears the process group down (gloo
    # aborts a rank whose peer closes the connection under it).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and run.is_main:
        from .hub import push_to_hub

        assert run.hub_repo_id is not None  # created by setup_run before the teacher loaded
        push_to_hub(run.output_dir, run.hub_repo_id, token=args.hub_token, private=args.hub_private)
    lora = isinstance(student, AdapterRole)
    print_student_location(
        run,
        teacher.family,
        lora=lora,
        repo_id=run.hub_repo_id,
        # A student trained on base + the user's LoRA is complete only with it: the merged file.
        lora_weight_name=MERGED_LORA_WEIGHT_NAME if lora and args.teacher_lora else None,
    )


def _write_card(run: Run, teacher: Teacher, *, lora: bool) -> None:
    from .model_card import write_model_card

    args, cfg, family = run.args, run.cfg, teacher.family
    prompts = list(args.validation_prompts or [])
    # One image per prompt, drawn by the final weights, each with its own prompt.
    gallery = [
        (str(path.relative_to(run.output_dir)), prompts[int(path.stem.split("-")[1])])
        for path in final_image_paths(run.output_dir, len(prompts))
    ]
    height, width = args.size
    write_model_card(
        run.output_dir,
        base_model=args.pretrained_model_name_or_path,
        family=family,
        recipe_name=args.recipe,
        recipe=cfg,
        t_list=run.t_list,
        sample_type=cfg.student_sample_type,
        lora=lora,
        repo_id=run.hub_repo_id,
        pipeline_kwargs=family.stock_pipeline_kwargs(run.t_list),
        validation_images=gallery,
        extra=training_settings(run),
        height=height,
        width=width,
        num_frames=args.num_frames if family.is_video else None,
        teacher_lora=(args.teacher_lora, args.teacher_lora_scale) if args.teacher_lora else None,
    )


def _dataset_name(name: str) -> str:
    # A local dataset is named by its file or folder name: the card leaves the machine.
    path = Path(name)
    return f"`{path.resolve().name}` (local)" if path.exists() else f"`{name}`"


def training_settings(run: Run) -> dict[str, str | int | float]:
    """The rows of the model card's "Training settings" table beyond the recipe's."""
    args = run.args
    ranks = run.accelerator.num_processes
    effective = args.train_batch_size * ranks * args.gradient_accumulation_steps
    rows: dict[str, str | int | float] = {
        "iterations": args.max_train_steps,
        "student learning rate": args.learning_rate,
        "fake-score learning rate": args.fake_score_learning_rate or args.learning_rate,
    }
    if args.guidance_scale_2 is not None:  # two experts: the recipe's scale is the first's
        rows["teacher CFG scale, low-noise expert"] = args.guidance_scale_2
    if run.cfg.gan_loss_weight_gen > 0:
        rows["discriminator learning rate"] = args.discriminator_learning_rate or args.learning_rate
    rows["learning-rate schedule"] = f"{args.lr_scheduler}, {args.lr_warmup_steps} warm-up"
    rows["effective batch"] = (
        f"{effective} ({args.train_batch_size} per device x {ranks} process(es) x "
        f"{args.gradient_accumulation_steps} accumulation)"
    )
    rows["mixed precision"] = run.accelerator.mixed_precision
    rows["layout"] = f"`{args.layout}`"
    if args.use_lora:
        rows["LoRA rank / alpha"] = f"{args.rank} / {args.lora_alpha or args.rank:g}"
    height, width = args.size
    rows["resolution"] = f"{width}x{height}" + (
        f", {args.num_frames} frames" if args.num_frames else ""
    )
    data = args.dataset_name or args.train_data_dir
    if data:
        rows["dataset"] = _dataset_name(data)
    return rows
