"""Inference samplers for any network that follows the pipeline's call convention.

- :func:`sample_student`: the distilled few-step student over ``t_list`` (ODE or SDE).
- :func:`sample_teacher`: the multi-step teacher, Euler on the flow, with CFG.

Both take the same ``model(hidden_states=..., timestep=t in [0, 1], ...)`` networks as
:class:`~fastgen_diffusers.DMDPipeline`, so a family wrapper (or a role view of a LoRA model)
samples exactly as it trains.

Example::

    noise = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(0))
    x0 = sample_student(student, noise, [0.999, 0.75, 0.0], encoder_hidden_states=embeds)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .flow_matching import convert_prediction, renoise
from .modeling import call_model
from .utils import classifier_free_guidance

__all__ = ["sample_student", "sample_teacher", "validate_t_list"]


def _full(batch: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((batch,), float(value), device=like.device, dtype=torch.float32)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's device, then move: the same seed gives the same noise on any
    # device (what diffusers' randn_tensor does).
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return noise.to(x.device)


def validate_t_list(t_list: Sequence[float]) -> list[float]:
    """``t_list`` as floats, checked to be a student schedule: at least one rung in (0, 1],
    strictly decreasing, then the final ``0.0`` (e.g. ``[0.999, 0.5, 0.0]``).

    Raises ``ValueError`` naming the list and what is expected. The family plugins validate
    their ``t_list`` arguments with it too.
    """
    values = [float(t) for t in t_list]
    if len(values) < 2 or values[-1] != 0.0 or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(
            f"t_list={values} must be strictly decreasing, in [0, 1], hold at least one rung, "
            "and end with 0.0"
        )
    if not 0.0 < values[0] <= 1.0:
        raise ValueError(f"t_list={values} must start in (0, 1]")
    return values


@torch.no_grad()
def sample_student(
    model: nn.Module,
    noise: torch.Tensor,
    t_list: Sequence[float],
    *,
    sample_type: str = "ode",
    pred_type: str = "flow",
    encoder_hidden_states: torch.Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    num_train_timesteps: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the few-step student: start at ``x = t_list[0] * noise``, predict x0 at each rung,
    re-noise to the next rung (``ode``: the implied noise, ``sde``: fresh noise from
    ``generator``), and return the last x0.

    The ``ode`` transition equals an Euler step of the flow, so a stock diffusers pipeline whose
    scheduler visits the same sigmas gives the same result (see the family plugins).
    """
    t_list = validate_t_list(t_list)
    batch = noise.shape[0]
    x = (noise.to(torch.float64) * t_list[0]).to(noise.dtype)
    x0 = x
    for t_cur, t_next in zip(t_list[:-1], t_list[1:]):
        t = _full(batch, t_cur, x)
        raw = call_model(
            model,
            x,
            t,
            encoder_hidden_states,
            model_kwargs,
            num_train_timesteps=num_train_timesteps,
        )
        x0 = convert_prediction(raw, x, t, from_type=pred_type, to_type="x0")
        if t_next > 0.0:
            fresh = _randn_like(x0, generator) if sample_type == "sde" else None
            x = renoise(x0, x, t, _full(batch, t_next, x), sample_type=sample_type, noise=fresh)
    return x0


@torch.no_grad()
def sample_teacher(
    model: nn.Module,
    noise: torch.Tensor,
    sigmas: Sequence[float],
    *,
    pred_type: str = "flow",
    encoder_hidden_states: torch.Tensor | None = None,
    negative_encoder_hidden_states: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    negative_model_kwargs: dict[str, Any] | None = None,
    num_train_timesteps: int | None = None,
    guidance_scale_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Euler integration of the teacher's flow from ``sigmas[0]`` to ``sigmas[-1]`` (use 0.0).

    ``x`` starts as ``noise`` (as stock pipelines do). With ``guidance_scale`` the conditional
    and unconditional predictions are combined as ``uncond + s (cond - uncond)``;
    ``guidance_scale_fn`` (``t [B] -> scales [B]``) replaces ``s`` per sample and step (a
    two-expert Wan teacher's ``guidance_scale`` / ``guidance_scale_2``). Returns the final
    latents (x0 when the schedule ends at 0).
    """
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError(f"sigmas={sigmas} needs at least a start and an end")
    if (
        guidance_scale is not None
        and negative_encoder_hidden_states is None
        and (negative_model_kwargs is None)
    ):
        raise ValueError(f"guidance_scale={guidance_scale} needs negative conditioning")
    negative_kwargs = {**(model_kwargs or {}), **(negative_model_kwargs or {})}
    batch = noise.shape[0]
    x = noise
    for s_cur, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = _full(batch, s_cur, x)
        raw = call_model(
            model,
            x,
            t,
            encoder_hidden_states,
            model_kwargs,
            num_train_timesteps=num_train_timesteps,
        )
        flow = convert_prediction(raw, x, t, from_type=pred_type, to_type="flow")
        if guidance_scale is not None:
            raw_neg = call_model(
                model,
                x,
                t,
                negative_encoder_hidden_states,
                negative_kwargs,
                num_train_timesteps=num_train_timesteps,
            )
            flow_neg = convert_prediction(raw_neg, x, t, from_type=pred_type, to_type="flow")
            scale: float | torch.Tensor = guidance_scale
            if guidance_scale_fn is not None:
                scale = guidance_scale_fn(t).to(flow.dtype).view(-1, *([1] * (flow.ndim - 1)))
            flow = classifier_free_guidance(flow, flow_neg, scale)
        # Euler in fp32 like diffusers' FlowMatchEulerDiscreteScheduler.step.
        x = (x.float() + (s_next - s_cur) * flow.float()).to(noise.dtype)
    return x
