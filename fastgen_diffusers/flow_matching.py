"""Rectified-flow helpers: forward process, conversions between parameterizations, timesteps.

Convention: ``alpha_t = 1 - t`` and ``sigma_t = t``, so ``x_t = (1 - t) x0 + t eps`` with
``t`` in [0, 1] (``t = 1`` is pure noise). The flow (velocity) is ``v = eps - x0``.
Arithmetic runs in float64 and the result is cast back to the input dtype, so bf16 latents
do not lose the small differences these inversions divide by.

Example::

    t = sample_timesteps(4, SampleTimestepConfig(), device=x0.device)
    x_t = add_noise(x0, torch.randn_like(x0), t)
    x0_hat = pred_x0_from_flow(model_flow, x_t, t)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .utils import expand_like

if TYPE_CHECKING:
    from .config import SampleTimestepConfig

__all__ = [
    "add_noise",
    "convert_prediction",
    "next_rung",
    "pred_noise_to_pred_x0",
    "pred_x0_from_flow",
    "pred_x0_from_v",
    "renoise",
    "rf_alpha",
    "rf_sigma",
    "sample_from_t_list",
    "sample_timesteps",
    "x0_to_eps",
    "x0_to_flow",
    "x0_to_v",
]

_CLAMP = 1e-6


def rf_alpha(t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow data coefficient ``alpha_t = 1 - t``."""
    return 1.0 - t


