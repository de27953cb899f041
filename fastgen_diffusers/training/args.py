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
from dataclasses import dataclass
from typing import Any

import yaml

from ..lora import LAYOUTS

__all__ = [
    "SECRET_ARGUMENTS",
    "TrainingArguments",
    "build_parser",
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
    resolution: int
    height: int | None
    width: int | None
    num_frames: int | None
    cache_dir: str | None
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
    # checkpoints, validation, logging
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    validation_prompts: list[str] | None
    validation_steps: int
    teacher_validation_steps: int
    report_to: str
    logging_dir: str
    # Hub
    push_to_hub: bool
    hub_model_id: str | None
    hub_token: str | None
    hub_private: bool

    @property
    def layout(self) -> str:
        """``"full"``, or the LoRA layout when ``--use_lora`` is given."""
        return self.lora_layout if self.use_lora else "full"

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of the training media (``--height``/``--width`` over
        ``--resolution``)."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=(
            "DMD2 step distillation of a diffusers teacher (Wan, SD3, Flux, Qwen-Image) into a "
            "1-4 step student that runs in the stock diffusers pipeline."
        )
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
        default=1024,
        help="Square training resolution in pixels (images are resized and center-cropped).",
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
        "--cache_dir",
        type=str,
        default=None,
        help="Where the prompt embeddings and latents are cached (default: <output_dir>/cache).",
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
        help="Module-name suffixes to adapt (default: the family's attention "
        "projections and feed-forwards).",
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
        help="A checkpoint folder, or 'latest' for the newest complete one in --output_dir.",
    )
    logs.add_argument(
        "--validation_prompts",
        type=str,
        nargs="*",
        default=None,
        help="Prompts sampled by the student every --validation_steps.",
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
        help="Repository id (default: the output folder's name).",
    )
    hub.add_argument(
        "--hub_token", type=str, default=None, help="Hub token (default: the logged-in one)."
    )
    hub.add_argument("--hub_private", action="store_true", help="Create a private repository.")
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


def parse_args(argv: list[str] | None = None) -> TrainingArguments:
    """Parse and check ``argv`` (default: ``sys.argv[1:]``); a bad flag exits with a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_data_dir is None and not args.dry_run:
        parser.error("give --dataset_name or --train_data_dir")
    positive = [
        "train_batch_size",
        "max_train_steps",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "validation_steps",
        "rank",
        "resolution",
    ]
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.max_grad_norm < 0:
        parser.error(f"--max_grad_norm must be >= 0, got {args.max_grad_norm}")
    try:
        args.recipe_overrides = parse_recipe_overrides(args.recipe_overrides)
    except ValueError as err:
        parser.error(str(err))
    lora_init = args.lora_init.lower()
    args.lora_init = {"true": True, "false": False}.get(lora_init, args.lora_init)
    return TrainingArguments(**vars(args))
