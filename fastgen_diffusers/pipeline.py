"""Base class holding the networks of a distillation method."""

from __future__ import annotations

import torch
from torch import nn

from .config import DistillationConfig
from .flow_matching import sample_timesteps

__all__ = ["DistillationPipeline"]


class DistillationPipeline:
    """Hold student/teacher references and expose shared utilities.

    The student's lifecycle (``train()`` / ``eval()``, ``requires_grad_``, sharding, optimizer)
    stays with the caller; the teacher is frozen here (``eval()`` + ``requires_grad_(False)``).

    Example::

        pipe = DistillationPipeline(student, teacher, DistillationConfig())
        t = pipe.sample_timesteps(8)
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillationConfig) -> None:
        if not isinstance(config, DistillationConfig):
            raise TypeError(
                f"config must be a DistillationConfig (or DMDConfig), got {type(config).__name__}"
            )
        for name, module in (("student", student), ("teacher", teacher)):
            if not callable(module):
                raise TypeError(f"{name} must be a callable nn.Module, got {type(module).__name__}")
        self.student = student
        self.teacher = teacher
        self.config = config
        teacher.eval()
        teacher.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """Device of the first student parameter (CPU when it has none)."""
        param = next(iter(self.student.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the first student parameter (float32 when it has none)."""
        param = next(iter(self.student.parameters()), None)
        return param.dtype if param is not None else torch.float32

    def sample_timesteps(
        self,
        n: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Sample ``n`` training timesteps according to ``config.sample_t_cfg``."""
        return sample_timesteps(
            n,
            self.config.sample_t_cfg,
            device=device if device is not None else self.device,
            dtype=dtype,
        )