def rf_sigma(t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow noise coefficient ``sigma_t = t``."""
    return t


def _f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [x.to(torch.float64) for x in tensors]


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process ``x_t = (1 - t) x0 + t eps`` (float64 inside, ``x0.dtype`` out).

    ``t`` is per-sample ``[B]`` (or a scalar) and is broadcast over the other axes.
    """
    _check_same_shape(x0, eps, "x0 and eps")
    x0_64, eps_64, t_64 = _f64(x0, eps, torch.as_tensor(t, device=x0.device))
    t_64 = expand_like(t_64, x0_64)
    return (rf_alpha(t_64) * x0_64 + rf_sigma(t_64) * eps_64).to(x0.dtype)


def pred_noise_to_pred_x0(
    pred_noise: torch.Tensor, noisy_latents: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Convert an eps prediction to x0: ``x0 = (x_t - t eps) / (1 - t)`` (denominator clamped)."""
    eps_64, x_t, t_64 = _f64(
        pred_noise, noisy_latents, torch.as_tensor(t, device=pred_noise.device)
    )
    t_64 = expand_like(t_64, x_t)
    x0 = (x_t - rf_sigma(t_64) * eps_64) / rf_alpha(t_64).clamp_min(_CLAMP)
    return x0.to(noisy_latents.dtype)


def pred_x0_from_flow(
    pred_flow: torch.Tensor, noisy_latents: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Convert a flow prediction ``v = eps - x0`` to x0: ``x0 = x_t - t v``."""
    v, x_t, t_64 = _f64(pred_flow, noisy_latents, torch.as_tensor(t, device=pred_flow.device))
    t_64 = expand_like(t_64, x_t)
    return (x_t - rf_sigma(t_64) * v).to(noisy_latents.dtype)


def x0_to_eps(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Implied noise of an x0 estimate: ``eps = (x_t - (1 - t) x0) / t`` (denominator clamped)."""
    x0_64, x_t_64, t_64 = _f64(x0, x_t, torch.as_tensor(t, device=x0.device))
    t_64 = expand_like(t_64, x0_64)
    eps = (x_t_64 - rf_alpha(t_64) * x0_64) / rf_sigma(t_64).clamp_min(_CLAMP)
    return eps.to(x0.dtype)


def x0_to_flow(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Flow implied by an x0 estimate: ``v = (x_t - x0) / t`` (denominator clamped)."""
    x0_64, x_t_64, t_64 = _f64(x0, x_t, torch.as_tensor(t, device=x0.device))
    t_64 = expand_like(t_64, x0_64)
    return ((x_t_64 - x0_64) / rf_sigma(t_64).clamp_min(_CLAMP)).to(x0.dtype)


def pred_x0_from_v(
    pred_v: torch.Tensor, noisy_latents: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Convert a v prediction ``v = alpha_t eps - sigma_t x0`` to x0.

    ``x0 = (alpha_t x_t - sigma_t v) / (alpha_t^2 + sigma_t^2)``. Note that under rectified
    flow ``v`` differs from the flow ``eps - x0``; this is the parameterization ``dsm_loss``
    uses for ``pred_type="v"``.
    """
    v, x_t, t_64 = _f64(pred_v, noisy_latents, torch.as_tensor(t, device=pred_v.device))
    t_64 = expand_like(t_64, x_t)
    alpha, sigma = rf_alpha(t_64), rf_sigma(t_64)
    return ((alpha * x_t - sigma * v) / (alpha**2 + sigma**2)).to(noisy_latents.dtype)


def x0_to_v(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v implied by an x0 estimate: ``v = alpha_t eps - sigma_t x0`` with ``eps`` from
    :func:`x0_to_eps`."""
    x0_64, x_t_64, t_64 = _f64(x0, x_t, torch.as_tensor(t, device=x0.device))
    t_64 = expand_like(t_64, x0_64)
    alpha, sigma = rf_alpha(t_64), rf_sigma(t_64)
    eps = (x_t_64 - alpha * x0_64) / sigma.clamp_min(_CLAMP)
    return (alpha * eps - sigma * x0_64).to(x0.dtype)


_TO_X0 = {
    "eps": pred_noise_to_pred_x0,
    "flow": pred_x0_from_flow,
    "v": pred_x0_from_v,
}
_FROM_X0 = {"eps": x0_to_eps, "flow": x0_to_flow, "v": x0_to_v}


def convert_prediction(
    pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, from_type: str, to_type: str
) -> torch.Tensor:
    """Re-express a prediction made at ``(x_t, t)`` in another parameterization (via x0).

    Example::

        x0 = convert_prediction(model_flow, x_t, t, from_type="flow", to_type="x0")
    """
    for name, value in (("from_type", from_type), ("to_type", to_type)):
        if value not in ("x0", "eps", "v", "flow"):
            raise ValueError(f"{name}={value!r}; expected one of 'x0', 'eps', 'v', 'flow'")
    if from_type == to_type:
        return pred
    x0 = pred if from_type == "x0" else _TO_X0[from_type](pred, x_t, t)
    return x0 if to_type == "x0" else _FROM_X0[to_type](x0, x_t, t)


def renoise(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    *,
    sample_type: str,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One few-step student transition: from the x0 predicted at ``(x_t, t)`` to ``x_{t_next}``.

    ``ode`` re-noises with the noise the prediction implies (``x0_to_eps``), which makes the
    step a DDIM / Euler step; ``sde`` re-noises with fresh noise (``noise`` if given).
    """
    if sample_type == "ode":
        eps = x0_to_eps(x0, x_t, t)
    elif sample_type == "sde":
        eps = torch.randn_like(x0) if noise is None else noise
    else:
        raise ValueError(f"sample_type={sample_type!r}; expected 'ode' or 'sde'")
    return add_noise(x0, eps, t_next)


def _truncated_lognormal(
    n: int, mean: float, std: float, *, min_t: float, max_t: float
) -> torch.Tensor:
    """``exp(N(mean, std))`` truncated to ``(min_t, max_t)`` by inverting the normal CDF."""
    normal = torch.distributions.Normal(
        torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    )
    lo = normal.cdf(torch.tensor(math.log(max(min_t, 1e-12)), dtype=torch.float64))
    hi = normal.cdf(torch.tensor(math.log(max_t), dtype=torch.float64))
    u = lo + (hi - lo) * torch.rand(n, dtype=torch.float64)
    # Keep u strictly inside (0, 1) so icdf stays finite at the edges.
    u = u.clamp(torch.finfo(torch.float64).tiny, 1.0 - 1e-16)
    return normal.icdf(u).exp()


def sample_timesteps(
    n: int,
    cfg: SampleTimestepConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sample ``n`` training timesteps in ``[cfg.min_t, cfg.max_t]`` from ``cfg.time_dist_type``.

    - ``uniform``: ``U(min_t, max_t)``.
    - ``logitnormal``: ``sigmoid(N(p_mean, p_std)) * (max_t - min_t) + min_t``.
    - ``lognormal``: ``exp(N(p_mean, p_std))`` truncated to ``(min_t, max_t)``.
    - ``shifted``: ``u ~ U(min_t, max_t)``, ``t = u s / (u (s - 1) + 1)`` with ``s = shift``.
    - ``polynomial``: uniform over ``linspace(min_t, max_t, 1000)``.

    Draws use the global torch generator (on the CPU, so a seed gives the same values on every
    device), then move to ``device``.
    """
    if n < 1:
        raise ValueError(f"sample_timesteps needs n >= 1, got n={n}")
    lo, hi, kind = cfg.min_t, cfg.max_t, cfg.time_dist_type
    if kind == "uniform":
        t = torch.rand(n, dtype=torch.float64) * (hi - lo) + lo
    elif kind == "logitnormal":
        t = torch.sigmoid(torch.randn(n, dtype=torch.float64) * cfg.p_std + cfg.p_mean)
        t = t * (hi - lo) + lo
    elif kind == "lognormal":
        t = _truncated_lognormal(n, cfg.p_mean, cfg.p_std, min_t=lo, max_t=hi)
    elif kind == "shifted":
        u = torch.rand(n, dtype=torch.float64) * (hi - lo) + lo
        t = u * cfg.shift / (u * (cfg.shift - 1.0) + 1.0)
    elif kind == "polynomial":
        grid = torch.linspace(lo, hi, 1000, dtype=torch.float64)
        t = grid[torch.randint(0, grid.numel(), (n,))]
    else:  # unreachable through a validated config
        raise ValueError(f"Unknown time_dist_type={kind!r}")
    return t.clamp(lo, hi).to(device=device, dtype=dtype)


def sample_from_t_list(
    n: int,
    t_list: list[float],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sample ``n`` starting timesteps uniformly from the rungs ``t_list[:-1]``.

    ``t_list`` is the student's inference trajectory and must end with ``0.0``.
    """
    if len(t_list) < 2 or t_list[-1] != 0.0:
        raise ValueError(
            f"t_list={list(t_list)} must hold at least one rung followed by a final 0.0"
        )
    rungs = torch.tensor(t_list[:-1], dtype=torch.float64)
    idx = torch.randint(0, rungs.numel(), (n,))
    return rungs[idx].to(device=device, dtype=dtype)


def next_rung(t: torch.Tensor, t_list: list[float] | tuple[float, ...]) -> torch.Tensor:
    """For each entry of ``t`` (a rung of ``t_list``, matched to the nearest one), the next
    rung: where the few-step student's step from ``t`` lands (``0.0`` after the last rung)."""
    rungs = torch.tensor(list(t_list), dtype=torch.float64, device=t.device)
    index = (t.to(torch.float64)[:, None] - rungs[None, :]).abs().argmin(dim=1)
    index = (index + 1).clamp(max=len(t_list) - 1)
    return rungs[index].to(t.dtype)
