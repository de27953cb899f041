"""Stateless DMD2 loss functions: tensors in, scalar loss out.

Orchestration (which network sees what, under which gradient mode) lives in
:mod:`fastgen_diffusers.methods.dmd`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .utils import expand_like

__all__ = [
    "dsm_loss",
    "gan_disc_loss",
    "gan_gen_loss",
    "pseudo_huber_loss",
    "r1_loss",
    "vsd_loss",
]

_PRED_TYPES = ("x0", "eps", "v", "flow")


def _need(pred_type: str, **tensors: object) -> None:
    missing = [name for name, value in tensors.items() if value is None]
    if missing:
        raise ValueError(f"dsm_loss(pred_type={pred_type!r}) needs {', '.join(missing)}")


def dsm_loss(
    pred_type: str,
    net_pred: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    alpha_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sigma_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Denoising score-matching loss: mean squared error against the target in ``pred_type`` space.

    With the forward process ``x_t = alpha_t x0 + sigma_t eps`` the targets are
    ``x0`` (``"x0"``), ``eps`` (``"eps"``), ``alpha_t eps - sigma_t x0`` (``"v"``, needs ``t``,
    ``alpha_fn`` and ``sigma_fn``) and ``eps - x0`` (``"flow"``).

    Example::

        loss = dsm_loss("flow", model_out, x0=x0, eps=eps)
    """
    if pred_type == "x0":
        _need(pred_type, x0=x0)
        assert x0 is not None
        target = x0
    elif pred_type == "eps":
        _need(pred_type, eps=eps)
        assert eps is not None
        target = eps
    elif pred_type == "v":
        _need(pred_type, x0=x0, eps=eps, t=t, alpha_fn=alpha_fn, sigma_fn=sigma_fn)
        assert x0 is not None and eps is not None and t is not None
        assert alpha_fn is not None and sigma_fn is not None
        alpha = expand_like(alpha_fn(t), x0).to(x0.dtype)
        sigma = expand_like(sigma_fn(t), x0).to(x0.dtype)
        target = alpha * eps - sigma * x0
    elif pred_type == "flow":
        _need(pred_type, x0=x0, eps=eps)
        assert x0 is not None and eps is not None
        target = eps - x0
    else:
        raise ValueError(f"Unknown pred_type={pred_type!r}; expected one of {_PRED_TYPES}")
    if target.shape != net_pred.shape:
        raise ValueError(
            f"dsm_loss: prediction shape {tuple(net_pred.shape)} does not match the "
            f"{pred_type} target shape {tuple(target.shape)}"
        )
    return F.mse_loss(net_pred, target.to(net_pred.dtype))


def vsd_loss(
    gen_data: torch.Tensor,
    teacher_x0: torch.Tensor,
    fake_score_x0: torch.Tensor,
    additional_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Variational score distillation (the DMD distribution-matching term).

    Per sample, ``w = 1 / (mean |gen - teacher_x0| + 1e-6)`` (fp32) and the pseudo-target is
    ``gen - w (fake_score_x0 - teacher_x0)``; the loss is ``0.5 * MSE(gen, target)``, whose
    gradient with respect to ``gen`` is ``w (fake_score_x0 - teacher_x0) / numel``. Only
    ``gen_data`` receives gradient. ``additional_scale`` (``[B]``) multiplies ``w``.
    """
    if not gen_data.shape == teacher_x0.shape == fake_score_x0.shape:
        raise ValueError(
            "vsd_loss needs matching shapes, got gen_data "
            f"{tuple(gen_data.shape)}, teacher_x0 {tuple(teacher_x0.shape)}, "
            f"fake_score_x0 {tuple(fake_score_x0.shape)}"
        )
    dims = tuple(range(1, gen_data.ndim))
    with torch.no_grad():
        gen32 = gen_data.detach().float()
        teacher32 = teacher_x0.detach().float()
        fake32 = fake_score_x0.detach().float()
        w = 1.0 / ((gen32 - teacher32).abs().mean(dim=dims, keepdim=True) + 1e-6)
        if additional_scale is not None:
            w = w * expand_like(additional_scale.detach().float(), w)
        target = gen32 - w * (fake32 - teacher32)
    return 0.5 * F.mse_loss(gen_data.float(), target)


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, heads], got shape {tuple(logits.shape)}")


def gan_gen_loss(fake_logits: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Non-saturating generator loss ``mean softplus(-D(fake))``; logits are ``[B, heads]``.

    ``weight`` (``[B]``) scales each sample's term: ``mean_b w_b mean_h softplus(-D)``.
    """
    _check_logits("fake_logits", fake_logits)
    per_sample = F.softplus(-fake_logits.float()).mean(dim=1)
    if weight is not None:
        if weight.shape != per_sample.shape:
            raise ValueError(
                f"gan_gen_loss weight must be [{per_sample.shape[0]}], got {tuple(weight.shape)}"
            )
        per_sample = per_sample * weight.float()
    return per_sample.mean()


def pseudo_huber_loss(pred: torch.Tensor, target: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """Element-wise pseudo-Huber loss ``mean(sqrt((pred - target)^2 + c^2) - c)`` in fp32:
    quadratic below ``c``, absolute above (SenseFlow's ISG loss, c = 1e-3)."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pseudo_huber_loss needs matching shapes, got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    if not c > 0:
        raise ValueError(f"pseudo_huber_loss needs c > 0, got {c}")
    diff = pred.float() - target.float()
    return (torch.sqrt(diff * diff + c * c) - c).mean()


def gan_disc_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``mean softplus(D(fake)) + mean softplus(-D(real))``."""
    _check_logits("real_logits", real_logits)
    _check_logits("fake_logits", fake_logits)
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def r1_loss(real_logits: torch.Tensor, perturbed_real_logits: torch.Tensor) -> torch.Tensor:
    """Approximate R1: ``MSE(D(f(real)), D(f(real + alpha n)))``.

    A finite-difference stand-in for the gradient penalty, so no double backward through
    attention kernels is needed. The caller computes both logit sets.
    """
    if real_logits.shape != perturbed_real_logits.shape:
        raise ValueError(
            f"r1_loss needs matching shapes, got real_logits {tuple(real_logits.shape)} and "
            f"perturbed_real_logits {tuple(perturbed_real_logits.shape)}"
        )
    return F.mse_loss(real_logits.float(), perturbed_real_logits.float())
