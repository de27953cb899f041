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

import json
import logging
import math
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, set_seed
from safetensors import SafetensorError

from ..lora import (
    AdapterRole,
    LoraSettings,
    UserLora,
    build_dmd_networks,
    enable_gradient_checkpointing,
    fuse_user_lora,
)
from ..methods import DMDPipeline
from ..monitors import CollapseMonitor
from ..quantize import quantize_base
from .args import TrainingArguments
from .cache import CacheSettings, build_cache
from .checkpointing import (
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    truncate_loss_log,
)
from .data_order import ResumableRandomSampler
from .errors import UserError
from .export import other_run_export, remove_export
from .hub import prepare_hub_repo
from .optim import optimizer_class
from .parallel import (
    check_accelerate_options,
    is_fsdp2,
    load_pipeline,
    pipeline_to,
    prepare_networks,
    take_host_transformers,
    teacher_transformers_with_weights,
)
from .preflight import (
    load_dataset_checked,
    load_validation_images,
    needs_media,
    preflight,
    resume_target,
    teacher_family,
)
from .run_record import RUN_RECORD, check_resume, run_record, write_run_record
from .state import Counter, Networks, Progress, Run, Teacher, Trainer, TrainingData
from .trackers import check_trackers, requested_trackers

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

# What torch / safetensors / pickle raise on a truncated or foreign checkpoint file.
_DAMAGED_FILE_ERRORS = (
    RuntimeError,
    OSError,
    EOFError,
    ValueError,
    SafetensorError,
    UnpicklingError,
)

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
    """The checks that need no weights (:func:`~.preflight.preflight`: flags, recipe, teacher
    configs, sizes, dataset, checkpoint, a writable output folder; the trackers' packages;
    with ``--push_to_hub`` the Hub login and repo; an output folder holding another run's export,
    :func:`~.export.other_run_export`), then accelerate, logging, the seed and the recipe. A
    mistake raises :class:`~.errors.UserError` before any model is loaded."""
    checked = preflight(args)  # first: a mistake costs seconds, not a teacher load
    stale_export = other_run_export(args)  # another run's export: refused or, if asked, removed
    output_dir = Path(args.output_dir)
    if args.allow_tf32:  # as the diffusers examples do; no effect without CUDA
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_trackers(args)
    # Accelerate only goes distributed on a CPU-only machine when told it is a CPU run
    # (otherwise each torchrun process would train alone, all writing to one folder).
    multi_process_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    if args.ddp_timeout < 1:
        raise ValueError(f"--ddp_timeout must be >= 1 second, got {args.ddp_timeout}")
    accelerator = Accelerator(
        cpu=multi_process_cpu,
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
        log_with=requested_trackers(args.report_to) or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
    )
    check_accelerate_options(accelerator)
    if accelerator.is_main_process:
        # Before anything else writes: what killed runs left half-written.
        caches = [Path(args.embedding_cache_dir)] if args.embedding_cache_dir else []
        remove_stale_temporaries(output_dir, caches)
        remove_export(stale_export)
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    cfg = checked.cfg
    if is_fsdp2(accelerator) and cfg.ema is not None and "mode" not in cfg.ema.model_fields_set:
        # Under FSDP2 each rank averages its own shards (no all-gather per update); the export
        # gathers the EMA once. A recipe's explicit ema.mode is kept.
        cfg.ema.mode = "local_shard"
    if cfg.student_sample_steps > 1:
        t_list = list(cfg.sample_t_cfg.t_list)
    else:
        t_list = [cfg.sample_t_cfg.max_t, 0.0]
    weight_dtype = _WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    hub_repo_id = _prepare_hub(accelerator, args) if args.push_to_hub else None
    run = Run(args, cfg, accelerator, output_dir, weight_dtype, t_list, hub_repo_id)
    path = resolve_resume(resume_target(args), output_dir)
    if path is not None:  # before the teacher loads: another run's checkpoint costs seconds
        check_resume_record(run, checked.family.name, path)
    return run


