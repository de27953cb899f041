"""Command-line arguments of ``train_dmd2.py`` (flag names and layout of the diffusers examples).

Example::

    from fastgen_diffusers.training.args import parse_args

    args = parse_args(["--pretrained_model_name_or_path", "path/to/sd3",
                       "--recipe", "general/distillation/dmd2_sd35_medium",
                       "--dataset_name", "prompts.jsonl", "--max_train_steps", "1000"])
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

from ..loader import builtin_recipes
from ..lora import LAYOUTS
from .errors import UserError

__all__ = [
    "SECRET_ARGUMENTS",
    "TrainingArguments",
    "build_parser",
    "check_arguments",
    "parse_args",
    "parse_recipe_overrides",
]


# Arguments never written anywhere (files, tracker configs, the Hub).
SECRET_ARGUMENTS = frozenset({"hub_token"})


@dataclass(frozen=True)
class TrainingArguments:
    """The parsed command line, typed: what the training phases read.

    One field per flag of :func:`build_parser` (same names; defaults live in the parser), after
    :func:`parse_args` has checked and normalised them (``recipe_overrides`` as a nested dict,
    ``lora_init`` as ``True`` / ``False`` or a peft init name).

    Example::

        args = parse_args(["--pretrained_model_name_or_path", "path/to/sd3", "--recipe", "r.yaml",
                           "--dataset_name", "prompts.jsonl"])
        args.learning_rate       # 1e-05
        args.layout              # "full" (or the LoRA layout with --use_lora)
    """

    # model
    pretrained_model_name_or_path: str
    revision: str | None
    variant: str | None
    recipe: str
    recipe_overrides: dict[str, Any]
    flux_guidance: float | None
    guidance_scale_2: float | None
    max_sequence_length: int | None
    # data
    dataset_name: str | None
    dataset_config_name: str | None
    train_data_dir: str | None
    caption_column: str
    image_column: str | None
    video_column: str | None
    max_train_samples: int | None
    negative_prompt: str
    resolution: int | None
    height: int | None
    width: int | None
    num_frames: int | None
    embedding_cache_dir: str | None
    cache_dir: str | None
    allow_absolute_media_paths: bool
    # training
    output_dir: str
    seed: int
    train_batch_size: int
    max_train_steps: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    mixed_precision: str | None
    learning_rate: float
    fake_score_learning_rate: float | None
    discriminator_learning_rate: float | None
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_epsilon: float
    max_grad_norm: float
    lr_scheduler: str
    lr_warmup_steps: int
    ddp_timeout: int
    compile_blocks: bool
    adam_implementation: str
    save_dtype: str | None
    upcast_before_saving: bool
    allow_tf32: bool
    overwrite_output_dir: bool
    optimizer: str
    quantize_base: str
    dry_run: bool
    # LoRA
    use_lora: bool
    lora_layout: str
    rank: int
    lora_alpha: float | None
    lora_dropout: float
    lora_init: bool | str
    lora_target_modules: list[str] | None
    teacher_lora: str | None
    teacher_lora_scale: float
    # checkpoints, validation, logging
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    validation_prompts: list[str] | None
    validation_image: list[str] | None
    validation_steps: int
    teacher_validation_steps: int
    report_to: str
    logging_dir: str
    tracker_project_name: str
    monitor_every: int
    allow_resume_changes: bool
    # Hub
    push_to_hub: bool
    hub_model_id: str | None
    hub_token: str | None
    hub_private: bool
    push_checkpoints_to_hub: bool

    @property
    def layout(self) -> str:
        """``"full"``, or the LoRA layout when ``--use_lora`` is given."""
        return self.lora_layout if self.use_lora else "full"

    @property
    def size(self) -> tuple[int | None, int | None]:
        """``(height, width)`` of the training media (``--height``/``--width`` over
        ``--resolution``); ``None`` for a side the user left to the teacher's default, which
        ``load_teacher`` fills in (``Family.default_size``)."""
        return (self.height or self.resolution, self.width or self.resolution)

    def public_dict(self) -> dict[str, Any]:
        """The arguments without secrets (``hub_token``): what may be written to a file, a
        tracker config or the Hub."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in SECRET_ARGUMENTS
        }

    def replace(self, **changes: Any) -> TrainingArguments:
        """A copy with ``changes`` applied (the arguments are frozen)."""
        return dataclasses.replace(self, **changes)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's default in its help (unless the text already says what the default is, or
    there is none), and the epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


