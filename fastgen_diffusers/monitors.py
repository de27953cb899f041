"""Collapse and saturation monitors for DMD2 training: cheap statistics of one student step.

DMD2 fails in two common ways: mode collapse (every noise gives the same sample for a prompt) and
saturation (samples drift to extreme latent values), both typical of a guidance scale that is
too high for the fake score to follow, a fake score that is updated too rarely, or a student
learning rate that is too high. :class:`CollapseMonitor` measures them from tensors the student
step already has (the student's x0 and, for reference, the real latents of the batch or the
teacher's conditional x0 at the same noise) and warns once per diagnostic when one stays past its
threshold for ``patience`` consecutive checks.

Diagnostics (keys of the dict :meth:`CollapseMonitor.update` returns, all ``monitor/...``):

- ``diversity_prompt``: mean RMS distance between the student's x0 of two rows with the same
  prompt (pairs pooled over prompt groups); ``diversity_prompt_ref`` the same over the
  reference rows; ``diversity_prompt_ratio`` their ratio. ``diversity_batch*``: the same over
  every pair of the batch. Absent when no prompt has two rows (a batch of one: no batch keys).
- ``mean`` / ``std`` and ``ref_mean`` / ``ref_std``: latent statistics of student and reference;
  ``std_ratio`` = ``std / ref_std``.
- ``saturation``: fraction of the student's latent values more than ``saturation_k`` (3)
  reference standard deviations from the reference mean (per channel, dim 1);
  ``ref_saturation``: the reference's own fraction (about 0.3% for Gaussian data).
- ``vsd_weight``: the batch mean of the VSD weight ``w = 1 / (mean|gen - teacher_x0| + 1e-6)``;
  ``vsd_step``: the RMS of ``w (fake_x0 - teacher_x0)``, the distance from the sample to its VSD
  target (how hard the step pulls).
- ``grad_norm``: the student's gradient norm (before clipping), when the loop passes it.
- ``fake_score_trend``: the mean fake-score loss since the previous check over the mean of the
  first window of fake-score losses (:meth:`CollapseMonitor.observe_fake_score_loss`).
- ``alarm/<name>``: 1.0 while a diagnostic has been past its threshold for ``patience`` checks.

Thresholds (constructor arguments, defaults below; a diagnostic warns after ``patience`` = 3
consecutive checks past it, once per run):

| diagnostic | warns when | default |
| --- | --- | --- |
| ``diversity`` | ``diversity_prompt_ratio`` (else ``diversity_batch_ratio``) below | 0.3 |
| ``saturation`` | ``saturation`` above ``max(saturation_fraction, 5 x ref_saturation)`` | 0.05 |
| ``std_ratio`` | ``std_ratio`` above, or below its inverse | 2.0 |
| ``grad_norm`` | non-finite, or above ``grad_norm_factor`` x the median of earlier checks | 10 |
| ``fake_score_trend`` | ``fake_score_trend`` above | 3.0 |

Example::

    monitor = CollapseMonitor(patience=3)
    metrics = monitor.update(step, student_x0=gen, reference_x0=real_latents,
                             group_ids=prompt_groups(text_embeds))
    for message in monitor.new_warnings:
        print(message)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "ADVICE",
    "CollapseMonitor",
    "MonitorThresholds",
    "pairwise_rms",
    "prompt_fingerprints",
    "prompt_groups",
    "saturation_fraction",
    "vsd_weight",
]

# What to try, per diagnostic; the warning quotes it.
ADVICE = {
    "diversity": "lower the guidance scale, update the fake score more often (a higher "
    "student_update_freq), lower the student learning rate, or enable the GAN branch",
    "saturation": "lower the guidance scale, lower the student learning rate, or update the fake "
    "score more often (a higher student_update_freq)",
    "std_ratio": "lower the guidance scale or the student learning rate",
    "grad_norm": "lower the student learning rate or clip gradients (--max_grad_norm)",
    "fake_score_trend": "update the fake score more often (a higher student_update_freq) or raise "
    "its learning rate (--fake_score_learning_rate)",
}

_MEANING = {
    "diversity": "the student's samples for a prompt are much less varied than the reference's "
    "(mode collapse)",
    "saturation": "many latent values lie far outside the reference's range (saturation)",
    "std_ratio": "the student's latent spread is far from the reference's",
    "grad_norm": "the student's gradient norm jumped (divergence)",
    "fake_score_trend": "the fake score's loss keeps growing: it no longer follows the student",
}


@dataclass(frozen=True)
class MonitorThresholds:
    """When each diagnostic counts as past its threshold (see the module docstring)."""

    diversity_ratio: float = 0.3
    saturation_k: float = 3.0
    saturation_fraction: float = 0.05
    saturation_factor: float = 5.0
    std_ratio: float = 2.0
    grad_norm_factor: float = 10.0
    fake_score_trend: float = 3.0
    patience: int = 3

    def __post_init__(self) -> None:
        for name in (
            "diversity_ratio",
            "saturation_k",
            "saturation_fraction",
            "saturation_factor",
            "grad_norm_factor",
            "fake_score_trend",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite value > 0, got {value!r}")
        if not (math.isfinite(self.std_ratio) and self.std_ratio > 1):
            raise ValueError(f"std_ratio must be a finite value > 1, got {self.std_ratio!r}")
        if not (isinstance(self.patience, int) and self.patience >= 1):
            raise ValueError(f"patience must be an int >= 1, got {self.patience!r}")


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


def pairwise_rms(x: torch.Tensor, group_ids: torch.Tensor | None = None) -> float | None:
    """Mean over pairs ``i < j`` of ``sqrt(mean((x_i - x_j)^2))``, in float64.

    With ``group_ids`` (``[B]`` ints) only pairs within a group count (pooled over groups).
    ``None`` when there is no such pair.
    """
    flat = _flat(x)
    n = flat.shape[0]
    dist = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    pairs = torch.ones(n, n, dtype=torch.bool, device=flat.device).triu(diagonal=1)
    if group_ids is not None:
        if group_ids.shape != (n,):
            raise ValueError(f"group_ids must have shape ({n},), got {tuple(group_ids.shape)}")
        g = group_ids.to(flat.device)
        pairs &= g[:, None] == g[None, :]
    if not bool(pairs.any()):
        return None
    return float(dist[pairs].mean())


def prompt_groups(*conditioning: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` group ids: rows whose conditioning tensors are all equal share an id."""
    tensors = [c for c in conditioning if isinstance(c, torch.Tensor)]
    if not tensors:
        raise ValueError("prompt_groups needs at least one conditioning tensor")
    batch = tensors[0].shape[0]
    rows = torch.cat([_flat(c).cpu() for c in tensors], dim=1)
    if rows.shape[0] != batch:
        raise ValueError("prompt_groups: conditioning tensors have different batch sizes")
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def prompt_fingerprints(*conditioning: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` float64 fingerprints of the rows' conditioning (on CPU; tensors whose first
    dim is not the first tensor's batch are left out): equal rows give equal
    values, so ranks can gather these instead of the embeddings and group the global batch
    (``torch.unique(gathered, return_inverse=True)``); distinct rows collide only by chance."""
    tensors = [c for c in conditioning if isinstance(c, torch.Tensor)]
    if not tensors:
        raise ValueError("prompt_fingerprints needs at least one conditioning tensor")
    # a tensor without the batch axis (shared by every row) cannot tell rows apart
    tensors = [c for c in tensors if c.ndim > 0 and c.shape[0] == tensors[0].shape[0]]
    rows = torch.cat([_flat(c).cpu() for c in tensors], dim=1)
    # A fixed random projection, computed on the CPU row by row in the same order, is a
    # deterministic function of the row.
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(rows.shape[1], generator=g, dtype=torch.float64) + 0.5
    return torch.stack([(row * weights).sum() for row in rows])


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and std over every other dim, shaped to broadcast over ``x``."""
    x = x.detach().to(torch.float64)
    dims = [0, *range(2, x.ndim)]
    shape = [1, x.shape[1], *([1] * (x.ndim - 2))]
    return x.mean(dim=dims).reshape(shape), x.std(dim=dims).reshape(shape)


def saturation_fraction(x: torch.Tensor, reference: torch.Tensor, k: float = 3.0) -> float:
    """Fraction of ``x``'s values more than ``k`` standard deviations from the reference mean,
    with mean and std taken per channel (dim 1) over ``reference``."""
    if x.ndim < 2 or reference.ndim != x.ndim or reference.shape[1] != x.shape[1]:
        raise ValueError(
            f"saturation_fraction needs [B, C, ...] tensors with the same channels, got "
            f"{tuple(x.shape)} and {tuple(reference.shape)}"
        )
    mean, std = _channel_stats(reference)
    beyond = (x.detach().to(torch.float64) - mean).abs() > k * std.clamp_min(1e-12)
    return float(beyond.to(torch.float64).mean())


def vsd_weight(gen: torch.Tensor, teacher_x0: torch.Tensor) -> torch.Tensor:
    """The VSD loss's per-sample weight ``1 / (mean |gen - teacher_x0| + 1e-6)`` (fp32, ``[B]``)."""
    diff = gen.detach().float() - teacher_x0.detach().float()
    return 1.0 / (diff.abs().reshape(diff.shape[0], -1).mean(dim=1) + 1e-6)


class CollapseMonitor:
    """Collapse and saturation diagnostics with warnings (see the module docstring).

    :meth:`measure` computes the statistics of one step (a pure function of its tensors, so
    data-parallel ranks can average them); :meth:`check` updates the warning state from them;
    :meth:`update` does both. :attr:`new_warnings` holds the messages of the last check (each
    diagnostic warns once per monitor).
    """

    def __init__(self, thresholds: MonitorThresholds | None = None, **overrides: float) -> None:
        base = thresholds or MonitorThresholds()
        self.thresholds = MonitorThresholds(**{**base.__dict__, **overrides})
        self.new_warnings: list[str] = []
        self.warned: set[str] = set()
        self._streak: dict[str, int] = {}
        self._grad_norms: list[float] = []
        self._fake_losses: list[float] = []
        self._fake_baseline: float | None = None

    # -- statistics ----------------------------------------------------------------------

    def measure(
        self,
        *,
        student_x0: torch.Tensor,
        reference_x0: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        teacher_x0: torch.Tensor | None = None,
        fake_x0: torch.Tensor | None = None,
        grad_norm: float | None = None,
    ) -> dict[str, float]:
        """Statistics of one student step.

        Args:
            student_x0: the student's samples ``[B, C, ...]``.
            reference_x0: what healthy samples look like, same shape: the batch's real latents,
                or the teacher's x0 at the student's input noise.
            group_ids: ``[B]`` prompt groups (:func:`prompt_groups`).
            teacher_x0 / fake_x0: the VSD step's teacher (guided) and fake-score x0.
            grad_norm: the student's gradient norm before clipping.
        """
        out: dict[str, float] = {}
        if reference_x0 is not None and reference_x0.shape != student_x0.shape:
            raise ValueError(
                f"reference_x0 {tuple(reference_x0.shape)} must match student_x0 "
                f"{tuple(student_x0.shape)}"
            )
        pairs = {"prompt": group_ids, "batch": None} if group_ids is not None else {"batch": None}
        for name, groups in pairs.items():
            div = pairwise_rms(student_x0, groups)
            if div is None:
                continue
            out[f"monitor/diversity_{name}"] = div
            ref = pairwise_rms(reference_x0, groups) if reference_x0 is not None else None
            if ref is not None:
                out[f"monitor/diversity_{name}_ref"] = ref
                out[f"monitor/diversity_{name}_ratio"] = div / max(ref, 1e-12)
        x = student_x0.detach().to(torch.float64)
        out["monitor/mean"] = float(x.mean())
        out["monitor/std"] = float(x.std())
        if reference_x0 is not None:
            r = reference_x0.detach().to(torch.float64)
            k = self.thresholds.saturation_k
            out["monitor/ref_mean"] = float(r.mean())
            out["monitor/ref_std"] = float(r.std())
            out["monitor/std_ratio"] = out["monitor/std"] / max(out["monitor/ref_std"], 1e-12)
            out["monitor/saturation"] = saturation_fraction(x, r, k)
            out["monitor/ref_saturation"] = saturation_fraction(r, r, k)
        if teacher_x0 is not None:
            w = vsd_weight(student_x0, teacher_x0)
            out["monitor/vsd_weight"] = float(w.mean())
            if fake_x0 is not None:
                step = w.reshape(-1, *([1] * (fake_x0.ndim - 1))) * (
                    fake_x0.detach().float() - teacher_x0.detach().float()
                )
                out["monitor/vsd_step"] = float(step.pow(2).mean().sqrt())
        if grad_norm is not None:
            out["monitor/grad_norm"] = float(grad_norm)
        return out

    def observe_fake_score_loss(self, value: float) -> None:
        """Record one fake-score loss (call every fake-score update)."""
        self._fake_losses.append(float(value))

    # -- warnings ------------------------------------------------------------------------

    def _past(self, metrics: dict[str, float]) -> dict[str, tuple[float, str] | None]:
        """Per diagnostic: ``(value, threshold text)`` when past its threshold, ``None`` when
        within; diagnostics without a value this check are left out."""
        th = self.thresholds
        past: dict[str, tuple[float, str] | None] = {}
        ratio = metrics.get("monitor/diversity_prompt_ratio")
        label = "diversity_prompt_ratio"
        if ratio is None:
            ratio, label = metrics.get("monitor/diversity_batch_ratio"), "diversity_batch_ratio"
        if ratio is not None:
            bad = ratio < th.diversity_ratio
            past["diversity"] = (ratio, f"{label} below {th.diversity_ratio:g}") if bad else None
        sat = metrics.get("monitor/saturation")
        if sat is not None:
            limit = max(
                th.saturation_fraction,
                th.saturation_factor * metrics.get("monitor/ref_saturation", 0.0),
            )
            past["saturation"] = (sat, f"saturation above {limit:.3g}") if sat > limit else None
        std_ratio = metrics.get("monitor/std_ratio")
        if std_ratio is not None:
            bad = not (1 / th.std_ratio <= std_ratio <= th.std_ratio)
            text = f"std_ratio outside [{1 / th.std_ratio:.3g}, {th.std_ratio:g}]"
            past["std_ratio"] = (std_ratio, text) if bad else None
        norm = metrics.get("monitor/grad_norm")
        if norm is not None:
            history = sorted(self._grad_norms)
            cap = th.grad_norm_factor * history[len(history) // 2] if len(history) >= 3 else None
            bad = not math.isfinite(norm) or (cap is not None and norm > cap)
            text = "a finite value" if cap is None else f"grad_norm above {cap:.3g}"
            past["grad_norm"] = (norm, text) if bad else None
            if math.isfinite(norm):
                self._grad_norms.append(norm)
        trend = metrics.get("monitor/fake_score_trend")
        if trend is not None:
            bad = trend > th.fake_score_trend
            text = f"fake_score_trend above {th.fake_score_trend:g}"
            past["fake_score_trend"] = (trend, text) if bad else None
        return past

    def check(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Update the warning state from ``metrics`` (:meth:`measure`'s, possibly averaged
        over ranks); returns them with ``monitor/fake_score_trend`` and ``monitor/alarm/*``
        added. Messages of diagnostics that just crossed go to :attr:`new_warnings`."""
        metrics = dict(metrics)
        if self._fake_losses:
            window = sum(self._fake_losses) / len(self._fake_losses)
            self._fake_losses = []
            if self._fake_baseline is None:
                self._fake_baseline = window
            metrics["monitor/fake_score_trend"] = window / max(self._fake_baseline, 1e-12)
        past = self._past(metrics)
        self.new_warnings = []
        patience = self.thresholds.patience
        for name, result in past.items():
            self._streak[name] = self._streak.get(name, 0) + 1 if result is not None else 0
            alarm = self._streak[name] >= patience
            metrics[f"monitor/alarm/{name}"] = float(alarm)
            if alarm and result is not None and name not in self.warned:
                self.warned.add(name)
                value, text = result
                self.new_warnings.append(
                    f"WARNING collapse monitor, step {step}: {name} = {value:.4g} ({text} for "
                    f"{patience} checks in a row): {_MEANING[name]}. Try: {ADVICE[name]}."
                )
        return metrics

    def update(
        self,
        step: int,
        *,
        student_x0: torch.Tensor,
        reference_x0: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        teacher_x0: torch.Tensor | None = None,
        fake_x0: torch.Tensor | None = None,
        grad_norm: float | None = None,
    ) -> dict[str, float]:
        """:meth:`measure` then :meth:`check`: the step's metrics and alarm flags, as floats."""
        metrics = self.measure(
            student_x0=student_x0,
            reference_x0=reference_x0,
            group_ids=group_ids,
            teacher_x0=teacher_x0,
            fake_x0=fake_x0,
            grad_norm=grad_norm,
        )
        return self.check(step, metrics)

    @property
    def alarms(self) -> Sequence[str]:
        """Diagnostics past their threshold for ``patience`` checks at the last check."""
        return sorted(n for n, s in self._streak.items() if s >= self.thresholds.patience)