def check_resume_record(run: Run, family: str, path: Path) -> None:
    """The checkpoint's ``run.json`` against this run (recipe, layout, family, model, global
    batch): a :class:`~.errors.UserError` listing the differences unless
    ``--allow_resume_changes`` (then they are printed)."""
    saved = path / RUN_RECORD
    if not saved.is_file():
        raise UserError(
            f"{path} has no {RUN_RECORD}: it was not written by this version of the training "
            "code and cannot be resumed",
            fix="start a new run (another --output_dir), or resume from a newer checkpoint",
        )
    check_resume(
        json.loads(saved.read_text()),
        run_record(run, family),
        checkpoint=path,
        allow=run.args.allow_resume_changes,
    )


def _prepare_hub(accelerator: Accelerator, args: TrainingArguments) -> str:
    """The Hub repo, checked and created by the main process; every rank gets its id or the
    main process's error (so no rank waits for a run that will not start)."""
    from accelerate.utils import broadcast_object_list

    result: list[str | None] = [None, None]
    if accelerator.is_main_process:
        try:
            result[0] = prepare_hub_repo(args)
        except UserError as err:
            result[1] = str(err)
    if accelerator.num_processes > 1:
        broadcast_object_list(result, from_process=0)
    if result[1] is not None:
        raise UserError(result[1])
    assert result[0] is not None
    return result[0]


def load_teacher(run: Run) -> Teacher:
    """The teacher's pipeline on the device (under FSDP2 the transformer stays on the meta
    device and only the main process reads its weights, onto the host) and the per-sample
    latent shape at the requested size.

    A size the user did not pass is the teacher's own (``Family.default_size``: Wan 480x832,
    the image pipelines ``default_sample_size * vae_scale_factor``; video: the family's
    ``default_num_frames``); ``run.args`` is updated so every later phase, the cache key and
    the model card see the resolved size."""
    args = run.args
    family = teacher_family(args)
    pipe = load_pipeline(
        run.accelerator,
        family,
        args.pretrained_model_name_or_path,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=run.weight_dtype,
        cache_dir=args.cache_dir,
        **load_quantized_transformers(run, family),
    )
    pipeline_to(pipe, run.device)
    user_lora = fuse_teacher_lora(args, pipe)
    height, width = args.size
    if height is None or width is None:
        default_height, default_width = family.default_size(pipe)
        height, width = height or default_height, width or default_width
        run.args = args = args.replace(height=height, width=width)
    if family.is_video and args.num_frames is None and family.default_num_frames is not None:
        run.args = args = args.replace(num_frames=family.default_num_frames)
    try:
        latent_shape = family.latent_shape(pipe, height, width, num_frames=args.num_frames)
    except ValueError as err:  # what the preflight's config reading could not foresee
        raise UserError(f"--height/--width/--resolution/--num_frames: {err}") from err
    return Teacher(family, pipe, latent_shape, user_lora)


def load_quantized_transformers(run: Run, family: Any) -> dict[str, torch.nn.Module]:
    """With ``--quantize_base``, the teacher's transformers read one layer at a time into their
    quantized base on the device (:mod:`~fastgen_diffusers.quantized_loading`), so that no
    full-precision copy ever reaches it; empty (the pipeline loads them, :func:`quantize_base`
    follows) when the LoRA of ``--teacher_lora`` must be fused into full-precision weights
    first, or the checkpoint has no safetensors weights. FSDP2 is refused in
    :func:`build_networks`."""
    import diffusers

    from ..quantized_loading import load_quantized_transformer

    args = run.args
    if args.quantize_base in (None, "none") or args.teacher_lora or is_fsdp2(run.accelerator):
        return {}
    path = args.pretrained_model_name_or_path
    index = family.pipeline_class.load_config(
        path, revision=args.revision, cache_dir=args.cache_dir
    )
    loaded = {}
    for name in family.transformer_components:
        model = load_quantized_transformer(
            getattr(diffusers, index[name][1]),
            path,
            subfolder=name,
            torch_dtype=run.weight_dtype,
            method=args.quantize_base,
            device=run.device,
            revision=args.revision,
            variant=args.variant,
            cache_dir=args.cache_dir,
        )
        if model is None:
            return {}
        loaded[name] = model
    return loaded