class _ListRecipes(argparse.Action):
    """``--list_recipes``: print the built-in recipes and exit (no other flag needed)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any):
        super().__init__(option_strings, dest=dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print("\n".join(builtin_recipes()))
        parser.exit(0)


def _epilog() -> str:
    recipes = "\n".join(f"  {name}" for name in builtin_recipes()) or "  (none installed)"
    return f"built-in recipes (--recipe NAME, or a path to a YAML file):\n{recipes}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "DMD2 step distillation of a diffusers teacher (Wan, SD3, Flux, Qwen-Image) into a "
            "1-4 step student that runs in the stock diffusers pipeline."
        ),
        epilog=_epilog(),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--list_recipes", action=_ListRecipes, help="Print the built-in recipes and exit."
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Teacher pipeline: a Hub id or a local folder (diffusers layout).",
    )
    model.add_argument(
        "--revision",
        type=str,
        default=None,
        help="Revision (branch, tag or commit) of the teacher on the Hub.",
    )
    model.add_argument(
        "--variant",
        type=str,
        default=None,
        help="Variant of the teacher's weight files, e.g. 'fp16'.",
    )
    model.add_argument(
        "--recipe",
        type=str,
        required=True,
        help="DMD2 recipe: a built-in name such as "
        "'general/distillation/dmd2_sd35_medium' or a path to a YAML file.",
    )
    model.add_argument(
        "--recipe_overrides",
        type=str,
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Override recipe fields, e.g. guidance_scale=4.5 "
        "sample_t_cfg.shift=3 ema.decay=0.999 (values are parsed as YAML).",
    )
    model.add_argument(
        "--flux_guidance",
        type=float,
        default=None,
        help="Flux only: the embedded guidance value the student learns at (default: 3.5 for "
        "guidance-distilled checkpoints such as FLUX.1-dev).",
    )
    model.add_argument(
        "--guidance_scale_2",
        type=float,
        default=None,
        help="Two-expert Wan 2.2 A14B teachers only: the teacher's CFG scale for the low-noise "
        "expert (transformer_2), as WanPipeline's guidance_scale_2; the recipe's guidance_scale "
        "is the high-noise expert's (default: the recipe's guidance_scale for both).",
    )
    model.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="Maximum prompt length in tokens (default: the pipeline's).",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A Hub dataset name, a local dataset folder, an image folder with "
        "metadata.jsonl, or a .jsonl / .txt file of prompts.",
    )
    data.add_argument(
        "--dataset_config_name",
        type=str,
        default=None,
        help="The dataset's configuration name, if it has several.",
    )
    data.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A local folder of training data (instead of --dataset_name).",
    )
    data.add_argument(
        "--caption_column", type=str, default="text", help="Column holding the prompts."
    )
    data.add_argument(
        "--image_column",
        type=str,
        default=None,
        help="Column holding images (needed for the GAN branch and for multi-step "
        "students without backward simulation).",
    )
    data.add_argument(
        "--video_column", type=str, default=None, help="Column holding videos (video families)."
    )
    data.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Use only the first N samples of the dataset.",
    )
    data.add_argument(
        "--negative_prompt",
        type=str,
        default="",
        help="Negative prompt of the teacher's classifier-free guidance.",
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Square training resolution in pixels (images are resized and center-cropped); "
        "default: the teacher pipeline's own size (Wan: 480x832, SD3 / Flux: 1024).",
    )
    data.add_argument("--height", type=int, default=None, help="Height (overrides --resolution).")
    data.add_argument("--width", type=int, default=None, help="Width (overrides --resolution).")
    data.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="Frames per video sample (video families; default: the pipeline's).",
    )
    data.add_argument(
        "--embedding_cache_dir",
        type=str,
        default=None,
        help="Where the prompt embeddings and latents are cached (default: <output_dir>/cache).",
    )
    data.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="Hugging Face download cache for the teacher and the dataset, as in the diffusers "
        "examples (default: the Hugging Face cache, HF_HOME).",
    )
    data.add_argument(
        "--allow_absolute_media_paths",
        action="store_true",
        help="Let a local dataset's image/video column name absolute paths anywhere on this "
        "machine. Without it every media path must resolve inside the dataset's folder; a Hub "
        "dataset never reads local files outside its own download.",
    )

    train = parser.add_argument_group("training")
    train.add_argument(
        "--output_dir",
        type=str,
        default="dmd2-student",
        help="Where checkpoints, validation images and the exported student go.",
    )
    train.add_argument("--seed", type=int, default=0, help="Seed for reproducible training.")
    train.add_argument("--train_batch_size", type=int, default=1, help="Batch size per device.")
    train.add_argument(
        "--max_train_steps",
        type=int,
        default=1000,
        help="DMD2 iterations (each one student or one fake-score/discriminator "
        "update, alternating as the recipe's student_update_freq says).",
    )
    train.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-batches accumulated per update.",
    )
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward to save memory.",
    )
    train.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision (default: accelerate's config). Frozen weights are "
        "held in this dtype.",
    )
    train.add_argument("--learning_rate", type=float, default=1e-5, help="Student learning rate.")
    train.add_argument(
        "--fake_score_learning_rate",
        type=float,
        default=None,
        help="Fake-score learning rate (default: --learning_rate).",
    )
    train.add_argument(
        "--discriminator_learning_rate",
        type=float,
        default=None,
        help="Discriminator learning rate (default: --learning_rate).",
    )
    train.add_argument("--adam_beta1", type=float, default=0.0, help="AdamW beta1 (DMD2: 0).")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    train.add_argument("--adam_weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    train.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    train.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="Gradient clipping norm (0 disables clipping).",
    )
    train.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help="'constant', 'constant_with_warmup', 'linear', 'cosine', ... "
        "(diffusers.optimization.get_scheduler).",
    )
    train.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=0,
        help="Warm-up updates of the learning-rate schedule.",
    )
    train.add_argument(
        "--ddp_timeout",
        type=int,
        default=1800,
        help="Seconds a process waits for the others at a collective before the run fails "
        "(torch.distributed's process-group timeout).",
    )
    # Speed options (benchmarks/speed_options.py measures each).
    train.add_argument(
        "--compile_blocks",
        action="store_true",
        help="torch.compile each transformer block of student, fake score and teacher "
        "(regional compilation; pays off on GPUs, not on small CPU models).",
    )
    train.add_argument(
        "--adam_implementation",
        choices=("auto", "default", "foreach", "fused"),
        default="auto",
        help="AdamW kernels: 'fused' (one kernel over all parameters), 'foreach' "
        "(multi-tensor), 'default' (torch's choice: a per-tensor loop on CPU). 'auto': fused on "
        "CPU and CUDA (5x faster than the loop on CPU), torch's choice under FSDP2.",
    )
    train.add_argument(
        "--save_dtype",
        type=str,
        default=None,
        choices=["fp32", "fp16", "bf16"],
        help="dtype of the exported student and of each checkpoint's loadable copy (default: "
        "the teacher's dtype, i.e. --mixed_precision's: a bf16 run saves bf16 weights).",
    )
    train.add_argument(
        "--upcast_before_saving",
        action="store_true",
        help="Save the trained weights in fp32 (instead of the teacher's dtype), as diffusers' "
        "DreamBooth LoRA scripts do.",
    )
    train.add_argument(
        "--allow_tf32",
        action="store_true",
        help="Allow TF32 matmuls and cuDNN convolutions on Ampere+ GPUs (faster, slightly less "
        "precise; no effect on CPU).",
    )
    train.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="When --output_dir holds another run's export (another layout or base model), "
        "remove that export (weights, scheduler, README.md, validation images) and start; "
        "checkpoints are kept.",
    )
    train.add_argument(
        "--optimizer",
        type=str,
        default="adamw",
        choices=["adamw", "adamw8bit"],
        help="adamw8bit: torchao's 8-bit AdamW (2 bytes of state per trained parameter, not 8).",
    )
    train.add_argument(
        "--quantize_base",
        type=str,
        default="none",
        choices=["none", "int8", "fp8", "nf4"],
        help="Store the frozen base of the LoRA layouts quantized (torchao; fp8 needs a GPU "
        "with fp8 support, nf4 is refused: peft trains LoRA over int8 torchao weights only).",
    )
    train.add_argument(
        "--dry_run",
        action="store_true",
        help="Print the per-GPU memory plan (python -m fastgen_diffusers.plan) and exit.",
    )

    lora = parser.add_argument_group("LoRA")
    lora.add_argument(
        "--use_lora", action="store_true", help="Train LoRA adapters instead of full weights."
    )
    lora.add_argument(
        "--lora_layout",
        type=str,
        default="shared_lora",
        choices=[name for name in LAYOUTS if name != "full"],
        help="shared_lora: one copy of the weights for teacher, student and fake "
        "score (least memory); separate_lora: one frozen copy per LoRA; "
        "student_lora: LoRA student with a full fake score.",
    )
    lora.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    lora.add_argument(
        "--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank)."
    )
    lora.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout.")
    lora.add_argument(
        "--lora_init",
        type=str,
        default="true",
        help="peft's init_lora_weights: true (B = 0), gaussian, pissa, ...",
    )
    lora.add_argument(
        "--lora_target_modules",
        type=str,
        nargs="*",
        default=None,
        help="Module-name suffixes to adapt, space- or comma-separated (to_q to_k, or "
        "to_q,to_k; default: the family's attention projections and feed-forwards).",
    )
    lora.add_argument(
        "--teacher_lora",
        type=str,
        default=None,
        help="A diffusers-format LoRA (a .safetensors file, a folder or a Hub repo id, e.g. a "
        "style) fused into the teacher: the student distills base + this LoRA. LoRA students "
        "are also exported merged with it (merged_lora_weights.safetensors).",
    )
    lora.add_argument(
        "--teacher_lora_scale",
        type=float,
        default=1.0,
        help="The scale of --teacher_lora (pipe.set_adapters([...], [scale])).",
    )

    logs = parser.add_argument_group("checkpoints, validation, logging")
    logs.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint every N iterations.",
    )
    logs.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep at most N checkpoints (oldest removed).",
    )
    logs.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="A checkpoint folder, a checkpoint name in --output_dir (checkpoint-500), or "
        "'latest' for the newest complete one there (none yet: start from scratch).",
    )
    logs.add_argument(
        "--validation_prompts",
        type=str,
        nargs="*",
        default=None,
        help="Prompts sampled by the student every --validation_steps.",
    )
    logs.add_argument(
        "--validation_image",
        type=str,
        nargs="*",
        default=None,
        help="Image-to-video teachers: the first frame of each validation video, one image "
        "(file or URL) per --validation_prompts prompt, or one for all of them.",
    )
    logs.add_argument(
        "--validation_steps", type=int, default=500, help="Validate every N iterations."
    )
    logs.add_argument(
        "--teacher_validation_steps",
        type=int,
        default=28,
        help="Steps of the teacher's reference grid, drawn once at the start.",
    )
    logs.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help="Trackers: 'tensorboard', 'wandb', 'all' or 'none'.",
    )
    logs.add_argument(
        "--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir."
    )
    logs.add_argument(
        "--tracker_project_name",
        type=str,
        default="dmd2",
        help="Project name of the trackers (the wandb project, the tensorboard sub-folder).",
    )
    logs.add_argument(
        "--monitor_every",
        type=int,
        default=50,
        help="Collapse and saturation monitors (fastgen_diffusers.monitors): sample diversity "
        "per prompt, latent statistics and saturation, VSD weight, gradient norm and fake-score "
        "loss trend, logged on the first student update of every N iterations, with one warning "
        "per diagnostic that stays past its threshold (0 disables them).",
    )
    logs.add_argument(
        "--allow_resume_changes",
        action="store_true",
        help="Resume even when the recipe, layout, family, model or global batch differ from "
        "the checkpoint's run.json (the differences are printed); without it they are refused.",
    )

    hub = parser.add_argument_group("Hub")
    hub.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the exported student (not checkpoints or logs) to the Hub.",
    )
    hub.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="Repository id, namespace/name (default: the output folder's name under the "
        "login's namespace). The login and the repo are checked before the teacher loads.",
    )
    hub.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help="Hub token (default: HF_TOKEN or the cached `hf auth login`, preferred: a token on "
        "the command line can leak; refused with --report_to wandb).",
    )
    hub.add_argument("--hub_private", action="store_true", help="Create a private repository.")
    hub.add_argument(
        "--push_checkpoints_to_hub",
        action="store_true",
        help="With --push_to_hub: also upload each completed checkpoint's weights (safetensors, "
        "no optimizer state) to a checkpoint-<N>/ folder of the repo; a failed upload warns "
        "and training goes on.",
    )
    return parser


def parse_recipe_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "b.c=x"]`` -> ``{"a": 1, "b": {"c": "x"}}`` (values parsed as YAML)."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--recipe_overrides entry {item!r} must look like KEY=VALUE")
        target = result
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"--recipe_overrides {key!r}: {part!r} is not a mapping")
        target[leaf] = yaml.safe_load(raw)
    return result


def _require(ok: bool, flag: str, value: Any, expected: str, fix: str | None = None) -> None:
    if not ok:
        raise UserError(f"{flag} {value!r} is out of range", expected=expected, fix=fix)


def check_arguments(args: TrainingArguments | argparse.Namespace) -> None:
    """Check every flag whose valid values are known without reading a file; raises
    :class:`~fastgen_diffusers.training.errors.UserError` naming the flag, its value and what
    was expected."""
    at_least_one = [
        "train_batch_size",
        "max_train_steps",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "validation_steps",
        "teacher_validation_steps",
        "rank",
    ]
    optional_at_least_one = [
        "resolution",
        "max_train_samples",
        "checkpoints_total_limit",
        "height",
        "width",
        "num_frames",
        "max_sequence_length",
    ]
    for name in at_least_one + optional_at_least_one:
        value = getattr(args, name)
        if value is None and name in optional_at_least_one:
            continue
        if value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if args.monitor_every < 0:
        raise UserError(
            f"--monitor_every must be >= 0 (0 disables the monitors), got {args.monitor_every}"
        )
    if args.lr_warmup_steps < 0:
        raise UserError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    for name in ("learning_rate", "fake_score_learning_rate", "discriminator_learning_rate"):
        value = getattr(args, name)
        if value is not None:
            _require(math.isfinite(value) and value > 0, f"--{name}", value, "a value > 0")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(args, name)
        _require(0 <= value < 1, f"--{name}", value, "a value in [0, 1)")
    _require(
        math.isfinite(args.adam_epsilon) and args.adam_epsilon > 0,
        "--adam_epsilon",
        args.adam_epsilon,
        "a value > 0 (AdamW divides by it)",
    )
    _require(
        math.isfinite(args.adam_weight_decay) and args.adam_weight_decay >= 0,
        "--adam_weight_decay",
        args.adam_weight_decay,
        "a value >= 0",
    )
    _require(
        math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0,
        "--max_grad_norm",
        args.max_grad_norm,
        "a value >= 0 (0 disables clipping)",
    )
    _require(0 <= args.lora_dropout < 1, "--lora_dropout", args.lora_dropout, "a value in [0, 1)")
    if args.lora_alpha is not None:
        _require(args.lora_alpha > 0, "--lora_alpha", args.lora_alpha, "a value > 0")
    if args.guidance_scale_2 is not None:
        _require(
            math.isfinite(args.guidance_scale_2) and args.guidance_scale_2 >= 1,
            "--guidance_scale_2",
            args.guidance_scale_2,
            "a value >= 1 (1.0 = conditional only; Wan2.2-T2V-A14B's pipeline example: 3.0)",
        )
    _check_teacher_lora(args)
    if args.flux_guidance is not None:
        _require(
            math.isfinite(args.flux_guidance) and args.flux_guidance >= 0,
            "--flux_guidance",
            args.flux_guidance,
            "a value >= 0 (FLUX.1-dev: 3.5)",
        )
    for i, prompt in enumerate(args.validation_prompts or []):
        if not prompt.strip():
            raise UserError(
                f"--validation_prompts: prompt {i + 1} of {len(args.validation_prompts)} is "
                f"empty ({prompt!r})",
                expected="non-empty prompts",
                fix="remove it or write a prompt",
            )
    _check_validation_images(args)
    for name in args.lora_target_modules or []:
        if not name:
            raise UserError(
                f"--lora_target_modules {args.lora_target_modules!r} holds an empty name",
                expected="module-name suffixes such as to_q to_k (or to_q,to_k)",
            )
    if args.upcast_before_saving and args.save_dtype not in (None, "fp32"):
        raise UserError(
            f"--upcast_before_saving saves fp32 weights, but --save_dtype is {args.save_dtype}",
            expected="one of the two (--save_dtype fp32 is the same as --upcast_before_saving)",
        )
    if args.hub_model_id is not None and not args.hub_model_id.strip():
        raise UserError("--hub_model_id is empty", expected="a repository id such as me/student")


def _check_validation_images(args: TrainingArguments | argparse.Namespace) -> None:
    """One ``--validation_image`` per validation prompt (or one for all); local files exist."""
    images = args.validation_image
    if not images:
        return
    prompts = args.validation_prompts or []
    if not prompts:
        raise UserError(
            "--validation_image is given without --validation_prompts",
            expected="validation prompts, each generated from its --validation_image",
        )
    if len(images) not in (1, len(prompts)):
        raise UserError(
            f"--validation_image gives {len(images)} images for {len(prompts)} "
            "--validation_prompts",
            expected="one image per prompt, or one image for all of them",
        )
    for image in images:
        if not image.startswith(("http://", "https://")) and not os.path.isfile(
            os.path.expanduser(image)
        ):
            raise UserError(
                f"--validation_image {image!r} is not a file",
                expected="an image file (png, jpg, ...) or an http(s) URL",
            )


def _check_teacher_lora(args: TrainingArguments | argparse.Namespace) -> None:
    """``--teacher_lora`` names an existing file or folder, or looks like a Hub repo id;
    ``--teacher_lora_scale`` is finite."""
    _require(
        math.isfinite(args.teacher_lora_scale),
        "--teacher_lora_scale",
        args.teacher_lora_scale,
        "a finite number (1.0: the LoRA as trained)",
    )
    path = args.teacher_lora
    if path is None:
        return
    if os.path.exists(os.path.expanduser(path)):
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    # Hub ids are "name" or "owner/name"; a path-like value that does not exist is a typo.
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1
    looks_local = looks_local or path.endswith((".safetensors", ".bin", ".pt"))
    try:
        validate_repo_id(path)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise UserError(
            f"--teacher_lora {path!r} does not exist",
            expected="a diffusers LoRA file (.safetensors), a folder holding "
            "pytorch_lora_weights.safetensors, or a Hub repo id such as owner/style-lora",
        )


def _split_commas(names: list[str] | None) -> list[str] | None:
    """``["to_q,to_k", "to_v"]`` -> ``["to_q", "to_k", "to_v"]`` (both forms are accepted)."""
    if names is None:
        return None
    parts = [part.strip() for name in names for part in name.split(",")]
    if not all(parts):
        raise UserError(
            f"--lora_target_modules {' '.join(names)!r} holds an empty name",
            expected="module-name suffixes such as to_q to_k (or to_q,to_k)",
        )
    return parts


def parse_args(argv: list[str] | None = None) -> TrainingArguments:
    """Parse and check ``argv`` (default: ``sys.argv[1:]``); a bad flag exits with status 2 and
    a message naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None and not args.dry_run:
        parser.error("give --dataset_name or --train_data_dir")
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error(
            f"give --dataset_name or --train_data_dir, not both (got {args.dataset_name!r} and "
            f"{args.train_data_dir!r})"
        )
    if args.validation_prompts == []:
        args.validation_prompts = None
    if args.validation_image == []:
        args.validation_image = None
    try:
        args.lora_target_modules = _split_commas(args.lora_target_modules)
        check_arguments(args)
        args.recipe_overrides = parse_recipe_overrides(args.recipe_overrides)
    except ValueError as err:
        parser.error(str(err))
    lora_init = args.lora_init.lower()
    args.lora_init = {"true": True, "false": False}.get(lora_init, args.lora_init)
    return TrainingArguments(**vars(args))
