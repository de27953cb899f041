"""A 2-D toy for DMD2: an 8-mode Gaussian mixture with an exact rectified-flow teacher.

Because the teacher is analytic (the exact posterior mean ``E[x0 | x_t]`` of the mixture), the
toy isolates the method: whatever the student gets wrong, DMD2 got wrong.

Example::

    from fastgen_diffusers.toys import GaussianMixture, distill_one_step

    mixture = GaussianMixture()
    student = distill_one_step(mixture, iterations=2000)
    samples = mixture.sample_student(student, 4000)
    print(mixture.sliced_wasserstein(samples), mixture.mode_shares(samples))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import DMDConfig
from .flow_matching import add_noise, sample_timesteps
from .methods import DMDPipeline
from .sampling import sample_student

__all__ = ["GaussianMixture", "MixtureTeacher", "MLPDenoiser", "distill_one_step"]


class GaussianMixture:
    """``num_modes`` isotropic Gaussians of std ``std`` evenly spaced on a circle."""

    def __init__(self, num_modes: int = 8, radius: float = 2.0, std: float = 0.08) -> None:
        angles = [2 * math.pi * k / num_modes for k in range(num_modes)]
        self.modes = torch.tensor([[radius * math.cos(a), radius * math.sin(a)] for a in angles])
        self.std = std

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.randint(0, len(self.modes), (n,), generator=generator)
        return self.modes[k] + self.std * torch.randn(n, 2, generator=generator)

    def teacher(self) -> MixtureTeacher:
        return MixtureTeacher(self.modes, self.std)

    def sample_student(self, student: nn.Module, n: int, seed: int = 123) -> torch.Tensor:
        noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
        return sample_student(student, noise, [0.999, 0.0])

    def sliced_wasserstein(
        self, samples: torch.Tensor, reference: torch.Tensor | None = None, projections: int = 256
    ) -> float:
        """Mean 1-D Wasserstein-1 distance over random directions to ``reference`` (default:
        as many fresh data samples, fixed seed)."""
        if reference is None:
            reference = self.sample(len(samples), torch.Generator().manual_seed(321))
        directions = torch.randn(2, projections, generator=torch.Generator().manual_seed(1))
        directions = directions / directions.norm(dim=0, keepdim=True)
        pa = (samples.float() @ directions).sort(0).values
        pb = (reference.float() @ directions).sort(0).values
        return (pa - pb).abs().mean().item()

    def mode_shares(self, samples: torch.Tensor) -> torch.Tensor:
        """Fraction of all samples that lie within 4 std of each mode."""
        dist = torch.cdist(samples.float(), self.modes)
        near = dist.min(1).values < 4 * self.std
        return torch.bincount(dist.argmin(1)[near], minlength=len(self.modes)).float() / len(
            samples
        )


class MixtureTeacher(nn.Module):
    """Exact flow prediction of a Gaussian mixture: ``v = (x_t - E[x0 | x_t]) / t``."""

    modes: torch.Tensor

    def __init__(self, modes: torch.Tensor, std: float) -> None:
        super().__init__()
        self.register_buffer("modes", modes.clone().double())
        self.std = std

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, t = hidden_states.double(), timestep.double()[:, None]
        var = (1 - t) ** 2 * self.std**2 + t**2  # Var(x_t | mode)
        means = (1 - t)[:, None] * self.modes[None]  # [B, K, 2]
        weights = torch.softmax(-((x[:, None] - means) ** 2).sum(-1) / (2 * var), dim=-1)
        gain = ((1 - t) * self.std**2 / var)[:, None]
        posterior = self.modes[None] + gain * (x[:, None] - means)
        x0 = (weights[..., None] * posterior).sum(1)
        return ((x - x0) / t.clamp_min(1e-6)).to(hidden_states.dtype)


class MLPDenoiser(nn.Module):
    """A small MLP flow predictor for 2-D points, in the pipeline's call convention."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 2),
        )  # fmt: skip

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = timestep[:, None].to(hidden_states.dtype)
        features = torch.cat([hidden_states, t, torch.log(t.clamp_min(1e-3))], dim=-1)
        return self.net(features)


def distill_one_step(
    mixture: GaussianMixture,
    *,
    iterations: int = 2000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    fit_steps: int = 500,
    config: DMDConfig | None = None,
    seed: int = 0,
) -> nn.Module:
    """Distill the mixture's exact teacher into a one-step :class:`MLPDenoiser` with DMD2.

    The fake score is first fitted to the teacher (DMD2 initialises it from the teacher), then
    the loop alternates one student step with ``student_update_freq - 1`` fake-score steps.
    """
    torch.manual_seed(seed)
    config = config or DMDConfig(
        sample_t_cfg={"time_dist_type": "uniform", "min_t": 0.02, "max_t": 0.98},
        student_update_freq=5,
        fake_score_pred_type="x0",
    )
    teacher, student, fake_score = mixture.teacher(), MLPDenoiser(), MLPDenoiser()

    fit_opt = torch.optim.Adam(fake_score.parameters(), lr=2e-3)
    for _ in range(fit_steps):
        x0 = mixture.sample(batch_size)
        t = sample_timesteps(batch_size, config.sample_t_cfg)
        x_t = add_noise(x0, torch.randn_like(x0), t)
        loss = ((fake_score(x_t, t) - teacher(x_t, t)) ** 2).mean()
        fit_opt.zero_grad()
        loss.backward()
        fit_opt.step()

    pipe = DMDPipeline(student, teacher, fake_score, config)
    student_opt = torch.optim.Adam(student.parameters(), lr=learning_rate)
    fake_opt = torch.optim.Adam(fake_score.parameters(), lr=learning_rate)
    for step in range(iterations):
        noise = torch.randn(batch_size, 2)
        if step % config.student_update_freq == 0:
            loss, opt = pipe.compute_student_loss(None, noise)["total"], student_opt
        else:
            loss, opt = pipe.compute_fake_score_loss(None, noise)["total"], fake_opt
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DMD2 loss became {loss.item()} at step {step}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student