def fuse_teacher_lora(args: TrainingArguments, pipe: Any) -> UserLora | None:
    """Fuse ``--teacher_lora`` at ``--teacher_lora_scale`` into the teacher's weights (every
    copy of them this process holds): the teacher, and every network built from it, is then
    base + the user's LoRA, frozen. Returns the LoRA as fused (for export), else ``None``."""
    if args.teacher_lora is None:  # a two-expert teacher is refused by the preflight
        return None
    user_lora = None
    for transformer in teacher_transformers_with_weights(pipe):
        try:
            user_lora = fuse_user_lora(
                transformer,
                os.path.expanduser(args.teacher_lora),
                args.teacher_lora_scale,
                cache_dir=args.cache_dir,
            )
        except (ValueError, OSError) as err:
            raise UserError(
                f"--teacher_lora {args.teacher_lora!r} could not be fused into the "
                f"{type(transformer).__name__}: {err}",
                expected="a diffusers-format LoRA of this base model (save_lora_weights)",
            ) from err
    if user_lora is not None:
        logger.info(
            "Teacher: %s + LoRA %s at scale %g (%d layers, rank %d)",
            args.pretrained_model_name_or_path,
            args.teacher_lora,
            args.teacher_lora_scale,
            len(user_lora.layers),
            user_lora.rank,
        )
    return user_lora


