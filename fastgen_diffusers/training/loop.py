"""The DMD2 training run behind ``train_dmd2.py``, top to bottom.

1. accelerate, seed, recipe; 2. the teacher pipeline and its family; 3. data: prompt embeddings
and latents computed once and cached, encoders freed; 4. the networks in the chosen layout (full
or LoRA, shared base), GAN features and discriminator, EMA; 5. optimizers and schedulers, one per
trained network; 6. resume; 7. the alternation loop (one student update every
``student_update_freq`` iterations, fake-score / discriminator updates in between), with
checkpoints and validation; 8. export, model card, Hub upload.

Example::

    from fastgen_diffusers.training import parse_args, train

    train(parse_args(["--pretrained_model_name_or_path", "tiny-sd3", "--recipe", "r.yaml",
                      "--dataset_name", "prompts.jsonl", "--max_train_steps", "10"]))
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from ..config import DMDConfig
from ..ema import ema_weights
from ..loader import load_config
from ..lora import (
    AdapterRole,
    LoraSettings,
    build_dmd_networks,
    enable_gradient_checkpointing,
)
from ..methods import DMDPipeline
from . import validation
from .cache import build_cache
from .checkpointing import (
    checkpoint_step,
    load_per_rank_state,
    resolve_resume,
    save_checkpoint,
)
from .data import load_training_dataset
from .export import export_student
from .families import family_from_pretrained
from .parallel import full_state_dict, load_pipeline, pipeline_to, prepare_networks
from .sampler import ResumableRandomSampler

__all__ = ["load_recipe", "train"]

logger = logging.getLogger(__name__)


def load_recipe(recipe: str, overrides: dict[str, Any]) -> DMDConfig:
    """The recipe (built-in name or YAML path) with ``--recipe_overrides`` merged in."""

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
        return out

    return DMDConfig.model_validate(merge(load_config(recipe), overrides))


class _Counter:
    """The iteration counter, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def _student_t_list(cfg: DMDConfig) -> list[float]:
    if cfg.student_sample_steps > 1:
        return list(cfg.sample_t_cfg.t_list)
    return [cfg.sample_t_cfg.max_t, 0.0]


def _to(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None):
    return {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype)
        for k, v in batch.items()
    }


