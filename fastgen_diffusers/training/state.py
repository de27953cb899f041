"""The small typed state the training phases share (:mod:`~fastgen_diffusers.training.loop`).

Each phase of :func:`~fastgen_diffusers.training.loop.train` returns one of these and later
phases read them; none holds behaviour beyond a few derived properties.

Example::

    run = setup_run(args)                  # Run: arguments, recipe, accelerator, output folder
    teacher = load_teacher(run)            # Teacher: family, diffusers pipeline, latent shape
    data = cache_data(run, teacher)        # TrainingData: cached embeddings and latents
    nets = build_networks(run, teacher)    # Networks: student, fake score, teacher, ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..config import DMDConfig
from ..lora import DMDNetworks
from ..methods import DMDPipeline
from ..monitors import CollapseMonitor
from .args import TrainingArguments
from .cache import CachedDataset
from .data_order import ResumableRandomSampler
from .parallel import PreparedNetworks

__all__ = ["Counter", "Networks", "Progress", "Run", "Teacher", "Trainer", "TrainingData"]


@dataclass
class Run:
    """What every phase reads: arguments, recipe, accelerator and the run's fixed choices."""

    args: TrainingArguments
    cfg: DMDConfig
    accelerator: Accelerator
    output_dir: Path
    weight_dtype: torch.dtype  # the frozen weights' and the data's dtype (mixed precision)
    t_list: list[float]  # the student's rungs, ending at 0
    hub_repo_id: str | None = None  # --push_to_hub: the repo, created before the teacher loads

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def global_batch(self) -> int:
        return self.args.train_batch_size * self.accelerator.num_processes

    @property
    def rows(self) -> slice:
        """This rank's rows of the global batch: its data, noise and timesteps
        (``DMDPipeline.draw_for_global_batch``)."""
        rank, batch = self.accelerator.process_index, self.args.train_batch_size
        return slice(rank * batch, (rank + 1) * batch)

    @property
    def log_dir(self) -> Path:
        return self.output_dir / self.args.logging_dir


@dataclass
class Teacher:
    """The teacher's diffusers pipeline, its family and the latent shape it trains at."""

    family: Any  # a plugins Family
    pipe: Any  # the diffusers pipeline (transformer, VAE, scheduler; encoders freed later)
    latent_shape: tuple[int, ...]

    @property
    def transformers(self) -> list[nn.Module]:
        """The pipeline's denoisers in ``family.transformer_components`` order: ``[transformer]``,
        or Wan 2.2 A14B's ``[transformer (high noise), transformer_2 (low noise)]``."""
        return [getattr(self.pipe, name) for name in self.family.transformer_components]

    @property
    def num_experts(self) -> int:
        return len(self.family.transformer_components)


@dataclass
class TrainingData:
    """The cached training set and the conditioning the loop and validation reuse."""

    samples: CachedDataset
    negative: dict[str, torch.Tensor]  # the negative prompt, batch 1, on the device
    validation_cond: dict[str, torch.Tensor] | None  # one row per validation prompt, on CPU


@dataclass
class Networks:
    """The unprepared networks of the chosen layout and the GAN discriminator (if any)."""

    nets: DMDNetworks
    discriminator: nn.Module | None
    # Per-sample teacher CFG scales of a two-expert teacher (t [B] -> scales [B]), else None.
    guidance_scale_fn: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Trainer:
    """The prepared networks with their optimizers, and the DMD2 losses over them."""

    prepared: PreparedNetworks
    dmd: DMDPipeline
    monitor: CollapseMonitor | None = None  # --monitor_every > 0

    @property
    def student(self) -> nn.Module:
        return self.prepared.student

    def roles(self, student_turn: bool) -> list[str]:
        """The networks one iteration updates: the student, or the fake score (and the
        discriminator, trained alongside it)."""
        if student_turn:
            return ["student"]
        return ["fake_score"] + (["discriminator"] if self.prepared.discriminator else [])

    def module(self, role: str) -> nn.Module:
        return getattr(self.prepared, role)


class Counter:
    """The iteration counter, saved with every checkpoint (as JSON)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


@dataclass
class Progress:
    """Where the run stands: the iteration and the position in the data order."""

    data_order: ResumableRandomSampler
    counter: Counter

    @property
    def step(self) -> int:
        return self.counter.step