def cache_data(run: Run, teacher: Teacher) -> TrainingData:
    """Prompt embeddings (and latents, when the recipe needs them; image-to-video: each row's
    image condition) computed once and cached; the text encoders are freed afterwards."""
    args, family, pipe = run.args, teacher.family, teacher.pipe
    dataset = load_dataset_checked(args)  # checked by the preflight; `datasets` caches it
    with_media = needs_media(run.cfg)
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
        needs_media=with_media,
        condition_image=family.condition_image,
    )

    def encode_prompts(prompts: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            out = family.encode_prompts(pipe, prompts, max_sequence_length=args.max_sequence_length)
        return {k: v.cpu() for k, v in out.items()}

    def encode_media(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return family.encode_media(pipe, pixels.to(run.device, run.weight_dtype)).cpu()

    def encode_condition(images: Any) -> dict[str, torch.Tensor]:
        out = family.encode_condition(pipe, images, height, width, num_frames=args.num_frames)
        return {k: v.cpu() for k, v in out.items()}

    cache_dir = (
        Path(args.embedding_cache_dir) if args.embedding_cache_dir else run.output_dir / "cache"
    )
    # Each rank encodes its share of the batches; every rank gets the whole cache.
    samples = build_cache(
        dataset,
        settings,
        cache_dir=cache_dir,
        encode_prompts=encode_prompts,
        encode_media=encode_media if with_media else None,
        encode_condition=encode_condition if family.condition_image else None,
        batch_size=max(args.train_batch_size, 4),
        process_index=run.accelerator.process_index,
        num_processes=run.accelerator.num_processes,
    )
    prompts = args.validation_prompts or []
    validation_cond = encode_prompts(prompts) if prompts else None
    if validation_cond is not None and family.condition_image:
        validation_cond.update(encode_condition(load_validation_images(args)))
    family.free_encoders(pipe)
    return TrainingData(samples, to_device(samples.negative, run.device), validation_cond)


def build_networks(run: Run, teacher: Teacher) -> Networks:
    """Student and fake score in the chosen layout (full copies, or LoRA adapters over a frozen
    base) trained in fp32, gradient checkpointing, and the GAN discriminator on the teacher's
    features when the recipe has a GAN branch."""
    args, family = run.args, teacher.family
    # One network per role; a two-expert teacher (Wan 2.2 A14B) makes each a two-expert one.
    wrapped = family.wrap_transformers(teacher.transformers)
    wrapped.requires_grad_(False)
    # Under FSDP2 the networks are built on the meta device on every rank; the main process's
    # host copy of the teacher's weights gives their initial values, loaded after sharding.
    source = take_host_transformers(teacher.pipe)
    host = family.wrap_transformers(source) if source is not None else None
    lora = LoraSettings(
        rank=args.rank,
        alpha=args.lora_alpha,
        dropout=args.lora_dropout,
        init=args.lora_init,
        target_modules=args.lora_target_modules,
    )
    if args.quantize_base not in (None, "none") and source is not None:
        raise UserError(
            f"--quantize_base {args.quantize_base} is not supported under FSDP2 yet",
            fix="drop --quantize_base, or train on one GPU / with DDP",
        )
    quantize_base(wrapped, args.quantize_base)  # before the adapters: peft wraps int8 weights
    nets = build_dmd_networks(wrapped, args.layout, lora, source=host)
    del source, host
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
    if args.compile_blocks:
        from ..plugins.common import compile_blocks

        for net in (nets.student, nets.fake_score, nets.teacher):
            compile_blocks(net)  # blocks shared between networks compile once
    discriminator = None
    if run.cfg.gan_loss_weight_gen > 0:
        family.attach_feature_capture(nets.teacher)
        discriminator = family.build_discriminator(nets.teacher).to(run.device)
    return Networks(nets, discriminator, teacher_guidance(run, wrapped))


def teacher_guidance(run: Run, teacher: torch.nn.Module) -> Callable | None:
    """Per-sample CFG scales of a two-expert teacher (its ``guidance_scales``): the recipe's
    ``guidance_scale`` for the high-noise expert, ``--guidance_scale_2`` (default: the same)
    for the low-noise one; ``None`` for one expert or with CFG off."""
    scales = getattr(teacher, "guidance_scales", None)
    high, low = run.cfg.guidance_scale, run.args.guidance_scale_2
    if scales is None or high is None:
        return None

    def guidance_scale_fn(t: torch.Tensor) -> torch.Tensor:
        return scales(t, high, low)

    return guidance_scale_fn


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

    kernel = args.adam_implementation
    if kernel == "auto":
        fusable = run.device.type in ("cpu", "cuda") and not is_fsdp2(run.accelerator)
        kernel = "fused" if fusable else "default"
    adam_kernel = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kernel]

    def make_optimizer(role: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return optimizer_class(args.optimizer)(
            params,
            lr=learning_rates[role],
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            **(adam_kernel if args.optimizer == "adamw" else {}),
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
        guidance_scale_fn=networks.guidance_scale_fn,
    )
    # Noise and timesteps drawn for the global batch, this rank's rows kept: N ranks train on
    # exactly what one process would (every rank is seeded alike).
    dmd.draw_for_global_batch(run.accelerator.process_index, run.accelerator.num_processes)
    monitor = CollapseMonitor() if run.args.monitor_every > 0 else None
    return Trainer(prepared, dmd, monitor=monitor)


def resume(run: Run, trainer: Trainer, num_samples: int, family: str | None = None) -> Progress:
    """The data order and iteration counter, restored with the networks, optimizers, schedules,
    EMA and random generators from ``--resume_from_checkpoint`` when given (on any number of
    ranks, the global batch unchanged; :func:`setup_run` has compared the checkpoint's
    ``run.json`` with this run). Writes this run's ``run.json``; a resumed run's
    ``logs/losses.jsonl`` is cut back to the checkpoint."""
    args, accelerator = run.args, run.accelerator
    progress = Progress(ResumableRandomSampler(num_samples, seed=args.seed), Counter())
    # Building the networks draws differently per rank (weights on the meta device draw
    # nothing): the training stream starts from the seed again, alike on every rank.
    set_seed(args.seed)
    record = run_record(run, family)
    path = resolve_resume(resume_target(args), run.output_dir)
    if path is not None:
        try:
            step = load_checkpoint(run, trainer, progress, path)
        except _DAMAGED_FILE_ERRORS as err:
            # Truncated or foreign files (the preflight checks headers only).
            raise UserError(
                f"cannot resume from {str(path)!r}: {err}",
                fix="resume from another checkpoint, or delete this one",
            ) from err
        if run.is_main:
            truncate_loss_log(run.log_dir / "losses.jsonl", step)
        logger.info("Resumed from %s at iteration %d", path, step)
    else:
        if args.resume_from_checkpoint == "latest":
            logger.info("No complete checkpoint in %s: starting from scratch", run.output_dir)
        if run.is_main:  # an earlier run's rows in this folder would read as this run's
            truncate_loss_log(run.log_dir / "losses.jsonl", 0)
    if run.is_main:
        write_run_record(run.output_dir, record)
    accelerator.wait_for_everyone()
    return progress
