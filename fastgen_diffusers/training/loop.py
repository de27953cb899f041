"""The DMD2 training run behind ``train_dmd2.py``: :func:`train` is its outline.

Set-up phases live in :mod:`.setup`, validation in :mod:`.validation`, the last phase in
:mod:`.finish`; this module holds the outline and one iteration of the alternation (one student
update every ``student_update_freq`` iterations, fake-score / discriminator updates in between).

Example::

    from fastgen_diffusers.training import parse_args, train

    train(parse_args(["--pretrained_model_name_or_path", "tiny-sd3", "--recipe", "r.yaml",
                      "--dataset_name", "prompts.jsonl", "--max_train_steps", "10"]))
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import DMDConfig
from ..loader import load_dmd_config
from ..monitors import CollapseMonitor, prompt_fingerprints
from ..plan import preflight as memory_preflight
from .args import TrainingArguments
from .checkpointing import save_checkpoint
from .console import print_monitor_warning, print_run_summary
from .export import write_student
from .finish import finish
from .run_record import RUN_RECORD
from .setup import (
    build_networks,
    cache_data,
    load_teacher,
    make_trainer,
    resume,
    setup_run,
    to_device,
)
from .signals import StopRequest
from .state import Progress, Run, Teacher, Trainer, TrainingData
from .validation import validate

__all__ = ["load_recipe", "train", "train_step"]


def load_recipe(recipe: str, overrides: dict[str, Any]) -> DMDConfig:
    """The recipe (built-in name or YAML path) with ``--recipe_overrides`` merged in."""
    return load_dmd_config(recipe, overrides=overrides)


def train(args: TrainingArguments | argparse.Namespace) -> Path:
    """Run the whole distillation; returns the output folder."""
    if isinstance(args, argparse.Namespace):
        args = TrainingArguments(**vars(args))
    if memory_preflight(args):  # --quantize_base / --optimizer checked; --dry_run: plan, stop
        return Path(args.output_dir)
    run = setup_run(args)  # accelerate, seed, recipe, output folder
    teacher = load_teacher(run)  # the diffusers pipeline and its family
    data = cache_data(run, teacher)  # embeddings and latents, encoders freed
    trainer = make_trainer(run, build_networks(run, teacher))  # layout, DDP/FSDP2, optimizers
    progress = resume(run, trainer, len(data.samples), family=teacher.family.name)
    start_trackers(run)
    print_run_summary(run, teacher, trainer, len(data.samples))
    if progress.step == 0:
        validate(run, teacher, data, trainer, 0, teacher_grid=True)
    bar = tqdm(
        range(progress.step, args.max_train_steps),
        initial=progress.step,
        total=args.max_train_steps,
        disable=not run.is_main,
        desc="DMD2",
    )
    with StopRequest() as stop:
        for _ in bar:
            logs = train_step(run, teacher, data, trainer, progress)
            log_step(run, logs, progress.step, bar, trainer.monitor)
            stopping = stop.agreed(run.accelerator)
            maybe_checkpoint(run, teacher, trainer, progress, force=stopping)
            if stopping:
                return stop_early(run, progress, bar, stop.signal_name)
            if progress.step % args.validation_steps == 0:
                validate(run, teacher, data, trainer, progress.step)
    finish(run, teacher, data, trainer, progress)
    return run.output_dir


def stop_early(run: Run, progress: Progress, bar: Any, signal_name: str | None) -> Path:
    """After SIGTERM / SIGINT: the checkpoint is saved; say how to resume and end the run
    (no export: the run is not finished)."""
    bar.close()
    if run.is_main:
        print(
            f"{signal_name or 'stop signal'} received: saved checkpoint-{progress.step}; "
            "resume with --resume_from_checkpoint latest",
            flush=True,
        )
    run.accelerator.wait_for_everyone()  # no rank tears the process group down under another
    run.accelerator.end_training()
    return run.output_dir


def start_trackers(run: Run) -> None:
    """The trackers named by ``--report_to`` (project ``--tracker_project_name``), with the
    run's arguments without secrets as their config (:mod:`.trackers`)."""
    from .trackers import start_trackers as _start

    _start(run)