def train(args: argparse.Namespace) -> Path:
    """Run the whole distillation; returns the output folder."""
    output_dir = Path(args.output_dir)
    # -- 1. accelerate, seed, recipe -----------------------------------------------------------
    # Accelerate only goes distributed on a CPU-only machine when told it is a CPU run
    # (otherwise each torchrun process would train alone, all writing to one folder).
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_process_cpu,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            probe = output_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise PermissionError(
                f"--output_dir {str(output_dir)!r} is not writable: {err}"
            ) from err
    set_seed(args.seed)
    cfg = load_recipe(args.recipe, args.recipe_overrides)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    device = accelerator.device
    t_list = _student_t_list(cfg)

    # -- 2. teacher pipeline ----------------------------------------------------------------------
    # --flux_guidance is None unless given: a value for a family without it is an error.
    family = family_from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, guidance=args.flux_guidance
    )
    pipe = load_pipeline(
        accelerator,
        family,
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=weight_dtype,
    )
    pipeline_to(pipe, device)
    height = args.height or args.resolution
    width = args.width or args.resolution
    latent_shape = family.latent_shape(pipe, height, width, num_frames=args.num_frames)

    # -- 3. data, cached once -------------------------------------------------------------------
    dataset = load_training_dataset(
        args.dataset_name,
        args.dataset_config_name,
        args.train_data_dir,
        caption_column=args.caption_column,
        image_column=args.image_column,
        video_column=args.video_column,
        max_train_samples=args.max_train_samples,
    )
    has_media = bool({"image", "video"} & set(dataset.column_names))
    needs_media = cfg.gan_loss_weight_gen > 0 or (
        cfg.student_sample_steps > 1 and not cfg.backward_simulation
    )
    if needs_media and not has_media:
        raise ValueError(
            "This recipe needs real images/videos (GAN branch, or a multi-step student without "
            "backward_simulation), but the dataset has prompts only: give a dataset with "
            "images (--image_column) or videos (--video_column), or change the recipe"
        )
    cache_dir = Path(args.cache_dir) if args.cache_dir else output_dir / "cache"
    fingerprint = {
        "model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "family": family.name,
        "height": height,
        "width": width,
        "num_frames": args.num_frames,
        "max_sequence_length": args.max_sequence_length,
        "dtype": str(weight_dtype),
    }

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = family.encode_prompts(pipe, prompts, max_sequence_length=args.max_sequence_length)
        return {k: v.cpu() for k, v in out.items()}

    def encode_media(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return family.encode_media(pipe, pixels.to(device, weight_dtype)).cpu()

    with accelerator.main_process_first():
        train_data = build_cache(
            dataset,
            cache_dir=cache_dir,
            fingerprint_parts=fingerprint,
            encode_prompts=encode_prompts,
            encode_media=encode_media if needs_media else None,
            negative_prompt=args.negative_prompt,
            batch_size=max(args.train_batch_size, 4),
            resolution=(height, width),
            num_frames=args.num_frames,
        )
        prompts = args.validation_prompts or []
        validation_cond = encode_prompts(prompts) if prompts else None
    family.free_encoders(pipe)
    negative = _to(train_data.negative, device)

    # -- 4. networks ----------------------------------------------------------------------------
    teacher = family.wrap(pipe.transformer)
    teacher.requires_grad_(False)
    layout = args.lora_layout if args.use_lora else "full"
    lora = LoraSettings(
        rank=args.rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        init=args.lora_init,
        target_modules=args.lora_target_modules,
    )
    nets = build_dmd_networks(teacher, layout, lora)
    for net in (nets.student, nets.fake_score):
        if isinstance(net, AdapterRole):  # adapters train in fp32 over a frozen low-precision base
            for p in net.parameters():
                p.data = p.data.float()
        else:
            net.float()
    if args.gradient_checkpointing:
        for net in {id(n): n for n in (nets.student, nets.fake_score)}.values():
            if isinstance(net, AdapterRole):
                enable_gradient_checkpointing(net.module)
            else:
                net.enable_gradient_checkpointing()
    discriminator = None
    if cfg.gan_loss_weight_gen > 0:
        family.attach_feature_capture(nets.teacher)
        discriminator = family.build_discriminator(nets.teacher).to(device)

    # -- 5. optimizers, one per trained network ------------------------------------------------
    from diffusers.optimization import get_scheduler

    def adamw(params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            params,
            lr=lr,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )

    student_updates = math.ceil(args.max_train_steps / cfg.student_update_freq)
    other_updates = args.max_train_steps - student_updates

    def scheduler(opt: torch.optim.Optimizer, updates: int):
        return get_scheduler(
            args.lr_scheduler,
            optimizer=opt,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=max(updates, 1),
        )

    learning_rates = {
        "student": args.learning_rate,
        "fake_score": args.fake_score_learning_rate or args.learning_rate,
        "discriminator": args.discriminator_learning_rate or args.learning_rate,
    }
    # The discriminator is trained alongside the fake score.
    updates = {
        "student": student_updates,
        "fake_score": other_updates,
        "discriminator": other_updates,
    }
    # DDP, or FSDP2 from the accelerate config: parallel.py is where that is decided.
    prepared = prepare_networks(
        accelerator,
        nets,
        make_optimizer=lambda role, params: adamw(params, learning_rates[role]),
        make_scheduler=lambda role, opt: scheduler(opt, updates[role]),
        discriminator=discriminator,
    )
    student, fake_score = prepared.student, prepared.fake_score
    discriminator = prepared.discriminator
    student_opt, student_sched = prepared.optimizers["student"], prepared.schedulers["student"]
    fake_opt, fake_sched = prepared.optimizers["fake_score"], prepared.schedulers["fake_score"]
    disc_opt = prepared.optimizers.get("discriminator")
    disc_sched = prepared.schedulers.get("discriminator")
    dmd = DMDPipeline(student, prepared.teacher, fake_score, cfg, discriminator=discriminator)
    # Noise and timesteps drawn for the global batch, this rank's rows kept: N ranks train on
    # exactly what one process would (every rank is seeded alike).
    dmd.draw_for_global_batch(accelerator.process_index, accelerator.num_processes)
    if dmd.ema is not None and not prepared.fsdp2:
        accelerator.register_for_checkpointing(dmd.ema)
    # Under FSDP2 the EMA may hold per-rank shards: checkpointing.py saves it per rank.
    ema_per_rank = dmd.ema if prepared.fsdp2 else None

    sampler = ResumableRandomSampler(len(train_data), seed=args.seed)
    counter = _Counter()
    accelerator.register_for_checkpointing(sampler, counter)
    # Building the networks draws differently per rank (weights on the meta device draw
    # nothing): the training stream starts from the seed again, alike on every rank.
    set_seed(args.seed)

    # -- 6. resume -------------------------------------------------------------------------------
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    if resume is not None:
        accelerator.load_state(str(resume))
        load_per_rank_state(accelerator, resume, {"ema": ema_per_rank})
        logger.info("Resumed from %s at iteration %d", resume, checkpoint_step(resume))
    elif args.resume_from_checkpoint == "latest":
        logger.info("No complete checkpoint in %s: starting from scratch", output_dir)

    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("dmd2", config={k: str(v) for k, v in vars(args).items()})

    validation_dir = output_dir / "validation"
    seeds = list(range(args.seed, args.seed + 2))

    def validate(step: int, teacher_grid: bool = False) -> None:
        # A sharded model needs every rank in its forward; only the main process draws grids.
        if validation_cond is None or not (accelerator.is_main_process or prepared.fsdp2):
            return
        cond = _to(validation_cond, device, weight_dtype)
        model = accelerator.unwrap_model(student)
        with ema_weights(dmd.ema, model) if dmd.ema is not None else contextlib.nullcontext():
            latents = validation.sample_images(
                model, cond, latent_shape, seeds, t_list=t_list, sample_type=cfg.student_sample_type
            )
            prepared.reshard()  # before the live weights go back into the shards
        grids = {"student": latents}
        if teacher_grid:  # once, at the start: the reference the student is distilled from
            sigmas = family.teacher_sigmas(
                pipe.scheduler, args.teacher_validation_steps, latent_shape
            )
            grids["teacher"] = validation.sample_images(
                prepared.teacher,
                cond,
                latent_shape,
                seeds,
                sigmas=sigmas,
                guidance_scale=cfg.guidance_scale,
                negative=_to(negative, device, weight_dtype),
            )
            prepared.reshard()
        if not accelerator.is_main_process:
            return
        validation_dir.mkdir(parents=True, exist_ok=True)
        for name, lat in grids.items():
            with torch.no_grad():
                images = family.decode(pipe, lat.to(weight_dtype))
            grid = validation.image_grid(images, rows=len(validation_cond["encoder_hidden_states"]))
            path = validation_dir / f"{name}-{step:06d}.png"
            grid.save(path)
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    import numpy as np

                    tracker.log_images(
                        {f"validation/{name}": np.asarray(grid)[None]},
                        step=step,
                        dataformats="NHWC",
                    )

    # -- 7. the alternation loop -----------------------------------------------------------------
    # Every iteration's losses, also as JSON lines (what a resumed run must reproduce).
    loss_log = output_dir / args.logging_dir / "losses.jsonl"
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = args.train_batch_size * world
    # Rank r takes rows [r * B, (r + 1) * B) of the global batch: its data, and the noise and
    # timesteps it draws (DMDPipeline.draw_for_global_batch).
    rows = slice(rank * args.train_batch_size, (rank + 1) * args.train_batch_size)

    def next_batch() -> dict[str, Any]:
        indices = sampler.take(global_batch)[rows]
        return train_data.collate([train_data[i] for i in indices])

    if counter.step == 0:
        validate(0, teacher_grid=True)
    progress = tqdm(
        range(counter.step, args.max_train_steps),
        initial=counter.step,
        total=args.max_train_steps,
        disable=not accelerator.is_main_process,
        desc="DMD2",
    )
    for _ in progress:
        step = counter.step
        student_turn = step % cfg.student_update_freq == 0
        trained = (
            [("student", student, student_opt, student_sched)]
            if student_turn
            else [("fake_score", fake_score, fake_opt, fake_sched)]
        )
        if not student_turn and discriminator is not None:
            trained.append(("discriminator", discriminator, disc_opt, disc_sched))
        logs: dict[str, float] = {}
        for micro in range(args.gradient_accumulation_steps):
            batch = next_batch()
            cond = _to(batch["cond"], device, weight_dtype)
            ehs = cond.pop("encoder_hidden_states", None)
            latents = batch.get("latents")
            latents = latents.to(device, weight_dtype) if latents is not None else None
            shape = (global_batch, *latent_shape)
            noise = torch.randn(shape, device=device, dtype=weight_dtype)[rows]
            last = micro == args.gradient_accumulation_steps - 1
            sync = contextlib.ExitStack()
            if not last:
                for role, *_ in trained:
                    sync.enter_context(accelerator.no_sync(prepared.sync_module[role]))
            with sync, accelerator.autocast():
                if student_turn:
                    neg = {
                        k: v.expand(noise.shape[0], *v.shape[1:])
                        for k, v in _to(negative, device, weight_dtype).items()
                    }
                    neg_ehs = neg.pop("encoder_hidden_states", None)
                    losses = {
                        "student": dmd.compute_student_loss(
                            latents,
                            noise,
                            ehs,
                            negative_encoder_hidden_states=neg_ehs,
                            negative_model_kwargs=neg,
                            **cond,
                        )
                    }
                else:
                    losses = {
                        "fake_score": dmd.compute_fake_score_loss(latents, noise, ehs, **cond)
                    }
                    if discriminator is not None:
                        losses["discriminator"] = dmd.compute_discriminator_loss(
                            latents, noise, ehs, **cond
                        )
            for name, parts in losses.items():
                accelerator.backward(parts["total"] / args.gradient_accumulation_steps)
                for key, value in parts.items():
                    tag = f"{name}/{key}"
                    logs[tag] = logs.get(tag, 0.0) + value.item() / args.gradient_accumulation_steps
        for _, model, opt, sched in trained:
            if args.max_grad_norm > 0 and prepared.fsdp2:
                # accelerate's clip_grad_norm_ looks the parameters up among the first prepared
                # model's only; torch's handles sharded (DTensor) gradients itself.
                accelerator.unscale_gradients(optimizer=opt)
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), args.max_grad_norm)
            elif args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        prepared.reshard()
        if student_turn:
            dmd.update_ema(iteration=step)
        counter.step = step + 1
        if world > 1:  # the global batch's losses (each rank computed its rows' mean)
            keys = sorted(logs)
            values = torch.tensor([logs[k] for k in keys], device=device, dtype=torch.float64)
            logs = dict(zip(keys, accelerator.reduce(values, reduction="mean").tolist()))
        logs["lr/student"] = student_sched.get_last_lr()[0]
        progress.set_postfix(
            {
                k.split("/")[-1] if k.endswith("total") else k: f"{v:.4g}"
                for k, v in logs.items()
                if k.endswith("total")
            }
        )
        accelerator.log(logs, step=counter.step)
        if accelerator.is_main_process:
            loss_log.parent.mkdir(parents=True, exist_ok=True)
            with open(loss_log, "a") as f:
                f.write(json.dumps({"step": counter.step, **logs}) + "\n")
        if counter.step % args.checkpointing_steps == 0 and counter.step < args.max_train_steps:
            save_checkpoint(
                accelerator,
                output_dir,
                counter.step,
                args.checkpoints_total_limit,
                per_rank_state={"ema": ema_per_rank},
            )
        if counter.step % args.validation_steps == 0:
            validate(counter.step)

    # -- 8. export -------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    final_student = accelerator.unwrap_model(student)
    gathered = None
    if prepared.fsdp2:  # every rank gathers the (EMA) student; the main process writes it
        with ema_weights(dmd.ema, final_student) if dmd.ema else contextlib.nullcontext():
            gathered = full_state_dict(final_student, main_process=accelerator.is_main_process)
    if counter.step % args.validation_steps:  # the final weights' grid, if not drawn yet
        validate(counter.step)
    if accelerator.is_main_process:
        scheduler_config = family.student_scheduler_config(
            t_list, cfg.student_sample_type, dict(pipe.scheduler.config)
        )
        export_student(
            output_dir,
            student=final_student,
            scheduler_config=scheduler_config,
            ema=None if gathered is not None else dmd.ema,
            state_dict=gathered,
        )
        from .model_card import write_model_card

        prompt_text = "; ".join(args.validation_prompts or [])
        write_model_card(
            output_dir,
            base_model=args.pretrained_model_name_or_path,
            family=family,
            recipe_name=args.recipe,
            recipe=cfg,
            t_list=t_list,
            sample_type=cfg.student_sample_type,
            lora=isinstance(final_student, AdapterRole),
            pipeline_class_name=family.pipeline_class.__name__,
            repo_id=args.hub_model_id,
            pipeline_kwargs=family.stock_pipeline_kwargs(t_list),
            validation_images=[
                (str(p.relative_to(output_dir)), prompt_text)
                for p in sorted(validation_dir.glob("student-*.png"))
            ],
        )
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        from .hub import push_to_hub

        repo_id = args.hub_model_id or output_dir.resolve().name
        push_to_hub(output_dir, repo_id, token=args.hub_token, private=args.hub_private)
    return output_dir
