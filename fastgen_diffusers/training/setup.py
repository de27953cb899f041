"""The phases that set a training run up, in the order :func:`~.loop.train` calls them.

``setup_run`` (accelerate, seed, recipe, output folder) -> ``load_teacher`` (the diffusers
pipeline and its family) -> ``cache_data`` (prompt embeddings and latents, encoders freed) ->
``build_networks`` (the layout's student / fake score, GAN discriminator) -> ``make_trainer``
(optimizers, DDP or FSDP2, the DMD2 losses) -> ``resume``. Where the run is distributed is
decided in :mod:`~fastgen_diffusers.training.parallel` alone.

Example::

    run = setup_run(args)
    teacher = load_teacher(run)
    data = cache_data(run, teacher)
    trainer = make_trainer(run, build_networks(run, teacher))
    progress = resume(run, trainer, len(data.samples))
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from ..loader import load_dmd_config
from ..lora import AdapterRole, LoraSettings, build_dmd_networks, enable_gradient_checkpointing
from ..methods import DMDPipeline
from ..plugins import family_from_pretrained
from ..quantize import quantize_base
from .args import TrainingArguments
from .cache import CacheSettings, build_cache
from .checkpointing import checkpoint_step, load_per_rank_state, resolve_resume
from .data import load_training_dataset
from .data_order import ResumableRandomSampler
from .optim import optimizer_class
from .parallel import load_pipeline, pipeline_to, prepare_networks
from .state import Counter, Networks, Progress, Run, Teacher, Trainer, TrainingData

__all__ = [
    "build_networks",
    "cache_data",
    "load_teacher",
    "make_trainer",
    "resume",
    "setup_run",
    "to_device",
]

logger = logging.getLogger(__name__)

_WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def to_device(
    batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """``batch`` on ``device``; floating tensors cast to ``dtype`` when given."""
    return {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() and dtype else v.dtype)
        for k, v in batch.items()
    }


def setup_run(args: TrainingArguments) -> Run:
    """Accelerate, logging, a writable output folder, the seed and the recipe."""
    output_dir = Path(args.output_dir)
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
        _check_writable(output_dir)
    set_seed(args.seed)
    cfg = load_dmd_config(args.recipe, overrides=args.recipe_overrides)
    if cfg.student_sample_steps > 1:
        t_list = list(cfg.sample_t_cfg.t_list)
    else:
        t_list = [cfg.sample_t_cfg.max_t, 0.0]
    weight_dtype = _WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    return Run(args, cfg, accelerator, output_dir, weight_dtype, t_list)


def _check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"--output_dir {str(output_dir)!r} is not writable: {err}") from err


def load_teacher(run: Run) -> Teacher:
    """The teacher's pipeline on the device (under FSDP2 only rank 0 reads the weights) and
    the per-sample latent shape at the requested size."""
    args = run.args
    family = family_from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, guidance=args.flux_guidance
    )
    pipe = load_pipeline(
        run.accelerator,
        family,
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=run.weight_dtype,
    )
    pipeline_to(pipe, run.device)
    height, width = args.size
    latent_shape = family.latent_shape(pipe, height, width, num_frames=args.num_frames)
    return Teacher(family, pipe, latent_shape)


def _needs_media(run: Run) -> bool:
    """Whether the recipe trains on real latents: the GAN branch, or a multi-step student
    that starts from noised data rather than its own backward simulation."""
    cfg = run.cfg
    return cfg.gan_loss_weight_gen > 0 or (
        cfg.student_sample_steps > 1 and not cfg.backward_simulation
    )


def cache_data(run: Run, teacher: Teacher) -> TrainingData:
    """Prompt embeddings (and latents, when the recipe needs them) computed once and cached;
    the text encoders are freed afterwards."""
    args, family, pipe = run.args, teacher.family, teacher.pipe
    dataset = load_training_dataset(
        args.dataset_name,
        args.dataset_config_name,
        args.train_data_dir,
        caption_column=args.caption_column,
        image_column=args.image_column,
        video_column=args.video_column,
        max_train_samples=args.max_train_samples,
    )
    needs_media = _needs_media(run)
    if needs_media and not {"image", "video"} & set(dataset.column_names):
        raise ValueError(
            "This recipe needs real images/videos (GAN branch, or a multi-step student without "
            "backward_simulation), but the dataset has prompts only: give a dataset with "
            "images (--image_column) or videos (--video_column), or change the recipe"
        )
    height, width = args.size
    settings = CacheSettings(
        model=args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        family=family.name,
        height=height,
        width=width,
        num_frames=args.num_frames,
        max_sequence_length=args.max_sequence_length,
        dtype=str(run.weight_dtype),
        negative_prompt=args.negative_prompt,
        needs_media=needs_media,
    )

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = family.encode_prompts(pipe, prompts, max_sequence_length=args.max_sequence_length)
        return {k: v.cpu() for k, v in out.items()}

    def encode_media(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return family.encode_media(pipe, pixels.to(run.device, run.weight_dtype)).cpu()

    cache_dir = Path(args.cache_dir) if args.cache_dir else run.output_dir / "cache"
    with run.accelerator.main_process_first():
        samples = build_cache(
            dataset,
            settings,
            cache_dir=cache_dir,
            encode_prompts=encode_prompts,
            encode_media=encode_media if needs_media else None,
            batch_size=max(args.train_batch_size, 4),
        )
        prompts = args.validation_prompts or []
        validation_cond = encode_prompts(prompts) if prompts else None
    family.free_encoders(pipe)
    return TrainingData(samples, to_device(samples.negative, run.device), validation_cond)


def build_networks(run: Run, teacher: Teacher) -> Networks:
    """Student and fake score in the chosen layout (full copies, or LoRA adapters over a frozen
    base) trained in fp32, gradient checkpointing, and the GAN discriminator on the teacher's
    features when the recipe has a GAN branch."""
    args, family = run.args, teacher.family
    wrapped = family.wrap(teacher.pipe.transformer)
    wrapped.requires_grad_(False)
    lora = LoraSettings(
        rank=args.rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        init=args.lora_init,
        target_modules=args.lora_target_modules,
    )
    quantize_base(wrapped, args.quantize_base)  # before the adapters: peft wraps int8 weights
    nets = build_dmd_networks(wrapped, args.layout, lora)
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
    if run.cfg.gan_loss_weight_gen > 0:
        family.attach_feature_capture(nets.teacher)
        discriminator = family.build_discriminator(nets.teacher).to(run.device)
    return Networks(nets, discriminator)


def make_trainer(run: Run, networks: Networks) -> Trainer:
    """One AdamW and learning-rate schedule per trained network, the networks prepared for
    DDP or FSDP2 (:mod:`.parallel`), and the DMD2 losses over them."""
    from diffusers.optimization import get_scheduler

    args, cfg = run.args, run.cfg
    learning_rates = {
        "student": args.learning_rate,
        "fake_score": args.fake_score_learning_rate or args.learning_rate,
        "discriminator": args.discriminator_learning_rate or args.learning_rate,
    }
    # One student update every student_update_freq iterations; the discriminator is trained
    # alongside the fake score.
    student_updates = math.ceil(args.max_train_steps / cfg.student_update_freq)
    other_updates = args.max_train_steps - student_updates
    updates = {
        "student": student_updates,
        "fake_score": other_updates,
        "discriminator": other_updates,
    }

    def make_optimizer(role: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return optimizer_class(args.optimizer)(
            params,
            lr=learning_rates[role],
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )

    def make_scheduler(role: str, optimizer: torch.optim.Optimizer):
        return get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=max(updates[role], 1),
        )

    prepared = prepare_networks(
        run.accelerator,
        networks.nets,
        make_optimizer=make_optimizer,
        make_scheduler=make_scheduler,
        discriminator=networks.discriminator,
    )
    dmd = DMDPipeline(
        prepared.student,
        prepared.teacher,
        prepared.fake_score,
        cfg,
        discriminator=prepared.discriminator,
    )
    # Noise and timesteps drawn for the global batch, this rank's rows kept: N ranks train on
    # exactly what one process would (every rank is seeded alike).
    dmd.draw_for_global_batch(run.accelerator.process_index, run.accelerator.num_processes)
    if dmd.ema is not None and not prepared.fsdp2:
        run.accelerator.register_for_checkpointing(dmd.ema)
    # Under FSDP2 the EMA may hold per-rank shards: checkpointing.py saves it per rank.
    return Trainer(prepared, dmd, dmd.ema if prepared.fsdp2 else None)


def resume(run: Run, trainer: Trainer, num_samples: int) -> Progress:
    """The data order and iteration counter, registered with every checkpoint, restored from
    ``--resume_from_checkpoint`` when given (the networks, optimizers and EMA too)."""
    accelerator = run.accelerator
    progress = Progress(ResumableRandomSampler(num_samples, seed=run.args.seed), Counter())
    accelerator.register_for_checkpointing(progress.data_order, progress.counter)
    # Building the networks draws differently per rank (weights on the meta device draw
    # nothing): the training stream starts from the seed again, alike on every rank.
    set_seed(run.args.seed)
    path = resolve_resume(run.args.resume_from_checkpoint, run.output_dir)
    if path is not None:
        accelerator.load_state(str(path))
        load_per_rank_state(accelerator, path, {"ema": trainer.ema_per_rank})
        logger.info("Resumed from %s at iteration %d", path, checkpoint_step(path))
    elif run.args.resume_from_checkpoint == "latest":
        logger.info("No complete checkpoint in %s: starting from scratch", run.output_dir)
    return progress