def train_step(
    run: Run, teacher: Teacher, data: TrainingData, trainer: Trainer, progress: Progress
) -> dict[str, float]:
    """One iteration: the losses of this turn's networks over ``gradient_accumulation_steps``
    micro-batches, one optimizer step each, the EMA after a student update. Returns the
    iteration's losses (averaged over ranks) and the student learning rate."""
    args, accelerator = run.args, run.accelerator
    step = progress.step
    student_turn = step % run.cfg.student_update_freq == 0
    roles = trainer.roles(student_turn)
    monitoring = student_turn and monitor_due(run, step)
    trainer.dmd.record_student_step = monitoring
    logs: dict[str, float] = {}
    for micro in range(args.gradient_accumulation_steps):
        batch = _next_batch(run, teacher, data, progress)
        last = micro == args.gradient_accumulation_steps - 1
        with _no_sync_unless(last, run, trainer, roles), accelerator.autocast():
            losses = _losses(run, teacher, data, trainer, batch, student_turn)
        for name, parts in losses.items():
            accelerator.backward(parts["total"] / args.gradient_accumulation_steps)
            for key, value in parts.items():
                tag = f"{name}/{key}"
                logs[tag] = logs.get(tag, 0.0) + value.item() / args.gradient_accumulation_steps
    grad_norm = None
    for role in roles:
        norm = _optimizer_step(run, trainer, role, want_norm=monitoring)
        grad_norm = norm if role == "student" else grad_norm
    if monitoring:
        logs.update(_monitor_stats(run, trainer, batch, grad_norm))
    trainer.prepared.reshard()
    if student_turn:
        trainer.dmd.update_ema(iteration=step)
        trainer.dmd.apply_ida()  # no-op unless the recipe sets ida_ratio
    progress.counter.step = step + 1
    logs = _mean_over_ranks(run, logs)
    logs["lr/student"] = float(trainer.prepared.schedulers["student"].get_last_lr()[0])
    return logs


def _next_batch(
    run: Run, teacher: Teacher, data: TrainingData, progress: Progress
) -> dict[str, Any]:
    """This rank's rows of the next global batch, with fresh latent noise (drawn for the
    global batch, so N ranks see what one process would)."""
    indices = progress.data_order.take(run.global_batch)[run.rows]
    batch = data.samples.collate([data.samples[i] for i in indices])
    batch["cond"] = to_device(batch["cond"], run.device, run.weight_dtype)
    latents = batch.get("latents")
    batch["latents"] = latents.to(run.device, run.weight_dtype) if latents is not None else None
    shape = (run.global_batch, *teacher.latent_shape)
    batch["noise"] = torch.randn(shape, device=run.device, dtype=run.weight_dtype)[run.rows]
    return batch


def _no_sync_unless(
    last: bool, run: Run, trainer: Trainer, roles: list[str]
) -> contextlib.AbstractContextManager:
    """Gradient synchronisation only on the last micro-batch of an accumulation."""
    stack = contextlib.ExitStack()
    if not last:
        for role in roles:
            stack.enter_context(run.accelerator.no_sync(trainer.prepared.sync_module[role]))
    return stack


def _losses(
    run: Run,
    teacher: Teacher,
    data: TrainingData,
    trainer: Trainer,
    batch: dict[str, Any],
    student_turn: bool,
) -> dict[str, dict[str, torch.Tensor]]:
    dmd, noise, latents = trainer.dmd, batch["noise"], batch["latents"]
    cond = dict(batch["cond"])
    ehs = cond.pop("encoder_hidden_states", None)
    if student_turn:
        neg = {
            k: v.expand(noise.shape[0], *v.shape[1:])
            for k, v in to_device(data.negative, run.device, run.weight_dtype).items()
        }
        neg_ehs = neg.pop("encoder_hidden_states", None)
        loss = dmd.compute_student_loss(
            latents,
            noise,
            ehs,
            negative_encoder_hidden_states=neg_ehs,
            negative_model_kwargs=neg,
            **cond,
        )
        return {"student": loss}
    losses = {"fake_score": dmd.compute_fake_score_loss(latents, noise, ehs, **cond)}
    if trainer.prepared.discriminator is not None:
        losses["discriminator"] = dmd.compute_discriminator_loss(latents, noise, ehs, **cond)
    return losses


def _optimizer_step(run: Run, trainer: Trainer, role: str, want_norm: bool = False) -> float | None:
    """Clip, step and zero one network's optimizer, and step its learning-rate schedule.
    With ``want_norm``, returns the gradient norm before clipping."""
    accelerator, max_norm = run.accelerator, run.args.max_grad_norm
    model = trainer.module(role)
    optimizer = trainer.prepared.optimizers[role]
    norm = None
    if max_norm > 0 and trainer.prepared.fsdp2:
        # accelerate's clip_grad_norm_ looks the parameters up among the first prepared
        # model's only; torch's handles sharded (DTensor) gradients itself.
        accelerator.unscale_gradients(optimizer=optimizer)
        norm = torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    elif max_norm > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    elif want_norm:
        accelerator.unscale_gradients(optimizer=optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else None
    optimizer.step()
    # One schedule step per update on any number of ranks (accelerate's wrapper steps once per
    # process, which would tie the schedule, and a resumed one, to the rank count).
    if not getattr(optimizer, "step_was_skipped", False):  # fp16: an overflow skips the update
        scheduler = trainer.prepared.schedulers[role]
        getattr(scheduler, "scheduler", scheduler).step()
    optimizer.zero_grad(set_to_none=True)
    if not want_norm or norm is None:
        return None
    full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
    return float(full() if full is not None else norm)


def monitor_due(run: Run, step: int) -> bool:
    """Whether the student update at ``step`` is the first one at or after a multiple of
    ``--monitor_every`` (a function of the step alone, so a resumed run checks where the
    straight run did)."""
    every = run.args.monitor_every
    return every > 0 and step % every < run.cfg.student_update_freq


def _monitor_stats(
    run: Run, trainer: Trainer, batch: dict[str, Any], grad_norm: float | None
) -> dict[str, float]:
    """The monitors' statistics of this student update (:mod:`fastgen_diffusers.monitors`):
    its last micro-batch against the batch's real latents, or, for prompt-only data, the
    teacher's conditional x0 at the same noise (one extra teacher forward without grad)."""
    dmd, monitor, record = trainer.dmd, trainer.monitor, trainer.dmd.last_student_step
    try:
        if monitor is None or record is None:
            return {}
        cond = dict(batch["cond"])
        ehs = cond.pop("encoder_hidden_states", None)
        reference = batch["latents"]
        if reference is None:
            with run.accelerator.autocast():
                reference = dmd.teacher_x0_at_student_input(ehs, **cond)
        conditioning = [c for c in (ehs, *cond.values()) if isinstance(c, torch.Tensor)]
        prompts = (  # no conditioning: one group
            prompt_fingerprints(*conditioning)
            if conditioning
            else torch.zeros(record["gen"].shape[0], dtype=torch.float64)
        ).to(run.device)
        tensors = [record["gen"], reference, record["teacher_x0"], record["fake_x0"], prompts]
        if run.accelerator.num_processes > 1:
            # the global batch on every rank: prompt pairs across ranks count, and every rank
            # logs the same keys (the mean over ranks needs them)
            tensors = [run.accelerator.gather(t.contiguous()) for t in tensors]
        gen, reference, teacher_x0, fake_x0, prompts = tensors
        return monitor.measure(
            student_x0=gen,
            reference_x0=reference,
            group_ids=torch.unique(prompts.cpu(), return_inverse=True)[1],
            teacher_x0=teacher_x0,
            fake_x0=fake_x0,
            grad_norm=grad_norm,
        )
    finally:
        dmd.record_student_step, dmd.last_student_step = False, None


def _mean_over_ranks(run: Run, logs: dict[str, float]) -> dict[str, float]:
    """The global batch's losses (each rank computed the mean over its rows)."""
    if run.accelerator.num_processes == 1:
        return logs
    keys = sorted(logs)
    values = torch.tensor([logs[k] for k in keys], device=run.device, dtype=torch.float64)
    return dict(zip(keys, run.accelerator.reduce(values, reduction="mean").tolist()))


def log_step(
    run: Run, logs: dict[str, float], step: int, bar: Any, monitor: CollapseMonitor | None = None
) -> None:
    """Progress bar, trackers, and ``logs/losses.jsonl`` (every iteration's losses as JSON
    lines: what a resumed run must reproduce). With ``monitor``, the fake-score losses feed
    its trend, a monitored step's statistics get its alarm flags, and a diagnostic that has
    just crossed its threshold is printed once (main process)."""
    # The monitors' history-dependent values (alarm flags, fake-score trend) go to the
    # trackers only: a resumed run restarts that history, and losses.jsonl must match.
    tracked = logs
    if monitor is not None:
        if "fake_score/fake_score" in logs:
            monitor.observe_fake_score_loss(logs["fake_score/fake_score"])
        if any(key.startswith("monitor/") for key in logs):
            tracked = monitor.check(step, logs)
            if run.is_main:
                for message in monitor.new_warnings:
                    print_monitor_warning(message, bar)
    # Each network's loss keeps its last value between its turns; the learning rate is the
    # student's.
    last = getattr(bar, "dmd2_last", {})
    for key in ("student/total", "fake_score/total", "discriminator/total", "lr/student"):
        if key in logs:
            last[key] = logs[key]
    bar.dmd2_last = last
    labels = {
        "student/total": "student",
        "fake_score/total": "fake",
        "discriminator/total": "disc",
        "lr/student": "lr",
    }
    bar.set_postfix(
        {label: f"{last[key]:.4g}" for key, label in labels.items() if key in last}, refresh=False
    )
    run.accelerator.log(tracked, step=step)
    if run.is_main:
        loss_log = run.log_dir / "losses.jsonl"
        loss_log.parent.mkdir(parents=True, exist_ok=True)
        with open(loss_log, "a") as f:
            f.write(json.dumps({"step": step, **logs}) + "\n")


def maybe_checkpoint(
    run: Run, teacher: Teacher, trainer: Trainer, progress: Progress, force: bool = False
) -> None:
    """A checkpoint every ``--checkpointing_steps`` iterations, at the last iteration, and
    when ``force`` (a stop signal); each holds the student as the final export does."""
    args, step = run.args, progress.step
    if force or step % args.checkpointing_steps == 0 or step == args.max_train_steps:
        record = json.loads((run.output_dir / RUN_RECORD).read_text()) if run.is_main else None
        path = save_checkpoint(
            run,
            trainer,
            progress,
            args.checkpoints_total_limit,
            run_record=record,
            export=lambda folder: write_student(run, teacher, trainer, folder),
        )
        if args.push_checkpoints_to_hub and run.hub_repo_id and run.is_main:
            from .hub import push_checkpoint

            push_checkpoint(path, run.hub_repo_id, token=args.hub_token)
